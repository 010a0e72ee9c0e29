"""OPT family: learned positions, separate q/k/v, fc1/fc2 MLP; its smoothing folds."""

from quantkit.models.base import Family, Fold

FAMILY = Family(
    name="opt",
    model_types=("opt",),
    # the norms sit before or after their blocks depending on do_layer_norm_before, so only v folds
    smooth_folds=(Fold("self_attn.v_proj", ("self_attn.out_proj",)),),
)
