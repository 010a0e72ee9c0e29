"""Layer-wise engine: layer replay, Hessian accumulation and quantization exposure, checked
against independent full-model forwards with hooks (never against the engine itself)."""

from __future__ import annotations

import copy

import helpers
import pytest
import torch
from helpers import observing
from torch import nn

from quantkit.engine import calibrate_model
from quantkit.engine.capture import capture_layer_inputs, run_layer
from quantkit.engine.layerwise import accumulate_group
from quantkit.engine.plan import assign_owners
from quantkit.errors import QuantkitError
from quantkit.models import adapter_for, get_module
from quantkit.quant import QuantSpec, gptq_solve, rtn_solve

KINDS = ("llama", "qwen2", "gpt_neox", "opt")
SPEC = QuantSpec(bits=2, group_size=32, act_order=False)  # the references below solve in column order


def tiny_model(kind: str, layers: int = 2, seed: int = 0) -> nn.Module:
    """A random hidden-64 causal LM of the given family, in eval mode."""
    common = dict(vocab_size=96, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                  max_position_embeddings=64)
    own = {"llama": dict(intermediate_size=128, num_key_value_heads=2),
           "qwen2": dict(intermediate_size=128, num_key_value_heads=2),
           "gpt_neox": dict(intermediate_size=128), "opt": dict(ffn_dim=128, word_embed_proj_dim=64)}[kind]
    model = helpers.tiny_model(kind, seed=seed, **common, **own).eval()
    model.config.use_cache = False
    return model


def tiny_samples(n: int = 4, tokens: int = 16, seed: int = 1) -> list[dict]:
    """`n` random token windows of length `tokens`."""
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 96, (1, tokens), generator=gen)} for _ in range(n)]


def linear_names(model: nn.Module) -> list[str]:
    """Every quantized linear's full name, in layer and solve order."""
    adapter = adapter_for(model)
    n = len(adapter.decoder_layers(model))
    return [f"{adapter.layer_prefix(i)}.{name}" for i in range(n) for name in adapter.linear_names(i)]


@torch.no_grad()
def reference_hessians(
    model: nn.Module, samples: list[dict], weights: list[torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """2 sum_t w_t x_t x_t^T / sum_t w_t per linear, from the inputs seen in full-model forwards."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in linear_names(model)}
    handles = [
        get_module(model, name).register_forward_hook(
            lambda mod, args, out, name=name: seen[name].append(args[0].reshape(-1, args[0].shape[-1]).double())
        )
        for name in seen
    ]
    try:
        for sample in samples:
            model(**sample, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    w = torch.ones(sum(s["input_ids"].numel() for s in samples), dtype=torch.float64)
    if weights is not None:
        w = torch.cat([x.reshape(-1).double() for x in weights])
    out = {}
    for name, xs in seen.items():
        x = torch.cat(xs)
        out[name] = (2.0 / w.sum() * (x * w[:, None]).T @ x).float()
    return out


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    """Equal up to `rtol` of the larger magnitude."""
    return bool((a - b).abs().max() <= rtol * max(a.abs().max(), b.abs().max()))


def record_calibration(model: nn.Module, samples: list[dict], spec: QuantSpec = SPEC, **kw) -> tuple:
    """Calibrate `model` in place with GPTQ; return (results, report, Hessians given to the solver)."""
    seen: dict[str, torch.Tensor] = {}
    cal = calibrate_model(model, samples, spec, method="gptq", progress=False,
                          comm=observing(lambda name, h, cross: seen.__setitem__(name, h.clone())), **kw)
    return cal.results, cal.report, seen


# ---------------------------------------------------------------- layer replay


@pytest.mark.parametrize("kind", KINDS)
def test_layer_replay_reproduces_full_logits(kind: str) -> None:
    model = tiny_model(kind)
    adapter = adapter_for(model)
    samples = tiny_samples()
    with torch.no_grad():
        full = [model(**s, use_cache=False).logits for s in samples]
        inputs = capture_layer_inputs(model, adapter, samples)
        for layer in adapter.decoder_layers(model):
            for i in range(len(inputs)):
                inputs.hidden[i] = run_layer(layer, inputs, i)
        norm, head = get_module(model, adapter.final_norm), get_module(model, adapter.lm_head)
        replay = [head(norm(h)) for h in inputs.hidden]
    for a, b in zip(full, replay):
        assert torch.equal(a, b), (a - b).abs().max()


# ---------------------------------------------------------------- Hessians


def test_hook_hessians_equal_dense_reference_on_fp_path() -> None:
    model = tiny_model("llama")
    adapter = adapter_for(model)
    samples = tiny_samples()
    expected = reference_hessians(model, samples)
    with torch.no_grad():
        inputs = capture_layer_inputs(model, adapter, samples)
        for index, layer in enumerate(adapter.decoder_layers(model)):
            for group in adapter.linear_groups(index):
                accs = accumulate_group(layer, {n: get_module(layer, n) for n in group}, inputs, None, "cpu")
                for name, acc in accs.items():
                    full = f"{adapter.layer_prefix(index)}.{name}"
                    assert acc.tokens == 4 * 16
                    assert close(acc.result(), expected[full]), full
            for i in range(len(inputs)):
                inputs.hidden[i] = run_layer(layer, inputs, i)


@pytest.mark.parametrize("kind", ("llama", "gpt_neox", "opt"))
def test_hessians_come_from_the_quantized_path(kind: str) -> None:
    fp = tiny_model(kind)
    model = copy.deepcopy(fp)
    samples = tiny_samples()
    fp_h = reference_hessians(fp, samples)
    _, _, seen = record_calibration(model, samples)
    assert list(seen) == linear_names(model)  # execution order, every linear once
    q_h = reference_hessians(model, samples)  # full forwards of the final quantized model
    adapter = adapter_for(model)
    first_group = [f"{adapter.layer_prefix(0)}.{n}" for n in adapter.linear_groups(0)[0]]
    if kind == "gpt_neox":  # parallel residual: layer 0's MLP reads the FP layer input too
        first_group.append("gpt_neox.layers.0.mlp.dense_h_to_4h")
    for name, h in seen.items():
        assert close(h, q_h[name]), name
        if name in first_group:  # layer 0's first group sees the FP embeddings only
            assert close(h, fp_h[name]), name
        else:  # everything later sees quantized linears before it
            assert not close(h, fp_h[name], rtol=1e-3), name


@pytest.mark.parametrize("kind", KINDS)
def test_replaying_finished_blocks_gives_the_codes_of_running_every_pass(kind: str, monkeypatch) -> None:
    """Reference: every group's pass and the propagation run the whole layer, nothing replayed."""
    from quantkit.engine import driver

    monkeypatch.setattr(driver, "BATCH_SIZE", 1)  # four batches: derived outputs beyond the first
    fp = tiny_model(kind)
    model, ref = copy.deepcopy(fp), copy.deepcopy(fp)
    adapter = adapter_for(model)
    samples = tiny_samples()
    first_linear = adapter.linear_groups(0)[0][0]
    calls = []
    for layer in adapter.decoder_layers(model):
        get_module(layer, first_linear).register_forward_hook(lambda *a: calls.append(1))
    results, _, _ = record_calibration(model, samples)
    with torch.no_grad():
        inputs = capture_layer_inputs(ref, adapter, samples)
        for index, layer in enumerate(adapter.decoder_layers(ref)):
            for group in adapter.linear_groups(index):
                linears = {n: get_module(layer, n) for n in group}
                accs = accumulate_group(layer, linears, inputs, None, "cpu")
                for name, linear in linears.items():
                    full = f"{adapter.layer_prefix(index)}.{name}"
                    expected = gptq_solve(linear.weight.data.float(), accs[name].result(), SPEC, name=full)
                    assert torch.equal(expected.qweight, results[full].qweight), full
                    linear.weight.data.copy_(expected.dequantize())
            for i in range(len(inputs)):
                inputs.hidden[i] = run_layer(layer, inputs, i)
    # Attention is derived from o_proj's kept inputs after one checked run, so the first linear
    # runs in its own group's pass on the first batch only (later batches stop before it: the
    # group reads one input; a one-linear group stops before it always), in every batch of the
    # o_proj pass, and once more for the check; never in the MLP passes or the propagation.
    own_pass = 1 if len(adapter.linear_groups(0)[0]) > 1 else 0
    assert len(calls) == 2 * (own_pass + len(samples) + 1)


def test_group_order_o_proj_sees_quantized_qkv() -> None:
    fp = tiny_model("llama", layers=1)
    model = copy.deepcopy(fp)
    samples = tiny_samples()
    _, _, seen = record_calibration(model, samples)
    # Reference: FP model with only q/k/v replaced by the engine's quantized ones.
    ref = copy.deepcopy(fp)
    for n in ("q_proj", "k_proj", "v_proj"):
        get_module(ref, f"model.layers.0.self_attn.{n}").weight.data.copy_(
            get_module(model, f"model.layers.0.self_attn.{n}").weight.data)
    name = "model.layers.0.self_attn.o_proj"
    assert close(seen[name], reference_hessians(ref, samples)[name])
    assert not close(seen[name], reference_hessians(fp, samples)[name], rtol=1e-3)


def test_engine_gptq_equals_reference_gptq_on_dense_hessian() -> None:
    fp = tiny_model("llama", layers=1)
    model = copy.deepcopy(fp)
    samples = tiny_samples()
    results, _, _ = record_calibration(model, samples)
    dense = reference_hessians(fp, samples)
    name = "model.layers.0.self_attn.q_proj"
    ref = gptq_solve(get_module(fp, name).weight.data.float(), dense[name], SPEC, name=name)
    assert torch.equal(ref.qweight, results[name].qweight)
    assert torch.equal(ref.scales, results[name].scales)


def test_unit_token_weights_reproduce_unweighted_hessians() -> None:
    samples = tiny_samples()
    _, _, plain = record_calibration(tiny_model("llama"), samples)
    ones = [torch.ones(1, 16) for _ in samples]
    _, _, weighted = record_calibration(tiny_model("llama"), samples, token_weights=lambda layer: ones)
    assert plain.keys() == weighted.keys()
    for name in plain:
        assert close(plain[name], weighted[name], rtol=1e-6), name


def test_token_weighted_hessians_match_weighted_reference() -> None:
    model = tiny_model("qwen2")
    samples = tiny_samples()
    gen = torch.Generator().manual_seed(3)
    per_layer = {layer: [torch.rand(16, generator=gen) + 0.1 for _ in samples] for layer in range(2)}
    _, _, seen = record_calibration(model, samples, token_weights=lambda layer: per_layer[layer])
    for layer in range(2):
        ref = reference_hessians(model, samples, per_layer[layer])
        for name, h in seen.items():
            if name.startswith(f"model.layers.{layer}."):
                assert close(h, ref[name]), name


# ---------------------------------------------------------------- FP target


@torch.no_grad()
def linear_inputs(model: nn.Module, samples: list[dict], name: str) -> torch.Tensor:
    """Every token's input to linear `name` in full-model forwards, [tokens, in] float64."""
    seen: list[torch.Tensor] = []
    handle = get_module(model, name).register_forward_hook(
        lambda mod, args, out: seen.append(args[0].reshape(-1, args[0].shape[-1]).double()))
    try:
        for sample in samples:
            model(**sample, use_cache=False)
    finally:
        handle.remove()
    return torch.cat(seen)


@pytest.mark.parametrize("kind", ("llama", "gpt_neox"))
def test_fp_target_fits_fp_outputs_from_full_model_forwards(kind: str) -> None:
    """Reference, linear by linear in solve order: X from full forwards of the FP model, X~ from the
    partly quantized model, H~ = 2 X~^T W X~ / sum w, C = 2 X^T W X~ / sum w, GPTQ toward W C H~^-1.

    Two claims, checked apart: the statistics the engine solves from are the reference's (float32 sums
    against float64 ones, so equal to rounding), and its codes are exactly GPTQ toward W C H~^-1 of the
    statistics it was handed. Comparing codes with codes solved from the float64 statistics instead would
    test rounding: a last-ulp difference flips a code at a rounding boundary, and GPTQ's error feedback
    carries the flip into later columns, by a share of codes that depends on the CPU's BLAS."""
    from quantkit.quant.gptaq import fp_target_weight

    fp = tiny_model(kind)
    model, ref = copy.deepcopy(fp), copy.deepcopy(fp)
    samples = tiny_samples()
    gen = torch.Generator().manual_seed(5)
    per_layer = {layer: [torch.rand(16, generator=gen) + 0.1 for _ in samples] for layer in range(2)}
    handed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    cal = calibrate_model(model, samples, SPEC, method="tlq", progress=False, fp_target=True,
                          token_weights=lambda layer: per_layer[layer],
                          comm=observing(lambda name, h, cross: handed.__setitem__(name, (h.clone(), cross.clone()))))
    assert cal.report["fp_target"] is True
    adapter = adapter_for(ref)
    moved = 0
    for index in range(2):
        w = torch.cat([x.reshape(-1).double() for x in per_layer[index]])
        for group in adapter.linear_groups(index):
            for name in group:
                full = f"{adapter.layer_prefix(index)}.{name}"
                x, x_tilde = linear_inputs(fp, samples, full), linear_inputs(ref, samples, full)
                hessian = (2.0 / w.sum() * (x_tilde * w[:, None]).T @ x_tilde).float()
                cross = (2.0 / w.sum() * (x * w[:, None]).T @ x_tilde).float()
                engine_hessian, engine_cross = handed[full]
                assert close(engine_hessian, hessian), full
                assert close(engine_cross, cross), full
                weight = get_module(fp, full).weight.data.float()
                expected = gptq_solve(fp_target_weight(weight, engine_hessian, engine_cross, SPEC.damp),
                                      engine_hessian, SPEC, name=full)
                got = cal.results[full]
                assert torch.equal(got.qweight, expected.qweight), full
                assert torch.equal(got.scales, expected.scales), full
                if not torch.equal(expected.qweight, gptq_solve(weight, engine_hessian, SPEC).qweight):
                    moved += 1
            for name in group:  # the next group sees this group quantized, as in the engine
                full = f"{adapter.layer_prefix(index)}.{name}"
                get_module(ref, full).weight.data.copy_(cal.results[full].dequantize())
    assert moved >= 4  # the FP target really changed the codes of most linears past layer 0's first group


@pytest.mark.parametrize("kind", ("llama", "gpt_neox"))
def test_lm_head_fits_fp_output_from_quantized_last_layer(kind: str) -> None:
    """Reference: the head's input in full forwards of the model whose decoder layers carry the run's
    codes (X~) and of the FP model (X), weighted by the last layer's token weights; GPTQ toward
    W C H~^-1. The decoder layers' codes are those of a run without the head."""
    from quantkit.quant.gptaq import fp_target_weight

    fp = tiny_model(kind)
    model, without, ref = copy.deepcopy(fp), copy.deepcopy(fp), copy.deepcopy(fp)
    samples = tiny_samples()
    gen = torch.Generator().manual_seed(7)
    per_layer = {layer: [torch.rand(16, generator=gen) + 0.1 for _ in samples] for layer in range(2)}
    kw = dict(method="tlq", progress=False, fp_target=True, token_weights=lambda layer: per_layer[layer])
    cal = calibrate_model(model, samples, SPEC, lm_head=True, **kw)
    plain = calibrate_model(without, samples, SPEC, **kw)
    adapter = adapter_for(ref)
    head = adapter.lm_head
    assert set(cal.results) == set(plain.results) | {head} and cal.report["lm_head"]["output_rel_err"] > 0
    for name, result in plain.results.items():
        assert torch.equal(cal.results[name].qweight, result.qweight), name
        get_module(ref, name).weight.data.copy_(result.dequantize())
    w = torch.cat([x.reshape(-1).double() for x in per_layer[1]])
    x, x_tilde = linear_inputs(fp, samples, head), linear_inputs(ref, samples, head)
    hessian = (2.0 / w.sum() * (x_tilde * w[:, None]).T @ x_tilde).float()
    cross = (2.0 / w.sum() * (x * w[:, None]).T @ x_tilde).float()
    weight = get_module(fp, head).weight.data.float()
    expected = gptq_solve(fp_target_weight(weight, hessian, cross, SPEC.damp), hessian, SPEC, name=head)
    got = cal.results[head]
    assert (got.qweight != expected.qweight).float().mean() <= 0.002
    off = (got.scales - expected.scales).abs() > 1e-3 * expected.scales.abs()
    assert off.float().mean() <= 0.02
    assert not torch.equal(expected.qweight, gptq_solve(weight, hessian, SPEC).qweight)  # the FP target moved it
    assert torch.equal(get_module(model, head).weight.data, got.dequantize())  # the model carries the codes
    assert torch.equal(get_module(without, head).weight.data, weight)  # and without the flag the head stays FP


def test_lm_head_rtn_and_tied_head() -> None:
    model = tiny_model("llama")
    weight = model.lm_head.weight.data.clone()
    cal = calibrate_model(model, tiny_samples(), SPEC, method="rtn", progress=False, lm_head=True)
    assert torch.equal(cal.results["lm_head"].qweight, rtn_solve(weight, None, SPEC).qweight)
    tied = tiny_model("opt")  # OPT ties lm_head to the input embeddings
    before = {k: v.clone() for k, v in tied.state_dict().items()}
    with pytest.raises(QuantkitError, match="shares its weight with the input embeddings"):
        calibrate_model(tied, tiny_samples(), SPEC, progress=False, lm_head=True)
    assert all(torch.equal(before[k], v) for k, v in tied.state_dict().items())


# ---------------------------------------------------------------- bad input


def test_group_size_not_dividing_width_fails_before_work() -> None:
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    with pytest.raises(QuantkitError, match="does not divide the input width 64"):
        calibrate_model(model, tiny_samples(), QuantSpec(bits=4, group_size=48), progress=False,
                        comm=observing(lambda n, h, cross: calls.append(n)))
    assert not calls
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_nan_weight_fails_before_work() -> None:
    model = tiny_model("llama")
    model.model.layers[1].mlp.down_proj.weight.data[3, 7] = float("nan")
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    calls = []
    with pytest.raises(QuantkitError, match=r"model\.layers\.1\.mlp\.down_proj.*NaN"):
        calibrate_model(model, tiny_samples(), SPEC, progress=False, comm=observing(lambda n, h, cross: calls.append(n)))
    assert not calls
    assert torch.equal(before, model.model.layers[0].self_attn.q_proj.weight)


def test_no_samples_and_unknown_method_are_errors() -> None:
    with pytest.raises(QuantkitError, match="no calibration samples"):
        calibrate_model(tiny_model("llama"), [], SPEC, progress=False)
    with pytest.raises(QuantkitError, match="unknown"):
        calibrate_model(tiny_model("llama"), tiny_samples(), SPEC, method="nope", progress=False)


def test_dead_input_feature_is_handled() -> None:
    model = tiny_model("llama")
    model.model.embed_tokens.weight.data[:, 5] = 0  # feature 5 of every layer-0 input is zero
    samples = tiny_samples()
    results, report, seen = record_calibration(model, samples)
    h = seen["model.layers.0.self_attn.q_proj"]
    assert torch.all(h[5] == 0) and torch.all(h[:, 5] == 0)
    for result in results.values():
        assert torch.isfinite(result.dequantize()).all()
    for layer in report["layers"]:
        for entry in layer["linears"].values():
            assert entry["output_rel_err"] == entry["output_rel_err"]  # not NaN
    with torch.no_grad():
        assert torch.isfinite(model(**samples[0]).logits).all()


def test_assign_owners_balances_cost() -> None:
    mlp = {"gate": nn.Linear(64, 256), "up": nn.Linear(64, 256), "down": nn.Linear(256, 64)}
    owners = assign_owners(mlp, 2)
    assert owners["down"] != owners["gate"] and owners["gate"] == owners["up"]
    assert set(assign_owners(mlp, 3).values()) == {0, 1, 2}
    assert set(assign_owners(mlp, 1).values()) == {0}
