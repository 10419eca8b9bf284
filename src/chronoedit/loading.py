"""Find a checkpoint, read its configs and load its weights, naming exactly what is wrong when something is.

The transformer is built on the meta device and filled tensor by tensor from safetensors (single file or shards with
an index) or a GGUF file, each tensor cast to its target dtype as it is read: no second full copy of the weights is
ever held. Quantized Linear weights (fp8, GGUF blocks) stay quantized by default (``chronoedit.quant``).

Every problem with the checkpoint (missing, mismatched or corrupt weights, missing components, a bad config) is a
:class:`~chronoedit.errors.UserError`. The public :class:`ChronoEditTransformer3DModel` (diffusers' name, with
``from_pretrained``) is defined here: the model package holds no IO.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .files import check_regular, open_regular
from .keymap import is_original_layout, original_to_ours, strip_prefix
from .lazy import LazyComponent
from .model import ChronoEditTransformer3DModel as PureTransformer
from .model import TransformerConfig
from .model.transformer import keeps_fp32
from .quant import QTensor, from_fp8, replace_linear

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
# Keys present in some Wan checkpoints that ChronoEdit has no module for (as diffusers ignores them).
IGNORED_KEYS = ("norm_added_q",)
FP8_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
FP8_MARKERS = ("scaled_fp8",)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
GGUF_SUFFIX = ".gguf"
# load_transformer(quantized=...): keep quantized Linear weights quantized, or dequantize everything at load.
QUANTIZED_MODES = ("keep", "dequantize")
# diffusers' from_pretrained options that have no meaning here (we always read safetensors, lazily).
DIFFUSERS_LOADING_OPTIONS = {"variant", "use_safetensors", "low_cpu_mem_usage", "local_files_only", "revision"}
COMPONENTS = ("tokenizer", "text_encoder", "image_encoder", "image_processor", "vae", "scheduler", "transformer")


def resolve_checkpoint(path_or_repo_id: str | os.PathLike[str]) -> Path:
    """A local folder as is; otherwise a hub repo id (``owner/name``) fetched or found in the local hub cache."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"checkpoint path is not a folder: {path}")
    text = str(path_or_repo_id)
    if not looks_like_repo_id(text):
        raise UserError(f"checkpoint folder not found: {path}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text))
    except Exception as err:  # offline, unknown repo, withdrawn weights ...
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(
            f"checkpoint folder not found: {path} "
            f"(no such local folder; as a hub repo it could not be fetched: {reason})"
        ) from err


def looks_like_repo_id(text: str) -> bool:
    """``owner/name`` that is not a local-looking path: the only strings tried on the hub."""
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not text.endswith("/")


def component_dir(root: Path, name: str) -> Path:
    """The subfolder of one pipeline component, or a clear error naming it."""
    folder = root / name
    if not folder.is_dir():
        raise UserError(f"checkpoint {root} has no '{name}/' folder (component {name} is missing)")
    return folder


def read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file, which must hold an object; UserError naming the file otherwise."""
    if not path.exists():
        raise UserError(f"missing file: {path}")
    with open_regular(path, "config") as handle:
        text = handle.read()
    try:
        data = json.loads(text.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"cannot parse {path}: {err}") from err
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object of settings, got a JSON {_json_kind(data)}")
    return data


def _json_kind(value: Any) -> str:
    names = {list: "list", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a diffusers model folder: the index's shards, or the single file."""
    index = folder / INDEX_NAME
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        if not shards:
            raise UserError(f"{index} lists no weight files")
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise UserError(f"weight shard missing: {folder / missing[0]} (listed in {index.name})")
        return [folder / s for s in shards]
    single = folder / WEIGHTS_NAME
    if single.is_file():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found
    raise UserError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {folder}")


def iter_safetensors(path: Path, device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) one at a time; a truncated or corrupt file raises a UserError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                yield key, handle.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as err:
        raise UserError(f"cannot read weights {path}: truncated or corrupt safetensors file ({err})") from err


STORED_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # kept as stored by keep_stored_dtype


def target_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """float32 for the islands that stay fp32 in reduced precision, else ``dtype``."""
    return torch.float32 if keeps_fp32(name) else dtype


@dataclass
class WeightSource:
    """Where a transformer's weights are and how their names map to ours."""

    files: list[Path]
    config: TransformerConfig
    original_layout: bool  # original Wan / ComfyUI names (blocks.0.self_attn.q) rather than diffusers'
    scales: dict[str, torch.Tensor]  # our weight name -> fp8 dequantisation scale

    def our_name(self, key: str) -> str | None:
        """Our parameter name for a file key; None for keys that carry no parameter (fp8 scales, markers)."""
        if key.endswith(FP8_SCALE_SUFFIXES) or key in FP8_MARKERS:
            return None
        return original_to_ours(key) if self.original_layout else strip_prefix(key)

    def weight_name(self, key: str, file: Path) -> str | None:
        """The parameter a file key fills; None for keys that fill none (fp8 scales and markers, ignored weights);
        UserError for an original-layout key that names no ChronoEdit weight."""
        name = self.our_name(key)
        if name is None and not key.endswith(FP8_SCALE_SUFFIXES) and key not in FP8_MARKERS:
            raise UserError(f"unexpected key {key!r} in {file}: no ChronoEdit weight has this original name")
        if name is None or any(part in IGNORED_KEYS for part in name.split(".")):
            return None
        return name


def transformer_source(
    path: str | os.PathLike[str], subfolder: str | None = None, config: TransformerConfig | None = None
) -> WeightSource:
    """A diffusers folder (config.json + single or sharded safetensors) or one safetensors / GGUF file of any layout.

    Only headers are read here; a single file's config is inferred from its tensor shapes.
    """
    given = Path(path).expanduser()
    if given.is_file():
        if given.suffix.lower() not in (".safetensors", GGUF_SUFFIX):
            raise UserError(f"transformer path is not a folder or a .safetensors file (nor a .gguf file): {given}")
        files, config_path = [given], None
    else:
        folder = resolve_checkpoint(path)
        folder = component_dir(folder, subfolder) if subfolder else folder
        files, config_path = weight_files(folder), folder / "config.json"
    shapes = {k: s for f in files for k, s in read_shapes(f).items()}
    original = is_original_layout(shapes)
    rename = original_to_ours if original else strip_prefix
    ours = {rename(k): s for k, s in shapes.items() if not k.endswith(FP8_SCALE_SUFFIXES) and k not in FP8_MARKERS}
    if config is None and config_path is not None:
        config = TransformerConfig.from_dict(read_json(config_path), where=str(config_path))  # a folder needs one
    if config is None:
        config = TransformerConfig.from_shapes({k: v for k, v in ours.items() if k is not None})
    return WeightSource(files, config, original, read_fp8_scales(files, rename))


class ChronoEditTransformer3DModel(PureTransformer):
    """The ChronoEdit DiT of :mod:`chronoedit.model` with diffusers' ``from_pretrained``: what
    ``chronoedit.ChronoEditTransformer3DModel`` is, and the class every loaded transformer has. The model package
    holds no IO, so loading is added here."""

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> ChronoEditTransformer3DModel:
        """Load a diffusers-layout transformer folder (single or sharded safetensors) or one safetensors / GGUF file;
        ``kwargs`` as :func:`load_transformer` takes them (device, config, quantized)."""
        return load_transformer(path, subfolder=subfolder, torch_dtype=torch_dtype, **kwargs)


def load_transformer(
    path: str | os.PathLike[str],
    subfolder: str | None = None,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    config: TransformerConfig | None = None,
    quantized: str = "keep",
    keep_stored_dtype: bool = False,
    mmap: bool = False,
) -> ChronoEditTransformer3DModel:
    """Build our transformer from a diffusers-layout folder (whatever class name its config carries), a single
    safetensors file with diffusers or original Wan/ComfyUI names (fp8 / fp8-scaled included) or a GGUF file.
    ``config`` overrides the folder's config.json or, for a single file, the config inferred from its shapes.

    ``quantized="keep"`` (default): Linear weights stored quantized (fp8, GGUF Q8_0/Q4_K/...) stay quantized in
    memory as :class:`~chronoedit.quant.QuantizedLinear` layers, dequantized to the compute dtype per layer as it
    runs; every other tensor (norms, modulation tables, the patch embedding, biases, F16/BF16/F32 tensors) is
    dequantized to its target dtype at load. ``"dequantize"``: everything dequantized at load (dense model).

    ``keep_stored_dtype``: floating tensors keep the file's dtype (bf16 stays bf16 under an fp32 ``torch_dtype``; the
    float32 islands are float32 as always) for a model whose blocks are cast while they run
    (:func:`chronoedit.streaming.stream_blocks`). ``mmap`` (safetensors files): tensors kept in the file's dtype
    are views of the memory-mapped file rather than copies (:mod:`chronoedit.mapped`)."""
    if quantized not in QUANTIZED_MODES:
        raise UserError(f"quantized must be one of {QUANTIZED_MODES}, got {quantized!r}")
    source = transformer_source(path, subfolder, config)
    dtype = torch_dtype or torch.float32
    with torch.device("meta"):
        model = ChronoEditTransformer3DModel(source.config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    seen: set[str] = set()
    for file in source.files:
        for key, tensor in iter_weights(file, device, mmap):
            name = source.weight_name(key, file)
            if name is None:
                continue
            check_tensor(name, tensor, expected, file)
            wanted = target_dtype(name, dtype)
            if keep_stored_dtype and not keeps_fp32(name) and tensor.dtype in STORED_FLOAT_DTYPES:
                wanted = tensor.dtype
            place_weight(model, name, as_qtensor(tensor, source.scales.get(name)), wanted, quantized)
            seen.add(name)
    check_complete(expected, seen, path)
    return model.eval().requires_grad_(False)


def iter_weights(path: Path, device: str | torch.device = "cpu",
                 mmap: bool = False) -> Iterator[tuple[str, torch.Tensor | QTensor]]:  # fmt: skip
    """(key, tensor) from a safetensors file (views of the mapped file with ``mmap`` on the CPU); (key, QTensor) from
    a GGUF file (raw blocks, not dequantized)."""
    if path.suffix.lower() == GGUF_SUFFIX:
        from .quant.gguf import iter_gguf

        yield from iter_gguf(path, device)
    elif mmap and torch.device(device).type == "cpu":
        from .mapped import mapped_tensors

        yield from mapped_tensors(path)
    else:
        yield from iter_safetensors(path, device)


def as_qtensor(tensor: torch.Tensor | QTensor, scale: torch.Tensor | None) -> torch.Tensor | QTensor:
    """fp8 tensors (with their scale) as a QTensor; GGUF QTensors and ordinary tensors unchanged."""
    if isinstance(tensor, torch.Tensor) and tensor.dtype in FP8_DTYPES:
        return from_fp8(tensor, scale)
    return tensor


def place_weight(
    model: torch.nn.Module, name: str, tensor: torch.Tensor | QTensor, dtype: torch.dtype, quantized: str
) -> None:
    """Put one loaded tensor in the model: a quantized Linear weight (fp8 or GGUF blocks) as a QuantizedLinear
    when ``quantized == "keep"``; anything else dequantized / cast to ``dtype`` in place of the meta tensor."""
    if isinstance(tensor, QTensor):
        if quantized == "keep" and not tensor.is_float and is_linear_weight(model, name):
            replace_linear(model, name, tensor, dtype)
            return
        tensor = tensor.dequantize(dtype if tensor.is_float else torch.float32)
    assign_tensor(model, name, tensor.to(dtype))


def is_linear_weight(model: torch.nn.Module, name: str) -> bool:
    """Whether ``name`` is the ``weight`` of an ``nn.Linear`` of ``model``."""
    module_name, _, leaf = name.rpartition(".")
    return leaf == "weight" and isinstance(model.get_submodule(module_name), torch.nn.Linear)


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors (or GGUF) header, without reading the tensors."""
    check_regular(path, "weights")
    if path.suffix.lower() == GGUF_SUFFIX:
        from .quant.gguf import gguf_shapes

        return gguf_shapes(path)
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError) as err:
        raise UserError(f"cannot read weights {path}: truncated or corrupt safetensors file ({err})") from err


def read_fp8_scales(files: list[Path], rename: Any) -> dict[str, torch.Tensor]:
    """Per-tensor fp8 scales (ComfyUI ``<module>.scale_weight``), keyed by our weight name."""
    from safetensors import safe_open

    scales: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix.lower() == GGUF_SUFFIX:
            continue
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                if key.endswith(FP8_SCALE_SUFFIXES):
                    module = key.rsplit(".", 1)[0]
                    name = rename(module + ".weight")
                    if name is not None:
                        scales[name] = handle.get_tensor(key).float()
    return scales


def check_tensor(key: str, tensor: torch.Tensor, expected: dict[str, tuple[int, ...]], file: Path) -> None:
    """Raise a UserError for a key the model does not have or a tensor of the wrong shape."""
    if key not in expected:
        raise UserError(f"unexpected key {key!r} in {file}: the model built from config.json has no such weight")
    if tuple(tensor.shape) != expected[key]:
        raise UserError(
            f"weight {key!r} in {file} has shape {tuple(tensor.shape)} but config.json implies {expected[key]}"
        )


def check_complete(expected: Iterable[str], seen: set[str], path: Any) -> None:
    """Raise a UserError when the files of ``path`` lacked a weight the config needs."""
    missing = sorted(set(expected) - seen)
    if missing:
        raise UserError(
            f"transformer weights in {path} lack {len(missing)} key(s) the config needs, e.g. {missing[0]!r}"
        )


def assign_tensor(model: torch.nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in place of the (meta) parameter or buffer named ``key``, without copying it."""
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


def load_pipeline_components(
    path_or_repo_id: str | os.PathLike[str], torch_dtype: torch.dtype = torch.float32, **given: Any
) -> dict[str, Any]:
    """Every component of a diffusers-layout ChronoEdit folder; those in ``given`` are used instead of loading.

    The transformer is always ours (the real folder names Wan classes). VAE and CLIP load in float32 (as NVIDIA runs
    them); UMT5 and the transformer in ``torch_dtype``.
    """
    root = resolve_checkpoint(path_or_repo_id)
    for name in COMPONENTS:  # fail fast, before minutes of loading the 14B's other parts
        if given.get(name) is None:
            component_dir(root, name)
    loaders = {
        "tokenizer": lambda: _load_with("tokenizer", root, _tokenizer),
        "text_encoder": lambda: _load_with("text_encoder", root, lambda d: _text_encoder(d, torch_dtype)),
        "image_encoder": lambda: _load_with("image_encoder", root, _image_encoder),
        "image_processor": lambda: _load_with("image_processor", root, _image_processor),
        "vae": lambda: _load_with("vae", root, _vae),
        "scheduler": lambda: _load_with("scheduler", root, _scheduler),
        "transformer": lambda: load_transformer(root, subfolder="transformer", torch_dtype=torch_dtype),
    }
    for option in sorted(set(given) & DIFFUSERS_LOADING_OPTIONS):
        logger.info("from_pretrained: ignoring diffusers option %s=%r", option, given.pop(option))
    unknown = set(given) - set(loaders)
    if unknown:
        raise UserError(f"unknown pipeline component(s): {sorted(unknown)}")
    return {name: given[name] if given.get(name) is not None else load() for name, load in loaders.items()}


def component_bytes(path_or_repo_id: str | os.PathLike[str], torch_dtype: torch.dtype,
                    mapped_transformer: bool = False) -> dict[str, int]:  # fmt: skip
    """Bytes each weight-holding component takes once loaded (from the files' headers; the transformer and UMT5 in
    ``torch_dtype``, CLIP and the VAE in float32); a memory-mapped transformer counts 0."""
    root = resolve_checkpoint(path_or_repo_id)
    sizes = {}
    for name in ("transformer", "text_encoder", "image_encoder", "vae"):
        dtype = torch_dtype if name in ("transformer", "text_encoder") else torch.float32
        folder = root / name
        sizes[name] = 0 if name == "transformer" and mapped_transformer else _numel(folder) * dtype.itemsize
    return sizes


LAZY_COMPONENTS = ("text_encoder", "image_encoder", "vae")  # what low-memory mode builds per stage


def lazy_components(
    path_or_repo_id: str | os.PathLike[str], torch_dtype: torch.dtype = torch.float32, names: Any = LAZY_COMPONENTS
) -> dict[str, LazyComponent]:
    """Low-memory mode's stand-ins for ``names`` (UMT5, CLIP, the VAE): each built from its folder when its stage
    starts (dtypes as :func:`load_pipeline_components` loads them) and dropped when it ends; their configs and sizes
    read now from the folders' headers, no weight loaded."""
    root = resolve_checkpoint(path_or_repo_id)
    out = {}
    for name in names:
        folder = component_dir(root, name)
        dtype = torch_dtype if name == "text_encoder" else torch.float32
        config = None
        if name == "vae":
            from diffusers import AutoencoderKLWan
            from diffusers.configuration_utils import FrozenDict

            config = FrozenDict(AutoencoderKLWan.load_config(folder))
        out[name] = LazyComponent(name, functools.partial(load_component, root, name, dtype), config=config,
                                  nbytes=_numel(folder) * dtype.itemsize, dtype=dtype)  # fmt: skip
    return out


def _numel(folder: Path) -> int:
    """Elements of every tensor in a component folder's safetensors files (headers only)."""
    files = sorted(folder.glob("*.safetensors"))
    return sum(math.prod(shape) for file in files for shape in read_shapes(file).values())


def load_component(path_or_repo_id: str | os.PathLike[str], name: str, torch_dtype: torch.dtype = torch.float32) -> Any:
    """One component (tokenizer, text_encoder, image_encoder, image_processor, vae, scheduler) of a diffusers-layout
    folder, alone: for callers that load, use and release the encoders one at a time (training's cache).
    Dtypes as in :func:`load_pipeline_components` (``torch_dtype`` applies to the text encoder only)."""
    loaders = {
        "tokenizer": _tokenizer,
        "text_encoder": lambda d: _text_encoder(d, torch_dtype),
        "image_encoder": _image_encoder,
        "image_processor": _image_processor,
        "vae": _vae,
        "scheduler": _scheduler,
    }
    if name not in loaders:
        raise ValueError(f"unknown pipeline component {name!r}: one of {sorted(loaders)}")
    return _load_with(name, resolve_checkpoint(path_or_repo_id), loaders[name])


def _load_with(name: str, root: Path, load: Any) -> Any:
    """Run a library loader on one component folder, turning its errors into one line naming the component."""
    folder = component_dir(root, name)
    for path in sorted(folder.glob("*.json")):
        read_json(path)  # name a corrupt config file; the libraries' JSON errors carry no path
    from safetensors import SafetensorError

    try:
        return load(folder)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load {name} from {folder}: {first}") from err


def _tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _text_encoder(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import UMT5EncoderModel

    return UMT5EncoderModel.from_pretrained(folder, dtype=dtype).eval().requires_grad_(False)


def load_text_encoder_mapped(path_or_repo_id: str | os.PathLike[str]) -> torch.nn.Module:
    """UMT5 with every tensor a view of its memory-mapped safetensors files, in the dtype they are stored in (for
    :func:`chronoedit.streaming.stream_blocks`): nothing is copied into process memory at load."""
    from transformers import UMT5Config, UMT5EncoderModel

    from .mapped import mapped_tensors

    folder = component_dir(resolve_checkpoint(path_or_repo_id), "text_encoder")
    config = UMT5Config.from_dict(read_json(folder / "config.json"))
    index = folder / "model.safetensors.index.json"
    files = sorted({folder / name for name in read_json(index).get("weight_map", {}).values()}) \
        if index.is_file() else [folder / "model.safetensors"]  # fmt: skip
    state = {key: tensor for file in files for key, tensor in mapped_tensors(file)}
    state.setdefault("encoder.embed_tokens.weight", state.get("shared.weight"))
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    missing = sorted(set(model.state_dict()) - {k for k, v in state.items() if v is not None})
    if missing:
        raise UserError(f"text encoder weights in {folder} lack {len(missing)} key(s), e.g. {missing[0]!r}")
    model.load_state_dict({k: state[k] for k in model.state_dict()}, assign=True)
    model.encoder.embed_tokens.weight = model.shared.weight  # tied: one table, looked up by both names
    return model.eval().requires_grad_(False)


def _image_encoder(folder: Path) -> torch.nn.Module:
    from transformers import CLIPVisionModel

    return CLIPVisionModel.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)


def _image_processor(folder: Path) -> Any:
    try:  # transformers 5: the PIL implementation, what NVIDIA's runs used (no torchvision needed, no warning)
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers 4: CLIPImageProcessor is the PIL implementation
        from transformers import CLIPImageProcessor as Processor
    return Processor.from_pretrained(folder)


def _vae(folder: Path) -> torch.nn.Module:
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(folder, torch_dtype=torch.float32).eval().requires_grad_(False)


def _scheduler(folder: Path) -> Any:
    import diffusers

    config = read_json(folder / "scheduler_config.json")
    cls = getattr(diffusers, str(config.get("_class_name", "UniPCMultistepScheduler")), None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise UserError(f"unknown scheduler class {config.get('_class_name')!r}")
    return cls.from_pretrained(folder)
