"""How a family stores its experts: the per-expert projection names of its checkpoints and the layout of
transformers' fused expert weights, and the conversion between fused and per-expert tensors
(quantkit.models.experts builds the per-expert modules from them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertNames:
    """The leaf names of one expert's projections (gate is None for experts without a gate)."""

    gate: str | None = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"

    def all(self) -> tuple[str, ...]:
        """The projections in execution order."""
        return tuple(n for n in (self.gate, self.up, self.down) if n is not None)


@dataclass(frozen=True)
class FusedLayout:
    """How a fused experts module stores its projections (transformers' use_experts_implementation flags)."""

    gated: bool = True
    transposed: bool = False  # [E, in, out] instead of [E, out, in]
    bias: bool = False

    def fused_names(self) -> tuple[str, str]:
        """The fused parameters: (gate_up or up, down)."""
        return ("gate_up_proj" if self.gated else "up_proj"), "down_proj"


def expert_names(config: object) -> ExpertNames:
    """The per-expert projection names of the family's checkpoints, from transformers' conversion mapping
    (the weights merged into experts.gate_up_proj / experts.down_proj on load); the per-expert quantized
    layout's gate_proj / up_proj / down_proj where the checkpoints keep experts fused."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    config = getattr(config, "config", config)
    found: dict[str, list[str]] = {}
    for transform in get_checkpoint_conversion_mapping(getattr(config, "model_type", None)) or []:
        if not isinstance(transform, WeightConverter):
            continue
        targets = transform._original_target_patterns
        if len(targets) == 1 and targets[0].endswith(("experts.gate_up_proj", "experts.down_proj", "experts.up_proj")):
            leaves = [s.split(".*.")[-1].removesuffix(".weight") for s in transform._original_source_patterns]
            found[targets[0].rsplit(".", 1)[-1]] = leaves
    if "gate_up_proj" in found and "down_proj" in found and len(found["gate_up_proj"]) == 2:
        return ExpertNames(gate=found["gate_up_proj"][0], up=found["gate_up_proj"][1], down=found["down_proj"][0])
    return ExpertNames()


def split_fused(fused: dict[str, torch.Tensor], layout: FusedLayout, names: ExpertNames) -> dict[str, torch.Tensor]:
    """Per-expert tensors (`<e>.<projection>.weight` / `.bias`, [out, in]) from a fused module's parameters."""
    gate_up_key, down_key = layout.fused_names()
    gate_up, down = fused[gate_up_key], fused[down_key]
    out: dict[str, torch.Tensor] = {}

    def halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # along the last dim
        return t.chunk(2, dim=-1)

    for e in range(gate_up.shape[0]):
        both = gate_up[e] if layout.transposed else gate_up[e].transpose(0, 1)  # [in, out]
        parts = dict(zip((names.gate, names.up), halves(both))) if layout.gated else {names.up: both}
        parts[names.down] = down[e] if layout.transposed else down[e].transpose(0, 1)
        for name, weight in parts.items():
            out[f"{e}.{name}.weight"] = weight.transpose(0, 1).contiguous()
        if layout.bias:
            bias = fused[f"{gate_up_key}_bias"][e]
            parts = dict(zip((names.gate, names.up), halves(bias))) if layout.gated else {names.up: bias}
            parts[names.down] = fused[f"{down_key}_bias"][e]
            for name, b in parts.items():
                out[f"{e}.{name}.bias"] = b.contiguous()
    return out


def join_experts(tensors: dict[str, torch.Tensor], layout: FusedLayout, names: ExpertNames,
                 num_experts: int) -> dict[str, torch.Tensor]:
    """The fused parameters from per-expert tensors (split_fused's inverse)."""
    gate_up_key, down_key = layout.fused_names()

    def both(kind: str, e: int) -> torch.Tensor:  # [..., 2I] along the last dim, as the fused module lays it
        get = (lambda n: tensors[f"{e}.{n}.{kind}"].transpose(0, 1)) if kind == "weight" else (lambda n: tensors[f"{e}.{n}.{kind}"])
        if not layout.gated:
            return get(names.up)
        gate, up = get(names.gate), get(names.up)
        return torch.cat([gate, up], dim=-1)

    gate_up = torch.stack([both("weight", e) for e in range(num_experts)])  # [E, in, 2I]
    down = torch.stack([tensors[f"{e}.{names.down}.weight"].transpose(0, 1) for e in range(num_experts)])  # [E, I, H]
    out = {gate_up_key: gate_up if layout.transposed else gate_up.transpose(1, 2),
           down_key: down if layout.transposed else down.transpose(1, 2)}
    if layout.bias:
        out[f"{gate_up_key}_bias"] = torch.stack([both("bias", e) for e in range(num_experts)])
        out[f"{down_key}_bias"] = torch.stack([tensors[f"{e}.{names.down}.bias"] for e in range(num_experts)])
    return {k: v.contiguous() for k, v in out.items()}
