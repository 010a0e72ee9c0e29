"""Robust fits of QiD scaling laws in log space (Huber loss, L-BFGS, bootstrap intervals).

Every law here is linear in log space, log QiD = intercept(s) + sum_j e_j * x_j:

* unified: log QiD = log k + beta*log D - alpha*log N - gamma*log P (with --by-bits, P is fixed
  within each fit and folded into k, so gamma is not fitted);
* single-factor "D": QiD = c_s * D^beta, "N": QiD = c_s * N^-alpha, "P": QiD = c_s * P^-gamma,
  fitted jointly over slices s in which the other two factors are fixed: one shared exponent,
  one constant c_s per slice (a fixed-effects fit). Slices holding a single value of the factor
  carry no information about its exponent and are left out (reported as unused_slices).

The objective is the mean Huber loss of the log residuals (delta 1e-3, as in Chinchilla's
approach 3), minimised by scipy's L-BFGS-B from a grid of starting points plus an IRLS
(iteratively reweighted least squares) Huber solution; the best end point wins; bootstrap refits
start from the full-data estimate. Confidence intervals are bootstrap
percentiles: resample the rows with replacement, refit, take the (1-level)/2 and (1+level)/2
quantiles. Points with QiD <= 0 have no logarithm: they are excluded and listed, never dropped
silently, as are rows that failed at measurement time.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections import defaultdict
from collections.abc import Iterator

import numpy as np
from scipy.optimize import minimize

from quantkit.errors import QuantkitError
from quantkit.qid.table import QidTable

HUBER_DELTA = 1e-3
FACTOR_COLUMN = {"D": "D", "N": "N", "P": "bits"}
# Name of each factor's exponent and its sign in log QiD (paper convention: all positive when
# QiD grows with D and falls with N and P).
EXPONENT = {"D": ("beta", 1.0), "N": ("alpha", -1.0), "P": ("gamma", -1.0)}
LAWS = ("unified", "D", "N", "P")
UNIFIED_FORMULA = "QiD = k * D^beta / (N^alpha * P^gamma)"


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run tiny dense algebra on one BLAS thread: on busy shared cores threaded OpenBLAS makes L-BFGS ~20x slower."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def irls_huber(X: np.ndarray, y: np.ndarray, delta: float, iters: int = 200) -> np.ndarray:
    """Huber regression by iteratively reweighted least squares (a starting point for L-BFGS)."""
    theta = np.linalg.lstsq(X, y, rcond=None)[0]
    for _ in range(iters):
        w = np.sqrt(np.minimum(1.0, delta / np.maximum(np.abs(y - X @ theta), 1e-300)))
        new = np.linalg.lstsq(X * w[:, None], y * w, rcond=None)[0]
        if np.max(np.abs(new - theta)) < 1e-12:
            return new
        theta = new
    return theta


def huber_objective(theta: np.ndarray, X: np.ndarray, y: np.ndarray, delta: float) -> tuple[float, np.ndarray]:
    """Mean Huber loss of residuals y - X theta (scaled by 1/delta) and its gradient."""
    r = y - X @ theta
    a = np.abs(r)
    loss = np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))
    psi = np.clip(r, -delta, delta)
    n = len(y)
    return float(loss.sum() / (n * delta)), -(X.T @ psi) / (n * delta)


def fit_linear_huber(X: np.ndarray, y: np.ndarray, delta: float = HUBER_DELTA, starts: list[np.ndarray] | None = None,
                     include_ols: bool = True) -> np.ndarray:
    """Minimise the Huber objective from each start (and from least squares); return the best theta."""
    candidates = list(starts or [])
    if include_ols or not candidates:
        candidates.insert(0, irls_huber(X, y, delta))
    best, best_loss = candidates[0], math.inf
    with single_threaded_blas():
        for start in candidates:
            res = minimize(
                huber_objective, np.asarray(start, dtype=float), args=(X, y, delta), jac=True,
                method="L-BFGS-B", options={"maxiter": 500, "gtol": 1e-7, "ftol": 1e-10},
            )
            if np.all(np.isfinite(res.x)) and res.fun < best_loss:
                best, best_loss = res.x, float(res.fun)
    return best


class _Design:
    """Log-space design: one-hot group intercepts plus centred feature columns."""

    def __init__(self, groups: list[tuple], features: np.ndarray, y: np.ndarray):
        """Build the centred design matrix for rows with the given group labels and features."""
        self.labels = sorted(set(groups), key=lambda g: tuple(map(float, g)) if g else ())
        index = {g: i for i, g in enumerate(self.labels)}
        self.group_idx = np.array([index[g] for g in groups], dtype=int)
        self.means = features.mean(axis=0) if len(features) else np.zeros(features.shape[1])
        self.features = features
        self.y = y

    def matrix(self, rows: np.ndarray) -> np.ndarray:
        """Design matrix for a subset (or resample) of row indices."""
        onehot = np.zeros((len(rows), len(self.labels)))
        onehot[np.arange(len(rows)), self.group_idx[rows]] = 1.0
        return np.hstack([onehot, self.features[rows] - self.means])

    def starts(self, y: np.ndarray, rows: np.ndarray, grid: list[tuple[float, ...]]) -> list[np.ndarray]:
        """Starting points: each grid tuple of slopes with the intercepts that fit it in the median."""
        out = []
        for slopes in grid:
            s = np.asarray(slopes, dtype=float)
            rest = y - (self.features[rows] - self.means) @ s
            intercepts = np.array([
                np.median(rest[self.group_idx[rows] == g]) if np.any(self.group_idx[rows] == g) else 0.0
                for g in range(len(self.labels))
            ])
            out.append(np.concatenate([intercepts, s]))
        return out

    def unpack(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(intercepts in uncentred coordinates, slopes)."""
        g = len(self.labels)
        slopes = theta[g:]
        return theta[:g] - self.means @ slopes, slopes


def _ci(samples: list[float], level: float) -> list[float] | None:
    """Percentile interval of bootstrap samples (None without samples)."""
    if not samples:
        return None
    lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def _fit_design(design: _Design, slope_grid: list[tuple[float, ...]], delta: float, bootstrap: int,
                seed: int, level: float, valid_resample) -> tuple[np.ndarray, list[np.ndarray], int]:
    """Point estimate and bootstrap thetas (uncentred: intercepts then slopes)."""
    rows = np.arange(len(design.y))
    theta = fit_linear_huber(design.matrix(rows), design.y, delta, design.starts(design.y, rows, slope_grid))
    rng = np.random.default_rng(seed)
    boots: list[np.ndarray] = []
    skipped = 0
    for _ in range(bootstrap):
        sample = rng.integers(0, len(rows), size=len(rows))
        if not valid_resample(sample):
            skipped += 1
            continue
        y = design.y[sample]
        t = fit_linear_huber(design.matrix(sample), y, delta, [theta], include_ols=False)
        boots.append(np.concatenate(design.unpack(t)))
    return np.concatenate(design.unpack(theta)), boots, skipped


def _goodness(y: np.ndarray, pred: np.ndarray) -> float:
    """R^2 of log QiD."""
    ss_tot = float(((y - y.mean()) ** 2).sum())
    ss_res = float(((y - pred) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def _residuals(points: list[dict], y: np.ndarray, pred: np.ndarray) -> list[dict]:
    """Per-point log residuals (observed - fitted) with enough context to find the row."""
    return [
        {"line": p.get("_line"), "model": p.get("model"), "N": p["N"], "D": p["D"], "bits": p["bits"],
         "qid": p["qid"], "qid_fit": float(math.exp(f)), "log_residual": float(o - f)}
        for p, o, f in zip(points, y, pred)
    ]


def split_points(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(points with QiD > 0, excluded entries for QiD <= 0 with line/model/bits/qid)."""
    kept, excluded = [], []
    for r in rows:
        if r["qid"] > 0 and r["N"] > 0 and r["D"] > 0 and r["bits"] > 0:
            kept.append(r)
        else:
            excluded.append({"line": r.get("_line"), "model": r.get("model"), "method": r.get("method"),
                             "bits": r["bits"], "N": r["N"], "D": r["D"], "qid": r["qid"],
                             "reason": "qid <= 0 (no logarithm)" if r["qid"] <= 0 else "non-positive N, D or bits"})
    return kept, excluded


def fit_unified(points: list[dict], *, fold_bits: bool = False, delta: float = HUBER_DELTA, bootstrap: int = 200,
                seed: int = 0, level: float = 0.95, label: str = "") -> dict:
    """Fit QiD = k D^beta / (N^alpha P^gamma) to points with QiD > 0 (gamma folded into k if fold_bits)."""
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
    design = _Design([()] * len(points), feats, y)
    grids = {"D": (0.25, 1.0), "N": (0.1, 0.5), "P": (1.0, 5.0)}
    slope_grid = list(itertools.product(*(grids[f] for f in factors)))

    def valid(sample: np.ndarray) -> bool:
        return all(len({points[i][FACTOR_COLUMN[f]] for i in sample}) >= 2 for f in factors)

    theta, boots, skipped = _fit_design(design, slope_grid, delta, bootstrap, seed, level, valid)
    pred = theta[0] + feats @ theta[1:]
    params = {"k": {"value": float(math.exp(theta[0])), "ci": _ci([math.exp(b[0]) for b in boots], level)}}
    for j, f in enumerate(factors):
        name = EXPONENT[f][0]
        params[name] = {"value": float(theta[1 + j]), "ci": _ci([float(b[1 + j]) for b in boots], level)}
    return {
        "law": "unified", "formula": UNIFIED_FORMULA if not fold_bits else "QiD = k * D^beta / N^alpha (bits fixed)",
        "params": params, "r2": _goodness(y, pred), "n_points": len(points),
        "bootstrap": {"resamples": len(boots), "skipped_degenerate": skipped, "level": level, "seed": seed},
        "huber_delta": delta, "residuals": _residuals(points, y, pred),
    }


def fit_single(points: list[dict], factor: str, *, delta: float = HUBER_DELTA, bootstrap: int = 200,
               seed: int = 0, level: float = 0.95, label: str = "") -> dict:
    """Fit QiD = c_s * X^(+-e) for X in D, N, P with one constant per slice of the other two factors."""
    if factor not in FACTOR_COLUMN:
        raise QuantkitError(f"unknown factor {factor!r}; choose D, N or P")
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
    design = _Design(groups, feats, y)
    grid = {"D": [(0.25,), (1.0,)], "N": [(0.1,), (0.5,)], "P": [(1.0,), (5.0,)]}[factor]

    def valid(sample: np.ndarray) -> bool:
        return len({pts[i][col] for i in sample}) >= 2

    theta, boots, skipped = _fit_design(design, grid, delta, bootstrap, seed, level, valid)
    g = len(design.labels)
    pred = theta[design.group_idx] + feats[:, 0] * theta[g]
    constants = [dict(zip(others, lab), c=float(math.exp(theta[i]))) for i, lab in enumerate(design.labels)]
    return {
        "law": factor, "formula": f"QiD = c_slice * {col}^{'' if sign > 0 else '-'}{name} (slices: fixed {', '.join(others)})",
        "params": {name: {"value": float(theta[g]), "ci": _ci([float(b[g]) for b in boots], level)}},
        "constants": constants, "unused_slices": unused, "r2": _goodness(y, pred), "n_points": len(pts),
        "bootstrap": {"resamples": len(boots), "skipped_degenerate": skipped, "level": level, "seed": seed},
        "huber_delta": delta, "residuals": _residuals(pts, y, pred),
    }


def fit_table(table: QidTable, *, method: str | None = None, by_bits: bool = False, laws: tuple[str, ...] = LAWS,
              bootstrap: int = 200, seed: int = 0, delta: float = HUBER_DELTA, level: float = 0.95) -> dict:
    """Fit the requested laws per method (and per bit width with by_bits); report every excluded row."""
    rows = table.rows
    methods = sorted({r["method"] for r in rows})
    if method is not None:
        if method not in methods:
            raise QuantkitError(f"no rows for method {method!r}; the table has: {', '.join(methods) or 'none'}")
        methods = [method]
    if not methods:
        raise QuantkitError("the table holds no successful measurements to fit")
    errors = [{"line": r.get("_line"), "model": r.get("model"), "method": r.get("method"), "bits": r.get("bits"),
               "reason": f"measurement failed: {r.get('error')}"} for r in table.error_rows
              if method is None or r.get("method") == method]
    out: dict = {"huber_delta": delta, "bootstrap": bootstrap, "by_bits": by_bits, "fits": [], "skipped": [],
                 "excluded": list(errors)}
    explicit = tuple(laws) != LAWS
    for m in methods:
        kept, excluded = split_points([r for r in rows if r["method"] == m])
        if not kept and excluded:
            raise QuantkitError(
                f"no row for method {m!r} has QiD > 0 and positive N, D and bits ({len(excluded)} excluded, e.g. "
                f"line {excluded[0]['line']}: {excluded[0]['reason']}); a law in log space needs QiD > 0, "
                "so measure at fewer bits or on more eval tokens"
            )
        out["excluded"].extend(excluded)
        subsets = [(None, kept)] if not by_bits else [(b, [p for p in kept if p["bits"] == b]) for b in sorted({p["bits"] for p in kept})]
        for bits, pts in subsets:
            label = f" for method {m!r}" + (f" at {bits} bits" if bits is not None else "")
            for law in laws:
                if by_bits and law == "P":
                    continue
                meta = {"method": m, "bits": bits}
                if law == "unified":
                    fit = fit_unified(pts, fold_bits=by_bits, delta=delta, bootstrap=bootstrap, seed=seed, level=level, label=label)
                else:
                    try:
                        fit = fit_single(pts, law, delta=delta, bootstrap=bootstrap, seed=seed, level=level, label=label)
                    except QuantkitError as err:
                        if explicit:
                            raise
                        out["skipped"].append({**meta, "law": law, "reason": str(err)})
                        continue
                out["fits"].append({**meta, **fit})
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
        ci = f"{int(round(100 * f['bootstrap']['level']))}% CI from {f['bootstrap']['resamples']} resamples"
        lines.append(f"{f['method']} | {f['law']} law ({bits}): {f['formula']}")
        lines.append(f"  n_points={f['n_points']}  R^2(log)={f['r2']:.4f}  {ci}")
        for name, p in f["params"].items():
            lines.append(f"  {name:<6} {_fmt_param(p)}")
    for s in result["skipped"]:
        lines.append(f"skipped {s['method']} | {s['law']} law: {s['reason']}")
    if result["excluded"]:
        lines.append(f"excluded {len(result['excluded'])} row(s):")
        for e in result["excluded"]:
            where = f"line {e['line']}" if e.get("line") else "row"
            extra = f" qid={e['qid']:.3g}" if e.get("qid") is not None else ""
            lines.append(f"  {where}: {e.get('model')} {e.get('method')} {e.get('bits')} bits{extra} ({e['reason']})")
    return "\n".join(lines)
