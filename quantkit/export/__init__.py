"""Export quantized models (GPTQ v1/v2, compressed-tensors, fake-quant) and load them back."""

from __future__ import annotations

from quantkit.export.checkpoint import (
    Checkpoint,
    dense_state,
    load_quantized,
    read_checkpoint,
    save_quantized,
    write_checkpoint,
)
from quantkit.export.formats import FORMATS, Format, default_format, format_for

__all__ = [
    "FORMATS",
    "Checkpoint",
    "Format",
    "default_format",
    "dense_state",
    "format_for",
    "load_quantized",
    "read_checkpoint",
    "save_quantized",
    "write_checkpoint",
]
