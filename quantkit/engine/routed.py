"""Routed linears (a mixture-of-experts layer's expert projections): each call carries a subset of the layer's
tokens, named by the linear's `routed_tokens` (quantkit.models.experts). The engine weighs an expert's Hessian
with those tokens' weights, fits it to the FP model's output on those tokens, and counts them.

The FP target needs the FP model's input to an expert on the tokens the quantized stream routes to it, which
the FP stream's own routing does not give (it routes differently). RoutedFPInputs keeps what it needs instead:
the FP stream's input to each experts module, per batch, and the experts' FP gate / up weights, so the FP input
of any expert projection on any tokens is computed when it is asked for (gate / up: the FP hidden state;
down: the FP expert's activation on it).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from quantkit.engine.comm import Comm
from quantkit.models.experts import (
    ExpertLinear,
    RoutedExperts,
    expert_of,
    routed_experts,
    set_all_tokens,
)

logger = logging.getLogger(__name__)


def routed_tokens(module: nn.Module) -> torch.Tensor | None:
    """The flat token indices of a routed linear's current call (None for an ordinary linear)."""
    return getattr(module, "routed_tokens", None)


def is_routed(layer: nn.Module, name: str) -> bool:
    """Whether linear `name` of `layer` is an expert projection."""
    return isinstance(layer.get_submodule(name), ExpertLinear)


def rows_of(weight: torch.Tensor | None, tokens: torch.Tensor | None, groups: int) -> torch.Tensor | None:
    """A batch's token weights ([tokens] or [tokens, groups]) restricted to `tokens` (all for None)."""
    if weight is None or tokens is None:
        return weight
    return weight.reshape(-1, groups)[tokens.to(weight.device)]


def row_samples(x: torch.Tensor, tokens: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor | None:
    """The sample of each row of a linear's input `x` where its rows mix the batch's samples (None where each
    sample is its own slice): an expert's routed tokens, or a block that flattens the batch ([B * T, in], as
    MoE blocks do for their shared experts). The accumulator then sums one product per sample, so a Hessian
    does not depend on how samples are batched or spread over ranks."""
    per_sample = hidden.shape[-2]
    if tokens is not None:
        return torch.div(tokens, per_sample, rounding_mode="floor")
    rows = hidden.numel() // hidden.shape[-1]
    if x.dim() == 2 and x.shape[0] == rows and rows > per_sample:
        return torch.arange(rows, device=x.device) // per_sample
    return None


class ExpertRows:
    """How an expert projection's rows weigh in its Hessian under EXPERT_TOKENS[kind] (quantkit.quant.methods).

    "routed" and "all": every row the call carries weighs 1 (all: the experts run every token). "mix" (every token,
    ExpertLinear.chosen_rows marking the routed ones): a routed token weighs 1 and every token a further
    in_features / total, total being the layer's calibration tokens over all ranks, so the Hessian is the routed
    tokens' sum plus the every-token mean counted as in_features tokens: a prior of as many tokens as a full-rank
    Hessian needs, which dominates for an expert the router rarely picks and fades for one it picks often.
    `prior` scales that count (Method.expert_prior): prior x in_features tokens."""

    def __init__(self, kind: str = "routed", total: int = 0, prior: float = 1.0) -> None:
        self.kind, self.total, self.prior = kind, total, prior

    @classmethod
    def start(cls, layer: nn.Module, kind: str, inputs, comm: Comm, prior: float = 1.0) -> ExpertRows:
        """A layer's weighing, its experts set to run every token for their statistics unless `kind` is routed."""
        set_all_tokens(layer, kind != "routed")
        if kind != "mix":
            return cls(kind)
        count = torch.tensor([float(sum(h.numel() // h.shape[-1] for h in inputs.hidden))], dtype=torch.float64)
        comm.all_reduce_sum_(count)
        return cls(kind, int(count.item()), prior)

    def key(self, module: nn.Module) -> torch.Tensor | None:
        """What two linears reading one tensor must share to share their sums: under mix an expert's routed rows."""
        return getattr(module, "chosen_rows", None) if self.kind == "mix" else None

    def weigh(self, module: nn.Module, weight: torch.Tensor | None) -> torch.Tensor | None:
        """The call's row weights `weight` ([rows] or [rows, groups]; None: all 1) times the rows' own."""
        chosen = self.key(module)
        if chosen is None:
            return weight
        prior = chosen.to(torch.float32) + self.prior * module.in_features / self.total
        return prior if weight is None else weight * prior.reshape(-1, *(1,) * (weight.dim() - 1))


ROUTED = ExpertRows()  # every row weighs 1


def fp_rows(entry: torch.Tensor | Path | RoutedFPEntry, tokens: torch.Tensor | None) -> torch.Tensor:
    """A linear's FP input on one batch (kept in memory or in a file), or an expert projection's on `tokens`."""
    if isinstance(entry, RoutedFPEntry):
        return entry.rows(tokens)
    return torch.load(entry, weights_only=True) if isinstance(entry, Path) else entry


class RoutedFPEntry:
    """The FP input of one expert projection on one batch, for whichever tokens are asked."""

    def __init__(self, owner: RoutedFPInputs, container: str, expert: int, projection: str, batch: int) -> None:
        self.owner, self.container, self.expert, self.projection, self.batch = owner, container, expert, projection, batch

    def rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """The FP model's input to this projection on the layer's flat tokens `tokens`."""
        return self.owner.fp_rows(self.container, self.expert, self.projection, self.batch, tokens)


class RoutedFPInputs:
    """The FP stream's inputs to a layer's experts modules and the experts' FP weights (see the module doc)."""

    def __init__(self, layer: nn.Module, keep: Callable[[torch.Tensor], torch.Tensor | Path]) -> None:
        self.containers = dict(routed_experts(layer))
        # an FP copy of every expert's weights: the live ones are quantized group by group
        self.fp_experts = {name: copy.deepcopy(experts) for name, experts in self.containers.items()}
        self.inputs: dict[str, list[torch.Tensor | Path]] = {name: [] for name in self.containers}
        self.scales: dict[str, list[torch.Tensor | None]] = {name: [] for name in self.containers}
        self.keep = keep

    def hooks(self) -> list:
        """Pre-hooks keeping each experts module's input per batch while the FP stream runs the layer."""
        handles = []
        for name, experts in self.containers.items():
            def grab(module: nn.Module, args: tuple, name: str = name) -> None:
                self.inputs[name].append(self.keep(args[0].reshape(-1, args[0].shape[-1])))  # flat tokens (DBRX: [B, T, H])
                # scaled-input experts (Llama 4): each expert's input scale on every token
                every = args[3] if len(args) > 3 else None
                self.scales[name].append(None if every is None else every.detach().cpu())
            handles.append(experts.register_forward_pre_hook(grab))
        return handles

    def entries(self, layer_linear: str, batches: int) -> list[RoutedFPEntry]:
        """Per-batch FP entries of expert projection `layer_linear` (its name inside the layer)."""
        container, expert = expert_of(layer_linear)
        projection = layer_linear.rsplit(".", 1)[1]
        return [RoutedFPEntry(self, container, expert, projection, b) for b in range(batches)]

    def fp_rows(self, container: str, expert: int, projection: str, batch: int, tokens: torch.Tensor) -> torch.Tensor:
        """The FP input of `projection` of expert `expert` on `tokens` of batch `batch`."""
        entry = self.inputs[container][batch]
        hidden = torch.load(entry, weights_only=True) if isinstance(entry, Path) else entry
        fp = self.fp_experts[container]
        x = hidden[tokens.to(hidden.device)]
        scale = self.scales[container][batch]
        if scale is not None:
            x = x * scale[tokens.cpu(), expert, None].to(x.device, x.dtype)
        module = fp[expert]
        names = module.names
        if projection != names.down:
            return x
        fp_device = next(module.parameters()).device
        x = x.to(fp_device)
        gate = getattr(module, names.gate)(x) if names.gate is not None else None
        return fp._activate(gate, getattr(module, names.up)(x))

    def close(self) -> None:
        """Remove the files the inputs were kept in (--offload-dir)."""
        for entries in self.inputs.values():
            for entry in entries:
                if isinstance(entry, Path):
                    entry.unlink(missing_ok=True)
        self.inputs.clear()


def start_counting(layer: nn.Module) -> None:
    """Count each expert's routed tokens from now on (from zero)."""
    for _, experts in routed_experts(layer):
        experts.routed_counts = torch.zeros(experts.num_experts, dtype=torch.int64)


def stop_counting(layer: nn.Module) -> dict[str, torch.Tensor]:
    """Routed tokens per expert of every experts module since start_counting (this rank's); counting stops."""
    out = {}
    for name, experts in routed_experts(layer):
        counts = experts.routed_counts
        out[name] = torch.zeros(experts.num_experts, dtype=torch.int64) if counts is None else counts
        experts.routed_counts = None
    return out


class ExpertTally:
    """A layer's experts while it is solved: the tokens routed to each expert (counted in the pass of the last group
    holding experts, where the router reads its final inputs), each expert projection's Hessian tokens, and the
    projections no calibration token reached (rounded to nearest instead); sums over ranks, so ranks agree."""

    def __init__(self, layer: nn.Module, names: Sequence[str], groups: Sequence[Sequence[str]]) -> None:
        self.layer = layer
        self.routed = {name for name in names if is_routed(layer, name)}
        self.counted_group = max((i for i, g in enumerate(groups) if self.routed.intersection(g)), default=None)
        self.counts: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}

    def start(self, group_index: int) -> None:
        """Before group `group_index`'s statistics pass."""
        if group_index == self.counted_group:
            start_counting(self.layer)

    def finish(self, group_index: int, accumulators: dict, names: Sequence[str], comm: Comm) -> set[str]:
        """After the pass: the group's expert projections that no calibration token reached (on every rank)."""
        if group_index == self.counted_group:
            self.counts = stop_counting(self.layer)
            for count in self.counts.values():
                comm.all_reduce_sum_(count)
        here = [name for name in names if name in self.routed]
        if not here:
            return set()
        seen = torch.tensor([float(accumulators[name].tokens) for name in here], dtype=torch.float64)
        comm.all_reduce_sum_(seen)
        self.tokens.update((name, int(t)) for name, t in zip(here, seen.tolist()))
        return {name for name in here if self.tokens[name] == 0}

    def annotate(self, name: str, entry: dict, prefix: str) -> None:
        """Add a projection's Hessian tokens to its report entry; say so where it was rounded to nearest."""
        if name not in self.tokens:
            return
        entry["hessian_tokens"] = self.tokens[name]
        if self.tokens[name] == 0:
            entry["solved_by"] = "rtn"
            logger.warning("%s.%s: no calibration token reached this expert; rounded to nearest (RTN). "
                           "More calibration data or --expert-tokens mix or all gives it statistics", prefix, name)

    def report(self, reports: dict[str, dict]) -> None:
        """Add each expert projection's routed tokens to the layer's report entries."""
        for name in self.routed.intersection(reports):
            container, expert = expert_of(name)
            if container in self.counts:
                reports[name]["routed_tokens"] = int(self.counts[container][expert])


__all__ = [
    "ExpertTally",
    "RoutedExperts",
    "RoutedFPEntry",
    "RoutedFPInputs",
    "ExpertRows",
    "ROUTED",
    "fp_rows",
    "is_routed",
    "start_counting",
    "stop_counting",
    "routed_tokens",
    "row_samples",
    "rows_of",
]
