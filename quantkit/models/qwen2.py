"""Qwen2 family: Llama layout with q/k/v biases."""

from quantkit.models.base import Adapter
from quantkit.models.llama import ADAPTER as LLAMA

ADAPTER = Adapter(
    name="qwen2",
    model_types=("qwen2",),
    layers=LLAMA.layers,
    embeddings=LLAMA.embeddings,
    final_norm=LLAMA.final_norm,
    lm_head=LLAMA.lm_head,
    linear_order=LLAMA.linear_order,
    smooth_folds=LLAMA.smooth_folds,  # the v bias is divided with v's rows
)
