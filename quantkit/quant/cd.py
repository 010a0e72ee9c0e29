"""Coordinate descent over GPTQ's codes on the layer objective tr((W - Q) H (W - Q)^T).

GPTQ fixes each column once and never revisits it; later columns' error feedback leaves earlier
columns' codes suboptimal for the final objective. A sweep visits every column and moves each
row's code to the grid point that minimises the objective with all other codes fixed (the scale
and zero point of the grid stay as GPTQ chose them), as GuidedQuant's LNQ and "GPTQ + CD" do.
Along one code the objective is a parabola f(q + d) = f(q) - 2 d r + d^2 H_ii with
r = ((W - Q) H)_i, so the best grid point is the one nearest to q + r / H_ii; a move is taken only
where it lowers f, so no sweep raises the objective.
With the FP target (quantkit.quant.gptaq) W is the FP target W C H~^-1 and the objective differs
from the FP-target one by a constant, so the cross term is covered.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from quantkit.quant.grid import max_code
from quantkit.quant.spec import QuantResult


def refine_codes(weight: torch.Tensor, hessian: torch.Tensor, result: QuantResult, sweeps: int) -> QuantResult:
    """`result` with its codes improved by `sweeps` coordinate-descent sweeps on tr((W - Q) H (W - Q)^T).

    weight [out, in] is the target the codes approximate, hessian [in, in]; scales, zero points and
    g_idx are kept. Columns with H_ii = 0 (dead inputs) are left alone. A sweep that moves no code
    ends the descent early.
    """
    if sweeps <= 0:
        return result
    dtype = torch.float64 if hessian.device.type == "cpu" else torch.float32
    group = result.g_idx.long().to(weight.device)
    scale = result.scales[:, group].to(weight.device, dtype)
    zero = result.zeros[:, group].to(weight.device, dtype)
    codes = result.qweight.to(weight.device, dtype)
    hessian = hessian.to(weight.device, dtype)
    delta = weight.to(dtype) - (codes - zero) * scale
    residual = delta @ hessian  # r = (W - Q) H, kept current as codes move
    maxq = max_code(result.bits)
    diagonal = torch.diagonal(hessian)
    live = (diagonal > 0).nonzero().reshape(-1).tolist()
    for _ in range(sweeps):
        moved = 0
        for column in live:
            h_ii = diagonal[column]
            col_scale, col_codes = scale[:, column], codes[:, column]
            best = torch.clamp(torch.round(col_codes + residual[:, column] / (h_ii * col_scale.clamp_min(1e-30))), 0, maxq)
            step = (best - col_codes) * col_scale  # change of Q's column
            gain = 2 * step * residual[:, column] - step.square() * h_ii  # f(q) - f(q + step)
            take = gain > 0
            if not bool(take.any()):
                continue
            step = torch.where(take, step, torch.zeros_like(step))
            codes[:, column] = torch.where(take, best, col_codes)
            residual.addr_(step, hessian[column], alpha=-1)  # D loses `step` in this column
            moved += int(take.sum())
        if moved == 0:
            break
    return replace(result, qweight=codes.round().to(torch.uint8).to(result.qweight.device))
