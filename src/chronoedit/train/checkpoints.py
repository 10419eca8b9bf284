"""Resumable checkpoints: where they live, which one a run resumes, and whether its settings fit the run.

Each checkpoint (``checkpoints/checkpoint-<step>``, what it holds: :mod:`.state`) is written to a temporary folder
and renamed into place, ``train_state.json`` last, so a killed run never leaves a half-written one. With a LoRA it
holds only the adapter (``lora.safetensors``, diffusers layout, usable as is with ``chronoedit edit --lora-path``),
not the frozen base weights. A resumed run must keep the settings in :data:`MUST_MATCH`. ``--resume previous`` goes
back one checkpoint (the latest may be damaged): once that one is loaded, the later ones are renamed aside.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..files import os_reason as reason
from ..files import write_json, writing
from .config import RECORD_ONLY, TrainConfig, check_type, field_types
from .data import METADATA_NAME
from .lora import SHORT_TARGETS
from .state import RunParts, is_complete, write_counters, write_state

CHECKPOINT_DIR = "checkpoints"
CONFIG_NAME = "train_config.json"  # the settings a checkpoint was trained with
SET_ASIDE = ".skipped"  # suffix of a checkpoint --resume previous went back from
# What a resumed run must share with its checkpoint: the trainable part's shape, the data stream (samples, their
# size, order and batching) and the optimizer's hyper-parameters (restored from the checkpoint, so a new value would
# be silently ignored). The rest may change: max_steps (to extend a run), the LR schedule, the loss settings,
# checkpoint, log and validation settings, precision, the paths of the model and the cache.
MUST_MATCH = ("mode", "lora_rank", "lora_alpha", "lora_targets", "dataset", "height", "width", "max_area", "buckets",
              "batch_size", "gradient_accumulation_steps", "seed", "learning_rate", "adam_beta1", "adam_beta2",
              "adam_weight_decay", "adam_epsilon")  # fmt: skip
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(output: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    folder = output / CHECKPOINT_DIR
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))] if folder.is_dir() else []
    return sorted((step, path) for step, path in found if is_complete(path))


def resume_folder(output: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: ``auto`` = the latest in ``output`` (None when there is none), ``previous`` =
    the one before it, ``none``, or a folder (UserError when it is no checkpoint).

    ``none`` is refused (UserError) when ``output`` holds checkpoints: the new run's would be pruned before the
    earlier run's higher-numbered ones, and a later ``auto`` would continue the earlier run."""
    if resume == "none":
        found = checkpoints(output)
        if found:
            folder = output / CHECKPOINT_DIR
            raise UserError(
                f"--resume none starts a new run, but {folder} holds an earlier run's checkpoints (up to "
                f"{found[-1][1].name}): use another --output-dir, or delete {folder} to start over there",
                "resume",
            )
        return None
    if resume == "auto":
        found = checkpoints(output)
        return found[-1][1] if found else None
    if resume == "previous":
        found = checkpoints(output)
        if len(found) < 2:
            held = f"only {found[0][1].name}" if found else "no checkpoint"
            raise UserError(f"--resume previous: {output / CHECKPOINT_DIR} holds {held}, no earlier checkpoint to "
                            "go back to", "resume")  # fmt: skip
        return found[-2][1]
    path = Path(resume).expanduser()
    if not is_complete(path):
        raise UserError(f"resume: not a complete training checkpoint folder: {path}", "resume")
    return path


def fallback_hint(output: Path, folder: Path, resume: str) -> str:
    """What to do when the latest checkpoint (``--resume auto``) turns out damaged: go back one, or start over."""
    if resume != "auto":
        return ""
    earlier = [path for _, path in checkpoints(output) if path != folder]
    if earlier:
        return f"; resume from the one before, {earlier[-1].name}, with --resume previous"
    return f"; it is the only checkpoint: delete {folder} to start the run over"


def set_aside_later(output: Path, step: int, log: Callable[[str], None]) -> None:
    """``--resume previous``: rename the checkpoints after ``step`` aside (``checkpoint-N.skipped``), so they are
    neither resumed nor pruned, and nothing is deleted."""
    for found, path in checkpoints(output):
        if found <= step:
            continue
        target, number = path.with_name(path.name + SET_ASIDE), 1
        while target.exists():
            number += 1
            target = path.with_name(f"{path.name}{SET_ASIDE}-{number}")
        with writing(path, "set aside the checkpoint"):
            path.rename(target)
        log(f"set {path.name} aside as {target} (delete it once it is no longer needed)")


def check_no_later_checkpoints(output: Path, step: int) -> None:
    """UserError when ``output`` holds checkpoints past ``step``, where a run resumed from an explicit folder starts:
    they would outlive this run's when pruning, and ``--resume auto`` would pick them."""
    later = [path.name for found, path in checkpoints(output) if found > step]
    if later:
        raise UserError(
            f"resuming at step {step}, but {output / CHECKPOINT_DIR} holds later checkpoints ({', '.join(later)}) "
            "that would be kept over this run's and resumed by --resume auto: use another --output-dir, or delete them",
            "resume",
        )


# The transformer's shape: a checkpoint resumes on any copy of its base model, not on another model.
BASE_MODEL_FIELDS = ("num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim", "in_channels",
                     "out_channels", "patch_size", "text_dim", "freq_dim", "image_dim", "added_kv_proj_dim",
                     "pos_embed_seq_len")  # fmt: skip
BASE_MODEL_KEY = RECORD_ONLY  # in train_config.json, beside the settings


def run_settings(config: TrainConfig) -> dict[str, Any]:
    """What ``train_config.json`` holds: the settings, the dataset as its CSV's absolute path (so a resume from
    another working directory compares the same file) and the base transformer's shape."""
    return {**config.to_dict(), "dataset": _dataset_file(config.dataset), BASE_MODEL_KEY: base_model_shape(config)}


def base_model_shape(config: TrainConfig) -> dict[str, Any]:
    """The shape fields of the base model's ``transformer/config.json`` ({} when it cannot be read)."""
    from ..loading import resolve_checkpoint

    try:
        path = resolve_checkpoint(config.model_path) / "transformer" / "config.json"
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {name: saved[name] for name in BASE_MODEL_FIELDS if name in saved}


def check_resume_settings(folder: Path, config: TrainConfig, hint: str = "") -> None:
    """UserError naming every setting in :data:`MUST_MATCH` that differs from the checkpoint's
    ``train_config.json`` (old -> new); a checkpoint without one (older versions) is not compared. A damaged
    ``train_config.json`` is a UserError naming it, ending with ``hint``."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"resume: cannot read {path}: {reason(err, path)}", "resume") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"resume: {path} is truncated or corrupt ({err}){hint}", "resume") from None
    if not isinstance(saved, dict):
        raise UserError(f"resume: {path} is corrupt: expected a table of settings{hint}", "resume")
    types = field_types()
    for name in types.keys() & saved.keys():
        try:
            check_type(name, saved[name], types[name])
        except UserError as err:
            raise UserError(f"resume: {path} is corrupt: {err}{hint}", "resume") from None
    old = TrainConfig(**{"buckets": False, **{k: v for k, v in saved.items() if k in types}})  # earlier: no buckets
    changes = []
    lora = old.mode == config.mode == "lora"  # else the mode differs, or no LoRA settings count
    for name in (n for n in MUST_MATCH if lora or not n.startswith("lora_")):
        before, after = _effective(old, name), _effective(config, name)
        unset_alpha = name == "lora_alpha" and old.lora_alpha is None and config.lora_alpha is None  # follows the rank
        same_file = name == "dataset" and Path(before).resolve() == Path(after).resolve()  # e.g. saved as its blob
        if before != after and not unset_alpha and not same_file:
            if name == "lora_targets":  # compared as the layers they select, shown as written
                before, after = old.lora_targets, config.lora_targets
            changes.append(f"{name} {_show(before)} -> {_show(after)}")
    before, after = saved.get(BASE_MODEL_KEY) or {}, base_model_shape(config)
    differ = [k for k in BASE_MODEL_FIELDS if before.get(k) != after.get(k)] if before and after else []
    if differ:  # a field missing from one config and null in the other is no difference
        changes.append("base model " + ", ".join(f"{k} {before.get(k)} -> {after.get(k)}" for k in differ))
    if changes:
        raise UserError(
            f"resume: the checkpoint {folder} was trained with other settings ({'; '.join(changes)}): resume with its "
            "settings, or start a new run with --resume none and another --output-dir",
            "resume",
        )


def _effective(config: TrainConfig, name: str) -> Any:
    """The value that counts: max_area only without height/width, defaults applied, the dataset as its CSV's
    absolute path, LoRA targets as the layers they select."""
    if name in ("max_area", "buckets") and config.height is not None:
        return None
    if name == "dataset":
        return _dataset_file(config.dataset)
    if name == "lora_targets":  # aliases, order and repeats select the same layers
        return sorted({SHORT_TARGETS.get(target, target) for target in config.lora_targets})
    return {"lora_alpha": config.alpha, "learning_rate": config.lr}.get(name, getattr(config, name))


def _dataset_file(dataset: str) -> str:
    """The dataset's CSV as an absolute path, its folder resolved (a folder and its metadata.csv are the same
    dataset); saved values are absolute already, so they never depend on the current directory."""
    path = Path(dataset).expanduser().absolute()
    if path.is_dir():
        path = path / METADATA_NAME
    return str(path.parent.resolve() / path.name)  # the CSV's own name kept: it may be a link into a blob store


def _show(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(map(str, value))
    return "unset" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def save_checkpoint(run: RunParts, step: int, keep: int | None, config: dict[str, Any]) -> Path:
    """Write ``checkpoints/checkpoint-<step>`` atomically (temp folder, then rename; ``train_state.json`` last);
    prune to ``keep``. UserError when it cannot be written (a full disk, no permission)."""
    accelerator, output = run.accelerator, run.config.output
    root = output / CHECKPOINT_DIR
    final, tmp = root / f"checkpoint-{step:06d}", root / f".tmp-checkpoint-{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        with writing(final, "write the checkpoint"):
            tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with writing(final, "write the checkpoint"):
        write_state(run, tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with writing(final, "write the checkpoint"):
            write_json(tmp / CONFIG_NAME, config)
            write_counters(run, tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        if keep is not None:
            for _, old in checkpoints(output)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
