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
- Per source (sample["source_ids"], one id per token; one source when absent) each candidate's error is
  compared with the uniform candidate's, paired by held-out window (each window's tokens of that source
  are one unit). A candidate is eligible only if it is better than uniform on every source by more than
  `margin` standard errors of the paired difference (over the source's windows, at least two): the noise
  of a small held-out slice cannot buy one source's quality with another's. Among eligible candidates the
  lowest worst-source ratio to uniform wins (the mean ratio breaks ties); with none eligible, uniform stays.
- Once the share is chosen, the held-out windows join the group's Hessians (both, with their token weights
  and FP-target cross terms, summed on the quantized path as the others) and the chosen mix is solved again
  from every sample: the held-out slice decides and costs no calibration data, so a group that keeps uniform
  weight is solved exactly as GPTQ with the FP target solves it. (Without this, a guard that refuses
  everywhere is GPTQ + FP target on 7/8 of the windows, which measured worse than it per corpus: #24.)
- Groups are checked in execution order; with `refusal_ends_layer` (the default) the first group that keeps
  uniform weight ends the search in its layer: the later groups sum uniform Hessians only, with no twin,
  no second solve and no held-out pass. Every group solved with token weights has passed its own check, and
  the guard costs little more than TLQ where the weights do not pay.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from quantkit.data.samples import SOURCE_KEY
from quantkit.engine.capture import LayerInputs, run_layer
from quantkit.engine.comm import Comm
from quantkit.engine.hessian import HessianAccumulator
from quantkit.engine.weights import LayerWeights
from quantkit.errors import QuantkitError


@dataclass(frozen=True)
class MixSearch:
    """Settings of the held-out mix guard."""

    shares: tuple[float, ...] = (0.0, 1.0)  # candidate shares of uniform weight (1.0 is always tried)
    holdout: int = 8  # every holdout-th calibration sample is held out of the Hessians to choose on
    margin: float = 2.0  # standard errors by which a candidate must beat uniform on every source (0: any gain)
    refusal_ends_layer: bool = True  # once a group keeps uniform weight, the layer's later groups do without a check

    def check(self, nsamples: int) -> None:
        """Raise QuantkitError on settings that cannot work with `nsamples` samples."""
        if not self.shares or any(not 0.0 <= a <= 1.0 for a in self.shares):
            raise QuantkitError(f"mix shares must be in [0, 1], got {self.shares}")
        if not self.margin >= 0.0:
            raise QuantkitError(f"the mix guard's margin is a number of standard errors >= 0, got {self.margin}")
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


# per source, the sums choose() reads (reduced over ranks): candidate and uniform cost, tokens, windows, and for the
# paired difference D_w = candidate - uniform cost of window w (n_w tokens): sum D^2, sum D n, sum n^2
STATS = ("cost", "uniform", "tokens", "windows", "d2", "dn", "n2")


def paired_stats(cost: torch.Tensor, uniform: torch.Tensor, tokens: torch.Tensor, source: torch.Tensor,
                 num_sources: int) -> torch.Tensor:
    """[len(STATS), sources] float64 sums over held-out windows (one entry per window and source: its summed
    cost under a candidate and under uniform, its token count, its source id)."""
    d = cost - uniform
    columns = (cost, uniform, tokens, torch.ones_like(tokens), d * d, d * tokens, tokens * tokens)
    out = torch.zeros(len(STATS), num_sources, dtype=torch.float64)
    for row, values in enumerate(columns):
        out[row].index_add_(0, source, values.double())
    return out


def choose(stats: dict[float, torch.Tensor], margin: float = 2.0) -> tuple[float, dict]:
    """The winning share from per-source sums {share: paired_stats(...)} (share 1.0, uniform, included): among
    the shares better than uniform on every source by more than `margin` standard errors of the paired
    difference, the lowest worst-source ratio to uniform, then the lowest mean ratio; uniform when none is.
    Also a summary per share: worst and mean ratio, the worst source's difference in standard errors (z) and
    whether it was eligible."""
    summary, eligible = {}, []
    for share, sums in stats.items():
        cost, uniform, tokens, windows, d2, dn, n2 = sums
        present = uniform > 0
        if not bool(present.any()):
            summary[str(share)] = {"worst": 1.0, "mean": 1.0, "worst_z": 0.0, "eligible": False}
            continue
        ratio = cost[present] / uniform[present]
        delta = (cost[present] - uniform[present]) / tokens[present]  # mean cost difference per token
        m = windows[present]
        spread = (d2[present] - 2 * delta * dn[present] + delta * delta * n2[present]).clamp_min(0.0)
        se = (m / (m - 1).clamp_min(1.0) * spread).sqrt() / tokens[present]
        z = torch.where(se > 0, delta / se.clamp_min(1e-300), torch.where(delta < 0, -torch.inf, torch.inf))
        ok = share != 1.0 and bool((m >= 2).all()) and bool((delta + margin * se < 0).all())
        summary[str(share)] = {"worst": round(float(ratio.max()), 4), "mean": round(float(ratio.mean()), 4),
                               "worst_z": round(float(z.max()), 2), "eligible": ok}
        if ok:
            eligible.append((float(ratio.max()), float(ratio.mean()), -share, share))
    best = min(eligible)[3] if eligible else 1.0
    return best, summary


def mixed(share: float, hessians: dict[str, torch.Tensor], crosses: dict[str, torch.Tensor],
          uniform: dict[str, torch.Tensor], uniform_cross: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(1 - share) x token-weighted + share x uniform, for the Hessians and cross terms of the linears that have a
    uniform twin (the others as they are)."""
    def mix(weighted: dict, plain: dict) -> dict:
        return {n: t if n not in plain else (1.0 - share) * t + share * plain[n] for n, t in weighted.items()}
    return mix(hessians, uniform), mix(crosses, uniform_cross)


class GroupSums:
    """A group's Hessians and cross terms from its accumulators. The mix guard's are kept past the choice: the fit
    samples' results for the candidates, and the accumulators, which take the held-out samples' sums for the final
    solve."""

    def __init__(self) -> None:
        self.kept: dict[int, tuple[HessianAccumulator, HessianAccumulator, torch.Tensor, torch.Tensor | None]] = {}
        self.readers: dict[tuple[bool, str], int] = {}  # (uniform twin?, linear) -> the accumulator it reads

    def take(self, name: str, sums: tuple[HessianAccumulator | None, ...], out: tuple[dict, ...]) -> None:
        """Linear `name`'s Hessian and cross term, and its uniform twin's, into `out` (Hessians, cross terms, twins'
        Hessians, twins' cross terms) from `sums` (accumulator, twin, and their held-out sums, None where absent):
        with a twin the fit samples' (the choice comes first), else every sample's at once."""
        acc, twin, held, held_twin = sums
        if twin is None and held is not None:
            if acc.taken is None:  # linears sharing an accumulator take it once
                acc.absorb(held)
            held = None
        for one, extra, is_twin in ((acc, held, False), (twin, held_twin, True)):
            if one is not None:
                hessian, cross = one.take_results() if extra is None else self.fit((is_twin, name), one, extra)
                out[2 * is_twin][name] = hessian
                if cross is not None:
                    out[2 * is_twin + 1][name] = cross

    def fit(self, key: tuple[bool, str], acc: HessianAccumulator,
            held: HessianAccumulator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fit samples' Hessian and cross term of `acc` (linears sharing an accumulator share them)."""
        if id(acc) not in self.kept:
            self.kept[id(acc)] = (acc, held, acc.result(), acc.cross_result())
        self.readers[key] = id(acc)
        return self.kept[id(acc)][2:]

    def every_sample(self) -> dict[tuple[bool, str], tuple[torch.Tensor, torch.Tensor | None]]:
        """Each reader's Hessian and cross term over every sample, held-out ones included (the sums are spent)."""
        for acc, held, _, _ in self.kept.values():
            acc.absorb(held)
        out = {key: self.kept[ref][0].take_results() for key, ref in self.readers.items()}
        self.kept.clear()
        return out


class HeldOutSlice:
    """The held-out samples' two streams (quantized path, FP path), their sources and windows, and the output
    factors."""

    def __init__(self, inputs: LayerInputs, sources: list[torch.Tensor], valid: list[torch.Tensor],
                 factors: Sequence[torch.Tensor], num_sources: int, comm: Comm | None = None,
                 search: MixSearch | None = None, windows: list[torch.Tensor] | None = None) -> None:
        self.search = search or MixSearch()  # the candidate shares of uniform weight
        self.inputs = inputs
        self.fp = LayerInputs([h.clone() for h in inputs.hidden], inputs.kwargs, inputs.sizes)
        self.factors = factors
        self.num_sources = num_sources
        self.comm = comm or Comm()
        self.reference: list[torch.Tensor] = []
        self.factor: torch.Tensor | None = None
        # this layer's token weights of the held-out samples (set by the driver), and their FP linear inputs (the
        # FP target's, set by the layer's work): after the choice the held-out windows join the group's Hessians
        self.weights: LayerWeights | None = None
        self.fp_linear_inputs: dict | None = None
        # each scored token's unit, one per (window, source): windows[b] gives each token's sample (window)
        # index; without it each entry of `inputs` is one window
        self.units: list[torch.Tensor] = []
        unit_source: list[int] = []
        found: dict[tuple[int, int], int] = {}
        for batch, (ids, mask) in enumerate(zip(sources, valid)):
            ids = ids.reshape(-1).long().clone()
            ids[~mask.reshape(-1)] = -1
            if ids.numel() != inputs.hidden[batch].numel() // inputs.hidden[batch].shape[-1]:
                raise QuantkitError("held-out slice: source ids do not match the samples' tokens")
            window = torch.full_like(ids, batch) if windows is None else windows[batch].reshape(-1).long()
            units = torch.full_like(ids, -1)
            for key in sorted({(int(w), int(k)) for w, k in zip(window[ids >= 0].tolist(), ids[ids >= 0].tolist())}):
                found[key] = len(found)
                unit_source.append(key[1])
                units[(window == key[0]) & (ids == key[1])] = found[key]
            self.units.append(units)
        self.unit_source = torch.tensor(unit_source, dtype=torch.long)
        self.unit_tokens = torch.zeros(len(unit_source), dtype=torch.float64)
        for units in self.units:
            self.unit_tokens.index_add_(0, units[units >= 0], torch.ones(int((units >= 0).sum()), dtype=torch.float64))

    @torch.no_grad()
    def begin_layer(self, layer: nn.Module, index: int, advanced: bool = False) -> None:
        """Run the still-FP `layer` on the FP stream: its outputs are the reference and the next FP inputs
        (`advanced`: the caller has run it already, recording the FP linear inputs on the way)."""
        if index >= len(self.factors):
            raise QuantkitError(f"the mix guard has output factors for {len(self.factors)} layers, not layer {index}")
        if not advanced:
            self.fp.hidden = [run_layer(layer, self.fp, b) for b in range(len(self.fp))]
        self.reference = list(self.fp.hidden)
        factor = self.factors[index]
        self.factor = factor.to(self.reference[0].device, torch.float32) if len(self.reference) else factor.float()

    @torch.no_grad()
    def errors(self, layer: nn.Module) -> torch.Tensor:
        """Per unit (this rank's held-out windows x sources), the sum over its tokens of e^T G e, e the layer
        output's deviation from the FP model's: float64 [units]."""
        sums = torch.zeros(len(self.unit_source), dtype=torch.float64)
        for batch in range(len(self.inputs)):
            out = run_layer(layer, self.inputs, batch)
            deviation = (out - self.reference[batch]).reshape(-1, out.shape[-1]).float()
            cost = ((deviation @ self.factor) * deviation).sum(-1).double().cpu()
            units = self.units[batch]
            keep = units >= 0
            sums.index_add_(0, units[keep], cost[keep])
        return sums

    def by_source(self, errors: torch.Tensor) -> torch.Tensor:
        """Per source, the mean cost per held-out token of unit `errors` (summed over every rank): float64 [sources]."""
        sums = torch.zeros(2, self.num_sources, dtype=torch.float64)
        sums[0].index_add_(0, self.unit_source, errors)
        sums[1].index_add_(0, self.unit_source, self.unit_tokens)
        self.comm.all_reduce_sum_(sums)
        return sums[0] / sums[1].clamp_min(1.0)

    @torch.no_grad()
    def solve_group(self, layer: nn.Module, solve: Callable[[dict, dict], dict], install: Callable[[dict], None],
                    fit: tuple[dict, dict, dict, dict], sums: GroupSums) -> tuple[float, dict, dict, dict, dict]:
        """Each candidate share solved (`solve(hessians, crosses)`) from the fit samples' (Hessians, cross terms,
        uniform twins, their cross terms) `fit`, installed and scored on the held-out slice; the chosen share solved
        again from every sample. Returns (share, its summary per share, the solution, its Hessians and cross terms)."""
        errors = {}
        for share in self.search.candidates:
            install(solve(*mixed(share, *fit)))
            errors[share] = self.errors(layer)
        best, ratios = self.choose(errors)
        every = sums.every_sample()
        hessians, crosses, uniform, uniform_cross = ({n: every[(twin, n)][part] if (twin, n) in every else t
                                                      for n, t in kept.items()}
                                                     for kept, twin, part in zip(fit, (False, False, True, True), (0, 1, 0, 1)))
        hessians, crosses = mixed(best, hessians, crosses, uniform, uniform_cross)
        return best, ratios, solve(hessians, crosses), hessians, crosses

    def choose(self, errors: dict[float, torch.Tensor]) -> tuple[float, dict]:
        """choose() over every rank's held-out windows, from per-unit errors {share: [units]} (1.0 included)."""
        stats = {}
        for share, cost in errors.items():
            sums = paired_stats(cost, errors[1.0], self.unit_tokens, self.unit_source, self.num_sources)
            self.comm.all_reduce_sum_(sums)
            stats[share] = sums
        return choose(stats, self.search.margin)

    @torch.no_grad()
    def end_layer(self, layer: nn.Module) -> None:
        """Advance the quantized stream through the finished (quantized) layer."""
        self.inputs.hidden = [run_layer(layer, self.inputs, b) for b in range(len(self.inputs))]
        self.weights = self.fp_linear_inputs = None


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
