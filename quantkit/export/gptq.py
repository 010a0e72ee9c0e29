"""GPTQ checkpoint tensors (AutoGPTQ / GPTQModel / vLLM layout), v1 and v2.

Per linear: qweight int32 [in*bits/32, out] (codes packed along the input dim),
qzeros int32 [n_groups, out*bits/32] (packed along the output dim), scales fp16
[n_groups, out], g_idx int32 [in]. v1 ("gptq") stores zero-1 and its decoders add 1 back
after unpacking; v2 ("gptq_v2") stores the zero itself. weight = (q - z[g]) * s[g].
"""

from __future__ import annotations

import torch

from quantkit.errors import QuantkitError
from quantkit.export.common import VERSION, trivial_g_idx
from quantkit.export.packing import pack_codes, unpack_codes
from quantkit.quant.spec import QuantResult

TENSORS = ("qweight", "qzeros", "scales", "g_idx")


def check_v1(name: str, r: QuantResult) -> None:
    """Refuse results that GPTQ v1 cannot store: a zero point of 0 wraps to 2**bits after zero-1+1."""
    if bool((r.zeros == 0).any()):
        raise QuantkitError(
            f"{name}: asymmetric zero point 0 cannot be stored in GPTQ v1 (zero-1 wraps and decodes as "
            f"{1 << r.bits}); export with --format gptq_v2 instead"
        )


def encode(r: QuantResult, version: int) -> dict[str, torch.Tensor]:
    """The four GPTQ tensors of one quantized linear (without the module-name prefix)."""
    zeros = r.zeros.to(torch.int32)
    if version == 1:
        zeros = zeros - 1
        if bool((zeros < 0).any()):
            raise QuantkitError("GPTQ v1 cannot store a zero point of 0; use gptq_v2")
    return {
        "qweight": pack_codes(r.qweight.t().contiguous(), r.bits, dim=0),
        "qzeros": pack_codes(zeros.t().contiguous().to(torch.uint8), r.bits, dim=1),
        "scales": r.scales.t().contiguous().to(torch.float16),
        "g_idx": r.g_idx.to(torch.int32).contiguous(),
    }


def decode(
    t: dict[str, torch.Tensor], *, bits: int, group_size: int, sym: bool, act_order: bool, version: int
) -> QuantResult:
    """Rebuild the exact QuantResult from one linear's GPTQ tensors."""
    scales = t["scales"]
    n_groups, out_f = scales.shape
    in_f = t["g_idx"].shape[0]
    qweight = unpack_codes(t["qweight"], bits, dim=0, length=in_f).t().contiguous()
    zeros = unpack_codes(t["qzeros"], bits, dim=1, length=out_f).t().contiguous()
    if version == 1:
        zeros = zeros.to(torch.int32) + 1
        if bool((zeros > (1 << bits) - 1).any()):
            raise QuantkitError(
                f"GPTQ v1 qzeros hold {(1 << bits) - 1}, which decodes to zero point {1 << bits}: not a valid "
                f"{bits}-bit zero point"
            )
        zeros = zeros.to(torch.uint8)
    g_idx = t["g_idx"].to(torch.int32)
    if g_idx.numel() and int(g_idx.max()) >= n_groups:
        raise QuantkitError(f"g_idx refers to group {int(g_idx.max())} but there are {n_groups} groups")
    return QuantResult(
        qweight=qweight,
        scales=scales.float().t().contiguous(),
        zeros=zeros,
        g_idx=g_idx,
        bits=bits,
        group_size=group_size,
        sym=sym,
        act_order=act_order,
    )


def _block_layout(names: list[str]) -> tuple[str | None, dict[int, list[str]]]:
    """Split 'prefix.<i>.sub' names into the common block prefix and each block's sub-names."""
    prefix: str | None = None
    blocks: dict[int, list[str]] = {}
    for name in names:
        parts = name.split(".")
        idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if idx is None:
            return None, {}
        pre = ".".join(parts[:idx])
        if prefix not in (None, pre):
            return None, {}
        prefix = pre
        blocks.setdefault(int(parts[idx]), []).append(".".join(parts[idx + 1 :]))
    return prefix, blocks


def quantization_config(
    spec: dict,
    results: dict[str, QuantResult],
    version: int,
    *,
    damp: float = 0.01,
    static_groups: bool = False,
    linear_order: list[str] | None = None,
    n_blocks: int | None = None,
) -> dict:
    """config.json's quantization_config (also written as quantize_config.json)."""
    desc_act = spec["act_order"] or any(
        not torch.equal(r.g_idx, trivial_g_idx(r.g_idx.shape[0], r.group_size)) for r in results.values()
    )
    qc: dict = {
        "quant_method": "gptq",
        "bits": spec["bits"],
        "group_size": spec["group_size"],
        "desc_act": bool(desc_act),
        "sym": spec["sym"],
        "checkpoint_format": "gptq" if version == 1 else "gptq_v2",
        "format": "gptq" if version == 1 else "gptq_v2",
        "damp_percent": damp if 0 < damp < 1 else 0.01,
        "true_sequential": True,
        "static_groups": bool(static_groups),
        "lm_head": False,
        "meta": {"quantizer": [f"quantkit:{VERSION}"]},
    }
    prefix, blocks = _block_layout(sorted(results))
    if prefix is None and results:
        outside = sorted(n for n in results if not any(p.isdigit() for p in n.split(".")))[:1] or sorted(results)[-1:]
        raise QuantkitError(
            f"GPTQ checkpoints describe one stack of quantized decoder layers, and {outside[0]} is outside it "
            "(a quantized lm_head or vision side); export to compressed-tensors or fake instead"
        )
    if prefix is not None:
        subs = sorted({s for b in blocks.values() for s in b})
        if linear_order:
            subs = [s for s in linear_order if s in subs] + [s for s in subs if s not in linear_order]
        qc["block_name_to_quantize"] = prefix
        qc["modules_in_block_to_quantize"] = [subs]
        # Linears of a block that some blocks left in FP: GPTQModel/vLLM skip them via "dynamic".
        dynamic = {}
        for i in range(max(n_blocks or 0, max(blocks) + 1)):
            have = blocks.get(i, [])
            for s in subs:
                if s not in have:
                    dynamic["-:^" + (f"{prefix}.{i}.{s}").replace(".", r"\.") + "$"] = {}
        if dynamic:
            qc["dynamic"] = dynamic
    return qc

