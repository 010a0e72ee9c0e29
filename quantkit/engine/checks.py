"""Checks before any work: settings and weights that cannot be quantized fail fast with one clear error."""

from __future__ import annotations

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.models import get_module
from quantkit.models.base import Adapter
from quantkit.quant.spec import QuantSpec


def check_layer(layer: nn.Module, index: int, adapter: Adapter, spec: QuantSpec) -> None:
    """Raise QuantkitError if a linear of decoder layer `index` cannot be quantized."""
    for name in adapter.linear_names():
        linear = get_module(layer, name)
        full = f"{adapter.layer_prefix(index)}.{name}"
        check_group_width(linear.in_features, full, spec)
        if linear.weight.device.type != "meta" and not torch.isfinite(linear.weight).all():
            raise QuantkitError(f"weight of {full} contains NaN or Inf; fix the checkpoint before quantizing")


def check_group_width(width: int, name: str, spec: QuantSpec, hint: str = "") -> None:
    """Raise QuantkitError if the group size does not divide linear `name`'s input width."""
    if spec.group_size != -1 and width % spec.group_size:
        raise QuantkitError(
            f"group size {spec.group_size} does not divide the input width {width} of {name}; "
            f"choose a divisor or -1 (per-channel){hint}"
        )


def check_model(model: nn.Module, adapter: Adapter, spec: QuantSpec, lm_head: bool = False) -> None:
    """Fail fast, before any work, on settings or weights that cannot be quantized."""
    spec.validate()
    for index, layer in enumerate(adapter.decoder_layers(model)):
        check_layer(layer, index, adapter, spec)
    if lm_head:
        check_head(model, adapter, spec)


def check_head(model: nn.Module, adapter: Adapter, spec: QuantSpec) -> None:
    """Raise QuantkitError if lm_head cannot be quantized on its own (tied to the embeddings, bad width)."""
    head, embeddings = get_module(model, adapter.lm_head).weight, get_module(model, adapter.embeddings).weight
    # identity, or shared storage where a loader re-created the tied parameters
    if head is embeddings or head.untyped_storage().data_ptr() == embeddings.untyped_storage().data_ptr():
        raise QuantkitError(
            f"{adapter.lm_head} shares its weight with the input embeddings (tied word embeddings), so it cannot "
            "be quantized on its own; leave it in full precision"
        )
    check_group_width(head.shape[1], adapter.lm_head, spec)
