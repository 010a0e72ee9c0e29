"""How a family stores its experts: the per-expert projection names of its checkpoints and the layout of
transformers' fused expert weights, and the conversion between fused and per-expert tensors
(quantkit.models.experts builds the per-expert modules from them)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn


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
    """How a fused experts module stores its projections (transformers' use_experts_implementation flags, or
    FLAGLESS_EXPERTS for the families that run their own loop)."""

    gated: bool = True
    transposed: bool = False  # [E, in, out] instead of [E, out, in]
    bias: bool = False
    # gate, up and down as three parameters instead of gate_up and down (Inkling's shared experts: [E, I, H],
    # [E, I, H], [E, H, I]); with `stacked` (the number of experts), 2-D parameters [E * I, H] whose down rows are
    # stored [in, out] per expert (DBRX's mlp.w1 / v1 / w2)
    separate: tuple[str, str, str] | None = None
    stacked: int = 0

    def fused_names(self) -> tuple[str, ...]:
        """The fused parameters (names relative to the experts module): (gate_up or up, down), or `separate`."""
        if self.separate is not None:
            return self.separate
        return ("gate_up_proj" if self.gated else "up_proj"), "down_proj"


def is_llama4_experts(module: nn.Module) -> bool:
    """Llama 4's experts: fused [E, H, 2I] / [E, I, H], run by the MoE block on router-scaled inputs."""
    return type(module).__name__ == "Llama4TextExperts"


# Expert modules that run their own routing loop, without transformers' use_experts_implementation flags:
# class name -> (layout, the activation's attribute path, whether every token runs every expert)
FLAGLESS_EXPERTS = {
    "InklingExperts": (FusedLayout(), "act_fn", False),
    "InklingSharedExperts": (FusedLayout(separate=("gate_proj", "up_proj", "down_proj")), "act_fn", True),
    "DbrxExperts": (FusedLayout(separate=("mlp.w1", "mlp.v1", "mlp.w2")), "mlp.activation_fn", False),
}


def fused_layout(module: nn.Module) -> FusedLayout | None:
    """The layout of a fused experts module, or None if `module` is not one quantkit can unfuse."""
    if is_llama4_experts(module):
        return FusedLayout(gated=True, transposed=True)
    if type(module).__name__ in FLAGLESS_EXPERTS:
        layout = FLAGLESS_EXPERTS[type(module).__name__][0]
        rows = module.get_parameter(layout.separate[0]).dim() == 2 if layout.separate else False
        return dataclasses.replace(layout, stacked=module.num_experts) if rows else layout
    params = module._parameters
    down = params.get("down_proj")
    first = params.get("gate_up_proj") if getattr(module, "has_gate", None) else params.get("up_proj")
    if not hasattr(module, "is_transposed") or down is None or first is None or down.dim() != 3 or first.dim() != 3:
        return None
    return FusedLayout(gated=bool(module.has_gate), transposed=bool(module.is_transposed), bias=bool(module.has_bias))


def activation_of(fused: nn.Module) -> nn.Module | None:
    """The activation module of an experts module (FLAGLESS_EXPERTS' path, else its act_fn), or None."""
    path = FLAGLESS_EXPERTS[type(fused).__name__][1] if type(fused).__name__ in FLAGLESS_EXPERTS else "act_fn"
    owner, _, leaf = path.rpartition(".")
    act = getattr(fused.get_submodule(owner) if owner else fused, leaf, None)
    return act if isinstance(act, nn.Module) else None


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
    if layout.separate is not None:
        return _split_separate(fused, layout, names)
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
    if layout.separate is not None:
        return _join_separate(tensors, layout, names, num_experts)
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


def _split_separate(fused: dict[str, torch.Tensor], layout: FusedLayout, names: ExpertNames) -> dict[str, torch.Tensor]:
    gate, up, down = (fused[k] for k in layout.separate)
    if layout.stacked:  # [E * I, H] each; down's [I, H] per expert is its [in, out]
        gate, up, down = (t.reshape(layout.stacked, -1, t.shape[-1]) for t in (gate, up, down))
        down = down.transpose(1, 2)
    out = {}
    for e in range(gate.shape[0]):
        for name, weight in zip(names.all(), (gate[e], up[e], down[e])):
            out[f"{e}.{name}.weight"] = weight.contiguous()
    return out


def _join_separate(tensors: dict[str, torch.Tensor], layout: FusedLayout, names: ExpertNames,
                   num_experts: int) -> dict[str, torch.Tensor]:
    gate, up, down = (torch.stack([tensors[f"{e}.{n}.weight"] for e in range(num_experts)]) for n in names.all())
    if layout.stacked:
        down = down.transpose(1, 2)
        gate, up, down = (t.reshape(-1, t.shape[-1]) for t in (gate, up, down))
    return {k: v.contiguous() for k, v in zip(layout.separate, (gate, up, down))}
