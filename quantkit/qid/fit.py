"""Fits of QiD scaling laws in log space: weighted least squares on the measurement errors, bootstrap intervals.

Every law here is linear in log space, log QiD = intercept(s) + sum_j e_j * x_j:

* unified: log QiD = log k + beta*log D - alpha*log N - gamma*log P (with --by-bits, P is fixed
  within each fit and folded into k, so gamma is not fitted);
* single-factor "D": QiD = c_s * D^beta, "N": QiD = c_s * N^-alpha, "P": QiD = c_s * P^-gamma,
  fitted jointly over slices s in which the other two factors are fixed: one shared exponent,
  one constant c_s per slice (a fixed-effects fit). Slices holding a single value of the factor
  carry no information about its exponent and are left out (reported as unused_slices).

Estimator "wls" (default): weighted least squares in log space. A point's variance is
SE(log QiD)^2 + tau^2: SE(log QiD) = qid_se / qid (delta method) from the table, tau^2 the
scatter of the law itself around the data (the "misfit"), chosen so that the weighted residual
sum of squares equals its degrees of freedom (the Paule-Mandel estimator of meta-analysis);
tau = 0 when the measurement errors alone explain the scatter. Without qid_se columns (older
tables) every point weighs the same and the fit is ordinary least squares. Estimator "huber":
the mean Huber loss of the log residuals (delta 1e-3, Chinchilla's approach 3) minimised by
L-BFGS-B from a grid of starts plus an IRLS solution; unweighted.

Intervals are bootstrap percentiles. resample="points" (default) draws checkpoints (the rows
of one model share its FP eval, so they travel together) with replacement and refits;
resample="errors" keeps the points and redraws each log QiD within its error,
log QiD + normal(0, SE(log QiD)^2 + tau^2). Unified fits keep their bootstrap draws (for the
training-level estimator) and a leave-last-checkpoint-out check: fit on each size's earlier
checkpoints, predict each size's last. Points with QiD <= 0 have no logarithm: they are
excluded and listed, never dropped silently, as are rows that failed at measurement time.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import defaultdict

import numpy as np

from quantkit.errors import QuantkitError
from quantkit.qid.regression import (
    HUBER_DELTA,
    Design,
    fit_linear_huber,
    fit_settings,
    percentile_ci,
    r_squared,
    wls_misfit,
)
from quantkit.qid.table import QidTable, check_points, split_points

FACTOR_COLUMN = {"D": "D", "N": "N", "P": "bits"}
# Name of each factor's exponent and its sign in log QiD (paper convention: all positive when
# QiD grows with D and falls with N and P).
EXPONENT = {"D": ("beta", 1.0), "N": ("alpha", -1.0), "P": ("gamma", -1.0)}
LAWS = ("unified", "D", "N", "P")
UNIFIED_FORMULA = "QiD = k * D^beta / (N^alpha * P^gamma)"
logger = logging.getLogger(__name__)


class _Problem:
    """One law's log-space regression: design, targets, their errors, and the checkpoint of each row."""

    def __init__(self, design: Design, se_log: np.ndarray | None, clusters: list, slope_grid: list[tuple[float, ...]],
                 valid_resample, estimator: str, delta: float, misfit: bool):
        """Bind the design to the estimator's settings."""
        self.design, self.se_log, self.slope_grid, self.valid = design, se_log, slope_grid, valid_resample
        self.estimator, self.delta, self.misfit = estimator, delta, misfit
        labels = sorted(set(clusters), key=str)
        index = {c: i for i, c in enumerate(labels)}
        self.cluster_rows = [np.flatnonzero(np.array([index[c] for c in clusters]) == i) for i in range(len(labels))]

    def solve(self, rows: np.ndarray, y: np.ndarray, start: np.ndarray | None = None) -> tuple[np.ndarray, float | None]:
        """(theta in centred coordinates, tau^2 or None for Huber) on the given rows and targets."""
        X = self.design.matrix(rows)
        if self.estimator == "huber":
            starts = [start] if start is not None else self.design.starts(y, rows, self.slope_grid)
            return fit_linear_huber(X, y, self.delta, starts, include_ols=start is None), None
        se = None if self.se_log is None else self.se_log[rows]
        return wls_misfit(X, y, se, self.misfit)

    def bootstrap(self, theta: np.ndarray, tau2: float | None, draws: int, seed: int, resample: str) -> tuple[list[np.ndarray], int]:
        """Uncentred parameter vectors of `draws` refits (resampled checkpoints or redrawn QiD) and the skipped count."""
        rng = np.random.default_rng(seed)
        out, skipped = [], 0
        all_rows = np.arange(len(self.design.y))
        for _ in range(draws):
            if resample == "points":
                picks = rng.integers(0, len(self.cluster_rows), size=len(self.cluster_rows))
                rows = np.concatenate([self.cluster_rows[i] for i in picks])
                y = self.design.y[rows]
            else:
                rows = all_rows
                sd = np.sqrt((0.0 if self.se_log is None else self.se_log**2) + (tau2 or 0.0))
                y = self.design.y + rng.normal(size=len(rows)) * sd
            if not self.valid(rows):
                skipped += 1
                continue
            t, _ = self.solve(rows, y, start=theta)
            out.append(np.concatenate(self.design.unpack(t)))
        return out, skipped


def _se_log(points: list[dict]) -> np.ndarray | None:
    """SE(log QiD) = qid_se / qid per point (delta method); None when no point has an error.

    A point without one (a mixed table) gets the largest relative error of the others, so it
    never outweighs a measured point.
    """
    values = [p.get("qid_se") / p["qid"] if p.get("qid_se") not in (None, "") and p["qid_se"] > 0 else math.nan for p in points]
    arr = np.asarray(values, dtype=float)
    if np.all(np.isnan(arr)):
        return None
    arr[np.isnan(arr)] = np.nanmax(arr)
    return arr


def _residuals(points: list[dict], y: np.ndarray, pred: np.ndarray, se_log: np.ndarray | None, tau2: float | None) -> list[dict]:
    """Per-point log residuals (observed - fitted), their errors and z = residual / sqrt(se^2 + tau^2)."""
    out = []
    for i, (p, o, f) in enumerate(zip(points, y, pred)):
        entry = {"line": p.get("_line"), "model": p.get("model"), "N": p["N"], "D": p["D"], "bits": p["bits"],
                 "qid": p["qid"], "qid_se": p.get("qid_se"), "qid_fit": float(math.exp(f)), "log_residual": float(o - f)}
        if se_log is not None:
            entry["se_log"] = float(se_log[i])
            entry["z"] = float((o - f) / math.sqrt(se_log[i] ** 2 + (tau2 or 0.0)))
        out.append(entry)
    return out


def _unified_problem(points: list[dict], fold_bits: bool, estimator: str, delta: float, misfit: bool,
                     label: str = "") -> tuple[_Problem, list[str]]:
    """The unified law's regression over points (QiD > 0), checking each factor varies."""
    factors = ["D", "N"] + ([] if fold_bits else ["P"])
    for f in factors:
        distinct = sorted({p[FACTOR_COLUMN[f]] for p in points})
        if len(distinct) < 2:
            name = {"D": "D (training tokens)", "N": "N (non-embedding params)", "P": "bits"}[f]
            raise QuantkitError(
                f"the unified law needs at least 2 distinct values of {name}{label}, got {distinct or 'none'}; "
                "measure more checkpoints/sizes/bit widths or fit a single-factor law (--law D|N|P)"
            )
    y = np.log([p["qid"] for p in points])
    feats = np.column_stack([EXPONENT[f][1] * np.log([float(p[FACTOR_COLUMN[f]]) for p in points]) for f in factors])
    grids = {"D": (0.25, 1.0), "N": (0.1, 0.5), "P": (1.0, 5.0)}

    def valid(rows: np.ndarray) -> bool:
        return all(len({points[i][FACTOR_COLUMN[f]] for i in rows}) >= 2 for f in factors)

    problem = _Problem(Design([()] * len(points), feats, y), _se_log(points) if estimator == "wls" else None,
                       [p.get("model", i) for i, p in enumerate(points)],
                       list(itertools.product(*(grids[f] for f in factors))), valid, estimator, delta, misfit)
    return problem, factors


def _unified_params(theta: np.ndarray, factors: list[str]) -> dict[str, float]:
    """{'log_k', 'beta', 'alpha'[, 'gamma']} from an uncentred parameter vector."""
    out = {"log_k": float(theta[0])}
    for j, f in enumerate(factors):
        out[EXPONENT[f][0]] = float(theta[1 + j])
    return out


def _unified_predict(params: dict[str, float], point: dict) -> float:
    """log QiD of the unified law at a point (gamma absent: bits folded into k)."""
    return (params["log_k"] + params["beta"] * math.log(point["D"]) - params["alpha"] * math.log(point["N"])
            - params.get("gamma", 0.0) * math.log(point["bits"]))


def leave_last_out(points: list[dict], *, fold_bits: bool = False, estimator: str = "wls", delta: float = HUBER_DELTA,
                   misfit: bool = True) -> dict | None:
    """Fit on each size's checkpoints before its last, predict every size's last; None if too few remain."""
    last = {}
    for p in points:
        last[p["N"]] = max(last.get(p["N"], 0), p["D"])
    train = [p for p in points if p["D"] < last[p["N"]]]
    test = [p for p in points if p["D"] == last[p["N"]]]
    try:
        problem, factors = _unified_problem(train, fold_bits, estimator, delta, misfit)
    except QuantkitError:
        return None
    theta, _ = problem.solve(np.arange(len(train)), problem.design.y)
    params = _unified_params(np.concatenate(problem.design.unpack(theta)), factors)
    predictions = []
    for p in test:
        pred = math.exp(_unified_predict(params, p))
        predictions.append({"model": p.get("model"), "N": p["N"], "D": p["D"], "bits": p["bits"], "qid": p["qid"],
                            "qid_pred": pred, "rel_error": pred / p["qid"] - 1.0})
    errors = [abs(e["rel_error"]) for e in predictions]
    return {"n_train": len(train), "n_test": len(test), "params": params,
            "median_abs_rel_error": float(np.median(errors)) if errors else None, "predictions": predictions}


def fit_unified(points: list[dict], *, fold_bits: bool = False, delta: float | None = None, bootstrap: int = 200,
                seed: int | None = None, level: float = 0.95, label: str = "", estimator: str = "wls",
                resample: str | None = None, misfit: bool | None = None, keep_draws: bool = True) -> dict:
    """Fit QiD = k D^beta / (N^alpha P^gamma) to points with QiD > 0 (gamma folded into k if fold_bits); settings
    as fit_settings takes them."""
    resample, delta, misfit, seed = fit_settings(points, estimator=estimator, resample=resample, bootstrap=bootstrap,
                                                 level=level, delta=delta, misfit=misfit, seed=seed)
    check_points(points)
    problem, factors = _unified_problem(points, fold_bits, estimator, delta, misfit, label)
    rows = np.arange(len(points))
    y = problem.design.y
    theta, tau2 = problem.solve(rows, y)
    boots, skipped = problem.bootstrap(theta, tau2, bootstrap, seed, resample)
    full = np.concatenate(problem.design.unpack(theta))
    pred = full[0] + problem.design.features @ full[1:]
    params = {"k": {"value": float(math.exp(full[0])), "ci": percentile_ci([math.exp(b[0]) for b in boots], level)}}
    for j, f in enumerate(factors):
        params[EXPONENT[f][0]] = {"value": float(full[1 + j]), "ci": percentile_ci([float(b[1 + j]) for b in boots], level)}
    se = problem.se_log
    weights = None if se is None else 1.0 / (se**2 + (tau2 or 0.0))
    out = {
        "law": "unified", "formula": UNIFIED_FORMULA if not fold_bits else "QiD = k * D^beta / N^alpha (bits fixed)",
        "params": params, "r2": r_squared(y, pred), "r2_weighted": None if weights is None else r_squared(y, pred, weights),
        "n_points": len(points), "estimator": estimator, "weighted": se is not None,
        "tau": None if tau2 is None else math.sqrt(tau2),
        "bootstrap": {"resamples": len(boots), "skipped_degenerate": skipped, "level": level, "seed": seed, "resample": resample},
        "huber_delta": delta, "residuals": _residuals(points, y, pred, se, tau2),
        "leave_last_out": leave_last_out(points, fold_bits=fold_bits, estimator=estimator, delta=delta, misfit=misfit),
    }
    if keep_draws:
        names = ["log_k"] + [EXPONENT[f][0] for f in factors]
        out["draws"] = {n: [round(float(b[i]), 6) for b in boots] for i, n in enumerate(names)}
    return out


def fit_single(points: list[dict], factor: str, *, delta: float | None = None, bootstrap: int = 200,
               seed: int | None = None, level: float = 0.95, label: str = "", estimator: str = "wls",
               resample: str | None = None, misfit: bool | None = None) -> dict:
    """Fit QiD = c_s * X^(+-e) for X in D, N, P with one constant per slice of the other two factors; settings as
    fit_settings takes them."""
    if factor not in FACTOR_COLUMN:
        raise QuantkitError(f"unknown factor {factor!r}; choose D, N or P")
    resample, delta, misfit, seed = fit_settings(points, estimator=estimator, resample=resample, bootstrap=bootstrap,
                                                 level=level, delta=delta, misfit=misfit, seed=seed)
    check_points(points)
    col = FACTOR_COLUMN[factor]
    others = [FACTOR_COLUMN[f] for f in ("D", "N", "P") if f != factor]
    slices: dict[tuple, list[dict]] = defaultdict(list)
    for p in points:
        slices[tuple(p[o] for o in others)].append(p)
    used = {s: ps for s, ps in slices.items() if len({p[col] for p in ps}) >= 2}
    unused = [dict(zip(others, s), points=len(ps)) for s, ps in slices.items() if s not in used]
    if not used:
        raise QuantkitError(
            f"no slice with fixed {' and '.join(others)} holds 2 or more values of {col}{label}; "
            f"the {factor} law needs points that differ only in {col}"
        )
    pts = [p for ps in used.values() for p in ps]
    groups = [tuple(p[o] for o in others) for p in pts]
    y = np.log([p["qid"] for p in pts])
    name, sign = EXPONENT[factor]
    feats = sign * np.log([float(p[col]) for p in pts])[:, None]
    design = Design(groups, feats, y)
    grid = {"D": [(0.25,), (1.0,)], "N": [(0.1,), (0.5,)], "P": [(1.0,), (5.0,)]}[factor]

    def valid(rows: np.ndarray) -> bool:
        return len({pts[i][col] for i in rows}) >= 2

    problem = _Problem(design, _se_log(pts) if estimator == "wls" else None, [p.get("model", i) for i, p in enumerate(pts)],
                       grid, valid, estimator, delta, misfit)
    theta, tau2 = problem.solve(np.arange(len(pts)), y)
    boots, skipped = problem.bootstrap(theta, tau2, bootstrap, seed, resample)
    full = np.concatenate(design.unpack(theta))
    g = len(design.labels)
    pred = full[design.group_idx] + feats[:, 0] * full[g]
    constants = [dict(zip(others, lab), c=float(math.exp(full[i]))) for i, lab in enumerate(design.labels)]
    return {
        "law": factor, "formula": f"QiD = c_slice * {col}^{'' if sign > 0 else '-'}{name} (slices: fixed {', '.join(others)})",
        "params": {name: {"value": float(full[g]), "ci": percentile_ci([float(b[g]) for b in boots], level)}},
        "constants": constants, "unused_slices": unused, "r2": r_squared(y, pred), "n_points": len(pts),
        "estimator": estimator, "weighted": problem.se_log is not None, "tau": None if tau2 is None else math.sqrt(tau2),
        "bootstrap": {"resamples": len(boots), "skipped_degenerate": skipped, "level": level, "seed": seed, "resample": resample},
        "huber_delta": delta, "residuals": _residuals(pts, y, pred, problem.se_log, tau2),
    }


def compare_methods(points_by_method: dict[str, list[dict]], *, fold_bits: bool = False, bootstrap: int = 200,
                    seed: int | None = None, level: float = 0.95, estimator: str = "wls", resample: str | None = None,
                    delta: float | None = None, misfit: bool | None = None) -> list[dict]:
    """Differences of the unified exponents between methods (b - a) with paired bootstrap intervals; settings as
    fit_settings takes them.

    Pairing: each draw resamples the same checkpoints for both methods (or redraws both within
    their errors), so what the methods share (the checkpoints) does not widen the difference.
    """
    resample, delta, misfit, seed = fit_settings(*points_by_method.values(), estimator=estimator, resample=resample,
                                                 bootstrap=bootstrap, level=level, delta=delta, misfit=misfit, seed=seed)
    for points in points_by_method.values():
        check_points(points)
    methods = sorted(points_by_method)
    out = []
    rng_seed = np.random.SeedSequence(seed)
    for a, b in itertools.combinations(methods, 2):
        pa, pb = points_by_method[a], points_by_method[b]
        try:
            prob_a, factors = _unified_problem(pa, fold_bits, estimator, delta, misfit)
            prob_b, _ = _unified_problem(pb, fold_bits, estimator, delta, misfit)
        except QuantkitError as err:
            out.append({"a": a, "b": b, "skipped": str(err)})
            continue
        names = [EXPONENT[f][0] for f in factors]
        ta, tau_a = prob_a.solve(np.arange(len(pa)), prob_a.design.y)
        tb, tau_b = prob_b.solve(np.arange(len(pb)), prob_b.design.y)
        full_a = np.concatenate(prob_a.design.unpack(ta))[1:]
        full_b = np.concatenate(prob_b.design.unpack(tb))[1:]
        models = sorted({str(p.get("model")) for p in pa} | {str(p.get("model")) for p in pb})
        rows_a = {m: [i for i, p in enumerate(pa) if str(p.get("model")) == m] for m in models}
        rows_b = {m: [i for i, p in enumerate(pb) if str(p.get("model")) == m] for m in models}
        rng = np.random.default_rng(rng_seed.spawn(1)[0])
        diffs: list[np.ndarray] = []
        for _ in range(bootstrap):
            if resample == "points":
                picks = [models[i] for i in rng.integers(0, len(models), size=len(models))]
                ra = np.array([i for m in picks for i in rows_a[m]], dtype=int)
                rb = np.array([i for m in picks for i in rows_b[m]], dtype=int)
                ya, yb = prob_a.design.y[ra], prob_b.design.y[rb]
            else:
                ra, rb = np.arange(len(pa)), np.arange(len(pb))
                sda = np.sqrt((0.0 if prob_a.se_log is None else prob_a.se_log**2) + (tau_a or 0.0))
                sdb = np.sqrt((0.0 if prob_b.se_log is None else prob_b.se_log**2) + (tau_b or 0.0))
                ya = prob_a.design.y + rng.normal(size=len(pa)) * sda
                yb = prob_b.design.y + rng.normal(size=len(pb)) * sdb
            if len(ra) == 0 or len(rb) == 0 or not prob_a.valid(ra) or not prob_b.valid(rb):
                continue
            sa, _ = prob_a.solve(ra, ya, start=ta)
            sb, _ = prob_b.solve(rb, yb, start=tb)
            diffs.append(np.concatenate(prob_b.design.unpack(sb))[1:] - np.concatenate(prob_a.design.unpack(sa))[1:])
        entry: dict = {"a": a, "b": b, "resamples": len(diffs), "level": level, "differences": {}}
        for j, name in enumerate(names):
            ci = percentile_ci([float(d[j]) for d in diffs], level)
            entry["differences"][name] = {
                "value": float(full_b[j] - full_a[j]), "ci": ci,
                "differs": bool(ci is not None and (ci[0] > 0 or ci[1] < 0)),
            }
        out.append(entry)
    return out


def fit_table(table: QidTable, *, method: str | None = None, by_bits: bool = False, laws: tuple[str, ...] = LAWS,
              bootstrap: int = 200, seed: int | None = None, delta: float | None = None, level: float = 0.95,
              estimator: str = "wls", resample: str | None = None, misfit: bool | None = None) -> dict:
    """Fit the requested laws per method (and per bit width with by_bits); compare methods; report every excluded row.
    Settings as fit_settings (quantkit.qid.regression) takes them: None is the default, one the others ignore refused."""
    methods = table.methods(method, "fit")
    rows = [r for r in table.rows if r["method"] in methods]
    table.check_one_eval_text(rows)
    # the fits below are given the arguments as they came (None: not given), each checking them again
    resampled, huber_delta, _, _ = fit_settings(rows, estimator=estimator, resample=resample, bootstrap=bootstrap,
                                                level=level, delta=delta, misfit=misfit, seed=seed)
    errors = [{"line": r.get("_line"), "model": r.get("model"), "method": r.get("method"), "bits": r.get("bits"),
               "reason": f"measurement failed: {r.get('error')}"} for r in table.error_rows
              if method is None or r.get("method") == method]
    out: dict = {"estimator": estimator, "resample": resampled, "huber_delta": huber_delta, "bootstrap": bootstrap,
                 "by_bits": by_bits, "fits": [], "skipped": [], "excluded": list(errors), "method_differences": []}
    explicit = tuple(laws) != LAWS
    kept_by_method: dict[str, list[dict]] = {}
    for m in methods:
        kept, excluded = split_points([r for r in rows if r["method"] == m])
        if not kept and excluded:
            raise QuantkitError(
                f"no row for method {m!r} has QiD > 0 and positive N, D and bits ({len(excluded)} excluded, e.g. "
                f"line {excluded[0]['line']}: {excluded[0]['reason']}); a law in log space needs QiD > 0, "
                "so measure at fewer bits or on more eval tokens"
            )
        kept_by_method[m] = kept
        out["excluded"].extend(excluded)
        subsets = [(None, kept)] if not by_bits else [(b, [p for p in kept if p["bits"] == b]) for b in sorted({p["bits"] for p in kept})]
        for bits, pts in subsets:
            label = f" for method {m!r}" + (f" at {bits} bits" if bits is not None else "")
            for law in laws:
                if by_bits and law == "P":
                    continue
                meta = {"method": m, "bits": bits, "group_size": sorted({p.get("group_size") for p in pts} - {None})}
                common = {"delta": delta, "bootstrap": bootstrap, "seed": seed, "level": level, "label": label,
                          "estimator": estimator, "resample": resample, "misfit": misfit}
                try:
                    fit = fit_unified(pts, fold_bits=by_bits, **common) if law == "unified" else fit_single(pts, law, **common)
                except QuantkitError as err:
                    if explicit or law == "unified":
                        raise
                    out["skipped"].append({**meta, "law": law, "reason": str(err)})
                    continue
                out["fits"].append({**meta, **fit})
    if "unified" in laws and len(kept_by_method) > 1 and bootstrap > 0:
        bit_sets = [None] if not by_bits else sorted({p["bits"] for ps in kept_by_method.values() for p in ps})
        for bits in bit_sets:
            subset = {m: [p for p in ps if bits is None or p["bits"] == bits] for m, ps in kept_by_method.items()}
            for entry in compare_methods(subset, fold_bits=by_bits, bootstrap=bootstrap, seed=seed, level=level,
                                         estimator=estimator, resample=resample, delta=delta, misfit=misfit):
                out["method_differences"].append({"bits": bits, **entry})
    if out["excluded"]:  # said where a user sees it, --json or not (the result lists them under 'excluded')
        lines: dict[str, list[str]] = {}
        for e in out["excluded"]:
            lines.setdefault(e["reason"].split(":")[0], []).append(str(e["line"]))
        logger.warning("%s: %d row(s) left out of the fit: %s", table.source, len(out["excluded"]),
                       "; ".join(f"{why} at line(s) {', '.join(ls)}" for why, ls in lines.items()))
    return out


def _fmt_param(p: dict) -> str:
    """'value [lo, hi]' with 4 significant digits."""
    v = f"{p['value']:.4g}"
    return v + (f"  [{p['ci'][0]:.4g}, {p['ci'][1]:.4g}]" if p.get("ci") else "")


def format_fits(result: dict) -> str:
    """Readable table of a fit_table result."""
    lines = []
    for f in result["fits"]:
        bits = "all bits" if f["bits"] is None else f"{f['bits']} bits"
        b = f["bootstrap"]
        ci = f"{int(round(100 * b['level']))}% CI from {b['resamples']} resamples of {b.get('resample', 'points')}"
        how = f.get("estimator", "huber") + (" weighted by qid_se" if f.get("weighted") else "")
        tau = f"  tau={f['tau']:.3g}" if f.get("tau") is not None else ""
        lines.append(f"{f['method']} | {f['law']} law ({bits}): {f['formula']}")
        lines.append(f"  n_points={f['n_points']}  R^2(log)={f['r2']:.4f}  {how}{tau}  {ci}")
        for name, p in f["params"].items():
            lines.append(f"  {name:<6} {_fmt_param(p)}")
        llo = f.get("leave_last_out")
        if llo and llo.get("median_abs_rel_error") is not None:
            lines.append(f"  leave-last-checkpoint-out: median |relative error| {llo['median_abs_rel_error']:.1%} "
                         f"over {llo['n_test']} points (fit on {llo['n_train']})")
    for d in result.get("method_differences", []):
        if "skipped" in d:
            lines.append(f"difference {d['b']} - {d['a']}: skipped ({d['skipped']})")
            continue
        bits = "all bits" if d["bits"] is None else f"{d['bits']} bits"
        parts = [f"{n} {_fmt_param(v)}{' *' if v['differs'] else ''}" for n, v in d["differences"].items()]
        lines.append(f"difference {d['b']} - {d['a']} ({bits}): " + "; ".join(parts))
    for s in result["skipped"]:
        lines.append(f"skipped {s['method']} | {s['law']} law: {s['reason']}")
    if result["excluded"]:
        lines.append(f"excluded {len(result['excluded'])} row(s):")
        for e in result["excluded"]:
            where = f"line {e['line']}" if e.get("line") else "row"
            extra = f" qid={e['qid']:.3g}" if e.get("qid") is not None else ""
            lines.append(f"  {where}: {e.get('model')} {e.get('method')} {e.get('bits')} bits{extra} ({e['reason']})")
    return "\n".join(lines)
