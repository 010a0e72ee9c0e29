"""Per-token activation fake-quantization: the tensor function, the model hooks, quantization-exposed calibration."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import ct_divisor, observing, tiny_model

from quantkit.errors import QuantkitError
from quantkit.quant.activations import (
    ActivationQuantizer,
    fake_quantize_tokens,
    quantized_inputs,
)
from quantkit.quant.spec import QuantSpec


def reference_fake_quant(x: torch.Tensor, bits: int, divisor: float | None = None) -> torch.Tensor:
    """Row by row in plain Python: scale = max|row| / divisor, round half to even, clamp, times scale."""
    qmax = 2 ** (bits - 1) - 1
    divisor = qmax if divisor is None else divisor
    rows = []
    for row in x.reshape(-1, x.shape[-1]).tolist():
        top = max(abs(v) for v in row)
        scale = top / divisor if top > 0 else 1.0
        rows.append([min(max(round(v / scale), -qmax - 1), qmax) * scale for v in row])
    return torch.tensor(rows, dtype=torch.float64).reshape(x.shape)


def test_int8_by_hand() -> None:
    x = torch.tensor([[1.0, -0.51, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [-2.0, 1.1, 0.01, 0.5]])
    # row 0: scale 1/127, codes 127, -64.77 -> -65, 31.75 -> 32, 0; row 1: all zero stays zero
    # row 2: scale 2/127, codes -127, 69.85 -> 70, 0.635 -> 1, 31.75 -> 32
    expected = torch.tensor([[127, -65, 32, 0], [0, 0, 0, 0], [-127, 70, 1, 32]], dtype=torch.float32)
    expected *= torch.tensor([[1 / 127], [1.0], [2 / 127]])
    assert torch.allclose(fake_quantize_tokens(x, 8), expected, rtol=1e-6, atol=0)


def test_int4_and_ct_divisor_by_hand() -> None:
    x = torch.tensor([[1.0, -0.45, 0.3], [1.0, -0.99, 0.5]])
    # int4, qmax 7: row 0 codes 7, -3.15 -> -3, 2.1 -> 2
    got = fake_quantize_tokens(x, 4)
    assert torch.allclose(got[0], torch.tensor([1.0, -3 / 7, 2 / 7]))
    # compressed-tensors divides by 7.5: 7.5 -> clamped to 7, -7.425 -> -7, 3.75 -> 4
    got = fake_quantize_tokens(x, 4, ct_divisor(4))
    assert torch.allclose(got[1], torch.tensor([7 / 7.5, -7 / 7.5, 4 / 7.5]))


@pytest.mark.parametrize("bits", [4, 8])
def test_matches_reference_on_random_batches(bits: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, dtype=torch.float64) * torch.rand(2, 5, 1, dtype=torch.float64) * 10
    for divisor in (None, ct_divisor(bits)):
        assert torch.allclose(fake_quantize_tokens(x, bits, divisor), reference_fake_quant(x, bits, divisor),
                              rtol=1e-12, atol=1e-12)


def test_bad_act_bits() -> None:
    with pytest.raises(QuantkitError, match="act-bits"):
        fake_quantize_tokens(torch.ones(2, 2), 3)
    with pytest.raises(QuantkitError, match="per-channel symmetric"):
        QuantSpec(bits=8, group_size=128, act_bits=8).validate()
    with pytest.raises(QuantkitError, match="per-channel symmetric"):
        QuantSpec(bits=8, group_size=-1, sym=False, act_bits=8).validate()
    assert "act_bits" not in QuantSpec().to_dict()  # weight-only reports and fingerprints read as before


def test_hooks_quantize_inputs_once_and_come_off() -> None:
    torch.manual_seed(0)
    root = torch.nn.ModuleDict({"a": torch.nn.Linear(8, 3), "b": torch.nn.Linear(8, 2)}).double()
    x = torch.randn(4, 8, dtype=torch.float64) * 3
    xq = reference_fake_quant(x, 8)
    with quantized_inputs(root, ["a", "b"], 8) as quantizer:
        assert isinstance(quantizer, ActivationQuantizer)
        seen = []
        handle = root["b"].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        out_a, out_b = root["a"](x), root["b"](x)
        handle.remove()
        assert torch.allclose(out_a, xq @ root["a"].weight.T + root["a"].bias, rtol=1e-12, atol=1e-12)
        assert torch.allclose(out_b, xq @ root["b"].weight.T + root["b"].bias, rtol=1e-12, atol=1e-12)
        assert seen[0] is quantizer._last[1]  # one quantized tensor for linears reading one input
    assert torch.equal(root["a"](x), x @ root["a"].weight.T + root["a"].bias)


def test_calibration_is_quantization_exposed() -> None:
    """Layer 1's q_proj Hessian is 2/N X^T X of its input in the quantized model run with every layer linear's
    input act-quantized (hooks written here, not quantkit's): layer 0's outputs and q_proj's input are exposed."""

    from quantkit.engine import calibrate_model

    model = tiny_model("llama", seed=0, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64).eval()
    samples = [{"input_ids": torch.randint(0, 64, (1, 16))} for _ in range(4)]
    observed = {}
    calibrate_model(model, samples, QuantSpec(bits=8, group_size=-1, act_bits=8), method="gptq", progress=False,
                    comm=observing(lambda name, h, cross: observed.setdefault(name, h.clone())))
    name = "model.layers.1.self_attn.q_proj"

    def q_proj_inputs(exposed: bool) -> torch.Tensor:
        captured, handles = [], []
        for module_name, module in model.named_modules():
            if exposed and isinstance(module, torch.nn.Linear) and ".layers." in module_name:
                handles.append(module.register_forward_pre_hook(
                    lambda m, args: (reference_fake_quant(args[0].double(), 8).to(args[0].dtype),)))
        handles.append(model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(
            lambda m, args: captured.append(args[0].detach().reshape(-1, args[0].shape[-1]).double())))
        with torch.no_grad():
            for sample in samples:
                model(**sample, use_cache=False)
        for handle in handles:
            handle.remove()
        return torch.cat(captured)

    x = q_proj_inputs(exposed=True)
    assert torch.allclose(observed[name].double(), 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)
    plain = q_proj_inputs(exposed=False)  # the check tells exposure apart from its absence
    assert not torch.allclose(observed[name].double(), 2 * plain.T @ plain / plain.shape[0], rtol=1e-4, atol=1e-6)


def test_bad_combinations_are_one_line_errors(tmp_path) -> None:
    import quantkit

    texts = ["w1 w2 w3"] * 4
    with pytest.raises(QuantkitError, match="per-channel symmetric"):
        quantkit.quantize("unused", data=texts, bits=8, act_bits=8)  # group size 128
    with pytest.raises(QuantkitError, match="cannot hold --act-bits"):
        quantkit.quantize("unused", data=texts, bits=8, group_size=-1, act_bits=8, format="gptq_v2")
    with pytest.raises(QuantkitError, match=r"smooth \(--smooth\) must be one of"):
        quantkit.quantize("unused", data=texts, bits=8, group_size=-1, smooth="sq")


@pytest.mark.parametrize("method, smooth", [("rtn", "uniform"), ("gptq", "uniform"), ("tlq", "tlq")])
def test_w8a8_calibration_runs_smoothed(tmp_path, method: str, smooth: str) -> None:
    """Every layer's folds get a grid alpha, and the smoothed, act-quantized model stays close to FP."""
    from helpers import make_tokenizer, write_text

    import quantkit
    from quantkit.models import load_model
    from quantkit.quant.activations import quantized_inputs

    model_dir = tmp_path / "m"  # as many key/value heads as heads: the v -> o fold is legal
    tiny_model("llama", seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, vocab_size=64, max_position_embeddings=64).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    text = write_text(tmp_path / "t.txt")
    model, report = quantkit.quantize(str(model_dir), data=str(text), method=method, bits=8, group_size=-1, act_bits=8,
                                      smooth=smooth, nsamples=4, seqlen=16, progress=False)
    assert report["spec"]["act_bits"] == 8 and report["presolve"] == {"name": "smoothing", "weights": smooth,
                                                                      "max_tokens": 4096}
    for layer in report["layers"]:
        assert set(layer["smoothing"]["folds"]) == {"input_layernorm", "self_attn.v_proj", "post_attention_layernorm",
                                                    "mlp.up_proj"}
        assert all(fold["alpha"] in [round(0.1 * i, 1) for i in range(11)] for fold in layer["smoothing"]["folds"].values())
    ids = torch.randint(2, 62, (1, 16))
    fp = load_model(str(model_dir))
    with torch.no_grad(), quantized_inputs(model, [n for n, m in model.named_modules()
                                                   if isinstance(m, torch.nn.Linear) and ".layers." in n], 8):
        quantized = model(input_ids=ids).logits
    reference = fp(input_ids=ids).logits.detach()
    assert float((quantized - reference).norm() / reference.norm()) < 0.05


def test_cli_act_bits_and_smooth(tmp_path) -> None:
    from click.testing import CliRunner
    from helpers import save_tiny_llama, write_text

    from quantkit.cli import main

    model_dir, text = save_tiny_llama(tmp_path / "m"), write_text(tmp_path / "t.txt")
    runner = CliRunner()
    bad = runner.invoke(main, ["calibrate", str(model_dir), "--bits", "8", "--act-bits", "8", "--calib", str(text),
                               "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "per-channel symmetric" in bad.output
    done = runner.invoke(main, ["calibrate", str(model_dir), "--method", "gptq", "--bits", "4", "--group-size", "-1",
                                "--act-bits", "8", "--calib", str(text), "--nsamples", "4",
                                "--seqlen", "16", "-o", str(tmp_path / "out"), "--json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.output.strip().splitlines()[-1])
    # no --smooth: GPTQ with --act-bits smooths with uniform token weights (the default rule)
    assert report["spec"]["act_bits"] == 8 and report["presolve"]["weights"] == "uniform"
    manifest = json.loads((tmp_path / "out" / "quantkit.json").read_text())
    assert manifest["spec"]["act_bits"] == 8
    plain = runner.invoke(main, ["calibrate", str(model_dir), "--method", "gptq", "--bits", "4", "--group-size", "-1",
                                 "--act-bits", "8", "--smooth", "none", "--calib", str(text), "--nsamples", "4",
                                 "--seqlen", "16", "-o", str(tmp_path / "plain"), "--json"])
    assert plain.exit_code == 0, plain.output
    report = json.loads(plain.output.strip().splitlines()[-1])
    assert report["presolve"] == {"name": "none"}


def test_default_smoothing_rule() -> None:
    """auto: no smoothing without act-bits; with them TLQ-weighted for a token-weighing method, else uniform."""
    from quantkit.quant.methods import method_for
    from quantkit.quant.smooth import resolve_smooth

    expected = {(None, "rtn"): "none", (None, "gptq"): "none", (None, "tlq"): "none", (8, "rtn"): "uniform",
                (8, "gptq"): "uniform", (8, "tlq"): "tlq", (4, "gptq"): "uniform", (4, "tlq"): "tlq"}
    for (act_bits, method), mode in expected.items():
        assert resolve_smooth("auto", act_bits, method_for(method).token_weights) == mode
        assert resolve_smooth("none", act_bits, method_for(method).token_weights) == "none"
    with pytest.raises(QuantkitError, match="--smooth must be one of"):
        resolve_smooth("sq", 8, False)


def test_quantized_head_is_solved_on_quantized_inputs() -> None:
    """With --quantize-lm-head the head's Hessian comes from its act-quantized inputs (the final norm of the
    quantized stream, run here with hand-written hooks): GPTQ on that Hessian gives the head's codes."""

    from quantkit.engine import calibrate_model
    from quantkit.quant import gptq_solve

    model = tiny_model("llama", seed=0, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False).eval()
    head_weight = model.lm_head.weight.detach().clone()
    samples = [{"input_ids": torch.randint(0, 64, (1, 16))} for _ in range(4)]
    spec = QuantSpec(bits=4, group_size=-1, act_bits=4, act_order=False)  # 4-bit inputs: a Hessian far from FP's
    results = calibrate_model(model, samples, spec, method="gptq", lm_head=True, progress=False).results

    captured = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            module.register_forward_pre_hook(lambda m, args: (reference_fake_quant(args[0].double(), 4).float(),))
    model.lm_head.register_forward_pre_hook(lambda m, args: captured.append(args[0].double().reshape(-1, 32)))
    with torch.no_grad():
        for sample in samples:
            model(**sample, use_cache=False)
    plain = torch.cat(captured)
    x = reference_fake_quant(plain, 4)
    reference = gptq_solve(head_weight.float(), (2 * x.T @ x / x.shape[0]).float(), spec)
    unexposed = gptq_solve(head_weight.float(), (2 * plain.T @ plain / plain.shape[0]).float(), spec)
    agree = (reference.qweight == results["lm_head"].qweight).float().mean()
    assert agree > 0.99 and (unexposed.qweight == results["lm_head"].qweight).float().mean() < agree
