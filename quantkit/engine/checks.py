"""Checks before any work: settings and weights that cannot be quantized fail fast with one clear error."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from quantkit.engine.plan import LinearPlan
from quantkit.errors import QuantkitError
from quantkit.models import get_module
from quantkit.models.base import Adapter
from quantkit.models.experts import RoutedExperts
from quantkit.quant.spec import QuantSpec


def check_layer(layer: nn.Module, index: int, adapter: Adapter, plan: LinearPlan) -> None:
    """Raise QuantkitError if a linear of decoder layer `index` that `plan` quantizes cannot be quantized."""
    for name in adapter.linear_names(index):
        linear = get_module(layer, name)
        full = f"{adapter.layer_prefix(index)}.{name}"
        if plan.settings(full) is None:
            continue  # left in full precision: nothing to check
        check_group_width(linear.in_features, full, plan.spec_for(full))
        if linear.weight.device.type != "meta" and not torch.isfinite(linear.weight).all():
            raise QuantkitError(f"weight of {full} contains NaN or Inf; fix the checkpoint before quantizing")


def check_experts(model: nn.Module, adapter: Adapter) -> None:
    """Raise QuantkitError naming the first mixture-of-experts block whose experts are not per-expert linears
    (quantkit.models.experts.RoutedExperts: what unfuse_experts makes of transformers' fused experts)."""
    for index in range(len(adapter.decoder_layers(model))):
        for block in adapter.layout(index).experts:
            container = get_module(adapter.decoder_layers(model)[index], block.experts)
            if not isinstance(container, RoutedExperts):
                raise QuantkitError(
                    f"{adapter.layer_prefix(index)}.{block.experts} holds experts as {type(container).__name__} "
                    f"(forward{_parameters(container)}), which quantkit cannot split into per-expert linears routed "
                    "token by token"
                )


def _parameters(module: nn.Module) -> str:
    """The parameters of `module`'s forward, as the message names its call."""
    try:
        return f"({', '.join(inspect.signature(module.forward).parameters)})"
    except (TypeError, ValueError):
        return "(...)"


def check_group_width(width: int, name: str, spec: QuantSpec, hint: str = "") -> None:
    """Raise QuantkitError if the group size does not divide linear `name`'s input width."""
    if spec.group_size != -1 and width % spec.group_size:
        raise QuantkitError(
            f"group size {spec.group_size} does not divide the input width {width} of {name}; "
            f"choose a divisor or -1 (per-channel){hint}"
        )


def check_model(model: nn.Module, adapter: Adapter, plan: LinearPlan, lm_head: bool = False,
                vision: bool = False) -> None:
    """Fail fast, before any work, on settings, a recipe or weights that cannot be quantized."""
    plan.spec.validate()
    if vision and not adapter.vision:
        raise QuantkitError(f"{adapter.name} models have no vision side to quantize; drop --quantize-vision")
    check_experts(model, adapter)
    plan.check(candidate_linears(model, adapter, lm_head=lm_head, vision=vision), model_linears(model))
    for index, layer in enumerate(adapter.decoder_layers(model)):
        check_layer(layer, index, adapter, plan)
    if lm_head and plan.settings(adapter.lm_head) is not None:
        check_head(model, adapter, plan.spec_for(adapter.lm_head))


def candidate_linears(model: nn.Module, adapter: Adapter, *, lm_head: bool = False, vision: bool = False) -> dict[str, int]:
    """The linears a run may quantize, name -> input width: every decoder-layer linear, lm_head with
    `lm_head`, every linear of the vision side with `vision` (a recipe's targets and ignore pick among them)."""
    widths = {}
    for index, layer in enumerate(adapter.decoder_layers(model)):
        for name in adapter.linear_names(index):
            widths[f"{adapter.layer_prefix(index)}.{name}"] = get_module(layer, name).in_features
    if lm_head:
        widths[adapter.lm_head] = get_module(model, adapter.lm_head).weight.shape[1]
    if vision and adapter.vision:
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and any(name == p or name.startswith(p + ".") for p in adapter.vision):
                widths[name] = module.in_features
    return widths


def model_linears(model: nn.Module) -> list[str]:
    """The names of every nn.Linear of `model` (an ignore pattern may name one the run would not quantize)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def check_head(model: nn.Module, adapter: Adapter, spec: QuantSpec) -> None:
    """Raise QuantkitError if lm_head cannot be quantized on its own (tied to the embeddings, bad width)."""
    head, embeddings = get_module(model, adapter.lm_head).weight, get_module(model, adapter.embeddings).weight
    # identity, or shared storage where a loader re-created the tied parameters
    # (a meta tensor's storage is at 0 for all: there identity alone says tied, as from_config ties them)
    if head is embeddings or (head.device.type != "meta"
                              and head.untyped_storage().data_ptr() == embeddings.untyped_storage().data_ptr()):
        raise QuantkitError(
            f"{adapter.lm_head} shares its weight with the input embeddings (tied word embeddings), so it cannot "
            "be quantized on its own; leave it in full precision"
        )
    check_group_width(head.shape[1], adapter.lm_head, spec)
