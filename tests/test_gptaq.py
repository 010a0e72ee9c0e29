"""FP-target GPTQ: the target-weight identity and that it lowers the FP-target loss."""

from __future__ import annotations

import torch

from quantkit.quant.gptaq import fp_target_weight, gptaq_solve
from quantkit.quant.gptq import gptq_solve
from quantkit.quant.spec import QuantSpec


def _data(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 32, generator=generator, dtype=torch.float64) @ torch.randn(32, 32, generator=generator, dtype=torch.float64)
    x_tilde = x + 0.3 * torch.randn(x.shape, generator=generator, dtype=torch.float64)  # quantized-path inputs
    w = torch.rand(2048, generator=generator, dtype=torch.float64) + 0.1
    weight = torch.randn(16, 32, generator=generator)
    hessian = (x_tilde * w[:, None]).T @ x_tilde
    cross = (x * w[:, None]).T @ x_tilde
    return weight, x, x_tilde, w, hessian, cross


def _fp_target_loss(q, weight, x, x_tilde, w) -> float:
    diff = x_tilde @ q.double().T - x @ weight.double().T
    return float((w[:, None] * diff.square()).sum())


def test_fp_target_weight_is_the_weighted_least_squares_fit() -> None:
    weight, x, x_tilde, w, hessian, cross = _data()
    target = fp_target_weight(weight, hessian, cross, damp=0.0).double()
    sw = w.sqrt()[:, None]
    reference = torch.linalg.lstsq(x_tilde * sw, (x @ weight.double().T) * sw).solution.T
    assert torch.allclose(target, reference, atol=1e-4)
    # Identity: the FP-target loss of any Q = its loss toward W' on X~ + a constant.
    base = _fp_target_loss(target, weight, x, x_tilde, w)
    for seed in range(3):
        q = weight + 0.1 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed))
        shifted = float((w[:, None] * ((x_tilde @ (q.double() - target).T).square())).sum())
        assert abs(_fp_target_loss(q, weight, x, x_tilde, w) - (shifted + base)) < 1e-6 * base


def test_gptaq_lowers_the_fp_target_loss_against_plain_gptq_on_quantized_inputs() -> None:
    weight, x, x_tilde, w, hessian, cross = _data(1)
    spec = QuantSpec(bits=3, group_size=16)
    plain = gptq_solve(weight, hessian.float(), spec).dequantize()
    fp_target = gptaq_solve(weight, hessian.float(), cross.float(), spec).dequantize()
    assert _fp_target_loss(fp_target, weight, x, x_tilde, w) < _fp_target_loss(plain, weight, x, x_tilde, w)
    same = gptaq_solve(weight, hessian.float(), hessian.float(), spec).dequantize()  # x == x~: plain GPTQ
    assert torch.allclose(same, plain, atol=1e-3 * float(weight.abs().max()))


def test_partial_strength_moves_the_target_part_way_to_the_fp_fit() -> None:
    """alpha interpolates between W (the quantized path's own output) and the least-squares FP fit, and alpha 0
    solves exactly what plain GPTQ on the quantized inputs solves."""
    weight, x, x_tilde, w, hessian, cross = _data(2)
    full = fp_target_weight(weight, hessian, cross, damp=0.0).double()
    for alpha in (0.25, 0.5):
        part = fp_target_weight(weight, hessian, cross, damp=0.0, alpha=alpha).double()
        assert torch.allclose(part, weight.double() + alpha * (full - weight.double()), atol=1e-5)
    spec = QuantSpec(bits=3, group_size=16, fp_alpha=0.0)
    plain = gptq_solve(weight, hessian.float(), spec)
    assert torch.equal(gptaq_solve(weight, hessian.float(), cross.float(), spec).qweight, plain.qweight)


def test_recipe_leaves_one_linear_out_of_the_fp_target() -> None:
    """An override fp_alpha 0 on down_proj: down_proj's codes are GPTQ's without the FP target, the other linears'
    are the FP-target run's (the engine solves layer by layer, so only the last layer's down_proj is compared
    where nothing after it depends on it)."""
    import copy

    from helpers import tiny_model

    from quantkit.engine import calibrate_model
    from quantkit.quant.recipe import Override, Recipe

    model = tiny_model("llama", seed=0, vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64).eval()
    samples = [{"input_ids": torch.randint(0, 101, (1, 24), generator=torch.Generator().manual_seed(i))} for i in range(4)]
    spec = QuantSpec(bits=3, group_size=32)
    recipe = Recipe(overrides=[Override(targets=("down_proj",), fp_alpha=0)])
    mixed = calibrate_model(copy.deepcopy(model), samples, spec, method="gptq", fp_target=True, recipe=recipe,
                            progress=False)
    full = calibrate_model(copy.deepcopy(model), samples, spec, method="gptq", fp_target=True, progress=False)
    down = "model.layers.0.mlp.down_proj"
    for name, result in full.results.items():
        if name != down:
            assert torch.equal(mixed.results[name].qweight, result.qweight), name
    # down_proj: plain GPTQ from the Hessian of its inputs on the quantized path (the mixed run's quantized layer)
    quantized = copy.deepcopy(model)
    with torch.no_grad():
        for name, result in mixed.results.items():
            quantized.get_submodule(name).weight.copy_(result.dequantize())
    inputs = []
    hook = quantized.get_submodule(down).register_forward_hook(lambda m, a, o: inputs.append(a[0][0].double()))
    with torch.no_grad():
        for sample in samples:
            quantized(**sample)
    hook.remove()
    x = torch.cat(inputs)
    reference = gptq_solve(model.get_submodule(down).weight.detach(), (2 * x.T @ x / x.shape[0]).float(), spec)
    same = (reference.qweight == mixed.results[down].qweight).float().mean()
    assert same > 0.995, float(same)  # float32 vs float64 Hessian sums may flip a rare code
    assert not torch.equal(full.results[down].qweight, mixed.results[down].qweight)
    assert mixed.report["layers"][0]["linears"]["mlp.down_proj"]["fp_alpha"] == 0.0
