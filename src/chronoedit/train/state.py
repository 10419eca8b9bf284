"""What a resumable checkpoint holds, written and read back as tensors and plain data only: a crafted checkpoint
never runs code, and a damaged one is one line naming its file.

A checkpoint folder holds (one process, or data parallel on many):

- ``lora.safetensors`` (the LoRA) or ``model.safetensors`` (every weight, full fine-tuning): safetensors;
- ``optimizer.bin``, ``scheduler.bin``, ``scaler.pt`` (fp16 only): ``torch.save`` of their state dicts;
- ``random_states_<rank>.pt``: each process's random states (Python, numpy, torch, the GPU's) as tensors and numbers;
- ``train_state.json``: the step counters, written last, so it marks the checkpoint complete.

Every ``torch.save`` file is read with ``torch.load(weights_only=True)``, which builds only tensors and plain data
(numbers, strings, lists, tuples, dicts): a file that needs any other Python object is refused, unpickled no further.
Checkpoints of earlier versions (accelerate's layout: the step in ``custom_checkpoint_0.pkl``, numpy arrays in
``random_states_<rank>.pkl``) are read the same way, numpy's array constructor allowed for that random-state file only.

Under DeepSpeed / FSDP the model and optimizer are sharded by those libraries: accelerate writes and reads them
(its own files with ``weights_only=True``); the step is still kept in ``train_state.json``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import pickle
import random
import re
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import UserError
from ..files import atomic_path, check_regular, open_regular, write_json
from ..files import os_reason as reason
from ..lora import LoraFile, read_lora, save_lora
from .config import TrainConfig, shown
from .lora import ADAPTER, load_lora_weights_, lora_modules

STATE_NAME = "train_state.json"  # the step counters; written last: its presence marks a complete checkpoint
LORA_NAME = "lora.safetensors"
MODEL_NAME = "model.safetensors"
OPTIMIZER_NAME = "optimizer.bin"
SCHEDULER_NAME = "scheduler.bin"
SCALER_NAME = "scaler.pt"
OLD_STEP_NAME = "custom_checkpoint_0.pkl"  # earlier versions: the step, as accelerate's custom state
_ZIP_MAGIC = b"PK\x03\x04"  # how every torch.save file (the zip format, torch >= 1.6) starts
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def rng_name(rank: int) -> str:
    return f"random_states_{rank}.pt"


def old_rng_name(rank: int) -> str:
    return f"random_states_{rank}.pkl"


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` is a complete checkpoint (its last file written: this version's or an earlier one's)."""
    return (folder / STATE_NAME).is_file() or (folder / OLD_STEP_NAME).is_file()


@dataclass
class TrainState:
    """The optimizer step counter, saved with every checkpoint."""

    step: int = 0


class RunParts(Protocol):
    """What a checkpoint saves and restores (:class:`chronoedit.train.loop.Run` has it)."""

    config: TrainConfig
    accelerator: Any
    transformer: Any
    optimizer: Any
    scheduler: Any
    state: TrainState


def is_sharded(accelerator: Any) -> bool:
    """Whether the model and optimizer are sharded by DeepSpeed / FSDP (then accelerate saves and loads them)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP,
                                            DistributedType.MEGATRON_LM)  # fmt: skip


# ------------------------------------------------------------------------------------------------------------ saving
def write_state(run: RunParts, folder: Path) -> None:
    """Write the run's state into ``folder`` (every process writes its random states; the main process the rest).
    ``train_state.json`` is not written here: see :func:`write_counters`. OSError when a file cannot be written."""
    acc = run.accelerator
    if is_sharded(acc):
        acc.save_state(str(folder))
        return
    if acc.is_main_process:
        model = acc.unwrap_model(run.transformer)
        if run.config.mode == "lora":
            save_lora(lora_modules(model), folder / LORA_NAME)
        else:
            from safetensors.torch import save_model

            with atomic_path(folder / MODEL_NAME) as tmp:
                save_model(model, str(tmp), metadata={"format": "pt"})
        _save(run.optimizer.state_dict(), folder / OPTIMIZER_NAME)
        _save(run.scheduler.state_dict(), folder / SCHEDULER_NAME)
        if acc.scaler is not None:
            _save(acc.scaler.state_dict(), folder / SCALER_NAME)
    _save(random_states(acc.device), folder / rng_name(acc.process_index))


def write_counters(run: RunParts, folder: Path) -> None:
    """``train_state.json``: the optimizer step and accelerate's micro-step counter (the main process, last)."""
    write_json(folder / STATE_NAME, {"step": run.state.step, "accelerator_step": int(run.accelerator.step)})


def _save(data: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(data, tmp)


def random_states(device: torch.device) -> dict[str, Any]:
    """This process's random states as tensors and plain data: Python's, numpy's, torch's and the device's."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    module = _device_module(device)
    if module is not None:
        getter = getattr(module, "get_rng_state_all", None) or module.get_rng_state
        found = getter()
        states["device"] = {"type": device.type, "states": list(found) if isinstance(found, list | tuple) else [found]}
    return states


def _device_module(device: torch.device) -> Any:
    """torch's module of an accelerator device (``torch.cuda`` ...), None on the CPU."""
    return None if device.type == "cpu" else torch.get_device_module(device.type)


def register_lora_hooks(accelerator: Any) -> None:
    """Under DeepSpeed / FSDP, where accelerate saves the checkpoint: only the LoRA of the model (the base weights are
    frozen and unchanged)."""
    from accelerate.utils import DistributedType

    sharded = accelerator.distributed_type == DistributedType.FSDP  # FSDP writes its own sharded model files

    def save_hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        if accelerator.is_main_process and not sharded:
            for model in models:
                save_lora(lora_modules(accelerator.unwrap_model(model)), Path(output_dir) / LORA_NAME)
        weights.clear()  # accelerate writes no model file

    def load_hook(models: list[Any], input_dir: str) -> None:
        for model in models:
            load_lora_weights_(accelerator.unwrap_model(model), Path(input_dir) / LORA_NAME)
        models.clear()  # accelerate loads no model file

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ----------------------------------------------------------------------------------------------------------- reading
@dataclass
class Saved:
    """A checkpoint read and checked before training starts, applied by :func:`apply_state` once the run is set up."""

    folder: Path
    step: int
    accelerator_step: int | None = None
    lora: LoraFile | None = None
    model_file: Path | None = None  # full fine-tuning: checked here, loaded into the model by apply_state
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    sharded: bool = False  # accelerate loads it (DeepSpeed / FSDP)


def read_state(folder: Path, mode: str, accelerator: Any, hint: str = "") -> Saved:
    """Read every file of the checkpoint ``folder`` this process needs, as tensors and plain data. UserError naming
    the file (and ending with ``hint``) when one is missing, truncated, corrupt or holds other Python objects."""
    files = _Files(folder, hint)
    old = not (folder / STATE_NAME).is_file()
    step, accelerator_step = files.counters(old)
    if is_sharded(accelerator):
        pickles = sorted(folder.glob("custom_checkpoint_*.pkl"))  # an earlier version's step counter, among others
        if pickles:
            raise files.refused(pickles[0], "under DeepSpeed / FSDP accelerate would unpickle it without restriction")
        return Saved(folder, step, sharded=True)
    saved = Saved(folder, step, accelerator_step)
    if mode == "lora":
        files.safetensors(LORA_NAME, read_all=True)
        saved.lora = read_lora(folder / LORA_NAME)
    else:
        saved.model_file = files.safetensors(MODEL_NAME, read_all=False)
    saved.optimizer = files.table(OPTIMIZER_NAME, ("state", "param_groups"))
    saved.scheduler = files.table(SCHEDULER_NAME, ("last_epoch",))
    if accelerator.scaler is not None:
        saved.scaler = files.table(SCALER_NAME, ("scale",))
    rank = accelerator.process_index
    if old:
        saved.rng, saved.accelerator_step = files.old_random_states(old_rng_name(rank))
    else:
        saved.rng = files.random_states(rng_name(rank))
    return saved


@dataclass
class _Files:
    """Reads the files of one checkpoint; every failure is a UserError naming the file, ending with ``hint``."""

    folder: Path
    hint: str

    def corrupt(self, path: Path, why: str) -> UserError:
        return UserError(f"resume: {path} is {why}{self.hint}", "resume")

    def refused(self, path: Path, why: str) -> UserError:
        return UserError(f"resume: refusing to load {path}: {why}{self.hint}", "resume")

    @contextlib.contextmanager
    def reading(self, path: Path) -> Iterator[None]:
        """A missing file, or an OS error reading it: UserError naming it (a folder or a pipe in its place is refused
        by :func:`~chronoedit.files.open_regular` / :func:`~chronoedit.files.check_regular`)."""
        if not path.exists() and not path.is_symlink():
            raise self.corrupt(path, "missing: the checkpoint is incomplete")
        try:
            yield
        except OSError as err:
            raise UserError(f"resume: cannot read {path}: {reason(err, path)}", "resume") from err

    def counters(self, old: bool) -> tuple[int, int | None]:
        """(step, accelerate's step or None) from ``train_state.json``, or an earlier version's custom state."""
        path = self.folder / (OLD_STEP_NAME if old else STATE_NAME)
        if old:
            data = self.torch(OLD_STEP_NAME)
        else:
            with self.reading(path), open_regular(path, "checkpoint file") as handle:
                try:
                    data = json.loads(handle.read().decode("utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise self.corrupt(path, f"truncated or corrupt ({err})") from None
        names = ("step",) if old else ("step", "accelerator_step")
        values = [data.get(name) if isinstance(data, dict) else None for name in names]
        for name, value in zip(names, values, strict=True):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise self.corrupt(path, f"corrupt: {name} must be an integer >= 0, got {shown(value)}")
        return values[0], (values[1] if len(values) > 1 else None)

    def torch(self, name: str, allowed: Sequence[Any] = ()) -> Any:
        """A ``torch.save`` file's content, built from tensors and plain data only (``allowed``: extra globals)."""
        path = self.folder / name
        with self.reading(path):
            with open_regular(path, "checkpoint file") as handle:  # a regular file (a pipe would block), by its start
                head = handle.read(len(_ZIP_MAGIC))
            if head != _ZIP_MAGIC:
                raise self.corrupt(path, "empty" if not head else "not a file written by torch.save (corrupt?)")
            try:
                zipfile.ZipFile(path).close()  # its table of contents is at the end: gone when the file was cut
                with torch.serialization.safe_globals(list(allowed)):
                    return torch.load(str(path), map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:
                found = _GLOBAL.search(str(err))
                what = f"it would build the Python object {found[1]}" if found else "it holds Python objects"
                raise self.refused(path, f"{what}, not only tensors and plain data (unpickling it could run "
                                   "code)") from None  # fmt: skip
            except zipfile.BadZipFile:
                raise self.corrupt(path, "truncated or corrupt (a damaged zip archive)") from None
            except (RuntimeError, OSError) as err:  # torch's zip reader on a damaged archive, else a real error
                if not _damaged_zip(err):
                    raise
                raise self.corrupt(path, "truncated or corrupt (a damaged zip archive)") from None

    def table(self, name: str, keys: Sequence[str]) -> dict[str, Any]:
        """A state dict: a ``torch.save`` table holding at least ``keys``."""
        data = self.torch(name)
        if not isinstance(data, dict) or not all(key in data for key in keys):
            raise self.corrupt(self.folder / name, f"not a state dict with {', '.join(keys)}")
        return data

    def safetensors(self, name: str, read_all: bool) -> Path:
        """Check a safetensors file: its header always, every tensor when ``read_all``."""
        from safetensors import SafetensorError, safe_open

        path = self.folder / name
        with self.reading(path):
            check_regular(path, "checkpoint file")
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for key in handle.keys() if read_all else ():
                        handle.get_tensor(key)
            except SafetensorError as err:
                raise self.corrupt(path, f"truncated or corrupt ({err})") from None
        return path

    def random_states(self, name: str) -> dict[str, Any]:
        """This version's random states, checked so that restoring them cannot fail."""
        states = self.torch(name)
        if not isinstance(states, dict) or not _valid_rng(states):
            raise self.corrupt(self.folder / name, "not a valid set of random states")
        return states

    def old_random_states(self, name: str) -> tuple[dict[str, Any], int | None]:
        """An earlier version's (accelerate's) random states as this version's, and accelerate's step."""
        core = np._core if hasattr(np, "_core") else np.core
        allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype, *_uint32_dtype()]
        old = self.torch(name, allowed)
        if not isinstance(old, dict):
            raise self.corrupt(self.folder / name, "not a valid set of random states")
        states = {"python": old.get("random_state"), "torch": old.get("torch_manual_seed")}
        numpy_state = old.get("numpy_random_seed")
        keys = numpy_state[1] if isinstance(numpy_state, tuple) and len(numpy_state) == 5 else None
        if isinstance(keys, np.ndarray) and keys.dtype == np.uint32:
            states["numpy"] = (numpy_state[0], torch.from_numpy(keys.astype(np.int64)), *numpy_state[2:])
        for key, value in old.items():
            device = re.fullmatch(r"torch_(\w+)_manual_seed", key)
            if device and isinstance(value, list | tuple | torch.Tensor):
                states["device"] = {"type": device[1], "states": [value] if isinstance(value, torch.Tensor) else
                                    list(value)}  # fmt: skip
        step = old.get("step")
        if not _valid_rng(states) or not (step is None or isinstance(step, int)):
            raise self.corrupt(self.folder / name, "not a valid set of random states")
        return states, step


def _damaged_zip(err: Exception) -> bool:
    """Whether torch's zip reader failed on a damaged archive: its own RuntimeError, or EINVAL from a seek outside
    the file (an OS error reading a file already opened and read from would be another)."""
    if isinstance(err, OSError):
        return err.errno == errno.EINVAL
    return "PytorchStreamReader" in str(err)


def _uint32_dtype() -> list[Any]:
    dtypes = getattr(np, "dtypes", None)
    return [dtypes.UInt32DType] if dtypes is not None and hasattr(dtypes, "UInt32DType") else []


def _valid_rng(states: dict[str, Any]) -> bool:
    """Whether the random states can be restored: each is tried on a throwaway generator."""
    numpy_state = states.get("numpy")
    if not (isinstance(numpy_state, tuple | list) and len(numpy_state) == 5 and numpy_state[0] == "MT19937"
            and isinstance(numpy_state[1], torch.Tensor) and tuple(numpy_state[1].shape) == (624,)
            and isinstance(numpy_state[2], int) and 0 <= numpy_state[2] <= 624):  # fmt: skip
        return False
    device = states.get("device", {"states": []})
    if not (isinstance(device, dict) and isinstance(device.get("states"), list)
            and all(isinstance(s, torch.Tensor) for s in device["states"])):  # fmt: skip
        return False
    try:
        random.Random().setstate(states.get("python"))  # type: ignore[arg-type]
        np.random.RandomState().set_state(_numpy_state(numpy_state))
        torch.Generator().set_state(states.get("torch"))  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError, OverflowError):
        return False
    return True


def _numpy_state(state: Sequence[Any]) -> tuple[str, np.ndarray, int, int, float]:
    name, keys, pos, has_gauss, cached = state
    return str(name), keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)


# ---------------------------------------------------------------------------------------------------------- applying
def apply_state(saved: Saved, run: RunParts) -> None:
    """Restore a checkpoint read by :func:`read_state` into the set-up run: weights, optimizer, LR schedule, gradient
    scaler, random states and step counters. UserError naming the file when one does not fit this run."""
    acc = run.accelerator
    if saved.sharded:
        acc.load_state(str(saved.folder), load_kwargs={"weights_only": True})
        run.state.step = saved.step
        return
    model = acc.unwrap_model(run.transformer)
    if saved.lora is not None:
        _copy_lora(model, saved.lora, saved.folder / LORA_NAME)
    if saved.model_file is not None:
        _load_model(model, saved.model_file)
    _load_into(run.optimizer, saved.optimizer, saved.folder / OPTIMIZER_NAME)
    _load_into(run.scheduler, saved.scheduler, saved.folder / SCHEDULER_NAME)
    if saved.scaler is not None and acc.scaler is not None:
        _load_into(acc.scaler, saved.scaler, saved.folder / SCALER_NAME)
    _restore_random_states(saved.rng or {}, acc.device)
    if saved.accelerator_step is not None:
        acc.step = saved.accelerator_step
    run.state.step = saved.step


def _copy_lora(model: torch.nn.Module, lora: LoraFile, path: Path) -> None:
    """Copy the saved LoRA into the model's injected layers; UserError when its layers or shapes differ."""
    from peft.tuners.lora import LoraLayer

    layers = {name: layer for name, layer in model.named_modules() if isinstance(layer, LoraLayer)}
    for name, module in lora.modules.items():
        layer = layers.get(name)
        ok = layer is not None and module.has_lora
        ok = ok and layer.lora_A[ADAPTER].weight.shape == module.down.shape  # type: ignore[union-attr]
        if not ok or layer.lora_B[ADAPTER].weight.shape != module.up.shape:  # type: ignore[union-attr]
            raise UserError(f"resume: {path} does not fit this run's LoRA (layer {name})", "resume")
    if set(layers) != set(lora.modules):
        raise UserError(f"resume: {path} does not fit this run's LoRA ({len(lora.modules)} layers, the run has "
                        f"{len(layers)})", "resume")  # fmt: skip
    load_lora_weights_(model, lora)


def _load_model(model: torch.nn.Module, path: Path) -> None:
    """Full fine-tuning: every weight from ``model.safetensors``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        load_model(model, str(path), strict=True)
    except SafetensorError as err:
        raise UserError(f"resume: {path} is truncated or corrupt ({err})", "resume") from None
    except RuntimeError as err:  # load_state_dict: missing, unexpected or mis-shaped weights
        raise UserError(f"resume: {path} does not fit the model ({' '.join(str(err).split())[:300]})",
                        "resume") from None  # fmt: skip


def _load_into(target: Any, state: dict[str, Any] | None, path: Path) -> None:
    """``target.load_state_dict(state)``; UserError naming ``path`` when the saved state does not fit ``target``
    (torch checks the optimizer's parameter groups; a damaged table fails on its first wrong entry)."""
    try:
        target.load_state_dict(state)
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as err:
        raise UserError(f"resume: {path} does not fit this run ({' '.join(str(err).split())[:300]})",
                        "resume") from None  # fmt: skip


def _restore_random_states(states: dict[str, Any], device: torch.device) -> None:
    """Set every random generator as the checkpoint's process left it (states checked by :func:`_valid_rng`)."""
    random.setstate(states["python"])
    np.random.set_state(_numpy_state(states["numpy"]))
    torch.set_rng_state(states["torch"])
    saved = states.get("device")
    module = _device_module(device)
    if saved and module is not None and saved.get("type") == device.type and saved["states"]:
        setter = getattr(module, "set_rng_state_all", None)
        if setter is not None:
            setter(saved["states"])
        else:
            module.set_rng_state(saved["states"][0])
