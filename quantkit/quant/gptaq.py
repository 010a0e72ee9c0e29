"""FP-target GPTQ (GPTAQ-style asymmetric calibration) as a target-weight change.

TLQ's option "FP target" fits the FP output W x_t with the quantized layer on the
quantized-path input x~_t:  min_Q  sum_t w_t ||Q x~_t - W x_t||^2.
With H~ = sum_t w_t x~_t x~_t^T and C = sum_t w_t x_t x~_t^T, the normal equations give the
best unconstrained target  W' = W C H~^-1, and for every Q

    sum_t w_t ||Q x~_t - W x_t||^2 = sum_t w_t ||(Q - W') x~_t||^2 + const,

because W X - W' X~ is (w-weighted) orthogonal to the rows of X~. So GPTQ on (W', H~)
minimises the FP-target objective over the same grid: the solver itself is unchanged; the
engine only has to accumulate C next to H~ (it needs the FP layer's inputs x_t as well).
Both sums may carry any common normalisation (e.g. 2 / sum w), it cancels in W'.
"""

from __future__ import annotations

import logging

import torch

from quantkit.errors import QuantkitError
from quantkit.quant.gptq import _CHOLESKY_RETRIES, _MIN_RETRY_DAMP, gptq_solve
from quantkit.quant.grid import all_finite
from quantkit.quant.spec import QuantResult, QuantSpec

logger = logging.getLogger(__name__)
# columns of C - H~ taken to float64 at a time (at width 14336 the whole would be 1.6 GB)
_ROWS = 1024


def fp_target_weight(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, damp: float = 0.01,
                     name: str = "", alpha: float = 1.0) -> torch.Tensor:
    """W' = W + alpha W (C - H~) (H~ + damp * mean(diag H~) * I)^-1, float32 [out, in] (float64 inside).

    alpha < 1 applies part of the correction (GPTAQ and QEP use partial strengths): the target moves
    from the quantized path's own output (alpha 0: W' = W) toward the FP output (alpha 1).

    Undamped this is exactly W C H~^-1; written as W plus a correction, the damp only shrinks
    the correction (W' = W when x = x~). weight W [out, in]; hessian H~ = sum w x~ x~^T and
    cross C = sum w x x~^T, both [in, in] with the same normalisation. The engine can equally
    accumulate C - H~ = sum w (x - x~) x~^T directly. Dead inputs (zero diagonal of H~) keep W's column.
    A singular damped H~ (no damp on degenerate inputs) raises the damp tenfold per try, with a warning.
    Solved in float64 by Cholesky, factored in place: one [in, in] float64 matrix (1.6 GB at width 14336).
    """
    in_features = weight.shape[1]
    if tuple(hessian.shape) != (in_features, in_features) or tuple(cross.shape) != (in_features, in_features):
        raise QuantkitError(f"FP target needs [in, in] Hessian and cross term for in = {in_features}")
    # W' = W + W D H^-1 with D = C - H~  <=>  H (W' - W)^T = D^T W^T (H symmetric)
    weight64 = weight.double()
    rhs = torch.empty(in_features, weight.shape[0], dtype=torch.float64, device=weight.device)
    for start in range(0, in_features, _ROWS):  # D^T W^T by column blocks of D: no [in, in] float64 D
        stop = min(start + _ROWS, in_features)
        delta = cross[:, start:stop].double() - hessian[:, start:stop].double()
        torch.mm(delta.T, weight64.T, out=rhs[start:stop])
    del weight64, delta
    dead = torch.diagonal(hessian) == 0
    mean_diag = float(torch.diagonal(hessian).double().where(~dead, 1.0).mean())
    tried = []
    while True:
        h = hessian.to(torch.float64, copy=True)
        h.diagonal()[dead] = 1.0
        h.diagonal().add_(damp * mean_diag)
        # Cholesky (H~ damped is symmetric positive definite): half LU's work, factored in place (the transpose of
        # a symmetric matrix is the column-major layout LAPACK works in: no copy)
        h = h.T
        info = torch.empty((), dtype=torch.int32, device=h.device)
        torch.linalg.cholesky_ex(h, out=(h, info))
        if int(info) == 0:
            correction = torch.cholesky_solve(rhs, h).T
            if all_finite(correction):
                break
        del h
        tried.append(damp)
        if len(tried) > _CHOLESKY_RETRIES:
            raise QuantkitError(f"the FP target{f' of {name}' if name else ''} cannot be solved even with damp {tried}; "
                                "check the calibration inputs (too few tokens, or NaN/degenerate activations)")
        damp = max(damp * 10, _MIN_RETRY_DAMP)
    if tried:
        logger.warning("%s: the FP target's Hessian is singular with damp %g; solved with damp %g",
                       name or "a linear", tried[0], damp)
    del h, rhs
    correction[:, dead] = 0
    if alpha != 1.0:
        correction *= alpha
    correction += weight
    return correction.float()


def gptaq_solve(
    weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, spec: QuantSpec, name: str = "", stats: dict | None = None
) -> QuantResult:
    """GPTQ against H~ toward the FP target W' = W C H~^-1 (see the module doc)."""
    return gptq_solve(fp_target_weight(weight, hessian, cross, spec.damp, name, alpha=spec.fp_alpha), hessian, spec,
                      name=name, stats=stats)
