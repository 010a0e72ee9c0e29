"""VLM families: adapters, one-layer replay with images, image-text calibration samples, RTN on the LM only."""

from __future__ import annotations

import copy

import pytest
import torch

PIL = pytest.importorskip("PIL")
from helpers import (  # noqa: E402
    VLM_FAMILIES,
    build_vlm,
    run_calibration,
    save_vlm,
    tiny_model,
    tiny_vlm,
    write_image_dataset,
)

from quantkit.data.images import image_text_samples, load_processor  # noqa: E402
from quantkit.engine.capture import capture_layer_inputs, model_inputs, run_layer  # noqa: E402
from quantkit.errors import QuantkitError  # noqa: E402
from quantkit.models import adapter_for, get_module, load_model  # noqa: E402

VISION = {
    "qwen2_vl": ("model.visual",),
    "qwen2_5_vl": ("model.visual",),
    "llava": ("model.vision_tower", "model.multi_modal_projector"),
    "llava_onevision": ("model.vision_tower", "model.multi_modal_projector", "model.image_newline"),
    "qwen3_vl": ("model.visual",),
    "gemma3": ("model.vision_tower", "model.multi_modal_projector"),
    "idefics3": ("model.vision_model", "model.connector"),
    "internvl": ("model.vision_tower", "model.multi_modal_projector"),
    "llava_next": ("model.vision_tower", "model.multi_modal_projector", "model.image_newline"),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return write_image_dataset(tmp_path_factory.mktemp("vlm_data"))


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_adapter_paths(family: str) -> None:
    model, _ = build_vlm(family)
    adapter = adapter_for(model)
    assert adapter.name == family
    layers = adapter.decoder_layers(model)
    assert layers is model.get_decoder().layers and len(layers) == 3
    assert get_module(model, adapter.embeddings) is model.get_input_embeddings()
    assert get_module(model, adapter.lm_head) is model.get_output_embeddings()
    assert get_module(model, adapter.final_norm) is model.get_decoder().norm
    assert adapter.vision == VISION[family]
    for path in adapter.vision:
        get_module(model, path)
    # Every linear of the language model's layers is quantized; none outside them.
    lm_linears = {n for n, m in layers[0].named_modules() if isinstance(m, torch.nn.Linear)}
    assert all(set(adapter.linear_names(i)) == lm_linears for i in range(3))


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_samples_masks(family: str, dataset: str) -> None:
    model, processor = build_vlm(family)
    samples = image_text_samples(dataset, processor, nsamples=6, seed=0)
    tok = processor.tokenizer
    config = model.config  # the token the model replaces by image features
    image_id = getattr(config, "image_token_id", None) or config.image_token_index
    for i, sample in enumerate(samples):
        ids = sample["input_ids"][0]
        assert sample["loss_mask"].shape == sample["vision_mask"].shape == sample["input_ids"].shape
        assert sample["loss_mask"].dtype == sample["vision_mask"].dtype == torch.bool
        assert torch.equal(sample["vision_mask"][0], ids == image_id) and sample["vision_mask"].sum() > 1
        answer = tok.decode(ids[sample["loss_mask"][0]]).split()
        # The answer (or caption) then the end-of-turn token; nothing of the prompt.
        expected = ["red", "green", "blue", "yellow"][i % 4] if i % 2 == 0 else None
        if expected:
            assert answer == [expected, "<|im_end|>"]  # the word-level tokenizer drops "\n"
        else:
            assert answer[:2] == ["a", ["red", "green", "blue", "yellow"][i % 4]] and "<|im_end|>" in answer
        if family in ("qwen2_vl", "qwen2_5_vl"):
            # The processor's own mm_token_type_ids and grid are passed through untouched.
            assert torch.equal(sample["mm_token_type_ids"][0].bool(), sample["vision_mask"][0])
            assert sample["image_grid_thw"].tolist() == [[1, 4, 4]]


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_replay_layers_matches_full_forward(family: str, dataset: str) -> None:
    model, processor = build_vlm(family)
    samples = image_text_samples(dataset, processor, nsamples=2, seed=1)  # a caption and a question
    with torch.no_grad():
        reference = [model(**model_inputs(s), use_cache=False).logits for s in samples]
        adapter = adapter_for(model)
        inputs = capture_layer_inputs(model, adapter, samples)
        if family in ("qwen2_vl", "qwen2_5_vl"):
            assert len(inputs.kwargs) == len(samples)  # mrope positions differ per sample
        for index, layer in enumerate(adapter.decoder_layers(model)):
            inputs.enter_layer(index)  # this layer's arguments, and what the model adds before it (Qwen3-VL's deepstack)
            inputs.hidden = [run_layer(layer, inputs, i) for i in range(len(inputs))]
        if family == "qwen3_vl":
            assert list(inputs.between) == [1]  # the tower's first-block features join after layer 0
        for i, ref in enumerate(reference):
            logits = adapter.logits(model, adapter.norm(model)(inputs.hidden[i]))
            torch.testing.assert_close(logits, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_rtn_quantizes_only_language_linears(family: str, dataset: str) -> None:
    from quantkit.engine import calibrate_model
    from quantkit.quant.spec import QuantSpec

    model, processor = build_vlm(family)
    samples = image_text_samples(dataset, processor, nsamples=2, seed=0)
    adapter = adapter_for(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibration = calibrate_model(model, samples, QuantSpec(bits=3, group_size=-1), method="rtn", progress=False)
    after = model.state_dict()
    quantized = {f"{name}.weight" for name in calibration.results}
    expected = {f"{adapter.layer_prefix(i)}.{n}.weight" for i in range(3) for n in adapter.linear_names(i)}
    assert quantized == expected
    for key, value in before.items():
        if key in quantized:
            assert not torch.equal(value, after[key]), key
        else:
            assert torch.equal(value, after[key]), key  # vision tower, projector, embeddings, lm_head, norms
    assert any(k.startswith(adapter.vision[0]) for k in before)


def test_sample_selection_is_seeded(dataset: str) -> None:
    _, processor = build_vlm("llava")
    a = image_text_samples(dataset, processor, nsamples=3, seed=5)
    b = image_text_samples(dataset, processor, nsamples=3, seed=5)
    c = image_text_samples(dataset, processor, nsamples=6, seed=5)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(a, b))
    assert len(c) == 6
    with pytest.raises(QuantkitError, match="holds 6 records, fewer than nsamples=7"):
        image_text_samples(dataset, processor, nsamples=7, seed=0)


def test_max_length_truncates_after_image(dataset: str) -> None:
    _, processor = build_vlm("qwen2_vl")
    full = image_text_samples(dataset, processor, nsamples=6, seed=0)
    length = max(int(f["loss_mask"][0].nonzero().min()) for f in full) + 1  # keeps one answer token each
    cut = image_text_samples(dataset, processor, nsamples=6, seed=0, max_length=length)
    for f, c in zip(full, cut):
        n = min(length, f["input_ids"].shape[1])
        for key in ("input_ids", "attention_mask", "mm_token_type_ids", "loss_mask", "vision_mask"):
            assert torch.equal(c[key], f[key][:, :n])
        assert torch.equal(c["pixel_values"], f["pixel_values"])
    with pytest.raises(QuantkitError, match="would cut image tokens"):
        image_text_samples(dataset, processor, nsamples=6, seed=0, max_length=5)


def test_missing_and_unreadable_images(tmp_path) -> None:
    _, processor = build_vlm("llava")
    path = write_image_dataset(tmp_path, n=3)
    (tmp_path / "img" / "1.png").unlink()
    with pytest.raises(QuantkitError, match=r"data\.jsonl:2: image .*img/1\.png not found"):
        image_text_samples(path, processor, nsamples=3, seed=0)
    (tmp_path / "img" / "1.png").write_bytes(b"not an image")
    with pytest.raises(QuantkitError, match=r"data\.jsonl:2: cannot read image .*img/1\.png"):
        image_text_samples(path, processor, nsamples=3, seed=0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "img/0.png", "text": "red"}\n{"text": "no image"}\n')
    with pytest.raises(QuantkitError, match=r"bad\.jsonl:2: no 'image' path"):
        image_text_samples(bad, processor, nsamples=1, seed=0)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_load_model_and_processor_from_dir(family: str, tmp_path, dataset: str) -> None:
    model, processor = save_vlm(family, tmp_path)
    loaded = load_model(str(tmp_path), dtype="float32")
    assert type(loaded) is type(model) and not loaded.training and loaded.config.use_cache is False
    reloaded = load_processor(str(tmp_path))
    a = image_text_samples(dataset, processor, nsamples=2, seed=0)
    b = image_text_samples(dataset, reloaded, nsamples=2, seed=0)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        with torch.no_grad():
            torch.testing.assert_close(loaded(**model_inputs(x)).logits, model(**model_inputs(x)).logits, rtol=0, atol=0)


def test_llava_with_any_text_backbone_gets_that_backbones_layout() -> None:
    """The layout comes from the model, not from a list of backbones: a GPT-NeoX language model's linears."""
    model = tiny_vlm("llava", text_config=dict(model_type="gpt_neox", hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=64, vocab_size=64),
                     vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14))
    adapter = adapter_for(model)
    assert adapter.decoder_layers(model) is model.model.language_model.layers
    assert adapter.linear_groups(0) == (("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",),
                                        ("mlp.dense_4h_to_h",))
    assert adapter.vision == ("model.vision_tower", "model.multi_modal_projector")


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_fp_target_on_image_text_samples(family: str, dataset: str) -> None:
    """Layer 0's first group reads the same embeddings on both streams (C = H~, so the FP target is W
    itself and the codes are plain TLQ's); every later linear is fitted toward the FP stream."""
    from quantkit.engine import calibrate_model
    from quantkit.importance import tlq_token_weights
    from quantkit.quant.spec import QuantSpec

    model, processor = build_vlm(family)
    samples = image_text_samples(dataset, processor, nsamples=2, seed=0)
    weights = tlq_token_weights(model, samples, progress=False)
    spec = QuantSpec(bits=2, group_size=-1)
    runs = {}
    for fp_target in (False, True):
        copy_ = copy.deepcopy(model)
        runs[fp_target] = calibrate_model(copy_, samples, spec, method="tlq", token_weights=weights, progress=False,
                                          fp_target=fp_target).results
    adapter = adapter_for(model)
    first = {f"{adapter.layer_prefix(0)}.{n}" for n in adapter.linear_groups(0)[0]}
    for name, plain in runs[False].items():
        same = torch.equal(plain.qweight, runs[True][name].qweight)
        assert same == (name in first), name


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_lm_head_on_image_text_samples(family: str, dataset: str) -> None:
    """With lm_head asked for, the head is solved on its inputs in full forwards of the model whose
    decoder layers carry the run's codes (dense reference Hessian, last layer's token weights);
    the vision tower and projector stay untouched."""
    from quantkit.engine import calibrate_model
    from quantkit.importance import tlq_token_weights
    from quantkit.quant import gptq_solve
    from quantkit.quant.spec import QuantSpec

    model, processor = build_vlm(family)
    samples = image_text_samples(dataset, processor, nsamples=2, seed=0)
    weights = tlq_token_weights(model, samples, progress=False)
    spec = QuantSpec(bits=2, group_size=-1)
    quantized, ref = copy.deepcopy(model), copy.deepcopy(model)
    cal = calibrate_model(quantized, samples, spec, method="tlq", token_weights=weights, progress=False,
                          fp_target=False, lm_head=True)
    adapter = adapter_for(model)
    for name, result in cal.results.items():
        if name != adapter.lm_head:
            get_module(ref, name).weight.data.copy_(result.dequantize())
    seen = []
    handle = get_module(ref, adapter.lm_head).register_forward_hook(
        lambda mod, args, out: seen.append(args[0].reshape(-1, args[0].shape[-1]).double()))
    with torch.no_grad():
        for sample in samples:
            ref(**model_inputs(sample), use_cache=False)
    handle.remove()
    x = torch.cat(seen)
    w = torch.cat([t.reshape(-1).double() for t in weights(len(adapter.decoder_layers(model)) - 1)])
    hessian = (2.0 / w.sum() * (x * w[:, None]).T @ x).float()
    expected = gptq_solve(get_module(model, adapter.lm_head).weight.data.float(), hessian, spec)
    assert (cal.results[adapter.lm_head].qweight != expected.qweight).float().mean() <= 0.002
    before, after = model.state_dict(), quantized.state_dict()
    for key in before:
        if any(key.startswith(v) for v in adapter.vision):
            assert torch.equal(before[key], after[key]), key


VISION_GROUPS = {  # hand-listed from the architectures: call order, q/k/v and gate/up share an input
    "qwen2_vl": [["blocks.0.attn.qkv"], ["blocks.0.attn.proj"], ["blocks.0.mlp.fc1"], ["blocks.0.mlp.fc2"],
                 ["merger.mlp.0"], ["merger.mlp.2"]],
    "qwen2_5_vl": [[f"blocks.{i}.{n}" for n in names] for i in range(2) for names in
                   (["attn.qkv"], ["attn.proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"])]
                  + [["merger.mlp.0"], ["merger.mlp.2"]],
    "llava": [[f"encoder.layers.{i}.{n}" for n in names] for i in range(2) for names in
              (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"], ["mlp.fc1"],
               ["mlp.fc2"])] + [["linear_1"], ["linear_2"]],
}
# SigLIP's pooling head runs (its MLP is called as modules, its attention is not) though LLaVA-OneVision
# reads the encoder's hidden states: its MLP is quantized on its real inputs, its attention stays FP.
VISION_GROUPS["llava_onevision"] = VISION_GROUPS["llava"][:8] + [["head.mlp.fc1"], ["head.mlp.fc2"]] + VISION_GROUPS["llava"][8:]
# Qwen3-VL: block 0's output also feeds a deepstack merger (its features are added after text layer 0), called
# right after that block
_QWEN3_BLOCK = (["attn.qkv"], ["attn.proj"], ["mlp.linear_fc1"], ["mlp.linear_fc2"])
VISION_GROUPS["qwen3_vl"] = ([[f"blocks.0.{n}" for n in names] for names in _QWEN3_BLOCK]
                             + [["deepstack_merger_list.0.linear_fc1"], ["deepstack_merger_list.0.linear_fc2"]]
                             + [[f"blocks.1.{n}" for n in names] for names in _QWEN3_BLOCK]
                             + [["merger.linear_fc1"], ["merger.linear_fc2"]])
VISION_PREFIX = {"qwen2_vl": "model.visual.", "qwen2_5_vl": "model.visual.", "llava": "model.vision_tower.",
                 "llava_onevision": "model.vision_tower.", "qwen3_vl": "model.visual."}


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava", "llava_onevision", "qwen3_vl"])
def test_quantize_vision_against_full_forward_reference(family: str, dataset: str) -> None:
    """--quantize-vision: groups found in call order; each group solved on its inputs in full forwards of
    the model whose earlier groups carry the run's codes; the language model then calibrated exactly as
    on a model whose vision side was quantized beforehand (quantization-exposed)."""
    from quantkit.engine import calibrate_model
    from quantkit.engine.vision import vision_groups
    from quantkit.quant import gptq_solve
    from quantkit.quant.spec import QuantSpec

    model, processor = build_vlm(family)
    samples = image_text_samples(dataset, processor, nsamples=2, seed=0)
    adapter = adapter_for(model)
    # column order: with act-order a rare float32-vs-float64 flip spreads further than the bound below
    spec = QuantSpec(bits=2, group_size=-1, act_order=False)
    expected_groups = [[(VISION_PREFIX[family] if not n.startswith("linear") else "model.multi_modal_projector.") + n
                        for n in names] for names in VISION_GROUPS[family]]
    assert vision_groups(model, adapter, samples[0]) == expected_groups
    quantized, ref = copy.deepcopy(model), copy.deepcopy(model)
    cal = calibrate_model(quantized, samples, spec, method="gptq", progress=False, vision=True)
    assert cal.report["vision"]["groups"] == len(expected_groups)
    for names in expected_groups:
        seen: list[torch.Tensor] = []
        handle = get_module(ref, names[0]).register_forward_pre_hook(
            lambda mod, args, seen=seen: seen.append(args[0].reshape(-1, args[0].shape[-1]).double()))
        with torch.no_grad():
            for sample in samples:
                ref(**model_inputs(sample), use_cache=False)
        handle.remove()
        x = torch.cat(seen)
        hessian = (2.0 / x.shape[0] * x.T @ x).float()
        weight = torch.cat([get_module(ref, n).weight.data.float() for n in names])
        expected = gptq_solve(weight, hessian, spec)
        got = torch.cat([cal.results[n].qweight for n in names])
        assert (got != expected.qweight).float().mean() <= 0.002, names
        for n in names:
            get_module(ref, n).weight.data.copy_(cal.results[n].dequantize())
    language = calibrate_model(ref, samples, spec, method="gptq", progress=False).results
    assert set(cal.results) == set(language) | {n for names in expected_groups for n in names}
    for name, result in language.items():
        assert torch.equal(cal.results[name].qweight, result.qweight), name


def test_quantize_vision_refused_for_text_models() -> None:
    from quantkit.engine import calibrate_model
    from quantkit.quant.spec import QuantSpec

    model = tiny_model("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2)
    with pytest.raises(QuantkitError, match="no vision side to quantize"):
        calibrate_model(model, [{"input_ids": torch.arange(8)[None]}], QuantSpec(bits=4, group_size=-1),
                        progress=False, vision=True)


def test_quantize_vision_two_ranks_agree_with_one(tmp_path, dataset: str) -> None:
    """Each rank runs its shard of the images; the vision Hessians are all-reduced."""
    from safetensors.torch import load_file

    from quantkit.quant.spec import QuantSpec

    model_dir = tmp_path / "vlm"
    model, processor = save_vlm("llava", model_dir)
    tensors = {}
    for nproc in (1, 2):
        out = tmp_path / f"out{nproc}"
        run_calibration(str(model_dir), str(out), QuantSpec(bits=4, group_size=16), method="gptq", calib=dataset,
                        nsamples=4, format="fake", progress=False, nproc=nproc, vision=True)
        tensors[nproc] = {k: v for path in sorted(out.glob("*.safetensors")) for k, v in load_file(path).items()}
    assert tensors[1].keys() == tensors[2].keys()
    vision = [k for k in tensors[1] if "vision_tower.encoder" in k and k.endswith("proj.weight")]
    assert vision and all(not torch.equal(tensors[1][k], model.state_dict()[k]) for k in vision)
    for key, value in tensors[1].items():
        assert (tensors[2][key] - value).abs().max() <= 1e-5 * value.abs().max().clamp_min(1e-12), key


def test_quantize_vision_fp_target_starts_from_the_fp_tower(dataset: str) -> None:
    """Layer 0's q/k/v: X from the FP model, X~ from the model with the run's quantized vision side;
    GPTQ toward W C H~^-1 (with the FP tower's outputs as the FP stream, C != H~ already here)."""
    from quantkit.engine import calibrate_model
    from quantkit.quant import gptq_solve
    from quantkit.quant.gptaq import fp_target_weight
    from quantkit.quant.spec import QuantSpec

    model, processor = build_vlm("llava")
    samples = image_text_samples(dataset, processor, nsamples=2, seed=0)
    spec = QuantSpec(bits=2, group_size=-1)
    quantized, ref = copy.deepcopy(model), copy.deepcopy(model)
    cal = calibrate_model(quantized, samples, spec, method="gptq", progress=False, vision=True, fp_target=True)
    adapter = adapter_for(model)
    for name, result in cal.results.items():
        if not name.startswith(adapter.layers):
            get_module(ref, name).weight.data.copy_(result.dequantize())
    names = [f"{adapter.layer_prefix(0)}.{n}" for n in adapter.linear_groups(0)[0]]

    def inputs_of(net) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        handle = get_module(net, names[0]).register_forward_pre_hook(
            lambda mod, args: seen.append(args[0].reshape(-1, args[0].shape[-1]).double()))
        with torch.no_grad():
            for sample in samples:
                net(**model_inputs(sample), use_cache=False)
        handle.remove()
        return torch.cat(seen)

    x, x_tilde = inputs_of(model), inputs_of(ref)
    assert not torch.allclose(x, x_tilde)
    hessian = (2.0 / x.shape[0] * x_tilde.T @ x_tilde).float()
    cross = (2.0 / x.shape[0] * x.T @ x_tilde).float()
    weight = torch.cat([get_module(model, n).weight.data.float() for n in names])
    expected = gptq_solve(fp_target_weight(weight, hessian, cross, spec.damp), hessian, spec)
    got = torch.cat([cal.results[n].qweight for n in names])
    assert (got != expected.qweight).float().mean() <= 0.002


@pytest.mark.parametrize("family, extra", [
    ("qwen2_vl", {}), ("qwen2_5_vl", {}), ("llava", {}), ("llava_onevision", {}),
    ("llava", {"vision": True, "lm_head": True, "fp_target": True}),
    ("qwen2_vl", {"vision": True, "method": "rtn"}),
    ("qwen2_vl", {"method": "tlq"}),  # image-text token weights, the gradient pass streamed (per-sample mrope kwargs)
])
def test_low_memory_vlm_export_equals_in_memory_export(family: str, extra: dict, dataset: str, tmp_path) -> None:
    """--low-memory on a VLM: image-text samples, the vision side in the skeleton, and the checkpoint's
    legacy tensor names (language_model.model.layers..., visual.blocks...) renamed as transformers does;
    with the vision side and the head quantized too."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from quantkit.quant.spec import QuantSpec

    model_dir = tmp_path / "vlm"
    model, processor = save_vlm(family, model_dir)
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert f"{adapter_for(model).layer_prefix(0)}.mlp.down_proj.weight" not in stored  # a legacy layout on disk
    tensors = {}
    for low in (False, True):
        out = tmp_path / f"out{low}"
        kw = {"method": "gptq", **extra}
        report = run_calibration(str(model_dir), str(out), QuantSpec(bits=4, group_size=16), calib=dataset,
                                 nsamples=3, progress=False, low_memory=low, **kw)
        assert (report["vision"] is not None) is bool(extra.get("vision"))
        tensors[low] = {k: v for path in sorted(out.glob("*.safetensors")) for k, v in load_file(path).items()}
    assert tensors[True].keys() == tensors[False].keys()
    packed = {k for k in tensors[True] if k.endswith("weight_packed")}
    assert any("vision_tower" in k or "visual" in k for k in packed) is bool(extra.get("vision"))
    assert ("lm_head.weight_packed" in packed) is bool(extra.get("lm_head"))
    for key, value in tensors[False].items():
        assert torch.equal(tensors[True][key], value), key


def test_low_memory_vlm_resume_with_vision_and_head(dataset: str, tmp_path, monkeypatch) -> None:
    """Interrupted at layer 2 and resumed: the vision side is quantized again (the same codes) before
    the saved streams take over, and the export matches an uninterrupted run byte for byte."""
    from helpers import FailAt

    from quantkit.engine.comm import Hooks
    from quantkit.quant.spec import QuantSpec

    model_dir = tmp_path / "vlm"
    model, processor = save_vlm("llava", model_dir)
    kw = dict(method="gptq", calib=dataset, nsamples=3, progress=False, low_memory=True, vision=True, lm_head=True,
              fp_target=True)
    spec = QuantSpec(bits=4, group_size=16)
    run_calibration(str(model_dir), str(tmp_path / "full"), spec, **kw)
    with pytest.raises(RuntimeError, match="injected"):
        run_calibration(str(model_dir), str(tmp_path / "out"), spec, hooks=Hooks(on_layer=FailAt(0, 2)), **kw)
    report = run_calibration(str(model_dir), str(tmp_path / "out"), spec, resume=True, **kw)
    assert report["resumed_from_layer"] == 2
    files = sorted(p.name for p in (tmp_path / "full").glob("*.safetensors"))
    assert files and files == sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    for name in files:
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name


def test_api_in_memory_image_records_read_with_the_saved_processor(dataset: str, tmp_path) -> None:
    """quantize(model_dir, data=[image-text records]) draws the samples with the processor saved beside the model,
    as when that processor is given (it loaded only the tokenizer and refused the records)."""
    import json
    from pathlib import Path

    import quantkit

    model_dir = tmp_path / "vlm"
    model, processor = save_vlm("qwen2_vl", model_dir)
    root = Path(dataset).parent
    records = [json.loads(line) for line in Path(dataset).read_text().splitlines()]
    records = [{**r, "image": str(root / r["image"])} for r in records]
    settings = dict(method="gptq", group_size=16, nsamples=3, seqlen=256, progress=False)
    saved = quantkit.quantize(str(model_dir), data=records, **settings)
    given = quantkit.quantize(str(model_dir), data=records, tokenizer_or_processor=processor, **settings)
    assert saved.results.keys() == given.results.keys() and saved.results
    for name, result in given.results.items():
        assert torch.equal(saved.results[name].qweight, result.qweight), name
        assert torch.equal(saved.results[name].scales, result.scales), name
