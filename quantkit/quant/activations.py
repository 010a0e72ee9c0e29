"""Per-token dynamic symmetric fake-quantization of a linear's input (W8A8 / W4A8 activations).

Each token's row x gets its own scale s = max|x| / divisor, is rounded to integers clamped to the
signed range [-2**(bits-1), 2**(bits-1) - 1] and multiplied back by s. The default divisor is
qmax = 2**(bits-1) - 1, the convention of vLLM's dynamic per-token int8 kernel; compressed-tensors'
own fake-quantization (what transformers applies when it loads the export) divides by half the
integer range, (2**bits - 1) / 2 (CT_DIVISOR).
"""

from __future__ import annotations

import torch

from quantkit.errors import QuantkitError

ACT_BITS = (4, 8)


def act_qmax(bits: int) -> int:
    """The largest signed code of a `bits`-bit activation grid."""
    return (1 << (bits - 1)) - 1


def ct_divisor(bits: int) -> float:
    """compressed-tensors' symmetric scale divisor: half the integer range, (2**bits - 1) / 2."""
    return ((1 << bits) - 1) / 2


def check_act_bits(bits: int | None) -> None:
    """Raise QuantkitError unless `bits` is None (weight-only) or a supported activation width."""
    if bits is not None and bits not in ACT_BITS:
        raise QuantkitError(f"--act-bits must be one of {ACT_BITS} (or omitted for weight-only), got {bits}")


def token_scales(x: torch.Tensor, bits: int = 8, divisor: float | None = None) -> torch.Tensor:
    """Per-token scales max|x| / divisor over the last dimension, shaped [..., 1] (all-zero rows get 1)."""
    divisor = float(act_qmax(bits)) if divisor is None else float(divisor)
    absmax = x.abs().amax(dim=-1, keepdim=True)
    scale = absmax / divisor
    # an all-zero row quantizes to zeros whatever its scale; 1 keeps the division finite
    return torch.where(absmax > 0, scale, torch.ones_like(scale))


def fake_quantize_tokens(x: torch.Tensor, bits: int = 8, divisor: float | None = None) -> torch.Tensor:
    """x with each token (row of the last dimension) rounded to its own symmetric `bits`-bit grid, dequantized."""
    check_act_bits(bits)
    scale = token_scales(x, bits, divisor)
    low, high = -(1 << (bits - 1)), act_qmax(bits)
    return torch.clamp(torch.round(x / scale), low, high) * scale
