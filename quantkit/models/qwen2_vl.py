"""Qwen2-VL and Qwen2.5-VL: a Qwen2 language model (mrope positions) behind a ViT whose merger projects."""

from quantkit.models.base import Adapter
from quantkit.models.llama import ADAPTER as LLAMA

_LM = "model.language_model"

ADAPTER = Adapter(
    name="qwen2_vl",
    model_types=("qwen2_vl",),
    layers=f"{_LM}.layers",
    embeddings=f"{_LM}.embed_tokens",
    final_norm=f"{_LM}.norm",
    lm_head="lm_head",
    linear_order=LLAMA.linear_order,
    smooth_folds=LLAMA.smooth_folds,
    vision=("model.visual",),  # the ViT and its patch merger (the projector): full precision
)

ADAPTER_2_5 = Adapter(
    name="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
    layers=ADAPTER.layers,
    embeddings=ADAPTER.embeddings,
    final_norm=ADAPTER.final_norm,
    lm_head=ADAPTER.lm_head,
    linear_order=ADAPTER.linear_order,
    smooth_folds=ADAPTER.smooth_folds,
    vision=ADAPTER.vision,
)
