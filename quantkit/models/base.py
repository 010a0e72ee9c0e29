"""Architecture adapters: where a family keeps its decoder layers and which linears to solve."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Fold:
    """Where smoothing scales of some linears' input can be folded (quantkit.quant.smooth): `source`, a
    norm whose output is that input or a linear whose output rows are, and the `linears` reading it.
    A linear source is used only where its output width equals the readers' input width (attention
    v -> o with as many key/value heads as query heads); otherwise the fold is skipped."""

    source: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class Adapter:
    """Declarative description of one model family.

    Paths are dotted attribute paths from the loaded *ForCausalLM / *ForConditionalGeneration
    module. `linear_order` lists a decoder layer's linears in groups, in execution order: each
    group is solved after the groups before it are quantized, so it sees their outputs.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    embeddings: str
    final_norm: str
    lm_head: str
    linear_order: tuple[tuple[str, ...], ...]
    vision: tuple[str, ...] = ()  # vision tower and projector: kept in full precision
    extra_fp: tuple[str, ...] = field(default=())  # other non-layer modules, for reports only
    smooth_folds: tuple[Fold, ...] = ()  # legal smoothing folds inside a decoder layer, in solve order

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The ModuleList of decoder layers."""
        return get_module(model, self.layers)

    def linear_names(self) -> list[str]:
        """All quantized linears of one layer, in solve order."""
        return [name for group in self.linear_order for name in group]

    def layer_prefix(self, index: int) -> str:
        """Module-name prefix of decoder layer `index` inside the full model."""
        return f"{self.layers}.{index}"


def get_module(root: nn.Module, path: str) -> nn.Module:
    """Resolve a dotted attribute path; raise AttributeError naming the missing part."""
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


def layer_output(output: object) -> torch.Tensor:
    """Decoder layers return a tensor or a tuple whose first item is the hidden state."""
    if isinstance(output, (tuple, list)):
        return output[0]
    return output
