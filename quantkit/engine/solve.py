"""Solving linears from their statistics: shared-Hessian solves, row slices and groups, results shared over ranks."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from quantkit.engine.comm import Comm
from quantkit.engine.hessian import FLOAT32_SUM_TOKENS, HessianAccumulator
from quantkit.engine.plan import Piece
from quantkit.engine.weights import row_ranges
from quantkit.errors import QuantkitError
from quantkit.quant.gptaq import fp_target_weight
from quantkit.quant.grid import dequantize, max_code, quantize
from quantkit.quant.spec import QuantResult, QuantSpec

N_STATS = 5
# Each output-error trace costs out x in^2, three per linear: at 4096 x 14336 more than the GPTQ solve
# itself. Above 2 x REPORT_ROWS rows a linear's traces are summed over every k-th row (k = rows // REPORT_ROWS),
# picked by the row's index in the whole linear, so that row slices solved on other ranks sum the same rows.
REPORT_ROWS = 512


def report_rows(first_row: int, rows: int, total_rows: int) -> slice:
    """The rows of a slice [first_row, first_row + rows) of a `total_rows`-row linear whose output-error traces
    are summed: all of them, or every k-th row of the whole linear for large ones."""
    step = max(1, total_rows // REPORT_ROWS)
    return slice((-first_row) % step, rows, step)


def nearest_on_grid(weight: torch.Tensor, result: QuantResult, rows: slice = slice(None)) -> torch.Tensor:
    """`weight` (the rows `rows` of the solved linear) rounded to the nearest point of the grid `result` was
    solved on: what plain rounding (RTN) gives with the solver's own scales and zeros, the baseline its error is
    compared with."""
    groups = result.g_idx.long().to(weight.device)
    scales, zeros = result.scales[rows].to(weight.device)[:, groups], result.zeros[rows].to(weight.device)[:, groups]
    return dequantize(quantize(weight, scales, zeros, max_code(result.bits)), scales, zeros)


def result_stats(weight: torch.Tensor, result: QuantResult, hessian: torch.Tensor | None, first_row: int = 0,
                 total_rows: int | None = None) -> torch.Tensor:
    """Row-additive error sums of one (slice of a) solve: ||D||^2, ||W||^2, tr(D H D^T), tr(W H W^T) and
    tr(R H R^T) with R = W - nearest_on_grid(W) (D = W - the solved weight). The slice holds rows
    [first_row, first_row + len(weight)) of a `total_rows`-row linear (default: the whole of it); the three
    traces are over report_rows of it."""
    quantized = result.dequantize().to(weight.device)
    delta = weight - quantized
    stats = [float(delta.pow(2).sum()), float(weight.pow(2).sum()), float("nan"), float("nan"), float("nan")]
    if hessian is not None:
        rows = report_rows(first_row, weight.shape[0], total_rows or weight.shape[0])
        delta, picked = delta[rows], weight[rows]
        stats[2] = float(torch.einsum("oi,ij,oj->", delta, hessian, delta))
        stats[3] = float(torch.einsum("oi,ij,oj->", picked, hessian, picked))
        rounded = picked - nearest_on_grid(picked, result, rows)
        stats[4] = float(torch.einsum("oi,ij,oj->", rounded, hessian, rounded))
    return torch.tensor(stats, dtype=torch.float64)


def report_entry(stats: torch.Tensor, with_hessian: bool) -> dict:
    """A linear's report from its result_stats: relative weight error, and given H the relative output error
    of the solve and of plain rounding on its grid (rtn_output_rel_err: the error before the solver's work)."""
    entry = {"weight_rel_mse": float(stats[0] / max(float(stats[1]), 1e-30))}
    if with_hessian:
        entry["output_rel_err"] = float(stats[2] / stats[3]) if stats[3] > 0 else 0.0
        entry["rtn_output_rel_err"] = float(stats[4] / stats[3]) if stats[3] > 0 else 0.0
    return entry


def install_result(linear: nn.Linear, weight: torch.Tensor, result: QuantResult, hessian: torch.Tensor | None) -> dict:
    """Put `result`'s dequantized weight into `linear` (solved from `weight`); return its report entry."""
    stats = result_stats(weight, result, hessian)
    linear.weight.data.copy_(result.dequantize().to(linear.weight.device, linear.weight.dtype))
    return report_entry(stats, hessian is not None)


def reduce_accumulator(acc: HessianAccumulator, comm: Comm, dst: int | None = None) -> None:
    """Sum an accumulator's Hessian, cross term and weight total over all ranks, in place: onto rank
    `dst`, or onto every rank when it is None."""
    if not comm.distributed:
        return
    if acc.may_widen:  # some ranks' sums may have moved to float64 (FLOAT32_SUM_TOKENS): all must match
        wide = torch.zeros(1, device=acc.hessian.device)
        comm.all_reduce_max_(wide.fill_(float(acc.tokens > FLOAT32_SUM_TOKENS)))
        if wide.item():
            acc.widen()
    total = acc.weight_sums.to(acc.hessian.device)
    for tensor in [acc.hessian, total] + ([acc.cross] if acc.cross is not None else []):
        if dst is None:
            comm.all_reduce_sum_(tensor)
        else:
            comm.reduce_sum_(tensor, dst)
    acc.weight_sums = total.cpu()


def diagonal_blocks(metric: torch.Tensor, width: int) -> torch.Tensor:
    """The [width, width] blocks on the diagonal of a block-diagonal factor [n, b, b] (width divides b): [n * b / width,
    width, width], the factor with the coupling between its smaller blocks dropped."""
    n, b = metric.shape[0], metric.shape[1]
    if width == b:
        return metric
    k = b // width
    return torch.diagonal(metric.reshape(n, k, width, k, width), dim1=1, dim2=3).permute(0, 3, 1, 2).reshape(-1, width, width)


def _with_metric(row_metric: torch.Tensor | None) -> dict:
    """The solver keyword for an output-side factor (only solvers that take one are given one)."""
    return {} if row_metric is None else {"row_metric": row_metric}


def solve_rows(solve: Callable, weights: list[torch.Tensor], hessian: torch.Tensor | None, spec: QuantSpec,
               names: Sequence[str], cross: torch.Tensor | None = None,
               row_metric: torch.Tensor | None = None) -> list[QuantResult]:
    """Solve linears that share `hessian` (and `cross`) as one problem with their rows stacked; one CPU
    result each. GPTQ's rows are independent given H, so this runs the column loop once for all; an
    output-side factor (row_metric, the linears' blocks stacked) couples rows within its blocks only."""
    stacked = weights[0] if len(weights) == 1 else torch.cat(weights)
    joint_name = " + ".join(names)
    joint = solve(_target(stacked, hessian, cross, spec, joint_name), hessian, spec, name=joint_name,
                  **_with_metric(row_metric))
    if len(weights) == 1:
        return [to_cpu(joint)]
    out, start = [], 0
    for weight in weights:
        out.append(to_cpu(joint.rows(start, start + weight.shape[0])))
        start += weight.shape[0]
    return out


def share_result(
    comm: Comm, mine: tuple[QuantResult, torch.Tensor] | None, pieces: list[Piece], linear: nn.Linear,
    spec: QuantSpec,
) -> tuple[QuantResult, torch.Tensor]:
    """Assemble one linear's QuantResult on every rank from the row slices its pieces' ranks solved.

    Each slice's rows are broadcast from the rank that solved it (g_idx, identical in every slice
    since it depends on the Hessian only, from the first); the error sums are all-reduced.
    """
    out_f, in_f = linear.out_features, linear.in_features
    groups = 1 if spec.group_size == -1 else in_f // spec.group_size
    stats = mine[1].clone() if mine is not None else torch.zeros(N_STATS, dtype=torch.float64)
    stats = torch.nan_to_num(stats, nan=0.0)
    comm.all_reduce_sum_(stats)
    full = [
        torch.empty(out_f, in_f, dtype=torch.uint8),
        torch.empty(out_f, groups, dtype=torch.float32),
        torch.empty(out_f, groups, dtype=torch.uint8),
    ]
    g_idx = torch.empty(in_f, dtype=torch.int32)
    for rank, start, end in pieces:
        if rank == comm.rank:
            result = mine[0]
            for target, part in zip(full, (result.qweight, result.scales, result.zeros)):
                target[start:end].copy_(part)
            if rank == pieces[0][0]:
                g_idx.copy_(result.g_idx)
        for target in full:
            comm.broadcast_(target[start:end], rank)
    comm.broadcast_(g_idx, pieces[0][0])
    result = QuantResult.of(spec, *full, g_idx)
    return result, stats


def solve_slice(
    solve: Callable, weight: torch.Tensor, start: int, out_features: int, hessian: torch.Tensor | None,
    cross: torch.Tensor | None, spec: QuantSpec, name: str, row_metric: torch.Tensor | None = None,
) -> tuple[QuantResult, torch.Tensor]:
    """Solve output rows [start, start + len(weight)) of a linear with `out_features` rows; return the
    result and its result_stats. A [g, in, in] Hessian (and cross term) holds one Hessian per output-row
    group (quantkit.engine.weights.row_ranges): each group's rows are solved with their own. An output-side
    factor (row_metric, [blocks, b, b] over all rows) gives the slice its own blocks, which must align."""
    if row_metric is not None:
        width = row_metric.shape[1]
        if start % width or weight.shape[0] % width or (hessian is not None and hessian.dim() == 3):
            raise QuantkitError(f"{name}: output-side factor blocks of {width} rows need row slices on block "
                                "boundaries and one Hessian per linear; solve it on one rank")
        row_metric = row_metric[start // width : (start + weight.shape[0]) // width]
    if hessian is None or hessian.dim() == 2:
        result = solve(_target(weight, hessian, cross, spec, name), hessian, spec, name=name, **_with_metric(row_metric))
        return result, result_stats(weight, result, hessian, start, out_features)
    end = start + weight.shape[0]
    parts, stats = [], torch.zeros(N_STATS, dtype=torch.float64)
    for group, (low, high) in enumerate(row_ranges(out_features, hessian.shape[0])):
        low, high = max(low, start), min(high, end)
        if low >= high:
            continue
        rows = weight[low - start : high - start]
        group_cross = None if cross is None else cross[group]
        part_name = f"{name}[{low}:{high}]"
        part = solve(_target(rows, hessian[group], group_cross, spec, part_name), hessian[group], spec, name=part_name)
        stats += result_stats(rows, part, hessian[group], low, out_features)
        parts.append(to_cpu(part))
    if any(not torch.equal(part.g_idx, parts[0].g_idx) for part in parts):
        raise QuantkitError(
            f"{name}: output-row groups chose different act-order groupings; use static groups "
            "(the default with act-order) or a single row group"
        )
    return QuantResult.cat_rows(parts), stats


def _target(weight: torch.Tensor, hessian: torch.Tensor | None, cross: torch.Tensor | None, spec: QuantSpec,
            name: str) -> torch.Tensor:
    """The weight GPTQ rounds toward: W itself, or with the cross term the FP target (at strength spec.fp_alpha)."""
    if cross is None or spec.fp_alpha == 0.0:
        return weight
    return fp_target_weight(weight, hessian, cross, spec.damp, name, alpha=spec.fp_alpha)


def to_cpu(result: QuantResult) -> QuantResult:
    for attr in ("qweight", "scales", "zeros", "g_idx"):
        setattr(result, attr, getattr(result, attr).cpu())
    return result


class GroupSolve:
    """Solving one group of a layer's linears from given Hessians (and cross terms), always from their FP
    weights, and installing a solution."""

    def __init__(self, linears: dict[str, nn.Linear], originals: dict[str, torch.Tensor], settings: dict,
                 together: list[list[str]], plan_rows: dict, shared: set[str], comm: Comm, prefix: str,
                 row_metrics: dict[str, torch.Tensor] | None = None) -> None:
        self.linears, self.originals, self.settings = linears, originals, settings
        self.together, self.plan_rows, self.shared, self.comm, self.prefix = together, plan_rows, shared, comm, prefix
        self.row_metrics = row_metrics or {}

    def metric(self, names: list[str]) -> torch.Tensor | None:
        """The output-side factor of linears solved together (their blocks stacked), or None."""
        found = [self.row_metrics.get(name) for name in names]
        if all(m is None for m in found):
            return None
        # a linear no gradient reached (its output detached, as an indexer's) rounds its rows independently: identity
        rows = [self.originals[name].shape[0] for name in names]
        width = math.gcd(*(m.shape[1] for m in found if m is not None), *(r for m, r in zip(found, rows) if m is None))
        like = next(m for m in found if m is not None)
        eye = torch.eye(width, dtype=like.dtype, device=like.device)
        found = [diagonal_blocks(m, width) if m is not None else eye.expand(r // width, width, width).clone()
                 for m, r in zip(found, rows)]
        return found[0] if len(found) == 1 else torch.cat(found)

    def solve(self, hessians: dict[str, torch.Tensor], crosses: dict[str, torch.Tensor]
              ) -> dict[str, tuple[QuantResult, torch.Tensor]]:
        """Every linear's result (the same on every rank) and its error sums."""
        hessians, crosses, comm = dict(hessians), dict(crosses), self.comm
        solved: dict[str, tuple[QuantResult, torch.Tensor]] = {}
        for names in (names for names in self.together if len(names) > 1):
            hessian = hessians[names[0]]
            parts = [self.originals[name] for name in names]
            chosen = self.settings[names[0]]
            joint = solve_rows(chosen.method.solve, parts, hessian, chosen.spec, [f"{self.prefix}.{n}" for n in names],
                               crosses.get(names[0]), self.metric(names))
            for name, weight, result in zip(names, parts, joint):
                solved[name] = (result, result_stats(weight, result, hessian))
            for name in names:
                del hessians[name]
                crosses.pop(name, None)
        for name in (names[0] for names in self.together if len(names) == 1):
            mine = [(start, end) for rank, start, end in self.plan_rows[name] if rank == comm.rank]
            if not mine:
                continue
            start, end = mine[0]
            solved[name] = solve_slice(
                self.settings[name].method.solve, self.originals[name][start:end], start,
                self.linears[name].out_features, hessians.pop(name, None), crosses.pop(name, None),
                self.settings[name].spec, f"{self.prefix}.{name}", self.metric([name]),
            )
        for name in self.linears:
            if name in self.shared:
                solved[name] = share_result(comm, solved.get(name), self.plan_rows[name], self.linears[name],
                                            self.settings[name].spec)
            else:
                solved[name] = (to_cpu(solved[name][0]), solved[name][1])
        return solved

    def install(self, solved: dict[str, tuple[QuantResult, torch.Tensor]]) -> None:
        """Put the solved weights into the linears."""
        for name, (result, _) in solved.items():
            weight = self.linears[name].weight
            weight.data.copy_(result.dequantize().to(weight.device, weight.dtype))
