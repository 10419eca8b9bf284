"""Regional ``torch.compile``: each transformer block compiled in place (``nn.Module.compile``).

All blocks run the same ``TransformerBlock.forward`` and, with Dynamo's inlining of built-in modules (torch >= 2.5,
the default), their parameters are graph inputs rather than guarded constants: the first block compiles and every
other block reuses that graph. A new graph is made only when the shapes change (a CFG batch of 2 after a batch of
1, the reasoning drop's shorter video), so a 50-step edit compiles once or twice, not once per step or per block.
The compile time is paid on the first forward (see ``benchmarks/`` for its cost against the saving).
"""

from __future__ import annotations

import importlib.util
import shutil
from typing import Any

from ..errors import UserError

FIELD = "compile"


def compile_blocks(transformer: Any, **options: Any) -> int:
    """Compile each of ``transformer.blocks`` in place with ``torch.compile`` ``options`` (default: inductor,
    ``fullgraph=False``); returns how many. Eager again with :func:`uncompile_blocks`."""
    for block in transformer.blocks:
        block.compile(**options)
    return len(transformer.blocks)


def uncompile_blocks(transformer: Any) -> None:
    """Undo :func:`compile_blocks`: the blocks run eagerly again (the compiled graphs stay in Dynamo's cache)."""
    for block in transformer.blocks:
        block._compiled_call_impl = None


def check_compile(device: str) -> None:
    """``--compile`` needs a C++ compiler on the CPU (inductor builds its kernels with it); a one-line UserError
    naming ``{compile}`` otherwise. On CUDA, inductor's Triton kernels need the ``triton`` package."""
    if device.startswith("cuda"):
        if importlib.util.find_spec("triton") is None:
            raise UserError("{compile} on CUDA needs the triton package, not installed (pip install triton)", FIELD)
    elif not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        raise UserError("{compile} on the CPU needs a C++ compiler (g++ or clang++), none found on PATH", FIELD)
