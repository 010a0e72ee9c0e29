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
from quantkit.export.common import FORMATS, default_format

__all__ = [
    "FORMATS",
    "Checkpoint",
    "default_format",
    "dense_state",
    "load_quantized",
    "read_checkpoint",
    "save_quantized",
    "write_checkpoint",
]
