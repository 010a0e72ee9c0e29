"""GPTQ checkpoints (AutoGPTQ / GPTQModel / vLLM layout), v1 ("gptq") and v2 ("gptq_v2").

Per linear: qweight int32 [in*bits/32, out] (codes packed along the input dim),
qzeros int32 [n_groups, out*bits/32] (packed along the output dim), scales fp16
[n_groups, out], g_idx int32 [in]. v1 stores zero-1 and its decoders add 1 back
after unpacking; v2 stores the zero itself. weight = (q - z[g]) * s[g].

quantization_config describes one stack of decoder layers (block_name_to_quantize,
modules_in_block_to_quantize) at the most common setting. Linears solved with another setting
and linears of that stack left in FP go into GPTQModel's `dynamic` (read by GPTQModel and
vLLM): keys are regexes matched with re.match against the module name, "+:" overriding the
listed fields (bits, group_size, sym, desc_act) and "-:" leaving the module unquantized.
"""

from __future__ import annotations

import logging
import math
import re

import torch

from quantkit.errors import QuantkitError
from quantkit.export.common import VERSION, ExportPlan, Setting, StoredTensors, vllm_fused
from quantkit.export.formats.base import Format
from quantkit.export.packing import pack_codes, unpack_codes
from quantkit.quant.spec import QuantResult

logger = logging.getLogger(__name__)

TENSORS = ("qweight", "qzeros", "scales", "g_idx")
SIDE_CONFIG = "quantize_config.json"


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


def split_block_name(name: str) -> tuple[str, int, str] | None:
    """'prefix.<i>.sub' -> (prefix, i, sub) at the first numeric part, or None without one."""
    parts = name.split(".")
    idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    if idx is None:
        return None
    return ".".join(parts[:idx]), int(parts[idx]), ".".join(parts[idx + 1 :])


def _block_layout(names: list[str]) -> tuple[str | None, dict[int, list[str]]]:
    """Split 'prefix.<i>.sub' names into the common block prefix and each block's sub-names."""
    prefix: str | None = None
    blocks: dict[int, list[str]] = {}
    for name in names:
        split = split_block_name(name)
        if split is None or prefix not in (None, split[0]):
            return None, {}
        prefix = split[0]
        blocks.setdefault(split[1], []).append(split[2])
    return prefix, blocks


def module_pattern(prefix: str, indices: list[int], sub: str) -> str:
    """An anchored regex for `prefix.<i>.sub` over these block indices."""
    index = str(indices[0]) if len(indices) == 1 else "(" + "|".join(map(str, indices)) + ")"
    return "^" + re.escape(prefix) + r"\." + index + r"\." + re.escape(sub) + "$"


def declared_for(qc: dict, name: str) -> tuple | None:
    """(bits, group_size, sym) a GPTQ quantization_config gives linear `name` as GPTQModel reads it, or None where it
    leaves the linear unquantized: outside block_name_to_quantize or modules_in_block_to_quantize, in
    modules_to_not_convert (transformers' substring match), or under a "-:" `dynamic` rule (the first rule whose
    pattern re.match-es the name decides; "+:" or no prefix overrides the top-level fields)."""
    prefix = qc.get("block_name_to_quantize")
    split = split_block_name(name)
    if isinstance(prefix, str) and (split is None or split[0] != prefix):
        return None
    subs = [s for group in qc.get("modules_in_block_to_quantize") or [] for s in (group if isinstance(group, list) else [])]
    if subs and (split is None or split[2] not in subs):
        return None
    if any(isinstance(key, str) and key in name for key in qc.get("modules_to_not_convert") or []):
        return None
    fields = {k: qc.get(k) for k in ("bits", "group_size", "sym")}
    for key, rule in (qc.get("dynamic") or {}).items():
        negative, pattern = str(key).startswith("-:"), str(key).removeprefix("-:").removeprefix("+:")
        try:
            hit = re.match(pattern, name) is not None
        except re.error:
            hit = False  # a pattern loaders cannot compile: declared_settings has said what the config holds
        if hit:
            if negative:
                return None
            fields.update({k: v for k, v in (rule or {}).items() if k in fields})
            break
    return fields["bits"], fields["group_size"], fields["sym"]


class GPTQFormat(Format):
    """GPTQ v1 or v2 packing, with a GPTQModel/vLLM quantization_config."""

    holds_outside_layers = False
    holds_activation_bits = False  # GPTQ configs describe weight-only models
    transformers_extras = "optimum gptqmodel"
    quant_method = "gptq"

    def check_linear(self, name: str, out_features: int, in_features: int, bits: int) -> None:
        """GPTQ packs codes along the input and zero points along the output into whole int32 words."""
        for what, width in (("input", in_features), ("output", out_features)):
            if width * bits % 32:
                raise QuantkitError(
                    f"{name}: {self.name} packs {bits}-bit codes into whole int32 words, and its {what} width {width} "
                    f"does not fill them (a multiple of {32 // math.gcd(32, bits)} is needed); export to "
                    "compressed-tensors or fake"
                )

    def declared_settings(self, quantization_config: dict) -> set[tuple]:
        """The top-level (bits, group_size, sym) and each `dynamic` override's ("-:" rules leave modules in FP)."""
        base = {k: quantization_config.get(k) for k in ("bits", "group_size", "sym")}
        out = {(base["bits"], base["group_size"], base["sym"])}
        for key, fields in (quantization_config.get("dynamic") or {}).items():
            if str(key).startswith("-:") or not isinstance(fields, dict):
                continue
            merged = {**base, **{k: v for k, v in fields.items() if k in base}}
            out.add((merged["bits"], merged["group_size"], merged["sym"]))
        return out

    def check_declared(self, quantization_config: object, settings: dict[str, Setting], where: str,
                       model_names: dict[str, str] | None = None) -> None:
        """Format.check_declared, and the packing the config names: GPTQModel and vLLM read a v2 checkpoint's zero
        points as stored and a v1 checkpoint's as stored + 1, so the other name loads every zero point off by one."""
        super().check_declared(quantization_config, settings, where, model_names)
        for key in ("checkpoint_format", "format"):
            if quantization_config.get(key, self.name) != self.name:
                raise QuantkitError(f"{where}: config.json's quantization_config says {key} "
                                    f"{quantization_config[key]!r} but quantkit.json and the stored tensors are "
                                    f"{self.name}; loaders would shift every zero point (a hand-edited file?): "
                                    "export it again")
        for name, setting in sorted(settings.items()):  # the writer's block layout and rules use checkpoint names
            declared = declared_for(quantization_config, name)
            if declared != (setting.bits, setting.group_size, setting.sym):
                said = f"{declared[0]}-bit g{declared[1]}" if declared else "no quantization (a dense weight)"
                raise QuantkitError(f"{where}: config.json's quantization_config gives {name} {said}, where "
                                    f"quantkit.json stores it {setting.bits}-bit g{setting.group_size}; loaders would "
                                    "read its packed tensors as another model (a hand-edited file?): export it again")

    def __init__(self, version: int) -> None:
        self.version = version
        self.name = "gptq" if version == 1 else "gptq_v2"
        self.help = ("GPTQ v1 (zero-1 stored; AutoGPTQ, GPTQModel, vLLM)" if version == 1
                     else "GPTQ v2 (zero stored as is; GPTQModel, vLLM)")

    def check(self, name: str, r: QuantResult) -> None:
        """Format.check, and v1's zero point 0."""
        super().check(name, r)
        if self.version == 1:
            check_v1(name, r)

    def check_plan(self, plan: ExportPlan) -> None:
        """GPTQ configs describe one stack of quantized decoder layers: nothing outside it."""
        names = sorted(plan.settings)
        prefix, _ = _block_layout(names)
        if prefix is None:
            outside = [n for n in names if split_block_name(n) is None][:1] or names[-1:]
            raise QuantkitError(
                f"GPTQ checkpoints describe one stack of quantized decoder layers, and {outside[0]} is outside it "
                "(a quantized lm_head or vision side); export to compressed-tensors or fake instead"
            )

    def encode(self, name: str, r: QuantResult, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """qweight, qzeros, scales, g_idx; no sidecar."""
        return {f"{name}.{k}": v for k, v in encode(r, self.version).items()}, {}

    def decode(self, name: str, stored: StoredTensors, setting: Setting) -> QuantResult:
        """The four GPTQ tensors back to codes, with `setting` from quantkit.json."""
        return decode(stored.take(name, TENSORS), bits=setting.bits, group_size=setting.group_size, sym=setting.sym,
                      act_order=setting.act_order, version=self.version)

    def quantization_config(self, plan: ExportPlan) -> dict:
        """The base setting at the top level; other settings and skipped linears in `dynamic`."""
        base = plan.base
        qc: dict = {
            "quant_method": "gptq",
            "bits": base.bits,
            "group_size": base.group_size,
            "desc_act": _desc_act(plan, base),
            "sym": base.sym,
            "checkpoint_format": self.name,
            "format": self.name,
            "damp_percent": plan.damp if 0 < plan.damp < 1 else 0.01,
            "true_sequential": True,
            "static_groups": bool(plan.static_groups),
            "lm_head": False,
            "meta": {"quantizer": [f"quantkit:{VERSION}"]},
        }
        prefix, blocks = _block_layout(sorted(plan.settings))
        if prefix is None:
            self.check_plan(plan)
        subs = sorted({s for b in blocks.values() for s in b})
        if plan.linear_order:
            subs = [s for s in plan.linear_order if s in subs] + [s for s in subs if s not in plan.linear_order]
        qc["block_name_to_quantize"] = prefix
        qc["modules_in_block_to_quantize"] = [subs]
        # each linear of the stack that is not at the base setting: "-" (left in FP) or its override's key
        rule_of: dict[str, str] = {}
        stack = [f"{prefix}.{i}.{s}" for i in range(max(plan.n_blocks or 0, max(blocks) + 1)) for s in subs]
        for name in stack:
            if name not in plan.settings:
                rule_of[name] = "-"
        overrides: dict[str, dict] = {}
        for name, setting in plan.overrides().items():
            fields = {"bits": setting.bits, "group_size": setting.group_size, "sym": setting.sym,
                      "desc_act": setting.act_order or name in plan.permuted}
            key = repr(sorted(fields.items()))
            overrides[key] = fields
            rule_of[name] = key
        for fused, shards in vllm_fused(stack):
            found = {rule_of.get(n) for n in shards}
            if len(found) == 1 and None not in found:
                rule_of[fused] = found.pop()  # vLLM looks the fused module up by its own name
            elif len(found) > 1:
                logger.warning("%s have different settings; vLLM loads them as one module and cannot read this GPTQ "
                               "checkpoint (GPTQModel and quantkit can)", ", ".join(shards))
        rules: dict[tuple[str, str], list[int]] = {}  # (sub-name, rule) -> block indices: one pattern each
        for name, key in rule_of.items():
            _, i, s = split_block_name(name)
            rules.setdefault((s, key), []).append(i)
        dynamic = {}
        for (s, key), indices in sorted(rules.items(), key=lambda kv: (kv[0][1] != "-", min(kv[1]), kv[0][0])):
            pattern = module_pattern(prefix, sorted(indices), s)
            dynamic[f"-:{pattern}" if key == "-" else f"+:{pattern}"] = {} if key == "-" else overrides[key]
        if dynamic:
            qc["dynamic"] = dynamic
        return qc

    def config_files(self, quantization_config: dict | None) -> dict[str, dict]:
        """quantize_config.json, which AutoGPTQ and GPTQModel read."""
        return {SIDE_CONFIG: quantization_config} if quantization_config is not None else {}


def _desc_act(plan: ExportPlan, setting: Setting) -> bool:
    """desc_act for the linears at `setting`: their act-order, or any of them with a permuted g_idx."""
    return setting.act_order or any(plan.settings[n] == setting for n in plan.permuted)


V1 = GPTQFormat(1)
V2 = GPTQFormat(2)
