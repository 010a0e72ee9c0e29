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
from quantkit.engine.hessian import HessianAccumulator
from quantkit.errors import QuantkitError
from quantkit.models import adapter_for, get_module
from quantkit.models.base import Adapter
from quantkit.quant.spec import QuantResult, QuantSpec

# token_weights(layer_index) -> one weight tensor per sample (shape [tokens] or [1, tokens]).
TokenWeights = Callable[[int], Sequence[torch.Tensor]]


@dataclass
class Calibration:
    """What a calibration run produced: quantized codes per linear and a report."""

    results: dict[str, QuantResult]
    report: dict = field(default_factory=dict)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def check_model(model: nn.Module, adapter: Adapter, spec: QuantSpec) -> None:
    """Fail fast, before any work, on settings or weights that cannot be quantized."""
    spec.validate()
    for index, layer in enumerate(adapter.decoder_layers(model)):
        for name in adapter.linear_names():
            linear = get_module(layer, name)
            full = f"{adapter.layer_prefix(index)}.{name}"
            if spec.group_size != -1 and linear.in_features % spec.group_size:
                raise QuantkitError(
                    f"group size {spec.group_size} does not divide the input width {linear.in_features} "
                    f"of {full}; choose a divisor or -1 (per-channel)"
                )
            if not torch.isfinite(linear.weight).all():
                raise QuantkitError(f"weight of {full} contains NaN or Inf; fix the checkpoint before quantizing")


def relative_output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(D H D^T) / tr(W H W^T) with D = W - Wq: the layer output error relative to its energy."""
    delta = weight - quantized
    num = torch.einsum("oi,ij,oj->", delta, hessian, delta)
    den = torch.einsum("oi,ij,oj->", weight, hessian, weight)
    return float(num / den) if den > 0 else 0.0


def _accumulate_group(
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


@torch.no_grad()
def calibrate_model(
    model: nn.Module,
    samples: Sequence[dict],
    spec: QuantSpec,
    method: str = "gptq",
    device: torch.device | str = "cpu",
    token_weights: TokenWeights | None = None,
    progress: bool = True,
) -> Calibration:
    """Quantize every decoder-layer linear of `model` in place, layer by layer.

    Each layer sees the outputs of the already-quantized layers below it; inside a layer the
    linears are solved group by group in execution order, so o_proj sees the quantized q/k/v.
    """
    from quantkit.quant import solver_for

    solve = solver_for(method)
    needs_hessian = method != "rtn"
    adapter = adapter_for(model)
    check_model(model, adapter, spec)
    if not samples:
        raise QuantkitError("no calibration samples; give --calib data with at least one sample")

    started = time.perf_counter()
    layers = adapter.decoder_layers(model)
    inputs = capture_layer_inputs(model, adapter, samples, device)
    results: dict[str, QuantResult] = {}
    layer_reports = []
    bar = tqdm(range(len(layers)), desc=f"calibrate {method} w{spec.bits}", disable=not progress)
    for index in bar:
        layer_started = time.perf_counter()
        layer = layers[index].to(device)
        weights = token_weights(index) if token_weights is not None else None
        linear_reports = {}
        for group in adapter.linear_order:
            linears = {name: get_module(layer, name) for name in group}
            hessians = {}
            if needs_hessian:
                accumulators = _accumulate_group(layer, linears, inputs, weights, device)
                hessians = {name: acc.result() for name, acc in accumulators.items()}
            for name, linear in linears.items():
                full = f"{adapter.layer_prefix(index)}.{name}"
                weight = linear.weight.data.float()
                result = solve(weight, hessians.get(name), spec, name=full)
                quantized = result.dequantize().to(weight.device)
                entry = {"weight_rel_mse": float((weight - quantized).pow(2).sum() / weight.pow(2).sum().clamp_min(1e-30))}
                if name in hessians:
                    entry["output_rel_err"] = relative_output_error(weight, quantized, hessians[name])
                linear_reports[name] = entry
                linear.weight.data.copy_(quantized.to(linear.weight.dtype))
                results[full] = _to_cpu(result)
        for sample in range(len(inputs)):
            inputs.hidden[sample] = run_layer(layer, inputs, sample)
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
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        report["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    model.to("cpu")
    return Calibration(results=results, report=report)


def _to_cpu(result: QuantResult) -> QuantResult:
    for attr in ("qweight", "scales", "zeros", "g_idx"):
        setattr(result, attr, getattr(result, attr).cpu())
    return result
