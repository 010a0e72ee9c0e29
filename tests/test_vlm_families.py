"""The newer VLM families (Qwen3-VL with deepstack, Gemma 3, Idefics3, InternVL, LLaVA-NeXT) through the pipeline on
image-text samples their own processors render: TLQ's block-wise gradients equal whole-model autograd, TLQ leaves the
vision side as it was and quantizes every language-model linear, and the compressed-tensors export reloads in plain
transformers with quantkit's logits on an image sample (--quantize-vision on Qwen3-VL, whose tower also feeds the
deepstack features, is in test_vlm.py beside the older families)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("PIL")
from helpers import VLM_FAMILIES, build_vlm, whole_model_gradients, write_image_dataset  # noqa: E402

from quantkit.data.images import image_text_samples  # noqa: E402
from quantkit.engine import calibrate_model  # noqa: E402
from quantkit.engine.capture import model_inputs  # noqa: E402
from quantkit.export import save_quantized  # noqa: E402
from quantkit.importance import layer_output_gradients, tlq_token_weights  # noqa: E402
from quantkit.models import adapter_for, get_module  # noqa: E402
from quantkit.quant.spec import QuantSpec  # noqa: E402

NEWER = VLM_FAMILIES[4:]
SPEC = QuantSpec(bits=4, group_size=16)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return write_image_dataset(tmp_path_factory.mktemp("vlm_families"))


@pytest.mark.parametrize("family", NEWER)
def test_blockwise_gradients_on_image_text_equal_autograd(family: str, dataset: str) -> None:
    model, processor = build_vlm(family)
    samples = image_text_samples(dataset, processor, nsamples=2, seed=0)
    _, _, grads = layer_output_gradients(model, samples, keep_gradients=True, progress=False)
    layers = adapter_for(model).decoder_layers(model)
    for i, sample in enumerate(samples):
        for layer, reference in enumerate(whole_model_gradients(model, layers, sample)):
            assert (grads[layer][i] - reference).norm() / reference.norm() < 1e-5, (family, i, layer)


@pytest.mark.parametrize("family", NEWER)
def test_tlq_keeps_the_tower_and_reloads_in_transformers(family: str, dataset: str, tmp_path) -> None:
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForImageTextToText

    model, processor = build_vlm(family)
    samples = image_text_samples(dataset, processor, nsamples=3, seed=0)
    adapter = adapter_for(model)
    fp = copy.deepcopy(model)
    weights = tlq_token_weights(model, samples, progress=False)
    results = calibrate_model(model, samples, SPEC, method="tlq", token_weights=weights, progress=False).results
    layers = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(adapter.layers + ".")}
    assert set(results) == layers
    for name, param in fp.named_parameters():
        if any(name.startswith(v) for v in adapter.vision):
            assert torch.equal(param, get_module(model, name.rsplit(".", 1)[0]).get_parameter(name.rsplit(".", 1)[1])), name
    out = save_quantized(model, results, tmp_path / "ct", fmt="compressed-tensors", spec=SPEC)
    x = model_inputs(samples[0])
    with torch.no_grad():
        ours = model(**x).logits
        theirs = AutoModelForImageTextToText.from_pretrained(out)(**x).logits
    assert (theirs - ours).abs().max() <= 1e-3 * ours.abs().max()
