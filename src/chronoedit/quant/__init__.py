"""Quantized transformer weights kept quantized in memory: fp8 (ComfyUI ``fp8_e4m3fn`` / ``fp8_scaled``) and GGUF
(city96-style Q8_0, Q4_0/1, Q5_0/1, Q2_K..Q6_K, plus F16/BF16/F32 tensors).

- :mod:`.qtensor`: :class:`QTensor` (raw bytes + type + logical shape [+ fp8 scale]) and :func:`dequantize`;
- :mod:`.ggml`: the GGML block formats dequantized in torch (CPU or GPU);
- :mod:`.gguf`: reading GGUF headers and tensors (needs the optional ``gguf`` package);
- :mod:`.layers`: :class:`QuantizedLinear` (an ``nn.Linear`` whose weight is dequantized per call) and
  :func:`quantize_model_linears`.

``chronoedit.loading.load_transformer(path, quantized="keep")`` uses all of this for ``.gguf`` files and fp8
safetensors. The model code (``chronoedit.model``) knows nothing about quantization, and this package imports no model
code: which layers compute in float32 is the caller's to say (``keep_fp32=`` of :func:`quantize_model_linears`, the
per-weight dtype of :func:`replace_linear`). A bad file raises :class:`chronoedit.errors.UserError` naming it.
"""

from __future__ import annotations

from .layers import (
    FUSE_ERROR,
    QuantizedLinear,
    ReadOnlyWeight,
    quantize_model_linears,
    quantized_linears,
    replace_linear,
)
from .qtensor import FLOAT_TYPES, FP8_TYPES, GGML_SIZES, SUPPORTED_QTYPES, QTensor, dequantize, from_fp8

__all__ = [
    "FLOAT_TYPES",
    "FP8_TYPES",
    "FUSE_ERROR",
    "GGML_SIZES",
    "SUPPORTED_QTYPES",
    "QTensor",
    "QuantizedLinear",
    "ReadOnlyWeight",
    "dequantize",
    "from_fp8",
    "quantize_model_linears",
    "quantized_linears",
    "replace_linear",
]
