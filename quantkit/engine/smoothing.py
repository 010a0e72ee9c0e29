"""Smoothing one decoder layer before it is quantized: statistics from the quantized stream, a searched
alpha per fold (quantkit.quant.smooth), the scales folded into the layer's norms and linears.

The folds a family allows come from its adapter (Adapter.smooth_folds). Smoothing alone leaves the FP
layer's output unchanged up to rounding, so the FP stream and the FP target need nothing from it:
they are recorded after it, on the smoothed layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from quantkit.engine.capture import LayerInputs, run_layer
from quantkit.engine.weights import LayerWeights
from quantkit.models.base import Adapter, Fold, get_module
from quantkit.quant.smooth import divide_rows, fold_error, scale_columns, search_alpha
from quantkit.quant.spec import QuantSpec

# Tokens kept per fold for the alpha search (every k-th token of the stream); the channel maxima
# read every token.
SEARCH_TOKENS = 4096


def legal_folds(layer: nn.Module, adapter: Adapter) -> tuple[list[Fold], list[str]]:
    """The adapter's folds this layer's shapes allow, and a note for each one skipped."""
    legal, skipped = [], []
    for fold in adapter.smooth_folds:
        source = get_module(layer, fold.source)
        width = {get_module(layer, name).in_features for name in fold.linears}
        if len(width) != 1:
            skipped.append(f"{fold.source}: its linears read inputs of different widths")
            continue
        (width,) = width
        if isinstance(source, nn.Linear):
            if source.out_features != width:
                skipped.append(f"{fold.source} -> {', '.join(fold.linears)}: {source.out_features} output rows do not "
                               f"map one to one onto {width} input columns (grouped key/value heads)")
                continue
        elif getattr(source, "weight", None) is None or source.weight.numel() != width:
            skipped.append(f"{fold.source}: not a norm with one weight per channel of width {width}")
            continue
        legal.append(fold)
    return legal, skipped


@torch.no_grad()
def fold_statistics(layer: nn.Module, folds: list[Fold], inputs: LayerInputs, weights: LayerWeights | None,
                    max_tokens: int = SEARCH_TOKENS) -> dict[str, dict]:
    """Per fold: every channel's max |x| over all tokens of `inputs`, and every k-th token's input row
    (with its token weight) for the search; one pass of the (still FP) layer."""
    total = sum(h.numel() // h.shape[-1] for h in inputs.hidden)
    stride = max(1, math.ceil(total / max_tokens))
    stats: dict[str, dict] = {fold.source: {"absmax": None, "rows": [], "weights": []} for fold in folds}
    batch = {"index": 0}

    def make_hook(fold: Fold):
        def hook(module: nn.Module, args: tuple) -> None:
            entry = stats[fold.source]
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            top = x.abs().amax(dim=0)
            entry["absmax"] = top if entry["absmax"] is None else torch.maximum(entry["absmax"], top)
            entry["rows"].append(x[::stride].cpu())
            if weights is not None:
                w = weights.for_linear(fold.linears[0])[batch["index"]].float()
                entry["weights"].append(w.reshape(x.shape[0], -1).mean(dim=1)[::stride].cpu())
        return hook

    handles = [get_module(layer, fold.linears[0]).register_forward_pre_hook(make_hook(fold)) for fold in folds]
    try:
        for index in range(len(inputs)):
            batch["index"] = index
            run_layer(layer, inputs, index)
    finally:
        for handle in handles:
            handle.remove()
    for entry in stats.values():
        entry["rows"] = torch.cat(entry["rows"])
        entry["weights"] = torch.cat(entry["weights"]) if entry["weights"] else None
    return stats


@torch.no_grad()
def apply_fold(layer: nn.Module, fold: Fold, scales: torch.Tensor) -> None:
    """Divide `fold.source`'s output (norm weight and bias, or linear rows and bias) by `scales` and
    multiply its readers' input columns by them."""
    source = get_module(layer, fold.source)
    for param in (source.weight, getattr(source, "bias", None)):
        if param is not None:
            param.data.copy_(divide_rows(_wide(param.data), scales).to(param.dtype))
    for name in fold.linears:
        linear = get_module(layer, name)
        linear.weight.data.copy_(scale_columns(_wide(linear.weight.data), scales).to(linear.weight.dtype))


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """float32 at least (bf16/fp16 weights are scaled in float32, float64 ones stay float64)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def smooth_layer(layer: nn.Module, adapter: Adapter, inputs: LayerInputs, spec: QuantSpec,
                 weights: LayerWeights | None = None, max_tokens: int = SEARCH_TOKENS) -> dict:
    """Smooth a decoder layer in place: for each legal fold, the grid alpha with the least (token-weighted)
    output error under weight rounding and activation quantization, folded in; return what was chosen."""
    folds, skipped = legal_folds(layer, adapter)
    stats = fold_statistics(layer, folds, inputs, weights, max_tokens)
    report: dict = {"folds": {}, "skipped": skipped}
    for fold in folds:
        entry = stats.pop(fold.source)
        linears = [get_module(layer, name).weight.data for name in fold.linears]
        alpha, scales, errors = search_alpha(entry["rows"], entry["absmax"].cpu(), [w.cpu() for w in linears],
                                             spec.bits, spec.act_bits, entry["weights"])
        unsmoothed = fold_error(entry["rows"], [w.cpu() for w in linears], torch.ones_like(scales), spec.bits,
                                spec.act_bits, entry["weights"])
        apply_fold(layer, fold, scales)
        report["folds"][fold.source] = {"alpha": alpha, "error": errors[alpha], "error_unsmoothed": unsmoothed,
                                        "tokens": int(entry["rows"].shape[0])}
    return report
