"""Calibration and evaluation data: text sources, parts (train/heldout) and seeded token windows."""

from quantkit.data.samples import (
    calibration_samples,
    draw_windows,
    resolve_texts,
    tokenize_documents,
)
from quantkit.data.sources import (
    PARTS,
    load_hf,
    load_texts,
    load_texts_by_source,
    read_jsonl,
    split_part,
)

__all__ = [
    "PARTS",
    "calibration_samples",
    "draw_windows",
    "load_hf",
    "load_texts",
    "load_texts_by_source",
    "read_jsonl",
    "resolve_texts",
    "split_part",
    "tokenize_documents",
]
