"""TLQ's held-out mix guard (quantkit.engine.mix) and the output factors it scores with, against references:
whole-model autograd, plain GPTQ on the fit samples, dense mixed Hessians, a direct per-source error."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
from helpers import observing, tiny_model, whole_model_gradients

from quantkit.engine import calibrate_model
from quantkit.engine.capture import capture_layer_inputs, stack_samples
from quantkit.engine.mix import HeldOutSlice, MixSearch, choose, paired_stats
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


@pytest.mark.parametrize(("mix", "guidance"), [(MixSearch(shares=(1.0,), holdout=4), "layer"),
                                               (MixSearch(shares=(0.0, 0.5, 1.0), holdout=4, margin=1e9), "layer"),
                                               (MixSearch(shares=(0.0, 1.0), holdout=4, margin=1e9), "linear")],
                         ids=["uniform-only", "no-share-beyond-noise", "per-linear-weights"])
def test_uniform_share_is_gptq_with_the_fp_target_on_every_sample(mix: MixSearch, guidance: str) -> None:
    """With uniform weight only (share 1), or where no other share beats it beyond the margin, the guard solves
    exactly what GPTQ + FP target solves from all the samples: the held-out ones choose, then join the Hessians."""
    model = tiny_llama()
    samples = samples_for()
    spec = QuantSpec(bits=3, group_size=32)
    weights = tlq_token_weights(model, samples, lam=0.1, progress=False, output_factors=True, mix=mix,
                                guidance=guidance)
    guarded = calibrate_model(copy.deepcopy(model), samples, spec, method="tlq", token_weights=weights, progress=False)
    fit, held = mix.split(len(samples))
    assert held == [3, 7] and guarded.report["mix"]["held_out_samples"] == 2
    assert fit == [0, 1, 2, 4, 5, 6]
    plain = calibrate_model(copy.deepcopy(model), samples, spec, method="gptq", fp_target=True, progress=False)
    for name, result in plain.results.items():
        assert torch.equal(result.qweight, guarded.results[name].qweight), name
    assert all(entry["mix"]["uniform_share"] == 1.0 for layer in guarded.report["layers"]
               for entry in layer["linears"].values())
    if len(mix.candidates) > 1:  # the first group's refusal ends each layer's search: the others sum no twin
        for layer in guarded.report["layers"]:
            checked = [n for n, e in layer["linears"].items() if "held_out_error_over_uniform" in e["mix"]]
            assert checked == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
            assert all(e["mix"].get("refused_at") == "self_attn.q_proj" for n, e in layer["linears"].items()
                       if n not in checked)
        # checking every group refuses every group too, and solves the same
        every = calibrate_model(copy.deepcopy(model), samples, spec, method="tlq", progress=False,
                                token_weights=tlq_token_weights(model, samples, lam=0.1, progress=False, output_factors=True,
                                                                guidance=guidance,
                                                                mix=replace(mix, refusal_ends_layer=False)))
        assert all("held_out_error_over_uniform" in e["mix"] for layer in every.report["layers"]
                   for e in layer["linears"].values())
        for name, result in plain.results.items():
            assert torch.equal(result.qweight, every.results[name].qweight), name


def test_chosen_hessian_is_the_dense_mix_over_every_sample() -> None:
    """Layer 0's q_proj Hessian is (1 - a) H_tlq + a H_uniform over every sample's FP inputs, held-out ones included,
    a the share the held-out samples chose."""
    model = tiny_llama()
    samples = samples_for()
    mix = MixSearch(shares=(0.0, 0.5, 1.0), holdout=4)
    weights = tlq_token_weights(model, samples, lam=0.2, progress=False, output_factors=True, mix=mix)
    inputs: list[torch.Tensor] = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, o: inputs.append(a[0][0].detach()))
    with torch.no_grad():
        for sample in samples:
            model(input_ids=sample["input_ids"])
    hook.remove()
    x = torch.cat(inputs).double()
    w = torch.cat(list(weights(0))).double()
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


def _stats(costs: dict[float, list[list[float]]], tokens: list[list[float]]) -> dict[float, torch.Tensor]:
    """paired_stats from per-source lists of per-window summed costs (one list per source) and token counts."""
    source = torch.tensor([k for k, window in enumerate(tokens) for _ in window])
    n = torch.tensor([t for window in tokens for t in window], dtype=torch.float64)
    flat = {a: torch.tensor([c for window in per for c in window], dtype=torch.float64) for a, per in costs.items()}
    return {a: paired_stats(c, flat[1.0], n, source, len(tokens)) for a, c in flat.items()}


def _z(candidate: list[float], uniform: list[float], tokens: list[float]) -> float:
    """The paired difference per token over windows, in standard errors: a ratio estimator's SE written out."""
    d = [a - b for a, b in zip(candidate, uniform)]
    delta = sum(d) / sum(tokens)
    m = len(d)
    se = math.sqrt(m / (m - 1) * sum((x - n * delta) ** 2 for x, n in zip(d, tokens))) / sum(tokens)
    return delta / se


def test_choose_takes_only_a_share_better_on_every_source_beyond_noise() -> None:
    tokens = [[10.0, 12.0, 8.0], [10.0, 10.0, 9.0]]  # two sources, three held-out windows each
    uniform = [[20.0, 24.0, 16.0], [30.0, 30.0, 27.0]]
    # share 0 is far better on source 0 but worse on source 1: refused whatever the margin
    trade = [[10.0, 12.0, 8.0], [31.0, 31.0, 28.0]]
    # share 0.5 is better on both sources in every window by about 5%: steady, taken
    steady = [[19.0, 22.8, 15.2], [28.5, 28.6, 25.6]]
    best, summary = choose(_stats({0.0: trade, 0.5: steady, 1.0: uniform}, tokens), margin=2.0)
    assert best == 0.5 and not summary["0.0"]["eligible"] and summary["0.5"]["eligible"]
    assert summary["0.0"]["worst"] == pytest.approx(90 / 87, abs=1e-4)
    worst_z = max(_z(steady[k], uniform[k], tokens[k]) for k in range(2))
    assert summary["0.5"]["worst_z"] == pytest.approx(worst_z, abs=0.01)
    # better on average on both sources but with one window much worse: within noise at 2 SE, not at 0
    noisy = [[12.0, 30.0, 10.0], [24.0, 33.0, 22.0]]
    assert choose(_stats({0.0: noisy, 1.0: uniform}, tokens), margin=2.0)[0] == 1.0
    assert choose(_stats({0.0: noisy, 1.0: uniform}, tokens), margin=0.0)[0] == 0.0
    # a source seen in one window only gives no noise estimate: uniform stays
    best, _ = choose(_stats({0.0: [[10.0], [20.0, 20.0]], 1.0: [[20.0], [30.0, 30.0]]}, [[10.0], [10.0, 10.0]]))
    assert best == 1.0
    # among eligible shares the lowest worst-source ratio wins (share 0 has the better mean here), then the mean
    better = [[17.0, 20.4, 13.6], [28.7, 28.8, 25.8]]
    assert choose(_stats({0.0: better, 0.5: steady, 1.0: uniform}, tokens))[0] == 0.5
    assert choose(_stats({0.0: better, 0.5: steady, 1.0: uniform}, tokens), margin=0.0)[0] == 0.5
    best_both = [[17.0, 20.4, 13.6], [27.0, 27.0, 24.3]]
    assert choose(_stats({0.0: best_both, 0.5: steady, 1.0: uniform}, tokens))[0] == 0.0


def test_held_out_errors_are_per_source_fisher_costs_of_the_deviation() -> None:
    """errors() = per held-out window and source, the sum over its tokens of e^T G e, e = quantized layer output -
    FP layer output; by_source() their mean per token of each source."""
    model = tiny_llama()
    adapter = adapter_for(model)
    samples = samples_for(4)
    samples[2]["source_ids"][0, :5] = -1  # tokens of no source are left out
    valid = [torch.ones(24, dtype=torch.bool) for _ in samples]
    inputs = stack_samples(capture_layer_inputs(model, adapter, samples), 2)
    sources = inputs.batch_weights([s["source_ids"].reshape(-1).clone() for s in samples])
    factor = torch.randn(64, 64, dtype=torch.float64)
    factor = factor @ factor.T / 64
    windows = inputs.batch_weights([torch.full((24,), i) for i in range(4)])
    held = HeldOutSlice(inputs, sources, inputs.batch_weights(valid), [factor], 2, windows=windows)
    layer = model.model.layers[0]
    fp_layer = copy.deepcopy(layer)
    held.begin_layer(layer, 0)
    with torch.no_grad():
        layer.mlp.down_proj.weight.add_(0.05 * torch.randn_like(layer.mlp.down_proj.weight))
    per_window = held.errors(layer)
    found = held.by_source(per_window)
    sums, counts = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    window_costs = []
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
                window_costs.append((k, float(cost[ids == k].sum())))
    assert torch.allclose(found, sums / counts, rtol=1e-4)
    # one unit per (window, source), in window order; each with its source and token count
    assert held.unit_source.tolist() == [k for k, _ in window_costs]
    assert held.unit_tokens.tolist() == [12.0, 12.0, 12.0, 12.0, 7.0, 12.0, 12.0, 12.0]
    assert torch.allclose(per_window, torch.tensor([c for _, c in window_costs], dtype=torch.float64), rtol=1e-4)


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


def test_diagonal_blocks_keep_the_smaller_blocks_of_a_block_diagonal_factor() -> None:
    """Linears solved together whose factors have blocks of 16 and 8 rows join at 8: each 16-block's two 8 x 8
    diagonal blocks, the coupling between them dropped (a dense block-diagonal matrix masked by hand)."""
    from quantkit.engine.solve import diagonal_blocks

    generator = torch.Generator().manual_seed(3)
    factor = torch.randn(3, 16, 16, generator=generator, dtype=torch.float64)
    dense = torch.block_diag(*factor)
    mask = torch.block_diag(*[torch.ones(8, 8, dtype=torch.float64)] * 6)
    assert torch.equal(torch.block_diag(*diagonal_blocks(factor, 8)), dense * mask)
    assert diagonal_blocks(factor, 16) is factor
