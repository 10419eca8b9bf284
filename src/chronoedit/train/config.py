"""The training configuration: one dataclass, read from a TOML or JSON file, overridden by command-line flags.

Every field is a flag of ``chronoedit train`` (``lora_rank`` -> ``--lora-rank``); a config file holds the same names
(``lora_rank = 16`` in TOML, ``{"lora_rank": 16}`` in JSON). :func:`check_type` names a value of the wrong type
(a quoted ``"1e-4"``, ``"false"``), :func:`check_config` the first bad value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..files import os_reason as reason

MODES = ("lora", "full")
MIXED_PRECISION = ("no", "bf16", "fp16")
TIMESTEP_SAMPLING = ("uniform_steps", "uniform", "logit_normal")
LOSS_WEIGHTING = ("bell", "uniform")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
# NVIDIA's (DiffSynth's) LoRA targets in original Wan names; ours in :data:`chronoedit.train.lora.SHORT_TARGETS`.
DEFAULT_LORA_TARGETS = ("q", "k", "v", "o", "ffn.0", "ffn.2")
RECORD_ONLY = "base_model"  # written beside the settings in a run's train_config.json, not a setting


@dataclass
class TrainConfig:
    """Everything ``chronoedit train`` needs; the help of each flag is in :data:`HELP`."""

    model_path: str = ""
    dataset: str = ""
    output_dir: str = "outputs/train"
    mode: str = "lora"
    # data
    height: int | None = None
    width: int | None = None
    max_area: int = 720 * 1280
    buckets: bool = True
    cache_dir: str | None = None
    # LoRA
    lora_rank: int = 32
    lora_alpha: float | None = None
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    # optimisation
    learning_rate: float | None = None
    max_steps: int = 1000
    gradient_accumulation_steps: int = 1
    batch_size: int = 1
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.01
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = True
    save_fp32: bool = False
    seed: int = 0
    # flow matching
    flow_shift: float = 5.0
    timestep_sampling: str | None = None
    logit_mean: float = 0.0
    logit_std: float = 1.0
    loss_weighting: str | None = None
    caption_dropout: float | None = None
    loss_on_first_frame: bool = True
    # checkpoints, logs, validation
    checkpoint_every: int = 500
    checkpoints_total_limit: int | None = 3
    resume: str = "auto"
    validation_every: int = 0
    validation_samples: int = 1
    validation_steps: int = 20
    validation_guidance_scale: float = 5.0
    log_every: int = 1
    quiet: bool = False

    @property
    def lr(self) -> float:
        """The learning rate: as given, else 1e-4 for LoRA and 1e-5 for full fine-tuning (NVIDIA's recipes)."""
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-4 if self.mode == "lora" else 1e-5

    @property
    def sampling(self) -> str:
        """How σ is drawn: as given, else ``uniform_steps`` for LoRA (DiffSynth's recipe, NVIDIA's LoRAs) and
        ``logit_normal`` for full fine-tuning (how the base model was trained)."""
        if self.timestep_sampling is not None:
            return self.timestep_sampling
        return "uniform_steps" if self.mode == "lora" else "logit_normal"

    @property
    def weighting(self) -> str:
        """The loss weight over σ: as given, else ``bell`` for LoRA (DiffSynth's) and ``uniform`` for full."""
        if self.loss_weighting is not None:
            return self.loss_weighting
        return "bell" if self.mode == "lora" else "uniform"

    @property
    def dropout(self) -> float:
        """The share of captions replaced by the empty prompt: as given, else 0 for LoRA and 0.2 for full."""
        if self.caption_dropout is not None:
            return float(self.caption_dropout)
        return 0.0 if self.mode == "lora" else 0.2

    @property
    def alpha(self) -> float:
        """LoRA alpha (default: the rank, i.e. scale 1)."""
        return float(self.lora_alpha) if self.lora_alpha is not None else float(self.lora_rank)

    @property
    def output(self) -> Path:
        return Path(self.output_dir)

    @property
    def cache(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else self.output / "cache"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


HELP = {
    "model_path": "ChronoEdit diffusers checkpoint folder (the base model)",
    "dataset": "dataset folder holding metadata.csv, or a CSV file (columns: see 'chronoedit train --help')",
    "output_dir": "where checkpoints, the log, validation images and the result go (default outputs/train)",
    "mode": "lora (default) or full fine-tuning",
    "height": "training height, a multiple of 16 (with --width); default: each sample at --max-area",
    "width": "training width, a multiple of 16 (with --height)",
    "max_area": "pixel area of each sample when no --height/--width, aspect ratio kept; smaller images are not "
    "upscaled (default 720*1280, NVIDIA's training and inference area)",
    "buckets": "size each sample as the aspect-ratio bucket nearest its own (a fixed set at max_area, 1:2 to 2:1, "
    "multiples of 16); batches are drawn from one bucket at a time (default on; off: each its own aspect ratio)",
    "cache_dir": "cache of text/CLIP embeddings and VAE latents (default OUTPUT_DIR/cache)",
    "lora_rank": "LoRA rank (default 32)",
    "lora_alpha": "LoRA alpha (default: the rank, scale 1)",
    "lora_targets": "LoRA target modules: q k v o ffn.0 ffn.2 (default; both attentions), k_img v_img, or our names",
    "learning_rate": "learning rate (default 1e-4 for LoRA, 1e-5 for full)",
    "max_steps": "optimizer steps to train (default 1000)",
    "gradient_accumulation_steps": "micro-batches per optimizer step (default 1)",
    "batch_size": "samples per micro-batch and process (default 1); each batch holds samples of one size and frame "
    "count (a bucket), a bucket's last batch filled up with its own samples",
    "lr_scheduler": "constant, constant_with_warmup, linear or cosine (default constant)",
    "lr_warmup_steps": "warm-up steps (default 0)",
    "adam_beta1": "AdamW beta1 (0.9)",
    "adam_beta2": "AdamW beta2 (0.999)",
    "adam_weight_decay": "AdamW weight decay (0.01)",
    "adam_epsilon": "AdamW epsilon (1e-8)",
    "max_grad_norm": "gradient clipping norm, 0 = off (default 1.0)",
    "mixed_precision": "no, bf16 (default) or fp16; with LoRA the frozen weights are stored in this dtype",
    "gradient_checkpointing": "recompute each block in the backward pass (default on)",
    "save_fp32": "full fine-tuning: save the transformer in float32 rather than the base checkpoint's dtype (bf16 for "
    "NVIDIA's, with its float32 islands as loaded; default off)",
    "seed": "seed of sample order, noise and timesteps (default 0)",
    "flow_shift": "timestep shift: sigma' = s*sigma / (1 + (s-1)*sigma) (default 5.0, as at inference)",
    "timestep_sampling": "uniform_steps (one of the 1000 shifted training timesteps, uniformly: DiffSynth's; default "
    "for LoRA), logit_normal (sigma before the shift; the base model's full training; default for full) or uniform "
    "(continuous sigma before the shift)",
    "logit_mean": "mean of logit_normal sampling (0)",
    "logit_std": "std of logit_normal sampling (1)",
    "loss_weighting": "bell (DiffSynth's: exp(-2((t-500)/1000)^2) over the shifted timesteps, shifted to 0 at sigma=1, "
    "mean 1; default for LoRA) or uniform (default for full, as the base model was trained)",
    "caption_dropout": "share of samples whose caption is replaced by the empty prompt's embedding (image condition "
    "and CLIP tokens kept; default 0.2 for full, as the base model was trained, 0 for LoRA)",
    "loss_on_first_frame": "include latent frame 0 (the input, denoised at inference too) in the loss (default on)",
    "checkpoint_every": "save a resumable checkpoint every N steps (default 500; 0 = only at the end)",
    "checkpoints_total_limit": "keep at most N checkpoints (default 3)",
    "resume": "auto (latest checkpoint in OUTPUT_DIR if any; default), previous (the one before the latest, e.g. when "
    "the latest is damaged; the later ones are then renamed CHECKPOINT.skipped), none (a new run: refused while "
    "OUTPUT_DIR/checkpoints holds checkpoints; train_log.jsonl starts afresh), or a checkpoint folder. A resumed "
    "run keeps the checkpoint's mode, LoRA shape, data, size, batching, seed and optimizer settings; max_steps may "
    "grow",
    "validation_every": "edit the first validation sample(s) every N steps into validation/ (default 0 = off)",
    "validation_samples": "how many dataset samples to edit at validation (default 1)",
    "validation_steps": "denoising steps of validation edits (default 20)",
    "validation_guidance_scale": "guidance scale of validation edits (default 5.0)",
    "log_every": "append to train_log.jsonl every N steps (default 1)",
    "quiet": "no progress bar",
}


def field_types() -> dict[str, str]:
    """Field name -> its annotation as written ('int | None', 'bool', ...)."""
    return {f.name: str(f.type) for f in fields(TrainConfig)}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML (``.toml``) or JSON (``.json``) file -> its table; unknown keys and bad syntax are one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"config {path}: cannot read it ({reason(err, path)})") from err
    except UnicodeDecodeError as err:
        raise UserError(f"config {path}: not UTF-8 text ({err})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"config {path}: invalid JSON ({err})") from None
    elif path.suffix.lower() == ".toml":
        data = _parse_toml(path, text)
    else:
        raise UserError(f"config {path}: use a .toml or .json file")
    if not isinstance(data, dict):
        raise UserError(f"config {path}: expected a table of settings")
    data = data.get("train", data) if isinstance(data.get("train"), dict) else data
    data = {k: v for k, v in data.items() if k != RECORD_ONLY}  # a run's train_config.json works as a config file
    unknown = sorted(set(data) - set(field_types()))
    if unknown:
        raise UserError(f"config {path}: unknown setting(s) {unknown}")
    return data


def _parse_toml(path: Path, text: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise UserError(f"config {path}: TOML needs Python 3.11+ or 'pip install tomli'; or use JSON") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"config {path}: invalid TOML ({err})") from None


def build_config(
    file_values: dict[str, Any], overrides: dict[str, Any], source: str | Path | None = None
) -> TrainConfig:
    """Defaults < config file < flags (``overrides`` holds only the flags given); checked. A bad value that came
    from the config file ``source`` is a UserError naming the file and the key."""
    values = {**file_values, **overrides}
    types = field_types()
    try:
        for name, value in values.items():
            if name in types:
                check_type(name, value, types[name])
        config = TrainConfig(**values)
        check_config(config)
    except UserError as err:
        from_file = [name for name in err.fields if name in file_values and name not in overrides]
        if source is None or not from_file:
            raise
        also = tuple(name for name in err.fields if name != err.field)
        raise UserError(f"config {source}: {err.template}", err.field, also) from None
    return config


# annotation part -> (test, how the error names it)
_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (lambda v: _is_number(v), "a number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "list[str]": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "None": (lambda v: v is None, "unset"),
}


def _is_number(value: Any) -> bool:
    """An int or float that fits a float (JSON integers have no limit: 10**400 is none)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def check_type(name: str, value: Any, annotation: str) -> None:
    """UserError unless ``value`` fits the field's annotation ('float | None', 'list[str]', ...): a config file's
    "1e-4" is not a number, "false" is not a boolean, and true is not an integer."""
    kinds = [_KINDS[part.strip()] for part in annotation.split("|")]
    if not any(test(value) for test, _ in kinds):
        raise UserError(f"{name} must be {' or '.join(what for _, what in kinds)}, got {shown(value)}", name)


def shown(value: Any) -> str:
    """A value as a message shows it: its repr, a huge integer by its digit count, a long one cut short."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**18:
        return f"a {len(str(abs(value)))}-digit integer"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_config(c: TrainConfig) -> None:
    """UserError naming the first bad setting."""
    if not c.model_path:
        raise UserError("model_path is required (--model-path or model_path in the config file)", "model_path")
    if not c.dataset:
        raise UserError("dataset is required (--dataset or dataset in the config file)", "dataset")
    for name, annotation in field_types().items():  # first: a huge int breaks arithmetic on it (10**400 * 1.0)
        value = getattr(c, name)
        if annotation.startswith("int") and name != "seed" and isinstance(value, int) and value > MAX_INT:
            raise UserError(f"{name} must be at most {MAX_INT}, got {shown(value)}", name)
    _choice("mode", c.mode, MODES)
    _choice("mixed_precision", c.mixed_precision, MIXED_PRECISION)
    _choice("timestep_sampling", c.sampling, TIMESTEP_SAMPLING)
    _choice("loss_weighting", c.weighting, LOSS_WEIGHTING)
    _choice("lr_scheduler", c.lr_scheduler, LR_SCHEDULERS)
    if (c.height is None) != (c.width is None):
        raise UserError("give both height and width, or neither (then each sample is sized to max_area)", "height",
                        ("width",))  # fmt: skip
    for name in ("height", "width"):
        value = getattr(c, name)
        if value is not None and (not isinstance(value, int) or value < 16 or value % 16):
            raise UserError(f"{name} must be a multiple of 16 and at least 16, got {value}", name)
    positive = ("max_area", "lora_rank", "max_steps", "gradient_accumulation_steps", "batch_size", "log_every",
                "validation_samples", "validation_steps")  # fmt: skip
    for name in positive:
        if not isinstance(getattr(c, name), int) or getattr(c, name) < 1:
            raise UserError(f"{name} must be a positive integer, got {getattr(c, name)!r}", name)
    for name in ("lr_warmup_steps", "checkpoint_every", "validation_every"):
        if not isinstance(getattr(c, name), int) or getattr(c, name) < 0:
            raise UserError(f"{name} must be an integer >= 0, got {getattr(c, name)!r}", name)
    if c.checkpoints_total_limit is not None and c.checkpoints_total_limit < 1:
        raise UserError(f"checkpoints_total_limit must be >= 1, got {c.checkpoints_total_limit}",
                        "checkpoints_total_limit")  # fmt: skip
    for name in ("flow_shift", "lr", "alpha", "logit_std"):
        value = getattr(c, name)
        if not math.isfinite(value) or value <= 0:
            setting = _FIELDS.get(name, name)
            raise UserError(f"{setting} must be a positive finite number, got {value}", setting)
    if not c.lora_targets:
        raise UserError("lora_targets must name at least one module", "lora_targets")
    _check_ranges(c)


MAX_INT = 2**31 - 1  # no integer setting is sensibly larger (a step count, a size in pixels, a rank)
MAX_SAMPLES = 2**40  # max_steps x gradient_accumulation_steps x batch_size: the length of the item stream
MAX_SEED = 2**32 - 1  # numpy's limit (accelerate seeds numpy too)


def _check_ranges(c: TrainConfig) -> None:
    """UserError naming the first number out of its range: seeds numpy refuses, too many samples, AdamW's betas
    outside [0, 1), negative or non-finite epsilon, weight decay, clipping norm, logit mean, guidance."""
    if not 0 <= c.seed <= MAX_SEED:
        raise UserError(f"seed must be an integer from 0 to {MAX_SEED}, got {shown(c.seed)}", "seed")
    samples = c.max_steps * c.gradient_accumulation_steps * c.batch_size
    if samples > MAX_SAMPLES:
        raise UserError(f"max_steps x gradient_accumulation_steps x batch_size is {samples:.3g} samples, more than "
                        f"{MAX_SAMPLES:.3g}", "max_steps", ("gradient_accumulation_steps", "batch_size"))  # fmt: skip
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(c, name) < 1:
            raise UserError(f"{name} must be >= 0 and < 1, got {getattr(c, name)}", name)
    for name in ("adam_epsilon", "adam_weight_decay", "max_grad_norm", "validation_guidance_scale"):
        value = getattr(c, name)
        if not math.isfinite(value) or value < 0:
            raise UserError(f"{name} must be a finite number >= 0, got {value}", name)
    if not 0 <= c.dropout <= 1:
        raise UserError(f"caption_dropout must be a number from 0 to 1, got {c.caption_dropout}", "caption_dropout")
    if not math.isfinite(c.logit_mean):
        raise UserError(f"logit_mean must be a finite number, got {c.logit_mean}", "logit_mean")


_FIELDS = {"lr": "learning_rate", "alpha": "lora_alpha"}  # the setting behind a derived value


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"{name} must be one of {', '.join(allowed)}, got {value!r}", name)
