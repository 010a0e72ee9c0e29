"""LLaVA-OneVision: SigLIP vision tower, MLP projector, image_newline, Qwen2 language model."""

from quantkit.models.base import Adapter
from quantkit.models.llava import ADAPTER as LLAVA

ADAPTER = Adapter(
    name="llava_onevision",
    model_types=("llava_onevision",),
    layers=LLAVA.layers,
    embeddings=LLAVA.embeddings,
    final_norm=LLAVA.final_norm,
    lm_head=LLAVA.lm_head,
    linear_order=LLAVA.linear_order,
    smooth_folds=LLAVA.smooth_folds,
    vision=(*LLAVA.vision, "model.image_newline"),  # image_newline is a Parameter, not a module
)
