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
