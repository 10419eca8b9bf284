"""``train(config)``: read the data -> cache the encoders' outputs -> load the transformer (+ LoRA) -> optimise with
accelerate -> save the LoRA (diffusers layout) or the transformer (diffusers folder).

Distribution, mixed precision and gradient accumulation are accelerate's (``accelerate launch`` with DeepSpeed or
FSDP configs works unchanged); there is no hand-written distributed code here.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..devices import torch_dtype
from ..errors import UserError
from ..files import atomic_path, writing
from ..files import write_json as _write_json
from .cache import CacheSettings, build_cache, load_negative, negative_file
from .checkpoints import (
    check_no_later_checkpoints,
    check_resume_settings,
    fallback_hint,
    resume_folder,
    run_settings,
    save_checkpoint,
    set_aside_later,
)
from .config import TrainConfig
from .data import check_dataset, read_dataset
from .dataset import Noising, StepDataset, collate
from .export import base_dtype, cast_for_saving
from .flow import flow_matching_loss
from .lora import add_lora, count, lora_modules_from_state, trainable_parameters
from .state import Saved, TrainState, apply_state, is_sharded, read_state, register_lora_hooks

LOG_NAME = "train_log.jsonl"
LOCK_NAME = ".chronoedit-train.lock"
LORA_OUTPUT = "lora.safetensors"
# The same LoRA with the original Wan names and lora_A/lora_B, alpha folded into lora_B: NVIDIA's DiffSynth inference
# (its load_lora matches ".lora_B." keys under Wan module names and ignores ".alpha"), ComfyUI and diffusers load it.
COMFYUI_LORA_OUTPUT = "lora_comfyui.safetensors"
TRANSFORMER_OUTPUT = "transformer"
_DTYPE_NAMES = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}  # mixed_precision -> the weights' dtype


@dataclass
class TrainResult:
    output: Path  # the LoRA file or the transformer folder
    step: int  # optimizer steps done in total
    resumed_from: int  # step of the checkpoint this run started from (0: fresh)
    losses: list[float] = field(default_factory=list)  # this run's per-step losses
    seconds_per_step: float = 0.0
    main_process: bool = True  # False on the other processes of a distributed run (they print nothing)


@dataclass
class Run:
    """Everything the loop works on."""

    config: TrainConfig
    accelerator: Any
    transformer: Any
    optimizer: Any
    scheduler: Any
    loader: Any
    state: TrainState
    validator: Any = None


def train(config: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    """Train as ``config`` says; returns where the result was written. Errors in the data name the CSV row."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(config)
    if not accelerator.is_main_process:
        log = _silent
    owner = _lock_output(config, accelerator)  # one run per output folder (held by the main process)
    try:
        set_seed(config.seed)
        saved = read_checkpoint(config, accelerator)  # a refused or damaged one fails before anything loads
        specs = read_dataset(config.dataset)
        check_dataset(specs)
        settings = cache_settings(config, accelerator.device, show_progress=accelerator.is_main_process)
        with accelerator.main_process_first():
            entries = build_cache(specs, config.cache, settings, accelerator.device, log)
        run = setup(config, accelerator, entries, log)
        resumed = resume(run, saved, log)
        losses, seconds = loop(run)
        output = save_result(run)
        return TrainResult(output, run.state.step, resumed, losses, seconds, accelerator.is_main_process)
    finally:
        if owner is not None:
            owner.close()
        accelerator.end_training()
        _reset_accelerate_state()


def read_checkpoint(config: TrainConfig, accelerator: Any) -> Saved | None:
    """The checkpoint to resume (None: a new run), its settings compared with the run's and every file read and
    checked: a damaged latest one names the file and ``--resume previous``."""
    folder = resume_folder(config.output, config.resume)
    if folder is None:
        return None
    hint = fallback_hint(config.output, folder, config.resume)
    check_resume_settings(folder, config, hint)
    saved = read_state(folder, config.mode, accelerator, hint)
    if config.resume not in ("auto", "previous"):  # an explicit folder: no later checkpoint may outrank this run's
        check_no_later_checkpoints(config.output, saved.step)
    return saved


def _lock_output(config: TrainConfig, accelerator: Any) -> Any:
    """The main process's lock on the output folder: a second run there would resume, log and checkpoint over the
    first one's files."""
    from ..files import hold_lock

    if not accelerator.is_main_process:
        return None
    with writing(config.output):
        config.output.mkdir(parents=True, exist_ok=True)
        return hold_lock(config.output / LOCK_NAME, f"another chronoedit train is using {config.output}")


def make_accelerator(config: TrainConfig) -> Any:
    """The run's Accelerator. Accelerate keeps one process-wide state; a second run in the same process (the Python
    API, or a test) would otherwise inherit the first run's mixed precision and refuse its own, so that state is
    reset here (the process group, in PartialState, is kept)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()

    if config.mode == "full" and config.mixed_precision == "fp16":
        raise UserError("full fine-tuning in fp16 is not supported: use mixed_precision bf16 (or no)",
                        "mixed_precision", ("mode",))  # fmt: skip
    return Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        project_dir=str(config.output),
    )


def cache_settings(config: TrainConfig, device: torch.device, show_progress: bool = False) -> CacheSettings:
    """UMT5 runs in bf16 on a GPU with bf16 training (fp32 UMT5-XXL is 22 GB), else in fp32."""
    text_dtype = "bfloat16" if device.type == "cuda" and config.mixed_precision == "bf16" else "float32"
    return CacheSettings(config.model_path, config.height, config.width, config.max_area, text_dtype,
                         show_progress=show_progress and not config.quiet, buckets=config.buckets)  # fmt: skip


def build_transformer(config: TrainConfig, log: Callable[[str], None], accelerator: Any = None) -> torch.nn.Module:
    """The transformer with its trainable part: a LoRA on a frozen base stored in the training precision, or every
    weight (fp32 master weights; accelerate's autocast computes in bf16). A full fine-tune under FSDP2 is loaded
    sharded: each process reads only its own rows (:mod:`.sharded`)."""
    from ..loading import load_transformer

    base_dtype = torch_dtype(_DTYPE_NAMES[config.mixed_precision]) if config.mode == "lora" else torch.float32
    if config.mode == "full" and accelerator is not None and accelerator.is_fsdp2:
        transformer = _load_sharded(config, accelerator)
        log(f"loaded the transformer sharded over {accelerator.num_processes} processes (each reads its own rows)")
    else:
        transformer = load_transformer(config.model_path, subfolder="transformer", torch_dtype=base_dtype)
    if config.mode == "lora":
        modules = add_lora(transformer, config.lora_targets, config.lora_rank, config.alpha)
        log(f"training a rank-{config.lora_rank} LoRA (alpha {config.alpha:g}) on {len(modules)} layers")
    else:
        transformer.requires_grad_(True)
        log("training every weight of the transformer (full fine-tuning)")
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    log(f"trainable parameters: {count(trainable_parameters(transformer)):,}")
    return transformer.train()


def _load_sharded(config: TrainConfig, accelerator: Any) -> torch.nn.Module:
    """The transformer sharded the way accelerate's FSDP2 would shard it (its mixed precision and resharding), so its
    ``prepare`` keeps it as it is. Unverified here: FSDP through accelerate needs GPUs (tested with torch's FSDP2 on
    CPU processes)."""
    from torch.distributed.device_mesh import init_device_mesh

    from .sharded import load_sharded_transformer

    plugin = accelerator.state.fsdp_plugin
    fsdp: dict[str, Any] = {"reshard_after_forward": plugin.reshard_after_forward}
    if plugin.mixed_precision_policy is not None:
        fsdp["mp_policy"] = plugin.mixed_precision_policy
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    return load_sharded_transformer(config.model_path, mesh, dtype=torch.float32, **fsdp)


def setup(config: TrainConfig, accelerator: Any, entries: list[Any], log: Callable[[str], None]) -> Run:
    """Model, optimizer, LR schedule and data stream, prepared by accelerate; checkpoint hooks registered."""
    from diffusers.optimization import get_scheduler
    from torch.utils.data import DataLoader

    transformer = build_transformer(config, log, accelerator)
    optimizer = torch.optim.AdamW(
        trainable_parameters(transformer),
        lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    world = accelerator.num_processes
    scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps * world,
        num_training_steps=config.max_steps * world,
    )
    per_step = config.gradient_accumulation_steps * config.batch_size * world
    dataset = StepDataset(entries, config.max_steps * per_step, config.seed, noising(config, accelerator.device),
                          config.batch_size)  # fmt: skip
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=False, collate_fn=collate)
    transformer, optimizer, loader, scheduler = accelerator.prepare(transformer, optimizer, loader, scheduler)
    state = TrainState()
    if config.mode == "lora" and is_sharded(accelerator):  # accelerate writes the checkpoints: only the LoRA
        register_lora_hooks(accelerator)
    run = Run(config, accelerator, transformer, optimizer, scheduler, loader, state)
    run.validator = make_validator(config, accelerator, entries)
    return run


def noising(config: TrainConfig, device: torch.device) -> Noising:
    """σ sampling and caption dropout as configured (the empty prompt read from the cache when captions drop)."""
    empty = None
    if config.dropout > 0:
        empty = load_negative(negative_file(config.cache, cache_settings(config, device)))
    return Noising(config.flow_shift, config.sampling, config.logit_mean, config.logit_std, config.dropout, empty)


def make_validator(config: TrainConfig, accelerator: Any, entries: list[Any]) -> Any:
    """A :class:`~chronoedit.train.validation.Validator` on the main process, or None (off, or sharded weights)."""
    from accelerate.utils import DistributedType

    if not config.validation_every or not accelerator.is_main_process:
        return None
    sharded = accelerator.distributed_type == DistributedType.FSDP or (
        accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3
    )
    if sharded:
        print("chronoedit: note: validation edits are skipped with FSDP / ZeRO-3 (the weights are sharded)")
        return None
    from .validation import Validator

    return Validator(
        model_path=config.model_path,
        entries=entries[: config.validation_samples],
        negative_file=negative_file(config.cache, cache_settings(config, accelerator.device)),
        folder=config.output / "validation",
        steps=config.validation_steps,
        guidance_scale=config.validation_guidance_scale,
        flow_shift=config.flow_shift,
        size=(config.height, config.width, config.max_area, config.buckets),
        device=accelerator.device,
    )


def resume(run: Run, saved: Saved | None, log: Callable[[str], None]) -> int:
    """Restore the checkpoint read to resume from (if any; with ``--resume previous`` the later ones are then set
    aside); the log keeps only the steps up to it (a run from step 0 starts it afresh). Returns its step."""
    if saved is not None:
        apply_state(saved, run)
        if run.config.resume == "previous" and run.accelerator.is_main_process:
            set_aside_later(run.config.output, run.state.step, log)
        run.accelerator.wait_for_everyone()
        log(f"resumed from {saved.folder} at step {run.state.step}")
    if run.accelerator.is_main_process:
        truncate_log(run.config.output / LOG_NAME, run.state.step)
        write_json(run.config.output / "train_config.json", run_settings(run.config))
    return run.state.step


def loop(run: Run) -> tuple[list[float], float]:
    """Optimise from the current step to ``max_steps``; returns this run's losses and the mean seconds per step."""
    from tqdm.auto import tqdm

    cfg, acc, state = run.config, run.accelerator, run.state
    loader = acc.skip_first_batches(run.loader, state.step * cfg.gradient_accumulation_steps)
    bar = tqdm(total=cfg.max_steps, initial=state.step, unit="step", desc="training",
               disable=cfg.quiet or not acc.is_main_process)  # fmt: skip
    losses, micro, times = [], [], []
    started = time.perf_counter()
    for batch in loader if state.step < cfg.max_steps else ():
        micro.append(train_micro_step(run, batch))
        if not acc.sync_gradients:
            continue
        state.step += 1
        loss = float(torch.stack(micro).mean())
        micro.clear()
        times.append(time.perf_counter() - started)
        started = time.perf_counter()
        losses.append(loss)
        bar.update()
        bar.set_postfix(loss=f"{loss:.4f}")
        after_step(run, loss, times[-1])
        if state.step >= cfg.max_steps:
            break
    bar.close()
    return losses, (sum(times) / len(times) if times else 0.0)


def train_micro_step(run: Run, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward + backward of one micro-batch; the optimizer steps when accelerate says the accumulation is full.
    Returns the micro-batch loss averaged over processes (detached)."""
    acc = run.accelerator
    with acc.accumulate(run.transformer):
        with acc.autocast():
            loss = flow_matching_loss(run.transformer, batch, run.config.loss_on_first_frame, run.config.weighting,
                                      run.config.flow_shift)  # fmt: skip
        if not torch.isfinite(loss):
            raise UserError(f"the loss is {loss.item()} at step {run.state.step + 1} (lower the learning rate?)",
                            "learning_rate")  # fmt: skip
        acc.backward(loss)
        if acc.sync_gradients and run.config.max_grad_norm > 0:
            acc.clip_grad_norm_(run.transformer.parameters(), run.config.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return acc.gather(loss.detach()[None]).mean()


def after_step(run: Run, loss: float, seconds: float) -> None:
    """Log, checkpoint and validate on their schedules."""
    cfg, acc, step = run.config, run.accelerator, run.state.step
    if acc.is_main_process and (step % cfg.log_every == 0 or step == cfg.max_steps):
        lr = run.scheduler.get_last_lr()[0]
        record = {"step": step, "loss": loss, "lr": lr, "seconds": round(seconds, 4), "time": round(time.time(), 3)}
        with writing(cfg.output / LOG_NAME), (cfg.output / LOG_NAME).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
    last = step == cfg.max_steps
    if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or last:
        save_checkpoint(run, step, cfg.checkpoints_total_limit, run_settings(cfg))
    if run.validator is not None and cfg.validation_every and (step % cfg.validation_every == 0 or last):
        with acc.autocast():
            run.validator.run(acc.unwrap_model(run.transformer), step)


def save_result(run: Run) -> Path:
    """The LoRA (diffusers layout, plus a copy with Wan names and lora_A/lora_B that DiffSynth, ComfyUI and
    diffusers load) or the full transformer (diffusers folder), written atomically."""
    from ..lora import save_lora
    from ..saving import save_transformer

    acc, output = run.accelerator, run.config.output
    acc.wait_for_everyone()
    state = acc.get_state_dict(run.transformer)  # every rank takes part: gathered under ZeRO-3 / FSDP
    if run.config.mode == "lora":
        path = output / LORA_OUTPUT
        if acc.is_main_process:
            modules = lora_modules_from_state(state, run.config.alpha)
            with writing(path):
                save_lora(modules, path)
            with writing(output / COMFYUI_LORA_OUTPUT):
                save_lora(modules, output / COMFYUI_LORA_OUTPUT, layout="wan_ab")
    else:
        path = output / TRANSFORMER_OUTPUT
        if acc.is_main_process:
            tmp = output / f".tmp-{TRANSFORMER_OUTPUT}"
            shutil.rmtree(tmp, ignore_errors=True)
            if not run.config.save_fp32:  # the base checkpoint's dtype (fp32 master weights trained)
                state = cast_for_saving(state, base_dtype(run.config.model_path))
            save_transformer(acc.unwrap_model(run.transformer), tmp, state_dict=state)  # UserError when it cannot
            with writing(path):
                if path.exists():
                    shutil.rmtree(path)
                tmp.rename(path)
    acc.wait_for_everyone()
    return path


# ------------------------------------------------------------------------------------------------------- helpers
def truncate_log(path: Path, step: int) -> None:
    """Keep the log's records up to ``step`` (a resumed run re-logs the steps after its checkpoint); a torn last
    line is dropped and the file ends with a newline, so the next record starts a line of its own."""
    if not path.is_file():
        return
    text = _read_text(path)
    records = _log_lines(Path(path), text)
    kept = [line for line, record in records if record["step"] <= step]
    if len(kept) != len(records) or step == 0 or not text.endswith("\n"):
        with writing(path), atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``train_log.jsonl`` (a torn last line, cut by a crash, is left out)."""
    return [record for _, record in _log_lines(Path(path), _read_text(Path(path)))]


def _read_text(path: Path) -> str:
    """A log's text; UserError naming it when it cannot be read."""
    with writing(path, "read"):
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"{path} is not UTF-8 text ({err}): fix or delete it") from None


def _log_lines(path: Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of each line of the log; the last one is skipped when it does not parse (a write cut short),
    any other is a UserError naming it."""
    numbered = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    records = []
    for number, line in numbered:
        try:
            records.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if number == numbered[-1][0]:
                break
            raise UserError(f"{path} line {number} is not a JSON record: fix or delete that line") from None
    return records


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON atomically (folders created); UserError when it cannot be written."""
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(path, data)


def _silent(_: str) -> None:
    """The log of the non-main processes."""


def _reset_accelerate_state() -> None:
    """Let a later ``train`` in the same process pick another precision (accelerate keeps a process-wide state)."""
    from accelerate.state import AcceleratorState

    with contextlib.suppress(AttributeError):
        AcceleratorState._reset_state()
