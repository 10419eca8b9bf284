"""Tiny random ChronoEdit checkpoints in the real on-disk diffusers layout.

The real checkpoint (``nvidia/ChronoEdit-14B-Diffusers``) is a diffusers folder: ``model_index.json`` plus the
subfolders ``transformer/`` (sharded safetensors + index, ``config.json`` naming ``WanTransformer3DModel`` and *no*
``rope_temporal_skip_len``), ``vae/``, ``text_encoder/`` (UMT5 encoder), ``tokenizer/`` (T5 fast tokenizer),
``image_encoder/`` (CLIP vision tower), ``image_processor/`` and ``scheduler/``. :func:`build_tiny_checkpoint`
writes the same layout with tiny, seeded, random weights so that loaders, pipelines and parity tests can run offline
in seconds. Parameters that would initialise to constants (norm weights, zero biases) are perturbed, so a parity test
notices a skipped norm or bias.

Nothing here touches the network; heavy libraries are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .files import write_json

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = [
    "DEMO_SPEC",
    "MODEL_INDEX",
    "TinySpec",
    "build_tiny_checkpoint",
    "default_demo_dir",
    "draw_example_image",
    "ensure_demo_checkpoint",
    "tiny_transformer_state_dict",
    "transformer_config",
]

DIFFUSERS_VERSION = "0.35.0"
MODEL_INDEX: dict[str, Any] = {
    "_class_name": "WanImageToVideoPipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    "image_encoder": ["transformers", "CLIPVisionModel"],
    "image_processor": ["transformers", "CLIPImageProcessor"],
    "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "WanTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TOKENIZER_VOCAB_SIZE = 700
TOKENIZER_SEED = 1234
SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
_CORPUS_WORDS = (
    "the a an user wants to turn make change add remove replace keep same into onto on in of with and while "
    "is are it its this that image photo picture scene object cup mug ball table chair wall floor window light "
    "shadow sky tree flower cat dog person hand face hair red blue green yellow white black orange purple brown "
    "wooden glass metal small large round bright dark soft warm cold camera view left right top bottom front "
    "back behind near over under moves slowly rolls falls stands sits holds pours water coffee tea paper book "
    "sketch pencil style color texture background foreground detail clarity identity pose layout shot motion "
    "natural realistic painting drawing smooth sharp"
)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny checkpoint. The structural switches (in 36 / out 16, image K/V, qk-norm) are always the 14B's."""

    num_layers: int = 2
    num_attention_heads: int = 2
    attention_head_dim: int = 128  # 128 = the real RoPE split 44/42/42
    ffn_dim: int = 64
    text_dim: int = 32  # UMT5 d_model
    image_dim: int = 32  # CLIP vision hidden size
    clip_layers: int = 3  # >= 3 so hidden_states[-2] is neither the first nor the last
    vae_base_dim: int = 8
    seed: int = 0
    shards: int = 1  # > 1: sharded transformer safetensors + index json, like the real 14 shards


DEMO_SPEC = TinySpec(shards=2)  # sharded with an index, like the real 14-shard transformer


# ----------------------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers/diffusers warnings and progress bars while building; restore them afterwards."""
    from diffusers.utils import logging as d_logging
    from transformers.utils import logging as t_logging

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (t_logging, d_logging)]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, verbosity, bars in saved:
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()


def _perturb_(model: torch.nn.Module, seed: int) -> None:
    """Add small seeded noise to every parameter; norm scales become ``1 + 0.1·randn`` (nothing stays constant)."""
    import torch

    norm_scales = set()
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            for name in ("weight", "gamma"):
                param = getattr(module, name, None)
                if isinstance(param, torch.nn.Parameter):
                    norm_scales.add(id(param))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype)
            if id(param) in norm_scales:
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.add_(0.02 * noise)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, data)


# ------------------------------------------------------------------------------------------------------- transformer
def transformer_config(spec: TinySpec) -> dict[str, Any]:
    """``transformer/config.json`` as in the real checkpoint: Wan I2V keys, no ``rope_temporal_skip_len``."""
    dim = spec.num_attention_heads * spec.attention_head_dim
    return {
        "_class_name": "WanTransformer3DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "patch_size": [1, 2, 2],
        "num_attention_heads": spec.num_attention_heads,
        "attention_head_dim": spec.attention_head_dim,
        "in_channels": 36,
        "out_channels": 16,
        "text_dim": spec.text_dim,
        "freq_dim": 256,
        "ffn_dim": spec.ffn_dim,
        "num_layers": spec.num_layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "image_dim": spec.image_dim,
        "added_kv_proj_dim": dim,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": None,
    }


def tiny_transformer_state_dict(spec: TinySpec) -> dict[str, torch.Tensor]:
    """Seeded, perturbed fp32 weights of the tiny transformer (diffusers key names), as written by the builder."""
    import torch

    from .model import ChronoEditTransformer3DModel, TransformerConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = ChronoEditTransformer3DModel(TransformerConfig.from_dict(transformer_config(spec)))
    _perturb_(model, spec.seed + 1000)
    return {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}


def _split_by_size(sizes: list[tuple[str, int]], shards: int) -> list[list[str]]:
    """Split ordered keys into ``shards`` non-empty groups by cumulative byte size."""
    if not 1 <= shards <= len(sizes):
        raise ValueError(f"shards must be in [1, {len(sizes)}], got {shards}")
    total = sum(size for _, size in sizes)
    groups: list[list[str]] = [[]]
    done = 0
    for i, (key, size) in enumerate(sizes):
        still_to_open = shards - len(groups)
        if groups[-1] and still_to_open > 0:
            reached = done >= total * len(groups) / shards
            if reached or len(sizes) - i <= still_to_open:
                groups.append([])
        groups[-1].append(key)
        done += size
    return groups


def _save_transformer(spec: TinySpec, folder: Path) -> None:
    from .saving import write_shards

    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "config.json", transformer_config(spec))
    state = tiny_transformer_state_dict(spec)
    keys = sorted(state)
    write_shards(state, _split_by_size([(k, state[k].numel() * state[k].element_size()) for k in keys], spec.shards),
                 folder)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- other modules
def _save_vae(spec: TinySpec, folder: Path) -> None:
    import torch
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed + 1)
        mean = [round(x, 4) for x in ((torch.rand(16, dtype=torch.float64) - 0.5) * 0.9).tolist()]
        std = [round(x, 4) for x in (0.8 + 2.2 * torch.rand(16, dtype=torch.float64)).tolist()]
        vae = AutoencoderKLWan(
            base_dim=spec.vae_base_dim,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=mean,
            latents_std=std,
        )
    _perturb_(vae, spec.seed + 1001)
    vae.save_pretrained(folder, safe_serialization=True)


def _corpus(seed: int, lines: int = 3000) -> list[str]:
    """Generated English-like sentences (common editing words plus syllable words) to train the tokenizer on."""
    words = _CORPUS_WORDS.split()
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ex", "in", "or", "an", "st", "pr", "gh", "qu", "zy"]
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        tokens = []
        for _ in range(rng.randint(4, 16)):
            if rng.random() < 0.75:
                tokens.append(rng.choice(words))
            else:
                tokens.append("".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))))
        if rng.random() < 0.2:
            tokens.append(str(rng.randint(0, 999)))
        out.append(" ".join(tokens).capitalize() + rng.choice([".", ",", "!", "?", ";", ":"]))
    return out


def _save_tokenizer(folder: Path) -> int:
    """Train a seeded sentencepiece Unigram model offline and save it as a T5 fast tokenizer; returns its size."""
    import sentencepiece as spm
    from transformers import AutoTokenizer, T5TokenizerFast

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(TOKENIZER_SEED)),
        model_writer=model,
        model_type="unigram",
        vocab_size=TOKENIZER_VOCAB_SIZE,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        character_coverage=1.0,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # Loading a folder that holds only ``spiece.model`` converts it to a fast tokenizer (transformers 4 and 5).
        (Path(tmp) / "spiece.model").write_bytes(model.getvalue())
        tok = T5TokenizerFast.from_pretrained(tmp, extra_ids=0, local_files_only=True)
        for key in ("is_local", "local_files_only", "name_or_path"):
            tok.init_kwargs.pop(key, None)
        tok.save_pretrained(folder)
    (folder / "spiece.model").write_bytes(model.getvalue())  # the real folder ships the sentencepiece model too
    return len(AutoTokenizer.from_pretrained(folder, local_files_only=True))


def _save_text_encoder(spec: TinySpec, folder: Path, tokenizer_size: int) -> None:
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=math.ceil((tokenizer_size + 1) / 128) * 128,  # like umt5-xxl: a little larger than the tokenizer
        d_model=spec.text_dim,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dense_act_fn="gelu_new",
        pad_token_id=0,
        eos_token_id=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed + 2)
        model = UMT5EncoderModel(config)
    _perturb_(model, spec.seed + 1002)
    model.save_pretrained(folder, safe_serialization=True)


def _save_image_encoder(spec: TinySpec, folder: Path) -> None:
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=spec.image_dim,
        intermediate_size=64,
        num_hidden_layers=spec.clip_layers,
        num_attention_heads=4,
        image_size=224,
        patch_size=14,
        projection_dim=spec.image_dim,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed + 3)
        model = CLIPVisionModel(config)
    _perturb_(model, spec.seed + 1003)
    model.save_pretrained(folder, safe_serialization=True)


def _save_image_processor(folder: Path) -> None:
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": 224},
        resample=3,  # bicubic
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    processor.save_pretrained(folder)


def _save_scheduler(folder: Path) -> None:
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=5.0,
        solver_order=2,
        solver_type="bh2",
        predict_x0=True,
        lower_order_final=True,
        final_sigmas_type="zero",
        timestep_spacing="linspace",
    )
    scheduler.save_config(folder)


# ---------------------------------------------------------------------------------------------------------- public
def build_tiny_checkpoint(root: str | Path, spec: TinySpec = DEMO_SPEC) -> Path:
    """Write a tiny random ChronoEdit checkpoint in the real diffusers folder layout into ``root``; return ``root``.

    Two builds with the same ``spec`` give byte-identical weight files. ``model_index.json`` is written last, so its
    presence marks a complete folder.
    """
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    with _quiet():
        _save_transformer(spec, root / "transformer")
        _save_vae(spec, root / "vae")
        tokenizer_size = _save_tokenizer(root / "tokenizer")
        _save_text_encoder(spec, root / "text_encoder", tokenizer_size)
        _save_image_encoder(spec, root / "image_encoder")
        _save_image_processor(root / "image_processor")
        _save_scheduler(root / "scheduler")
    _write_json(root / "model_index.json", MODEL_INDEX)
    return root


def default_demo_dir() -> Path:
    """Where the demo checkpoint lives: ``$CHRONOEDIT_HOME/demo-v1`` or ``~/.cache/chronoedit/demo-v1``."""
    from .files import chronoedit_home

    return chronoedit_home() / "demo-v1"


def ensure_demo_checkpoint(path: Path | None = None) -> Path:
    """Return a complete demo checkpoint folder, building it once (atomically) if it is missing.

    The folder is built in a temporary directory beside ``path`` and renamed into place, so an interrupted build never
    leaves a half-written checkpoint, and concurrent callers end up sharing one folder.
    """
    target = Path(path).expanduser() if path is not None else default_demo_dir()
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build_tiny_checkpoint(tmp, DEMO_SPEC)
        tmp.chmod(0o755)
        os.replace(tmp, target)  # also replaces an empty leftover directory
    except OSError:
        if (target / "model_index.json").is_file():  # another process finished first
            return target
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def draw_example_image() -> Image.Image:
    """The shipped example picture (384x256): a cup and a red ball on a wooden table, with simple shading."""
    from PIL import Image, ImageDraw, ImageFilter

    width, height, horizon = 384, 256, 150
    img = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(img)
    for y in range(horizon):  # wall: warm vertical gradient
        t = y / horizon
        draw.line([(0, y), (width, y)], fill=(int(232 - 40 * t), int(220 - 38 * t), int(196 - 36 * t)))
    for y in range(horizon, height):  # table top: wood, darker towards the front edge
        t = (y - horizon) / (height - horizon)
        draw.line([(0, y), (width, y)], fill=(int(166 - 50 * t), int(112 - 38 * t), int(66 - 26 * t)))
    for x in range(-200, width, 23):  # wood grain receding to a vanishing point
        draw.line([(width // 2 + (x - width // 2) // 4, horizon), (x, height)], fill=(120, 78, 44), width=1)
    draw.rectangle([0, horizon - 3, width, horizon], fill=(98, 62, 34))

    shadows = Image.new("L", (width, height), 0)  # soft contact shadows
    sdraw = ImageDraw.Draw(shadows)
    sdraw.ellipse([92, 196, 196, 222], fill=150)
    sdraw.ellipse([232, 200, 316, 220], fill=160)
    shadows = shadows.filter(ImageFilter.GaussianBlur(6))
    img = Image.composite(Image.new("RGB", img.size, (60, 36, 20)), img, shadows)
    draw = ImageDraw.Draw(img)

    for x in range(110, 181):  # cup body: white ceramic, shaded left-to-right
        t = abs(x - 132) / 60
        shade = int(246 - 70 * t)
        draw.line([(x, 122), (x, 204)], fill=(shade, shade, min(255, shade + 6)))
    draw.chord([110, 194, 180, 214], start=0, end=180, fill=(214, 214, 220))  # rounded base
    draw.rectangle([110, 150, 180, 162], fill=(52, 92, 170))  # blue band
    draw.arc([170, 140, 206, 184], start=-90, end=90, fill=(205, 205, 210), width=7)  # handle
    draw.ellipse([110, 114, 180, 130], fill=(230, 230, 236), outline=(150, 150, 156))
    draw.ellipse([116, 117, 174, 128], fill=(92, 56, 30))  # coffee

    cx, cy, radius = 272, 176, 34  # ball: concentric circles towards an offset highlight
    for i in range(radius, 0, -1):
        t = i / radius
        ox, oy = int((1 - t) * -12), int((1 - t) * -12)
        color = (int(250 - 120 * t), int(110 - 90 * t * t), int(90 - 70 * t * t))
        draw.ellipse([cx + ox - i, cy + oy - i, cx + ox + i, cy + oy + i], fill=color)
    draw.rectangle([300, 30, 370, 110], fill=(170, 200, 226), outline=(110, 84, 60), width=5)  # window
    draw.line([(335, 30), (335, 110)], fill=(110, 84, 60), width=4)
    return img
