"""The demo: grammar corpus, and the train -> quantize -> export -> reload -> evaluate pipeline."""

from __future__ import annotations

import json
import math
import re

import pytest
from click.testing import CliRunner

from quantkit.demo.corpus import fact_table, generate_corpus
from quantkit.demo.run import format_table, pick_group_size, run_demo

WORDS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty".split()
TINY = dict(corpus_chars=30_000, vocab_size=320, hidden_size=64, num_layers=2, num_heads=2, seqlen=32,
            batch_size=8, nsamples=8, eval_max_tokens=1500, progress=False)


def test_corpus_is_seeded_and_sized():
    a = generate_corpus(50_000, seed=1)
    assert a == generate_corpus(50_000, seed=1)
    assert a != generate_corpus(50_000, seed=2)
    assert 50_000 <= len(a) < 52_000
    assert len(generate_corpus(300_000, seed=0)) >= 300_000
    assert "\n\n" in a and a.isascii()


def test_corpus_arithmetic_and_counting_are_right():
    text = generate_corpus(100_000, seed=3)
    value = {w: i for i, w in enumerate(WORDS)}
    sums = re.findall(r"(\w+) (plus|minus) (\w+) is (\w+)\.", text)
    assert len(sums) > 100
    for a, op, b, c in sums:
        a, b, c = value[a.lower()], value[b], value[c]
        assert c == (a + b if op == "plus" else a - b)
    counts = re.findall(r"Counting: ([a-z, ]+)\.", text)
    assert counts
    for c in counts:
        nums = [value[w] for w in c.split(", ")]
        assert nums == list(range(nums[0], nums[0] + len(nums)))


def test_corpus_facts_are_consistent():
    text = generate_corpus(100_000, seed=4)
    capitals: dict[str, set[str]] = {}
    for country, capital in re.findall(r"capital of (\w+)(?: is|\? A:) (\w+)\.", text):
        capitals.setdefault(country, set()).add(capital)
    assert len(capitals) > 10
    assert all(len(v) == 1 for v in capitals.values())
    table = {row["country"]: row["capital"] for row in fact_table()}
    assert all(table[c] == next(iter(v)) for c, v in capitals.items())


def test_pick_group_size():
    assert pick_group_size([128, 320]) == 64
    assert pick_group_size([256, 512]) == 128
    assert pick_group_size([64, 160]) == 32
    assert pick_group_size([48, 100]) == -1


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    pytest.importorskip("quantkit.engine", reason="the layer-wise engine is not built yet")
    pytest.importorskip("quantkit.export", reason="the export room is not built yet")
    out = tmp_path_factory.mktemp("demo") / "out"
    return out, run_demo(out=out, train_seconds=4, max_steps=40, **TINY)


def test_demo_end_to_end(demo_run):
    from quantkit import load_quantized
    from quantkit.eval import evaluate_loss

    out, res = demo_run
    rows = res["rows"]
    assert [(r["method"], r["bits"]) for r in rows] == [("fp", 32), ("rtn", 4), ("gptq", 4), ("rtn", 3), ("gptq", 3)]
    assert res["group_size"] == 32  # hidden 64, intermediate 160 (8/3 x 64 rounded down to 32s)
    assert json.loads((out / "results.json").read_text())["rows"] == rows
    assert (out / "corpus" / "corpus.txt").is_file() and (out / "fp-model" / "training.json").is_file()
    fp = rows[0]
    for r in rows[1:]:
        assert math.isfinite(r["loss"]) and r["ppl"] == pytest.approx(math.exp(r["loss"]))
        assert r["delta_loss"] == pytest.approx(r["loss"] - fp["loss"])
        assert (out / r["path"] / "quantkit.json").is_file()
        assert 0 < r["export_mb"] < fp["export_mb"]  # packed codes are smaller than float32 weights
        assert r["calib_seconds"] > 0
    # the table's numbers are what the exports give when loaded back from disk
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "gptq-w3")
    loaded = load_quantized(out / "gptq-w3")
    held = (out / "corpus" / "corpus.txt").read_text()
    held = held[len(held) - round(len(held) / 10):]
    ev = evaluate_loss(loaded, tok, [held], seqlen=32, max_tokens=1500, progress=False)
    assert ev["loss"] == pytest.approx(rows[4]["loss"], rel=1e-6)
    table = format_table(res)
    assert "gptq" in table and "rtn" in table and "delta" in table


def test_demo_on_a_user_model_and_data(demo_run, tmp_path):
    from quantkit.cli import main

    out, _ = demo_run
    r = CliRunner().invoke(main, ["demo", "--model", str(out / "fp-model"), "--data", str(out / "corpus" / "corpus.txt"),
                                  "-o", str(tmp_path / "user"), "--nsamples", "4", "--format", "fake", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert [row["method"] for row in res["rows"]] == ["fp", "rtn", "gptq", "rtn", "gptq"]
    assert res["model"] == str(out / "fp-model") and not (tmp_path / "user" / "fp-model").exists()
    assert all(math.isfinite(row["loss"]) for row in res["rows"])
    assert (tmp_path / "user" / "gptq-w4" / "quantkit.json").is_file()


def test_demo_cli_bad_input(tmp_path):
    from quantkit.cli import main

    r = CliRunner().invoke(main, ["demo", "--model", str(tmp_path)])
    assert r.exit_code == 2 and "--model needs --data" in r.output
    (tmp_path / "exists").mkdir()
    r = CliRunner().invoke(main, ["demo", "-o", str(tmp_path / "exists")])
    assert r.exit_code == 2 and "already exists" in r.output
    r = CliRunner().invoke(main, ["demo", "--data", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "not found" in r.output
    assert not (tmp_path / "o").exists()  # nothing is left behind on failure
