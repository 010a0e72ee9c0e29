"""Checks and helpers shared by the export formats."""

from __future__ import annotations

import torch

from quantkit.errors import QuantkitError
from quantkit.quant.spec import QuantResult

FORMATS = ("gptq", "gptq_v2", "compressed-tensors", "fake")
VERSION = "0.1.0"


def default_format(bits: int) -> str:
    """compressed-tensors where its packing holds the bit width (4, 8), GPTQ v2 otherwise."""
    return "compressed-tensors" if bits in (4, 8) else "gptq_v2"


def check_format(fmt: str) -> str:
    """Return fmt if it is a known export format, else raise QuantkitError."""
    if fmt not in FORMATS:
        raise QuantkitError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def n_groups_of(r: QuantResult) -> int:
    """Number of quantization groups along the input dimension."""
    return r.scales.shape[1]


def trivial_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """The g_idx of an unpermuted layout: column i belongs to group i // group_size."""
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.int32)
    return (torch.arange(in_features) // group_size).to(torch.int32)


def check_result(name: str, r: QuantResult) -> None:
    """Raise QuantkitError unless r is a well-formed QuantResult (shapes, dtypes, ranges)."""
    if r.bits not in (2, 3, 4, 8):
        raise QuantkitError(f"{name}: bits must be 2, 3, 4 or 8, got {r.bits}")
    if r.qweight.dim() != 2:
        raise QuantkitError(f"{name}: qweight must be 2-D [out, in], got shape {tuple(r.qweight.shape)}")
    out_f, in_f = r.qweight.shape
    n_groups = 1 if r.group_size == -1 else in_f // r.group_size if r.group_size > 0 else 0
    if r.group_size != -1 and (r.group_size <= 0 or in_f % r.group_size):
        raise QuantkitError(f"{name}: group size {r.group_size} does not divide the input width {in_f}")
    expect = {
        "qweight": ((out_f, in_f), torch.uint8),
        "scales": ((out_f, n_groups), torch.float32),
        "zeros": ((out_f, n_groups), torch.uint8),
        "g_idx": ((in_f,), torch.int32),
    }
    for field, (shape, dtype) in expect.items():
        t = getattr(r, field)
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise QuantkitError(
                f"{name}: {field} must be {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}"
            )
    maxq = (1 << r.bits) - 1
    if int(r.qweight.max()) > maxq or int(r.zeros.max()) > maxq:
        raise QuantkitError(f"{name}: codes or zeros exceed the {r.bits}-bit range 0..{maxq}")
    if r.g_idx.numel() and (int(r.g_idx.min()) < 0 or int(r.g_idx.max()) >= n_groups):
        raise QuantkitError(f"{name}: g_idx values must lie in 0..{n_groups - 1}")
    if not torch.equal(r.scales.to(torch.float16).float(), r.scales):
        raise QuantkitError(f"{name}: scales are not exactly representable in float16")
    if r.sym and not bool((r.zeros == (1 << (r.bits - 1))).all()):
        raise QuantkitError(f"{name}: a symmetric result must have every zero equal to {1 << (r.bits - 1)}")


def common_spec(results: dict[str, QuantResult]) -> dict:
    """The one (bits, group_size, sym) all results share, plus act_order if any uses it."""
    if not results:
        raise QuantkitError("no quantized modules given; quantize the model before exporting it")
    keys = {(r.bits, r.group_size, r.sym) for r in results.values()}
    if len(keys) != 1:
        raise QuantkitError(
            f"modules were quantized with different (bits, group_size, sym) settings {sorted(keys)}; "
            "export needs one setting for the whole model"
        )
    bits, group_size, sym = keys.pop()
    act_order = any(r.act_order for r in results.values())
    return {"bits": bits, "group_size": group_size, "sym": sym, "act_order": act_order}
