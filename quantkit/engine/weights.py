"""Token weights as the engine sees them: one set per layer, optionally per linear and per output-row group.

A token-weight source is a callable `layer -> weights`. The weights of a layer are either a plain
sequence of per-sample tensors [T] (every linear of the layer uses them), or a LayerWeights with
the layer-output weights and per-linear overrides. A per-linear override is [T] (one weight per
token) or [T, g]: g groups of the linear's output rows, each with its own weighted Hessian
X^T diag(w_k) X (a block-diagonal Fisher, GuidedQuant arXiv 2505.07004). Rows are cut into g
contiguous groups, group k holding rows [k * out // g, (k + 1) * out // g).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class LayerWeights:
    """A layer's token weights: per sample for the layer output, and per-linear overrides."""

    output: list[torch.Tensor]
    linears: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    groups: dict[str, int] = field(default_factory=dict)  # output-row groups of a [T, g] override
    floor: float | None = None  # the floor lam every weight includes, for the diagnosis
    # output-side factors by linear: [blocks, b, b] (GPTQ's row metric, quantkit.quant.gptq)
    row_metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    # every token weighs 1 (TLQ with lam 1 on unpadded samples): the Hessians are the plain ones, summed as such
    uniform: bool = False

    def for_linear(self, name: str) -> list[torch.Tensor]:
        """The per-sample weights linear `name` is solved with."""
        return self.linears.get(name, self.output)

    def groups_of(self, name: str) -> int:
        """How many output-row groups linear `name`'s weights have (1: one weight per token)."""
        return self.groups.get(name, 1) if name in self.linears else 1

    def map(self, transform: Callable[[list[torch.Tensor]], list[torch.Tensor]]) -> LayerWeights:
        """The same weights with `transform` applied to every per-sample list (sharding, batching)."""
        mapped = {}
        for name, per_sample in self.linears.items():
            # linears that share one list keep sharing it (they then share an accumulator)
            same = next((other for other in mapped if self.linears[other] is per_sample), None)
            mapped[name] = mapped[same] if same is not None else transform(per_sample)
        return LayerWeights(transform(self.output), mapped, dict(self.groups), self.floor, dict(self.row_metrics),
                            self.uniform)


# token_weights(layer_index) -> the layer's weights (a per-sample sequence, or LayerWeights).
TokenWeights = Callable[[int], "Sequence[torch.Tensor] | LayerWeights"]


def as_layer_weights(weights: Sequence[torch.Tensor] | LayerWeights) -> LayerWeights:
    """LayerWeights of a plain per-sample sequence (no overrides), or the LayerWeights itself."""
    return weights if isinstance(weights, LayerWeights) else LayerWeights(list(weights))


def row_ranges(out_features: int, groups: int) -> list[tuple[int, int]]:
    """The output-row ranges [start, end) of `groups` contiguous groups of `out_features` rows."""
    return [(k * out_features // groups, (k + 1) * out_features // groups) for k in range(groups)]


def diagnose(weights: Sequence[torch.Tensor], floor: float | None = None, groups: int = 1) -> dict:
    """How concentrated token weights are: the effective sample size (sum w)^2 / sum w^2 as a share
    of tokens, the share of the total weight on the top 1% of tokens, and (given the floor lam)
    how many tokens carry the floor only (gradient part under 1e-3 of the mean). [T, g] weights are
    read per group and averaged (groups > 1)."""
    flat = torch.cat([w.reshape(-1, groups) for w in weights]).double()
    tokens = flat.shape[0]
    total = flat.sum(dim=0)
    ess = total.square() / flat.square().sum(dim=0).clamp_min(1e-300) / tokens
    top = max(1, math.ceil(0.01 * tokens))
    top_share = flat.topk(top, dim=0).values.sum(dim=0) / total.clamp_min(1e-300)
    report = {
        "tokens": tokens,
        "ess_share": round(float(ess.mean()), 4),
        "top1pct_weight_share": round(float(top_share.mean()), 4),
    }
    if flat.shape[1] > 1:
        report["row_groups"] = flat.shape[1]
    if floor is not None:
        # w = (1 - lam) s / mean(s) + lam: a gradient part below 1e-3 of the mean is floor only
        floor_only = (flat <= floor + 1e-3 * (1.0 - floor)) & (flat > 0)
        report["floor_only_tokens"] = int(floor_only.sum(dim=0).double().mean().round())
        report["dropped_tokens"] = int((flat == 0).sum(dim=0).double().mean().round())
    return report


def diagnose_layer(weights: LayerWeights, linear_names: Sequence[str]) -> dict[str, dict]:
    """diagnose() for every linear of a layer, each on the weights it is solved with."""
    cache: dict[int, dict] = {}
    out = {}
    for name in linear_names:
        chosen = weights.for_linear(name)
        if id(chosen) not in cache:
            cache[id(chosen)] = diagnose(chosen, weights.floor, weights.groups_of(name))
        out[name] = cache[id(chosen)]
    return out
