"""GPT-NeoX family (Pythia): fused query_key_value, parallel attention and MLP residuals; its smoothing folds."""

from quantkit.models.base import Family, Fold

FAMILY = Family(
    name="gpt_neox",
    model_types=("gpt_neox",),
    # the fused query_key_value interleaves q/k/v per head, so v's rows are not foldable into dense
    smooth_folds=(
        Fold("input_layernorm", ("attention.query_key_value",)),
        Fold("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
    ),
)
