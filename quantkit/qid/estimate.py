"""Training level from QiD: invert QiD = k D^beta / (N^alpha P^gamma) for D, with an interval.

The point estimate inverts the fitted law at the measured QiD. The interval propagates both
uncertainties by simulation: each of the fit's bootstrap draws (k, alpha, beta, gamma) is paired
with a QiD drawn within its standard error (log-normal, SE(log QiD) = SE / QiD, so a draw never
goes negative) and inverted; the interval is the percentile range of those D. Draws whose beta
is not positive (QiD then does not grow with D) cannot be inverted and are counted, not used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from quantkit.errors import QuantkitError
from quantkit.qid.laws import UnifiedLaw


def training_level(law: UnifiedLaw, n_params: float, qid: float, bits: float, *, qid_se: float | None = None,
                   draws: Sequence[UnifiedLaw] = (), level: float = 0.95, samples: int = 2000, seed: int = 0) -> dict:
    """D at which a model of n_params reaches `qid` at `bits` under `law`, with a percentile interval."""
    if not (isinstance(qid, (int, float)) and math.isfinite(qid)) or qid <= 0:
        raise QuantkitError(
            f"the measured QiD is {qid!r}, not positive: the law's logarithm has no value there; "
            "measure at fewer bits or on more eval tokens"
        )
    if qid_se is not None and (not math.isfinite(qid_se) or qid_se < 0):
        raise QuantkitError(f"the QiD standard error must be a finite number >= 0, got {qid_se!r}")
    if law.beta <= 0:
        raise QuantkitError(f"the law's beta is {law.beta:.4g}: QiD does not grow with D, so it cannot be inverted for tokens")
    # in logs: a law with a small beta sends D past float range, which is an answer (unbounded), not an error
    log_tokens = (math.log(qid) + law.alpha * math.log(n_params) + law.gamma * math.log(bits) - math.log(law.k)) / law.beta
    rng = np.random.default_rng(seed)
    laws = list(draws) or [law]
    picks = rng.integers(0, len(laws), size=samples)
    log_q = math.log(qid) + (rng.normal(size=samples) * (qid_se / qid) if qid_se else np.zeros(samples))
    log_k = np.array([math.log(laws[i].k) for i in picks])
    alpha = np.array([laws[i].alpha for i in picks])
    beta = np.array([laws[i].beta for i in picks])
    gamma = np.array([laws[i].gamma for i in picks])
    usable = beta > 0
    log_d = (log_q[usable] + alpha[usable] * math.log(n_params) + gamma[usable] * math.log(bits) - log_k[usable]) / beta[usable]
    interval = log_interval = None
    if log_d.size and (draws or qid_se):
        lo, hi = np.percentile(log_d, [50 * (1 - level), 50 * (1 + level)])
        log_interval = [float(lo / math.log(10)), float(hi / math.log(10))]
        with np.errstate(over="ignore"):
            interval = [float(np.exp(lo)), float(np.exp(hi))]
    with np.errstate(over="ignore"):
        tokens = float(np.exp(log_tokens))
    return {
        "tokens": tokens, "ci": interval, "log10_tokens": log_tokens / math.log(10), "log10_ci": log_interval, "level": level, "qid": qid, "qid_se": qid_se, "N": n_params, "bits": bits,
        "law": law.to_dict(), "law_draws": len(draws), "samples": int(samples),
        "unusable_samples": int((~usable).sum()),
        "sources": [s for s, on in (("law draws", bool(draws)), ("qid_se", bool(qid_se))) if on],
    }
