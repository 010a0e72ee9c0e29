"""What the engine knows about a model (Adapter): where its decoder layers are and which linears each one
solves; and what a family file may add to what quantkit.models.discover derives (Family)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

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
class ExpertBlock:
    """A mixture-of-experts block inside a decoder layer (paths relative to the layer): the block holding
    the router and the experts, the experts' container (a ModuleList of expert MLPs or a module with 3-D
    fused weights), the router (None where the block computes it without a module of its own), and
    `position`: the block runs after the first `position` linear groups of the layer."""

    block: str
    experts: str
    router: str | None
    position: int


@dataclass(frozen=True)
class LayerLayout:
    """One decoder layer's linears as the engine solves them: `groups` in execution order, each group the
    linears reading one input tensor (they share one Hessian); `experts`, the mixture-of-experts blocks left
    to the MoE path; `full_precision`, every other weight of the layer that is not quantized, with why."""

    groups: tuple[tuple[str, ...], ...]
    experts: tuple[ExpertBlock, ...] = ()
    full_precision: tuple[tuple[str, str], ...] = ()

    def linear_names(self) -> list[str]:
        """The layer's quantized linears, in solve order."""
        return [name for group in self.groups for name in group]


@dataclass(frozen=True)
class Family:
    """What a family file adds to the derived adapter: the model types it covers, the smoothing folds its
    layers allow (`smooth_folds`, each checked against the FP logits in tests/test_smooth.py) and, where
    derivation would get it wrong, the vision modules."""

    name: str
    model_types: tuple[str, ...]
    smooth_folds: tuple[Fold, ...] = ()
    vision: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Adapter:
    """Where a model keeps what the engine needs, as dotted paths from the loaded *ForCausalLM /
    *ForConditionalGeneration module, and each decoder layer's LayerLayout (`layouts`, one per layer;
    layers of one structure share one). Built by quantkit.models.discover from the model itself."""

    name: str
    model_types: tuple[str, ...]
    layers: str
    embeddings: str
    final_norm: str | None  # None: the last layer's output goes to the head as it is
    lm_head: str
    layouts: tuple[LayerLayout, ...]
    vision: tuple[str, ...] = ()  # vision tower and projector: kept in full precision
    smooth_folds: tuple[Fold, ...] = ()  # legal smoothing folds inside a decoder layer, in solve order
    layer_output_items: int = 0  # 0: a decoder layer returns its hidden state; n: a tuple of n items, it first
    decoder: str = ""  # the module running the layers and the final norm (the base or text model)
    before_norm: tuple[str, ...] = ()  # modules run in this order between the last layer and the final norm (kept FP)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The ModuleList of decoder layers."""
        return get_module(model, self.layers)

    def norm(self, model: nn.Module) -> nn.Module:
        """What runs between the last decoder layer and the head: the final norm (an identity where the model has
        none), after the before_norm modules where there are any."""
        norm = nn.Identity() if self.final_norm is None else get_module(model, self.final_norm)
        if not self.before_norm:
            return norm
        return nn.Sequential(*(get_module(model, name) for name in self.before_norm), norm)

    def after_layers(self) -> tuple[str, ...]:
        """The modules that run after the last decoder layer, before the head, in order."""
        return (*self.before_norm, *((self.final_norm,) if self.final_norm else ()))

    def logits(self, model: nn.Module, normed: torch.Tensor) -> torch.Tensor:
        """The model's logits [B, T, V] from the final norm's output [B, T, d], as its own forward computes them
        after the text decoder (the head, then any scaling or soft-capping): the decoder's work is replaced by
        `normed` for one call."""
        if not self.decoder:
            return get_module(model, self.lm_head)(normed)
        decoder = get_module(model, self.decoder)
        decoder.forward = lambda *args, **kwargs: _decoder_output(normed)
        try:
            ids = torch.zeros(normed.shape[:2], dtype=torch.long, device=normed.device)
            return model(input_ids=ids, use_cache=False).logits
        finally:
            del decoder.forward

    def layout(self, index: int) -> LayerLayout:
        """Decoder layer `index`'s linears, groups, experts and full-precision weights."""
        return self.layouts[index]

    def linear_groups(self, index: int) -> tuple[tuple[str, ...], ...]:
        """Decoder layer `index`'s linears in groups, in execution order: each group is solved after the
        groups before it are quantized, so it sees their outputs."""
        return self.layouts[index].groups

    def linear_names(self, index: int) -> list[str]:
        """Decoder layer `index`'s quantized linears, in solve order."""
        return self.layouts[index].linear_names()

    def sub_names(self) -> list[str]:
        """Every layer-relative linear name of any layer, in first-solved order (for export layouts)."""
        seen: dict[str, None] = {}
        for layout in dict.fromkeys(self.layouts):
            seen.update(dict.fromkeys(layout.linear_names()))
        return list(seen)

    def layer_prefix(self, index: int) -> str:
        """Module-name prefix of decoder layer `index` inside the full model."""
        return f"{self.layers}.{index}"


@functools.cache
def _decoder_output_class() -> type:
    from transformers.modeling_outputs import BaseModelOutputWithPast

    @dataclass
    class DecoderOutput(BaseModelOutputWithPast):
        """A decoder's output holding its last hidden state; any other field a model's forward reads (router
        logits, caches) is None."""

        def __getattr__(self, name: str) -> None:
            if name.startswith("__"):
                raise AttributeError(name)
            return None

    return DecoderOutput


def _decoder_output(hidden: torch.Tensor) -> object:
    return _decoder_output_class()(last_hidden_state=hidden)


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
