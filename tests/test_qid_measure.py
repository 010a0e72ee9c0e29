"""`qid measure`: checkpoint specs, N and D resolution, and a small resumable grid on the reference LM."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from helpers import tiny_model

from quantkit.cli import main
from quantkit.errors import QuantkitError
from quantkit.qid.measure import (
    Measurement,
    count_parameters,
    measure_grid,
    paired_bootstrap_se,
    parse_checkpoint,
    parse_token_overrides,
    resolve_tokens,
)
from quantkit.qid.table import read_table


def test_parse_checkpoint_specs(tmp_path):
    """id@revision splits; a plain id or an existing path with '@' stays whole."""
    c = parse_checkpoint("EleutherAI/pythia-160m-deduped@step143000")
    assert (c.name, c.revision) == ("EleutherAI/pythia-160m-deduped", "step143000")
    assert parse_checkpoint("gpt2").revision is None
    odd = tmp_path / "a@b"
    odd.mkdir()
    assert parse_checkpoint(str(odd)).name == str(odd)
    with pytest.raises(QuantkitError, match="hub-id@revision"):
        parse_checkpoint("model@")


def test_tokens_from_pythia_training_json_override_or_error(tmp_path):
    """D: Pythia stepN x 2,097,152; training.json tokens_seen; --tokens wins; otherwise a clear error."""
    d, step, _ = resolve_tokens(parse_checkpoint("EleutherAI/pythia-70m@step3000"))
    assert (d, step) == (3000 * 2_097_152, 3000)
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "training.json").write_text(json.dumps({"step": 7, "tokens_seen": 7168}))
    assert resolve_tokens(parse_checkpoint(str(ck)))[:2] == (7168, 7)
    assert resolve_tokens(parse_checkpoint(str(ck)), override=99)[0] == 99
    assert resolve_tokens(parse_checkpoint("org/other@step10"), tokens_per_step=4)[0] == 40
    with pytest.raises(QuantkitError, match="--tokens"):
        resolve_tokens(parse_checkpoint("org/other@step10"))
    assert parse_token_overrides(["a=1e6", "5000"]) == ({"a": 1_000_000}, 5000)
    with pytest.raises(QuantkitError, match="not a number"):
        parse_token_overrides(["a=lots"])
    with pytest.raises(QuantkitError, match="a second count for a;"):
        parse_token_overrides(["a=1", "a=2"])
    with pytest.raises(QuantkitError, match="a second count for every checkpoint"):
        parse_token_overrides(["1", "2"])
    # a training.json that is not one object was read with .get() and failed with an AttributeError
    (ck / "training.json").write_text("[7168]")
    with pytest.raises(QuantkitError, match=r"training.json holds a JSON list, not an object; fix it or pass --tokens"):
        resolve_tokens(parse_checkpoint(str(ck)))
    (ck / "training.json").write_bytes(b"\xff{")
    with pytest.raises(QuantkitError, match="training.json is not valid JSON"):
        resolve_tokens(parse_checkpoint(str(ck)))


@pytest.mark.parametrize("tied", [True, False])
def test_non_embedding_count_by_hand(tied):
    """N = all parameters - vocab x hidden (input embedding) - vocab x hidden again if the head is untied."""
    v, h, inter, layers = 100, 16, 40, 2
    model = tiny_model("llama", vocab_size=v, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)
    per_layer = 4 * h * h + 3 * h * inter + 2 * h  # q,k,v,o; gate,up,down; two RMSNorms
    non_embedding = layers * per_layer + h  # + final norm
    total, n = count_parameters(model)
    assert n == non_embedding
    assert total == non_embedding + v * h * (1 if tied else 2)


def test_reference_lm_count_matches_its_training_json(ref_lm):
    """The shared reference model's recorded params / non_embedding_params."""
    from quantkit.models import load_model

    info = json.loads((ref_lm / "training.json").read_text())
    assert count_parameters(load_model(str(ref_lm))) == (info["params"], info["non_embedding_params"])


def test_measure_grid_resumes_and_matches_independent_pipeline(ref_lm, text_dir, tmp_path):
    """Rows for rtn W3 and bnb-nf4 (or its error row); rerun measures nothing; a cut last row is redone."""
    from transformers import AutoTokenizer

    from quantkit.data import calibration_samples
    from quantkit.engine import calibrate_model
    from quantkit.eval import evaluate_loss
    from quantkit.models import load_model
    from quantkit.quant.spec import QuantSpec

    text = tmp_path / "small.txt"
    text.write_text((text_dir / "tinyshakespeare.txt").read_text()[:60_000])
    ckpt = ref_lm / "steps" / "step125"
    settings = Measurement(eval_text=str(text), eval_tokens=600, eval_seqlen=128, nsamples=4, calib_seqlen=64, group_size=64)
    out = tmp_path / "q.csv"
    stats = measure_grid([str(ckpt)], [3], ["rtn", "bnb-nf4"], out, settings, progress=False)
    assert stats["measured"] + stats["failed"] == 2
    table = read_table(out)
    rtn = [r for r in table.rows if r["method"] == "rtn"][0]
    info = json.loads((ckpt / "training.json").read_text())
    assert (rtn["N"], rtn["params"], rtn["D"], rtn["step"]) == (info["non_embedding_params"], info["params"], info["tokens_seen"], info["step"])
    nf4 = [r for r in table.rows + table.error_rows if r["method"] == "bnb-nf4"][0]
    assert nf4["bits"] == 4 and (nf4["error"] or nf4["qid"] == pytest.approx(nf4["loss_q"] - nf4["loss_fp"]))

    # Independent pipeline: the public data/engine/eval APIs, step by step.
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    model = load_model(str(ckpt), dtype="float32")
    fp = evaluate_loss(model, tok, str(text), seqlen=128, max_tokens=600, part="heldout", progress=False)
    q = copy.deepcopy(model)
    samples = calibration_samples(str(text), tok, nsamples=4, seqlen=64, seed=0, part="train")
    calibrate_model(q, samples, QuantSpec(bits=3, group_size=64), method="rtn", progress=False)
    ql = evaluate_loss(q, tok, str(text), seqlen=128, max_tokens=600, part="heldout", progress=False)
    assert rtn["loss_fp"] == pytest.approx(fp["loss"], abs=1e-6) and rtn["eval_tokens"] == fp["tokens"]
    assert rtn["qid"] == pytest.approx(ql["loss"] - fp["loss"], abs=1e-6)
    assert rtn["eval_windows"] == fp["windows"] and rtn["qid_se"] > 0

    assert measure_grid([str(ckpt)], [3], ["rtn", "bnb-nf4"], out, settings, progress=False)["measured"] == 0
    body = out.read_text()
    out.write_text(body[: body.rstrip("\n").rfind("\n") + 1] + body.rstrip("\n").split("\n")[-1][:15])
    again = measure_grid([str(ckpt)], [3], ["rtn", "bnb-nf4"], out, settings, progress=False)
    assert again["skipped"] == 1 and again["measured"] + again["failed"] == 1
    assert len(read_table(out).rows + read_table(out).error_rows) == 2


def test_measure_cli_needs_tokens_for_unknown_checkpoint(tmp_path):
    """A checkpoint without training metadata fails before any work, exit 2, naming --tokens."""
    d = tmp_path / "m"
    tiny_model("llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=2).save_pretrained(d)
    res = CliRunner().invoke(main, ["qid", "measure", str(d), "--eval", str(tmp_path / "eval"), "-o", str(tmp_path / "q.csv"),
                                    "--no-progress"])
    assert res.exit_code == 2 and "--tokens" in res.output
    res = CliRunner().invoke(main, ["qid", "measure", str(d), "--methods", "rtn,awq", "--eval", "x", "-o", str(tmp_path / "q.csv")])
    assert res.exit_code == 2 and "unknown method" in res.output
    # D from --tokens (or training.json) for every checkpoint: --tokens-per-step would be ignored
    res = CliRunner().invoke(main, ["qid", "measure", str(d), "--eval", str(tmp_path / "eval"), "--tokens", "1e9",
                                    "--tokens-per-step", "1000", "-o", str(tmp_path / "q.csv"), "--no-progress"])
    assert res.exit_code == 2 and "drop --tokens-per-step" in res.output and not (tmp_path / "q.csv").exists()
    torch.manual_seed(0)


def test_per_window_losses_add_up_to_the_loss_computed_by_hand():
    """loss_on_ids(per_window=True): each window's summed nll equals a direct cross-entropy of that window."""

    from quantkit.eval.loss import loss_on_ids

    model = tiny_model("llama", seed=0, vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2).eval()
    ids = torch.randint(0, 50, (100,))
    out = loss_on_ids(model, ids, seqlen=32, progress=False, per_window=True)
    by_hand = []
    for b in range(0, 100, 32):
        w = ids[b : b + 32][None]
        with torch.no_grad():
            logits = model(input_ids=w).logits[0, :-1]
        by_hand.append(float(torch.nn.functional.cross_entropy(logits, w[0, 1:], reduction="sum")))
    assert out["window_tokens"] == [31, 31, 31, 3]
    assert out["window_nll"] == pytest.approx(by_hand, rel=1e-5)
    assert out["loss"] == pytest.approx(sum(by_hand) / 96, rel=1e-6)


def test_paired_bootstrap_se_matches_the_standard_error_of_paired_differences():
    """Equal windows: SE = sd(per-window difference) / sqrt(windows) / tokens per window (within Monte Carlo error);
    a quantized loss that moves every window by the same amount has SE 0 although both losses vary a lot."""
    import numpy as np

    rng = np.random.default_rng(0)
    fp = rng.normal(800.0, 60.0, 400)  # summed nll of 256-token windows: large spread between windows
    diff = rng.normal(5.0, 2.0, 400)
    se = paired_bootstrap_se(fp, fp + diff, [256] * 400, draws=4000)
    assert se == pytest.approx(diff.std(ddof=0) / np.sqrt(400) / 256, rel=0.05)
    assert paired_bootstrap_se(fp, fp + 3.0, [256] * 400) == pytest.approx(0.0, abs=1e-12)
    unpaired = fp.std() / np.sqrt(400) / 256
    assert se < unpaired / 10  # the pairing is what makes small QiDs resolvable
    with pytest.raises(QuantkitError, match="different windows"):
        paired_bootstrap_se(fp, fp[:-1], [256] * 400)
