"""W8A8 on a VLM: the language model is smoothed and quantized with its inputs exposed, the vision tower
stays in full precision with its inputs untouched, and the export says so."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import build_vlm, write_image_dataset

import quantkit
from quantkit.data.images import image_text_samples
from quantkit.engine import calibrate_model
from quantkit.engine.capture import model_inputs
from quantkit.export import save_quantized
from quantkit.quant.spec import QuantSpec

pytest.importorskip("PIL")


def test_vlm_w8a8_keeps_the_vision_tower_fp(tmp_path) -> None:
    torch.set_num_threads(1)
    model, processor = build_vlm("qwen2_vl")
    model.config.architectures = [type(model).__name__]  # as save_pretrained records it, for load_quantized
    vision = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.visual."))
    before = {n: model.get_submodule(n).weight.detach().clone() for n in vision}
    samples = image_text_samples(write_image_dataset(tmp_path / "data", n=2), processor, nsamples=2, seed=0)
    spec = QuantSpec(bits=8, group_size=-1, act_bits=8, smooth="uniform")
    calibration = calibrate_model(model, samples, spec, method="gptq", progress=False)
    assert calibration.results and not any(n.startswith("model.visual.") for n in calibration.results)
    assert all("smoothing" in layer for layer in calibration.report["layers"])
    for name in vision:
        assert torch.equal(model.get_submodule(name).weight, before[name]), name
    out = save_quantized(model, calibration.results, tmp_path / "out", fmt="compressed-tensors",
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
