"""One model evaluation per denoising step, with classifier-free guidance, done the fast way that gives the same
numbers:

- **CFG in one batch**: the conditional and unconditional branches run as one forward of twice the batch
  (``cfg_batch``, the default), equal to two passes up to float rounding (fp32: ~1e-7);
- **cross-attention keys and values once**: the text and CLIP tokens' keys and values are projected on the first
  step and reused (a :class:`~chronoedit.model.context_cache.ContextCache` per edit; exact);
- **branches on separate ranks** (``branches``, context parallelism with ``cfg = 2``): each half of the ranks runs
  one branch and the two flows are exchanged (:class:`chronoedit.parallel.ContextParallel`);
- **step caches per branch**: with a diffusers cache hooked on the transformer each branch runs in its own cache
  context (``"cond"``, ``"uncond"``), so each keeps its own state and skip decisions; the branches then run as two
  passes (batched, one decision would serve both). :meth:`FlowPredictor.reset` forgets the states.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..model import ChronoEditTransformer3DModel
from ..model.context_cache import ContextCache


@dataclass
class Conditioning:
    """Everything the transformer is conditioned on, for the positive and (with CFG) the negative branch: text
    embeddings [B, 512, text_dim] each, CLIP image tokens [B, 257, image_dim]."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    image_embeds: torch.Tensor
    _batched: tuple[tuple[Any, ...], torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def batched(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(text [2B, ...], image [2B, ...]): positive rows then negative rows; built once while the three tensors
        stay the same objects, so the keys and values cached for it stay valid."""
        parts = (self.prompt_embeds, self.negative_prompt_embeds, self.image_embeds)
        key = tuple((t, t._version) for t in parts)
        if self._batched is None or not _same(self._batched[0], key):
            text = torch.cat([self.prompt_embeds, self.negative_prompt_embeds])
            image = torch.cat([self.image_embeds, self.image_embeds])
            self._batched = (key, text, image)
        return self._batched[1], self._batched[2]


@dataclass
class FlowPredictor:
    """The flow [B, 16, F, h, w] of one step for ``transformer`` (ours, or any model with diffusers' forward and,
    for step caches, its ``cache_context``)."""

    transformer: Any
    guidance_scale: float
    cfg_batch: bool = True
    reuse_context: bool = True
    attention_kwargs: dict[str, Any] | None = None
    context_cache: ContextCache | None = None
    branches: Any = None  # a chronoedit.parallel.ContextParallel: with splits_cfg, this rank runs one branch
    calls: int = 0  # transformer forwards so far

    def __post_init__(self) -> None:
        if self.reuse_context and isinstance(self.transformer, ChronoEditTransformer3DModel):
            self.context_cache = ContextCache()

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def step_cache(self) -> bool:
        return bool(getattr(self.transformer, "is_cache_enabled", False))

    def reset(self) -> None:
        """Forget the step caches' states (before an edit, and when the reasoning frames drop: fewer tokens)."""
        if self.step_cache:
            self.transformer._reset_stateful_cache()

    def __call__(self, model_input: torch.Tensor, t: torch.Tensor, step: int, cond: Conditioning) -> torch.Tensor:
        """model_input: [B, 36, F, h, w] in the transformer's dtype; t: the step's timestep -> flow (guided)."""
        if not self.do_cfg:
            return self.forward(model_input, t, cond.prompt_embeds, cond.image_embeds, "cond", step)
        if self.branches is not None and self.branches.splits_cfg:
            mine = self.branches.branch  # 0: conditional, 1: unconditional
            text = cond.negative_prompt_embeds if mine else cond.prompt_embeds
            flow = self.forward(model_input, t, text, cond.image_embeds, ("cond", "uncond")[mine], step)
            positive, negative = self.branches.exchange(flow)
            return negative + self.guidance_scale * (positive - negative)
        if self.cfg_batch and not self.step_cache:
            text, image = cond.batched()
            both = self.forward(torch.cat([model_input, model_input]), t, text, image, None, step)  # [2B, ...]
            positive, negative = both.chunk(2)
        else:
            positive = self.forward(model_input, t, cond.prompt_embeds, cond.image_embeds, "cond", step)
            negative = self.forward(model_input, t, cond.negative_prompt_embeds, cond.image_embeds, "uncond", step)
        return negative + self.guidance_scale * (positive - negative)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, image: torch.Tensor, branch: str | None, step: int
    ) -> torch.Tensor:
        """One transformer call on x [N, 36, F, h, w], in the cache context ``branch`` when a step cache is on."""
        kwargs: dict[str, Any] = {"return_dict": False, "attention_kwargs": self.attention_kwargs}
        if self.context_cache is not None:
            kwargs["context_cache"] = self.context_cache
        self.calls += 1
        if not self.step_cache:
            return self.transformer(x, t.expand(x.shape[0]), text, image, **kwargs)[0]
        with self.transformer.cache_context(branch or "cond", step_index=step, timestep=t):
            return self.transformer(x, t.expand(x.shape[0]), text, image, **kwargs)[0]


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """The same tensors (identity), each at the same version."""
    return all(x is y and vx == vy for (x, vx), (y, vy) in zip(a, b, strict=True))
