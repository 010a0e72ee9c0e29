"""QiD laws, fitting and the CSV table: recovery of known exponents, weighted fits against closed-form WLS,
interval coverage, leave-last-out, method differences, the training-level inverse, round trips, exclusions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit.errors import QuantkitError
from quantkit.qid.estimate import training_level
from quantkit.qid.fit import (
    compare_methods,
    fit_single,
    fit_table,
    fit_unified,
    format_fits,
)
from quantkit.qid.laws import PUBLISHED_LAWS, UnifiedLaw, law_from_fit
from quantkit.qid.regression import huber_objective
from quantkit.qid.table import COLUMNS, TableWriter, parse_table, read_table

TRUE = UnifiedLaw(k=0.05, alpha=0.3, beta=0.6, gamma=4.0)


def synthetic_points(law: UnifiedLaw, noise: float = 0.03, seed: int = 0) -> list[dict]:
    """Points on a 4 N x 5 D x 3 P grid from `law`, times exp(normal(0, noise))."""
    rng = np.random.default_rng(seed)
    pts = []
    for n in (1e6, 4e6, 1.6e7, 6.4e7):
        for d in (1e8, 4e8, 1.6e9, 6.4e9, 2.56e10):
            for p in (2, 3, 4):
                q = law.qid(n, d, p) * math.exp(rng.normal(0.0, noise))
                pts.append({"model": f"m{n:g}@{d:g}", "N": int(n), "D": int(d), "bits": p, "method": "gptq", "qid": q, "_line": len(pts) + 2})
    return pts


def test_unified_fit_recovers_known_exponents_within_5_percent():
    """Multiplicative 3% noise: alpha, beta, gamma within 5% of the generating law."""
    fit = fit_unified(synthetic_points(TRUE), bootstrap=0)
    for name in ("alpha", "beta", "gamma"):
        assert fit["params"][name]["value"] == pytest.approx(getattr(TRUE, name), rel=0.05)
    # k is an extrapolation to N = D = P = 1, so it is loose; predictions inside the grid are tight.
    assert fit["params"]["k"]["value"] == pytest.approx(TRUE.k, rel=0.25)
    p = fit["params"]
    law = UnifiedLaw(k=p["k"]["value"], alpha=p["alpha"]["value"], beta=p["beta"]["value"], gamma=p["gamma"]["value"])
    assert law.qid(8e6, 1.6e9, 3) == pytest.approx(TRUE.qid(8e6, 1.6e9, 3), rel=0.02)
    assert fit["r2"] > 0.99 and fit["n_points"] == 60


def test_huber_fit_resists_an_outlier_where_least_squares_does_not():
    """One point off by 20x: Huber (delta 1e-3) keeps beta within 5%; least squares in log space does not."""
    pts = synthetic_points(TRUE, noise=0.01)
    pts[-1]["qid"] *= 20.0
    fit = fit_unified(pts, bootstrap=0, estimator="huber")
    assert fit["params"]["beta"]["value"] == pytest.approx(TRUE.beta, rel=0.05)
    y = np.log([p["qid"] for p in pts])
    X = np.column_stack([np.ones(len(pts)), np.log([p["D"] for p in pts]), -np.log([p["N"] for p in pts]), -np.log([p["bits"] for p in pts])])
    ols = np.linalg.lstsq(X, y, rcond=None)[0]
    assert abs(ols[1] - TRUE.beta) / TRUE.beta > 0.05


def test_huber_objective_gradient_matches_finite_differences():
    """The analytic gradient handed to L-BFGS is right."""
    rng = np.random.default_rng(1)
    X, y, theta = rng.normal(size=(30, 3)), rng.normal(size=30), rng.normal(size=3)
    _, grad = huber_objective(theta, X, y, 0.5)
    eps = 1e-6
    fd = [(huber_objective(theta + eps * e, X, y, 0.5)[0] - huber_objective(theta - eps * e, X, y, 0.5)[0]) / (2 * eps) for e in np.eye(3)]
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(("factor", "name", "value"), [("D", "beta", 0.6), ("N", "alpha", 0.3), ("P", "gamma", 4.0)])
def test_single_factor_fits_recover_their_exponent(factor, name, value):
    """Fixed-effects single-factor fits: one exponent shared by all slices, within 5%."""
    fit = fit_single(synthetic_points(TRUE), factor, bootstrap=0)
    assert fit["params"][name]["value"] == pytest.approx(value, rel=0.05)
    assert len(fit["constants"]) == {"D": 12, "N": 15, "P": 20}[factor]


def test_bootstrap_interval_brackets_estimate_and_truth():
    """Percentile intervals are ordered, contain the point estimate, and here the generating value."""
    fit = fit_unified(synthetic_points(TRUE, seed=3), bootstrap=40, seed=1)
    for name in ("alpha", "beta", "gamma"):
        lo, hi = fit["params"][name]["ci"]
        assert lo < fit["params"][name]["value"] < hi
        assert lo < getattr(TRUE, name) * 1.05 and hi > getattr(TRUE, name) * 0.95
    assert fit["bootstrap"]["resamples"] == 40


def test_unified_law_needs_two_values_of_each_factor():
    """A single N gives a clear error naming N."""
    pts = [p for p in synthetic_points(TRUE) if p["N"] == 1_000_000]
    with pytest.raises(QuantkitError, match="distinct values of N"):
        fit_unified(pts, bootstrap=0)


def test_published_law_by_hand_and_inverse():
    """QiD formula evaluated by hand; the inverse gives back D."""
    law = PUBLISHED_LAWS["ouyang2024-gptq"]
    n, d, p = 1.2e8, 3e11, 3
    by_hand = 0.017 * d**0.5251 / (n**0.2261 * p**5.4967)
    assert law.qid(n, d, p) == pytest.approx(by_hand, rel=1e-12)
    assert law.tokens_for_qid(n, by_hand, p) == pytest.approx(d, rel=1e-9)


@settings(max_examples=50, deadline=None)
@given(
    n=st.floats(1e5, 1e12), d=st.floats(1e6, 1e15), p=st.integers(2, 16),
    alpha=st.floats(0.05, 1.0), beta=st.floats(0.05, 1.0), gamma=st.floats(0.0, 6.0),
)
def test_predict_inverse_round_trip(n, d, p, alpha, beta, gamma):
    """tokens_for_qid(qid(N, D, P)) == D for any positive law."""
    law = UnifiedLaw(k=0.02, alpha=alpha, beta=beta, gamma=gamma)
    assert law.tokens_for_qid(n, law.qid(n, d, p), p) == pytest.approx(d, rel=1e-8)


def test_nonpositive_qid_excluded_and_reported(caplog):
    """QiD <= 0 rows never reach the log fit and are listed with their line, and said in one warning."""
    rows = synthetic_points(TRUE)
    rows[5]["qid"] = -0.001
    rows[9]["qid"] = 0.0
    with caplog.at_level("WARNING", logger="quantkit.qid.fit"):
        result = fit_table(parse_table(_csv_text(rows), source="t.csv"), bootstrap=0, laws=("unified",))
    assert [r.getMessage() for r in caplog.records] == [
        "t.csv: 2 row(s) left out of the fit: qid <= 0 (no logarithm) at line(s) 7, 11"]
    assert result["fits"][0]["n_points"] == 58
    lines = sorted(e["line"] for e in result["excluded"])
    assert lines == [7, 11]  # header is line 1
    assert "excluded 2 row(s)" in format_fits(result)


def test_point_level_fits_refuse_points_without_a_logarithm():
    """fit_unified, fit_single and compare_methods take the points they are given: one with QiD, N, D or bits not
    above 0 is refused naming its CSV line (or its index), not turned into a NaN fit."""
    clean = synthetic_points(TRUE)
    for column, value in (("qid", -0.001), ("qid", 0.0), ("qid", math.nan), ("N", 0), ("D", -5), ("bits", 0)):
        points = [dict(p) for p in clean]
        points[3][column] = value
        with pytest.raises(QuantkitError, match=rf"^line 5: {column} .* is not > 0; .*fit_table leaves"):
            fit_unified(points, bootstrap=0)
        with pytest.raises(QuantkitError, match=rf"^line 5: {column} .* is not > 0"):
            compare_methods({"a": clean, "b": points}, bootstrap=0)
        del points[3]["_line"]
        with pytest.raises(QuantkitError, match=rf"^point 3: {column} .* is not > 0"):
            fit_single(points, "D", bootstrap=0)


def test_resample_errors_needs_standard_errors_in_every_entry_point():
    """resample='errors' with no qid_se anywhere: one QuantkitError from each fit function (the point-level ones
    redrew within tau alone)."""
    points = synthetic_points(TRUE)
    assert all(p.get("qid_se") is None for p in points)
    for call in (lambda: fit_unified(points, bootstrap=3, resample="errors"),
                 lambda: fit_single(points, "D", bootstrap=3, resample="errors"),
                 lambda: compare_methods({"a": points, "b": points}, bootstrap=3, resample="errors"),
                 lambda: fit_table(parse_table(_csv_text(points)), bootstrap=3, resample="errors")):
        with pytest.raises(QuantkitError, match="no row has a qid_se value.*use --resample points"):
            call()
    with_se = [{**p, "qid_se": 0.05 * p["qid"]} for p in points]
    assert fit_unified(with_se, bootstrap=3, resample="errors")["bootstrap"]["resamples"] == 3


def test_by_bits_folds_p_and_fits_each_width():
    """--by-bits: one unified fit per bit width, gamma absent, exponents still recovered."""
    result = fit_table(parse_table(_csv_text(synthetic_points(TRUE))), by_bits=True, bootstrap=0, laws=("unified",))
    assert [f["bits"] for f in result["fits"]] == [2, 3, 4]
    for f in result["fits"]:
        assert "gamma" not in f["params"]
        assert f["params"]["beta"]["value"] == pytest.approx(0.6, rel=0.05)
        law = law_from_fit(result, bits=f["bits"])
        assert law.qid(1e7, 1e9, f["bits"]) == pytest.approx(TRUE.qid(1e7, 1e9, f["bits"]), rel=0.1)


def _csv_text(rows: list[dict]) -> str:
    """CSV text of rows in the table's column order."""
    lines = [",".join(COLUMNS)]
    for r in rows:
        full = {"group_size": 128, "step": "", "params": "", "loss_fp": "", "loss_q": "", "eval_tokens": "", "seconds": "", "eval_text": "t", "error": "", **r}
        lines.append(",".join(str(full.get(c, "")) for c in COLUMNS))
    return "\n".join(lines) + "\n"


def test_csv_round_trip_and_truncated_last_line(tmp_path):
    """Rows written by TableWriter read back equal; a partial last line is dropped and later cut."""
    path = tmp_path / "q.csv"
    rows = [
        {"model": "a@step1", "N": 10, "params": 20, "D": 1000, "step": 1, "bits": 3, "method": "gptq", "group_size": 128,
         "loss_fp": 3.25, "loss_q": 3.5 + 1e-12, "qid": 0.25 + 1e-12, "eval_tokens": 999, "seconds": 1.5, "eval_text": "x,y", "error": "",
         "qid_se": 0.0123 + 1e-15, "eval_windows": 4},
        {"model": "b", "N": 11, "params": 21, "D": 2000, "step": None, "bits": 4, "method": "bnb-nf4", "group_size": 64,
         "loss_fp": 3.0, "loss_q": None, "qid": None, "eval_tokens": 999, "seconds": 0.1, "eval_text": "x,y", "error": "RuntimeError: no CPU",
         "qid_se": None, "eval_windows": 4},
    ]
    with TableWriter(path) as w:
        for r in rows:
            w.write(r)
    table = read_table(path)
    got = {k: v for k, v in table.rows[0].items() if k != "_line"}
    assert got == {**rows[0], "error": ""}
    assert table.error_rows[0]["error"] == "RuntimeError: no CPU" and table.error_rows[0]["qid"] is None
    with open(path, "a") as fh:
        fh.write("c,12,22,30")  # interrupted mid-row
    assert read_table(path).dropped_partial_line
    with TableWriter(path) as w:
        w.write({**rows[0], "model": "c"})
    again = read_table(path)
    assert not again.dropped_partial_line and [r["model"] for r in again.rows] == ["a@step1", "c"]


def test_appending_to_a_table_without_error_columns_keeps_its_columns(tmp_path):
    """An older table (no qid_se, eval_windows) gets rows in its own columns and reads back with qid_se None."""
    from quantkit.qid.table import LEGACY_COLUMNS

    path = tmp_path / "old.csv"
    path.write_text(",".join(LEGACY_COLUMNS) + "\n" + "m,10,20,1000,1,3,gptq,32,3.0,3.1,0.1,999,1.0,t,\n")
    with TableWriter(path) as w:
        w.write({"model": "n", "N": 10, "D": 2000, "bits": 3, "method": "gptq", "group_size": 32, "qid": 0.2,
                 "qid_se": 0.01, "eval_text": "t"})
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(LEGACY_COLUMNS) and len(lines[2].split(",")) == len(LEGACY_COLUMNS)
    table = read_table(path)
    assert [r["qid"] for r in table.rows] == [0.1, 0.2] and all(r.get("qid_se") is None for r in table.rows)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("model,N,D,bits\nm,1,2,3\n", "lacks column"),
        ("model,N,D,bits,method,qid\nm,1,2,3,gptq,abc\n", "not a number"),
        ("model,N,D,bits,method,qid\nm,1,2,3.5,gptq,0.1\n", "not an integer"),
        ("model,N,D,bits,method,qid\nm,1,2,3,gptq\n", "fields"),
        ("", "empty"),
    ],
)
def test_bad_tables_raise_clear_errors(text, match):
    """Missing columns, non-numeric values, ragged rows and empty files are QuantkitErrors."""
    with pytest.raises(QuantkitError, match=match):
        parse_table(text)


def noisy_points(law: UnifiedLaw, seed: int, rel_se=(0.03, 0.3), methods=("gptq",)) -> list[dict]:
    """A 4 N x 6 D x 3 P grid from `law`; each point's log QiD gets normal noise of a known, varying SD, stored as qid_se."""
    rng = np.random.default_rng(seed)
    pts = []
    for method in methods:
        for n in (1e5, 2.5e5, 6e5, 1.6e6):
            for d in (6.5e4, 1.3e5, 2.6e5, 5.2e5, 1.05e6, 2.1e6):
                for p in (2, 3, 4):
                    s = float(rng.uniform(*rel_se))
                    q = law.qid(n, d, p) * math.exp(rng.normal(0.0, s))
                    pts.append({"model": f"n{n:g}@{d:g}", "N": int(n), "D": int(d), "bits": p, "method": method,
                                "qid": q, "qid_se": s * q, "_line": len(pts) + 2})
    return pts


def _design(pts: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[1, log D, -log N, -log P], log QiD and SE(log QiD) = qid_se / qid, built by hand."""
    X = np.column_stack([np.ones(len(pts)), np.log([p["D"] for p in pts]), -np.log([p["N"] for p in pts]),
                         -np.log([p["bits"] for p in pts])])
    return X, np.log([p["qid"] for p in pts]), np.array([p["qid_se"] / p["qid"] for p in pts])


def test_weighted_fit_equals_closed_form_weighted_least_squares():
    """Without the misfit term the fit is (X'WX)^-1 X'Wy with W = 1/SE(log QiD)^2; with it, W = 1/(SE^2 + tau^2)
    where tau^2 makes the weighted residual sum of squares equal the degrees of freedom."""
    pts = noisy_points(TRUE, seed=0)
    X, y, s = _design(pts)
    for misfit, extra in ((False, 0.0), (True, 0.15)):
        for p, e in zip(pts, np.random.default_rng(1).normal(0.0, extra, len(pts))):
            p["qid"] *= math.exp(e)  # extra scatter beyond the stated errors: tau > 0 with misfit
        X, y, s = _design(pts)
        fit = fit_unified(pts, bootstrap=0, misfit=misfit)
        tau2 = fit["tau"] ** 2
        W = np.diag(1.0 / (s**2 + tau2))
        theta = np.linalg.solve(X.T @ W @ X, X.T @ W @ y)
        got = [math.log(fit["params"]["k"]["value"])] + [fit["params"][n]["value"] for n in ("beta", "alpha", "gamma")]
        np.testing.assert_allclose(got, theta, rtol=1e-7, atol=1e-9)
        if misfit:
            assert tau2 > 0.01
            r = y - X @ theta
            assert float((r**2 / (s**2 + tau2)).sum()) == pytest.approx(len(pts) - 4, rel=1e-6)
        else:
            assert tau2 == 0.0
    unweighted = np.linalg.lstsq(X, y, rcond=None)[0]
    assert abs(unweighted[1] - theta[1]) > 1e-4  # the weights change the answer


@pytest.mark.parametrize("resample", ["points", "errors"])
def test_known_law_recovered_inside_intervals_with_sane_coverage(resample):
    """Over 6 noise seeds, the 95% intervals hold the generating exponents in >= 15 of 18 cases and are narrow."""
    covered, widths = 0, []
    for seed in range(6):
        fit = fit_unified(noisy_points(TRUE, seed=seed), bootstrap=80, seed=seed, resample=resample)
        assert fit["weighted"] and fit["bootstrap"]["resamples"] >= 70
        for name in ("alpha", "beta", "gamma"):
            lo, hi = fit["params"][name]["ci"]
            covered += lo <= getattr(TRUE, name) <= hi
            widths.append((hi - lo) / getattr(TRUE, name))
    assert covered >= 15
    assert max(widths) < 0.5  # a coverage bought with useless width would not count


def test_leave_last_checkpoint_out_predicts_from_earlier_checkpoints():
    """Fit on every size's checkpoints before its last, predict the last: exact law -> ~0 error; the
    held-out points are exactly each N's largest D."""
    pts = noisy_points(TRUE, seed=2, rel_se=(1e-4, 2e-4))
    llo = fit_unified(pts, bootstrap=0)["leave_last_out"]
    assert llo["n_test"] == 4 * 3 and llo["n_train"] == 4 * 5 * 3
    assert {e["D"] for e in llo["predictions"]} == {2_100_000}
    for e in llo["predictions"]:
        assert e["qid_pred"] == pytest.approx(TRUE.qid(e["N"], e["D"], e["bits"]), rel=2e-3)
    assert llo["median_abs_rel_error"] < 2e-3


def test_method_difference_interval_finds_a_real_difference_and_not_a_fake_one():
    """beta 0.6 vs 0.4: the paired interval of the difference excludes 0 and holds -0.2; the same law twice
    (different noise) gives an interval holding 0."""
    flatter = UnifiedLaw(k=TRUE.k, alpha=TRUE.alpha, beta=0.4, gamma=TRUE.gamma)
    a = noisy_points(TRUE, seed=3, methods=("gptq",))
    b = noisy_points(flatter, seed=4, methods=("tlq",))
    [entry] = compare_methods({"gptq": a, "tlq": b}, bootstrap=80)
    d = entry["differences"]["beta"]
    assert entry["a"] == "gptq" and entry["b"] == "tlq"
    assert d["differs"] and d["ci"][0] < -0.2 < d["ci"][1] and d["ci"][1] < 0
    same = noisy_points(TRUE, seed=5, methods=("tlq",))
    [entry] = compare_methods({"gptq": a, "tlq": same}, bootstrap=80)
    lo, hi = entry["differences"]["beta"]["ci"]
    assert lo < 0 < hi and not entry["differences"]["beta"]["differs"]


def test_training_level_inverts_the_law_exactly_and_propagates_errors():
    """A fake measured QiD from the law at a known D gives back D; intervals from law draws and the QiD SE hold D."""
    n, d, p = 3.3e5, 7.7e5, 3
    q = TRUE.qid(n, d, p)
    exact = training_level(TRUE, n, q, p)
    assert exact["tokens"] == pytest.approx(d, rel=1e-10) and exact["ci"] is None
    by_hand = math.exp((math.log(q) + TRUE.alpha * math.log(n) + TRUE.gamma * math.log(p) - math.log(TRUE.k)) / TRUE.beta)
    assert exact["tokens"] == pytest.approx(by_hand, rel=1e-12)
    with_se = training_level(TRUE, n, q, p, qid_se=0.1 * q)
    lo, hi = with_se["ci"]
    # log D = (log QiD + ...)/beta: a 10% QiD error is a 10%/beta error in D; the 95% range is about +-1.96 of it
    assert math.log(hi / d) == pytest.approx(1.96 * 0.1 / TRUE.beta, rel=0.1)
    assert math.log(d / lo) == pytest.approx(1.96 * 0.1 / TRUE.beta, rel=0.1)
    draws = [UnifiedLaw(k=TRUE.k, alpha=TRUE.alpha, beta=b, gamma=TRUE.gamma) for b in np.linspace(0.5, 0.7, 41)]
    spread = training_level(TRUE, n, q, p, draws=draws)
    assert spread["ci"][0] < d < spread["ci"][1]
    for bad in (0.0, -0.01, float("nan")):
        with pytest.raises(QuantkitError, match="not positive"):
            training_level(TRUE, n, bad, p)


def test_old_table_without_errors_fits_unweighted():
    """A table without qid_se (the committed sweep's older columns) fits by ordinary least squares."""
    pts = synthetic_points(TRUE, seed=4)
    fit = fit_unified(pts, bootstrap=0)
    X = np.column_stack([np.ones(len(pts)), np.log([p["D"] for p in pts]), -np.log([p["N"] for p in pts]),
                         -np.log([p["bits"] for p in pts])])
    ols = np.linalg.lstsq(X, np.log([p["qid"] for p in pts]), rcond=None)[0]
    assert not fit["weighted"] and fit["params"]["beta"]["value"] == pytest.approx(ols[1], rel=1e-9)
