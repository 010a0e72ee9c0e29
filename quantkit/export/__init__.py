"""Export quantized models (GPTQ v1/v2, compressed-tensors, fake-quant) and load them back: writer.py (the one
writer), reader.py, load.py (load_quantized), spool.py (memory or disk, one shard layout), formats/ (one file per
format), streamed.py (a low-memory run's export), card.py and hub.py."""

from __future__ import annotations

from quantkit.export.common import Checkpoint, Layout
from quantkit.export.formats import FORMATS, Format, default_format, format_for
from quantkit.export.load import dense_state, load_quantized
from quantkit.export.reader import read_checkpoint
from quantkit.export.writer import save_quantized, write_checkpoint, write_checkpoint_streamed

__all__ = [
    "FORMATS",
    "Checkpoint",
    "Format",
    "Layout",
    "default_format",
    "dense_state",
    "format_for",
    "load_quantized",
    "read_checkpoint",
    "save_quantized",
    "write_checkpoint",
    "write_checkpoint_streamed",
]
