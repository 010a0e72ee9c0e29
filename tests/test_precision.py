"""Precision at real widths: degenerate inputs at width 2048, the damp raised only when it must be (with one
warning naming the linear), Hessian sums in float32 or float64, and bfloat16/float16 models in and out."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from helpers import make_tokenizer, run_calibration, tiny_model, write_text
from safetensors import safe_open

from quantkit import memory
from quantkit.engine import hessian as hessian_module
from quantkit.engine.hessian import HessianAccumulator
from quantkit.quant.gptaq import fp_target_weight
from quantkit.quant.gptq import gptq_solve
from quantkit.quant.rtn import rtn_solve
from quantkit.quant.spec import QuantSpec

WIDTH = 2048
SPEC = QuantSpec(bits=4, group_size=128)


def degenerate_inputs(kind: str, generator: torch.Generator) -> torch.Tensor:
    """[tokens, WIDTH] calibration inputs of a degenerate kind seen at real widths."""
    if kind == "dead columns":  # half the channels never fire (a pruned or gated-off input)
        x = torch.randn(2560, WIDTH, generator=generator)
        x[:, torch.randperm(WIDTH, generator=generator)[: WIDTH // 2]] = 0
        return x
    if kind == "duplicated tokens":  # 8 distinct tokens repeated 256 times each (padding, a repeated prompt)
        return torch.randn(8, WIDTH, generator=generator).repeat(256, 1)
    if kind == "expert with three tokens":  # a rarely routed MoE expert
        return torch.randn(3, WIDTH, generator=generator)
    if kind == "outlier channels":  # a few channels 1000x the others (massive activations)
        x = torch.randn(2560, WIDTH, generator=generator)
        x[:, :4] *= 1000
        return x
    raise ValueError(kind)


def dense_hessian(x: torch.Tensor) -> torch.Tensor:
    """2/T X^T X, computed in float64 (the engine's normalisation)."""
    x = x.double()
    return (2 / x.shape[0]) * x.T @ x


def output_error(weight: torch.Tensor, quantized: torch.Tensor, x: torch.Tensor) -> float:
    """||X W^T - X Q^T||^2 in float64: the layer's output error on the calibration inputs."""
    return float((x.double() @ (weight.double() - quantized.double()).T).square().sum())


@pytest.mark.parametrize("kind", ["dead columns", "duplicated tokens", "expert with three tokens", "outlier channels"])
def test_degenerate_inputs_at_width_2048_solve_at_the_default_damp(kind: str, caplog) -> None:
    generator = torch.Generator().manual_seed(0)
    x = degenerate_inputs(kind, generator)
    weight = torch.randn(64, WIDTH, generator=generator) * 0.02
    stats: dict = {}
    with caplog.at_level(logging.WARNING, logger="quantkit"):
        result = gptq_solve(weight, dense_hessian(x).float(), SPEC, name="model.layers.7.mlp.down_proj", stats=stats)
    quantized = result.dequantize()
    assert bool(torch.isfinite(quantized).all())
    assert stats["damp"] == SPEC.damp and not caplog.records  # nothing raised, nothing to warn about
    # GPTQ beats rounding to nearest on the very inputs it was solved for (RTN reads no Hessian)
    assert output_error(weight, quantized, x) < output_error(weight, rtn_solve(weight, None, SPEC).dequantize(), x)


def test_float32_failure_is_solved_in_float64_at_the_same_damp(caplog) -> None:
    """Near-duplicate tokens at damp 1e-4: float32 Cholesky fails at width 2048 and float64 holds; the solver's
    own loss then agrees with tr(D H_damped D^T) / 2 computed densely in float64."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, WIDTH, generator=generator).repeat(2048, 1) + 1e-3 * torch.randn(2048, WIDTH, generator=generator)
    hessian = dense_hessian(x)
    damped = hessian.clone()
    damped.diagonal().add_(1e-4 * float(hessian.float().double().diagonal().mean()))
    assert int(torch.linalg.cholesky_ex(damped.float())[1]) != 0  # float32 alone fails here
    weight = torch.randn(64, WIDTH, generator=generator) * 0.02
    stats: dict = {}
    spec = QuantSpec(bits=4, group_size=128, damp=1e-4, act_order=False)
    with caplog.at_level(logging.WARNING, logger="quantkit"):
        result = gptq_solve(weight, hessian.float(), spec, name="model.layers.0.self_attn.q_proj", stats=stats)
    assert stats["damp"] == 1e-4 and not caplog.records
    delta = weight.double() - result.dequantize().double()
    assert stats["loss"] == pytest.approx(float(torch.trace(delta @ damped @ delta.T)) / 2, rel=1e-3)


def test_raised_damp_is_one_warning_naming_the_linear(caplog) -> None:
    generator = torch.Generator().manual_seed(1)
    x = degenerate_inputs("expert with three tokens", generator)
    weight = torch.randn(32, WIDTH, generator=generator)
    stats: dict = {}
    name = "model.layers.3.mlp.experts.17.gate_proj + model.layers.3.mlp.experts.17.up_proj"
    with caplog.at_level(logging.WARNING, logger="quantkit"):
        result = gptq_solve(weight, dense_hessian(x).float(), QuantSpec(bits=4, group_size=128, damp=0.0), name=name,
                            stats=stats)
    assert stats["damp"] > 0 and bool(torch.isfinite(result.dequantize()).all())
    [record] = caplog.records
    line = record.getMessage()
    assert "\n" not in line and "model.layers.3.mlp.experts.17.gate_proj" in line and f"damp {stats['damp']:g}" in line


def test_fp_target_on_a_singular_hessian_raises_the_damp(caplog) -> None:
    """Dead inputs and three tokens with no damp: the FP target still solves, toward the damped normal equations."""
    generator = torch.Generator().manual_seed(2)
    width = 256
    x_tilde = torch.randn(3, width, generator=generator)
    x = x_tilde + 0.1 * torch.randn(3, width, generator=generator)
    # the float32 sums the solver is given, in float64: at damp 1e-4 their rounding moves the solution by ~1%
    hessian = dense_hessian(x_tilde).float().double()
    cross = ((2 / 3) * x.double().T @ x_tilde.double()).float().double()
    weight = torch.randn(8, width, generator=generator)
    with caplog.at_level(logging.WARNING, logger="quantkit"):
        target = fp_target_weight(weight, hessian.float(), cross.float(), damp=0.0, name="lin")
    assert bool(torch.isfinite(target).all())
    [record] = caplog.records  # the undamped rank-3 matrix has no Cholesky factor: the damp went up, once
    damp = float(record.getMessage().split("solved with damp ")[1])
    h = hessian + damp * float(hessian.diagonal().mean()) * torch.eye(width, dtype=torch.float64)
    expected = weight.double() + torch.linalg.solve(h, (cross - hessian).T @ weight.double().T).T
    assert torch.allclose(target.double(), expected, rtol=1e-4, atol=1e-5)


def test_float32_sums_move_to_float64_past_the_token_limit(monkeypatch) -> None:
    """The GPU policy (float32 sums) run on CPU: past FLOAT32_SUM_TOKENS the sum widens, and bfloat16 inputs are
    multiplied in float32; the result is 2/T X^T X in float64 of the same (bfloat16-rounded) inputs."""
    monkeypatch.setattr(hessian_module, "FLOAT32_SUM_TOKENS", 3 * 512)
    generator = torch.Generator().manual_seed(3)
    acc = HessianAccumulator(WIDTH, "cpu", dtype=torch.float32)
    batches = [(torch.randn(1, 512, WIDTH, generator=generator) * 10).bfloat16() for _ in range(6)]
    for index, batch in enumerate(batches):
        acc.add(batch)
        assert acc.hessian.dtype == (torch.float32 if index < 3 else torch.float64)
    x = torch.cat([b.reshape(-1, WIDTH) for b in batches]).double()
    reference = dense_hessian(x)
    got = acc.result()
    assert got.dtype == torch.float32
    assert float((got.double() - reference).abs().max()) <= 1e-5 * float(reference.diagonal().mean())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64 sums", "float32 sums"])
@pytest.mark.parametrize("groups", [1, 3])
def test_results_taken_over_the_sums_memory_equal_fresh_copies(dtype: torch.dtype, groups: int) -> None:
    """take_results() writes the normalised Hessian and cross term over the sums' own memory: the same bits as
    result()/cross_result() (fresh float32 copies), and close to a dense float64 reference; a second call gives
    the same tensors."""
    generator = torch.Generator().manual_seed(4)
    width = 1100  # not a multiple of the conversion's row blocks
    acc = HessianAccumulator(width, "cpu", cross=True, groups=groups, dtype=dtype)
    xs, fps, ws = [], [], []
    for _ in range(3):
        x, fp = torch.randn(2, 40, width, generator=generator), torch.randn(2, 40, width, generator=generator)
        w = torch.rand(2, 40, groups, generator=generator)
        acc.add(x, w if groups > 1 else None, fp)
        xs.append(x.reshape(-1, width))
        fps.append(fp.reshape(-1, width))
        ws.append(w.reshape(-1, groups))
    fresh = acc.copy()
    hessian, cross = acc.take_results()
    assert hessian.dtype == cross.dtype == torch.float32
    assert torch.equal(hessian, fresh.result()) and torch.equal(cross, fresh.cross_result())
    assert acc.take_results()[0] is hessian and acc.take_results()[1] is cross
    x, fp, w = torch.cat(xs).double(), torch.cat(fps).double(), torch.cat(ws).double()
    for group in range(groups):
        weight = w[:, group : group + 1] if groups > 1 else torch.ones(len(x), 1, dtype=torch.float64)
        scale = 2 / weight.sum()
        expected_h, expected_c = scale * (x * weight).T @ x, scale * (fp * weight).T @ x
        got_h, got_c = (hessian[group], cross[group]) if groups > 1 else (hessian, cross)
        assert torch.allclose(got_h.double(), expected_h, rtol=1e-5, atol=1e-6)
        assert torch.allclose(got_c.double(), expected_c, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not memory.PAGES_RELEASABLE, reason="releasing pages of a live allocation needs Linux with glibc")
def test_taking_a_float64_sums_result_hands_half_its_memory_back() -> None:
    """A float64 sum becomes its float32 Hessian without a second [in, in] matrix: the process's resident memory
    drops by about half the sum instead of rising by it (result() beside the sum would add 4 in^2 bytes)."""
    width = 4096  # a 128 MiB float64 sum
    acc = HessianAccumulator(width, "cpu")
    acc.add(torch.randn(1, 64, width, generator=torch.Generator().manual_seed(5)))
    expected = acc.copy()
    with_sum = memory.current_rss_mb()
    hessian, _ = acc.take_results()
    after = memory.current_rss_mb()
    half = width * width * 4 / 2**20
    assert with_sum - after >= 0.8 * half, (with_sum, after)
    assert torch.equal(hessian, expected.result())


# ---------------------------------------------------------------- bfloat16 and float16 models in and out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_in_and_out(tmp_path: Path, dtype: torch.dtype, monkeypatch) -> None:
    """A bfloat16/float16 model keeps its dtype through calibration and export; every linear is solved in float32
    from its weight as stored, and the reloaded model holds the exported codes dequantized in its dtype."""

    import quantkit
    import quantkit.engine.solve as solving
    from quantkit.export import read_checkpoint

    model = tiny_model("llama", seed=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=64).to(dtype)
    model.save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    text = write_text(tmp_path / "text.txt", 3000)
    solves: list[tuple[list[str], list[torch.Tensor], torch.Tensor]] = []
    solve_rows, solve_slice = solving.solve_rows, solving.solve_slice

    def rows(solve, weights, hessian, spec, names, cross=None, row_metric=None):
        solves.append((list(names), [w.clone() for w in weights], hessian))
        return solve_rows(solve, weights, hessian, spec, names, cross, row_metric)

    def piece(solve, weight, start, out_features, hessian, cross, spec, name, row_metric=None):
        solves.append(([name], [weight.clone()], hessian))
        return solve_slice(solve, weight, start, out_features, hessian, cross, spec, name, row_metric)

    monkeypatch.setattr(solving, "solve_rows", rows)
    monkeypatch.setattr(solving, "solve_slice", piece)
    out = tmp_path / "out"
    run_calibration(str(tmp_path / "model"), str(out), QuantSpec(bits=4, group_size=32), calib=str(text), nsamples=4,
                    seqlen=32, progress=False, format="compressed-tensors")
    assert {n for names, _, _ in solves for n in names} == {n.removesuffix(".weight") for n in original
                                                            if n.endswith("proj.weight")}
    for names, weights, hessian in solves:
        assert hessian.dtype == torch.float32
        for name, weight in zip(names, weights):
            assert weight.dtype == torch.float32 and torch.equal(weight, original[f"{name}.weight"].float()), name
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        stored = {k: handle.get_slice(k).get_dtype() for k in handle.keys()}  # noqa: SIM118
    kept = {k for k in stored if k.rsplit(".", 1)[-1] not in ("weight_packed", "weight_scale", "weight_shape")}
    assert kept and {stored[k] for k in kept} == {"BF16" if dtype == torch.bfloat16 else "F16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    back = quantkit.load_quantized(str(out))
    assert {p.dtype for p in back.parameters()} == {dtype}
    for name, result in read_checkpoint(out).results.items():
        assert torch.equal(back.get_submodule(name).weight, result.dequantize().to(dtype)), name


def test_report_traces_of_a_tall_linear_are_summed_over_every_kth_row() -> None:
    """Above 1024 rows the output-error traces are summed over every k-th row of the whole linear: the sums equal
    the hand computation over those rows, slices split anywhere (ranks) add up to the whole, and the ratio stays
    near the exact one."""
    from quantkit.engine.solve import REPORT_ROWS, report_entry, result_stats

    generator = torch.Generator().manual_seed(4)
    rows, width = 4096, 256
    x = torch.randn(2048, width, generator=generator) * torch.linspace(0.1, 3, width)
    hessian = dense_hessian(x).float()
    weight = torch.randn(rows, width, generator=generator) * 0.02
    spec = QuantSpec(bits=3, group_size=64)
    result = gptq_solve(weight, hessian, spec)
    stats = result_stats(weight, result, hessian)
    step = rows // REPORT_ROWS
    delta = weight.double() - result.dequantize().double()
    picked, h = slice(0, rows, step), hessian.double()
    assert float(stats[0]) == pytest.approx(float(delta.square().sum()), rel=1e-6)  # the weight error over every row
    assert float(stats[2]) == pytest.approx(float(torch.einsum("oi,ij,oj->", delta[picked], h, delta[picked])), rel=1e-5)
    w = weight.double()[picked]
    assert float(stats[3]) == pytest.approx(float(torch.einsum("oi,ij,oj->", w, h, w)), rel=1e-5)
    parts = result_stats(weight[:1000], result.rows(0, 1000), hessian, 0, rows)
    parts += result_stats(weight[1000:], result.rows(1000, rows), hessian, 1000, rows)
    assert torch.allclose(parts, stats, rtol=1e-5)  # float32 traces summed in another order
    exact = float(torch.einsum("oi,ij,oj->", delta, h, delta) / torch.einsum("oi,ij,oj->", weight.double(), h, weight.double()))
    assert report_entry(stats, True)["output_rel_err"] == pytest.approx(exact, rel=0.1)
