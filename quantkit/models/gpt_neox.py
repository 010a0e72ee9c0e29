"""GPT-NeoX family (Pythia): fused query_key_value, parallel attention and MLP residuals."""

from quantkit.models.base import Adapter, Fold

ADAPTER = Adapter(
    name="gpt_neox",
    model_types=("gpt_neox",),
    layers="gpt_neox.layers",
    embeddings="gpt_neox.embed_in",
    final_norm="gpt_neox.final_layer_norm",
    lm_head="lm_head",
    linear_order=(
        ("attention.query_key_value",),
        ("attention.dense",),
        ("mlp.dense_h_to_4h",),
        ("mlp.dense_4h_to_h",),
    ),
    # the fused query_key_value interleaves q/k/v per head, so v's rows are not foldable into dense
    smooth_folds=(
        Fold("input_layernorm", ("attention.query_key_value",)),
        Fold("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
    ),
)
