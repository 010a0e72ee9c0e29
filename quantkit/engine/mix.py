"""TLQ's held-out mix guard: how much uniform weight each linear group's Hessian gets, chosen on held-out samples.

TLQ's token weights move the Hessians toward the tokens with large loss gradients. On text mixed from
several sources that can trade one kind of text for another: better on one source, worse on another,
level overall. The guard makes the trade visible to the solve and refuses it:

- A slice of the calibration samples (every k-th sample) is held out of the Hessians; it is carried
  through the layers beside the other samples, on the quantized path and on the FP path.
- For each linear group the engine sums two Hessians (and FP-target cross terms) in the same pass: one
  with TLQ's token weights, one uniform. A candidate mix with uniform share a is
  H(a) = (1 - a) H_tlq + a H_uniform (a = 1: GPTQ's Hessian; the weights of every sample average 1 in
  both, so the mix is TLQ's weight rule with the floor lam raised to lam + a (1 - lam)).
- Each candidate is solved and installed, and the layer runs on the held-out slice. Its error is the
  deviation of the layer output from the FP model's, measured with the layer's output-side factor
  G = E_t[g_t g_t^T] (quantkit.importance, output_factors): e_t^T G e_t, the Fisher's estimate of the
  loss the deviation costs, averaged over tokens. It weighs no token above another, so it does not
  favour the token-weighted solution by definition, nor the uniform one (which ignores G).
- Per source (sample["source_ids"], one id per token; one source when absent) the error of each
  candidate is divided by the uniform candidate's. The candidate with the lowest worst-source ratio wins
  (the mean ratio breaks ties): one that is worse than uniform on some source is never taken, so the
  weights cannot buy one source's quality with another's on the held-out slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from quantkit.data.samples import SOURCE_KEY
from quantkit.engine.capture import LayerInputs, run_layer
from quantkit.engine.comm import Comm
from quantkit.errors import QuantkitError


@dataclass(frozen=True)
class MixSearch:
    """Settings of the held-out mix guard."""

    shares: tuple[float, ...] = (0.0, 0.5, 1.0)  # candidate shares of uniform weight (1.0 is always tried)
    holdout: int = 8  # every holdout-th calibration sample is held out of the Hessians to choose on

    def check(self, nsamples: int) -> None:
        """Raise QuantkitError on settings that cannot work with `nsamples` samples."""
        if not self.shares or any(not 0.0 <= a <= 1.0 for a in self.shares):
            raise QuantkitError(f"mix shares must be in [0, 1], got {self.shares}")
        if self.holdout < 2:
            raise QuantkitError(f"the mix guard holds out every k-th sample for k >= 2, got {self.holdout}")
        if nsamples < self.holdout:
            raise QuantkitError(f"the mix guard holds out every {self.holdout}th sample: it needs at least "
                                f"{self.holdout} calibration samples, got {nsamples}")

    @property
    def candidates(self) -> tuple[float, ...]:
        """The shares tried, uniform (1.0) last: it is every source's reference."""
        return tuple(sorted(set(self.shares) - {1.0})) + (1.0,)

    def split(self, count: int) -> tuple[list[int], list[int]]:
        """(fit, held-out) sample indices: every holdout-th sample (the last of each run of holdout) is held out."""
        held = [i for i in range(count) if i % self.holdout == self.holdout - 1]
        return [i for i in range(count) if i % self.holdout != self.holdout - 1], held


def choose(errors: dict[float, torch.Tensor]) -> tuple[float, dict]:
    """The winning share from per-source held-out errors {share: [sources] float64} (share 1.0 included):
    the lowest worst-source ratio to the uniform candidate, then the lowest mean ratio; and the ratios."""
    reference = errors[1.0]
    present = reference > 0
    ratios = {a: (e[present] / reference[present]) if bool(present.any()) else torch.ones(1, dtype=torch.float64)
              for a, e in errors.items()}
    best = min(ratios, key=lambda a: (float(ratios[a].max()), float(ratios[a].mean()), -a))
    summary = {str(a): {"worst": round(float(r.max()), 4), "mean": round(float(r.mean()), 4)} for a, r in ratios.items()}
    return best, summary


class HeldOutSlice:
    """The held-out samples' two streams (quantized path, FP path), their sources, and the output factors."""

    def __init__(self, inputs: LayerInputs, sources: list[torch.Tensor], valid: list[torch.Tensor],
                 factors: Sequence[torch.Tensor], num_sources: int, comm: Comm | None = None,
                 search: MixSearch | None = None) -> None:
        self.search = search or MixSearch()  # the candidate shares of uniform weight
        self.inputs = inputs
        self.fp = LayerInputs([h.clone() for h in inputs.hidden], inputs.kwargs, inputs.sizes)
        self.sources = sources  # per batch of inputs: [tokens] long source ids, -1 where a token is not scored
        self.factors = factors
        self.num_sources = num_sources
        self.comm = comm or Comm()
        self.reference: list[torch.Tensor] = []
        self.factor: torch.Tensor | None = None
        for batch, (ids, mask) in enumerate(zip(sources, valid)):
            ids[~mask] = -1
            if ids.numel() != inputs.hidden[batch].numel() // inputs.hidden[batch].shape[-1]:
                raise QuantkitError("held-out slice: source ids do not match the samples' tokens")

    @torch.no_grad()
    def begin_layer(self, layer: nn.Module, index: int) -> None:
        """Run the still-FP `layer` on the FP stream: its outputs are the reference and the next FP inputs."""
        if index >= len(self.factors):
            raise QuantkitError(f"the mix guard has output factors for {len(self.factors)} layers, not layer {index}")
        self.reference = [run_layer(layer, self.fp, b) for b in range(len(self.fp))]
        self.fp.hidden = self.reference
        factor = self.factors[index]
        self.factor = factor.to(self.reference[0].device, torch.float32) if len(self.reference) else factor.float()

    @torch.no_grad()
    def errors(self, layer: nn.Module) -> torch.Tensor:
        """Per source, the mean over its held-out tokens of e^T G e, e the layer output's deviation from the FP
        model's (summed over every rank's shard): float64 [sources]."""
        sums = torch.zeros(2, self.num_sources, dtype=torch.float64)
        for batch in range(len(self.inputs)):
            out = run_layer(layer, self.inputs, batch)
            deviation = (out - self.reference[batch]).reshape(-1, out.shape[-1]).float()
            cost = ((deviation @ self.factor) * deviation).sum(-1).double().cpu()
            ids = self.sources[batch]
            keep = ids >= 0
            sums[0].index_add_(0, ids[keep], cost[keep])
            sums[1].index_add_(0, ids[keep], torch.ones_like(cost[keep]))
        self.comm.all_reduce_sum_(sums)
        return sums[0] / sums[1].clamp_min(1.0)

    @torch.no_grad()
    def end_layer(self, layer: nn.Module) -> None:
        """Advance the quantized stream through the finished (quantized) layer."""
        self.inputs.hidden = [run_layer(layer, self.inputs, b) for b in range(len(self.inputs))]


def source_ids(sample: dict) -> torch.Tensor:
    """[T] long: the source of each token of a sample (0 for all when it names none)."""
    length = int(sample["input_ids"].shape[-1])
    ids = sample.get(SOURCE_KEY)
    if ids is None:
        return torch.zeros(length, dtype=torch.long)
    ids = ids.reshape(-1).long().cpu()
    if ids.numel() != length:
        raise QuantkitError(f"{SOURCE_KEY} has {ids.numel()} entries for {length} tokens")
    return ids.clone()


def count_sources(samples: Sequence[dict]) -> int:
    """How many sources the samples name (ids 0..n-1; 1 when none does)."""
    return max(1, 1 + max((int(source_ids(s).max()) for s in samples), default=0))
