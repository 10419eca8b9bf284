"""Attention backends by name: ``--attention NAME`` -> the backend of diffusers' attention dispatcher.

``sdpa`` (the default) is PyTorch's ``scaled_dot_product_attention`` called directly, as without this option: the
same numbers bit for bit. The others route the model's attention through
``diffusers.models.attention_dispatch.dispatch_attention_fn`` with the backend named here:

- ``sdpa-math`` / ``sdpa-flash`` / ``sdpa-efficient`` / ``sdpa-cudnn``: PyTorch SDPA held to one kernel;
- ``flash`` (flash-attn 2), ``flash3`` (flash-attn 3), ``sage`` (SageAttention), ``xformers``: their packages, CUDA;
- ``flex``: PyTorch's flex attention.

Backends that download hub kernels are not offered (nothing downloads while editing). A name is checked — its
package installed, its device the model's — by :func:`check_attention` before the model loads, and a missing one is
a one-line :class:`~chronoedit.errors.UserError`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from ..errors import UserError

FIELD = "attention"
DEFAULT = "sdpa"


@dataclass(frozen=True)
class _Backend:
    dispatcher: str | None  # diffusers' AttentionBackendName value (None: our direct SDPA call)
    package: str | None = None  # the import name the backend needs
    install: str | None = None  # how to install it
    cuda: bool = False  # needs a CUDA device


BACKENDS = {
    "sdpa": _Backend(None),
    "sdpa-math": _Backend("_native_math"),
    "sdpa-flash": _Backend("_native_flash", cuda=True),
    "sdpa-efficient": _Backend("_native_efficient", cuda=True),
    "sdpa-cudnn": _Backend("_native_cudnn", cuda=True),
    "flash": _Backend("flash", "flash_attn", "pip install flash-attn", cuda=True),
    "flash3": _Backend("_flash_3", "flash_attn_interface", "build flash-attn 3 from source", cuda=True),
    "sage": _Backend("sage", "sageattention", "pip install sageattention", cuda=True),
    "xformers": _Backend("xformers", "xformers", "pip install xformers", cuda=True),
    "flex": _Backend("flex"),
}
ATTENTION_NAMES = tuple(BACKENDS)


def parse_attention(text: str | None) -> str:
    """A backend name (case and ``_``/``-`` free) -> its canonical name; None / ``""`` -> ``sdpa``."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return DEFAULT
    name = text.strip().lower().replace("_", "-") if isinstance(text, str) else None
    if name not in BACKENDS:
        raise UserError(f"{{attention}} must be one of {', '.join(ATTENTION_NAMES)}, got {text!r}", FIELD)
    return name


def dispatcher_backend(name: str) -> str | None:
    """The diffusers dispatcher backend for a canonical name (None for ``sdpa``: the direct call)."""
    return BACKENDS[parse_attention(name)].dispatcher


def check_attention(name: str | None, device: str) -> str:
    """The canonical name, once its package is installed and ``device`` is one it runs on; a one-line UserError
    naming ``{attention}`` otherwise. Checks the package without importing it (and diffusers' own version
    requirements only for non-default backends)."""
    name = parse_attention(name)
    backend = BACKENDS[name]
    if backend.dispatcher is None:
        return name
    if backend.package is not None and importlib.util.find_spec(backend.package) is None:
        raise UserError(f"{{attention}} {name} needs the {backend.package} package, not installed "
                        f"({backend.install})", FIELD)  # fmt: skip
    if backend.cuda and not device.startswith("cuda"):
        raise UserError(f"{{attention}} {name} needs a CUDA device, not {device} (use {{attention}} sdpa)", FIELD)
    _check_dispatcher(name, backend.dispatcher)
    return name


def _check_dispatcher(name: str, dispatcher: str) -> None:
    """diffusers' own check of the backend's package version, as a one-line UserError."""
    from diffusers.models import attention_dispatch as dispatch

    registered = {str(getattr(b, "value", b)) for b in dispatch._AttentionBackendRegistry.list_backends()}
    if dispatcher not in registered:
        raise UserError(f"{{attention}} {name} is not available in this diffusers version", FIELD)
    try:
        dispatch._check_attention_backend_requirements(dispatch.AttentionBackendName(dispatcher))
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{{attention}} {name}: {first}", FIELD) from None
