"""The fault battery's twentieth round (benchmarks/fault_round20.py), its small data-door faults: chat and
image-text JSONL paths did not expand ~ (the text reader does); a None row of an hf: dataset was dropped without a
word (the API refuses such a record by number); hf:DIR::test of a Dataset without splits read the whole Dataset; a
save_to_disk folder whose path holds ':' given as a plain path was split as an hf: spec; a dataset with an 'image'
column was read as its text alone. Each refusal is as
tests/test_faults.py asserts (exit code 2, one `error:` line, nothing left behind).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import WORDS, assert_fault, save_tiny_llama

TEXTS = [" ".join(WORDS[(7 * i + j) % 60] for j in range(40)) for i in range(6)]


def _saved(folder: Path, texts: list) -> Path:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(folder))
    return folder


def test_a_none_row_of_a_dataset_is_refused_by_row(tmp_path: Path) -> None:
    folder = _saved(tmp_path / "ds", [TEXTS[0], None, TEXTS[1]])
    import datasets

    assert datasets.load_from_disk(str(folder))["text"][1] is None  # the reference: datasets' own reading
    model = save_tiny_llama(tmp_path / "m")
    assert_fault(tmp_path, ["calibrate", model, "--calib", f"hf:{folder}", "--method", "rtn", "--nsamples", "2",
                            "--seqlen", "16", "--group-size", "16", "-o", tmp_path / "out"],
                 "row 2 of column 'text' is NoneType, not text")


def test_a_split_of_a_dataset_without_splits_is_refused(tmp_path: Path) -> None:
    folder = _saved(tmp_path / "ds", TEXTS)
    import datasets

    assert isinstance(datasets.load_from_disk(str(folder)), datasets.Dataset)  # the reference: no splits in it
    from quantkit.data.sources import load_hf
    from quantkit.errors import QuantkitError

    with pytest.raises(QuantkitError, match="one Dataset without splits, so it has no split 'test'"):
        load_hf(f"hf:{folder}::test")
    assert load_hf(f"hf:{folder}") == TEXTS


def test_a_dataset_folder_named_with_a_colon_is_read_as_a_path(tmp_path: Path) -> None:
    folder = _saved(tmp_path / "a:b", TEXTS)
    import datasets

    from quantkit.data.sources import load_texts

    assert load_texts(str(folder)) == datasets.load_from_disk(str(folder))["text"]  # the reference: datasets' rows


def test_chat_and_image_jsonl_paths_expand_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """~/c.jsonl was 'cannot read ~/c.jsonl' for chat and image-text records, while ~/text.txt is read."""
    monkeypatch.setenv("HOME", str(tmp_path))
    chats = [{"messages": [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]}] * 2
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(c) for c in chats) + "\n")
    (tmp_path / "img.png").write_bytes(b"")
    (tmp_path / "i.jsonl").write_text(json.dumps({"image": "img.png", "text": "w1"}) + "\n")
    from quantkit.data.chat import read_chat_records
    from quantkit.data.images import read_image_records

    assert [r for _, r in read_chat_records("~/c.jsonl")] == chats  # the reference: the records written
    [(_, record, image)] = read_image_records("~/i.jsonl")
    assert record["image"] == "img.png" and image == tmp_path / "img.png"


def test_a_dataset_with_an_image_column_is_refused_as_text(tmp_path: Path) -> None:
    """hf: sources are read as text: its images were dropped and the captions calibrated on alone (exit 0)."""
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": TEXTS[:3], "image": ["x.png"] * 3}).save_to_disk(str(folder))
    assert "image" in datasets.load_from_disk(str(folder)).column_names  # the reference: the column is there
    model = save_tiny_llama(tmp_path / "m")
    assert_fault(tmp_path, ["calibrate", model, "--calib", f"hf:{folder}", "--method", "rtn", "--nsamples", "2",
                            "--seqlen", "16", "--group-size", "16", "-o", tmp_path / "out"],
                 "has an 'image' column, and an hf: source is read as text only")
