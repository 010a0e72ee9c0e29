"""TLQ's held-out mix guard (quantkit.engine.mix) and the output factors it scores with, against references:
whole-model autograd, plain GPTQ on the fit samples, dense mixed Hessians, a direct per-source error."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import observing, tiny_model, whole_model_gradients

from quantkit.engine import calibrate_model
from quantkit.engine.capture import capture_layer_inputs, stack_samples
from quantkit.engine.mix import HeldOutSlice, MixSearch, choose
from quantkit.errors import QuantkitError
from quantkit.importance import importance_scores, tlq_token_weights
from quantkit.models import adapter_for
from quantkit.quant.spec import QuantSpec


def tiny_llama(layers: int = 2):
    model = tiny_model("llama", seed=0, vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64).eval()
    with torch.no_grad():  # larger weights than the init, so that gradients differ between tokens
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.15)
    return model


def samples_for(count: int = 8, length: int = 24) -> list[dict]:
    """Samples from two sources: the first half of each sample's tokens is source 0, the rest source 1."""
    generator = torch.Generator().manual_seed(5)
    out = []
    for _ in range(count):
        sources = torch.zeros(1, length, dtype=torch.long)
        sources[0, length // 2:] = 1
        out.append({"input_ids": torch.randint(0, 101, (1, length), generator=generator), "source_ids": sources})
    return out


def test_output_factors_match_whole_model_autograd() -> None:
    """G_l = sum_t g g^T / tokens, with g = dL/dy_l from one full forward and backward per sample."""
    model = tiny_llama()
    samples = samples_for(3)
    samples[1]["loss_mask"] = torch.tensor([[0] * 12 + [1] * 12]).bool()
    found = importance_scores(model, samples, progress=False, output_factors=True)
    reference = [torch.zeros(64, 64, dtype=torch.float64) for _ in range(2)]
    for sample in samples:
        scored = {k: v for k, v in sample.items() if k in ("input_ids", "loss_mask")}
        for layer, g in enumerate(whole_model_gradients(model, model.model.layers, scored)):
            reference[layer] += g.double().T @ g.double()
    for layer in range(2):
        expected = reference[layer] / (3 * 24)
        assert torch.allclose(found.output_factors[layer], expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


def test_uniform_share_is_gptq_with_the_fp_target_on_the_fit_samples() -> None:
    """With uniform weight only (share 1) the guard solves exactly what GPTQ + FP target solves from the samples
    it keeps: the held-out ones enter no Hessian."""
    model = tiny_llama()
    samples = samples_for()
    spec = QuantSpec(bits=3, group_size=32)
    mix = MixSearch(shares=(1.0,), holdout=4)
    weights = tlq_token_weights(model, samples, lam=0.1, progress=False, output_factors=True, mix=mix)
    guarded = calibrate_model(copy.deepcopy(model), samples, spec, method="tlq", token_weights=weights, progress=False)
    fit, held = mix.split(len(samples))
    assert held == [3, 7] and guarded.report["mix"]["held_out_samples"] == 2
    plain = calibrate_model(copy.deepcopy(model), [samples[i] for i in fit], spec, method="gptq", fp_target=True,
                            progress=False)
    for name, result in plain.results.items():
        assert torch.equal(result.qweight, guarded.results[name].qweight), name
    assert all(entry["mix"]["uniform_share"] == 1.0 for layer in guarded.report["layers"]
               for entry in layer["linears"].values())


def test_chosen_hessian_is_the_dense_mix_of_the_fit_samples() -> None:
    """Layer 0's q_proj Hessian is (1 - a) H_tlq + a H_uniform over the fit samples' FP inputs, a the reported share."""
    model = tiny_llama()
    samples = samples_for()
    mix = MixSearch(shares=(0.0, 0.5, 1.0), holdout=4)
    weights = tlq_token_weights(model, samples, lam=0.2, progress=False, output_factors=True, mix=mix)
    fit, _ = mix.split(len(samples))
    inputs: list[torch.Tensor] = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, o: inputs.append(a[0][0].detach()))
    with torch.no_grad():
        for i in fit:
            model(input_ids=samples[i]["input_ids"])
    hook.remove()
    x = torch.cat(inputs).double()
    w = torch.cat([weights(0)[i] for i in fit]).double()
    weighted = 2 * torch.einsum("t,ti,tj->ij", w, x, x) / w.sum()
    uniform = 2 * x.T @ x / x.shape[0]
    seen: dict[str, torch.Tensor] = {}
    report = calibrate_model(copy.deepcopy(model), samples, QuantSpec(bits=2, group_size=32), method="tlq",
                             token_weights=weights, progress=False,
                             comm=observing(lambda name, h, c: seen.setdefault(name, h.clone()))).report
    share = report["layers"][0]["linears"]["self_attn.q_proj"]["mix"]["uniform_share"]
    assert report["layers"][0]["linears"]["self_attn.q_proj"]["mix"]["lam"] == pytest.approx(share + (1 - share) * 0.2)
    expected = (1 - share) * weighted + share * uniform
    engine = seen["model.layers.0.self_attn.q_proj"].double()
    assert torch.allclose(engine, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def test_choose_takes_the_worst_source_first_then_the_mean() -> None:
    uniform = torch.tensor([2.0, 4.0], dtype=torch.float64)
    # share 0 is far better on source 0 but 10% worse on source 1: refused; share 0.5 is better on both
    errors = {0.0: torch.tensor([1.0, 4.4]), 0.5: torch.tensor([1.9, 3.9]), 1.0: uniform}
    best, ratios = choose({a: e.double() for a, e in errors.items()})
    assert best == 0.5 and ratios["0.0"]["worst"] == pytest.approx(1.1)
    # nothing beats uniform on every source: uniform stays
    best, _ = choose({0.0: torch.tensor([1.0, 4.4]).double(), 1.0: uniform})
    assert best == 1.0
    # equal worst: the mean decides; a source with no held-out tokens (error 0 under uniform) is left out
    best, _ = choose({0.0: torch.tensor([2.0, 3.0, 0.0]).double(), 0.5: torch.tensor([1.0, 3.0, 5.0]).double(),
                      1.0: torch.tensor([2.0, 3.0, 0.0]).double()})
    assert best == 0.5


def test_held_out_errors_are_per_source_fisher_costs_of_the_deviation() -> None:
    """errors() = per source, the mean over its tokens of e^T G e, e = quantized layer output - FP layer output."""
    model = tiny_llama()
    adapter = adapter_for(model)
    samples = samples_for(4)
    samples[2]["source_ids"][0, :5] = -1  # tokens of no source are left out
    valid = [torch.ones(24, dtype=torch.bool) for _ in samples]
    inputs = stack_samples(capture_layer_inputs(model, adapter, samples), 2)
    sources = inputs.batch_weights([s["source_ids"].reshape(-1).clone() for s in samples])
    factor = torch.randn(64, 64, dtype=torch.float64)
    factor = factor @ factor.T / 64
    held = HeldOutSlice(inputs, sources, inputs.batch_weights(valid), [factor], 2)
    layer = model.model.layers[0]
    fp_layer = copy.deepcopy(layer)
    held.begin_layer(layer, 0)
    with torch.no_grad():
        layer.mlp.down_proj.weight.add_(0.05 * torch.randn_like(layer.mlp.down_proj.weight))
    found = held.errors(layer)
    sums, counts = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    position = model.model.rotary_emb(inputs.hidden[0], torch.arange(24).unsqueeze(0))
    with torch.no_grad():
        for sample in samples:
            x = model.model.embed_tokens(sample["input_ids"])
            e = (layer(x, position_embeddings=position)[0] - fp_layer(x, position_embeddings=position)[0]).reshape(24, 64)
            cost = ((e.double() @ factor) * e.double()).sum(-1)
            ids = sample["source_ids"].reshape(-1)
            for k in range(2):
                sums[k] += cost[ids == k].sum()
                counts[k] += (ids == k).sum()
    assert torch.allclose(found, sums / counts, rtol=1e-4)


def test_guard_needs_output_factors_and_enough_samples() -> None:
    model = tiny_llama()
    samples = samples_for(4)
    spec = QuantSpec(bits=3, group_size=32)
    plain = tlq_token_weights(model, samples, progress=False, mix=MixSearch(holdout=2))
    with pytest.raises(QuantkitError, match="output factor"):
        calibrate_model(copy.deepcopy(model), samples, spec, method="tlq", token_weights=plain, progress=False)
    weights = tlq_token_weights(model, samples, progress=False, output_factors=True, mix=MixSearch(holdout=8))
    with pytest.raises(QuantkitError, match="at least 8"):
        calibrate_model(copy.deepcopy(model), samples, spec, method="tlq", token_weights=weights, progress=False)


def test_linear_output_factors_match_autograd_and_reach_the_solver() -> None:
    """output_side=b: each linear's block-diagonal sum of g g^T over its output rows (g = dL/dz from whole-model
    autograd) / tokens; the engine solves each linear with GPTQ and those blocks as its row metric."""
    from quantkit.quant.gptaq import fp_target_weight
    from quantkit.quant.gptq import gptq_solve

    model = tiny_llama()
    samples = samples_for(3)
    weights = tlq_token_weights(model, samples, lam=0.1, progress=False, output_side=8)
    factors = weights.linear_factors
    names = ["self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"]
    reference = {(layer, name): 0 for layer in range(2) for name in names}
    for sample in samples:
        outputs = {}

        def keep(module, args, output, key=None, outputs=outputs):
            output.retain_grad()
            outputs[key] = output

        hooks = [model.model.layers[layer].get_submodule(name).register_forward_hook(
            lambda m, a, o, key=(layer, name): keep(m, a, o, key)) for layer in range(2) for name in names]
        ids = sample["input_ids"]
        logits = model(input_ids=ids).logits[0]
        for hook in hooks:
            hook.remove()
        torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:]).backward()
        for key, out in outputs.items():
            g = out.grad[0].double()
            blocks = g.reshape(24, -1, 8)
            reference[key] = reference[key] + torch.einsum("tnb,tnc->nbc", blocks, blocks)
    for (layer, name), total in reference.items():
        expected = total / (3 * 24)
        assert torch.allclose(factors[layer][name], expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max())), name
    seen: dict[str, tuple] = {}
    spec = QuantSpec(bits=2, group_size=32)
    result = calibrate_model(copy.deepcopy(model), samples, spec, method="tlq", token_weights=weights, progress=False,
                             comm=observing(lambda name, h, c: seen.setdefault(name, (h.clone(), c.clone())))).results
    hessian, cross = seen["model.layers.1.mlp.down_proj"]
    original = model.model.layers[1].mlp.down_proj.weight.detach()
    expected = gptq_solve(fp_target_weight(original, hessian, cross, spec.damp), hessian, spec,
                          row_metric=factors[1]["mlp.down_proj"])
    assert torch.equal(result["model.layers.1.mlp.down_proj"].qweight, expected.qweight)
    plain = gptq_solve(fp_target_weight(original, hessian, cross, spec.damp), hessian, spec)
    assert not torch.equal(plain.qweight, expected.qweight)  # the factor changed the rounding
