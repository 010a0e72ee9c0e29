"""Uniform quantization grids: fitting scale/zero per row, quantizing to codes and back.

Conventions (GPTQ's, so exported checkpoints decode exactly):
- maxq = 2**bits - 1; a code c in [0, maxq] stands for (c - zero) * scale.
- asym: the range [min(w, 0), max(w, 0)] is spread over the codes:
  scale = (xmax - xmin) / maxq, zero = round(-xmin / scale), an integer in [0, maxq].
- sym: scale = 2 * max|w| / maxq, zero = (maxq + 1) / 2 = 2**(bits-1), so the grid
  covers [-scale * 2**(bits-1), scale * (2**(bits-1) - 1)].
- Scales are rounded to fp16 (`scale.half().float()`) before codes are computed, so an
  fp16 scale in a checkpoint reproduces the codes' values bit for bit.
- A row whose range is 0 (all-zero weights) gets the range [-1, 1], never scale 0.
"""

from __future__ import annotations

import torch

from quantkit.errors import QuantkitError
from quantkit.quant.spec import QuantSpec

# Smallest positive fp16 (a subnormal): a scale never rounds to 0 on export.
_MIN_FP16_SCALE = 2.0**-24
_MAX_FP16 = 65504.0
# Clipping search: shrink the range from 1.0 down to 0.5 in steps of 0.01.
MSE_SHRINK_STEPS = 51
MSE_SHRINK_STEP = 0.01
MSE_NORM = 2.0


def max_code(bits: int) -> int:
    """The largest code of a `bits`-bit grid."""
    return 2**bits - 1


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether `tensor` holds no NaN or Inf, read without a tensor-sized temporary (isfinite makes
    two, 1.75x a float32 matrix: at real widths more than the Hessian itself). max and min
    propagate NaN, and an Inf is one of them."""
    if tensor.numel() == 0:
        return True
    return bool(torch.isfinite(tensor.amax())) and bool(torch.isfinite(tensor.amin()))


def check_finite(tensor: torch.Tensor, what: str, name: str = "") -> None:
    """Raise QuantkitError if `tensor` holds NaN or Inf."""
    if not all_finite(tensor):
        where = f" of {name}" if name else ""
        bad = int((~torch.isfinite(tensor)).sum())
        raise QuantkitError(
            f"the {what}{where} holds {bad} NaN/Inf value(s); fix the model or calibration data "
            "before quantizing"
        )


def _per_row(param: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Shape a per-row parameter to broadcast against `values` ([rows] vs [rows, cols])."""
    if param.dim() == values.dim() - 1:
        return param.unsqueeze(-1)
    return param


def quantize(
    weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int
) -> torch.Tensor:
    """Codes (uint8) of `weight` on the grid (scale, zero); scale/zero are per row."""
    scale = _per_row(scale, weight)
    zero = _per_row(zero, weight)
    codes = torch.clamp(torch.round(weight / scale) + zero, 0, maxq)
    return codes.to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The float32 values the codes stand for: (codes - zero) * scale."""
    scale = _per_row(scale, codes)
    zero = _per_row(zero, codes)
    return (codes.float() - zero.float()) * scale.float()


def _round_scale(scale: torch.Tensor, name: str) -> torch.Tensor:
    """Scale rounded to the nearest fp16 value (never 0), as float32."""
    if bool((scale > _MAX_FP16).any()):
        where = f" in {name}" if name else ""
        raise QuantkitError(
            f"a weight range{where} needs a scale above fp16's maximum ({_MAX_FP16}); "
            "the weights are not a sensible quantization target (check the model)"
        )
    return scale.clamp(min=_MIN_FP16_SCALE).half().float()


def _grid_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of the grid covering [xmin, xmax] per row (xmin <= 0 <= xmax)."""
    maxq = max_code(bits)
    if sym:
        half_range = torch.maximum(-xmin, xmax)
        scale = _round_scale(2 * half_range / maxq, name)
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        scale = _round_scale((xmax - xmin) / maxq, name)
        zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    return scale, zero


def _grid_error(
    weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int
) -> torch.Tensor:
    """Per-row sum of |w - dequantize(quantize(w))|**MSE_NORM."""
    restored = dequantize(quantize(weight, scale, zero, maxq), scale, zero)
    return (restored - weight).abs().pow(MSE_NORM).sum(dim=-1)


def fit_grid(
    weight: torch.Tensor, spec: QuantSpec, name: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale [rows] and zero [rows] (float32, integer-valued) of one grid per row of `weight`.

    Min-max; with spec.mse, the range is shrunk by each ratio 1.0, 0.99, ..., 0.5 and each
    row keeps the ratio whose rounded grid has the least squared error.
    """
    if weight.dim() != 2:
        raise QuantkitError(
            f"fit_grid expects a [rows, cols] block, got shape {tuple(weight.shape)}"
        )
    check_finite(weight, "weight", name)
    weight = weight.float()
    zeros = torch.zeros(weight.shape[0], device=weight.device)
    xmin = torch.minimum(weight.min(dim=1).values, zeros)
    xmax = torch.maximum(weight.max(dim=1).values, zeros)
    # An all-zero row: any positive scale reproduces it exactly; GPTQ's [-1, 1] is as good.
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -torch.ones_like(xmin), xmin)
    xmax = torch.where(flat, torch.ones_like(xmax), xmax)

    scale, zero = _grid_from_range(xmin, xmax, spec.bits, spec.sym, name)
    if not spec.mse:
        return scale, zero

    maxq = max_code(spec.bits)
    best_error = _grid_error(weight, scale, zero, maxq)
    for step in range(1, MSE_SHRINK_STEPS):
        ratio = 1.0 - step * MSE_SHRINK_STEP
        cand_scale, cand_zero = _grid_from_range(
            ratio * xmin, ratio * xmax, spec.bits, spec.sym, name
        )
        error = _grid_error(weight, cand_scale, cand_zero, maxq)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        scale = torch.where(better, cand_scale, scale)
        zero = torch.where(better, cand_zero, zero)
    return scale, zero


def fit_groups(
    weight: torch.Tensor, spec: QuantSpec, name: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros [rows, n_groups] of consecutive column groups (per-channel: 1 group)."""
    rows, cols = weight.shape
    group_size = cols if spec.group_size == -1 else spec.group_size
    n_groups = cols // group_size
    # Every (row, group) is an independent grid: fit them all as rows of one block.
    blocks = weight.reshape(rows, n_groups, group_size).reshape(rows * n_groups, group_size)
    scale, zero = fit_grid(blocks, spec, name)
    return scale.reshape(rows, n_groups), zero.reshape(rows, n_groups)
