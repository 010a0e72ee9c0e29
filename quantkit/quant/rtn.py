"""Round-to-nearest: every weight to the nearest point of its group's grid."""

from __future__ import annotations

import torch

from quantkit.errors import QuantkitError
from quantkit.quant.grid import check_finite, fit_groups, max_code, quantize
from quantkit.quant.spec import QuantResult, QuantSpec


def group_index(
    in_features: int, group_size: int, device: torch.device | None = None
) -> torch.Tensor:
    """int32 [in] group of each column for consecutive groups (per-channel: all 0)."""
    columns = torch.arange(in_features, device=device, dtype=torch.int32)
    if group_size == -1:
        return torch.zeros_like(columns)
    return columns // group_size


def rtn_solve(
    weight: torch.Tensor, hessian: torch.Tensor | None, spec: QuantSpec, name: str = ""
) -> QuantResult:
    """Quantize `weight` [out, in] by round-to-nearest; `hessian` is ignored."""
    del hessian  # RTN does not look at the inputs; the argument keeps the solver signature
    if weight.dim() != 2:
        raise QuantkitError(
            f"{name or 'weight'}: expected a 2-D [out, in] weight, got {tuple(weight.shape)}"
        )
    out_features, in_features = weight.shape
    spec.validate(in_features)
    check_finite(weight, "weight", name)
    weight = weight.float()

    scales, zeros = fit_groups(weight, spec, name)
    g_idx = group_index(in_features, spec.group_size, weight.device)
    g = g_idx.long()
    codes = quantize(weight, scales[:, g], zeros[:, g], max_code(spec.bits))
    return QuantResult.of(spec, codes, scales, zeros.to(torch.uint8), g_idx, act_order=False)
