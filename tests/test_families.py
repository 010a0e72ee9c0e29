"""Families beyond Llama through the whole pipeline, each on a tiny random model of transformers' own config class:
what each brings (fused linears, biases, q/k norms, sandwich norms, alternating sliding windows, partial rotary,
tied embeddings, latent attention, parallel blocks, scaled or soft-capped logits), checked against references
computed without the engine: full-model forwards and autograd, per-weight RTN, transformers' own loading."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import (
    FailAt,
    assert_same_files,
    observing,
    random_model,
    require_type,
    run_calibration,
    save_tiny_causal_lm,
    save_tokenizer,
    tiny_causal_lm,
    tiny_config,
    tiny_vlm_config,
    whole_model_gradients,
    write_text,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

import quantkit
from quantkit.engine import calibrate_model
from quantkit.engine.comm import Hooks
from quantkit.errors import QuantkitError
from quantkit.importance import layer_output_gradients
from quantkit.models import adapter_for, get_module
from quantkit.quant import QuantSpec, rtn_solve
from quantkit.quant.recipe import Override, Recipe

# model type -> config overrides; what the family brings is in the comment
FAMILIES = {
    "qwen3": {},  # q/k norms inside attention
    "phi3": {},  # fused qkv_proj and gate_up_proj
    "gemma2": {"sliding_window": 4},  # sandwich norms, alternating sliding/full attention, soft-capped logits, tied embeddings
    "gemma3_text": {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},  # a rotary table per type
    "stablelm": {},  # partial rotary (a quarter of each head), LayerNorm with biases
    "cohere": {},  # attention and MLP in parallel on one norm, scaled logits
    "starcoder2": {"sliding_window": 4},  # biases everywhere, c_fc/c_proj MLP
    "granite": {},  # embedding, residual, attention and logit multipliers
    "gemma4_text": {},  # a per-layer input (an embedding slice per layer) handed to each layer positionally
    "deepseek_v3": {"first_k_dense_replace": 1},  # multi-head latent attention; a dense layer, then routed and shared experts
    # mixtures of experts (transformers' fused 3-D experts, one linear per expert projection in quantkit)
    "mixtral": {},  # w1/w3/w2 experts, softmax top-k router
    "qwen2_moe": {},  # a shared expert with a one-output sigmoid gate beside the routed experts
    "qwen3_moe": {},  # q/k norms, routed experts only
    "olmoe": {},  # q/k norms over the whole projection, routed experts
    "gpt_oss": {},  # experts with biases, gate and up interleaved, a router with a bias, attention sinks
    "llama4_text": {},  # top-1 router scaling the expert's input, a shared expert, chunked attention
    "granitemoe": {},  # checkpoints keep experts fused (input_linear / output_linear): exported dense, fused
    "dots1": {},  # DeepSeek-style routed and shared experts after a dense layer, standard attention
    "lfm2_moe": {},  # a short-convolution layer with a dense MLP, then attention with routed experts (expert bias)
    "dbrx": {},  # experts as three 2-D [E * I, H] parameters (w1 / v1 / w2, down stored [in, out]), clipped fused qkv
    "inkling_text": {},  # routed and gamma-weighted shared experts, fused without transformers' flags; convolutions
    "falcon": {},  # fused query_key_value, parallel MLP reading the attention's input (one group with it)
    "olmo": {},  # a final LayerNorm without weights
    "nanochat": {},  # one weightless norm before the layers and after them
    "bloom": {},  # an ALiBi bias built for the batch it runs on (stacked samples are replayed one by one)
    "xglm": {},  # an attention mask whose batch size the layer checks
    "nemotron_h": {},  # Mamba-2 mixers; squared-ReLU experts with up and down projections only
    # hybrids: the linears of recurrent / state-space mixers are quantized, their kernels stay in full precision
    "lfm2": {"layer_types": ["conv", "full_attention"]},  # gated short convolutions beside attention layers
    "falcon_h1": {},  # a Mamba-2 mixer and attention side by side in every layer
    "olmo_hybrid": {},  # gated delta-rule linear attention, then a full-attention layer
    "qwen4_exp_text": {},  # linear attention, then attention whose token indexer reads its mask per sample (not stacked)
    # hyper-connections: layers carry 4 streams [B, T, 4, d]; after the last layer a mixing head, then the final norm
    "hy_v4": {},
    # GPT-2-style Conv1D layers (weight stored [in, out]), solved as linears of the transposed weight
    "gpt2": {},  # learned positions, fused c_attn, biases
    "openai-gpt": {},  # post-norm layers
    "gpt-sw3": {},  # GPT-2's model under its own type
}
# compressed-tensors quantizes nn.Linear only: Conv1D families export fake (dense, for plain transformers) and GPTQ
CONV1D = {"gpt2", "openai-gpt", "gpt-sw3"}
# compressed-tensors is refused for these families: their transformers weight init, run on every module as the model
# loads, reads a weight the format replaces by packed tensors (Falcon's FalconLinear.weight, NanoChat's o_proj.weight)
INIT_READS_PACKED = {"falcon", "nanochat"}
# GPTQ packs zero points along the output rows, 8 per int32 at 4 bits: these families have narrower or odd-width
# linears (Falcon-H1's and Nemotron-H's Mamba in_proj, 148 rows; OLMo-hybrid's and Qwen4-Exp's a_proj/in_proj_a, one
# row per head; HY-V4's indexer weights_proj, one row per index head)
GPTQ_UNPACKABLE = {"falcon_h1", "olmo_hybrid", "nemotron_h", "qwen4_exp_text", "hy_v4"}
SPEC = QuantSpec(bits=4, group_size=16, act_order=False)  # in column order: the engine-level references solve so
RUN_SPEC = QuantSpec(bits=4, group_size=16)  # the defaults (act-order, static groups) for whole runs
LOW_MEMORY_FAMILIES = ["gemma2", "phi3", "deepseek_v3", "granitemoe", "dbrx", "inkling_text", "gpt2"]


def samples(n: int = 4, tokens: int = 16, seed: int = 1) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, 120, (1, tokens), generator=generator)} for _ in range(n)]


def layer_linears(model, adapter) -> list[str]:
    """Every solved linear's full name, layer by layer in solve order."""
    return [f"{adapter.layer_prefix(i)}.{n}" for i in range(len(adapter.decoder_layers(model))) for n in adapter.linear_names(i)]


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_rtn_quantizes_every_layer_linear_and_nothing_else(model_type: str) -> None:
    model = tiny_causal_lm(model_type, **FAMILIES[model_type])
    adapter = adapter_for(model)  # fused experts become per-expert linears here
    fp = copy.deepcopy(model)
    results = calibrate_model(model, samples(), SPEC, method="rtn", progress=False).results
    every = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(adapter.layers)}
    kept = {f"{adapter.layer_prefix(i)}.{n}": why for i in range(len(adapter.layouts)) for n, why in adapter.layout(i).full_precision}
    # no linear of these families stays in full precision but experts' routers (DBRX's router wraps its linear)
    under_kept = {n: k for n in every for k in kept if n == k or n.startswith(k + ".")}
    assert set(results) == every - set(under_kept)
    assert all("mixture-of-experts" in kept[k] for k in under_kept.values()), kept
    for name, result in results.items():
        expected = rtn_solve(get_module(fp, name).weight.data.float(), None, SPEC)
        assert torch.equal(result.qweight, expected.qweight), name


@pytest.mark.parametrize("model_type", ["lfm2", "falcon_h1", "olmo_hybrid"])
def test_every_weight_left_in_full_precision_is_reported(model_type: str) -> None:
    """Every matrix of a layer is either a quantized linear's weight or named in the report with why (the mixers'
    convolution kernels here): none is skipped silently."""
    model = tiny_causal_lm(model_type, **FAMILIES[model_type])
    report = calibrate_model(model, samples(), SPEC, method="rtn", progress=False).report
    layers = adapter_for(model).decoder_layers(model)
    for index, entry in enumerate(report["layers"]):
        quantized = {f"{name}.weight" for name in entry["linears"]}
        kept = set(entry.get("full_precision", {}))
        matrices = {name for name, p in layers[index].named_parameters() if p.dim() >= 2}
        assert matrices == quantized | {k if k in matrices else f"{k}.weight" for k in kept}, index
        assert all("convolution" in why for why in entry.get("full_precision", {}).values()), entry
    assert any("full_precision" in entry for entry in report["layers"])


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_gptq_hessians_are_the_quantized_models_own(model_type: str) -> None:
    """Every Hessian the solver got equals 2/N sum x x^T over the inputs that linear sees in full forwards of the
    final quantized model: layer-by-layer replay (its per-layer masks and rotary tables) is the real forward, and
    each group was solved after the groups before it."""
    model = tiny_causal_lm(model_type, **FAMILIES[model_type])
    data = samples()
    seen: dict[str, torch.Tensor] = {}
    calibrate_model(model, data, SPEC, method="gptq", progress=False, fp_target=False,
                    comm=observing(lambda name, h, cross: seen.__setitem__(name, h.clone())))
    adapter = adapter_for(model)
    assert list(seen) == layer_linears(model, adapter)
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in seen}
    handles = [get_module(model, name).register_forward_pre_hook(
        lambda mod, args, name=name: rows[name].append(args[0].reshape(-1, args[0].shape[-1]).double())) for name in seen]
    with torch.no_grad():
        for sample in data:
            model(**sample, use_cache=False)
    for handle in handles:
        handle.remove()
    for name, hessian in seen.items():
        x = torch.cat(rows[name])
        reference = (2.0 / x.shape[0] * x.T @ x).float()
        assert (hessian - reference).abs().max() <= 1e-5 * reference.abs().max(), name


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_blockwise_gradients_equal_whole_model_autograd(model_type: str) -> None:
    model = tiny_causal_lm(model_type, **FAMILIES[model_type])
    data = samples(n=2, tokens=12)
    data[1]["loss_mask"] = torch.tensor([[0] * 6 + [1] * 6]).bool()
    _, _, grads = layer_output_gradients(model, data, keep_gradients=True, progress=False)
    layers = adapter_for(model).decoder_layers(model)
    for i, sample in enumerate(data):
        for layer, reference in enumerate(whole_model_gradients(model, layers, sample)):
            assert reference.abs().sum() > 0
            assert (grads[layer][i] - reference).norm() / reference.norm() < 1e-5, (i, layer)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    dirs = {t: save_tiny_causal_lm(root, t, **overrides) for t, overrides in FAMILIES.items() if t in CONFIG_MAPPING_NAMES}
    dirs["text"] = write_text(root / "calib.txt")
    return dirs


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_tlq_export_reloads_in_transformers_with_quantkits_logits(family_dirs, tmp_path: Path, model_type: str) -> None:
    """TLQ (importance pass and engine) -> compressed-tensors, read back by transformers; converted to GPTQ, read
    back by quantkit: the same logits as quantkit's own reading of the export."""
    require_type(model_type)
    pytest.importorskip("compressed_tensors")
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from quantkit.cli import main

    kw = dict(method="tlq", calib=str(family_dirs["text"]), nsamples=4, seqlen=16, progress=False)
    # fake: dense weights any loader reads, for the families compressed-tensors is refused for
    fmt = "fake" if model_type in CONV1D | INIT_READS_PACKED else "compressed-tensors"
    report = run_calibration(str(family_dirs[model_type]), str(tmp_path / "ct"), RUN_SPEC, format=fmt, **kw)
    if model_type == "hy_v4":  # its hyper-connection head, between the last layer and the final norm, is named
        assert list(report["full_precision"]) == ["model.hc_head"]
    ids = torch.randint(1, 120, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = quantkit.load_quantized(tmp_path / "ct")(input_ids=ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")(input_ids=ids).logits
        assert (theirs - ours).abs().max() <= 1e-3 * ours.abs().max()
    result = CliRunner().invoke(main, ["export", str(tmp_path / "ct"), "--format", "gptq_v2", "-o", str(tmp_path / "gptq")])
    if model_type in GPTQ_UNPACKABLE:  # a linear with an output width GPTQ's zero points cannot pack: one line, no output
        lines = result.output.strip().splitlines()  # the line the run gives before calibrating (it names the linear)
        assert result.exit_code == 2 and len(lines) == 1 and "packs 4-bit codes into whole int32 words" in lines[0]
        assert not (tmp_path / "gptq").exists()
        return
    assert result.exit_code == 0, result.output
    with torch.no_grad():
        assert torch.equal(quantkit.load_quantized(tmp_path / "gptq")(input_ids=ids).logits, ours)


# more causal-LM types, checked by one GPTQ round trip each (the coverage benchmark's check, as a test); what each brings
ROUND_TRIP = {
    "qwen3_5": "an image-text model's causal LM: Gated DeltaNet layers beside full attention",
    "qwen3_5_moe": "the same with routed and shared experts",
    "qwen4_exp": "hyper-connections inside layers, linear attention beside attention with a per-sample token indexer",
    "kimi_linear": "gated linear attention with short convolutions beside latent attention, experts",
    "lara_mini": "linear attention beside sliding-window attention, experts",
    "fuyu": "an image-text model's causal LM whose image patches enter as embeddings (Persimmon decoder)",
    "blenderbot": "the causal LM of an encoder-decoder family (its decoder, cross-attention unused and kept FP)",
    "plbart": "the same (a BART variant for code)",
    "whisper": "the same, the decoder of a speech model",
    "ergo": "a dense first layer, then ungated fused experts behind a router that wraps one linear",
    # checkpoint names that are not the model's (attn.wkv is self_attn.kv_proj), hyper-connections, hash routing
    "deepseek_v4": "mixed settings: compressed-tensors targets by the model's own names",
}


@pytest.mark.parametrize("model_type", sorted(ROUND_TRIP))
def test_gptq_export_reloads_in_transformers_with_quantkits_logits(tmp_path: Path, model_type: str) -> None:
    """GPTQ -> compressed-tensors of a tiny model (its causal-LM class, as the coverage benchmark builds it), read back
    by plain transformers: the same logits as quantkit's own reading of the export."""
    pytest.importorskip("compressed_tensors")
    require_type(model_type)
    from transformers import AutoConfig

    from quantkit.models import auto_class_for

    with_vision = getattr(AutoConfig.for_model(model_type), "vision_config", None) is not None
    config = tiny_vlm_config(model_type) if with_vision else tiny_config(model_type)
    random_model(config, seed=0).eval().save_pretrained(tmp_path / "model")
    text = write_text(tmp_path / "calib.txt", words=400)
    save_tokenizer(tmp_path / "model", text)  # Qwen3.5's own tokenizer class: a byte-level BPE
    # DeepSeek-V4 with one linear at 8 bits: several config groups, each naming its linears
    mixed = {"recipe": Recipe(overrides=[Override(targets=["kv_proj"], bits=8)])} if model_type == "deepseek_v4" else {}
    spec = QuantSpec(bits=4, group_size=-1)  # per channel: DeepSeek-V4's o_a_proj reads 4 columns
    run_calibration(str(tmp_path / "model"), str(tmp_path / "ct"), spec, method="gptq", format="compressed-tensors",
                    calib=str(text), nsamples=2, seqlen=16, progress=False, **mixed)
    ids = torch.randint(1, 60, (2, 12), generator=torch.Generator().manual_seed(3))  # word ids, below the image ids
    with torch.no_grad():
        ours = quantkit.load_quantized(tmp_path / "ct")(input_ids=ids).logits
        theirs = auto_class_for(config).from_pretrained(tmp_path / "ct")(input_ids=ids).logits
    assert (theirs - ours).abs().max() <= 1e-3 * ours.abs().max()


@pytest.mark.parametrize("model_type", LOW_MEMORY_FAMILIES)
def test_low_memory_with_two_ranks_writes_the_in_memory_bytes(family_dirs, tmp_path: Path, model_type: str) -> None:
    kw = dict(method="gptq", calib=str(family_dirs["text"]), nsamples=4, seqlen=16, progress=False, fp_target=True,
              format="gptq_v2" if model_type in CONV1D else "compressed-tensors")
    run_calibration(str(family_dirs[model_type]), str(tmp_path / "plain"), RUN_SPEC, **kw)
    report = run_calibration(str(family_dirs[model_type]), str(tmp_path / "low"), RUN_SPEC, nproc=2, low_memory=True, **kw)
    assert report["low_memory"] and report["world_size"] == 2
    assert_same_files(tmp_path / "plain", tmp_path / "low")


# checkpoints transformers converts on load (WeightConverter), which streamed layers convert the same way
LOAD_CONVERSIONS = {
    "ergo": "the router and the shared expert stored transposed",
    "param2moe": "q/k/v stored as one query_key_value, split on load",
    "olmo_hybrid": "the q/k/v convolutions stored apart, concatenated on load",
}


@pytest.mark.parametrize("model_type", sorted(LOAD_CONVERSIONS))
def test_streamed_tensors_are_converted_as_transformers_loads(tmp_path: Path, model_type: str) -> None:
    """--low-memory's tensors are those plain transformers' from_pretrained makes of a checkpoint it converts on
    load: each streamed layer's, and everything outside the layers."""
    from quantkit.models import auto_class_for
    from quantkit.models.streamed import build_skeleton, load_layer

    directory = save_tiny_causal_lm(tmp_path, model_type)
    reference = auto_class_for(tiny_config(model_type)).from_pretrained(directory).eval()
    adapter_for(reference)  # fused experts as per-expert linears, as the skeleton holds them
    expected = reference.state_dict()
    skeleton, adapter, source = build_skeleton(str(directory))
    assert source.conversions  # the checkpoint does hold tensors transformers converts
    prefix = adapter.layers + "."
    outside = {k: v for k, v in skeleton.state_dict().items() if not k.startswith(prefix)}
    assert outside and all(torch.equal(v, expected[k]) for k, v in outside.items())
    for index in range(len(adapter.decoder_layers(skeleton))):
        layer = load_layer(skeleton, adapter, source, index)
        for key, value in layer.state_dict().items():
            assert torch.equal(value, expected[f"{adapter.layer_prefix(index)}.{key}"]), key


def test_ergo_low_memory_two_ranks_resumed_writes_the_in_memory_bytes(tmp_path: Path) -> None:
    """Ergo (router stored transposed) with --low-memory on 2 ranks, stopped after its first layer and resumed: the
    in-memory run's bytes."""
    directory = save_tiny_causal_lm(tmp_path, "ergo")
    text = write_text(tmp_path / "calib.txt")
    kw = dict(method="gptq", calib=str(text), nsamples=4, seqlen=16, progress=False, fp_target=True)
    run_calibration(str(directory), str(tmp_path / "plain"), RUN_SPEC, **kw)
    with pytest.raises(QuantkitError, match="rank 1 failed at layer 1"):
        run_calibration(str(directory), str(tmp_path / "low"), RUN_SPEC, nproc=2, low_memory=True,
                        hooks=Hooks(on_layer=FailAt(1, 1)), **kw)
    report = run_calibration(str(directory), str(tmp_path / "low"), RUN_SPEC, nproc=2, low_memory=True, resume=True,
                             **kw)
    assert report["resumed_from_layer"] == 1 and report["world_size"] == 2
    assert_same_files(tmp_path / "plain", tmp_path / "low")


@pytest.mark.parametrize("model_type", sorted(CONV1D))
def test_conv1d_is_quantized_as_the_linear_of_its_transposed_weight(model_type: str) -> None:
    """A Conv1D (x @ W + b, W stored [in, out]) is solved as the linear with weight W.T: its RTN codes are those of
    W.T; the model computes what it computed; a fake export read by plain transformers holds the dequantized
    codes transposed back, with quantkit's logits."""
    model = tiny_causal_lm(model_type)
    ids = torch.randint(1, 120, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    convs = {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    assert convs
    adapter = adapter_for(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    results = calibrate_model(model, samples(), SPEC, method="rtn", progress=False).results
    assert set(results) == set(convs) == set(layer_linears(model, adapter))
    for name, weight in convs.items():
        assert torch.equal(results[name].qweight, rtn_solve(weight.T.float(), None, SPEC).qweight), name
        assert torch.equal(get_module(model, name).weight, results[name].dequantize().to(weight.dtype)), name


@pytest.mark.parametrize("model_type", sorted(CONV1D))
def test_conv1d_exports_reload_in_transformers_and_compressed_tensors_refuses(family_dirs, tmp_path: Path,
                                                                             model_type: str) -> None:
    """GPTQ (read by quantkit) and fake (read by plain transformers: each Conv1D weight is the dequantized codes
    transposed) give one model; compressed-tensors, whose loaders quantize nn.Linear only, is refused before any
    calibration (calibrate) or output (export), in one line naming the formats that hold it."""
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from quantkit.cli import main
    from quantkit.export import read_checkpoint

    kw = dict(method="gptq", calib=str(family_dirs["text"]), nsamples=4, seqlen=16, progress=False)
    run_calibration(str(family_dirs[model_type]), str(tmp_path / "gptq"), RUN_SPEC, format="gptq_v2", **kw)
    runner = CliRunner()
    result = runner.invoke(main, ["export", str(tmp_path / "gptq"), "--format", "fake", "-o", str(tmp_path / "fake")])
    assert result.exit_code == 0, result.output
    ids = torch.randint(1, 120, (2, 12), generator=torch.Generator().manual_seed(3))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "fake")
    results = read_checkpoint(tmp_path / "gptq").results
    assert results and all(type(get_module(theirs, n)).__name__ == "Conv1D" for n in results)
    for name, r in results.items():
        assert torch.equal(get_module(theirs, name).weight.float(), r.dequantize().T), name
    with torch.no_grad():
        ours = quantkit.load_quantized(tmp_path / "gptq")(input_ids=ids).logits
        assert (theirs(input_ids=ids).logits - ours).abs().max() <= 1e-3 * ours.abs().max()
    for args, out in ((["calibrate", str(family_dirs[model_type]), "--calib", str(family_dirs["text"]), "--method", "rtn",
                        "--nsamples", "2", "--seqlen", "16", "--group-size", "16", "--format", "compressed-tensors"],
                       tmp_path / "ct"),
                      (["export", str(tmp_path / "gptq"), "--format", "compressed-tensors"], tmp_path / "ct2")):
        result = runner.invoke(main, [*args, "-o", str(out)])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and "Conv1D" in lines[0] and "gptq_v2" in lines[0], result.output
        assert not out.exists()
