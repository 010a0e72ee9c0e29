"""Which settings each linear gets (LinearPlan: the run's, or a recipe's) and which rank solves which output rows
of each linear of a group (a deterministic cost-model plan)."""

from __future__ import annotations

import math

from torch import nn

from quantkit.quant.methods import Method, method_for
from quantkit.quant.recipe import LinearSettings, Recipe
from quantkit.quant.spec import QuantSpec


def solve_cost(linear: nn.Linear) -> int:
    """Rough GPTQ cost of a linear: in^2 * out for the updates plus in^3 for the inverse."""
    return linear.in_features**2 * (linear.out_features + linear.in_features)


def assign_owners(linears: dict[str, nn.Linear], world_size: int) -> dict[str, int]:
    """Spread a group's linears over ranks, largest first onto the least-loaded rank."""
    load = [0] * world_size
    owners = {}
    for name in sorted(linears, key=lambda n: (-solve_cost(linears[n]), n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += solve_cost(linears[name])
    return owners


# A piece of one linear's solve: (rank, first output row, end output row).
Piece = tuple[int, int, int]
# Row slices are cut at multiples of this (except at the end of the matrix).
_ROW_ALIGN = 32


def fixed_solve_seconds(in_features: int) -> float:
    """The part of a GPTQ solve that every row slice repeats: the Cholesky work (~in^3) and the
    per-column loop overhead (~in). Constants fitted on one CPU thread (torch 2.13)."""
    return in_features**3 / 25e9 + in_features * 7e-5


def row_solve_seconds(in_features: int) -> float:
    """The part of a GPTQ solve that scales with the output rows, per row (one CPU thread)."""
    return in_features * 3.8e-7


def _piece_cost(linear: nn.Linear, rows: int) -> float:
    return fixed_solve_seconds(linear.in_features) + rows * row_solve_seconds(linear.in_features)


def plan_makespan(linears: dict[str, nn.Linear], plan: dict[str, list[Piece]], world_size: int) -> float:
    """The modelled solve time of the busiest rank under `plan`."""
    load = [0.0] * world_size
    for name, pieces in plan.items():
        for rank, start, end in pieces:
            load[rank] += _piece_cost(linears[name], end - start)
    return max(load)


def _wrap_plan(linears: dict[str, nn.Linear], world_size: int, limit: float,
               align: dict[str, int]) -> dict[str, list[Piece]] | None:
    """McNaughton's wrap-around rule with per-piece fixed costs: fill rank 0 up to `limit`, cut the
    linear that overflows by rows (at multiples of align[name]) and continue it on the next rank; None if `limit`
    is too low."""
    plan: dict[str, list[Piece]] = {}
    rank, load = 0, 0.0
    for name in sorted(linears, key=lambda n: (-solve_cost(linears[n]), n)):
        linear = linears[name]
        fixed, per_row = fixed_solve_seconds(linear.in_features), row_solve_seconds(linear.in_features)
        start, out = 0, linear.out_features
        pieces: list[Piece] = []
        while start < out:
            if rank >= world_size:
                return None
            room = limit - load - fixed
            if room >= (out - start) * per_row:
                pieces.append((rank, start, out))
                load += fixed + (out - start) * per_row
                start = out
                break
            rows = int(room / per_row) // align[name] * align[name] if room > 0 else 0
            if rows > 0:
                pieces.append((rank, start, start + rows))
                start += rows
            rank, load = rank + 1, 0.0
        plan[name] = pieces
    return plan


def plan_group(linears: dict[str, nn.Linear], world_size: int, split_all: bool = False,
               blocks: dict[str, int] | None = None) -> dict[str, list[Piece]]:
    """Which rank solves which output rows of each linear of a group.

    GPTQ's rows are independent given the Hessian, so a linear can be cut by output rows and each
    slice solved on its own rank (every slice repeats the Cholesky work, see fixed_solve_seconds).
    The plan is the better (by the cost model) of whole linears spread largest-first and the
    wrap-around rule that cuts the linears at the rank boundaries; `split_all` cuts every linear
    over all ranks instead. Deterministic: every rank computes the same plan. blocks[name]: the rows per block of
    a linear's output-side factor (its rows are rounded together, so cuts fall on its block boundaries too).
    """
    if world_size == 1:
        return {name: [(0, 0, lin.out_features)] for name, lin in linears.items()}
    units = {name: (blocks or {}).get(name, 1) for name in linears}
    align = {name: math.lcm(_ROW_ALIGN, unit) for name, unit in units.items()}
    if split_all:
        plan = {}
        for name, lin in linears.items():
            out, unit = lin.out_features, units[name]
            bounds = [out * r // world_size // unit * unit for r in range(world_size)] + [out]
            plan[name] = [(r, bounds[r], bounds[r + 1]) for r in range(world_size) if bounds[r + 1] > bounds[r]]
        return plan
    owners = assign_owners(linears, world_size)
    best = {name: [(owners[name], 0, lin.out_features)] for name, lin in linears.items()}
    best_cost = plan_makespan(linears, best, world_size)
    total = sum(_piece_cost(lin, lin.out_features) for lin in linears.values())
    low, high, found = total / world_size, best_cost, None
    for _ in range(40):
        mid = (low + high) / 2
        candidate = _wrap_plan(linears, world_size, mid, align)
        if candidate is None:
            low = mid
        else:
            high, found = mid, candidate
    if found is not None and plan_makespan(linears, found, world_size) < best_cost * 0.98:
        return found
    return best


class LinearPlan:
    """Each linear's settings for one run: the run's QuantSpec and Method, or a recipe's per-module ones
    (quantkit.quant.recipe); None for a linear the recipe leaves in full precision."""

    def __init__(self, spec: QuantSpec, method: Method | str, recipe: Recipe | None = None) -> None:
        self.spec, self.method, self.recipe = spec, method_for(method), recipe
        self._cache: dict[str, LinearSettings | None] = {}

    def settings(self, name: str) -> LinearSettings | None:
        """How linear `name` (its full module name) is quantized, or None where it stays in FP."""
        if name not in self._cache:
            self._cache[name] = (LinearSettings(self.spec, self.method) if self.recipe is None
                                 else self.recipe.settings_for(name, self.spec, self.method))
        return self._cache[name]

    def spec_for(self, name: str) -> QuantSpec:
        """The QuantSpec of a quantized linear (the run's for one the recipe leaves in FP)."""
        settings = self.settings(name)
        return self.spec if settings is None else settings.spec

    def check(self, widths: dict[str, int], other_linears: list[str] | tuple[str, ...] = ()) -> None:
        """Raise QuantkitError if the recipe does not fit the model's candidate linears (name -> input width;
        `other_linears`: the model's linears the run does not quantize, which ignore patterns may name)."""
        if self.recipe is not None:
            self.recipe.check(widths, self.spec, self.method, other_linears)
