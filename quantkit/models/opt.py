"""OPT family: learned positions, separate q/k/v, fc1/fc2 MLP."""

from quantkit.models.base import Adapter, Fold

ADAPTER = Adapter(
    name="opt",
    model_types=("opt",),
    layers="model.decoder.layers",
    embeddings="model.decoder.embed_tokens",
    final_norm="model.decoder.final_layer_norm",
    lm_head="lm_head",
    linear_order=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    ),
    # the norms sit before or after their blocks depending on do_layer_norm_before, so only v folds
    smooth_folds=(Fold("self_attn.v_proj", ("self_attn.out_proj",)),),
)
