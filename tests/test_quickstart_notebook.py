"""Execute notebooks/quickstart.ipynb with nbclient: quantize with the API, reload the export with plain
transformers, evaluate, push to a dry-run hub client."""

from __future__ import annotations

import re
from pathlib import Path

from helpers import execute_notebook

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def number(pattern: str, text: str) -> float:
    """The number the notebook printed after `pattern`."""
    found = re.search(pattern + r"\s*([-+0-9.e]+)", text)
    assert found, f"{pattern!r} not in the notebook's output:\n{text}"
    return float(found.group(1))


def test_quickstart_notebook(tmp_path, monkeypatch) -> None:
    """Transformers' loading of the export gives quantkit's logits; TLQ at 4 bits stays closer to the FP loss
    than RTN; the push uploads the whole export with its model card."""
    text = execute_notebook(NOTEBOOK, tmp_path, monkeypatch, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    # transformers decodes the compressed-tensors export with its own code: an independent reading of the bytes
    assert number(r"max \|logit difference\| [0-9.e+-]+ \(relative", text) <= 1e-4
    assert "tlq W4 g32 -> compressed-tensors" in text
    fp = number(r"FP: loss", text)
    tlq, rtn = number(r"W4 TLQ \(reloaded\)\s+loss", text), number(r"W4 RTN\s+loss", text)
    assert fp < 2.5  # the stand-in model learned its text (a uniform guess over its 256 tokens is 5.5)
    assert abs(tlq - fp) < 0.01 and fp < rtn < fp + 0.1
    assert abs(tlq - fp) < (rtn - fp) / 2  # TLQ's calibration is worth something over rounding
    upload = re.search(r"\[dry run\] upload to your-name/tiny-llama-w4-tlq: (.*)", text)
    assert upload, text
    uploaded = set(upload.group(1).split(", "))
    assert {"README.md", "config.json", "model.safetensors", "quantkit.json", "tokenizer.json"} <= uploaded
    assert "pushed to https://huggingface.co/your-name/tiny-llama-w4-tlq" in text
    assert "library_name: quantkit" in text and "method: tlq" in text
