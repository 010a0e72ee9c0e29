"""compressed-tensors "pack-quantized" tensors and config (what llm-compressor writes).

Per linear: weight_packed int32 [out, in*bits/32] (signed codes + 2**(bits-1), dense bit
stream along the input dim), weight_scale [out, n_groups] in the model dtype, weight_shape
int [2], and for asymmetric weights weight_zero_point int32 [out*bits/32, n_groups] (signed
zero points packed along the output dim). compressed-tensors' grid is signed,
q_ct = q - 2**(bits-1), zp_ct = z - 2**(bits-1), so (q_ct - zp_ct) * s is our weight exactly;
symmetric schemes store no zero point (it is 0, i.e. our 2**(bits-1)).
"""

from __future__ import annotations

import torch

from quantkit.errors import QuantkitError
from quantkit.export.common import trivial_g_idx
from quantkit.export.packing import pack_codes, unpack_codes
from quantkit.quant.spec import QuantResult

# vLLM's compressed-tensors WNA16 kernels take 4 and 8 bits; compressed-tensors changed its
# 3-bit layout (10 per word -> dense stream) across versions, so other widths are refused.
CT_BITS = (4, 8)


def check_supported(name: str, r: QuantResult) -> None:
    """Raise QuantkitError if pack-quantized cannot hold r exactly."""
    if r.bits not in CT_BITS:
        raise QuantkitError(
            f"compressed-tensors pack-quantized export supports {' and '.join(map(str, CT_BITS))}-bit weights, "
            f"got {r.bits}-bit; export to gptq or gptq_v2 instead"
        )
    if not torch.equal(r.g_idx, trivial_g_idx(r.g_idx.shape[0], r.group_size)):
        raise QuantkitError(
            f"{name}: act-order groups (a permuted g_idx) cannot be stored in compressed-tensors "
            "(actorder='group' was removed); quantize with static groups or export to gptq/gptq_v2"
        )


def encode(r: QuantResult, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors of one linear (without the module-name prefix)."""
    out = {
        "weight_packed": pack_codes(r.qweight, r.bits, dim=1),
        "weight_scale": r.scales.to(scale_dtype).contiguous(),
        "weight_shape": torch.tensor(list(r.qweight.shape), dtype=torch.int64),
    }
    if not r.sym:
        out["weight_zero_point"] = pack_codes(r.zeros, r.bits, dim=0)
    return out


def decode(
    t: dict[str, torch.Tensor], *, bits: int, group_size: int, sym: bool, act_order: bool
) -> QuantResult:
    """Rebuild the exact QuantResult from one linear's pack-quantized tensors."""
    out_f, in_f = (int(v) for v in t["weight_shape"].tolist())
    scales = t["weight_scale"].float().contiguous()
    n_groups = scales.shape[1]
    if scales.shape[0] != out_f:
        raise QuantkitError(f"weight_scale has {scales.shape[0]} rows, weight_shape says {out_f}")
    qweight = unpack_codes(t["weight_packed"], bits, dim=1, length=in_f)
    if sym:
        zeros = torch.full((out_f, n_groups), 1 << (bits - 1), dtype=torch.uint8)
    else:
        zeros = unpack_codes(t["weight_zero_point"], bits, dim=0, length=out_f)
    return QuantResult(
        qweight=qweight,
        scales=scales,
        zeros=zeros,
        g_idx=trivial_g_idx(in_f, group_size),
        bits=bits,
        group_size=group_size,
        sym=sym,
        act_order=act_order,
    )


def quantization_config(spec: dict, ignore: list[str]) -> dict:
    """config.json's quantization_config for one pack-quantized scheme targeting Linear."""
    group = spec["group_size"] != -1
    weights = {
        "num_bits": spec["bits"],
        "type": "int",
        "symmetric": spec["sym"],
        "strategy": "group" if group else "channel",
        "group_size": spec["group_size"] if group else None,
        "dynamic": False,
        "actorder": "weight" if spec["act_order"] else None,
        "observer": "minmax",
        "observer_kwargs": {},
        "block_structure": None,
    }
    if not spec["sym"]:
        weights["zp_dtype"] = "torch.int8"
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": _ct_version(),
    }


def _ct_version() -> str:
    try:
        from importlib.metadata import version

        return version("compressed-tensors")
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"
