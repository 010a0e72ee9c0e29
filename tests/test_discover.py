"""The derived adapter: layers, embeddings, norm and head against transformers' own accessors, each layer's
linear groups against the families' modeling code (written out by hand here), per-layer arguments against
full-model forwards, and one line for what cannot be handled."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_causal_lm, tiny_config

from quantkit.engine.capture import capture_layer_inputs, run_layer
from quantkit.errors import QuantkitError
from quantkit.models import adapter_for, get_module
from quantkit.models.base import ExpertBlock

LLAMA = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
         ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
# Each family's groups as its modeling code runs them: linears reading one tensor share a group, which is solved
# where its first member runs (Falcon's parallel MLP reads the attention's input, so it joins q/k/v's group).
GROUPS = {
    "llama": LLAMA,
    "qwen3": LLAMA,  # q/k norms sit between q_proj/k_proj and the attention: nothing changes for the linears
    "gemma2": LLAMA,  # sandwich norms (pre/post feed-forward) around the same linears
    "gpt_neox": (("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",)),
    "opt": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",)),
    "phi3": (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    "falcon": (("self_attention.query_key_value", "mlp.dense_h_to_4h"), ("self_attention.dense",),
               ("mlp.dense_4h_to_h",)),
    # multi-head latent attention: q_a and kv_a both read the normed input; q_b and kv_b read their own norms
    "deepseek_v3": (("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"), ("self_attn.q_b_proj",),
                    ("self_attn.kv_b_proj",), ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"),
                    ("mlp.down_proj",)),
}
PATHS = {  # layers, embeddings, final norm
    "gpt_neox": ("gpt_neox.layers", "gpt_neox.embed_in", "gpt_neox.final_layer_norm"),
    "opt": ("model.decoder.layers", "model.decoder.embed_tokens", "model.decoder.final_layer_norm"),
    "falcon": ("transformer.h", "transformer.word_embeddings", "transformer.ln_f"),
}


@pytest.mark.parametrize("model_type", sorted(GROUPS))
def test_derived_adapter_matches_the_modeling_code(model_type: str) -> None:
    model = tiny_causal_lm(model_type)
    adapter = adapter_for(model)
    layers, embeddings, norm = PATHS.get(model_type, ("model.layers", "model.embed_tokens", "model.norm"))
    assert (adapter.layers, adapter.embeddings, adapter.final_norm, adapter.lm_head) == (layers, embeddings, norm, "lm_head")
    assert get_module(model, adapter.embeddings) is model.get_input_embeddings()
    assert get_module(model, adapter.lm_head) is model.get_output_embeddings()
    assert len(adapter.decoder_layers(model)) == 2
    for index in range(2):
        assert adapter.linear_groups(index) == GROUPS[model_type]
        assert adapter.layout(index).experts == () and adapter.layout(index).full_precision == ()
    # every nn.Linear of a layer is solved exactly once
    linears = sorted(n for n, m in adapter.decoder_layers(model)[0].named_modules() if isinstance(m, torch.nn.Linear))
    assert sorted(adapter.linear_names(0)) == linears


@pytest.mark.parametrize("model_type", ["llama", "phi3", "gemma2", "deepseek_v3", "qwen3_moe"])
def test_a_meta_device_model_derives_the_same_adapter(model_type: str) -> None:
    """Preflight checks and --low-memory skeletons derive on meta weights (no memory, no weights read)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    assert adapter_for(meta) == adapter_for(tiny_causal_lm(model_type))


def test_mixture_of_experts_blocks_are_found_with_their_router() -> None:
    """Fused 3-D experts become one nn.Linear per expert projection (quantkit.models.experts), solved with the
    block's shared experts: every expert's gate/up beside theirs, every down beside their down; the router is
    kept in full precision, never silently skipped; dense and MoE layers get their own layouts."""
    model = tiny_causal_lm("deepseek_v3", first_k_dense_replace=1)
    fused = get_module(model, "model.layers.1.mlp.experts")
    assert all(p.dim() == 3 for p in fused.parameters())
    adapter = adapter_for(model)
    assert adapter.linear_groups(0)[-2:] == (("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
    moe = adapter.layout(1)
    assert moe.experts == (ExpertBlock(block="mlp", experts="mlp.experts", router="mlp.gate", position=4),)
    count = fused.gate_up_proj.shape[0]
    assert moe.groups[4:] == (
        ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj",
         *(f"mlp.experts.{e}.{leaf}" for e in range(count) for leaf in ("gate_proj", "up_proj"))),
        ("mlp.shared_experts.down_proj", *(f"mlp.experts.{e}.down_proj" for e in range(count))))
    assert dict(moe.full_precision) == {"mlp.gate": "router of a mixture-of-experts block, kept in full precision"}
    for e in range(count):  # the fused slices, as nn.Linear weights [out, in]
        expert = get_module(model, f"model.layers.1.mlp.experts.{e}")
        width = fused.down_proj.shape[2]
        assert torch.equal(expert.gate_proj.weight, fused.gate_up_proj[e, :width])
        assert torch.equal(expert.down_proj.weight, fused.down_proj[e])


@pytest.mark.parametrize(("model_type", "message"), [
    ("bert", "unsupported architecture 'bert': its layers (bert.encoder.layer) are an encoder stack"),
])
def test_what_cannot_be_handled_is_one_line(model_type: str, message: str) -> None:
    with pytest.raises(QuantkitError) as info:
        adapter_for(tiny_causal_lm(model_type))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


@pytest.mark.parametrize(("model_type", "overrides"), [
    ("gemma2", {}),  # alternating sliding-window and full attention: two masks
    ("gemma3_text", {"layer_types": ["sliding_attention", "full_attention"]}),  # and a rotary table per type
    ("cohere2", {"layer_types": ["sliding_attention", "full_attention"]}),
])
def test_each_layer_replays_with_its_own_arguments(model_type: str, overrides: dict) -> None:
    """Layer-by-layer replay from the captured inputs equals the full forward (windows of 16 tokens against a
    sliding window of 4, so the sliding layers' masks matter)."""
    model = tiny_causal_lm(model_type, sliding_window=4, **overrides)
    adapter = adapter_for(model)
    samples = [{"input_ids": torch.randint(1, 120, (1, 16), generator=torch.Generator().manual_seed(s))} for s in range(3)]
    with torch.no_grad():
        full = [model(**s, use_cache=False).logits for s in samples]
        inputs = capture_layer_inputs(model, adapter, samples)
        assert inputs.layer_kwargs is not None and inputs.layer_kwargs[0] is not inputs.layer_kwargs[1]
        for index, layer in enumerate(adapter.decoder_layers(model)):
            inputs.use_layer(index)
            for i in range(len(inputs)):
                inputs.hidden[i] = run_layer(layer, inputs, i)
        replay = [adapter.logits(model, adapter.norm(model)(h)) for h in inputs.hidden]
        # the same replay with layer 0's arguments everywhere (what one set of kwargs would give) differs
        wrong = capture_layer_inputs(model, adapter, samples)
        for layer in adapter.decoder_layers(model):
            for i in range(len(wrong)):
                wrong.hidden[i] = run_layer(layer, wrong, i)
    for a, b in zip(full, replay):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a - b).abs().max()
    assert not torch.allclose(full[0], adapter.logits(model, adapter.norm(model)(wrong.hidden[0])), atol=1e-4)


@pytest.mark.parametrize(("model_type", "after_layers"), [
    ("olmo", ("model.norm",)),  # a LayerNorm without weights
    ("nanochat", ("model.norm",)),  # weightless, and run before the layers as well as after them
    ("bart", ()),  # BartForCausalLM: no norm after the decoder's layers; the head reads a slice of their output
    ("hy_v4", ("model.hc_head", "model.norm")),  # hyper-connection streams mixed into one, then the final norm
    ("deepseek_v4", ("model.hc_head", "model.norm")),
])
def test_the_final_norm_is_what_runs_after_the_last_layer(model_type: str, after_layers: tuple[str, ...]) -> None:
    """The final norm is the module that runs between the last layer and the head, weights or none (where several
    run, a chain of full-precision modules before it): layer-by-layer replay, then the adapter's norm and head,
    gives the model's logits."""
    model = tiny_causal_lm(model_type)
    adapter = adapter_for(model)
    assert adapter.after_layers() == after_layers
    assert adapter.final_norm == (after_layers[-1] if after_layers else None)
    samples = [{"input_ids": torch.randint(1, 120, (1, 12), generator=torch.Generator().manual_seed(s))} for s in range(2)]
    with torch.no_grad():
        full = [model(**s, use_cache=False).logits for s in samples]
        inputs = capture_layer_inputs(model, adapter, samples)
        for index, layer in enumerate(adapter.decoder_layers(model)):
            inputs.use_layer(index)
            for i in range(len(inputs)):
                inputs.hidden[i] = run_layer(layer, inputs, i)
        replay = [adapter.logits(model, adapter.norm(model)(h)) for h in inputs.hidden]
    for a, b in zip(full, replay):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a - b).abs().max()


def test_a_module_after_the_last_layer_reading_more_than_its_predecessor_is_refused_in_one_line() -> None:
    """Inkling2's final_input attends over the outputs of several layers (not only the last): no chain to replay."""
    model = tiny_causal_lm("inkling2_text")
    with pytest.raises(QuantkitError, match=r"model\.final_input reads more than the output of the module before it"):
        adapter_for(model)


def test_experts_quantkit_cannot_split_are_refused_in_one_line(monkeypatch) -> None:
    """A fused experts module that quantkit.models.experts does not know stays an expert block, which
    calibration refuses in one line naming it."""
    from quantkit.engine import calibrate_model
    from quantkit.models import experts
    from quantkit.quant import QuantSpec

    monkeypatch.setattr(experts, "fused_layout", lambda module: None)
    model = tiny_causal_lm("qwen3_moe")
    with pytest.raises(QuantkitError, match=r"^model\.layers\.0\.mlp\.experts holds experts as Qwen3MoeExperts "
                                            r"\(forward\(hidden_states, top_k_index, top_k_weights\)\), "
                                            r"which quantkit cannot split") as info:
        calibrate_model(model, [{"input_ids": torch.randint(1, 120, (1, 8))}], QuantSpec(bits=4, group_size=16),
                        method="rtn", progress=False)
    assert "\n" not in str(info.value)


def test_jetmoe_parallel_experts_are_refused_in_one_line() -> None:
    """JetMoE's experts (MLP and mixture of attention) are JetMoeParallelExperts, called on rows already grouped
    by expert: refused in one line naming the module and its call."""
    from quantkit.engine import calibrate_model
    from quantkit.quant import QuantSpec

    model = tiny_causal_lm("jetmoe")
    with pytest.raises(QuantkitError, match=r"^model\.layers\.0\.mlp\.input_linear holds experts as JetMoeParallelExperts "
                                            r"\(forward\(inputs, expert_size\)\), which quantkit cannot split") as info:
        calibrate_model(model, [{"input_ids": torch.randint(1, 120, (1, 8))}], QuantSpec(bits=4, group_size=16),
                        method="rtn", progress=False)
    assert "\n" not in str(info.value)
