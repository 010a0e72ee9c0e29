"""Llama family (also Mistral): pre-norm decoder, separate q/k/v, gated MLP."""

from quantkit.models.base import Adapter, Fold

ADAPTER = Adapter(
    name="llama",
    model_types=("llama", "mistral"),
    layers="model.layers",
    embeddings="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    linear_order=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    smooth_folds=(
        Fold("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        Fold("self_attn.v_proj", ("self_attn.o_proj",)),  # only without grouped key/value heads
        Fold("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        Fold("mlp.up_proj", ("mlp.down_proj",)),  # down reads act(gate) * up: linear in up's rows
    ),
)
