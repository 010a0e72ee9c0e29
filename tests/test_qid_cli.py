"""`quantkit qid fit|predict|plot` through click's CliRunner: outputs, JSON and exit-2 errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import WORDS, make_tokenizer, save_tiny_llama

from quantkit.cli import main
from quantkit.qid.laws import UnifiedLaw
from quantkit.qid.table import COLUMNS, TableWriter

TRUE = UnifiedLaw(k=0.05, alpha=0.3, beta=0.6, gamma=4.0)


def _write_grid(path, law: UnifiedLaw = TRUE, negative: int = 0, methods=("gptq",), se: bool = False) -> None:
    """A CSV of exact law values on a 3 N x 4 D x 3 P grid (the first `negative` rows get QiD < 0; with `se`, each
    row's qid_se is 2% of its QiD)."""
    i = 0
    with TableWriter(path) as w:
        for method in methods:
            for n in (1e6, 4e6, 1.6e7):
                for d in (1e8, 4e8, 1.6e9, 6.4e9):
                    for p in (2, 3, 4):
                        q = law.qid(n, d, p) * (1 + 0.01 * math.sin(i))
                        if i < negative:
                            q = -0.001
                        row = {"model": f"m{int(n)}@d{int(d)}", "N": int(n), "params": int(n) + 1000, "D": int(d), "bits": p,
                               "method": method, "group_size": 128, "loss_fp": 3.0, "loss_q": 3.0 + q, "qid": q,
                               "eval_tokens": 1000, "seconds": 0.1, "eval_text": "t"}
                        w.write({**row, "qid_se": 0.02 * abs(q)} if se else row)
                        i += 1


def run(*args):
    """Invoke the top-level CLI."""
    return CliRunner().invoke(main, ["qid", *map(str, args)])


def test_predict_json_equals_formula_by_hand():
    """--law ouyang2024-gptq --json: qid = 0.017 D^0.5251 / (N^0.2261 P^5.4967)."""
    res = run("predict", "--law", "ouyang2024-gptq", "--params", "7e9", "--bits", "3", "--tokens", "1e14", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["params"] == 7e9 and out["bits"] == 3 and out["tokens"] == 1e14
    assert out["qid"] == pytest.approx(0.017 * 1e14**0.5251 / (7e9**0.2261 * 3**5.4967), rel=1e-12)


def test_predict_inverse_round_trip_through_cli():
    """--qid gives D; predicting at that D gives the QiD back."""
    res = run("predict", "--params", "1.2e8", "--bits", "4", "--qid", "0.05", "--json")
    d = json.loads(res.output)["tokens"]
    back = json.loads(run("predict", "--params", "1.2e8", "--bits", "4", "--tokens", repr(d), "--json").output)
    assert back["qid"] == pytest.approx(0.05, rel=1e-9)


def test_predict_needs_exactly_one_target():
    """Neither or both of --tokens/--qid: exit 2 with a one-line error."""
    res = run("predict", "--params", "1e8", "--bits", "4")
    assert res.exit_code == 2 and "exactly one of --tokens" in res.output
    res = run("predict", "--law", "no-such-law", "--params", "1e8", "--bits", "4", "--tokens", "1e9")
    assert res.exit_code == 2 and "unknown law" in res.output


def test_fit_then_predict_from_fit_json_and_plot(tmp_path):
    """fit -o writes a law that predict reads back; plot writes PNG and SVG for D, N and P."""
    csv = tmp_path / "q.csv"
    _write_grid(csv)
    fit_json = tmp_path / "fit.json"
    res = run("fit", csv, "--bootstrap", "10", "-o", fit_json)
    assert res.exit_code == 0, res.output
    assert "unified law" in res.output and "beta" in res.output
    doc = json.loads(fit_json.read_text())
    unified = [f for f in doc["fits"] if f["law"] == "unified"][0]
    assert unified["params"]["beta"]["value"] == pytest.approx(0.6, rel=0.05)
    assert len(unified["params"]["beta"]["ci"]) == 2 and unified["r2"] > 0.99
    assert {f["law"] for f in doc["fits"]} == {"unified", "D", "N", "P"}
    pred = json.loads(run("predict", "--law", fit_json, "--params", "4e6", "--bits", "3", "--tokens", "4e8", "--json").output)
    assert pred["qid"] == pytest.approx(TRUE.qid(4e6, 4e8, 3), rel=0.03)
    res = run("plot", csv, "--fit", fit_json, "--format", "png", "-o", tmp_path / "fig")
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in (tmp_path / "fig").iterdir())
    assert names == sorted(f"qid_vs_{f}_gptq.png" for f in "DNP")
    assert all((tmp_path / "fig" / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)
    (tmp_path / "bad.json").write_text("{not json")
    bad = run("plot", csv, "--fit", tmp_path / "bad.json", "-o", tmp_path / "fig2")
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "cannot read fit file" in bad.output
    assert not (tmp_path / "fig2").exists()


def test_fit_leaves_out_nonpositive_rows_and_says_so(tmp_path):
    """QiD <= 0 rows (measurements in the noise) are left out of the fit, which equals the fit of the table without
    them; the JSON lists them with their CSV lines, and one stderr line names them, --json or not."""
    csv = tmp_path / "q.csv"
    _write_grid(csv, negative=2)
    res = run("fit", csv, "--law", "unified", "--bootstrap", "0", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert [e["line"] for e in doc["excluded"]] == [2, 3] and all("qid <= 0" in e["reason"] for e in doc["excluded"])
    said = [f"WARNING quantkit.qid.fit: {csv}: 2 row(s) left out of the fit: qid <= 0 (no logarithm) at line(s) 2, 3"]
    assert res.stderr.splitlines() == said
    text = run("fit", csv, "--law", "unified", "--bootstrap", "0")
    assert text.exit_code == 0 and text.stderr.splitlines() == said and "excluded 2 row(s)" in text.stdout
    lines = csv.read_text().splitlines()
    (tmp_path / "kept.csv").write_text("\n".join(lines[:1] + lines[3:]) + "\n")
    ref = run("fit", tmp_path / "kept.csv", "--law", "unified", "--bootstrap", "0", "--json")
    assert ref.exit_code == 0 and ref.stderr == "", ref.output
    mine, theirs = doc["fits"][0], json.loads(ref.stdout)["fits"][0]
    assert mine["n_points"] == theirs["n_points"] == len(lines) - 3
    assert mine["params"] == theirs["params"] and mine["r2"] == theirs["r2"]


def test_fit_by_bits_and_method_filter(tmp_path):
    """--by-bits gives one unified fit per width; --method picks one method; predict needs --method if several."""
    csv = tmp_path / "q.csv"
    _write_grid(csv, methods=("gptq", "rtn"))
    fit_json = tmp_path / "fit.json"
    res = run("fit", csv, "--by-bits", "--method", "rtn", "--law", "unified", "--bootstrap", "0", "--json", "-o", fit_json)
    doc = json.loads(res.output)
    assert [(f["method"], f["bits"]) for f in doc["fits"]] == [("rtn", 2), ("rtn", 3), ("rtn", 4)]
    res = run("fit", csv, "--law", "unified", "--bootstrap", "0", "-o", fit_json)
    res = run("predict", "--law", fit_json, "--params", "1e6", "--bits", "3", "--tokens", "1e9")
    assert res.exit_code == 2 and "--method" in res.output
    assert run("predict", "--law", fit_json, "--method", "rtn", "--params", "1e6", "--bits", "3", "--tokens", "1e9").exit_code == 0


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("model,N,D,bits\nm,1,2,3\n", "lacks column(s) method, qid"),
        (",".join(COLUMNS) + "\n" + "m,1e6,,1e8,,3,gptq,128,,,oops,,,t,,,\n", "not a number"),
    ],
)
def test_bad_csv_exits_2_with_clear_message(tmp_path, content, match):
    """Missing columns and non-numeric values: exit code 2 and an 'error:' line."""
    csv = tmp_path / "bad.csv"
    csv.write_text(content)
    res = run("fit", csv, "--bootstrap", "0")
    assert res.exit_code == 2
    assert "error:" in res.output and match in res.output


def test_single_distinct_n_rejected_for_unified_law(tmp_path):
    """One model size: the unified law cannot separate N; exit 2 naming N and the way out."""
    csv = tmp_path / "q.csv"
    with TableWriter(csv) as w:
        for d in (1e8, 1e9):
            for p in (2, 3):
                w.write({"model": "m", "N": 1000, "D": int(d), "bits": p, "method": "gptq", "group_size": 128,
                         "qid": TRUE.qid(1000, d, p), "eval_text": "t"})
    res = run("fit", csv, "--bootstrap", "0")
    assert res.exit_code == 2 and "distinct values of N" in res.output and "--law D" in res.output
    assert run("fit", csv, "--law", "D", "--bootstrap", "0").exit_code == 0


def test_missing_csv_exits_2(tmp_path):
    """A CSV path that does not exist is a clear error, not a traceback."""
    res = run("fit", tmp_path / "none.csv")
    assert res.exit_code == 2 and "not found" in res.output


def _trained_tiny_model(tmp_path):
    """A tiny Llama trained for a few seconds on a word chain (w_i -> w_{i+1} or w_{i+2}), and held-out text of it."""
    from quantkit.train import train_causal_lm

    rng = np.random.default_rng(0)
    idx, words = 0, []
    for _ in range(6000):
        words.append(WORDS[idx])
        idx = (idx + int(rng.integers(1, 3))) % len(WORDS)
    text = tmp_path / "chain.txt"
    text.write_text(" ".join(words))
    model = train_causal_lm([" ".join(words)], tmp_path / "model", tokenizer=make_tokenizer(), hidden_size=32, num_layers=1,
                            num_heads=2, seqlen=32, batch_size=8, steps=60, lr=1e-2, warmup=5, progress=False)
    return model, text


def _law_file(path, **params) -> None:
    """A `qid fit -o`-shaped JSON holding one unified rtn fit (and its draws) with the given coefficients."""
    draws = {"log_k": [math.log(params["k"])] * 3, "alpha": [params.get("alpha", 0.3)] * 3,
             "beta": [params.get("beta", 0.6) * f for f in (0.9, 1.0, 1.1)], "gamma": [params.get("gamma", 4.0)] * 3}
    fit = {"law": "unified", "method": "rtn", "bits": None, "group_size": [32],
           "params": {name: {"value": v} for name, v in params.items()}, "draws": draws}
    path.write_text(json.dumps({"fits": [fit]}))


def test_training_level_end_to_end_inverts_the_law_at_the_measured_qid(tmp_path):
    """Measures QiD (2-bit RTN) of a trained tiny model and returns D = law inverse at that QiD, by hand; the
    JSON names N (counted here by hand), the QiD with its SE and an interval around D."""
    model, text = _trained_tiny_model(tmp_path)
    law = tmp_path / "law.json"
    _law_file(law, k=0.05, alpha=0.3, beta=0.6, gamma=4.0)
    out = tmp_path / "level.json"
    res = run("training-level", model, "--law", law, "--bits", "2", "--method", "rtn", "--data", text,
              "--eval-tokens", "3000", "--eval-seqlen", "32", "--nsamples", "4", "--calib-seqlen", "32", "-o", out)
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    m = doc["measurement"]
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(model)
    n_by_hand = sum(p.numel() for n, p in loaded.named_parameters() if "embed_tokens" not in n)  # tied head
    assert m["N"] == n_by_hand and m["method"] == "rtn" and m["bits"] == 2
    assert m["qid"] == pytest.approx(m["loss_q"] - m["loss_fp"], abs=1e-12) and m["qid"] > 3 * m["qid_se"] > 0
    d = math.exp((math.log(m["qid"]) + 0.3 * math.log(n_by_hand) + 4.0 * math.log(2) - math.log(0.05)) / 0.6)
    assert doc["tokens"] == pytest.approx(d, rel=1e-9)
    assert doc["ci"][0] < d < doc["ci"][1] and doc["law_draws"] == 3
    assert f"D = {d:.4g}" in res.output


def test_training_level_bad_input_is_one_error_line(tmp_path):
    """A law file without beta, and a QiD <= 0: exit 2 with a single 'error:' line each."""
    model = save_tiny_llama(tmp_path / "m")
    law = tmp_path / "law.json"
    law.write_text(json.dumps({"k": 0.05, "alpha": 0.3, "gamma": 4.0}))
    res = run("training-level", model, "--law", law, "--bits", "3", "--qid", "0.1")
    assert res.exit_code == 2 and res.output.strip().startswith("error:") and len(res.output.strip().splitlines()) == 1
    assert "'beta'" in res.output
    _law_file(law, k=0.05, alpha=0.3, beta=0.6, gamma=4.0)
    for bad in ("0", "-0.02"):
        res = run("training-level", model, "--law", law, "--bits", "3", "--method", "rtn", "--qid", bad)
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and "not positive" in res.output
    res = run("training-level", model, "--law", law, "--bits", "3", "--method", "rtn")
    assert res.exit_code == 2 and "--data" in res.output
    good = run("training-level", model, "--law", law, "--bits", "3", "--method", "rtn", "--qid", "0.1", "--qid-se", "0.01", "--json")
    assert good.exit_code == 0, good.output
    assert json.loads(good.output)["measurement"]["qid"] == 0.1


def test_fit_options_estimator_resample_and_method_differences(tmp_path):
    """--resample errors and --estimator huber reach the fit; two methods give a paired beta difference in the JSON."""
    csv = tmp_path / "q.csv"
    _write_grid(csv, methods=("gptq", "rtn"), se=True)
    res = run("fit", csv, "--law", "unified", "--bootstrap", "20", "--resample", "errors", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["resample"] == "errors" and all(f["bootstrap"]["resample"] == "errors" for f in doc["fits"])
    [diff] = doc["method_differences"]
    assert (diff["a"], diff["b"]) == ("gptq", "rtn") and diff["differences"]["beta"]["value"] == pytest.approx(0.0, abs=0.02)
    assert all("leave_last_out" in f and len(f["draws"]["beta"]) == 20 for f in doc["fits"])
    huber = json.loads(run("fit", csv, "--law", "unified", "--bootstrap", "0", "--estimator", "huber", "--json").output)
    assert {f["estimator"] for f in huber["fits"]} == {"huber"}
    res = run("fit", csv, "--estimator", "lasso")
    assert res.exit_code == 2
    res = run("fit", csv, "--estimator", "huber", "--resample", "errors")
    assert res.exit_code == 2 and "needs --estimator wls" in res.output


def test_measure_options_default_to_the_measurements_own_defaults():
    """`qid measure`'s click defaults are typed beside its options (the command imports no torch for --help); they
    must be the Measurement's, which the Python entry uses."""
    from dataclasses import MISSING, fields

    from quantkit.qid.cli import measure
    from quantkit.qid.measure import Measurement

    defaults = {f.name: f.default for f in fields(Measurement) if f.default is not MISSING}
    shared = [p for p in measure.params if p.name in defaults]
    assert len(shared) >= 9
    for param in shared:
        assert param.default == defaults[param.name], param.name


def test_options_that_would_go_unused_are_refused(tmp_path):
    """A published law with another --method, --qid-se without --qid, --qid beside --data, a fit with no law for the
    table's methods: exit 2, one line, nothing written; the valid neighbours still answer."""
    model = save_tiny_llama(tmp_path / "m")
    one_line = lambda res: res.exit_code == 2 and len(res.output.strip().splitlines()) == 1  # noqa: E731
    res = run("predict", "--params", "1e9", "--bits", "3", "--tokens", "1e12", "--method", "awq")
    assert one_line(res) and "fitted on gptq" in res.output
    same = run("predict", "--params", "1e9", "--bits", "3", "--tokens", "1e12", "--method", "gptq", "--json")
    plain = run("predict", "--params", "1e9", "--bits", "3", "--tokens", "1e12", "--json")
    assert same.exit_code == 0 and same.output == plain.output
    res = run("training-level", model, "--law", "ouyang2024-gptq", "--bits", "3", "--method", "rtn", "--qid", "0.1")
    assert one_line(res) and "fitted on gptq" in res.output
    res = run("training-level", model, "--law", "ouyang2024-gptq", "--bits", "3", "--qid-se", "0.01", "--data", "x.txt")
    assert one_line(res) and "--qid-se" in res.output
    text = tmp_path / "t.txt"
    text.write_text(" ".join(WORDS * 50))
    res = run("training-level", model, "--law", "ouyang2024-gptq", "--bits", "3", "--qid", "0.05", "--data", text,
              "-o", tmp_path / "r.json")
    assert one_line(res) and "--qid replaces the measurement" in res.output and not (tmp_path / "r.json").exists()
    csv, fit_json = tmp_path / "q.csv", tmp_path / "fit.json"
    _write_grid(csv)
    assert run("fit", csv, "--law", "unified", "--bootstrap", "0", "-o", fit_json).exit_code == 0
    rtn = tmp_path / "rtn.csv"
    rtn.write_text(csv.read_text().replace(",gptq,", ",rtn,"))
    res = run("plot", rtn, "--fit", fit_json, "-o", tmp_path / "figs")
    assert one_line(res) and "no curve to draw" in res.output and not (tmp_path / "figs").exists()


def test_resample_errors_needs_qid_se(tmp_path):
    """Without qid_se values there is no error to redraw a QiD within: --resample errors is refused in one line."""
    csv = tmp_path / "q.csv"
    _write_grid(csv)
    res = run("fit", csv, "--law", "unified", "--bootstrap", "5", "--resample", "errors")
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and "use --resample points" in res.output
    assert run("fit", csv, "--law", "unified", "--bootstrap", "5").exit_code == 0
