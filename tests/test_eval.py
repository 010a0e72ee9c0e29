"""Loss and perplexity (quantkit.eval) against a position-by-position hand computation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from helpers import char_ids, char_tokenizer, tiny_model

from quantkit.errors import QuantkitError
from quantkit.eval import evaluate_loss

TEXT = "The cat sat on the mat. A dog ran far away!\nThen it came back."  # 63 chars = 63 tokens




@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model():
    m = tiny_model("llama", seed=0, vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, intermediate_size=64, max_position_embeddings=128,
                   tie_word_embeddings=False).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so predictions depend on context
        for p in m.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    return m


_CACHE: dict = {}


def next_token_logprob(model, context: tuple[int, ...], target: int) -> float:
    """log p(target | context) from one full forward of the model on the context (memoised)."""
    key = (id(model), context)
    if key not in _CACHE:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([context])).logits[0, -1].double()
        _CACHE[key] = torch.log_softmax(logits, dim=-1)
    return _CACHE[key][target].item()


def reference_nll(model, ids: list[int], seqlen: int, stride: int) -> tuple[float, int]:
    """Sum of -log p(token p | context) over the scored targets, one forward per target position.

    Window k covers [k*stride, k*stride + seqlen); target p is scored by the first window that
    contains both p and at least one token before it; windows stop once one reaches the end.
    """
    n = len(ids)
    starts = []
    k = 0
    while True:
        starts.append(k * stride)
        if k * stride + seqlen >= n:
            break
        k += 1
    total, count = 0.0, 0
    for p in range(1, n):
        begin = next((b for b in starts if b < p < b + seqlen), None)
        if begin is None:
            continue  # the first token of a non-overlapping window has no context in it
        total -= next_token_logprob(model, tuple(ids[begin:p]), ids[p])
        count += 1
    return total, count


@pytest.mark.parametrize("seqlen,stride", [(16, None), (16, 5), (64, None), (10, 10)])
def test_loss_matches_hand_computation(model, tok, seqlen, stride):
    ids = char_ids(TEXT)
    nll, count = reference_nll(model, ids, seqlen, stride or seqlen)
    res = evaluate_loss(model, tok, [TEXT], seqlen=seqlen, stride=stride, progress=False, batch_size=3)
    assert res["tokens"] == count
    assert res["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert res["seqlen"] == seqlen and res["stride"] == (stride or seqlen)


def test_non_overlapping_counts_and_sliding_scores_every_token(model, tok):
    n = len(TEXT)  # one token per character; windows of 16 each score all but their first token
    assert evaluate_loss(model, tok, [TEXT], seqlen=16, progress=False)["tokens"] == n - math.ceil(n / 16)
    # any stride < seqlen scores every token but the first
    assert evaluate_loss(model, tok, [TEXT], seqlen=16, stride=4, progress=False)["tokens"] == n - 1


def test_documents_join_with_eos_and_max_tokens(model, tok):
    docs = ["Hello there.", "General Kenobi!"]
    ids = char_ids(docs[0]) + [0] + char_ids(docs[1])
    nll, count = reference_nll(model, ids[:20], 8, 8)
    res = evaluate_loss(model, tok, docs, seqlen=8, max_tokens=20, progress=False)
    assert res["tokens"] == count
    assert res["loss"] == pytest.approx(nll / count, rel=1e-5)


def test_part_from_a_file(model, tok, tmp_path):
    text = TEXT * 5  # 315 chars: heldout = last 32 (rounded 31.5 -> 32)
    (tmp_path / "t.txt").write_text(text)
    held = text[len(text) - round(len(text) / 10):]
    nll, count = reference_nll(model, char_ids(held), 16, 16)
    res = evaluate_loss(model, tok, tmp_path / "t.txt", seqlen=16, part="heldout", progress=False)
    assert res["loss"] == pytest.approx(nll / count, rel=1e-5)


def test_bad_arguments(model, tok):
    with pytest.raises(QuantkitError, match="stride must be between 1 and seqlen"):
        evaluate_loss(model, tok, [TEXT], seqlen=16, stride=17, progress=False)
    with pytest.raises(QuantkitError, match="found 1 tokens, need at least 2"):
        evaluate_loss(model, tok, ["x"], seqlen=16, progress=False)
    with pytest.raises(QuantkitError, match="seqlen must be at least 2"):
        evaluate_loss(model, tok, [TEXT], seqlen=1, progress=False)


@pytest.fixture(scope="module")
def model_dir(model, tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_cli_plain_model(model, model_dir, tmp_path):
    from quantkit.cli import main

    (tmp_path / "t.txt").write_text(TEXT)
    r = CliRunner().invoke(main, ["eval", str(model_dir), "--data", str(tmp_path / "t.txt"), "--part", "all", "--seqlen", "16", "--stride", "8", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    nll, count = reference_nll(model, char_ids(TEXT), 16, 8)
    assert out["tokens"] == count
    assert out["loss"] == pytest.approx(nll / count, rel=1e-4)
    r = CliRunner().invoke(main, ["eval", str(model_dir), "--data", str(tmp_path / "t.txt"), "--part", "all", "--seqlen", "16"])
    assert r.exit_code == 0 and "ppl" in r.stdout and "scored: all the text" in r.stdout


def test_cli_scores_the_heldout_part_by_default_and_says_so(model, model_dir, tmp_path):
    """Without --part, eval scores the last 10% of the file's characters (what calibration's --part train leaves
    out), records part in --json and names it in its text output."""
    from quantkit.cli import main

    text = TEXT * 5
    (tmp_path / "t.txt").write_text(text)
    held = text[len(text) - round(len(text) / 10):]
    nll, count = reference_nll(model, char_ids(held), 16, 16)
    r = CliRunner().invoke(main, ["eval", str(model_dir), "--data", str(tmp_path / "t.txt"), "--seqlen", "16", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["part"] == "heldout" and out["tokens"] == count
    assert out["loss"] == pytest.approx(nll / count, rel=1e-4)
    r = CliRunner().invoke(main, ["eval", str(model_dir), "--data", str(tmp_path / "t.txt"), "--seqlen", "16"])
    assert r.exit_code == 0 and "scored: the held-out part (last 10%" in r.stdout


def test_cli_quantkit_export(model, model_dir, tok, tmp_path):
    """A quantkit export (quantkit.json) is loaded with load_quantized: its loss is the dequantized model's."""
    import copy

    pytest.importorskip("quantkit.engine", reason="the layer-wise engine is not built yet")
    pytest.importorskip("quantkit.export", reason="the export room is not built yet")
    from quantkit.cli import main
    from quantkit.engine import calibrate_model
    from quantkit.export import save_quantized
    from quantkit.quant.spec import QuantSpec

    q = copy.deepcopy(model)
    samples = [{"input_ids": torch.tensor([char_ids(TEXT[:32])])}]
    cal = calibrate_model(q, samples, QuantSpec(bits=3, group_size=32), method="rtn", progress=False)
    out = save_quantized(q, cal.results, tmp_path / "q", fmt="gptq_v2", source=str(model_dir))
    assert (out / "quantkit.json").is_file()
    (tmp_path / "t.txt").write_text(TEXT)
    r = CliRunner().invoke(main, ["eval", str(out), "--data", str(tmp_path / "t.txt"), "--part", "all", "--seqlen", "16", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    nll_q, count = reference_nll(q, char_ids(TEXT), 16, 16)
    nll_fp, _ = reference_nll(model, char_ids(TEXT), 16, 16)
    assert res["loss"] == pytest.approx(nll_q / count, rel=1e-4)
    assert abs(res["loss"] - nll_fp / count) > 1e-4  # it really evaluated the quantized weights


def test_cli_reports_each_source(model, model_dir, tmp_path):
    """A directory of files: each file is a source scored as its own stream (no window spans two files,
    --max-tokens keeps the first tokens of each), and the overall loss is the mean over all scored tokens."""
    from quantkit.cli import main

    texts = {"a.txt": TEXT, "b.txt": "Quantized models lose a little. " * 3}
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
    r = CliRunner().invoke(main, ["eval", str(model_dir), "--data", str(tmp_path), "--seqlen", "16", "--max-tokens", "40", "--part", "all",
                                  "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    total, count = 0.0, 0
    for name, text in texts.items():
        nll, n = reference_nll(model, char_ids(text)[:40], 16, 16)
        one = out["by_source"][str(tmp_path / name)]
        assert one["tokens"] == n and one["loss"] == pytest.approx(nll / n, rel=1e-4)
        total, count = total + nll, count + n
    assert out["tokens"] == count and out["loss"] == pytest.approx(total / count, rel=1e-4)
    r = CliRunner().invoke(main, ["eval", str(model_dir), "--data", str(tmp_path), "--seqlen", "16", "--part", "all"])
    assert r.exit_code == 0 and all(str(tmp_path / name) in r.stdout for name in texts)


def test_cli_errors(tmp_path, model_dir):
    from quantkit.cli import main

    r = CliRunner().invoke(main, ["eval", str(tmp_path / "missing"), "--data", str(tmp_path / "t.txt")])
    assert r.exit_code == 2 and "error:" in r.output and "not found" in r.output
    r = CliRunner().invoke(main, ["eval", str(model_dir), "--data", str(tmp_path / "nope.txt")])
    assert r.exit_code == 2 and "error:" in r.output and "not found" in r.output
