"""The layer-wise calibration loop: quantization-exposed, one decoder layer on the device at a time."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from quantkit.engine.capture import (
    LayerInputs,
    StopForward,
    capture_layer_inputs,
    move_outside_layers,
    run_layer,
    stack_samples,
)
from quantkit.engine.comm import Comm
from quantkit.engine.hessian import HessianAccumulator
from quantkit.engine.weights import (
    LayerWeights,
    TokenWeights,
    as_layer_weights,
    diagnose_layer,
    row_ranges,
)
from quantkit.errors import QuantkitError
from quantkit.models import adapter_for, get_module
from quantkit.models.base import Adapter, layer_output
from quantkit.quant.spec import QuantResult, QuantSpec

# observer(full_linear_name, normalised_hessian): sees every Hessian handed to the solver.
HessianObserver = Callable[[str, torch.Tensor], None]


@dataclass
class Calibration:
    """What a calibration run produced: quantized codes per linear and a report."""

    results: dict[str, QuantResult]
    report: dict = field(default_factory=dict)


# Samples per layer pass where they can be stacked (see stack_samples).
BATCH_SIZE = 16


def _proc_status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except (OSError, IndexError, ValueError):
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    VmHWM where /proc has it: ru_maxrss survives fork and exec, so a rank or subprocess started by
    a large parent would report the parent's peak as its own.
    """
    peak = _proc_status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float | None:
    """Resident set size of this process now, in MiB (None where /proc is missing)."""
    return _proc_status_mb("VmRSS")


def check_layer(layer: nn.Module, index: int, adapter: Adapter, spec: QuantSpec) -> None:
    """Raise QuantkitError if a linear of decoder layer `index` cannot be quantized."""
    for name in adapter.linear_names():
        linear = get_module(layer, name)
        full = f"{adapter.layer_prefix(index)}.{name}"
        check_group_width(linear.in_features, full, spec)
        if linear.weight.device.type != "meta" and not torch.isfinite(linear.weight).all():
            raise QuantkitError(f"weight of {full} contains NaN or Inf; fix the checkpoint before quantizing")


def check_group_width(width: int, name: str, spec: QuantSpec, hint: str = "") -> None:
    """Raise QuantkitError if the group size does not divide linear `name`'s input width."""
    if spec.group_size != -1 and width % spec.group_size:
        raise QuantkitError(
            f"group size {spec.group_size} does not divide the input width {width} of {name}; "
            f"choose a divisor or -1 (per-channel){hint}"
        )


def check_model(model: nn.Module, adapter: Adapter, spec: QuantSpec, lm_head: bool = False) -> None:
    """Fail fast, before any work, on settings or weights that cannot be quantized."""
    spec.validate()
    for index, layer in enumerate(adapter.decoder_layers(model)):
        check_layer(layer, index, adapter, spec)
    if lm_head:
        check_head(model, adapter, spec)


def check_head(model: nn.Module, adapter: Adapter, spec: QuantSpec) -> None:
    """Raise QuantkitError if lm_head cannot be quantized on its own (tied to the embeddings, bad width)."""
    head, embeddings = get_module(model, adapter.lm_head).weight, get_module(model, adapter.embeddings).weight
    # identity, or shared storage where a loader re-created the tied parameters
    if head is embeddings or head.untyped_storage().data_ptr() == embeddings.untyped_storage().data_ptr():
        raise QuantkitError(
            f"{adapter.lm_head} shares its weight with the input embeddings (tied word embeddings), so it cannot "
            "be quantized on its own; leave it in full precision"
        )
    check_group_width(head.shape[1], adapter.lm_head, spec)


def relative_output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(D H D^T) / tr(W H W^T) with D = W - Wq: the layer output error relative to its energy."""
    delta = weight - quantized
    num = torch.einsum("oi,ij,oj->", delta, hessian, delta)
    den = torch.einsum("oi,ij,oj->", weight, hessian, weight)
    return float(num / den) if den > 0 else 0.0


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


def _wrap_plan(linears: dict[str, nn.Linear], world_size: int, limit: float) -> dict[str, list[Piece]] | None:
    """McNaughton's wrap-around rule with per-piece fixed costs: fill rank 0 up to `limit`, cut the
    linear that overflows by rows and continue it on the next rank; None if `limit` is too low."""
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
            rows = int(room / per_row) // _ROW_ALIGN * _ROW_ALIGN if room > 0 else 0
            if rows > 0:
                pieces.append((rank, start, start + rows))
                start += rows
            rank, load = rank + 1, 0.0
        plan[name] = pieces
    return plan


def plan_group(linears: dict[str, nn.Linear], world_size: int, split_all: bool = False) -> dict[str, list[Piece]]:
    """Which rank solves which output rows of each linear of a group.

    GPTQ's rows are independent given the Hessian, so a linear can be cut by output rows and each
    slice solved on its own rank (every slice repeats the Cholesky work, see fixed_solve_seconds).
    The plan is the better (by the cost model) of whole linears spread largest-first and the
    wrap-around rule that cuts the linears at the rank boundaries; `split_all` cuts every linear
    over all ranks instead. Deterministic: every rank computes the same plan.
    """
    if world_size == 1:
        return {name: [(0, 0, lin.out_features)] for name, lin in linears.items()}
    if split_all:
        plan = {}
        for name, lin in linears.items():
            out = lin.out_features
            bounds = [out * r // world_size for r in range(world_size)] + [out]
            plan[name] = [(r, bounds[r], bounds[r + 1]) for r in range(world_size) if bounds[r + 1] > bounds[r]]
        return plan
    owners = assign_owners(linears, world_size)
    best = {name: [(owners[name], 0, lin.out_features)] for name, lin in linears.items()}
    best_cost = plan_makespan(linears, best, world_size)
    total = sum(_piece_cost(lin, lin.out_features) for lin in linears.values())
    low, high, found = total / world_size, best_cost, None
    for _ in range(40):
        mid = (low + high) / 2
        candidate = _wrap_plan(linears, world_size, mid)
        if candidate is None:
            low = mid
        else:
            high, found = mid, candidate
    if found is not None and plan_makespan(linears, found, world_size) < best_cost * 0.98:
        return found
    return best


class FinishedBlocks:
    """Replays the outputs of a layer's blocks whose linears are all quantized.

    A block is a direct child of the decoder layer holding linears (self_attn, mlp; OPT's fc1).
    Once its last linear is solved, its output on each batch is fixed for the rest of the layer's
    passes (the remaining groups, then the propagation), so it is replayed instead of recomputed.
    Where the block returns its last linear's output (attention: o_proj) and that linear's input
    was kept while its Hessian was summed, the outputs are that linear applied to the kept inputs,
    checked against one real run of the block; otherwise the next pass records them. Only tensors
    no wider than the layer's hidden state are kept, so memory stays one hidden state per block.
    """

    def __init__(self, layer: nn.Module, adapter: Adapter) -> None:
        self.layer = layer
        self.unsolved: dict[str, set[str]] = {}
        self.last_linear: dict[str, str] = {}
        for name in adapter.linear_names():
            block = name.split(".")[0]
            self.unsolved.setdefault(block, set()).add(name)
            if block != name:
                self.last_linear[block] = name
        self.kept_inputs: dict[str, list[torch.Tensor]] = {}
        self.to_derive: list[str] = []
        self.to_record: list[str] = []
        self.outputs: dict[str, list] = {}
        self.inputs: LayerInputs | None = None
        self.batch = 0

    def keep_input(self, name: str, x: torch.Tensor) -> None:
        """Called with each linear's input during a pass: keeps blocks' last linears' inputs."""
        if name in self.last_linear.values() and x.numel() <= self.inputs.hidden[self.batch].numel():
            self.kept_inputs.setdefault(name, []).append(x.detach().clone())

    def mark_solved(self, names: Sequence[str]) -> None:
        """Note that `names` are quantized; blocks left with no unsolved linear become replayable."""
        for block, pending in list(self.unsolved.items()):
            pending.difference_update(names)
            if pending:
                continue
            del self.unsolved[block]
            kept = self.kept_inputs.get(self.last_linear.get(block, ""), [])
            (self.to_derive if self.inputs is not None and len(kept) == len(self.inputs) else self.to_record).append(block)

    def _derive(self, block: str, module: nn.Module) -> None:
        """Replace `block`'s forward for one pass: a checked real run on batch 0, then derived outputs."""
        linear = get_module(self.layer, self.last_linear[block])
        kept = self.kept_inputs.pop(self.last_linear[block], [])
        real_forward = module.forward

        def forward(*args, **kwargs):
            if self.batch == 0:
                real = real_forward(*args, **kwargs)
                derived = linear(kept[0])
                if not torch.allclose(layer_output(real), derived, rtol=1e-5, atol=1e-6):
                    self.to_derive.remove(block)
                    self.to_record.append(block)
                    del module.forward  # the block is not its last linear's output: run it for real
                    return real
                self.outputs[block] = [real]
                return real
            first = linear(kept[self.batch])
            kept[self.batch] = None  # replaced by the output, which is what later passes need
            template = self.outputs[block][0]
            output = (first, *template[1:]) if isinstance(template, tuple) else first
            self.outputs[block].append(output)
            return output

        module.forward = forward

    def passes(self, inputs: LayerInputs) -> Iterator[int]:
        """Batch indices of one pass over `inputs`, with replay, derivation and recording installed."""
        self.inputs = inputs
        recordings: dict[str, list] = {block: [] for block in self.to_record}
        handles = []
        for block, store in recordings.items():
            def record(module: nn.Module, args: tuple, output: object, store: list = store) -> None:
                store.append(output)
            handles.append(get_module(self.layer, block).register_forward_hook(record))
        patched = []
        for block in list(self.outputs) + list(self.to_derive):
            module = get_module(self.layer, block)
            patched.append(module)
            if block in self.outputs:
                module.forward = lambda *args, outputs=self.outputs[block], **kwargs: outputs[self.batch]
            else:
                self._derive(block, module)
        try:
            for self.batch in range(len(inputs)):
                yield self.batch
        finally:
            for handle in handles:
                handle.remove()
            for module in patched:
                module.__dict__.pop("forward", None)
        for block in list(self.to_derive):
            if len(self.outputs.get(block, ())) == len(inputs):
                self.to_derive.remove(block)
            else:  # the pass stopped before the block ran on every batch: record it next pass instead
                self.outputs.pop(block, None)
                self.to_derive.remove(block)
                self.to_record.append(block)
        for block, store in recordings.items():
            if len(store) != len(inputs):
                continue
            self.to_record.remove(block)
            if all(layer_output(out).numel() <= hidden.numel() for out, hidden in zip(store, inputs.hidden)):
                self.outputs[block] = store


# linear name -> its FP input on each batch (linears fed one tensor share the list's entries); an
# entry is the tensor itself, or the file it was saved to when the inputs are kept on disk
FPInputs = dict[str, list[torch.Tensor | Path]]


def record_fp_inputs(layer: nn.Module, adapter: Adapter, fp_inputs: LayerInputs, directory: Path | None = None) -> FPInputs:
    """Run the still-FP `layer` on the FP stream: keep every linear's input per batch and advance the
    stream to the layer's FP outputs (the FP target's x_t, and the next layer's FP inputs).

    The kept inputs (about 3 hidden widths plus the MLP width per token) go to CPU memory, or to
    files in `directory` (--offload-dir), so a GPU holds only the layer and the streams; linears
    fed one tensor keep one copy.
    """
    kept: FPInputs = {name: [] for name in adapter.linear_names()}
    # This batch's (source, copy) pairs by the source's identity; holding the source keeps its id
    # from being reused by a later tensor of the same pass.
    copies: dict[int, tuple[torch.Tensor, torch.Tensor | Path]] = {}
    batch = {"index": 0}

    def copy_of(x: torch.Tensor) -> torch.Tensor | Path:
        if directory is None:
            return x.detach().to("cpu")
        path = directory / f"fp_input_{batch['index']:06d}_{len(copies)}.pt"
        torch.save(x.detach().contiguous().cpu(), path)
        return path

    handles = []
    for name in kept:
        def keep(module: nn.Module, args: tuple, name: str = name) -> None:
            x = args[0]
            if id(x) not in copies:
                copies[id(x)] = (x, copy_of(x))
            kept[name].append(copies[id(x)][1])
        handles.append(get_module(layer, name).register_forward_pre_hook(keep))
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    try:
        for index in range(len(fp_inputs)):
            batch["index"] = index
            copies.clear()
            fp_inputs.hidden[index] = run_layer(layer, fp_inputs, index)
    finally:
        for handle in handles:
            handle.remove()
    return kept


def _fp_input(entry: torch.Tensor | Path) -> torch.Tensor:
    return torch.load(entry, weights_only=True) if isinstance(entry, Path) else entry


def accumulate_group(
    layer: nn.Module,
    linears: dict[str, nn.Linear],
    inputs: LayerInputs,
    weights: LayerWeights | None,
    device: torch.device | str,
    blocks: FinishedBlocks | None = None,
    fp_inputs: FPInputs | None = None,
) -> dict[str, HessianAccumulator]:
    """Run the layer on every sample until all of `linears` have received their inputs.

    Linears fed the very same input tensor (q/k/v, gate/up) with the same token weights share one
    accumulator: their Hessians are equal, so it is summed once (per-linear weights give each its own). The pass stops before the group's last linear
    runs, since nothing after it is needed; once the first batch has shown that the whole group
    reads one input, later batches stop before its first linear. With `fp_inputs` the accumulators
    also sum the FP-target cross term.
    """
    cross = fp_inputs is not None
    per_linear = {name: None if weights is None else weights.for_linear(name) for name in linears}
    accumulators = {
        name: HessianAccumulator(lin.in_features, device, cross, 1 if weights is None else weights.groups_of(name))
        for name, lin in linears.items()
    }
    current: dict = {"seen": set(), "inputs": [], "one_input": False, "batch": 0}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            # Identity, not data pointers: the held references keep freed memory from being reused.
            owner = next(
                (other for tensor, other in current["inputs"] if tensor is x and per_linear[other] is per_linear[name]),
                None,
            )
            if blocks is not None:
                blocks.keep_input(name, x)
            if owner is None:
                fp = _fp_input(fp_inputs[name][current["batch"]]) if cross else None
                weight = None if per_linear[name] is None else per_linear[name][current["batch"]]
                accumulators[name].add(x, weight, fp)
                current["inputs"].append((x, name))
            else:
                accumulators[name] = accumulators[owner]
            current["seen"].add(name)
            if len(current["seen"]) == len(linears) or current["one_input"]:
                raise StopForward

        return hook

    handles = [lin.register_forward_pre_hook(make_hook(name)) for name, lin in linears.items()]
    batches = blocks.passes(inputs) if blocks is not None else range(len(inputs))
    try:
        for index in batches:
            current["batch"] = index
            current["seen"] = set()
            current["inputs"] = []
            try:
                run_layer(layer, inputs, index)
            except StopForward:
                pass
            current["one_input"] = len({id(acc) for acc in accumulators.values()}) == 1
    finally:
        for handle in handles:
            handle.remove()
    return accumulators


def result_stats(weight: torch.Tensor, result: QuantResult, hessian: torch.Tensor | None) -> torch.Tensor:
    """Row-additive error sums of one (slice of a) solve: ||D||^2, ||W||^2, tr(D H D^T), tr(W H W^T)."""
    quantized = result.dequantize().to(weight.device)
    delta = weight - quantized
    stats = [float(delta.pow(2).sum()), float(weight.pow(2).sum()), float("nan"), float("nan")]
    if hessian is not None:
        stats[2] = float(torch.einsum("oi,ij,oj->", delta, hessian, delta))
        stats[3] = float(torch.einsum("oi,ij,oj->", weight, hessian, weight))
    return torch.tensor(stats, dtype=torch.float64)


def report_entry(stats: torch.Tensor, with_hessian: bool) -> dict:
    """A linear's report from its result_stats: relative weight error, and output error given H."""
    entry = {"weight_rel_mse": float(stats[0] / max(float(stats[1]), 1e-30))}
    if with_hessian:
        entry["output_rel_err"] = float(stats[2] / stats[3]) if stats[3] > 0 else 0.0
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
    total = acc.weight_sums.to(acc.hessian.device)
    for tensor in [acc.hessian, total] + ([acc.cross] if acc.cross is not None else []):
        if dst is None:
            comm.all_reduce_sum_(tensor)
        else:
            comm.reduce_sum_(tensor, dst)
    acc.weight_sums = total.cpu()


def solve_rows(solve: Callable, weights: list[torch.Tensor], hessian: torch.Tensor | None, spec: QuantSpec,
               names: Sequence[str], cross: torch.Tensor | None = None) -> list[QuantResult]:
    """Solve linears that share `hessian` (and `cross`) as one problem with their rows stacked; one CPU
    result each. GPTQ's rows are independent given H, so this runs the column loop once for all."""
    stacked = weights[0] if len(weights) == 1 else torch.cat(weights)
    joint = solve(_target(stacked, hessian, cross, spec), hessian, spec, name=" + ".join(names))
    if len(weights) == 1:
        return [_to_cpu(joint)]
    out, start = [], 0
    for weight in weights:
        out.append(_to_cpu(joint.rows(start, start + weight.shape[0])))
        start += weight.shape[0]
    return out


def _share_result(
    comm: Comm, mine: tuple[QuantResult, torch.Tensor] | None, pieces: list[Piece], linear: nn.Linear,
    spec: QuantSpec,
) -> tuple[QuantResult, torch.Tensor]:
    """Assemble one linear's QuantResult on every rank from the row slices its pieces' ranks solved.

    Each slice's rows are broadcast from the rank that solved it (g_idx, identical in every slice
    since it depends on the Hessian only, from the first); the error sums are all-reduced.
    """
    out_f, in_f = linear.out_features, linear.in_features
    groups = 1 if spec.group_size == -1 else in_f // spec.group_size
    stats = mine[1].clone() if mine is not None else torch.zeros(4, dtype=torch.float64)
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
    result = QuantResult(
        qweight=full[0], scales=full[1], zeros=full[2], g_idx=g_idx,
        bits=spec.bits, group_size=spec.group_size, sym=spec.sym, act_order=spec.act_order,
    )
    return result, stats


def quantize_layer(
    layer: nn.Module,
    index: int,
    inputs: LayerInputs,
    adapter: Adapter,
    spec: QuantSpec,
    method: str,
    device: torch.device | str,
    weights: Sequence[torch.Tensor] | LayerWeights | None = None,
    comm: Comm | None = None,
    observer: HessianObserver | None = None,
    fp_inputs: LayerInputs | None = None,
    fp_dir: Path | None = None,
) -> tuple[dict[str, QuantResult], dict]:
    """Quantize one decoder layer in place, group by group, then replace `inputs` by the quantized
    layer's outputs on them (the next layer's inputs; not for RTN, which reads none); return its
    results and report.

    With `fp_inputs` (the FP model's inputs to this layer, same batches) each linear is fitted to
    its FP output W x_t instead of W x~_t (quantkit.quant.gptaq), and `fp_inputs` advances to the FP
    layer's outputs. The FP linear inputs are kept in CPU memory, or in `fp_dir` when given (removed
    once each is used).

    With several ranks, `inputs` is this rank's shard: each linear is planned onto one or more
    ranks (plan_group: whole, or cut by output rows); its Hessian sums (and weight totals) are
    reduced onto its rank, or all-reduced when several ranks solve slices of it, and the solved
    rows are broadcast back so every rank ends with the whole result.

    `weights` are per batch of `inputs` (LayerInputs.batch_weights): one list for every linear, or
    LayerWeights with per-linear overrides; [T, g] overrides give each of g output-row groups its
    own Hessian (quantkit.engine.weights).
    """
    import os

    from quantkit.engine.comm import SPLIT_ENV
    from quantkit.quant import solver_for

    comm = comm or Comm()
    solve = solver_for(method)
    needs_hessian = method != "rtn"
    shared = needs_hessian and comm.distributed
    split_all = os.environ.get(SPLIT_ENV, "") == "1"
    results: dict[str, QuantResult] = {}
    reports = {}
    fp_linear_inputs = None
    if weights is not None:
        weights = as_layer_weights(weights)
    if fp_inputs is not None and needs_hessian:
        fp_linear_inputs = record_fp_inputs(layer, adapter, fp_inputs, fp_dir)
    blocks = FinishedBlocks(layer, adapter)
    for group in adapter.linear_order:
        linears = {name: get_module(layer, name) for name in group}
        if shared:
            plan = plan_group(linears, comm.world_size, split_all)
        else:
            plan = {name: [(comm.rank, 0, lin.out_features)] for name, lin in linears.items()}
        hessians: dict[str, torch.Tensor] = {}
        crosses: dict[str, torch.Tensor] = {}
        # Linears solved together: in one process, those sharing a Hessian (q/k/v, gate/up) are
        # one GPTQ problem with their rows stacked (GPTQ's rows are independent given H), which
        # runs the column loop once instead of once per linear.
        together = [[name] for name in group]
        if needs_hessian:
            accumulators = accumulate_group(layer, linears, inputs, weights, device, blocks, fp_linear_inputs)
            if fp_linear_inputs is not None:
                # Files (--offload-dir) go once no later group of the layer reads them.
                used = {e for name in group for e in fp_linear_inputs.pop(name) if isinstance(e, Path)}
                still = {e for entries in fp_linear_inputs.values() for e in entries if isinstance(e, Path)}
                for path in used - still:
                    path.unlink()
            by_accumulator: dict[int, list[str]] = {}
            for name in group:
                by_accumulator.setdefault(id(accumulators[name]), []).append(name)
            if not comm.distributed:
                together = [names for names in by_accumulator.values() if accumulators[names[0]].groups == 1]
                together += [[name] for names in by_accumulator.values() for name in names if accumulators[name].groups > 1]
            for name in group:
                acc = accumulators.pop(name)
                if comm.distributed and len(by_accumulator[id(acc)]) > 1:
                    acc = acc.copy()  # reductions work in place: each linear reduces its own copy
                ranks = sorted({piece[0] for piece in plan[name]})
                reduce_accumulator(acc, comm, ranks[0] if len(ranks) == 1 else None)
                if comm.rank in ranks:
                    hessians[name] = acc.result()
                    if acc.cross is not None:
                        crosses[name] = acc.cross_result()
                del acc
        solved: dict[str, tuple[QuantResult, torch.Tensor]] = {}
        for names in (names for names in together if len(names) > 1):
            hessian = hessians[names[0]]
            fulls = [f"{adapter.layer_prefix(index)}.{name}" for name in names]
            if observer is not None:
                for full in fulls:
                    observer(full, hessian)
            parts = [linears[name].weight.data.float() for name in names]
            for name, weight, result in zip(names, parts, solve_rows(solve, parts, hessian, spec, fulls, crosses.get(names[0]))):
                solved[name] = (result, result_stats(weight, result, hessian))
            for name in names:
                del hessians[name]
                crosses.pop(name, None)
        for name in (names[0] for names in together if len(names) == 1):
            mine = [(start, end) for rank, start, end in plan[name] if rank == comm.rank]
            if not mine:
                continue
            start, end = mine[0]
            full = f"{adapter.layer_prefix(index)}.{name}"
            hessian = hessians.pop(name, None)
            if observer is not None and hessian is not None and plan[name][0][0] == comm.rank:
                observer(full, hessian)
            weight = linears[name].weight.data[start:end].float()
            solved[name] = solve_slice(
                solve, weight, start, linears[name].out_features, hessian, crosses.pop(name, None), spec, full
            )
            del hessian, weight
        for name in group:
            linear = linears[name]
            if shared:
                result, stats = _share_result(comm, solved.get(name), plan[name], linear, spec)
            else:
                result, stats = solved[name]
                result = _to_cpu(result)
            linear.weight.data.copy_(result.dequantize().to(linear.weight.device, linear.weight.dtype))
            entry = report_entry(stats, needs_hessian)
            if needs_hessian:
                entry["solved_on_ranks"] = [[rank, start, end] for rank, start, end in plan[name]]
            reports[name] = entry
            results[f"{adapter.layer_prefix(index)}.{name}"] = result
        del solved, hessians, crosses
        blocks.mark_solved(group)
    if needs_hessian:  # RTN reads no activations: the next layer needs no inputs
        blocks.to_record.clear()  # the propagation is the layer's last pass: nothing left to replay into
        propagate(layer, inputs, blocks)
    return results, reports


def solve_slice(
    solve: Callable, weight: torch.Tensor, start: int, out_features: int, hessian: torch.Tensor | None,
    cross: torch.Tensor | None, spec: QuantSpec, name: str,
) -> tuple[QuantResult, torch.Tensor]:
    """Solve output rows [start, start + len(weight)) of a linear with `out_features` rows; return the
    result and its result_stats. A [g, in, in] Hessian (and cross term) holds one Hessian per output-row
    group (quantkit.engine.weights.row_ranges): each group's rows are solved with their own."""
    if hessian is None or hessian.dim() == 2:
        result = solve(_target(weight, hessian, cross, spec), hessian, spec, name=name)
        return result, result_stats(weight, result, hessian)
    end = start + weight.shape[0]
    parts, stats = [], torch.zeros(4, dtype=torch.float64)
    for group, (low, high) in enumerate(row_ranges(out_features, hessian.shape[0])):
        low, high = max(low, start), min(high, end)
        if low >= high:
            continue
        rows = weight[low - start : high - start]
        group_cross = None if cross is None else cross[group]
        part = solve(_target(rows, hessian[group], group_cross, spec), hessian[group], spec, name=f"{name}[{low}:{high}]")
        stats += result_stats(rows, part, hessian[group])
        parts.append(_to_cpu(part))
    if any(not torch.equal(part.g_idx, parts[0].g_idx) for part in parts):
        raise QuantkitError(
            f"{name}: output-row groups chose different act-order groupings; use static groups "
            "(the default with act-order) or a single row group"
        )
    return QuantResult.cat_rows(parts), stats


def _target(weight: torch.Tensor, hessian: torch.Tensor | None, cross: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """The weight GPTQ rounds toward: W itself, or with the cross term the FP target W C H~^-1."""
    if cross is None:
        return weight
    from quantkit.quant.gptaq import fp_target_weight

    return fp_target_weight(weight, hessian, cross, spec.damp)


def quantize_head(
    model: nn.Module,
    adapter: Adapter,
    inputs: LayerInputs,
    spec: QuantSpec,
    method: str,
    device: torch.device | str,
    weights: Sequence[torch.Tensor] | None = None,
    comm: Comm | None = None,
    fp_inputs: LayerInputs | None = None,
) -> tuple[dict[str, QuantResult], dict]:
    """Quantize lm_head in place from the final norm of the quantized stream `inputs` (the last
    layer's outputs); with `fp_inputs`, toward its FP output. Return its result and report.

    `weights` are the last decoder layer's token weights: its output gradient is the gradient at
    the head's normed input up to the norm. Every rank sums its shard, the sums are all-reduced,
    and every rank solves the same problem, so all end with the same head.
    """
    from quantkit.quant import solver_for

    comm = comm or Comm()
    if isinstance(weights, LayerWeights):
        weights = weights.output
    norm = get_module(model, adapter.final_norm).to(device)
    head = get_module(model, adapter.lm_head).to(device)
    hessian = cross = None
    if method != "rtn":
        acc = HessianAccumulator(head.in_features, device, cross=fp_inputs is not None)
        for index in range(len(inputs)):
            fp = None if fp_inputs is None else norm(fp_inputs.hidden[index].to(device))
            acc.add(norm(inputs.hidden[index].to(device)), None if weights is None else weights[index], fp)
        reduce_accumulator(acc, comm)
        hessian, cross = acc.result(), acc.cross_result()
    weight = head.weight.data.float()
    [result] = solve_rows(solver_for(method), [weight], hessian, spec, [adapter.lm_head], cross)
    return {adapter.lm_head: result}, install_result(head, weight, result, hessian)


def propagate(layer: nn.Module, inputs: LayerInputs, blocks: FinishedBlocks | None = None) -> None:
    """Replace each sample's hidden state by the (quantized) layer's output on it."""
    for index in blocks.passes(inputs) if blocks is not None else range(len(inputs)):
        inputs.hidden[index] = run_layer(layer, inputs, index)


def fp_target_default(method: str) -> bool:
    """Whether `method` fits the FP target unless told otherwise: TLQ does (it carried TLQ's gains on
    the reference LM's validation windows, benchmarks/bench_tlq.py); GPTQ and RTN do not."""
    return method.lower() == "tlq"


def fp_target_on(method: str, fp_target: bool | None) -> bool:
    """Whether a run carries the FP stream: fp_target None means fp_target_default; never for RTN,
    which reads no activations."""
    return (fp_target_default(method) if fp_target is None else fp_target) and method != "rtn"


def fp_stream(inputs: LayerInputs, method: str, fp_target: bool | None) -> LayerInputs | None:
    """The FP stream to carry beside `inputs` (a copy of layer 0's inputs), or None (fp_target_on)."""
    if not fp_target_on(method, fp_target):
        return None
    return LayerInputs([h.clone() for h in inputs.hidden], inputs.kwargs, inputs.sizes)


def first_layer_streams(
    model: nn.Module, adapter: Adapter, samples: Sequence[dict], spec: QuantSpec, method: str,
    device: torch.device | str, fp_target: bool | None, vision: bool, comm: Comm, batch_size: int,
) -> tuple[LayerInputs, LayerInputs | None, dict[str, QuantResult], dict | None]:
    """Layer 0's inputs on this rank's shard of `samples` and the FP stream beside them (or None);
    with `vision`, after quantizing the vision side (quantkit.engine.vision), whose results and
    report come back too."""
    mine = shard(samples, comm)
    if not vision:
        inputs = stack_samples(capture_layer_inputs(model, adapter, mine, device), batch_size)
        return inputs, fp_stream(inputs, method, fp_target), {}, None
    from quantkit.engine.vision import check_vision, quantize_vision, vision_groups

    if not adapter.vision:
        raise QuantkitError(f"{adapter.name} models have no vision side to quantize; drop --quantize-vision")
    move_outside_layers(model, adapter, device)
    groups = vision_groups(model, adapter, samples[0], device)
    check_vision(model, groups, spec)
    # The FP stream starts from the FP vision side's outputs, so it is captured first (and only when used).
    fp_inputs = None
    if fp_target_on(method, fp_target):
        fp_inputs = stack_samples(capture_layer_inputs(model, adapter, mine, device), batch_size)
    results, report = quantize_vision(model, adapter, mine, groups, spec, method, device, comm)
    inputs = stack_samples(capture_layer_inputs(model, adapter, mine, device), batch_size)
    return inputs, fp_inputs, results, report


def layer_weights(
    token_weights: TokenWeights | None, index: int, inputs: LayerInputs, adapter: Adapter, comm: Comm
) -> tuple[LayerWeights | None, dict[str, dict]]:
    """Layer `index`'s token weights for this rank's batches of `inputs`, and their diagnosis per
    linear (over all samples, so every rank reports the same)."""
    if token_weights is None:
        return None, {}
    weights = as_layer_weights(token_weights(index))
    if weights.floor is None:
        weights.floor = getattr(token_weights, "floor", None)
    report = diagnose_layer(weights, adapter.linear_names())
    return weights.map(lambda per_sample: inputs.batch_weights(shard(per_sample, comm))), report


def shard(items: Sequence, comm: Comm) -> list:
    """This rank's share of `items`: every world_size-th one, starting at its rank."""
    return list(items[comm.rank :: comm.world_size])


@torch.no_grad()
def calibrate_model(
    model: nn.Module,
    samples: Sequence[dict],
    spec: QuantSpec,
    method: str = "gptq",
    device: torch.device | str = "cpu",
    token_weights: TokenWeights | None = None,
    progress: bool = True,
    *,
    comm: Comm | None = None,
    observer: HessianObserver | None = None,
    fp_target: bool | None = None,
    lm_head: bool = False,
    vision: bool = False,
) -> Calibration:
    """Quantize every decoder-layer linear of `model` in place, layer by layer (a VLM's vision tower
    and projector first, with `vision`: see quantkit.engine.vision; lm_head last, with `lm_head`:
    see quantize_head).

    Each layer sees the outputs of the already-quantized layers below it; inside a layer the
    linears are solved group by group in execution order, so o_proj sees the quantized q/k/v.
    With a TorchComm, `samples` (and token weights) are the full set on every rank: each rank
    runs its shard of them, and every rank ends with the same quantized model and results.
    fp_target fits each linear to the FP model's output on the FP model's inputs (GPTAQ-style),
    carrying an FP stream beside the quantized one; None means the method's default
    (fp_target_default).
    """
    from quantkit.quant import solver_for

    comm = comm or Comm()
    solver_for(method)  # unknown methods fail before any work
    adapter = adapter_for(model)
    check_model(model, adapter, spec, lm_head)
    if not samples:
        raise QuantkitError("no calibration samples; give --calib data with at least one sample")

    started = time.perf_counter()
    rss_at_start = current_rss_mb()
    layers = adapter.decoder_layers(model)
    inputs, fp_inputs, results, vision_report = first_layer_streams(
        model, adapter, samples, spec, method, device, fp_target, vision, comm, BATCH_SIZE
    )
    hidden_mb = sum(h.numel() * h.element_size() for h in inputs.hidden) / 2**20
    layer_reports = []
    bar = tqdm(range(len(layers)), desc=f"calibrate {method} w{spec.bits}", disable=not progress or comm.rank != 0)
    for index in bar:
        comm.enter_layer(index)
        layer_started = time.perf_counter()
        layer = layers[index].to(device)
        weights, weight_report = layer_weights(token_weights, index, inputs, adapter, comm)
        layer_results, linear_reports = quantize_layer(
            layer, index, inputs, adapter, spec, method, device, weights, comm, observer, fp_inputs
        )
        for name, entry in weight_report.items():
            linear_reports[name]["token_weights"] = entry
        results.update(layer_results)
        layers[index] = layer.to("cpu")
        layer_reports.append(
            {"layer": index, "seconds": round(time.perf_counter() - layer_started, 4), "linears": linear_reports}
        )
    head_report = None
    if lm_head:
        weights, _ = layer_weights(token_weights, len(layers) - 1, inputs, adapter, comm)
        head_results, head_report = quantize_head(model, adapter, inputs, spec, method, device, weights, comm, fp_inputs)
        results.update(head_results)
    report = {
        "method": method,
        "fp_target": fp_inputs is not None,
        "lm_head": head_report,
        "vision": vision_report,
        "spec": spec.to_dict(),
        "nsamples": len(samples),
        "device": str(device),
        "seconds": round(time.perf_counter() - started, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        # what calibration adds on top of the loaded model (activations, Hessians, one layer's work)
        "peak_rss_over_start_mb": None if rss_at_start is None else round(peak_rss_mb() - rss_at_start, 1),
        "hidden_states_mb": round(hidden_mb, 3),  # this rank's activations entering each layer
        "layers": layer_reports,
    }
    if comm.distributed:
        report["world_size"] = comm.world_size
        report["rank_peak_rss_mb"] = comm.gather_objects(report["peak_rss_mb"])
        report["rank_peak_rss_over_start_mb"] = comm.gather_objects(report["peak_rss_over_start_mb"])
        report["rank_hidden_states_mb"] = comm.gather_objects(report["hidden_states_mb"])
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        report["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    model.to("cpu")
    return Calibration(results=results, report=report)


def _to_cpu(result: QuantResult) -> QuantResult:
    for attr in ("qweight", "scales", "zeros", "g_idx"):
        setattr(result, attr, getattr(result, attr).cpu())
    return result
