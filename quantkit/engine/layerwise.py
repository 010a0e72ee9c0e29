"""One decoder layer's quantization: FP-target inputs, Hessians group by group in execution order, solves, propagation.

The outer loop over layers is quantkit.engine.driver; the pieces a layer's work uses live beside
this file: plan.py (which rank solves what), blocks.py (replaying finished blocks), solve.py
(solving and sharing results), checks.py (fail-fast checks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from quantkit.engine.blocks import FinishedBlocks
from quantkit.engine.capture import LayerInputs, StopForward, run_layer
from quantkit.engine.comm import Comm
from quantkit.engine.hessian import HessianAccumulator
from quantkit.engine.plan import LinearPlan, plan_group
from quantkit.engine.routed import (
    ROUTED,
    ExpertRows,
    ExpertTally,
    RoutedFPEntry,
    RoutedFPInputs,
    fp_rows,
    is_routed,
    routed_tokens,
    row_samples,
    rows_of,
)
from quantkit.engine.solve import (
    GroupSolve,
    diagonal_blocks,
    install_result,
    reduce_accumulator,
    report_entry,
    solve_rows,
)
from quantkit.engine.weights import LayerWeights, as_layer_weights
from quantkit.models import get_module
from quantkit.models.base import Adapter
from quantkit.models.experts import set_all_tokens
from quantkit.quant.activations import ActivationQuantizer, fake_quantize_tokens
from quantkit.quant.methods import Method, method_for
from quantkit.quant.spec import QuantResult, QuantSpec

# linear name -> its FP input on each batch (linears fed one tensor share the list's entries); an
# entry is the tensor itself, the file it was saved to when the inputs are kept on disk, or for an
# expert projection what computes its FP input on the tokens the quantized stream routes to it
FPInputs = dict[str, list[torch.Tensor | Path | RoutedFPEntry]]


def record_fp_inputs(layer: nn.Module, linear_names: Sequence[str], fp_inputs: LayerInputs,
                     directory: Path | None = None) -> FPInputs:
    """Run the still-FP `layer` on the FP stream: keep every linear's input per batch and advance the
    stream to the layer's FP outputs (the FP target's x_t, and the next layer's FP inputs).

    The kept inputs (about 3 hidden widths plus the MLP width per token) go to CPU memory, or to
    files in `directory` (--offload-dir), so a GPU holds only the layer and the streams; linears
    fed one tensor keep one copy.
    """
    routed = [name for name in linear_names if is_routed(layer, name)]
    kept: FPInputs = {name: [] for name in linear_names if name not in routed}
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

    def keep_once(x: torch.Tensor) -> torch.Tensor | Path:
        if id(x) not in copies:
            copies[id(x)] = (x, copy_of(x))
        return copies[id(x)][1]

    handles = []
    for name in kept:
        def keep(module: nn.Module, args: tuple, name: str = name) -> None:
            kept[name].append(keep_once(args[0]))
        handles.append(get_module(layer, name).register_forward_pre_hook(keep))
    experts = RoutedFPInputs(layer, keep_once) if routed else None
    if experts is not None:
        handles += experts.hooks()
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
    for name in routed:
        kept[name] = experts.entries(name, len(fp_inputs))
    return kept


def accumulate_group(
    layer: nn.Module,
    linears: dict[str, nn.Linear],
    inputs: LayerInputs,
    weights: LayerWeights | None,
    device: torch.device | str,
    blocks: FinishedBlocks | None = None,
    fp_inputs: FPInputs | None = None,
    unweighted: frozenset[str] = frozenset(),
    expert_rows: ExpertRows = ROUTED,
) -> dict[str, HessianAccumulator]:
    """Run the layer on every sample until all of `linears` have received their inputs.

    Linears fed the very same input tensor (q/k/v, gate/up) with the same token weights share one
    accumulator: their Hessians are equal, so it is summed once (per-linear weights give each its own). The pass stops before the group's last linear
    runs, since nothing after it is needed; once the first batch has shown that the whole group
    reads one input, later batches stop before its first linear. With `fp_inputs` the accumulators
    also sum the FP-target cross term. Linears in `unweighted` (their method weighs no tokens) sum
    plain Hessians whatever `weights` holds. An expert
    projection (quantkit.engine.routed) sees the tokens `expert_rows` gives it, weighed by those tokens' weights
    (times its own) and fitted to their FP inputs.
    """
    cross = fp_inputs is not None
    plain = weights is None or weights.uniform
    per_linear = {name: None if plain or name in unweighted else weights.for_linear(name) for name in linears}
    accumulators = {
        name: HessianAccumulator(lin.in_features, device, cross,
                                 1 if per_linear[name] is None else weights.groups_of(name))
        for name, lin in linears.items()
    }
    current: dict = {"seen": set(), "inputs": [], "one_input": False, "batch": 0}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            # Identity, not data pointers: the held references keep freed memory from being reused.
            rows = expert_rows.key(module)  # mix weighs experts' rows apart: experts reading one tensor share no sums
            owner = next((other for tensor, other, key in current["inputs"]
                          if tensor is x and per_linear[other] is per_linear[name] and key is rows), None)
            if blocks is not None:
                blocks.keep_input(name, x)
            if owner is None:
                tokens = routed_tokens(module)
                fp = fp_rows(fp_inputs[name][current["batch"]], tokens) if cross else None
                weight = None if per_linear[name] is None else per_linear[name][current["batch"]]
                samples = row_samples(x, tokens, inputs.hidden[current["batch"]])
                weight = expert_rows.weigh(module, rows_of(weight, tokens, accumulators[name].groups))
                accumulators[name].add(x, weight, fp, samples)
                current["inputs"].append((x, name, rows))
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


def quantize_layer(
    layer: nn.Module,
    index: int,
    inputs: LayerInputs,
    adapter: Adapter,
    spec: QuantSpec,
    method: Method | str,
    device: torch.device | str,
    weights: Sequence[torch.Tensor] | LayerWeights | None = None,
    comm: Comm | None = None,
    fp_inputs: LayerInputs | None = None,
    fp_dir: Path | None = None,
    plan: LinearPlan | None = None,
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

    Every Hessian a solver is given goes to `comm.hooks.on_hessian` too (tests).

    `weights` are per batch of `inputs` (LayerInputs.batch_weights): one list for every linear, or
    LayerWeights with per-linear overrides; [T, g] overrides give each of g output-row groups its
    own Hessian (quantkit.engine.weights).

    `plan` gives each linear its settings (a recipe's; by default `spec` and `method` for all): linears
    it leaves in FP are not touched, and each linear is solved by its own method with its own spec. The
    run's `method` decides what is gathered (Hessians, token weights): a linear overridden to a method that
    reads no activations is solved from its weight alone, one overridden to a method that weighs no tokens
    from a plain Hessian.

    A mixture-of-experts layer's expert projections (quantkit.engine.routed) are solved on the tokens
    routed to each expert; with method.expert_tokens all or mix every expert runs on every token for statistics
    (weighed as EXPERT_TOKENS says; the layer's output keeps the real routing). Each expert's report gives its
    routed tokens; an expert that no calibration token reached is rounded to nearest, and its report says so.
    """
    comm = comm or Comm()
    observer = comm.hooks.on_hessian
    method = method_for(method)
    plan = plan or LinearPlan(spec, method)
    prefix = adapter.layer_prefix(index)
    names = adapter.linear_names(index)
    settings = {name: plan.settings(f"{prefix}.{name}") for name in names}
    needs_hessian = method.needs_activations
    # the token weights given are the run method's; a linear overridden to a method that weighs none sums a plain Hessian
    unweighted = frozenset(name for name, s in settings.items()
                           if s is not None and s.method != method and not s.method.token_weights)
    results: dict[str, QuantResult] = {}
    reports = {}
    fp_linear_inputs = None
    if weights is not None:
        weights = as_layer_weights(weights)
    tally = ExpertTally(layer, names, adapter.linear_groups(index))
    if fp_inputs is not None and needs_hessian:
        fp_linear_inputs = record_fp_inputs(layer, names, fp_inputs, fp_dir)
    routed_fp = {e.owner for entries in (fp_linear_inputs or {}).values() for e in entries if isinstance(e, RoutedFPEntry)}
    expert_rows = ExpertRows.start(layer, method.expert_tokens, inputs, comm, method.expert_prior)
    blocks = FinishedBlocks(layer, names)
    # Quantization-exposed (after the FP stream's pass): the quantized stream's linears see their
    # inputs fake-quantized, in their Hessians and in the outputs handed to the next layer.
    quantized = [name for name in names if settings[name] is not None]  # a recipe's FP linears read FP inputs
    act = None if spec.act_bits is None else ActivationQuantizer(layer, quantized, spec.act_bits)
    for group_index, group in enumerate(adapter.linear_groups(index)):
        active = [name for name in group if settings[name] is not None]
        linears = {name: get_module(layer, name) for name in active}
        # the linears solved from Hessians; the others (RTN) are solved from their weights on every rank
        hessian_names = [name for name in active if needs_hessian and settings[name].method.needs_activations]
        shared = set(hessian_names) if comm.distributed else set()
        plan_rows = {name: [(comm.rank, 0, lin.out_features)] for name, lin in linears.items()}
        if shared:
            factors = {} if weights is None else weights.row_metrics  # their blocks' rows are rounded together
            plan_rows.update(plan_group({n: linears[n] for n in hessian_names}, comm.world_size, comm.hooks.split_rows,
                                        {n: factors[n].shape[1] for n in hessian_names if n in factors}))
        hessians: dict[str, torch.Tensor] = {}
        crosses: dict[str, torch.Tensor] = {}
        # Linears solved together: in one process, those sharing a Hessian (q/k/v, gate/up) and their
        # settings are one GPTQ problem with their rows stacked (GPTQ's rows are independent given H),
        # which runs the column loop once instead of once per linear.
        together, joined = [[name] for name in active], []
        empty: set[str] = set()  # expert projections no calibration token reached: rounded to nearest
        if hessian_names:
            tally.start(group_index)
            accumulators = accumulate_group(layer, {n: linears[n] for n in hessian_names}, inputs, weights, device,
                                            blocks, fp_linear_inputs, unweighted, expert_rows)
            empty = tally.finish(group_index, accumulators, hessian_names, comm)
            by_accumulator: dict[int, list[str]] = {}
            for name in hessian_names:
                by_accumulator.setdefault(id(accumulators[name]), []).append(name)
            alike: dict[tuple, list[str]] = {}
            for name in (n for n in hessian_names if n not in empty):
                alike.setdefault((id(accumulators[name]), settings[name]), []).append(name)
            joined = [names for names in alike.values() if accumulators[names[0]].groups == 1]
            if not comm.distributed:
                together = list(joined)
                together += [[name] for names in alike.values() for name in names if accumulators[name].groups > 1]
                together += [[name] for name in active if name not in hessian_names or name in empty]
            for name in hessian_names:
                acc = accumulators.pop(name)
                if name in empty:
                    continue
                if comm.distributed and len(by_accumulator[id(acc)]) > 1:
                    acc = acc.copy()  # reductions work in place: each linear reduces its own copy
                ranks = sorted({piece[0] for piece in plan_rows[name]})
                reduce_accumulator(acc, comm, ranks[0] if len(ranks) == 1 else None)
                if comm.rank in ranks:
                    hessians[name], cross = acc.take_results()
                    if cross is not None:
                        crosses[name] = cross
                del acc
        if fp_linear_inputs is not None:
            # Files (--offload-dir) go once no later group of the layer reads them.
            used = {e for name in group for e in fp_linear_inputs.pop(name) if isinstance(e, Path)}
            still = {e for entries in fp_linear_inputs.values() for e in entries if isinstance(e, Path)}
            for path in used - still:
                path.unlink()
        originals = {name: linears[name].weight.data.float() for name in active}  # the solves read the FP weights

        metrics = {} if weights is None else {n: m for n, m in weights.row_metrics.items()
                                              if n in hessian_names and n not in unweighted and n not in empty}
        if comm.distributed:  # each linear alone, in the blocks one process's joint solve of them uses (GroupSolve.metric)
            for names in (names for names in joined if any(n in metrics for n in names)):
                width = math.gcd(*(metrics[n].shape[1] if n in metrics else originals[n].shape[0] for n in names))
                metrics.update({n: diagonal_blocks(metrics[n], width) for n in names if n in metrics})
        solving = {**settings, **{n: replace(settings[n], method=method_for("rtn")) for n in empty}}
        group_solve = GroupSolve(linears, originals, solving, together, plan_rows, shared, comm, prefix, metrics)
        solved = group_solve.solve(hessians, crosses)
        if observer is not None:
            for name in hessian_names:
                if name in hessians and plan_rows[name][0][0] == comm.rank:
                    observer(f"{prefix}.{name}", hessians[name], crosses.get(name))
        group_solve.install(solved)
        for name in active:
            result, stats = solved[name]
            entry = report_entry(stats, name in hessian_names and name not in empty)
            if name in hessian_names:
                entry["solved_on_ranks"] = [[rank, start, end] for rank, start, end in plan_rows[name]]
            tally.annotate(name, entry, prefix)
            entry.update(settings[name].describe())
            reports[name] = entry
            results[f"{prefix}.{name}"] = result
        del solved, hessians, crosses, originals, group_solve
        # linears left in FP count as done at their turn: a block is replayed once all its linears are final
        blocks.mark_solved(group)
    set_all_tokens(layer, False)  # the layer's output is the same either way: the propagation needs no statistics
    for owner in routed_fp:
        owner.close()
    tally.report(reports)
    if needs_hessian:  # RTN reads no activations: the next layer needs no inputs
        blocks.to_record.clear()  # the propagation is the layer's last pass: nothing left to replay into
        propagate(layer, inputs, blocks)
    if act is not None:
        act.remove()
    return results, reports


def quantize_head(
    model: nn.Module,
    adapter: Adapter,
    inputs: LayerInputs,
    spec: QuantSpec,
    method: Method | str,
    device: torch.device | str,
    weights: Sequence[torch.Tensor] | None = None,
    comm: Comm | None = None,
    fp_inputs: LayerInputs | None = None,
    plan: LinearPlan | None = None,
) -> tuple[dict[str, QuantResult], dict | None]:
    """Quantize lm_head in place from the final norm of the quantized stream `inputs` (the last
    layer's outputs); with `fp_inputs`, toward its FP output. Return its result and report.

    `weights` are the last decoder layer's token weights: its output gradient is the gradient at
    the head's normed input up to the norm. Every rank sums its shard, the sums are all-reduced,
    and every rank solves the same problem, so all end with the same head. `plan` gives the head its
    settings (its own method and spec under a recipe); where it leaves the head in FP, nothing happens
    and the report is None.
    """
    comm = comm or Comm()
    settings = (plan or LinearPlan(spec, method)).settings(adapter.lm_head)
    if settings is None:
        return {}, None
    if isinstance(weights, LayerWeights):
        weights = None if weights.uniform else weights.output
    if settings.method != method_for(method) and not settings.method.token_weights:
        weights = None  # the given weights are the run method's: an override that weighs no tokens sums a plain Hessian
    spec, method = settings.spec, settings.method
    norm = adapter.norm(model).to(device)
    head = get_module(model, adapter.lm_head).to(device)
    hessian = cross = None
    if method.needs_activations:
        acc = HessianAccumulator(head.in_features, device, cross=fp_inputs is not None)
        for index in range(len(inputs)):
            fp = None if fp_inputs is None else norm(fp_inputs.hidden[index].to(device))
            x = norm(inputs.hidden[index].to(device))
            if spec.act_bits is not None:  # the head reads its inputs quantized at inference, as the layers' linears
                x = fake_quantize_tokens(x, spec.act_bits)
            acc.add(x, None if weights is None else weights[index], fp)
        reduce_accumulator(acc, comm)
        hessian, cross = acc.take_results()
    weight = head.weight.data.float()
    [result] = solve_rows(method.solve, [weight], hessian, spec, [adapter.lm_head], cross)
    return {adapter.lm_head: result}, install_result(head, weight, result, hessian) | settings.describe()


def propagate(layer: nn.Module, inputs: LayerInputs, blocks: FinishedBlocks | None = None) -> None:
    """Replace each sample's hidden state by the (quantized) layer's output on it."""
    for index in blocks.passes(inputs) if blocks is not None else range(len(inputs)):
        inputs.hidden[index] = run_layer(layer, inputs, index)
