"""Helpers shared by the benchmarks; torch-only so that other tools' venvs can import them too."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
REF_LM = SHARED / "models" / "ref-lm"
TEXT_DIR = SHARED / "data" / "text"


@torch.no_grad()
def mean_cross_entropy(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats) of `model` over token windows [n, L]."""
    total, count = 0.0, 0
    for row in windows:
        ids = row.unsqueeze(0)
        logits = model(input_ids=ids).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return total / count


def environment() -> dict:
    """Versions and machine facts recorded with every benchmark's JSON."""
    import os

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }


def emit(result: dict, path: str | None = None) -> None:
    """Print the benchmark's JSON on stdout (and write it to `path` if given)."""
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
