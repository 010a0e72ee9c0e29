"""LLaVA (1.5): CLIP vision tower, MLP projector, Llama-layout language model."""

from quantkit.models.base import Adapter
from quantkit.models.llama import ADAPTER as LLAMA

_LM = "model.language_model"

ADAPTER = Adapter(
    name="llava",
    model_types=("llava",),
    layers=f"{_LM}.layers",
    embeddings=f"{_LM}.embed_tokens",
    final_norm=f"{_LM}.norm",
    lm_head="lm_head",
    linear_order=LLAMA.linear_order,
    smooth_folds=LLAMA.smooth_folds,
    vision=("model.vision_tower", "model.multi_modal_projector"),
)

# Language models with the Llama decoder-layer layout (q/k/v/o, gate/up/down) that LLaVA-style
# checkpoints ship with; another text backbone would need its own linear_order.
LLAMA_LAYOUT_TEXT_TYPES = ("llama", "mistral", "qwen2")
