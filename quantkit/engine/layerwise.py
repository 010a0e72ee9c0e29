"""The layer-wise calibration loop: quantization-exposed, one decoder layer on the device at a time."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from quantkit.engine.capture import LayerInputs, StopForward, capture_layer_inputs, run_layer
from quantkit.engine.comm import Comm
from quantkit.engine.hessian import HessianAccumulator
from quantkit.errors import QuantkitError
from quantkit.models import adapter_for, get_module
from quantkit.models.base import Adapter
from quantkit.quant.spec import QuantResult, QuantSpec

# token_weights(layer_index) -> one weight tensor per sample (shape [tokens] or [1, tokens]).
TokenWeights = Callable[[int], Sequence[torch.Tensor]]
# observer(full_linear_name, normalised_hessian): sees every Hessian handed to the solver.
HessianObserver = Callable[[str, torch.Tensor], None]


@dataclass
class Calibration:
    """What a calibration run produced: quantized codes per linear and a report."""

    results: dict[str, QuantResult]
    report: dict = field(default_factory=dict)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def check_layer(layer: nn.Module, index: int, adapter: Adapter, spec: QuantSpec) -> None:
    """Raise QuantkitError if a linear of decoder layer `index` cannot be quantized."""
    for name in adapter.linear_names():
        linear = get_module(layer, name)
        full = f"{adapter.layer_prefix(index)}.{name}"
        if spec.group_size != -1 and linear.in_features % spec.group_size:
            raise QuantkitError(
                f"group size {spec.group_size} does not divide the input width {linear.in_features} "
                f"of {full}; choose a divisor or -1 (per-channel)"
            )
        if linear.weight.device.type != "meta" and not torch.isfinite(linear.weight).all():
            raise QuantkitError(f"weight of {full} contains NaN or Inf; fix the checkpoint before quantizing")


def check_model(model: nn.Module, adapter: Adapter, spec: QuantSpec) -> None:
    """Fail fast, before any work, on settings or weights that cannot be quantized."""
    spec.validate()
    for index, layer in enumerate(adapter.decoder_layers(model)):
        check_layer(layer, index, adapter, spec)


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


def accumulate_group(
    layer: nn.Module,
    linears: dict[str, nn.Linear],
    inputs: LayerInputs,
    weights: Sequence[torch.Tensor] | None,
    device: torch.device | str,
) -> dict[str, HessianAccumulator]:
    """Run the layer on every sample until all of `linears` have seen their inputs."""
    accumulators = {name: HessianAccumulator(lin.in_features, device) for name, lin in linears.items()}
    current: dict = {"weight": None, "seen": set()}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            accumulators[name].add(args[0], current["weight"])
            current["seen"].add(name)
            if len(current["seen"]) == len(linears):
                raise StopForward

        return hook

    handles = [lin.register_forward_hook(make_hook(name)) for name, lin in linears.items()]
    try:
        for index in range(len(inputs)):
            current["weight"] = None if weights is None else weights[index]
            current["seen"] = set()
            try:
                run_layer(layer, inputs, index)
            except StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return accumulators


def _share_result(
    comm: Comm, result: QuantResult | None, stats: torch.Tensor, owner: int, linear: nn.Linear, spec: QuantSpec
) -> QuantResult:
    """Broadcast one linear's QuantResult (and its report stats) from the rank that solved it."""
    comm.broadcast_(stats, owner)
    if comm.rank == owner:
        tensors = [result.qweight, result.scales, result.zeros, result.g_idx]
    else:
        out_f, in_f, groups = linear.out_features, linear.in_features, int(stats[0])
        tensors = [
            torch.empty(out_f, in_f, dtype=torch.uint8),
            torch.empty(out_f, groups, dtype=torch.float32),
            torch.empty(out_f, groups, dtype=torch.uint8),
            torch.empty(in_f, dtype=torch.int32),
        ]
    tensors = [t.cpu().contiguous() for t in tensors]
    for tensor in tensors:
        comm.broadcast_(tensor, owner)
    return QuantResult(
        qweight=tensors[0], scales=tensors[1], zeros=tensors[2], g_idx=tensors[3],
        bits=spec.bits, group_size=spec.group_size, sym=spec.sym, act_order=spec.act_order,
    )


def quantize_layer(
    layer: nn.Module,
    index: int,
    inputs: LayerInputs,
    adapter: Adapter,
    spec: QuantSpec,
    method: str,
    device: torch.device | str,
    weights: Sequence[torch.Tensor] | None = None,
    comm: Comm | None = None,
    observer: HessianObserver | None = None,
) -> tuple[dict[str, QuantResult], dict]:
    """Quantize one decoder layer in place, group by group; return its results and report.

    With several ranks, `inputs` is this rank's shard: Hessian sums (and weight totals) are
    reduced onto the rank that solves each linear, and the results are broadcast back.
    """
    from quantkit.quant import solver_for

    comm = comm or Comm()
    solve = solver_for(method)
    needs_hessian = method != "rtn"
    results: dict[str, QuantResult] = {}
    reports = {}
    for group in adapter.linear_order:
        linears = {name: get_module(layer, name) for name in group}
        owners = assign_owners(linears, comm.world_size) if needs_hessian else dict.fromkeys(linears, comm.rank)
        hessians: dict[str, torch.Tensor] = {}
        if needs_hessian:
            accumulators = accumulate_group(layer, linears, inputs, weights, device)
            for name in group:
                acc = accumulators.pop(name)
                if comm.distributed:
                    total = torch.tensor([acc.weight_sum], dtype=torch.float64, device=acc.hessian.device)
                    comm.reduce_sum_(acc.hessian, owners[name])
                    comm.reduce_sum_(total, owners[name])
                    acc.weight_sum = float(total[0])
                if owners[name] == comm.rank:
                    hessians[name] = acc.result()
                del acc
        solved: dict[str, tuple[QuantResult, torch.Tensor]] = {}
        for name in group:
            if owners[name] != comm.rank:
                continue
            full = f"{adapter.layer_prefix(index)}.{name}"
            hessian = hessians.pop(name, None)
            if observer is not None and hessian is not None:
                observer(full, hessian)
            weight = linears[name].weight.data.float()
            result = solve(weight, hessian, spec, name=full)
            quantized = result.dequantize().to(weight.device)
            rel_mse = float((weight - quantized).pow(2).sum() / weight.pow(2).sum().clamp_min(1e-30))
            out_err = relative_output_error(weight, quantized, hessian) if hessian is not None else float("nan")
            stats = torch.tensor([result.scales.shape[1], rel_mse, out_err], dtype=torch.float64)
            solved[name] = (result, stats)
            del hessian, weight, quantized
        for name in group:
            linear = linears[name]
            if needs_hessian and comm.distributed:
                result, stats = solved.get(name, (None, torch.zeros(3, dtype=torch.float64)))
                result = _share_result(comm, result, stats, owners[name], linear, spec)
            else:
                result, stats = solved[name]
                result = _to_cpu(result)
            linear.weight.data.copy_(result.dequantize().to(linear.weight.device, linear.weight.dtype))
            entry = {"weight_rel_mse": float(stats[1])}
            if needs_hessian:
                entry["output_rel_err"] = float(stats[2])
                entry["solved_on_rank"] = owners[name]
            reports[name] = entry
            results[f"{adapter.layer_prefix(index)}.{name}"] = result
        del solved, hessians
    return results, reports


def propagate(layer: nn.Module, inputs: LayerInputs) -> None:
    """Replace each sample's hidden state by the (quantized) layer's output on it."""
    for sample in range(len(inputs)):
        inputs.hidden[sample] = run_layer(layer, inputs, sample)


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
) -> Calibration:
    """Quantize every decoder-layer linear of `model` in place, layer by layer.

    Each layer sees the outputs of the already-quantized layers below it; inside a layer the
    linears are solved group by group in execution order, so o_proj sees the quantized q/k/v.
    With a TorchComm, `samples` (and token weights) are the full set on every rank: each rank
    runs its shard of them, and every rank ends with the same quantized model and results.
    """
    from quantkit.quant import solver_for

    comm = comm or Comm()
    solver_for(method)  # unknown methods fail before any work
    adapter = adapter_for(model)
    check_model(model, adapter, spec)
    if not samples:
        raise QuantkitError("no calibration samples; give --calib data with at least one sample")

    started = time.perf_counter()
    layers = adapter.decoder_layers(model)
    inputs = capture_layer_inputs(model, adapter, shard(samples, comm), device)
    results: dict[str, QuantResult] = {}
    layer_reports = []
    bar = tqdm(range(len(layers)), desc=f"calibrate {method} w{spec.bits}", disable=not progress or comm.rank != 0)
    for index in bar:
        comm.enter_layer(index)
        layer_started = time.perf_counter()
        layer = layers[index].to(device)
        weights = shard(token_weights(index), comm) if token_weights is not None else None
        layer_results, linear_reports = quantize_layer(
            layer, index, inputs, adapter, spec, method, device, weights, comm, observer
        )
        results.update(layer_results)
        propagate(layer, inputs)
        layers[index] = layer.to("cpu")
        layer_reports.append(
            {"layer": index, "seconds": round(time.perf_counter() - layer_started, 4), "linears": linear_reports}
        )
    report = {
        "method": method,
        "spec": spec.to_dict(),
        "nsamples": len(samples),
        "device": str(device),
        "seconds": round(time.perf_counter() - started, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "layers": layer_reports,
    }
    if comm.distributed:
        report["world_size"] = comm.world_size
        report["rank_peak_rss_mb"] = comm.gather_objects(report["peak_rss_mb"])
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        report["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    model.to("cpu")
    return Calibration(results=results, report=report)


def _to_cpu(result: QuantResult) -> QuantResult:
    for attr in ("qweight", "scales", "zeros", "g_idx"):
        setattr(result, attr, getattr(result, attr).cpu())
    return result
