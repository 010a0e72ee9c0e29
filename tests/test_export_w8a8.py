"""W8A8 / W4A8 exports: compressed-tensors with per-token dynamic input activations, loaded back by quantkit
(same logits as the calibrated model) and by transformers + compressed-tensors (which quantizes the inputs
itself, with its own scale divisor); GPTQ formats refuse them."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import ct_divisor, tiny_model
from safetensors import safe_open

import quantkit
from quantkit.errors import QuantkitError
from quantkit.export import read_checkpoint, write_checkpoint
from quantkit.quant.activations import ActivationQuantizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from helpers import make_tokenizer, write_text

    root = tmp_path_factory.mktemp("w8a8")
    tiny_model("llama", seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, vocab_size=64, max_position_embeddings=64).save_pretrained(root / "m")
    make_tokenizer().save_pretrained(root / "m")
    return root / "m", write_text(root / "t.txt")


def linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


@pytest.mark.parametrize("bits, storage", [(8, "int-quantized"), (4, "pack-quantized")])
def test_export_loads_in_quantkit_and_transformers(tiny_dir, tmp_path, bits: int, storage: str) -> None:
    from transformers import AutoModelForCausalLM

    model_dir, text = tiny_dir
    out = tmp_path / "out"
    model, _ = quantkit.quantize(str(model_dir), data=str(text), method="gptq", bits=bits, group_size=-1, act_bits=8,
                                 smooth="uniform", nsamples=4, seqlen=16, progress=False, output_dir=str(out))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["format"] == group["format"] == storage
    assert group["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
                                          "strategy": "token", "dynamic": True}
    assert group["weights"]["strategy"] == "channel" and group["weights"]["num_bits"] == bits
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        if bits == 8:  # vLLM's int8 W8A8 layout: int8 weight, one scale per output channel
            weight = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
            assert weight.dtype == torch.int8 and f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale").shape == (32, 1)
        else:
            assert "model.layers.0.self_attn.q_proj.weight_packed" in keys
    assert json.loads((out / "quantkit.json").read_text())["spec"]["act_bits"] == 8
    # the norms carry the smoothing: they are not the source's any more
    source = AutoModelForCausalLM.from_pretrained(model_dir)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not torch.equal(f.get_tensor("model.layers.0.input_layernorm.weight"),
                               source.model.layers[0].input_layernorm.weight.detach())

    ids = torch.randint(2, 62, (2, 16))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        back = quantkit.load_quantized(out)
        assert torch.equal(back(input_ids=ids).logits, ours)
        theirs = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
        # compressed-tensors divides the per-token max by 127.5 where quantkit and vLLM divide by 127: with its
        # divisor, quantkit's fake-quantized model gives transformers' logits
        back.quantkit_activation_quantizer.remove()
        unquantized_inputs = back(input_ids=ids).logits
        ActivationQuantizer(back, linear_names(back), 8, ct_divisor(8))
        assert torch.allclose(back(input_ids=ids).logits, theirs, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(unquantized_inputs, theirs, rtol=1e-5, atol=1e-6)  # transformers did quantize inputs
    assert float((ours - theirs).abs().max()) < 0.05 * float(ours.abs().max())

    with pytest.raises(QuantkitError, match="weight-only models"):
        write_checkpoint(read_checkpoint(out), tmp_path / "gptq", fmt="gptq_v2")


def test_quantkit_eval_runs_the_export_with_its_inputs_quantized(tiny_dir, tmp_path) -> None:
    from click.testing import CliRunner
    from helpers import make_tokenizer

    from quantkit.cli import main
    from quantkit.eval import evaluate_loss

    model_dir, text = tiny_dir
    out = tmp_path / "out"
    quantkit.quantize(str(model_dir), data=str(text), method="rtn", bits=8, group_size=-1, act_bits=8,
                      nsamples=2, seqlen=16, progress=False, output_dir=str(out))
    done = CliRunner().invoke(main, ["eval", str(out), "--data", str(text), "--part", "all", "--seqlen", "16", "--json"])
    assert done.exit_code == 0, done.output
    loss = json.loads(done.output.strip().splitlines()[-1])["loss"]

    model = quantkit.load_quantized(out)
    model.quantkit_activation_quantizer.remove()
    plain = evaluate_loss(model, make_tokenizer(), str(text), seqlen=16, progress=False)["loss"]

    def a8(module, args):  # written here: per-token max / 127, round, clamp, times the scale
        scale = args[0].abs().amax(dim=-1, keepdim=True) / 127
        return (torch.clamp(torch.round(args[0] / scale), -128, 127) * scale,)

    for name in linear_names(model):
        model.get_submodule(name).register_forward_pre_hook(a8)
    exposed = evaluate_loss(model, make_tokenizer(), str(text), seqlen=16, progress=False)["loss"]
    assert loss == pytest.approx(exposed, abs=1e-6) and loss != pytest.approx(plain, abs=1e-6)


@pytest.mark.parametrize("method, smooth", [("gptq", "none"), ("gptq", "uniform"), ("tlq", "tlq")])
def test_low_memory_and_ranks_w8a8_export_is_byte_identical(tiny_dir, tmp_path, method: str, smooth: str) -> None:
    """--low-memory streams the layers with the same activation exposure and smoothing, and two ranks search
    the same tokens and fold the same scales: the same files as one in-memory process."""
    from helpers import assert_same_files

    model_dir, text = tiny_dir
    options = dict(data=str(text), method=method, bits=8, group_size=-1, act_bits=8, smooth=smooth, nsamples=5,
                   seqlen=16, progress=False)
    _, report = quantkit.quantize(str(model_dir), output_dir=str(tmp_path / "memory"), **options)
    assert all(("smoothing" in layer) == (smooth != "none") for layer in report["layers"])
    quantkit.quantize(str(model_dir), output_dir=str(tmp_path / "streamed"), low_memory=True, reload=False, **options)
    assert_same_files(tmp_path / "memory", tmp_path / "streamed")  # TLQ's gradient pass streamed from the files too
    if method == "tlq":  # and a set's token weights, in memory and streamed alike
        from click.testing import CliRunner

        from quantkit.cli import main

        made = CliRunner().invoke(main, ["importance", str(model_dir), "--calib", str(text), "--nsamples", "5",
                                         "--seqlen", "16", "-o", str(tmp_path / "set")])
        assert made.exit_code == 0, made.output
        from_set = {**options, "data": None, "calib_set": str(tmp_path / "set")}
        quantkit.quantize(str(model_dir), output_dir=str(tmp_path / "set_memory"), **from_set)
        quantkit.quantize(str(model_dir), output_dir=str(tmp_path / "set_streamed"), low_memory=True, reload=False,
                          **from_set)
        assert_same_files(tmp_path / "set_memory", tmp_path / "set_streamed")
    if smooth != "none":
        quantkit.quantize(str(model_dir), output_dir=str(tmp_path / "ranks"), nproc=2, reload=False, **options)
        assert_same_files(tmp_path / "memory", tmp_path / "ranks")
        # the 2-rank run really smoothed: its norms differ from the source's
        with safe_open(tmp_path / "ranks" / "model.safetensors", "pt") as f:
            norm = f.get_tensor("model.layers.0.input_layernorm.weight")
        assert not torch.equal(norm, torch.ones_like(norm))


def test_conversion_keeps_the_activation_bits(tiny_dir, tmp_path) -> None:
    """quantkit export to fake and back keeps act_bits and the codes; the reloaded model quantizes its inputs."""
    model_dir, text = tiny_dir
    out = tmp_path / "ct"
    quantkit.quantize(str(model_dir), data=str(text), method="rtn", bits=8, group_size=-1, act_bits=8, nsamples=2,
                      seqlen=16, progress=False, output_dir=str(out))
    original = read_checkpoint(out)
    write_checkpoint(original, tmp_path / "fake", fmt="fake")
    write_checkpoint(read_checkpoint(tmp_path / "fake"), tmp_path / "back", fmt="compressed-tensors")
    back = read_checkpoint(tmp_path / "back")
    assert back.manifest["spec"]["act_bits"] == 8
    assert all(torch.equal(back.results[n].qweight, r.qweight) for n, r in original.results.items())
    assert json.loads((tmp_path / "back" / "config.json").read_text())["quantization_config"]["format"] == "int-quantized"
    assert hasattr(quantkit.load_quantized(tmp_path / "fake"), "quantkit_activation_quantizer")


def test_model_card_names_w8a8(tiny_dir, tmp_path) -> None:
    model_dir, text = tiny_dir
    out = tmp_path / "out"
    quantkit.quantize(str(model_dir), data=str(text), method="rtn", bits=8, group_size=-1, act_bits=8, nsamples=2,
                      seqlen=16, progress=False, output_dir=str(out))
    card = (out / "README.md").read_text()
    assert "W8A8" in card and "act_bits: 8" in card and "per token to 8 bits" in card


def test_moe_export_runs_each_experts_inputs_quantized(tmp_path) -> None:
    """A W8A8 Mixtral: load_quantized gives the logits of the dequantized weights in plain transformers with every
    linear's input (each expert's own: x for w1/w3, act(w1 x) * w3 x for w2) rounded per token, written here; its
    generate (per-expert linears, a KV cache) continues as that reference does greedily."""
    from helpers import make_tokenizer, save_tiny_causal_lm, write_text
    from transformers import AutoModelForCausalLM

    model_dir, text = save_tiny_causal_lm(tmp_path, "mixtral"), write_text(tmp_path / "t.txt")
    out = tmp_path / "out"
    quantkit.quantize(str(model_dir), data=str(text), method="rtn", bits=8, group_size=-1, act_bits=8, nsamples=2,
                      seqlen=16, progress=False, output_dir=str(out))
    write_checkpoint(read_checkpoint(out), tmp_path / "fake", fmt="fake")

    def a8(x: torch.Tensor) -> torch.Tensor:
        scale = x.abs().amax(dim=-1, keepdim=True) / 127
        return torch.clamp(torch.round(x / scale), -128, 127) * scale

    def experts_forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for token in range(hidden_states.shape[0]):
            for slot, expert in enumerate(top_k_index[token].tolist()):
                gate, up = (a8(hidden_states[token]) @ self.gate_up_proj[expert].T).chunk(2)
                hidden = a8(self.act_fn(gate) * up) @ self.down_proj[expert].T
                out[token] += top_k_weights[token, slot] * hidden
        return out

    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "fake").eval()
    assert not hasattr(reference, "quantkit_activation_quantizer")
    for name, module in reference.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name and not name.endswith("mlp.gate"):
            module.register_forward_pre_hook(lambda m, args: (a8(args[0]),))
        if type(module).__name__ == "MixtralExperts":
            module.forward = experts_forward.__get__(module)
    ids = torch.tensor(make_tokenizer()(text.read_text()[:200])["input_ids"][:24])[None]
    loaded = quantkit.load_quantized(out)
    with torch.no_grad():
        ours = loaded(input_ids=ids).logits
        expected = reference(input_ids=ids).logits
        greedy = ids
        for _ in range(4):  # the reference's greedy continuation, one whole forward per token
            greedy = torch.cat([greedy, reference(input_ids=greedy).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        generated = loaded.generate(ids, max_new_tokens=4, do_sample=False)  # with its cache, token by token
        for module in reference.modules():
            module._forward_pre_hooks.clear()
        unquantized_inputs = reference(input_ids=ids).logits
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours, unquantized_inputs, rtol=1e-4, atol=1e-5)
    assert torch.equal(generated, greedy)
