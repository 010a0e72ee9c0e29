"""Llama family (also Mistral): pre-norm decoder, separate q/k/v, gated MLP."""

from quantkit.models.base import Adapter

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
)
