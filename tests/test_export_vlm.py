"""Issue #5: a Qwen2-VL export whose vision tower stays in full precision and is listed as such.

A tiny random Qwen2-VL (built by tests/helpers.py) has its language model
quantized with RTN on image-text samples, then is exported as GPTQ v1/v2 and
compressed-tensors. References independent of the exporter: the FP model's own
save_pretrained file and a copy of its state dict taken before calibration (vision tensors
read back with safetensors directly), the in-memory fake-quantized model's logits, and
transformers' compressed-tensors loader.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import save_vlm, write_image_dataset
from safetensors import safe_open

import quantkit
from quantkit.data.images import image_text_samples
from quantkit.engine import calibrate_model
from quantkit.engine.capture import model_inputs
from quantkit.export import save_quantized
from quantkit.quant.spec import QuantSpec

pytest.importorskip("PIL")  # the image processors and the image writer need it

FORMATS = ["gptq", "gptq_v2", "compressed-tensors"]
VISUAL = "model.visual."
LM_LAYERS = "model.language_model.layers"
QUANT_SUFFIXES = ("qweight", "qzeros", "weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


def read_all(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__


def vision_part(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vision tower's tensors keyed relative to it, whichever key layout the file uses
    (transformers' save_pretrained writes the legacy `visual.*`, quantkit the module names `model.visual.*`)."""
    out = {}
    for k, v in tensors.items():
        rel = k[len("model."):] if k.startswith("model.") else k
        if rel.startswith("visual."):
            out[rel[len("visual."):]] = v
    return out


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("vlm_export")
    fp_dir = root / "fp"
    model, processor = save_vlm("qwen2_vl", fp_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    vision_linears = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(VISUAL))
    assert len(vision_linears) >= 6  # qkv, proj, fc1, fc2 and the merger's two

    samples = image_text_samples(write_image_dataset(root / "data", n=2), processor, nsamples=2, seed=0)
    calibration = calibrate_model(model, samples, QuantSpec(bits=4, group_size=32, sym=True), method="rtn", progress=False)
    results = calibration.results
    assert results and all(name.startswith(LM_LAYERS + ".") for name in results)

    x = model_inputs(samples[0])  # a question about the image: pixel_values and image_grid_thw included
    assert "pixel_values" in x and "image_grid_thw" in x
    with torch.no_grad():
        ref = model(**x).logits.float()
    outs = {fmt: save_quantized(model, results, root / fmt, fmt=fmt, source=str(fp_dir)) for fmt in FORMATS}
    return dict(model=model, fp_dir=fp_dir, before=before, results=results, x=x, ref=ref, outs=outs,
                vision_linears=vision_linears)


@pytest.mark.parametrize("fmt", FORMATS)
def test_vision_tensors_bit_identical(vlm, fmt: str) -> None:
    sd = read_all(vlm["outs"][fmt] / "model.safetensors")
    got = vision_part(sd)
    from_file = vision_part(read_all(vlm["fp_dir"] / "model.safetensors"))  # the FP model's own checkpoint
    from_memory = vision_part({k: v for k, v in vlm["before"].items() if k.startswith(VISUAL)})
    assert from_file.keys() == from_memory.keys() == got.keys() and got
    for k, v in got.items():
        assert v.dtype == from_file[k].dtype == torch.float32, k
        assert torch.equal(v, from_file[k]) and torch.equal(v, from_memory[k]), k
    assert all(k.startswith(VISUAL) for k in sd if "visual" in k)  # one layout, no duplicated tower
    # No vision linear is stored quantized; every language-model linear is.
    for name in vlm["vision_linears"]:
        assert f"{name}.weight" in sd and not any(f"{name}.{s}" in sd for s in QUANT_SUFFIXES), name
    quant_key = "qweight" if fmt.startswith("gptq") else "weight_packed"
    for name in vlm["results"]:
        assert f"{name}.{quant_key}" in sd and f"{name}.weight" not in sd, name
    assert {k.rsplit(".", 1)[0] for k in sd if k.endswith(quant_key)} == set(vlm["results"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_config_lists_vision_as_fp(vlm, fmt: str) -> None:
    out = vlm["outs"][fmt]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    vision = vlm["vision_linears"]
    manifest = json.loads((out / "quantkit.json").read_text())
    assert set(vision) <= set(manifest["fp_linears"]) and "lm_head" in manifest["fp_linears"]
    assert not any(n.startswith(VISUAL) for n in manifest["quantized_modules"])
    if fmt == "compressed-tensors":
        assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]
        assert set(vision) <= set(qc["ignore"]) and "lm_head" in qc["ignore"]
        assert not set(qc["ignore"]) & set(vlm["results"])
    else:
        # GPTQ has no ignore list: quantization is confined to the language model's decoder
        # blocks, so the vision tower (outside block_name_to_quantize) stays FP.
        assert qc == json.loads((out / "quantize_config.json").read_text())
        assert qc["checkpoint_format"] == fmt and qc["lm_head"] is False
        assert qc["block_name_to_quantize"] == LM_LAYERS
        assert not any(n.startswith(qc["block_name_to_quantize"] + ".") for n in vision)
        block = re.compile(re.escape(LM_LAYERS) + r"\.\d+\.(.+)$")
        subs = {block.match(n).group(1) for n in vlm["results"]}
        assert sorted(qc["modules_in_block_to_quantize"][0]) == sorted(subs)
        assert "dynamic" not in qc  # every block quantizes every listed linear


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_quantized_matches_fake_quant(vlm, fmt: str) -> None:
    back = quantkit.load_quantized(vlm["outs"][fmt])
    assert type(back) is type(vlm["model"])
    state = back.state_dict()
    for k, v in vlm["before"].items():
        if k.startswith(VISUAL):
            assert torch.equal(state[k], v), k
    with torch.no_grad():
        got = back(**vlm["x"]).logits.float()
    torch.testing.assert_close(got, vlm["ref"], rtol=0, atol=1e-5)


def test_transformers_loads_compressed_tensors(vlm) -> None:
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForImageTextToText

    loaded, info = AutoModelForImageTextToText.from_pretrained(vlm["outs"]["compressed-tensors"], output_loading_info=True)
    assert type(loaded) is type(vlm["model"])
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    modules = dict(loaded.named_modules())
    for name in vlm["vision_linears"]:
        assert getattr(modules[name], "quantization_scheme", None) is None, name  # left alone by compressed-tensors
        assert torch.equal(modules[name].weight, vlm["before"][f"{name}.weight"]), name
    assert all(getattr(modules[name], "quantization_scheme", None) is not None for name in vlm["results"])
    with torch.no_grad():
        got = loaded(**vlm["x"]).logits.float()
    ref = vlm["ref"]
    assert (got - ref).abs().max() <= 1e-3 * ref.abs().max()
