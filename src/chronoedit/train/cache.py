"""Precompute once what the frozen encoders give (UMT5 text, CLIP image tokens, VAE latents) and keep it on disk.

Each encoder is loaded, used for every sample that lacks its output, and released before the next one loads; the
transformer loads only after all three are gone, so the big encoders never share memory with training. Each stage's
output is a file named by a hash of that stage's own inputs, so a change redoes only the stages it touches:

- ``text/KEY.safetensors`` prompt_embeds [L, text_dim] (the real tokens; zero-padded to 512 on read): the prompt, the
  text encoder and its dtype (rewording a prompt re-runs UMT5 for that prompt only);
- ``image/KEY.safetensors`` image_embeds [257, image_dim]: CLIP of the source image (a video's first frame) sized
  for training, from its file's content, the size rule and the image encoder;
- ``latents/KEY.safetensors`` latents [16, F_lat, h, w] (a pair: the clip [source, target x 4], 2 latent frames; a
  reasoning video: its first 25 frames' 7 latent frames, then the clip's last one, 8 in all) and condition
  [16, F_lat, h, w] (the source followed by black frames, 5 or 29 frames, as the pipeline builds it), both
  normalised VAE posterior means: from every file's content, the size rule and the VAE.

The size rule is height and width when given (max_area then plays no part), else max_area. An encoder is known by its
config files' contents and its other files' names and content hashes (remembered per machine, see
:mod:`chronoedit.train.digests`): weights replaced by others of the same size, e.g. a fine-tuned VAE, are told apart,
while copies on other nodes match. Files are written atomically: an interrupted run keeps what it finished, and a run
over a complete cache loads no encoder.
"""

from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..encoders import TEXT_TOKENS, encode_image, encode_text
from ..errors import UserError
from ..files import os_reason as reason
from ..files import writing
from ..latents import encode_condition, encode_video, image_to_tensor
from .data import SampleSpec, clips, prepared_frames
from .digests import file_digest, remembered_digests

CACHE_VERSION = 4  # 4: reasoning videos encoded as NVIDIA's training does (trajectory + edit latent)
STAGES = ("text", "image", "latents")
ENCODERS = {  # the checkpoint components behind each stage
    "text": ("tokenizer", "text_encoder"),
    "image": ("image_processor", "image_encoder"),
    "latents": ("vae",),
}
NEGATIVE_PROMPT = ""  # validation's CFG negative, encoded once


@dataclass(frozen=True)
class CacheEntry:
    """One sample and its three cached files (shared with every sample that has the same stage inputs)."""

    spec: SampleSpec
    text: Path
    image: Path
    latents: Path

    def file(self, stage: str) -> Path:
        return {"text": self.text, "image": self.image, "latents": self.latents}[stage]

    def complete(self) -> bool:
        return all(self.file(stage).is_file() for stage in STAGES)


@dataclass(frozen=True)
class CacheSettings:
    """What decides a cached sample's content besides its files and prompt."""

    model_path: str
    height: int | None
    width: int | None
    max_area: int
    text_dtype: str  # the text encoder's dtype name ("float32", "bfloat16")
    show_progress: bool = False  # a bar per stage (samples encoded / to encode); not part of any key
    buckets: bool = False  # sizes from the aspect-ratio buckets at max_area

    @property
    def size_rule(self) -> dict[str, int]:
        """What sizes a sample: height and width when given, else max_area."""
        if self.height is not None and self.width is not None:
            return {"height": self.height, "width": self.width}
        return {"max_area": self.max_area, "buckets": True} if self.buckets else {"max_area": self.max_area}


# ------------------------------------------------------------------------------------------------------ identity
def encoder_identity(model_path: str, components: tuple[str, ...], digest: Callable[[Path], str]) -> str:
    """A hash of some components of a checkpoint folder: their config files' contents, and each other file's name
    and content ``digest`` (remembered across runs, see :mod:`chronoedit.train.digests`): other weights of the same
    size are told apart, and every copy of the same files, on any node, gives the same identity."""
    from ..loading import resolve_checkpoint

    root = resolve_checkpoint(model_path)
    hasher = hashlib.sha256()
    for component in components:
        folder = root / component
        for file in sorted(folder.rglob("*")) if folder.is_dir() else []:
            if file.is_file():
                hasher.update(f"{file.relative_to(root)}:".encode())
                hasher.update(file.read_bytes() if file.suffix == ".json" else digest(file).encode())
    return hasher.hexdigest()


def _stage_file(cache_dir: Path, stage: str, payload: dict[str, Any]) -> Path:
    """``cache_dir/STAGE/KEY.safetensors``, KEY a hash of the stage's inputs."""
    text = json.dumps({"version": CACHE_VERSION, "stage": stage, **payload}, sort_keys=True)
    return cache_dir / stage / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.safetensors"


def _text_file(cache_dir: Path, prompt: str, settings: CacheSettings, encoder: str) -> Path:
    return _stage_file(cache_dir, "text", {"prompt": prompt, "encoder": encoder, "dtype": settings.text_dtype})


def encoder_identities(model_path: str, log: Callable[[str], None] = lambda _: None) -> dict[str, str]:
    """Each stage's encoder identity (weights hashed once per machine, then remembered)."""
    with remembered_digests(log) as digest:
        return {stage: encoder_identity(model_path, names, digest) for stage, names in ENCODERS.items()}


def cache_entries(specs: list[SampleSpec], cache_dir: Path, settings: CacheSettings,
                  encoders: dict[str, str]) -> list[CacheEntry]:  # fmt: skip
    """Each sample's entry: its three files, named by the inputs of each stage (``encoders``: their identities)."""
    entries = []
    for spec in specs:
        files = [_digest(spec, p) for p in (spec.source, spec.target, spec.video) if p is not None]
        kind = "video" if spec.video is not None else "pair"
        image = {"file": files[0], "size": settings.size_rule, "encoder": encoders["image"]}  # source or video
        latents = {"files": files, "kind": kind, "size": settings.size_rule, "encoder": encoders["latents"]}
        text = _text_file(cache_dir, spec.prompt, settings, encoders["text"])
        entries.append(CacheEntry(spec, text, _stage_file(cache_dir, "image", image),
                                  _stage_file(cache_dir, "latents", latents)))  # fmt: skip
    return entries


def _digest(spec: SampleSpec, path: Path) -> str:
    """A dataset file's content hash; UserError naming the row when it cannot be read."""
    try:
        return file_digest(path)
    except OSError as err:
        raise UserError(f"{spec.where}: cannot read {path}: {reason(err, path)}", "dataset") from err


def negative_file(cache_dir: Path, settings: CacheSettings, text_encoder: str | None = None) -> Path:
    """The cached text embedding of the empty prompt (validation's negative); ``text_encoder``: its identity when
    known already."""
    text_encoder = text_encoder or encoder_identities(settings.model_path)["text"]
    return _text_file(cache_dir, NEGATIVE_PROMPT, settings, text_encoder)


# ------------------------------------------------------------------------------------------------------ building
def build_cache(
    specs: list[SampleSpec], cache_dir: Path, settings: CacheSettings, device: torch.device, log: Callable[[str], None]
) -> list[CacheEntry]:
    """Encode what the cache lacks, one encoder at a time; returns every sample's (complete) entry.

    Each stage is its own function, so its encoder is unreferenced (and freed) before the next one loads."""
    from ..memory import free_device_cache

    encoders = encoder_identities(settings.model_path, log)
    entries = cache_entries(specs, cache_dir, settings, encoders)
    negative = negative_file(cache_dir, settings, encoders["text"])
    for stage in (_text_stage, _image_stage, _latent_stage):
        stage(entries, negative, settings, device, log)
        gc.collect()
        free_device_cache(device)
    return entries


def _missing(entries: list[CacheEntry], stage: str) -> list[CacheEntry]:
    """One entry per ``stage`` file that is not on disk yet (samples with the same inputs share a file)."""
    todo: dict[Path, CacheEntry] = {}
    for entry in entries:
        if entry.file(stage) not in todo and not entry.file(stage).is_file():
            todo[entry.file(stage)] = entry
    return list(todo.values())


def _text_stage(entries: list[CacheEntry], negative: Path, settings: CacheSettings, device: torch.device,
                log: Callable[[str], None]) -> None:  # fmt: skip
    """UMT5 prompt embeddings (real tokens only) of every prompt lacking them, and the empty prompt's once."""
    todo = _missing(entries, "text")
    if not todo and negative.is_file():
        return
    with _loaded(settings, ENCODERS["text"], device, log) as (tokenizer, text_encoder):
        for entry in _bar(todo, "caching prompts", settings):
            embeds = _real_tokens(encode_text(tokenizer, text_encoder, [entry.spec.prompt])[0])
            _save(entry.file("text"), {"prompt_embeds": embeds})
        if not negative.is_file():
            _save(negative, {"prompt_embeds": _real_tokens(encode_text(tokenizer, text_encoder, [NEGATIVE_PROMPT])[0])})


def _image_stage(entries: list[CacheEntry], negative: Path, settings: CacheSettings, device: torch.device,
                 log: Callable[[str], None]) -> None:  # fmt: skip
    """CLIP tokens of the (sized) source image of every sample lacking them."""
    todo = _missing(entries, "image")
    if not todo:
        return
    with _loaded(settings, ENCODERS["image"], device, log) as (processor, image_encoder):
        for entry in _bar(todo, "caching CLIP tokens", settings):
            source = _frames(entry, settings)[0]
            _save(entry.file("image"), {"image_embeds": encode_image(processor, image_encoder, [source])[0]})


def _latent_stage(entries: list[CacheEntry], negative: Path, settings: CacheSettings, device: torch.device,
                  log: Callable[[str], None]) -> None:  # fmt: skip
    """VAE latents of the training clip and of the condition, for every sample lacking them."""
    todo = _missing(entries, "latents")
    if not todo:
        return
    with _loaded(settings, ENCODERS["latents"], device, log) as (vae,):
        for entry in _bar(todo, "caching latents", settings):
            _save(entry.file("latents"), _encode_latents(vae, _frames(entry, settings)))


def _bar(todo: list[CacheEntry], desc: str, settings: CacheSettings) -> Any:
    from tqdm.auto import tqdm

    return tqdm(todo, desc=desc, unit="sample", disable=not settings.show_progress, dynamic_ncols=True)


def _frames(entry: CacheEntry, settings: CacheSettings) -> list[Any]:
    return prepared_frames(entry.spec, settings.height, settings.width, settings.max_area, settings.buckets)


@torch.no_grad()
def _encode_latents(vae: torch.nn.Module, frames: list[Any]) -> dict[str, torch.Tensor]:
    """latents and the first-frame condition, each [16, F_lat, h, w] float32: a pair's clip (2 latent frames), or a
    reasoning video's trajectory latents followed by its edit latent (7 + 1 = 8), as NVIDIA's training builds them
    (``cat(VAE(frames[:25]), VAE([src, tgt x 4])[:, :, 1:])``); the condition spans the same pixel frames (5 or 29)."""
    width, height = frames[0].size
    parts = []
    for clip in clips(frames):
        video = torch.stack([image_to_tensor(f, width, height)[0] for f in clip], dim=1)[None]  # [1, 3, F, H, W]
        parts.append(encode_video(vae, video)[0])  # [16, (F - 1) // 4 + 1, h, w]
    latents = torch.cat([parts[0], *[part[:, 1:] for part in parts[1:]]], dim=1)  # [16, 2 or 8, h, w]
    pixel_frames = 4 * (latents.shape[1] - 1) + 1  # 5 or 29
    condition = encode_condition(vae, image_to_tensor(frames[0], width, height), pixel_frames)[0]
    return {"latents": latents, "condition": condition}


def _real_tokens(embeds: torch.Tensor) -> torch.Tensor:
    """[512, D] zero-padded -> [L, D], the real tokens only (at least one row)."""
    nonzero = embeds.abs().sum(dim=-1).nonzero()
    length = int(nonzero.max()) + 1 if len(nonzero) else 1
    return embeds[:length]


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    from ..files import atomic_path

    tensors = {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}
    with writing(path, "write the cache file"):
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))


@contextmanager
def _loaded(
    settings: CacheSettings, names: tuple[str, ...], device: torch.device, log: Callable[[str], None]
) -> Iterator[tuple[Any, ...]]:
    """Load components, put the modules on ``device``, yield them; release them (and the device cache) after."""
    from ..loading import load_component

    log(f"caching: loading {', '.join(names)}")
    dtype = getattr(torch, settings.text_dtype)
    parts = [load_component(settings.model_path, name, dtype) for name in names]
    parts = [p.to(device) if isinstance(p, torch.nn.Module) else p for p in parts]
    try:
        with torch.no_grad():
            yield tuple(parts)
    finally:
        parts.clear()  # the caller's names go when its stage function returns


# ------------------------------------------------------------------------------------------------------- reading
def load_entry(entry: CacheEntry) -> dict[str, torch.Tensor]:
    """A complete entry's tensors: prompt_embeds [512, D] (zero-padded), image_embeds, latents, condition."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for stage in STAGES:
        out.update(load_file(str(entry.file(stage))))
    out["prompt_embeds"] = pad_tokens(out["prompt_embeds"])
    return out


def load_negative(path: Path) -> torch.Tensor:
    """The cached empty-prompt embedding [512, D]."""
    from safetensors.torch import load_file

    return pad_tokens(load_file(str(path))["prompt_embeds"])


def pad_tokens(embeds: torch.Tensor) -> torch.Tensor:
    """[L, D] -> [512, D] with exact zeros after the real tokens, as the pipeline encodes text."""
    padded = embeds.new_zeros(TEXT_TOKENS, embeds.shape[-1])
    padded[: embeds.shape[0]] = embeds
    return padded


def entry_frames(entry: CacheEntry) -> int:
    """Latent frames of a cached sample (2 for a pair, 8 for a reasoning video)."""
    return latent_shape(entry)[1]


def latent_shape(entry: CacheEntry) -> tuple[int, ...]:
    """[16, F_lat, h, w] of a cached sample's latents, from the file's header."""
    from safetensors import safe_open

    with safe_open(str(entry.file("latents")), framework="pt") as handle:
        return tuple(int(n) for n in handle.get_slice("latents").get_shape())
