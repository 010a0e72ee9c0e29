"""The fault battery's thirteenth round (benchmarks/fault_round13.py): inputs that went through quietly or failed
after the work, each now refused as tests/test_faults.py asserts (exit code 2, one `error:` line naming what was
wrong, nothing changed under the folder), and in the words the sibling command already used for the same input.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import (
    WORDS,
    save_tiny_llama,
    unchanged,
    write_text,
)

import quantkit


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny Llama of 64 positions and its text, shared read-only."""
    root = tmp_path_factory.mktemp("round13")
    return {"model": save_tiny_llama(root / "model"), "text": write_text(root / "text.txt")}


def test_a_dataset_row_of_none_is_refused_as_in_a_list(made: dict, tmp_path: Path) -> None:
    """quantize(data=Dataset({'text': [t0, None, t1]})) dropped the None row unseen and calibrated on the rest;
    the same texts as a list were refused. Both now say the same line, naming the row."""
    datasets = pytest.importorskip("datasets")
    texts = [" ".join(WORDS[i:i + 20]) for i in range(3)]
    texts[1] = None
    lines = []
    for data in (texts, datasets.Dataset.from_dict({"text": texts})):
        with unchanged(tmp_path), pytest.raises(quantkit.QuantkitError) as caught:
            quantkit.quantize(str(made["model"]), data=data, method="rtn", nsamples=2, seqlen=16, group_size=32,
                              output_dir=tmp_path / "out", progress=False)
        lines.append(str(caught.value))
    assert lines[0] == lines[1] and "holds NoneType items (record 2)" in lines[0], lines
