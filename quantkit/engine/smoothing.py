"""Smoothing one decoder layer before it is quantized: statistics from the quantized stream, a searched
alpha per fold (quantkit.quant.smooth), the scales folded into the layer's norms and linears.

The folds a family allows come from its adapter (Adapter.smooth_folds). Smoothing alone leaves the FP
layer's output unchanged up to rounding, so the FP stream and the FP target need nothing from it:
they are recorded after it, on the smoothed layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from quantkit.engine.capture import LayerInputs, run_layer
from quantkit.engine.comm import Comm
from quantkit.engine.weights import LayerWeights
from quantkit.errors import QuantkitError
from quantkit.models.base import Adapter, Fold, get_module
from quantkit.quant.presolve import PreSolve
from quantkit.quant.smooth import divide_rows, fold_error, scale_columns, search_alpha
from quantkit.quant.spec import QuantSpec

# Tokens kept per fold for the alpha search (about one in k of the stream, the same tokens for any
# number of ranks); the channel maxima read every token.
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


def entry_tokens(inputs: LayerInputs, sample_ids: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per entry of `inputs`: the (global sample id, position) of each of its token rows, in the
    order a linear's input [batch, tokens, width] reshapes them to rows."""
    out, start = [], 0
    for hidden in inputs.hidden:
        batch, length = hidden.shape[0], hidden.shape[-2]
        ids = torch.as_tensor(list(sample_ids[start : start + batch]), dtype=torch.int64)
        out.append((ids.repeat_interleave(length), torch.arange(length, dtype=torch.int64).repeat(batch)))
        start += batch
    return out


@torch.no_grad()
def fold_statistics(layer: nn.Module, folds: list[Fold], inputs: LayerInputs, weights: LayerWeights | None,
                    max_tokens: int = SEARCH_TOKENS, comm: Comm | None = None,
                    sample_ids: Sequence[int] | None = None) -> dict[str, dict]:
    """Per fold: every channel's max |x| over all tokens of all ranks, and the input rows (with their
    token weights) of the tokens kept for the search; one pass of the (still FP) layer.

    `inputs` holds this rank's samples, whose indices in the whole calibration set are `sample_ids`
    (default: 0, 1, ...). The kept tokens are those with (sample id + position) divisible by a stride
    fixed by the total token count, gathered from every rank and ordered by (sample, position): the
    search sees the same rows whatever the number of ranks."""
    comm = comm or Comm()
    sample_ids = range(sum(h.shape[0] for h in inputs.hidden)) if sample_ids is None else sample_ids
    tokens = entry_tokens(inputs, sample_ids)
    total = torch.tensor([float(sum(ids.numel() for ids, _ in tokens))], dtype=torch.float64)
    comm.all_reduce_sum_(total)
    stride = max(1, math.ceil(float(total) / max_tokens))
    keep = [(ids + positions) % stride == 0 for ids, positions in tokens]
    keys = [(ids * 2**32 + positions)[mask] for (ids, positions), mask in zip(tokens, keep)]
    stats: dict[str, dict] = {fold.source: {"absmax": None, "rows": [], "weights": []} for fold in folds}
    batch = {"index": 0}

    def make_hook(fold: Fold):
        def hook(module: nn.Module, args: tuple) -> None:
            entry, index = stats[fold.source], batch["index"]
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            top = x.abs().amax(dim=0)
            entry["absmax"] = top if entry["absmax"] is None else torch.maximum(entry["absmax"], top)
            entry["rows"].append(x[keep[index].to(x.device)].cpu())
            if weights is not None:
                w = weights.for_linear(fold.linears[0])[index].float()
                entry["weights"].append(w.reshape(x.shape[0], -1).mean(dim=1)[keep[index].to(w.device)].cpu())
        return hook

    handles = [get_module(layer, fold.linears[0]).register_forward_pre_hook(make_hook(fold)) for fold in folds]
    try:
        for index in range(len(inputs)):
            batch["index"] = index
            run_layer(layer, inputs, index)
    finally:
        for handle in handles:
            handle.remove()
    mine = torch.cat(keys)
    for entry in stats.values():
        comm.all_reduce_max_(entry["absmax"])
        local = (mine, torch.cat(entry["rows"]), torch.cat(entry["weights"]) if entry["weights"] else None)
        parts = comm.gather_objects(local)
        order = torch.argsort(torch.cat([part[0] for part in parts]), stable=True)
        entry["rows"] = torch.cat([part[1] for part in parts])[order]
        entry["weights"] = None if weights is None else torch.cat([part[2] for part in parts])[order]
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
                 weights: LayerWeights | None = None, max_tokens: int = SEARCH_TOKENS, *, comm: Comm | None = None,
                 sample_ids: Sequence[int] | None = None) -> dict:
    """Smooth a decoder layer in place: for each legal fold, the grid alpha with the least (token-weighted)
    output error under weight rounding and activation quantization, folded in; return what was chosen.
    With ranks (`comm`, this rank's `sample_ids`), every rank searches the same rows and folds the same scales."""
    folds, skipped = legal_folds(layer, adapter)
    stats = fold_statistics(layer, folds, inputs, weights, max_tokens, comm, sample_ids)
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


@dataclass(frozen=True)
class Smoothing(PreSolve):
    """The smoothing pre-solve step (smooth_layer on every decoder layer); its options: the token weights of the
    alpha search (uniform, or TLQ's importance) and how many tokens it keeps."""

    weights: str = "uniform"  # uniform | tlq
    max_tokens: int = SEARCH_TOKENS
    name: ClassVar[str] = "smoothing"

    def __post_init__(self) -> None:
        if self.weights not in ("uniform", "tlq"):
            raise QuantkitError(f"smoothing weighs tokens uniformly or by TLQ's importance (uniform, tlq), "
                                f"got {self.weights!r}")

    @property
    def token_weights(self) -> bool:
        """TLQ-weighted smoothing reads the run's token weights."""
        return self.weights == "tlq"

    def check(self, method: Any) -> None:
        """The token weights a run is given weigh its solve too: TLQ-weighted smoothing goes with a method that
        weighs tokens (or one that reads no activations)."""
        if self.token_weights and method.needs_activations and not method.token_weights:
            raise QuantkitError(f"--smooth tlq weighs tokens as TLQ does, and {method} solves unweighted; "
                                "pass --method tlq (or rtn), or --smooth uniform")

    def apply(self, layer: nn.Module, adapter: Adapter, inputs: LayerInputs, spec: QuantSpec,
              weights: LayerWeights | None, *, comm: Comm, sample_ids: Sequence[int]) -> dict:
        """smooth_layer with this step's token weights and token budget."""
        return smooth_layer(layer, adapter, inputs, spec, weights if self.token_weights else None, self.max_tokens,
                            comm=comm, sample_ids=sample_ids)

    def to_dict(self) -> dict:
        """The step and its options."""
        return {"name": self.name, "weights": self.weights, "max_tokens": self.max_tokens}
