"""Mixture-of-experts layers as per-expert linears (quantkit.models.experts), checked against transformers' own
MoE code: the unfused model computes transformers' logits, each expert linear sees exactly the tokens that
transformers' router sends its expert, and exports store experts under the family's checkpoint names and load
back in plain transformers with the quantized model's logits."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import MOE_FAMILIES, tiny_causal_lm, tiny_moe

import quantkit
from quantkit.export import save_quantized
from quantkit.models.experts import (
    ExpertLinear,
    RoutedExperts,
    expert_solve_groups,
    fuse_experts,
    set_all_tokens,
    unfuse_experts,
)
from quantkit.quant.rtn import rtn_solve
from quantkit.quant.spec import QuantSpec


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def eager(model):
    """The model running transformers' eager experts loop (its reference implementation)."""
    if hasattr(model, "set_experts_implementation") and model.config.model_type != "llama4_text":
        model.set_experts_implementation("eager")
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_unfused_experts_compute_transformers_logits(family: str) -> None:
    """Unfused, the model gives transformers' eager logits (to float rounding), also running every expert on
    every token for statistics; fused back, it is transformers' module again with the same logits."""
    model = eager(tiny_moe(family))
    ref = logits(model, IDS)
    unfused = copy.deepcopy(model)
    replaced = unfuse_experts(unfused)
    assert replaced and all(isinstance(unfused.get_submodule(n), RoutedExperts) for n in replaced)
    assert not [n for n, p in unfused.named_parameters() if p.dim() >= 3]  # no fused weight is left uncovered
    assert rel(logits(unfused, IDS), ref) <= 1e-6
    set_all_tokens(unfused, True)
    assert rel(logits(unfused, IDS), ref) <= 1e-6
    set_all_tokens(unfused, False)
    fuse_experts(unfused)
    for name in replaced:
        assert type(unfused.get_submodule(name)) is type(model.get_submodule(name))
    assert unfused.state_dict().keys() == model.state_dict().keys()
    assert rel(logits(eager(unfused), IDS), ref) <= 1e-6


def transformers_routing(model, family: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per MoE layer, from transformers' own modules: the experts' input [N, H], each token's chosen experts
    [N, k], and what scales an expert's input on each token (Llama 4's router scores; ones elsewhere) [N, E]."""
    seen = []
    handles = []
    for module in model.modules():
        if family == "llama4_text" and type(module).__name__ == "Llama4TextMoe":
            def block(mod, args, out):
                hidden = args[0].reshape(-1, args[0].shape[-1])
                scores = mod.router(hidden)[0]  # the chosen experts' sigmoid scores, 0 elsewhere
                seen.append((hidden, torch.topk(out[1], mod.top_k, dim=1).indices, scores))
            handles.append(module.register_forward_hook(block))
        elif family != "llama4_text" and any(p.dim() == 3 for p in module.parameters(recurse=False)):
            handles.append(module.register_forward_pre_hook(
                lambda mod, args: seen.append((args[0], args[1], torch.ones(args[0].shape[0], mod.num_experts)))))
    logits(model, IDS)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_each_expert_linear_sees_the_tokens_routed_to_it(family: str) -> None:
    """Every call of an expert's first projection carries the experts' input on exactly the tokens transformers'
    router chose for that expert (scaled by the router's score for Llama 4), and `routed_tokens` names them;
    with every expert on every token, each call carries all tokens."""
    model = eager(tiny_moe(family))
    routing = transformers_routing(copy.deepcopy(model), family)
    unfuse_experts(model)
    calls: dict[str, list] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, ExpertLinear) and name.endswith((".gate_proj", ".w1")):
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, name=name: calls.setdefault(name, []).append((args[0].clone(), mod.routed_tokens.clone()))))
    logits(model, IDS)
    containers = [name for name, m in model.named_modules() if isinstance(m, RoutedExperts)]
    assert len(containers) == len(routing)
    hit = 0
    for depth, (container, (hidden, chosen, scale)) in enumerate(zip(containers, routing)):
        experts = model.get_submodule(container)
        for e in range(experts.num_experts):
            name = f"{container}.{e}.{experts[e].names.gate}"
            routed = torch.where((chosen == e).any(dim=1))[0]
            if routed.numel() == 0:
                assert name not in calls
                continue
            [(x, tokens)] = calls[name]
            assert torch.equal(tokens.sort().values, routed)
            expected = hidden[tokens] * scale[tokens, e, None]
            if depth == 0:
                assert torch.equal(x, expected)
            else:  # the layers below ran their experts as separate linears here, fused in transformers: another
                # summation order, so the hidden states differ by a few float32 ulps (2.4e-7 at |h| ~ 1.9 seen)
                assert torch.allclose(x, expected, rtol=1e-5, atol=1e-6)
            hit += 1
    assert hit >= len(routing) * 2
    calls.clear()
    set_all_tokens(model, True)
    logits(model, IDS)
    assert calls and all(torch.equal(t, torch.arange(IDS.numel())) for entries in calls.values() for _, t in entries)
    for handle in handles:
        handle.remove()


def fused_gates(module) -> torch.Tensor:
    """[E, I, H]: each expert's gate weight, read from a flagless experts module as its own forward reads it."""
    if type(module).__name__ == "DbrxExperts":
        return module.mlp.w1.view(module.num_experts, -1, module.mlp.w1.shape[-1])
    if type(module).__name__ == "InklingSharedExperts":
        return module.gate_proj
    return module.gate_up_proj.chunk(2, dim=1)[0]  # InklingExperts: the first half of gate_up


@pytest.mark.parametrize("family", ["dbrx", "inkling_text"])
def test_experts_without_transformers_flags_see_the_tokens_routed_to_them(family: str) -> None:
    """Experts that run their own loop (DBRX's 2-D w1 / v1 / w2, Inkling's routed and gamma-weighted shared experts):
    unfused, the model gives transformers' logits and fuses back to the same tensors; each expert's gate projection
    gets exactly the tokens transformers' router chose for it (a shared expert: every token), with the FP weights
    of that expert's slice of the fused parameters."""
    model = tiny_causal_lm(family)
    ref = logits(model, IDS)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []  # per experts module call: (class, hidden [N, H], chosen experts [N, k]; None: shared, every token)
    handles = [m.register_forward_pre_hook(lambda mod, args: seen.append(
        (type(mod).__name__, args[0].reshape(-1, args[0].shape[-1]), args[1] if len(args) > 1 else None)))
        for m in model.modules() if type(m).__name__ in ("DbrxExperts", "InklingExperts", "InklingSharedExperts")]
    logits(model, IDS)
    for handle in handles:
        handle.remove()
    fused = [m for m in model.modules() if type(m).__name__ in ("DbrxExperts", "InklingExperts", "InklingSharedExperts")]
    fp_gates = [fused_gates(m).detach().clone() for m in fused]
    unfuse_experts(model)
    calls: dict[str, list] = {}
    for name, module in model.named_modules():
        if isinstance(module, ExpertLinear) and name.endswith(".gate_proj"):
            module.register_forward_pre_hook(
                lambda mod, args, name=name: calls.setdefault(name, []).append((args[0].clone(), mod.routed_tokens.clone())))
    assert rel(logits(model, IDS), ref) <= 1e-5
    containers = [name for name, m in model.named_modules() if isinstance(m, RoutedExperts)]
    assert len(containers) == len(seen) == len(fp_gates) and len(containers) >= 2
    hit = 0
    for container, (_, hidden, chosen), fp_gate in zip(containers, seen, fp_gates):
        experts = model.get_submodule(container)
        for e in range(experts.num_experts):
            name = f"{container}.{e}.gate_proj"
            assert torch.equal(experts[e].gate_proj.weight, fp_gate[e])
            routed = torch.arange(hidden.shape[0]) if chosen is None else torch.where((chosen == e).any(dim=1))[0]
            if routed.numel() == 0:
                assert name not in calls
                continue
            [(x, tokens)] = calls[name]
            assert torch.equal(tokens.sort().values, routed)
            assert torch.allclose(x, hidden[tokens], rtol=1e-5, atol=1e-6)  # Inkling's later layers: summing order
            hit += 1
    assert hit >= len(containers) * 2
    fuse_experts(model)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_a_per_expert_norm_after_the_experts_scales_each_expert_by_its_own_weight() -> None:
    """Ergo normalises each expert's output with that expert's own scale (a [experts, hidden] weight) in its own
    forward, outside transformers' flagged projections: unfused, the model gives transformers' logits, and fused
    back its tensors (the norm's weight included) are the same."""
    model = tiny_causal_lm("ergo")
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "ErgoExpertNorm":
                module.weight.uniform_(0.5, 1.5)  # distinct per expert: a norm left out or shared shows
    ref = logits(model, IDS)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert unfuse_experts(model)
    assert rel(logits(model, IDS), ref) <= 1e-5
    fuse_experts(model)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_solve_groups_put_gate_and_up_before_down() -> None:
    """Every expert's gate and up read the layer's hidden state (one group), every down reads its own expert's
    activation (the next group)."""
    model = tiny_moe("mixtral")
    unfuse_experts(model)
    first, second = expert_solve_groups(model.model.layers[0])
    assert first == [f"mlp.experts.{e}.{p}" for e in range(4) for p in ("w1", "w3")]
    assert second == [f"mlp.experts.{e}.w2" for e in range(4)]


def quantize_randomly(model) -> dict:
    """RTN results (4-bit, groups of 16) for every decoder-layer linear but the routers and gates; the model
    gets their dequantized weights."""
    results = {}
    spec = QuantSpec(bits=4, group_size=16)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name and not name.endswith(("router", "gate")):
            results[name] = rtn_solve(module.weight.data.float(), None, spec)
            module.weight.data.copy_(results[name].dequantize())
    return results


# gpt-oss checkpoints keep experts fused and transformers reads no per-expert quantized layout for them: the export
# stores its experts dense (dequantized) under the fused checkpoint's own keys
FUSED_ONLY = {"gpt_oss"}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_export_writes_experts_as_the_family_checkpoint_does(family: str, tmp_path) -> None:
    """Quantized experts are stored per expert under the names transformers' own save_pretrained gives the FP
    experts (Mixtral: block_sparse_moe.experts.E.w1; Llama 4, whose checkpoints keep experts fused, the per-expert
    gate_proj / up_proj / down_proj transformers' quantized loading reads), or, where transformers reads a family's
    experts only fused (gpt-oss), dense under the fused keys; quantkit reads both formats back to the exact
    dequantized model, and transformers loads the compressed-tensors export with its logits."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = tiny_moe(family)
    model.save_pretrained(tmp_path / "fp")
    with safe_open(str(tmp_path / "fp" / "model.safetensors"), "pt") as f:
        fp_keys = set(f.keys())
    unfuse_experts(model)
    results = quantize_randomly(model)
    ref = logits(model, IDS)
    per_expert = {k.removesuffix(".weight") for k in fp_keys if ".experts.0." in k and k.endswith(".weight")}
    fused = {k for k in fp_keys if ".experts.gate_up_proj" in k or ".experts.down_proj" in k}
    if family in FUSED_ONLY:
        per_expert, fused_kept = set(), fused
    elif not per_expert:  # a fused checkpoint: the quantized per-expert layout
        prefix = next(k for k in fp_keys if k.endswith("experts.gate_up_proj")).removesuffix("gate_up_proj")
        layer = prefix.split(".layers.")[1].split(".")[0]
        per_expert = {f"{prefix}0.{p}".replace(f".layers.{layer}.", ".layers.1.") for p in ("gate_proj", "up_proj", "down_proj")}
    if family not in FUSED_ONLY:
        fused_kept = set()
    for fmt, suffix in (("compressed-tensors", "weight_packed"), ("gptq", "qweight")):
        out = save_quantized(model, results, tmp_path / fmt, fmt=fmt)
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
        for name in per_expert:
            assert f"{name}.{suffix}" in keys, name
        assert {k for k in keys if ".experts.gate_up_proj" in k or ".experts.down_proj" in k} == fused_kept
        # every other tensor is stored under the name transformers' save_pretrained gives it
        quantized = set(json.loads((out / "quantkit.json").read_text())["quantized_modules"])
        for key in fp_keys - (fused - fused_kept):
            module = key.rsplit(".", 1)[0]
            assert (f"{module}.{suffix}" if module in quantized else key) in keys, key
        back = quantkit.load_quantized(out)
        assert not [n for n, m in back.named_modules() if isinstance(m, RoutedExperts)]  # transformers' modules
        assert torch.equal(logits(back, IDS), ref) or rel(logits(back, IDS), ref) <= 1e-6
        if fmt == "compressed-tensors":
            loaded = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
            assert rel(logits(loaded, IDS), ref) <= 1e-3
