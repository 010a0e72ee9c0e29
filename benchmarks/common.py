"""Helpers shared by the benchmarks; torch-only so that other tools' venvs can import them too."""

from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
import tempfile
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


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (NaN with one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def heldout_windows(tokenizer, seqlen: int, eval_tokens: int) -> torch.Tensor:
    """[count, seqlen] consecutive windows of the corpora's held-out stream."""
    from quantkit.data import resolve_texts, tokenize_documents

    ids = tokenize_documents(resolve_texts(str(TEXT_DIR), part="heldout"), tokenizer)
    count = min(eval_tokens // seqlen, ids.numel() // seqlen)
    return ids[: count * seqlen].reshape(count, seqlen)


def run_llmc_runner(python: str, runner: Path, model_dir: str, calib: torch.Tensor, evaluation: torch.Tensor,
                    args: list[str]) -> dict:
    """Run an llm-compressor runner script in its own venv on these calibration/eval windows; its LLMC_RESULT."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "windows.safetensors"
        save_file({"calib": calib.contiguous(), "eval": evaluation.contiguous()}, str(path))
        done = subprocess.run([python, str(runner), "--model", model_dir, "--windows", str(path), *args],
                              capture_output=True, text=True,
                              env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    line = next((x for x in done.stdout.splitlines() if x.startswith("LLMC_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"llm-compressor failed: {done.stderr[-2000:]}")
    return json.loads(line[len("LLMC_RESULT "):])

