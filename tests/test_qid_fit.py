"""QiD laws, fitting and the CSV table: recovery of known exponents, inverse, round trips, exclusions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit.errors import QuantkitError
from quantkit.qid.fit import fit_single, fit_table, fit_unified, format_fits, huber_objective
from quantkit.qid.laws import PUBLISHED_LAWS, UnifiedLaw, law_from_fit
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
                pts.append({"model": f"m{n:g}", "N": int(n), "D": int(d), "bits": p, "method": "gptq", "qid": q, "_line": len(pts) + 2})
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
    fit = fit_unified(pts, bootstrap=0)
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


def test_nonpositive_qid_excluded_and_reported():
    """QiD <= 0 rows never reach the log fit and are listed with their line."""
    rows = synthetic_points(TRUE)
    rows[5]["qid"] = -0.001
    rows[9]["qid"] = 0.0
    result = fit_table(parse_table(_csv_text(rows)), bootstrap=0, laws=("unified",))
    assert result["fits"][0]["n_points"] == 58
    lines = sorted(e["line"] for e in result["excluded"])
    assert lines == [7, 11]  # header is line 1
    assert "excluded 2 row(s)" in format_fits(result)


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
         "loss_fp": 3.25, "loss_q": 3.5 + 1e-12, "qid": 0.25 + 1e-12, "eval_tokens": 999, "seconds": 1.5, "eval_text": "x,y", "error": ""},
        {"model": "b", "N": 11, "params": 21, "D": 2000, "step": None, "bits": 4, "method": "bnb-nf4", "group_size": 64,
         "loss_fp": 3.0, "loss_q": None, "qid": None, "eval_tokens": 999, "seconds": 0.1, "eval_text": "x,y", "error": "RuntimeError: no CPU"},
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
