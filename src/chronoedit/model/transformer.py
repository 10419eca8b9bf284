"""ChronoEdit's diffusion transformer: a Wan2.1-I2V DiT with temporal-skip RoPE.

Module and parameter names equal diffusers' ``ChronoEditTransformer3DModel`` so the real checkpoint loads as is.
Shapes: B batch, C channels, F/H/W latent frames/rows/cols, L = F*H*W/(pt*ph*pw) video tokens, D model width,
T context tokens (image tokens + 512 text tokens). Modulation, norms, RoPE and residual gates run in float32.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .cache_hooks import CacheHooks
from .config import TransformerConfig
from .context_cache import ContextCache, ContextKV, CrossKV, LazyKV, weights_fingerprint
from .rope import RotaryEmbedding, apply_rotary

TEXT_TOKENS = 512  # the UMT5 context length; image tokens are the ones before the last 512

# Parameters kept in float32 when the model runs in bf16/fp16 (names as in diffusers' _keep_in_fp32_modules). The one
# statement of the fp32-island rule: loading casts by it, and hands it to chronoedit.quant (which imports no model).
FP32_MODULES = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")


def keeps_fp32(name: str) -> bool:
    """Whether the parameter ``name`` stays float32 when the model runs in bf16/fp16."""
    return any(part in FP32_MODULES for part in name.split("."))


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input and parameter dtypes; returns the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class GeluProjection(nn.Module):
    """Linear then GELU (exact or tanh); the ``net.0.proj`` of a diffusers FeedForward."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    """[.., dim_in] -> Linear -> GELU -> Linear -> [.., dim_out]; keys ``net.0.proj`` and ``net.2``."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int, approximate: str) -> None:
        super().__init__()
        self.net = nn.Sequential(GeluProjection(dim_in, hidden, approximate), nn.Identity(), nn.Linear(hidden, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def sinusoidal_embedding(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """timestep: [B] -> [B, dim] float32, (cos | sin) halves at frequencies 10000^(-k / (dim/2))."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half
    angles = timestep.float()[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """q: [B, Lq, heads, hd], k/v: [B, Lk, heads, hd] -> [B, Lq, heads * hd].

    ``backend``: None for PyTorch's SDPA called directly, else a backend of diffusers' attention dispatcher
    (``AttentionBackendName`` value, e.g. ``"flash"``, ``"sage"``), which takes the same [B, L, heads, hd] layout."""
    if backend is None:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).flatten(2)
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    return dispatch_attention_fn(q, k, v, backend=AttentionBackendName(backend)).flatten(2)  # [B, Lq, heads * hd]


class SequenceSplit(Protocol):
    """Context parallelism as the model sees it (implemented by :class:`chronoedit.parallel.ContextParallel`): the
    token sequence is split over ranks after the patch embedding and joined after the output projection; only
    self-attention needs the other ranks' tokens."""

    def split(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x: [B, L, D], rope: [1, L, 1, hd/2] each -> this rank's shard of both."""
        ...

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, local: Any) -> torch.Tensor:
        """q/k/v: [B, Ls, heads, hd] (this rank's tokens) -> [B, Ls, heads * hd] over the whole sequence."""
        ...

    def join(self, x: torch.Tensor, length: int) -> torch.Tensor:
        """x: [B, Ls, C] -> [B, length, C]."""
        ...


class Attention(nn.Module):
    """Projections shared by both attentions: q/k/v/out over D, RMS norms of q and k across all heads."""

    def __init__(self, dim: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.attention_backend: str | None = None  # diffusers' dispatcher backend (None: SDPA directly)
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, D] -> [B, L, heads, hd]."""
        return x.unflatten(2, (self.heads, -1))


class SelfAttention(Attention):
    """Multi-head self-attention over video tokens with RoPE on q and k (over all ranks' tokens when the sequence is
    split: ``sequence_split``)."""

    sequence_split: SequenceSplit | None = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: [B, L, D] -> [B, L, D]."""
        q = apply_rotary(self.split_heads(self.norm_q(self.to_q(x))), *rope)  # [B, L, heads, hd]
        k = apply_rotary(self.split_heads(self.norm_k(self.to_k(x))), *rope)
        v = self.split_heads(self.to_v(x))
        if self.sequence_split is None:
            out = attention(q, k, v, self.attention_backend)  # [B, L, D]
        else:
            out = self.sequence_split.attention(q, k, v, functools.partial(attention, backend=self.attention_backend))
        return self.to_out[0](out.type_as(q))


class CrossAttention(Attention):
    """Video tokens attend to the text tokens and, through added K/V projections, to the CLIP image tokens."""

    def __init__(self, dim: int, heads: int, eps: float, added_kv_proj_dim: int | None) -> None:
        super().__init__(dim, heads, eps)
        self.has_image_kv = added_kv_proj_dim is not None
        if self.has_image_kv:
            self.add_k_proj = nn.Linear(added_kv_proj_dim, dim)
            self.add_v_proj = nn.Linear(added_kv_proj_dim, dim)
            self.norm_added_k = nn.RMSNorm(dim, eps=eps)

    def kv_modules(self) -> list[nn.Module]:
        """The layers that make the keys and values from the context."""
        names = ("to_k", "to_v", "norm_k") + (("add_k_proj", "add_v_proj", "norm_added_k") if self.has_image_kv else ())
        return [getattr(self, name) for name in names]

    def project(self, context: torch.Tensor) -> CrossKV:
        """context: [B, T, D] (image tokens first, then 512 text tokens) -> keys and values, heads split."""
        split = context.shape[1] - TEXT_TOKENS if self.has_image_kv else 0
        image_ctx, text_ctx = context[:, :split], context[:, split:]
        kv = CrossKV(
            key=self.split_heads(self.norm_k(self.to_k(text_ctx))),  # [B, 512, heads, hd]
            value=self.split_heads(self.to_v(text_ctx)),
        )
        if self.has_image_kv:
            kv.image_key = self.split_heads(self.norm_added_k(self.add_k_proj(image_ctx)))  # [B, N, heads, hd]
            kv.image_value = self.split_heads(self.add_v_proj(image_ctx))
        return kv

    def forward(self, x: torch.Tensor, context: torch.Tensor | CrossKV | LazyKV) -> torch.Tensor:
        """x: [B, L, D]; context: [B, T, D] or its keys and values from :meth:`project` (made now if not yet)
        -> [B, L, D]."""
        if isinstance(context, LazyKV):
            context = _fetch_kv(context, self.project)
        kv = context if isinstance(context, CrossKV) else self.project(context)
        q = self.split_heads(self.norm_q(self.to_q(x)))  # [B, L, heads, hd]
        out = attention(q, kv.key, kv.value, self.attention_backend).type_as(q)  # [B, L, D]
        if kv.image_key is not None:
            out = out + attention(q, kv.image_key, kv.image_value, self.attention_backend).type_as(q)
        return self.to_out[0](out)


@torch.compiler.disable
def _fetch_kv(lazy: LazyKV, project: Any) -> CrossKV:
    """The block's cached keys and values (projected now if not yet), always run eagerly: under ``torch.compile``
    the cache lookup (which block, filled or not) would otherwise be guarded on and compile once per block."""
    return lazy.get(project)


class TransformerBlock(nn.Module):
    """Modulated self-attention, cross-attention, modulated FFN; gated residuals in float32."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        dim = cfg.inner_dim
        self.norm1 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.attn1 = SelfAttention(dim, cfg.num_attention_heads, cfg.eps)
        self.attn2 = CrossAttention(dim, cfg.num_attention_heads, cfg.eps, cfg.added_kv_proj_dim)
        self.norm2 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, cfg.ffn_dim, dim, approximate="tanh")
        self.norm3 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | CrossKV | LazyKV,
        temb: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """hidden_states x: [B, L, D]; encoder_hidden_states: context [B, T, D] or its cross-attention keys and
        values; temb (the modulation t_mod): [B, 6, D]; rotary_emb: (cos, sin) -> [B, L, D]. Argument names as
        diffusers' blocks have them: its cache hooks find ``hidden_states`` by name."""
        x, t_mod = hidden_states, temb
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table + t_mod.float()).chunk(6, dim=1)
        h = (self.norm1(x.float()) * (1 + scale) + shift).type_as(x)
        x = (x.float() + self.attn1(h, rotary_emb) * gate).type_as(x)
        h = self.norm2(x.float()).type_as(x)
        x = x + self.attn2(h, encoder_hidden_states)  # no gate, no upcast: as the reference
        h = (self.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
        return (x.float() + self.ffn(h).float() * c_gate).type_as(x)


class ConditionEmbedder(nn.Module):
    """Timestep -> (temb [B, D], t_mod [B, 6D]); text [B, 512, text_dim] -> [B, 512, D]; CLIP [B, 257, 1280] -> D."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        dim = cfg.inner_dim
        self.freq_dim = cfg.freq_dim
        self.time_embedder = _TwoLayer(cfg.freq_dim, dim, nn.SiLU())
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = _TwoLayer(cfg.text_dim, dim, nn.GELU(approximate="tanh"))
        self.image_embedder = ImageEmbedder(cfg.image_dim, dim) if cfg.image_dim is not None else None

    def forward(
        self, timestep: torch.Tensor, text: torch.Tensor, image: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """timestep: [B]; text: [B, 512, text_dim]; image: [B, N, image_dim] | None."""
        temb, t_mod = self.embed_time(timestep, text.dtype)
        text = self.text_embedder(text)  # [B, 512, D]
        if image is not None and self.image_embedder is not None:
            image = self.image_embedder(image)  # [B, N, D]
        return temb, t_mod, text, image

    def embed_time(self, timestep: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """timestep: [B] -> temb [B, D] and t_mod [B, 6D] in ``dtype`` (the sinusoid and time MLP input in fp32)."""
        freqs = sinusoidal_embedding(timestep, self.freq_dim)  # [B, freq_dim] fp32
        temb = self.time_embedder(freqs.to(self.time_embedder.linear_1.weight.dtype)).to(dtype)  # [B, D]
        return temb, self.time_proj(F.silu(temb))

    def embed_context(self, text: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        """text: [B, 512, text_dim], image: [B, N, image_dim] | None -> context [B, N + 512, D] (image first)."""
        context = self.text_embedder(text)  # [B, 512, D]
        if image is not None and self.image_embedder is not None:
            context = torch.cat([self.image_embedder(image), context], dim=1)  # [B, N + 512, D]
        return context

    def context_modules(self) -> list[nn.Module]:
        """The layers that make the context."""
        return [m for m in (self.text_embedder, self.image_embedder) if m is not None]


class _TwoLayer(nn.Module):
    """Linear -> activation -> Linear with keys ``linear_1`` / ``linear_2``."""

    def __init__(self, dim_in: int, dim: int, act: nn.Module) -> None:
        super().__init__()
        self.linear_1, self.act, self.linear_2 = nn.Linear(dim_in, dim), act, nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ImageEmbedder(nn.Module):
    """CLIP tokens [B, N, image_dim] -> LayerNorm -> Linear -> GELU -> Linear -> LayerNorm -> [B, N, D]."""

    def __init__(self, image_dim: int, dim: int) -> None:
        super().__init__()
        self.norm1 = FP32LayerNorm(image_dim, eps=1e-5)
        self.ff = FeedForward(image_dim, image_dim, dim, approximate="none")
        self.norm2 = FP32LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.ff(self.norm1(x)))


@dataclass
class TransformerOutput:
    sample: torch.Tensor

    def __getitem__(self, index: int) -> torch.Tensor:
        return (self.sample,)[index]


class ChronoEditTransformer3DModel(nn.Module, CacheHooks):
    """The ChronoEdit DiT. ``forward`` takes the same arguments as diffusers' model of the same name.

    Step caches: diffusers' cache configs through ``enable_cache`` / ``disable_cache`` / ``cache_context`` (see
    :mod:`.cache_hooks`). Pure model code: no ``from_pretrained`` here. ``chronoedit.ChronoEditTransformer3DModel``
    (defined in :mod:`chronoedit.loading`) is this class with diffusers' ``from_pretrained``; checkpoints load as
    that class."""

    def __init__(self, config: TransformerConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.config = config if config is not None else TransformerConfig(**kwargs)
        cfg = self.config
        dim = cfg.inner_dim
        self.rope = RotaryEmbedding(cfg.attention_head_dim, cfg.rope_max_seq_len, cfg.rope_temporal_skip_len)
        self.patch_embedding = nn.Conv3d(cfg.in_channels, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.condition_embedder = ConditionEmbedder(cfg)
        self.blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.gradient_checkpointing = False
        self.sequence_split: SequenceSplit | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.proj_out.weight.device

    def enable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    def set_attention_backend(self, backend: str | None) -> None:
        """Route every attention through diffusers' attention dispatcher with ``backend`` (an
        ``AttentionBackendName`` value, e.g. ``"flash"``, ``"sage"``; ``"native"`` or None: PyTorch's SDPA called
        directly, the default). As diffusers' ``ModelMixin.set_attention_backend``; the backend's package and
        device are the caller's to check (``chronoedit.speed.attention.check_attention``)."""
        if backend is not None and backend != "native":
            from diffusers.models.attention_dispatch import AttentionBackendName

            backend = AttentionBackendName(backend).value  # a ValueError for an unknown name
        else:
            backend = None
        for module in self.modules():
            if isinstance(module, Attention):
                module.attention_backend = backend

    def enable_parallelism(self, split: SequenceSplit) -> None:
        """Split the token sequence over ranks as ``split`` says (context parallelism; see
        :mod:`chronoedit.parallel`). Each rank gets the whole output."""
        self.sequence_split = split
        for module in self.modules():
            if isinstance(module, SelfAttention):
                module.sequence_split = split

    def disable_parallelism(self) -> None:
        """Back to one device."""
        self.sequence_split = None
        for module in self.modules():
            if isinstance(module, SelfAttention):
                module.sequence_split = None

    def reset_attention_backend(self) -> None:
        """Back to PyTorch's SDPA called directly."""
        self.set_attention_backend(None)

    def cast_to(self, dtype: torch.dtype) -> ChronoEditTransformer3DModel:
        """Cast to ``dtype`` keeping the float32 islands (time embedder, scale-shift tables, affine norms) in fp32."""
        for name, param in self.named_parameters():
            param.data = param.data.to(torch.float32 if keeps_fp32(name) else dtype)
        return self

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        context_cache: ContextCache | None = None,
    ) -> TransformerOutput | tuple[torch.Tensor]:
        """hidden_states: [B, C_in, F, H, W]; timestep: [B]; encoder_hidden_states: [B, 512, text_dim];
        encoder_hidden_states_image: [B, N, image_dim] -> sample [B, C_out, F, H, W].

        ``attention_kwargs`` is accepted for diffusers compatibility and unused: LoRA scales live on the adapters.
        ``context_cache``: keep the cross-attention keys and values of these embeddings there and reuse them on the
        next call with the same embedding tensors (see :mod:`.context_cache`; not while autograd records)."""
        self.check_context(encoder_hidden_states, encoder_hidden_states_image)
        batch, _, frames, height, width = hidden_states.shape
        pt, ph, pw = self.config.patch_size
        grid = (frames // pt, height // ph, width // pw)
        rope = self.rope(grid, hidden_states.device)  # cos, sin: [1, L, 1, hd/2] fp32

        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2)  # [B, L, D]
        length = x.shape[1]
        if self.sequence_split is not None:
            x, rope = self.sequence_split.split(x, rope)  # [B, L_rank, D]: this rank's tokens
        temb, t_mod = self.condition_embedder.embed_time(timestep, encoder_hidden_states.dtype)
        t_mod = t_mod.unflatten(1, (6, -1))  # [B, 6, D]
        contexts = self.block_contexts(encoder_hidden_states, encoder_hidden_states_image, context_cache)

        for block, context in zip(self.blocks, contexts, strict=True):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, context, t_mod, rope, use_reentrant=False)
            else:
                x = block(x, context, t_mod, rope)

        shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)  # each [B, 1, D] fp32
        x = (self.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = self.proj_out(x)  # [B, L, C_out * pt * ph * pw]
        if self.sequence_split is not None:
            x = self.sequence_split.join(x, length)  # [B, L_rank, ..] -> [B, L, ..]
        out = self.unpatchify(x, batch, grid)
        return TransformerOutput(sample=out) if return_dict else (out,)

    def block_contexts(
        self, text: torch.Tensor, image: torch.Tensor | None, cache: ContextCache | None
    ) -> list[torch.Tensor] | list[LazyKV]:
        """What each block's cross-attention attends to: the context [B, T, D] (the same for all blocks), or with
        a cache its per-block keys and values, projected once for these embeddings and these weights (each inside
        its block's first forward, so block streaming finds the block's weights in place)."""
        if cache is None or torch.is_grad_enabled():
            return [self.condition_embedder.embed_context(text, image)] * len(self.blocks)
        cache.check_weights(self.context_fingerprint())
        kvs = cache.lookup(text, image)
        if kvs is None:
            kvs = ContextKV(self.condition_embedder.embed_context(text, image), [None] * len(self.blocks))  # [B,T,D]
            cache.store(text, image, kvs)
        return [kvs.block(index) for index in range(len(self.blocks))]

    def context_fingerprint(self) -> tuple[Any, ...]:
        """Changes whenever the weights that make the cross-attention keys and values may have changed."""
        modules = self.condition_embedder.context_modules()
        for block in self.blocks:
            modules.extend(block.attn2.kv_modules())
        return weights_fingerprint(modules)

    def check_context(self, text: torch.Tensor, image: torch.Tensor | None) -> None:
        """The cross-attention splits image from text tokens by position: the text must be exactly 512 tokens."""
        if self.config.added_kv_proj_dim is None:
            return
        if text.shape[1] != TEXT_TOKENS:
            raise ValueError(f"encoder_hidden_states must have {TEXT_TOKENS} tokens (zero-padded), got {text.shape[1]}")
        if image is None:
            raise ValueError("this model attends to CLIP image tokens: pass encoder_hidden_states_image")

    def unpatchify(self, x: torch.Tensor, batch: int, grid: tuple[int, int, int]) -> torch.Tensor:
        """x: [B, L, C * pt * ph * pw] -> [B, C, F * pt, H * ph, W * pw]."""
        pt, ph, pw = self.config.patch_size
        x = x.reshape(batch, *grid, pt, ph, pw, -1)  # [B, F, H, W, pt, ph, pw, C]
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, F, pt, H, ph, W, pw]
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
