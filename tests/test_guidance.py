"""TLQ's richer gradient guidance (issue #12), each checked against an independent computation:
per-linear and per-row-group scores and Fisher-sampled labels against whole-model autograd, grouped
Hessians against dense weighted references, coordinate descent against brute force, and the token
weight diagnosis against hand-computed sums."""

from __future__ import annotations

import copy
import math

import helpers
import pytest
import torch
import torch.nn.functional as F

from quantkit.engine import calibrate_model
from quantkit.engine.weights import LayerWeights, diagnose, row_ranges
from quantkit.errors import QuantkitError
from quantkit.importance import (
    TokenImportance,
    importance_scores,
    load_calibration_set,
    save_calibration_set,
    tlq_token_weights,
)
from quantkit.models import adapter_for, get_module
from quantkit.quant import QuantSpec, gptq_solve
from quantkit.quant.cd import refine_codes
from quantkit.quant.gptaq import gptaq_solve


def layer_objective(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """Reference: tr((W - Q) H (W - Q)^T) in float64."""
    delta = (weight - quantized).double()
    return float(torch.einsum("oi,ij,oj->", delta, hessian.double(), delta))


def tiny_model(kind: str = "llama", layers: int = 3, seed: int = 0) -> torch.nn.Module:
    """A random hidden-32 causal LM (vocab 61) in eval mode."""
    model = helpers.tiny_model(kind, seed=seed, vocab_size=61, hidden_size=32, intermediate_size=48,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=64).eval()
    model.config.use_cache = False
    return model


def tiny_samples(n: int = 3, tokens: int = 12, seed: int = 1) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 61, (1, tokens), generator=gen)} for _ in range(n)]


def autograd_linear_scores(model, sample: dict, labels: torch.Tensor | None = None, groups: int = 1) -> dict[str, torch.Tensor]:
    """Reference: ||dL/dz||^2 per token (per output-row group) at every decoder linear's output z, from one
    whole-model forward and backward of the sample's mean cross-entropy (on `labels`, or the data)."""
    adapter = adapter_for(model)
    outputs: dict[str, torch.Tensor] = {}
    hooks = []
    for index in range(len(adapter.decoder_layers(model))):
        for name in adapter.linear_names(index):
            full = f"{adapter.layer_prefix(index)}.{name}"

            def keep(module, args, output, full=full):
                output.retain_grad()
                outputs[full] = output

            hooks.append(get_module(model, full).register_forward_hook(keep))
    try:
        logits = model(**sample).logits[0]
    finally:
        for hook in hooks:
            hook.remove()
    ids = sample["input_ids"][0]
    target = ids[1:] if labels is None else labels
    F.cross_entropy(logits[:-1], target).backward()
    found = {}
    for full, output in outputs.items():
        squares = output.grad[0].double().square()
        if groups == 1:
            found[full] = squares.sum(-1)
        else:
            found[full] = torch.stack([squares[:, a:b].sum(-1) for a, b in row_ranges(squares.shape[-1], groups)], -1)
    return found


@pytest.mark.parametrize("kind,groups,batch", [("llama", 1, 16), ("llama", 3, 1), ("qwen2", 2, 16)])
def test_linear_scores_match_whole_model_autograd(kind: str, groups: int, batch: int) -> None:
    model = tiny_model(kind)
    samples = tiny_samples()
    found = importance_scores(model, samples, progress=False, guidance="linear", row_groups=groups, batch_size=batch)
    adapter = adapter_for(model)
    for i, sample in enumerate(samples):
        reference = autograd_linear_scores(copy.deepcopy(model), sample, groups=groups)
        for layer in range(3):
            for name in adapter.linear_names(layer):
                ref = reference[f"{adapter.layer_prefix(layer)}.{name}"]
                got = found.linear[layer][name][i].double()
                assert got.shape == ref.shape
                assert ref.abs().sum() > 0
                assert (got - ref).norm() / ref.norm() < 1e-5, (i, layer, name)


def test_fisher_scores_use_labels_drawn_from_the_fp_softmax() -> None:
    """Reference: per draw, labels from the FP model's own softmax with the documented seeded uniforms
    (one generator per sample and draw), whole-model autograd, squared norms averaged over draws."""
    model = tiny_model(layers=2)
    samples = tiny_samples(n=2)
    draws, seed = 3, 5
    found = importance_scores(model, samples, progress=False, loss="fisher", draws=draws, seed=seed, guidance="linear")
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    for i, sample in enumerate(samples):
        with torch.no_grad():
            probs = torch.softmax(model(**sample).logits[0, :-1].float(), -1).double()
        layer_ref = [torch.zeros(12, dtype=torch.float64) for _ in layers]
        linear_ref: dict[str, torch.Tensor] = {}
        data_labels = sample["input_ids"][0, 1:]
        differs = False
        for draw in range(draws):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i * 1_009 + draw)
            uniform = torch.rand(11, generator=gen, dtype=torch.float64)
            cumulative = probs.cumsum(-1)
            labels = torch.searchsorted(cumulative, (uniform * cumulative[:, -1]).unsqueeze(1)).reshape(-1)
            differs |= not torch.equal(labels, data_labels)
            outputs: list[torch.Tensor] = []

            def keep(module, args, output, outputs=outputs):
                hidden = output[0] if isinstance(output, tuple) else output
                hidden.retain_grad()
                outputs.append(hidden)

            hooks = [layer.register_forward_hook(keep) for layer in layers]
            logits = model(**sample).logits[0]
            for hook in hooks:
                hook.remove()
            F.cross_entropy(logits[:-1], labels).backward()
            for layer, output in enumerate(outputs):
                layer_ref[layer] += output.grad[0].double().square().sum(-1) / draws
            for full, value in autograd_linear_scores(copy.deepcopy(model), sample, labels).items():
                linear_ref[full] = linear_ref.get(full, 0) + value / draws
        assert differs  # the sampled labels are not the data's
        for layer in range(len(layers)):
            got = found.layer[layer][i].double()
            assert (got - layer_ref[layer]).norm() / layer_ref[layer].norm() < 1e-5, (i, layer)
            for name in adapter.linear_names(layer):
                ref = linear_ref[f"{adapter.layer_prefix(layer)}.{name}"]
                assert (found.linear[layer][name][i].double() - ref).norm() / ref.norm() < 1e-5, (i, layer, name)


@torch.no_grad()
def linear_inputs(model, samples: list[dict], name: str) -> torch.Tensor:
    """Every token's input to linear `name` in full-model forwards, [tokens, in] float64."""
    seen: list[torch.Tensor] = []
    handle = get_module(model, name).register_forward_hook(
        lambda mod, args, out: seen.append(args[0].reshape(-1, args[0].shape[-1]).double()))
    try:
        for sample in samples:
            model(**sample)
    finally:
        handle.remove()
    return torch.cat(seen)


def test_row_group_hessians_match_dense_references() -> None:
    """Each group of output rows is solved by GPTQ on its own X~^T diag(w_k) X~ (X~ from full forwards of a
    model carrying the earlier groups' codes); a linear's rows solved with its ungrouped Hessian differ."""
    fp = tiny_model(layers=2)
    model, ref = copy.deepcopy(fp), copy.deepcopy(fp)
    samples = tiny_samples(n=4, tokens=16)
    adapter = adapter_for(fp)
    gen = torch.Generator().manual_seed(7)
    spec = QuantSpec(bits=2, group_size=16)  # act-order with static groups: the defaults
    grouped = {"self_attn.q_proj": 2, "mlp.down_proj": 3}
    per_layer = {}
    for layer in range(2):
        output = [torch.rand(16, generator=gen) + 0.1 for _ in samples]
        linears = {name: [torch.rand(16, g, generator=gen) ** 4 + 0.05 for _ in samples] for name, g in grouped.items()}
        per_layer[layer] = LayerWeights(output, linears, dict(grouped), 0.1)
    calibration = calibrate_model(model, samples, spec, method="tlq", progress=False, fp_target=False,
                                  token_weights=lambda layer: per_layer[layer])
    differing = 0
    for layer in range(2):
        for group in adapter.linear_groups(layer):
            for name in group:
                full = f"{adapter.layer_prefix(layer)}.{name}"
                x = linear_inputs(ref, samples, full)
                weight = get_module(fp, full).weight.data.float()
                got = calibration.results[full]
                chosen = per_layer[layer].for_linear(name)
                groups = grouped.get(name, 1)
                w = torch.cat([c.reshape(-1, groups) for c in chosen]).double()
                parts = []
                for k, (low, high) in enumerate(row_ranges(weight.shape[0], groups)):
                    hessian = (2.0 / w[:, k].sum() * (x * w[:, k : k + 1]).T @ x).float()
                    parts.append(gptq_solve(weight[low:high], hessian, spec).qweight)
                expected = torch.cat(parts)
                assert (got.qweight != expected).float().mean() <= 0.01, full
                if groups > 1:
                    pooled = w.mean(1, keepdim=True)
                    hessian = (2.0 / pooled.sum() * (x * pooled).T @ x).float()
                    differing += (gptq_solve(weight, hessian, spec).qweight != expected).float().mean() > 0.05
            for name in group:
                full = f"{adapter.layer_prefix(layer)}.{name}"
                get_module(ref, full).weight.data.copy_(calibration.results[full].dequantize())
    assert differing == 4  # the groups matter: one pooled Hessian gives other codes for every grouped linear
    entry = calibration.report["layers"][0]["linears"]["self_attn.q_proj"]["token_weights"]
    assert entry["row_groups"] == 2


def test_diagnosis_matches_hand_computed_sums() -> None:
    weights = [torch.tensor([0.1, 0.1, 2.0, 0.8]), torch.tensor([0.1, 5.0, 0.9])]
    flat = torch.cat(weights).double()
    report = diagnose(weights, floor=0.1)
    assert report["tokens"] == 7
    assert math.isclose(report["ess_share"], float(flat.sum() ** 2 / flat.square().sum() / 7), abs_tol=1e-4)
    assert math.isclose(report["top1pct_weight_share"], 5.0 / float(flat.sum()), abs_tol=1e-4)
    assert report["floor_only_tokens"] == 3 and report["dropped_tokens"] == 0


def test_engine_reports_token_weight_diagnosis() -> None:
    model = tiny_model(layers=2)
    samples = tiny_samples(n=2)
    weights = tlq_token_weights(model, samples, progress=False)
    calibration = calibrate_model(copy.deepcopy(model), samples, QuantSpec(bits=4, group_size=16), method="tlq",
                                  token_weights=weights, progress=False)
    for layer in range(2):
        entry = calibration.report["layers"][layer]["linears"]["mlp.up_proj"]["token_weights"]
        assert entry == diagnose(weights(layer), floor=0.1)
    plain = calibrate_model(copy.deepcopy(model), samples, QuantSpec(bits=4, group_size=16), progress=False)
    assert "token_weights" not in plain.report["layers"][0]["linears"]["mlp.up_proj"]


def random_problem(seed: int, out: int = 12, width: int = 32, tokens: int = 96):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=gen) * (torch.rand(width, generator=gen) * 3 + 0.1)
    weight = torch.randn(out, width, generator=gen)
    return weight, x, 2 * x.T @ x / tokens


@pytest.mark.parametrize("seed", range(4))
def test_coordinate_descent_never_raises_and_ends_coordinatewise_optimal(seed: int) -> None:
    weight, _, hessian = random_problem(seed)
    spec = QuantSpec(bits=2, group_size=8, sym=bool(seed % 2))
    start = gptq_solve(weight, hessian, spec)
    before = layer_objective(weight, start.dequantize(), hessian)
    previous = before
    for sweeps in (1, 2, 50):
        refined = refine_codes(weight, hessian, start, sweeps)
        value = layer_objective(weight, refined.dequantize(), hessian)
        assert value <= previous + 1e-9 * before
        previous = value
    assert previous < before  # it does move GPTQ's codes
    assert torch.equal(refined.scales, start.scales) and torch.equal(refined.zeros, start.zeros)
    # brute force: no single code change lowers the objective any further
    final = refined.dequantize().double()
    g = refined.g_idx.long()
    for row in range(0, weight.shape[0], 5):
        for column in range(weight.shape[1]):
            for code in range(4):
                trial = final.clone()
                trial[row, column] = (code - float(refined.zeros[row, g[column]])) * float(refined.scales[row, g[column]])
                assert layer_objective(weight, trial, hessian) >= previous - 1e-7 * before  # ties and float drift


def test_cd_in_gptq_and_with_the_fp_target_lowers_the_true_objective() -> None:
    """With the FP target the objective is sum_t ||Q x~_t - W x_t||^2 with x = FP inputs, x~ quantized ones."""
    weight, x_tilde, hessian = random_problem(11)
    x = x_tilde + 0.3 * torch.randn(x_tilde.shape, generator=torch.Generator().manual_seed(3))
    cross = 2 * x.T @ x_tilde / x.shape[0]
    plain = gptq_solve(weight, hessian, QuantSpec(bits=2, group_size=8))
    swept = gptq_solve(weight, hessian, QuantSpec(bits=2, group_size=8, cd_sweeps=3))
    assert layer_objective(weight, swept.dequantize(), hessian) < layer_objective(weight, plain.dequantize(), hessian)

    def fp_objective(result) -> float:
        return float((x_tilde.double() @ result.dequantize().double().T - x.double() @ weight.double().T).square().sum())

    fp_plain = gptaq_solve(weight, hessian, cross, QuantSpec(bits=2, group_size=8, damp=0.0))
    fp_swept = gptaq_solve(weight, hessian, cross, QuantSpec(bits=2, group_size=8, damp=0.0, cd_sweeps=3))
    assert fp_objective(fp_swept) < fp_objective(fp_plain)


def test_per_linear_calibration_set_round_trip(tmp_path) -> None:
    model = tiny_model(layers=2)
    samples = tiny_samples(n=2)
    weights = tlq_token_weights(model, samples, progress=False, guidance="linear", row_groups=2)
    save_calibration_set(tmp_path / "set", samples, weights, model, "tiny")
    _, stored = load_calibration_set(tmp_path / "set", None, model)
    for layer in range(2):
        mine, theirs = weights(layer), stored(layer)
        assert isinstance(theirs, LayerWeights) and theirs.groups == mine.groups
        assert all(torch.equal(a, b) for a, b in zip(mine.output, theirs.output))
        for name in mine.linears:
            assert all(torch.equal(a, b) for a, b in zip(mine.linears[name], theirs.linears[name]))


@pytest.mark.parametrize("options,message", [
    ({"guidance": "neuron"}, "guidance must be"),
    ({"row_groups": 2}, "need per-linear guidance"),
    ({"loss": "kl"}, "importance loss must be"),
    ({"loss": "fisher", "draws": 0}, "draws must be"),
])
def test_bad_guidance_options_fail_before_the_gradient_pass(monkeypatch, options, message) -> None:
    import quantkit.importance.weights as token_weights

    monkeypatch.setattr(token_weights, "importance_scores", lambda *a, **k: pytest.fail("gradient pass ran"))
    with pytest.raises(QuantkitError, match=message):
        tlq_token_weights(tiny_model(layers=1), tiny_samples(n=1), progress=False, **options)


def test_token_importance_weights_each_row_group_like_a_layer() -> None:
    samples = tiny_samples(n=2)
    scores = [[torch.rand(12) for _ in samples]]
    linear = [{"mlp.up_proj": [torch.stack([s, 2 * s + 1], dim=1) for s in scores[0]]}]
    made = TokenImportance(scores, samples, linear_scores=linear, lam=0.2)
    weights = made(0)
    for i, s in enumerate(scores[0]):
        for k, column in enumerate((s, 2 * s + 1)):
            expected = 0.8 * column / column.mean() + 0.2
            assert torch.allclose(weights.linears["mlp.up_proj"][i][:, k], expected)


def test_cli_linear_guidance_through_a_calibration_set(tmp_path) -> None:
    """`importance --guidance linear --row-groups 2` saves per-linear weights that `calibrate --calib-set`
    uses (its report diagnoses each linear's own weights); `calibrate --method tlq` takes the same options."""
    import json

    from click.testing import CliRunner
    from helpers import save_tiny_llama, write_text

    from quantkit.cli import main

    model = save_tiny_llama(tmp_path / "model")
    text = write_text(tmp_path / "calib.txt")
    runner = CliRunner()
    common = ["--nsamples", "4", "--seqlen", "16", "--lam", "0.1"]  # token weights (text's default: lam 1, all ones)
    made = runner.invoke(main, ["importance", str(model), "--calib", str(text), *common, "--guidance", "linear",
                                "--row-groups", "2", "-o", str(tmp_path / "set")])
    assert made.exit_code == 0, made.output
    done = runner.invoke(main, ["calibrate", str(model), "--method", "tlq", "--calib-set", str(tmp_path / "set"),
                                "--group-size", "16", "--format", "fake", "-o", str(tmp_path / "out")])
    assert done.exit_code == 0, done.output
    report = json.loads((tmp_path / "out" / "quantkit_report.json").read_text())
    linears = report["layers"][1]["linears"]
    assert linears["mlp.down_proj"]["token_weights"]["row_groups"] == 2
    assert linears["mlp.down_proj"]["token_weights"] != linears["mlp.up_proj"]["token_weights"]
    direct = runner.invoke(main, ["calibrate", str(model), "--method", "tlq", "--calib", str(text), *common,
                                  "--guidance", "linear", "--importance-loss", "fisher", "--fisher-draws", "2",
                                  "--group-size", "16", "--format", "fake", "-o", str(tmp_path / "direct")])
    assert direct.exit_code == 0, direct.output
    refused = runner.invoke(main, ["calibrate", str(model), "--method", "tlq", "--calib", str(text), *common,
                                   "--row-groups", "2", "-o", str(tmp_path / "bad")])
    assert refused.exit_code == 2 and "per-linear guidance" in refused.output
    assert not (tmp_path / "bad").exists()
