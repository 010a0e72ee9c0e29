"""W8A8 on a VLM: the language model is smoothed and quantized with its inputs exposed, the vision tower
stays in full precision with its inputs untouched, and the export says so."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import build_vlm, observing, write_image_dataset

import quantkit
from quantkit.data.images import image_text_samples
from quantkit.engine import calibrate_model
from quantkit.engine.capture import model_inputs
from quantkit.engine.smoothing import Smoothing
from quantkit.export import save_quantized
from quantkit.quant.methods import method_for
from quantkit.quant.spec import QuantSpec

pytest.importorskip("PIL")


def test_vlm_w8a8_keeps_the_vision_tower_fp(tmp_path) -> None:
    torch.set_num_threads(1)
    model, processor = build_vlm("qwen2_vl")
    model.config.architectures = [type(model).__name__]  # as save_pretrained records it, for load_quantized
    vision = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.visual."))
    before = {n: model.get_submodule(n).weight.detach().clone() for n in vision}
    samples = image_text_samples(write_image_dataset(tmp_path / "data", n=2), processor, nsamples=2, seed=0)
    spec = QuantSpec(bits=8, group_size=-1, act_bits=8)
    gptq = method_for("gptq").with_presolve(Smoothing(weights="uniform"))
    calibration = calibrate_model(model, samples, spec, method=gptq, progress=False)
    assert calibration.results and not any(n.startswith("model.visual.") for n in calibration.results)
    assert all("smoothing" in layer for layer in calibration.report["layers"])
    for name in vision:
        assert torch.equal(model.get_submodule(name).weight, before[name]), name
    out = save_quantized(model, calibration.results, tmp_path / "out", fmt="compressed-tensors", spec=spec,
                         report=calibration.report)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["input_activations"]["strategy"] == "token"
    assert set(vision) <= set(qc["ignore"])

    loaded = quantkit.load_quantized(out)
    seen = {}
    for name in vision[:2] + sorted(calibration.results)[:2]:
        loaded.get_submodule(name).register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, args[0]))
    with torch.no_grad():
        loaded(**model_inputs(samples[0]))
    for name in vision[:2]:  # FP tower inputs are not on an int8 grid
        x = seen[name]
        steps = x / (x.abs().amax(dim=-1, keepdim=True) / 127)
        assert not torch.allclose(steps, steps.round(), atol=1e-3), name
    for name in sorted(calibration.results)[:2]:  # the language model's are, one grid per token
        x = seen[name]
        steps = x / (x.abs().amax(dim=-1, keepdim=True) / 127)
        assert torch.allclose(steps, steps.round(), atol=1e-3), name


def test_quantized_vision_side_is_exposed_too(tmp_path) -> None:
    """With --quantize-vision the language model's first Hessian comes from a tower whose linears read
    act-quantized inputs (checked with hooks written here on the quantized model)."""
    torch.set_num_threads(1)
    model, processor = build_vlm("qwen2_vl")
    samples = image_text_samples(write_image_dataset(tmp_path / "data", n=2), processor, nsamples=2, seed=0)
    observed = {}
    calibration = calibrate_model(model, samples, QuantSpec(bits=8, group_size=-1, act_bits=8), method="gptq",
                                  vision=True, progress=False, comm=observing(lambda n, h, cross: observed.setdefault(n, h.clone())))
    assert any(n.startswith("model.visual.") for n in calibration.results)
    name = "model.language_model.layers.0.self_attn.q_proj"

    def a8(module, args):
        scale = args[0].abs().amax(dim=-1, keepdim=True) / 127
        return (torch.clamp(torch.round(args[0] / scale), -128, 127) * scale,)

    def hessian(hooked: list[str]) -> torch.Tensor:
        handles = [model.get_submodule(n).register_forward_pre_hook(a8) for n in hooked]
        captured = []
        handles.append(model.get_submodule(name).register_forward_pre_hook(
            lambda m, args: captured.append(args[0].detach().reshape(-1, args[0].shape[-1]).double())))
        with torch.no_grad():
            for sample in samples:
                model(**model_inputs(sample))
        for handle in handles:
            handle.remove()
        x = torch.cat(captured)
        return 2 * x.T @ x / x.shape[0]

    exposed = hessian(sorted(calibration.results))
    assert torch.allclose(observed[name].double(), exposed, rtol=1e-3, atol=1e-5)
    lm_only = hessian([n for n in calibration.results if not n.startswith("model.visual.")])
    assert not torch.allclose(observed[name].double(), lm_only, rtol=1e-3, atol=1e-5)
