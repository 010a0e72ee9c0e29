"""The log-space regressions behind the QiD law fits (quantkit.qid.fit): weighted least squares with a misfit term
(Paule-Mandel), the Huber loss minimised from several starts, a design of group intercepts plus centred features,
bootstrap percentile intervals, and the settings a fit takes (fit_settings)."""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator

import numpy as np
from scipy.optimize import minimize

from quantkit.errors import QuantkitError
from quantkit.qid.table import positive

HUBER_DELTA = 1e-3  # Chinchilla's approach 3
ESTIMATORS = ("wls", "huber")
RESAMPLES = ("points", "errors")


def fit_settings(*point_sets: list[dict], estimator: str = "wls", resample: str | None = None, bootstrap: int = 200,
                 level: float = 0.95, delta: float | None = None, misfit: bool | None = None,
                 seed: int | None = None) -> tuple[str, float, bool, int]:
    """A law fit's settings checked at the boundary, each refusal one QuantkitError naming the `qid fit` option and
    the argument; returns (resample, delta, misfit, seed), those left None given their defaults ('points',
    HUBER_DELTA, True, 0). A setting the others make meaningless is refused rather than ignored: delta with wls,
    misfit with huber, resample or seed with bootstrap 0; so is redrawing within errors the points lack."""
    if estimator not in ESTIMATORS:
        raise QuantkitError(f"unknown estimator {estimator!r}; choose {' or '.join(ESTIMATORS)}")
    if resample is not None and resample not in RESAMPLES:
        raise QuantkitError(f"unknown resampling {resample!r}; choose {' or '.join(RESAMPLES)}")
    if not isinstance(bootstrap, numbers.Integral) or isinstance(bootstrap, bool) or bootstrap < 0:
        raise QuantkitError(f"--bootstrap (bootstrap) must be an integer >= 0, got {bootstrap!r}")
    if not isinstance(level, numbers.Real) or isinstance(level, bool) or not 0 < level < 1:
        raise QuantkitError(f"--level (level) must be a number in (0, 1), got {level!r}")
    if delta is not None and (not isinstance(delta, numbers.Real) or isinstance(delta, bool) or not 0 < delta < math.inf):
        raise QuantkitError(f"need --huber-delta > 0 (delta), a finite number, got {delta!r}")
    if misfit is not None and not isinstance(misfit, (bool, np.bool_)):
        raise QuantkitError(f"misfit (--no-misfit) must be True or False, got {misfit!r}")
    if seed is not None and (not isinstance(seed, numbers.Integral) or isinstance(seed, bool)):
        raise QuantkitError(f"--seed (seed) must be an integer, got {seed!r}")
    ignored = []
    if estimator == "wls" and delta is not None:
        ignored.append(f"--huber-delta (delta={delta!r}): it sets estimator huber's loss, and the estimator is wls")
    if estimator == "huber" and misfit is not None:
        ignored.append(f"--no-misfit (misfit={misfit!r}): the misfit term belongs to estimator wls")
    if bootstrap == 0 and resample is not None:
        ignored.append(f"--resample (resample={resample!r}): with --bootstrap 0 (bootstrap=0) nothing is resampled")
    if bootstrap == 0 and seed is not None:
        ignored.append(f"--seed (seed={seed!r}): with --bootstrap 0 (bootstrap=0) nothing is drawn")
    if ignored:
        raise QuantkitError(f"qid fit would ignore {ignored[0]}; drop it or change the option it depends on")
    if estimator == "huber" and resample == "errors":
        raise QuantkitError("--resample errors needs --estimator wls: a Huber fit has no error model to redraw from")
    if point_sets and resample == "errors" and bootstrap > 0 and \
            not any(positive(p.get("qid_se")) for ps in point_sets for p in ps):
        raise QuantkitError("--resample errors (resample='errors') redraws each QiD within its qid_se, and no row has a "
                            "qid_se value (a table `qid measure` did not write?); use --resample points")
    return (resample or "points", HUBER_DELTA if delta is None else float(delta), True if misfit is None else bool(misfit),
            0 if seed is None else int(seed))


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


class Design:
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


def percentile_ci(samples, level: float) -> list[float] | None:
    """Percentile interval of bootstrap samples (None without samples)."""
    if len(samples) == 0:
        return None
    lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def wls_solve(X: np.ndarray, y: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Weighted least squares with weights 1/var (rank-deficient columns get the minimum-norm solution)."""
    sw = 1.0 / np.sqrt(var)
    return np.linalg.lstsq(X * sw[:, None], y * sw, rcond=None)[0]


def wls_misfit(X: np.ndarray, y: np.ndarray, se_log: np.ndarray | None, misfit: bool = True) -> tuple[np.ndarray, float]:
    """(theta, tau^2): WLS with variances se_log^2 + tau^2, tau^2 by Paule-Mandel (0 without misfit).

    Without errors (se_log None) it is ordinary least squares and tau^2 the residual variance.
    """
    n, p = X.shape
    dof = max(n - np.linalg.matrix_rank(X), 1)
    if se_log is None:
        theta = np.linalg.lstsq(X, y, rcond=None)[0]
        return theta, float(((y - X @ theta) ** 2).sum() / dof)
    s2 = np.asarray(se_log, dtype=float) ** 2
    if not misfit:
        return wls_solve(X, y, s2), 0.0

    def excess(tau2: float) -> tuple[float, np.ndarray]:
        var = s2 + tau2
        theta = wls_solve(X, y, var)
        return float((((y - X @ theta) ** 2) / var).sum()) - dof, theta

    floor = 1e-12 * max(float(s2.max()), 1e-12)
    value, theta = excess(floor if s2.min() <= 0 else 0.0)
    if value <= 0:
        return theta, 0.0
    lo, hi = floor, max(float(np.var(y)), floor) * 4.0 + 1.0
    while excess(hi)[0] > 0:
        hi *= 4.0
    for _ in range(80):  # bisection in log tau^2: the excess falls monotonically with tau^2
        mid = math.sqrt(lo * hi)
        if excess(mid)[0] > 0:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-9:
            break
    tau2 = math.sqrt(lo * hi)
    return excess(tau2)[1], tau2


def r_squared(y: np.ndarray, pred: np.ndarray, weights: np.ndarray | None = None) -> float:
    """R^2 of log QiD (weighted when weights are given)."""
    w = np.ones_like(y) if weights is None else weights
    mean = float((w * y).sum() / w.sum())
    ss_tot = float((w * (y - mean) ** 2).sum())
    ss_res = float((w * (y - pred) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
