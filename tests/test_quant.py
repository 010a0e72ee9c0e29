"""Solvers (quantkit.quant): grids, RTN and GPTQ against independent reference computations."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.quant import (
    METHODS,
    QuantResult,
    QuantSpec,
    gptq_solve,
    method_for,
    rtn_solve,
)
from quantkit.quant.grid import dequantize, fit_grid, quantize

SHARED = Path(__file__).resolve().parents[2] / "shared"
REF_LM = SHARED / "models" / "ref-lm" / "model.safetensors"
ALL_BITS = (2, 3, 4, 8)


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread() -> Iterator[None]:
    """Run this module on one intra-op thread, restoring the setting afterwards.

    The matrices here are small: GPTQ's column loop is thousands of tiny ops, and on a
    shared 2-core machine a second OpenMP thread spin-waits and makes them 5-10x slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------- reference computations


def reference_grid(rows: np.ndarray, bits: int, sym: bool) -> tuple[np.ndarray, np.ndarray]:
    """Min-max grid per row, written from the documented GPTQ convention (numpy, float32)."""
    rows = rows.astype(np.float32)
    maxq = 2**bits - 1
    xmin = np.minimum(rows.min(axis=1), np.float32(0))
    xmax = np.maximum(rows.max(axis=1), np.float32(0))
    flat = (xmin == 0) & (xmax == 0)
    xmin[flat], xmax[flat] = -1, 1
    if sym:
        scale = (np.float32(2) * np.maximum(-xmin, xmax) / np.float32(maxq)).astype(np.float16)
        scale = scale.astype(np.float32)
        zero = np.full_like(scale, 2 ** (bits - 1))
    else:
        scale = ((xmax - xmin) / np.float32(maxq)).astype(np.float16).astype(np.float32)
        zero = np.clip(np.round(-xmin / scale), 0, maxq).astype(np.float32)
    return scale, zero


def reference_codes(rows: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """Nearest code of each value of each row on that row's grid."""
    codes = np.round(rows.astype(np.float32) / scale[:, None]) + zero[:, None]
    return np.clip(codes, 0, 2**bits - 1).astype(np.uint8)


def reference_rtn(weight: np.ndarray, bits: int, sym: bool, group_size: int) -> np.ndarray:
    """RTN codes [out, in] with one min-max grid per (row, group), group by group."""
    out_features, in_features = weight.shape
    width = in_features if group_size == -1 else group_size
    codes = np.empty(weight.shape, dtype=np.uint8)
    for start in range(0, in_features, width):
        block = weight[:, start : start + width]
        scale, zero = reference_grid(block, bits, sym)
        codes[:, start : start + width] = reference_codes(block, scale, zero, bits)
    return codes


def grid_sq_error(
    rows: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> np.ndarray:
    """Per-row squared error of rounding to the grid, computed in numpy (float64)."""
    rows_np = rows.double().numpy()
    scale_np, zero_np = scale.double().numpy()[:, None], zero.double().numpy()[:, None]
    codes = np.clip(np.round(rows_np / scale_np) + zero_np, 0, 2**bits - 1)
    return (((codes - zero_np) * scale_np - rows_np) ** 2).sum(axis=1)


def correlated_inputs(in_features: int, tokens: int, seed: int) -> torch.Tensor:
    """Inputs X [in, tokens] with strongly correlated channels and uneven channel scales."""
    generator = torch.Generator().manual_seed(seed)
    spectrum = torch.logspace(0, -2, in_features)
    basis, _ = torch.linalg.qr(torch.randn(in_features, in_features, generator=generator))
    mixing = basis * spectrum
    channel_scale = torch.exp(torch.randn(in_features, 1, generator=generator))
    return channel_scale * (mixing @ torch.randn(in_features, tokens, generator=generator))


def hessian_of(inputs: torch.Tensor) -> torch.Tensor:
    """H = 2 X X^T / tokens, the engine's convention."""
    return 2 * inputs @ inputs.T / inputs.shape[1]


def output_error(weight: torch.Tensor, quantized: torch.Tensor, inputs: torch.Tensor) -> float:
    """||W X - Q X||_F^2 in float64."""
    return float(((weight.double() - quantized.double()) @ inputs.double()).square().sum())


def damped(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp * mean(diag H) * I in float64."""
    hessian = hessian.double()
    return hessian + damp * hessian.diagonal().mean() * torch.eye(
        hessian.shape[0], dtype=torch.float64
    )


def sorted_order(hessian: torch.Tensor) -> torch.Tensor:
    """Columns by decreasing Hessian diagonal (ties by index), via numpy."""
    diag = hessian.diagonal().numpy()
    return torch.from_numpy(np.lexsort((np.arange(diag.size), -diag)).copy())


# ---------------------------------------------------------------- grids and RTN


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [-1, 16])
def test_weights_on_grid_round_trip_exactly(bits: int, sym: bool, group_size: int) -> None:
    generator = torch.Generator().manual_seed(bits * 10 + sym)
    out_features, in_features, maxq = 12, 64, 2**bits - 1
    n_groups = 1 if group_size == -1 else in_features // group_size
    codes = torch.randint(0, maxq + 1, (out_features, in_features), generator=generator).to(
        torch.uint8
    )
    scales = (torch.rand(out_features, n_groups, generator=generator) * 0.1 + 1e-3).half().float()
    if sym:
        zeros = torch.full((out_features, n_groups), 2 ** (bits - 1), dtype=torch.uint8)
    else:
        zeros = torch.randint(0, maxq + 1, (out_features, n_groups), generator=generator).to(
            torch.uint8
        )
    g_idx = torch.arange(in_features, dtype=torch.int32) // (
        in_features if group_size == -1 else group_size
    )
    weight_np = (
        codes.numpy().astype(np.float32) - zeros.numpy()[:, g_idx].astype(np.float32)
    ) * scales.numpy()[:, g_idx]
    weight = torch.from_numpy(weight_np)

    g = g_idx.long()
    requantized = quantize(weight, scales[:, g], zeros[:, g].float(), maxq)
    assert torch.equal(requantized, codes)
    assert torch.equal(dequantize(codes, scales[:, g], zeros[:, g]), weight)
    result = QuantResult(codes, scales, zeros, g_idx, bits, group_size, sym)
    assert torch.equal(result.dequantize(), weight)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("group_size", [-1, 16])
def test_rtn_recovers_an_asym_grid_exactly(bits: int, group_size: int) -> None:
    """Weights on an asym grid whose codes reach 0 and maxq in each group: min-max finds that grid."""
    generator = torch.Generator().manual_seed(bits)
    out_features, in_features, maxq = 10, 64, 2**bits - 1
    width = in_features if group_size == -1 else group_size
    n_groups = in_features // width
    codes = torch.randint(0, maxq + 1, (out_features, in_features), generator=generator)
    codes = codes.reshape(out_features, n_groups, width)
    codes[:, :, 0], codes[:, :, 1] = 0, maxq
    codes = codes.reshape(out_features, in_features).to(torch.uint8)
    scales = (torch.rand(out_features, n_groups, generator=generator) + 0.01).half().float()
    zeros = torch.randint(0, maxq + 1, (out_features, n_groups), generator=generator).to(
        torch.uint8
    )
    g = torch.arange(in_features) // width
    weight = (codes.float() - zeros[:, g].float()) * scales[:, g]

    result = rtn_solve(weight, None, QuantSpec(bits=bits, group_size=group_size, sym=False))
    assert torch.equal(result.qweight, codes)
    assert torch.equal(result.scales, scales)
    assert torch.equal(result.zeros, zeros)
    assert torch.equal(result.dequantize(), weight)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [-1, 32])
def test_rtn_matches_reference_and_stays_in_range(bits: int, sym: bool, group_size: int) -> None:
    generator = torch.Generator().manual_seed(7 * bits + sym)
    weight = torch.randn(24, 96, generator=generator) * torch.exp(
        torch.randn(24, 1, generator=generator)
    )
    weight[3, 5] = 9.0  # an outlier
    weight[4] = torch.rand(96, generator=generator)  # a row without negative values
    result = rtn_solve(weight, None, QuantSpec(bits=bits, group_size=group_size, sym=sym))
    maxq = 2**bits - 1

    assert torch.equal(
        result.qweight, torch.from_numpy(reference_rtn(weight.numpy(), bits, sym, group_size))
    )
    assert result.qweight.dtype == torch.uint8 and int(result.qweight.max()) <= maxq
    assert result.zeros.dtype == torch.uint8 and int(result.zeros.max()) <= maxq
    assert result.scales.dtype == torch.float32
    assert torch.equal(result.scales.half().float(), result.scales)
    assert bool((result.scales > 0).all())
    if sym:
        assert bool((result.zeros == 2 ** (bits - 1)).all())
    n_groups = 1 if group_size == -1 else 96 // group_size
    assert result.scales.shape == (24, n_groups) and result.g_idx.dtype == torch.int32
    # Min-max rounding: no weight is further than one step from its value.
    step = result.scales[:, result.g_idx.long()]
    assert bool(((result.dequantize() - weight).abs() <= step * 1.001).all())


@pytest.mark.parametrize("sym", [True, False])
def test_all_zero_row_gets_a_positive_scale_and_decodes_to_zero(sym: bool) -> None:
    weight = torch.randn(4, 32)
    weight[1] = 0
    for solve in (rtn_solve, lambda w, _h, s: gptq_solve(w, torch.eye(32), s)):
        result = solve(weight, None, QuantSpec(bits=4, group_size=16, sym=sym))
        assert bool((result.scales > 0).all())
        assert torch.equal(result.dequantize()[1], torch.zeros(32))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sym", [True, False])
def test_mse_clipping_never_worse_than_min_max(bits: int, sym: bool) -> None:
    generator = torch.Generator().manual_seed(bits)
    # Heavy tails (Student-t, 3 dof): clipping the range pays off on most rows.
    rows = torch.from_numpy(
        np.random.default_rng(bits).standard_t(3, size=(64, 128)).astype(np.float32)
    )
    rows[0] = torch.rand(128, generator=generator)  # positive-only row
    minmax_scale, minmax_zero = reference_grid(rows.numpy(), bits, sym)
    plain_scale, plain_zero = fit_grid(
        rows, QuantSpec(bits=bits, group_size=-1, sym=sym, mse=False)
    )
    assert np.array_equal(plain_scale.numpy(), minmax_scale)
    assert np.array_equal(plain_zero.numpy(), minmax_zero)

    scale, zero = fit_grid(rows, QuantSpec(bits=bits, group_size=-1, sym=sym, mse=True))
    assert torch.equal(scale.half().float(), scale)
    mse_error = grid_sq_error(rows, scale, zero, bits)
    minmax_error = grid_sq_error(
        rows, torch.from_numpy(minmax_scale), torch.from_numpy(minmax_zero), bits
    )
    assert bool((mse_error <= minmax_error * (1 + 1e-9)).all())
    assert mse_error.sum() < 0.97 * minmax_error.sum()


# ---------------------------------------------------------------- bad input


def test_nan_or_inf_raises_and_names_the_module() -> None:
    weight = torch.randn(8, 32)
    weight[2, 3] = float("nan")
    for solve in {m.solve for m in METHODS.values()}:
        with pytest.raises(QuantkitError, match="layers.0.q_proj"):
            solve(weight, torch.eye(32), QuantSpec(group_size=-1), "layers.0.q_proj")
    hessian = torch.eye(32)
    hessian[1, 1] = float("inf")
    with pytest.raises(QuantkitError, match="Hessian of layers.1.up"):
        gptq_solve(torch.randn(8, 32), hessian, QuantSpec(group_size=-1), "layers.1.up")


def test_invalid_specs_and_shapes_raise() -> None:
    weight = torch.randn(8, 128)
    for solve in {m.solve for m in METHODS.values()}:
        with pytest.raises(QuantkitError, match="bits"):
            solve(weight, torch.eye(128), QuantSpec(bits=5))
        with pytest.raises(QuantkitError, match="does not divide"):
            solve(weight, torch.eye(128), QuantSpec(group_size=48))
    with pytest.raises(QuantkitError, match="Hessian of shape"):
        gptq_solve(weight, torch.eye(64), QuantSpec())
    with pytest.raises(QuantkitError, match="Hessian of shape"):
        gptq_solve(weight, None, QuantSpec())


def test_solver_lookup() -> None:
    assert method_for("rtn").solve is rtn_solve
    assert method_for("gptq").solve is gptq_solve
    assert method_for("TLQ").solve is gptq_solve
    with pytest.raises(QuantkitError, match="gptq.*rtn.*tlq"):
        method_for("awq")


def test_non_positive_definite_hessian_raises() -> None:
    with pytest.raises(QuantkitError, match="not positive definite"):
        gptq_solve(torch.randn(4, 16), -torch.eye(16), QuantSpec(group_size=-1), "mlp.down")


# ---------------------------------------------------------------- GPTQ


GPTQ_SPECS = [
    QuantSpec(bits=4, group_size=-1),
    QuantSpec(bits=3, group_size=32, act_order=False),
    QuantSpec(bits=3, group_size=32, sym=False, mse=True),
    QuantSpec(bits=3, group_size=32, act_order=True, static_groups=False),
    QuantSpec(bits=3, group_size=32, act_order=True, static_groups=True),
    QuantSpec(bits=2, group_size=-1, act_order=True, block_size=48),
]


@pytest.mark.parametrize(
    "spec",
    GPTQ_SPECS,
    ids=lambda s: (
        f"w{s.bits}g{s.group_size}{'a' if s.act_order else ''}{'s' if s.static_groups else ''}{'m' if s.mse else ''}"
    ),
)
def test_gptq_beats_rtn_and_reports_its_true_loss(spec: QuantSpec) -> None:
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(1))
    inputs = correlated_inputs(128, 1024, seed=2)
    hessian = hessian_of(inputs)
    stats: dict = {}
    result = gptq_solve(weight, hessian, spec, stats=stats)
    quantized = result.dequantize()
    rtn = rtn_solve(weight, None, spec).dequantize()

    assert output_error(weight, quantized, inputs) < 0.7 * output_error(weight, rtn, inputs)
    # The loss the solver accumulated in its own (possibly permuted) order equals the
    # quadratic form of the returned weights in the original order.
    delta = weight.double() - quantized.double()
    true_loss = float(torch.trace(delta @ damped(hessian, stats["damp"]) @ delta.T)) / 2
    assert stats["loss"] == pytest.approx(true_loss, rel=2e-3)
    assert stats["damp"] == spec.damp and stats["dead_columns"] == 0
    assert torch.equal(result.scales.half().float(), result.scales)
    assert int(result.qweight.max()) <= 2**spec.bits - 1


@pytest.mark.shared
def test_gptq_beats_rtn_on_a_trained_weight() -> None:
    if not REF_LM.exists():
        pytest.skip(f"reference model not found at {REF_LM} (../shared is absent)")
    from safetensors import safe_open

    with safe_open(str(REF_LM), framework="pt") as checkpoint:
        weight = checkpoint.get_tensor("model.layers.2.mlp.down_proj.weight").float()
    inputs = correlated_inputs(weight.shape[1], 1024, seed=3)
    hessian = hessian_of(inputs)
    for spec in (
        QuantSpec(bits=4, group_size=-1),
        QuantSpec(bits=3, group_size=64, act_order=True, static_groups=False),
    ):
        gptq = gptq_solve(weight, hessian, spec).dequantize()
        rtn = rtn_solve(weight, None, spec).dequantize()
        assert output_error(weight, gptq, inputs) < 0.7 * output_error(weight, rtn, inputs)


def test_act_order_groups_and_original_column_order() -> None:
    weight = torch.randn(16, 128, generator=torch.Generator().manual_seed(4))
    hessian = hessian_of(correlated_inputs(128, 512, seed=5))
    order = sorted_order(hessian)

    dynamic = gptq_solve(weight, hessian, QuantSpec(bits=4, group_size=32, act_order=True, static_groups=False))
    assert dynamic.act_order
    # Group k holds the k-th run of 32 columns in solve order (decreasing diagonal).
    expected = torch.empty(128, dtype=torch.int32)
    expected[order] = (torch.arange(128) // 32).to(torch.int32)
    assert torch.equal(dynamic.g_idx, expected)
    assert torch.bincount(dynamic.g_idx.long()).tolist() == [32] * 4

    static = gptq_solve(
        weight, hessian, QuantSpec(bits=4, group_size=32, act_order=True, static_groups=True)
    )
    assert torch.equal(static.g_idx, (torch.arange(128) // 32).to(torch.int32))
    assert torch.bincount(static.g_idx.long()).tolist() == [32] * 4
    # Static groups are fitted on the unsolved weight: the grids are RTN's.
    rtn = rtn_solve(weight, None, QuantSpec(bits=4, group_size=32))
    assert torch.equal(static.scales, rtn.scales) and torch.equal(static.zeros, rtn.zeros)


def test_act_order_equals_solving_the_permuted_problem() -> None:
    """Solving (W P, P^T H P) in natural order and un-permuting gives the act-order result."""
    weight = torch.randn(16, 96, generator=torch.Generator().manual_seed(6))
    hessian = hessian_of(correlated_inputs(96, 512, seed=7))
    order = sorted_order(hessian)
    spec = QuantSpec(bits=3, group_size=-1)
    act = gptq_solve(weight, hessian, QuantSpec(bits=3, group_size=-1, act_order=True))
    permuted = gptq_solve(weight[:, order], hessian[order][:, order], spec)
    unpermuted = torch.empty_like(permuted.qweight)
    unpermuted[:, order] = permuted.qweight
    assert (act.qweight == unpermuted).float().mean() > 0.99
    assert torch.equal(act.scales, permuted.scales)


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=4, group_size=-1),
        QuantSpec(bits=3, group_size=16, sym=False),
        QuantSpec(bits=2, group_size=16, mse=True),
        QuantSpec(bits=4, group_size=-1, act_order=True),
        QuantSpec(bits=4, group_size=16, act_order=True, static_groups=True),
    ],
)
def test_gptq_with_diagonal_hessian_is_rtn(spec: QuantSpec) -> None:
    """With uncorrelated inputs no error can be compensated: GPTQ reduces exactly to RTN."""
    generator = torch.Generator().manual_seed(8)
    weight = torch.randn(20, 64, generator=generator)
    hessian = torch.diag(torch.rand(64, generator=generator) + 0.1)
    gptq = gptq_solve(weight, hessian, spec)
    rtn = rtn_solve(weight, None, spec)
    assert torch.equal(gptq.qweight, rtn.qweight)
    assert torch.equal(gptq.scales, rtn.scales) and torch.equal(gptq.zeros, rtn.zeros)
    if not spec.mse:
        reference = reference_rtn(weight.numpy(), spec.bits, spec.sym, spec.group_size)
        assert torch.equal(gptq.qweight, torch.from_numpy(reference))


@pytest.mark.parametrize(
    "spec",
    [QuantSpec(bits=4, group_size=16), QuantSpec(bits=3, group_size=-1, sym=False, act_order=True)],
)
def test_dead_inputs_quantize_to_zero(spec: QuantSpec) -> None:
    inputs = correlated_inputs(64, 256, seed=9)
    dead = [3, 17, 40]
    inputs[dead] = 0
    weight = torch.randn(12, 64, generator=torch.Generator().manual_seed(10))
    stats: dict = {}
    result = gptq_solve(weight, hessian_of(inputs), spec, stats=stats)
    quantized = result.dequantize()
    assert bool(torch.isfinite(quantized).all()) and bool(torch.isfinite(result.scales).all())
    assert torch.equal(quantized[:, dead], torch.zeros(12, len(dead)))
    assert stats["dead_columns"] == len(dead)
    rtn = rtn_solve(weight, None, spec).dequantize()
    assert output_error(weight, quantized, inputs) < output_error(weight, rtn, inputs)


def test_singular_hessian_without_damp_is_retried() -> None:
    inputs = correlated_inputs(64, 16, seed=11)  # 16 tokens: rank 16 < 64
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(12))
    stats: dict = {}
    result = gptq_solve(
        weight, hessian_of(inputs), QuantSpec(bits=4, group_size=-1, damp=0.0), stats=stats
    )
    assert stats["damp"] > 0
    assert bool(torch.isfinite(result.dequantize()).all())


def reference_gptq(weight: np.ndarray, hessian: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """GPTQ as the paper writes it (float64 numpy): H^-1 formed explicitly, its upper Cholesky factor U, one column
    at a time, each rounding error fed to every later column at once (no lazy blocks); min-max grids fitted per
    channel, per static group on the unsolved weight, or per dynamic group on the columns as they stand. Codes."""
    weight, hessian = weight.astype(np.float64), hessian.astype(np.float64)
    out_features, in_features = weight.shape
    hessian = hessian + spec.damp * np.diag(hessian).mean() * np.eye(in_features)
    order = np.lexsort((np.arange(in_features), -np.diag(hessian))) if spec.act_order else np.arange(in_features)
    grouped = spec.group_size != -1
    width = spec.group_size if grouped else in_features
    static = not grouped or (spec.act_order and spec.static_groups)
    fixed = [reference_grid(weight[:, start : start + width], spec.bits, spec.sym) for start in range(0, in_features, width)]
    work = weight[:, order].copy()
    upper = np.linalg.cholesky(np.linalg.inv(hessian[np.ix_(order, order)])).T
    codes = np.empty((out_features, in_features), dtype=np.uint8)
    for column in range(in_features):
        if static:
            scale, zero = fixed[order[column] // width]
        elif column % width == 0:
            scale, zero = reference_grid(work[:, column : column + width], spec.bits, spec.sym)
        code = reference_codes(work[:, column : column + 1].astype(np.float32), scale, zero, spec.bits)[:, 0]
        error = (work[:, column] - (code.astype(np.float64) - zero) * scale) / upper[column, column]
        work[:, column + 1 :] -= np.outer(error, upper[column, column + 1 :])
        codes[:, order[column]] = code
    return codes


@pytest.mark.parametrize("spec", [
    QuantSpec(bits=4, group_size=32),  # act-order, static groups: the default
    QuantSpec(bits=3, group_size=32, act_order=False, block_size=16),
    QuantSpec(bits=3, group_size=32, sym=False, act_order=True, static_groups=False, block_size=48),
    QuantSpec(bits=2, group_size=-1, sym=False),
], ids=["w4g32as", "w3g32-b16", "w3g32a-dynamic-b48", "w2-channel"])
def test_gptq_codes_match_the_textbook_algorithm(spec: QuantSpec) -> None:
    """The solver (one Cholesky of the reversed H, left-looking blocks) gives the codes of GPTQ written directly from
    H^-1, up to float32 rounding of values that sit on a rounding boundary."""
    weight = torch.randn(24, 128, generator=torch.Generator().manual_seed(21))
    hessian = hessian_of(correlated_inputs(128, 1024, seed=22))
    result = gptq_solve(weight, hessian, spec)
    reference = reference_gptq(weight.numpy(), hessian.numpy(), spec)
    assert (result.qweight.numpy() == reference).mean() > 0.995


@pytest.mark.parametrize("group_size", [-1, 64])
def test_lazy_block_size_does_not_change_the_solution(group_size: int) -> None:
    """Lazy batching only reorders the same updates; groups wider than a block need the pending ones."""
    weight = torch.randn(16, 128, generator=torch.Generator().manual_seed(13))
    hessian = hessian_of(correlated_inputs(128, 512, seed=14))
    solutions = []
    for block_size in (1, 7, 16, 128):
        stats: dict = {}
        spec = QuantSpec(bits=3, group_size=group_size, block_size=block_size)
        solutions.append((gptq_solve(weight, hessian, spec, stats=stats), stats["loss"]))
    reference, reference_loss = solutions[0]
    # Block width 1 never defers an update: the reference. Others may differ only by float
    # rounding (a rare code or one fp16 step of a scale), not by a grid fitted on stale columns.
    for result, loss in solutions[1:]:
        assert (result.qweight == reference.qweight).float().mean() > 0.999
        assert torch.allclose(result.scales, reference.scales, rtol=2e-3, atol=0)
        assert loss == pytest.approx(reference_loss, rel=1e-4)


def _kronecker_nearest_plane(weight, hessian, factor, scale, zero, maxq, damp) -> list[list[float]]:
    """Codes of Babai's nearest plane on the loss vec(W - Q)^T (H (x) G) vec(W - Q), written as a scalar loop over
    every weight in the order column by column, row by row (float64): each residual, over the diagonal of the
    upper Cholesky factor U of (H (x) G)^-1, moves every later weight by its row of U; per-channel grids."""
    out, columns = weight.shape
    h = hessian.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    g = factor.double().clone()
    g.diagonal(dim1=1, dim2=2).add_(damp * g.diagonal(dim1=1, dim2=2).mean(-1, keepdim=True))
    metric = torch.kron(h, torch.block_diag(*g))  # index c * out + i: column c, row i
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(metric)), upper=True).tolist()
    values = weight.double().T.reshape(-1).tolist()
    codes = [[0.0] * columns for _ in range(out)]
    for at in range(out * columns):
        c, i = divmod(at, out)
        s, z = float(scale[i]), float(zero[i])
        q = min(max(round(values[at] / s) + z, 0), maxq)
        codes[i][c] = q
        residual = (values[at] - (q - z) * s) / upper[at][at]
        for later in range(at + 1, out * columns):
            values[later] -= residual * upper[at][later]
    return codes


@pytest.mark.parametrize("steps", ["numpy", "torch"])
def test_row_rounding_with_feedback_matches_a_kronecker_nearest_plane_reference(steps: str, monkeypatch) -> None:
    """GPTQ with an output-side factor G (blocks of rows) rounds each column's rows with feedback across them and
    every later column with GPTQ's update, in wavefront steps over whole spans of columns: its codes equal Babai's
    nearest plane on H (x) G taken weight by weight (a scalar loop over the dense Kronecker factor, written here),
    with numpy's steps (the CPU) and torch's (elsewhere, run here on the CPU); blocks narrower and wider than the
    span, spans cut by GPTQ's block (block_size 3)."""
    from quantkit.quant import gptq
    from quantkit.quant.grid import fit_groups
    from quantkit.quant.rows import RowFeedback

    if steps == "torch":
        monkeypatch.setattr(gptq, "RowFeedback", lambda upper: RowFeedback(upper, numpy=False))
    maxq, mismatched, total = 3, 0, 0
    for seed, (blocks, width, columns, block_size) in enumerate(((3, 4, 6, 128), (2, 8, 5, 3), (1, 6, 9, 4))):
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(blocks * width, columns, generator=generator)
        x = torch.randn(64, columns, generator=generator) @ torch.randn(columns, columns, generator=generator)
        hessian = 2 * x.T @ x / 64
        mixing = torch.randn(blocks, width, width, generator=generator)
        factor = mixing @ mixing.transpose(1, 2) + 0.1 * torch.eye(width)
        spec = QuantSpec(bits=2, group_size=-1, sym=False, act_order=False, block_size=block_size)
        scale, zero = fit_groups(weight, spec)
        expected = _kronecker_nearest_plane(weight, hessian, factor, scale[:, 0], zero[:, 0], maxq, spec.damp)
        got = gptq.gptq_solve(weight, hessian, spec, row_metric=factor).qweight.tolist()
        mismatched += sum(a != b for row_got, row in zip(got, expected) for a, b in zip(row_got, row))
        total += weight.numel()
    assert mismatched == 0, f"{mismatched} of {total} codes differ"


def test_output_side_factor_rounds_rows_with_feedback() -> None:
    """GPTQ with an output-side factor G (block-diagonal over rows): the identity changes nothing, and a correlated
    G lowers the Kronecker loss tr((W - Q)^T G (W - Q) H) that plain GPTQ does not see."""
    from quantkit.quant.gptq import gptq_solve

    spec = QuantSpec(bits=2, group_size=16, sym=False)
    blocks, width = 4, 8
    ratios = []
    for seed in range(6):
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(blocks * width, 32, generator=generator)
        x = torch.randn(256, 32, generator=generator) @ torch.randn(32, 32, generator=generator)
        hessian = 2 * x.T @ x / 256
        eye = torch.eye(width).expand(blocks, width, width)
        plain = gptq_solve(weight, hessian, spec)
        assert torch.equal(gptq_solve(weight, hessian, spec, row_metric=eye.clone()).qweight, plain.qweight)
        mixing = torch.randn(blocks, width, width, generator=generator)
        factor = mixing @ mixing.transpose(1, 2) + 0.05 * torch.eye(width)  # strongly correlated rows
        dense = torch.block_diag(*factor).double()

        def loss(result, weight=weight, dense=dense, hessian=hessian) -> float:
            delta = (weight - result.dequantize()).double()
            return float(torch.trace(delta.T @ dense @ delta @ hessian.double()))

        ratios.append(loss(gptq_solve(weight, hessian, spec, row_metric=factor)) / loss(plain))
    assert sum(ratios) / len(ratios) < 0.9 and max(ratios) < 1.05, ratios
