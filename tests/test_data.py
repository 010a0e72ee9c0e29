"""Text sources, parts and calibration windows (quantkit.data)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import char_ids, char_tokenizer

from quantkit.data import calibration_samples, load_texts, split_part
from quantkit.errors import QuantkitError

SHARED = Path(__file__).resolve().parents[2] / "shared"




@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ sources


def test_txt_file_is_one_document(tmp_path):
    f = write(tmp_path / "a.txt", "line one\nline two\n")
    assert load_texts(f) == ["line one\nline two\n"]
    assert load_texts(str(f)) == ["line one\nline two\n"]


def test_parts_split_each_file_at_90_percent(tmp_path):
    a = "a" * 95 + "B" * 5 + "x" * 100  # 200 chars: heldout = last 20
    b = "0123456789" * 3  # 30 chars: heldout = last 3
    write(tmp_path / "d" / "a.txt", a)
    write(tmp_path / "d" / "b.txt", b)
    d = tmp_path / "d"
    assert load_texts(d, part="heldout") == [a[180:], b[27:]]
    assert load_texts(d, part="train") == [a[:180], b[:27]]
    assert load_texts(d) == [a, b]


def test_split_part_cuts_across_documents():
    docs = ["x" * 50, "y" * 30, "z" * 20]  # 100 chars: heldout = last 10 -> inside the last doc
    assert split_part(docs, "heldout") == ["z" * 10]
    assert split_part(docs, "train") == ["x" * 50, "y" * 30, "z" * 10]
    docs = ["x" * 95, "y" * 5]  # the cut falls inside the first doc
    assert split_part(docs, "heldout") == ["x" * 5, "y" * 5]
    with pytest.raises(QuantkitError, match="part must be one of"):
        split_part(docs, "test")


def test_directory_sorted_recursive_txt_and_jsonl_only(tmp_path):
    write(tmp_path / "b.txt", "B")
    write(tmp_path / "a.txt", "A")
    write(tmp_path / "sub" / "c.jsonl", json.dumps({"text": "C1"}) + "\n\n" + json.dumps({"text": "C2"}) + "\n")
    write(tmp_path / "notes.md", "ignored")
    write(tmp_path / "empty.txt", "")
    assert load_texts(tmp_path) == ["A", "B", "C1", "C2"]


def test_glob_and_comma_list(tmp_path):
    write(tmp_path / "x1.txt", "one")
    write(tmp_path / "x2.txt", "two")
    write(tmp_path / "y.jsonl", json.dumps({"text": "three"}) + "\n")
    assert load_texts(str(tmp_path / "x*.txt")) == ["one", "two"]
    assert load_texts(f"{tmp_path / 'y.jsonl'},{tmp_path / 'x1.txt'}") == ["three", "one"]
    assert load_texts([tmp_path / "x2.txt", str(tmp_path / "x1.txt")]) == ["two", "one"]
    with pytest.raises(QuantkitError, match="no files match"):
        load_texts(str(tmp_path / "nothing*.txt"))


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    f = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(QuantkitError, match=r"bad\.jsonl:3: invalid JSON"):
        load_texts(f)
    g = write(tmp_path / "nofield.jsonl", '{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(QuantkitError, match=r"nofield\.jsonl:2: no 'text' field"):
        load_texts(g)
    h = write(tmp_path / "num.jsonl", '{"text": 5}\n')
    with pytest.raises(QuantkitError, match=r"num\.jsonl:1: field 'text' is int"):
        load_texts(h)


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(QuantkitError, match="not found"):
        load_texts(tmp_path / "nope.txt")
    empty = write(tmp_path / "empty.txt", "")
    with pytest.raises(QuantkitError, match="empty"):
        load_texts(empty)
    write(tmp_path / "d" / "blank.txt", "  \n")
    with pytest.raises(QuantkitError, match="no text found"):
        load_texts(tmp_path / "d")
    (tmp_path / "e").mkdir()
    with pytest.raises(QuantkitError, match=r"no \.txt or \.jsonl"):
        load_texts(tmp_path / "e")
    with pytest.raises(QuantkitError, match="no data source"):
        load_texts("")
    with pytest.raises(QuantkitError, match="not UTF-8"):
        (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
        load_texts(tmp_path / "bin.txt")


def test_missing_datasets_package_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(QuantkitError, match=r"pip install quantkit\[datasets\]"):
        load_texts("hf:wikitext:wikitext-2-raw-v1:test")


def test_local_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the `datasets` extra is not installed")
    ds = datasets.Dataset.from_dict({"text": ["alpha", "", "beta"], "body": ["x", "y", "z"]})
    ds.save_to_disk(str(tmp_path / "single"))
    assert load_texts(tmp_path / "single") == ["alpha", "beta"]
    assert load_texts(f"hf:{tmp_path / 'single'}") == ["alpha", "beta"]
    assert load_texts(f"hf:{tmp_path / 'single'}:::body") == ["x", "y", "z"]
    dd = datasets.DatasetDict({"train": ds, "validation": datasets.Dataset.from_dict({"text": ["gamma"]})})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert load_texts(f"hf:{tmp_path / 'dict'}") == ["alpha", "beta"]
    assert load_texts(f"hf:{tmp_path / 'dict'}::validation") == ["gamma"]
    with pytest.raises(QuantkitError, match="no split 'test'"):
        load_texts(f"hf:{tmp_path / 'dict'}::test")
    with pytest.raises(QuantkitError, match="no column 'content'"):
        load_texts(f"hf:{tmp_path / 'single'}:::content")
    with pytest.raises(QuantkitError, match="takes no config"):
        load_texts(f"hf:{tmp_path / 'single'}:cfg")


# ------------------------------------------------------------------ calibration windows


def test_windows_are_seeded_slices_of_the_eos_joined_stream(tmp_path, tok):
    docs = ["The quick brown fox. " * 6, "Jumps over the lazy dog! " * 5]
    stream = char_ids(docs[0]) + [0] + char_ids(docs[1])  # joined by eos (id 0)
    samples = calibration_samples(docs, tok, nsamples=6, seqlen=16, seed=3)
    assert len(samples) == 6
    starts = []
    for s in samples:
        assert set(s) == {"input_ids"}
        ids = s["input_ids"]
        assert ids.dtype == torch.long and ids.shape == (1, 16)
        row = ids[0].tolist()
        hits = [i for i in range(len(stream) - 15) if stream[i : i + 16] == row]
        assert hits, "a window is not a slice of the token stream"
        starts.append(hits[0])
    assert len(set(starts)) == 6  # distinct starts
    again = calibration_samples(docs, tok, nsamples=6, seqlen=16, seed=3)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(samples, again))
    other = calibration_samples(docs, tok, nsamples=6, seqlen=16, seed=4)
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(samples, other))


def test_source_and_part_for_samples(tmp_path, tok):
    text = "".join(chr(97 + i % 26) for i in range(400))
    f = write(tmp_path / "c.txt", text)
    held = calibration_samples(f, tok, nsamples=2, seqlen=20, seed=0, part="heldout")
    stream = char_ids(text[360:])
    for s in held:
        row = s["input_ids"][0].tolist()
        assert any(stream[i : i + 20] == row for i in range(len(stream) - 19))


def test_windows_of_several_files_carry_each_tokens_file(tmp_path, tok):
    """A directory of two files: each window's source_ids give the file (in sorted order) of each of its tokens,
    -1 on the eos between them; the windows themselves are those of the joined stream, as without the ids."""
    texts = {"a.txt": "abcdefghij" * 6, "b.txt": "KLMNOPQRST" * 5}
    for name, text in texts.items():
        write(tmp_path / "d" / name, text)
    stream = char_ids(texts["a.txt"]) + [0] + char_ids(texts["b.txt"])
    owner = [0] * 60 + [-1] + [1] * 50
    samples = calibration_samples(tmp_path / "d", tok, nsamples=8, seqlen=12, seed=1)
    plain = calibration_samples([texts["a.txt"], texts["b.txt"]], tok, nsamples=8, seqlen=12, seed=1)
    assert {v for s in samples for v in s["source_ids"][0].tolist()} >= {0, 1}
    for sample, same in zip(samples, plain):
        assert torch.equal(sample["input_ids"], same["input_ids"]) and set(same) == {"input_ids"}
        row = sample["input_ids"][0].tolist()
        start = next(i for i in range(len(stream) - 11) if stream[i : i + 12] == row)
        assert sample["source_ids"][0].tolist() == owner[start : start + 12]


def test_too_little_text_says_found_and_needed(tok):
    text = "x" * 63
    with pytest.raises(QuantkitError, match=r"found 63 tokens, need 4 x 16 = 64"):
        calibration_samples([text], tok, nsamples=4, seqlen=16, seed=0)
    # exactly nsamples x seqlen tokens is enough: the windows then tile the stream
    samples = calibration_samples(["abcdefgh" * 8], tok, nsamples=4, seqlen=16, seed=0)
    assert sorted(s["input_ids"][0, 0].item() for s in samples)[0] >= 1
    with pytest.raises(QuantkitError, match="must be positive"):
        calibration_samples([text], tok, nsamples=0, seqlen=16)


@pytest.mark.shared
def test_shared_corpora_parts_and_ref_tokenizer():
    if not (SHARED / "data" / "text").is_dir() or not (SHARED / "models" / "ref-lm").is_dir():
        pytest.skip("needs /work/shared (../shared): the shared corpora and ref-lm tokenizer")
    from transformers import AutoTokenizer

    f = SHARED / "data" / "text" / "tinyshakespeare.txt"
    full = f.read_text(encoding="utf-8")
    held = load_texts(f, part="heldout")
    assert held == [full[len(full) - round(len(full) / 10):]]
    tok = AutoTokenizer.from_pretrained(SHARED / "models" / "ref-lm")
    s1 = calibration_samples(f, tok, nsamples=4, seqlen=64, seed=0, part="heldout")
    s2 = calibration_samples(held, tok, nsamples=4, seqlen=64, seed=0)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(s1, s2))
    assert all(int(s["input_ids"].max()) < len(tok) for s in s1)
