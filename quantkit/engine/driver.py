"""The one outer calibration loop: checks, layer 0's streams, each decoder layer in turn, the head, one report.

Where the decoder layers live is a LayerStore strategy: InMemoryLayers (the loaded model) or
quantkit.engine.streaming.StreamedLayers (read from the safetensors files, finished layers written
to a work area, resumable). Ranks are the Comm argument, so every store works with every world size:
each rank runs its shard of the samples and every rank ends with the same results.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from quantkit.engine.capture import (
    LayerInputs,
    capture_layer_inputs,
    move_outside_layers,
    stack_samples,
)
from quantkit.engine.checks import candidate_linears, check_model
from quantkit.engine.comm import Comm
from quantkit.engine.layerwise import propagate, quantize_head, quantize_layer
from quantkit.engine.plan import LinearPlan
from quantkit.engine.vision import check_vision, quantize_vision, vision_groups
from quantkit.engine.weights import LayerWeights, TokenWeights, as_layer_weights, diagnose_layer
from quantkit.errors import QuantkitError
from quantkit.memory import current_rss_mb, peak_rss_mb
from quantkit.models import adapter_for
from quantkit.models.base import Adapter
from quantkit.quant.activations import quantized_inputs
from quantkit.quant.methods import Method, method_for
from quantkit.quant.recipe import Recipe
from quantkit.quant.spec import QuantResult, QuantSpec

# Samples per layer pass where they can be stacked (see stack_samples).
BATCH_SIZE = 16


@dataclass
class Calibration:
    """What a calibration run produced: quantized codes per linear and a report."""

    results: Mapping[str, QuantResult]
    report: dict = field(default_factory=dict)


class LayerStore(Protocol):
    """Where the decoder layers live during calibration (a strategy of the outer loop)."""

    low_memory: bool
    fp_dir: Path | None  # where the FP target's linear inputs go (None: memory)

    def open(self) -> int:
        """Prepare the store; return the first layer left to calibrate (0, or later on a resume)."""

    def restore(self, inputs: LayerInputs, fp_inputs: LayerInputs | None) -> None:
        """Bring the streams to the first layer left (on a resume), or keep them where they are."""

    def load(self, index: int) -> nn.Module:
        """Decoder layer `index`, ready to be quantized in place (on the CPU)."""

    def finish(self, index: int, layer: nn.Module, results: dict[str, QuantResult], report: dict,
               inputs: LayerInputs, fp_inputs: LayerInputs | None) -> None:
        """Keep quantized layer `index` (its results and report) and the streams entering the next one."""

    def layer_reports(self) -> list[dict]:
        """The report entries of every finished layer, in order."""

    def results(self, outside: dict[str, QuantResult]) -> Mapping[str, QuantResult]:
        """Every result: the layers' and `outside`'s (vision side, head)."""

    def close(self) -> None:
        """Leave the model where the caller expects it (on the CPU)."""


class InMemoryLayers:
    """The whole model is loaded: layers move to the device one at a time and back."""

    low_memory = False
    fp_dir = None

    def __init__(self, model: nn.Module, adapter: Adapter) -> None:
        self.model = model
        self.layers = adapter.decoder_layers(model)
        self._results: dict[str, QuantResult] = {}
        self._reports: list[dict] = []

    def open(self) -> int:
        """Nothing to prepare: start at layer 0."""
        return 0

    def restore(self, inputs: LayerInputs, fp_inputs: LayerInputs | None) -> None:
        """Nothing to restore."""

    def load(self, index: int) -> nn.Module:
        """The loaded layer itself."""
        return self.layers[index]

    def finish(self, index: int, layer: nn.Module, results: dict[str, QuantResult], report: dict,
               inputs: LayerInputs, fp_inputs: LayerInputs | None) -> None:
        """Put the quantized layer back on the CPU; keep its results in memory."""
        self.layers[index] = layer.to("cpu")
        self._results.update(results)
        self._reports.append(report)

    def layer_reports(self) -> list[dict]:
        """The reports kept by finish."""
        return self._reports

    def results(self, outside: dict[str, QuantResult]) -> dict[str, QuantResult]:
        """The outside results first, then the layers', as one dict."""
        return {**outside, **self._results}

    def close(self) -> None:
        """Bring everything back to the CPU."""
        self.model.to("cpu")


def shard(items: Sequence, comm: Comm) -> list:
    """This rank's share of `items`: every world_size-th one, starting at its rank."""
    return list(items[comm.rank :: comm.world_size])


def fp_stream(inputs: LayerInputs, method: Method, fp_target: bool | None) -> LayerInputs | None:
    """The FP stream to carry beside `inputs` (a copy of layer 0's inputs), or None (Method.fp_target_on)."""
    if not method.fp_target_on(fp_target):
        return None
    return LayerInputs([h.clone() for h in inputs.hidden], inputs.kwargs, inputs.sizes, inputs.layer_kwargs,
                       inputs.between)


def _stacked(model: nn.Module, adapter: Adapter, inputs: LayerInputs, device: torch.device | str,
             batch_size: int) -> LayerInputs:
    """stack_samples, where each kind of decoder layer gives the same outputs stacked as one by one (not checked
    where the layers are not loaded yet: --low-memory streams them in later)."""
    layers = adapter.decoder_layers(model)
    if any(p.device.type == "meta" for p in layers.parameters()):
        return stack_samples(inputs, batch_size)
    return stack_samples(inputs, batch_size, layers, device)


def first_layer_streams(
    model: nn.Module, adapter: Adapter, samples: Sequence[dict], spec: QuantSpec, method: Method | str,
    device: torch.device | str, fp_target: bool | None, vision: bool, comm: Comm, batch_size: int,
    plan: LinearPlan | None = None,
) -> tuple[LayerInputs, LayerInputs | None, dict[str, QuantResult], dict | None]:
    """Layer 0's inputs on this rank's shard of `samples` and the FP stream beside them (or None);
    with `vision`, after quantizing the vision side (quantkit.engine.vision), whose results and
    report come back too."""
    method = method_for(method)
    mine = shard(samples, comm)
    if not vision:
        inputs = _stacked(model, adapter, capture_layer_inputs(model, adapter, mine, device), device, batch_size)
        return inputs, fp_stream(inputs, method, fp_target), {}, None
    move_outside_layers(model, adapter, device)
    groups = vision_groups(model, adapter, samples[0], device)
    check_vision(model, groups, spec, plan)
    # The FP stream starts from the FP vision side's outputs, so it is captured first (and only when used).
    fp_inputs = None
    if method.fp_target_on(fp_target):
        fp_inputs = _stacked(model, adapter, capture_layer_inputs(model, adapter, mine, device), device, batch_size)
    # with act_bits the quantized vision linears read quantized inputs while they are solved and while the
    # language model's first inputs are captured, as at inference
    solved = [name for group in groups for name in group if (plan or LinearPlan(spec, method)).settings(name) is not None]
    with quantized_inputs(model, solved, spec.act_bits):
        results, report = quantize_vision(model, adapter, mine, groups, spec, method, device, comm, plan)
        inputs = _stacked(model, adapter, capture_layer_inputs(model, adapter, mine, device), device, batch_size)
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
    report = diagnose_layer(weights, adapter.linear_names(index))
    return weights.map(lambda per_sample: inputs.batch_weights(shard(per_sample, comm))), report


@torch.no_grad()
def run_layers(
    model: nn.Module,
    store: LayerStore,
    samples: Sequence[dict],
    plan: LinearPlan,
    device: torch.device | str = "cpu",
    token_weights: TokenWeights | None = None,
    progress: bool = True,
    *,
    comm: Comm | None = None,
    fp_target: bool | None = None,
    lm_head: bool = False,
    vision: bool = False,
) -> Calibration:
    """The outer loop over `model`'s decoder layers, held by `store`, quantizing as `plan` says (the run's
    QuantSpec and Method, a recipe's per-module settings; see calibrate_model for the rest)."""
    comm = comm or Comm()
    spec, method, recipe = plan.spec, plan.method, plan.recipe
    adapter = adapter_for(model)
    # shapes only for layers on meta: their weights are checked on load
    check_model(model, adapter, plan, lm_head, vision)
    if not samples and (method.reads_samples or vision):
        raise QuantkitError(f"no calibration samples; {method} reads activations: give --calib data with at least one sample")
    started = time.perf_counter()
    rss_at_start = current_rss_mb()
    start = store.open()
    n_layers = len(adapter.decoder_layers(model))
    inputs, fp_inputs, results, vision_report = first_layer_streams(
        model, adapter, samples, spec, method, device, fp_target, vision, comm, BATCH_SIZE, plan
    )
    hidden_mb = sum(h.numel() * h.element_size() for h in inputs.hidden) / 2**20
    store.restore(inputs, fp_inputs)
    desc = f"calibrate {method.name} w{spec.bits}" + (" (low memory)" if store.low_memory else "")
    bar = tqdm(range(start, n_layers), desc=desc, disable=not progress or comm.rank != 0)
    sample_ids = shard(range(len(samples)), comm)  # this rank's samples' places in the whole set (pre-solve)
    for index in bar:
        comm.enter_layer(index)
        layer_started = time.perf_counter()
        layer = store.load(index).to(device)
        for stream in (inputs, fp_inputs):
            if stream is not None:
                stream.enter_layer(index)
        weights, weight_report = layer_weights(token_weights, index, inputs, adapter, comm)
        # before the FP stream's pass, so the FP target is read in the transformed basis
        presolve_report = method.presolve.apply(layer, adapter, inputs, spec, weights, comm=comm, sample_ids=sample_ids)
        layer_results, linear_reports = quantize_layer(
            layer, index, inputs, adapter, spec, method, device, weights, comm,
            fp_inputs, store.fp_dir, plan,
        )
        if presolve_report is not None and not method.needs_activations:
            # quantize_layer leaves the stream where it is for RTN; the next layer's pre-solve step reads it
            quantized = [n for n in adapter.linear_names(index) if plan.settings(f"{adapter.layer_prefix(index)}.{n}")]
            with quantized_inputs(layer, quantized, spec.act_bits):
                propagate(layer, inputs)
        for name, entry in weight_report.items():
            chosen = plan.settings(f"{adapter.layer_prefix(index)}.{name}")
            # the weights a linear was solved with: the run method's, unless a recipe gave it a method without
            if chosen is not None and (chosen.method == method or chosen.method.token_weights):
                linear_reports[name]["token_weights"] = entry
        report = {"layer": index, "seconds": round(time.perf_counter() - layer_started, 4), "linears": linear_reports}
        if adapter.layout(index).full_precision:  # the layer's weights that are not quantized, and why
            report["full_precision"] = dict(adapter.layout(index).full_precision)
        if presolve_report is not None:
            report[method.presolve.name] = presolve_report
        store.finish(index, layer, layer_results, report, inputs, fp_inputs)
    head_report = None
    if lm_head:
        weights, _ = layer_weights(token_weights, n_layers - 1, inputs, adapter, comm)
        head_results, head_report = quantize_head(model, adapter, inputs, spec, method, device, weights, comm, fp_inputs,
                                                  plan)
        results.update(head_results)
    report = {
        "method": method.name,
        "fp_target": fp_inputs is not None,
        "lm_head": head_report,
        "vision": vision_report,
        "spec": spec.to_dict(),
        "presolve": method.presolve.to_dict(),
        "expert_tokens": method.expert_tokens,  # the tokens of a mixture of experts' statistics (EXPERT_TOKENS)
        # mix's every-token prior in tokens per projection input (Method.expert_prior); the other kinds have none
        "expert_prior": method.expert_prior if method.expert_tokens == "mix" else None,
        "recipe": None if recipe is None else recipe.to_dict(),
        # the linears the recipe leaves in full precision
        "ignored": sorted(name for name in candidate_linears(model, adapter, lm_head=lm_head, vision=vision)
                          if plan.settings(name) is None),
        "nsamples": len(samples),
        "device": str(device),
        "low_memory": store.low_memory,
        "resumed_from_layer": start or None,
        "seconds": round(time.perf_counter() - started, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        # what calibration adds on top of the loaded model (activations, Hessians, one layer's work)
        "peak_rss_over_start_mb": None if rss_at_start is None else round(peak_rss_mb() - rss_at_start, 1),
        "hidden_states_mb": round(hidden_mb, 3),  # this rank's activations entering each layer
        "layers": store.layer_reports(),
    }
    if adapter.before_norm:  # modules between the last layer and the final norm (DeepSeek-V4's hyper-connection head)
        report["full_precision"] = {name: "runs after the last decoder layer, before the final norm: kept in full "
                                          "precision" for name in adapter.before_norm}
    if comm.distributed:
        report["world_size"] = comm.world_size
        report["rank_peak_rss_mb"] = comm.gather_objects(report["peak_rss_mb"])
        report["rank_peak_rss_over_start_mb"] = comm.gather_objects(report["peak_rss_over_start_mb"])
        report["rank_hidden_states_mb"] = comm.gather_objects(report["hidden_states_mb"])
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        report["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(torch.device(device)) / 2**20, 1)
    store.close()
    return Calibration(results=store.results(results), report=report)


def calibrate_model(
    model: nn.Module,
    samples: Sequence[dict],
    spec: QuantSpec,
    method: Method | str = "gptq",
    device: torch.device | str = "cpu",
    token_weights: TokenWeights | None = None,
    progress: bool = True,
    *,
    comm: Comm | None = None,
    fp_target: bool | None = None,
    lm_head: bool = False,
    vision: bool = False,
    recipe: Recipe | None = None,
) -> Calibration:
    """Quantize every decoder-layer linear of a loaded `model` in place, layer by layer (a VLM's vision
    tower and projector first, with `vision`: see quantkit.engine.vision; lm_head last, with `lm_head`:
    see quantize_head).

    Each layer sees the outputs of the already-quantized layers below it; inside a layer the
    linears are solved group by group in execution order, so o_proj sees the quantized q/k/v.
    With a TorchComm, `samples` (and token weights) are the full set on every rank: each rank
    runs its shard of them, and every rank ends with the same quantized model and results.
    fp_target fits each linear to the FP model's output on the FP model's inputs (GPTAQ-style),
    carrying an FP stream beside the quantized one; None means the method's default.
    recipe (quantkit.quant.recipe) picks the linears to quantize and gives each its own settings, `spec`
    and `method` being its defaults; the linears it leaves out keep their FP weights and have no result.
    A mixture-of-experts model's fused experts become per-expert linears first (quantkit.models.experts), each
    solved on the tokens routed to it (or as Method.with_expert_tokens says).
    """
    store = InMemoryLayers(model, adapter_for(model))  # fused experts become per-expert linears here
    plan = LinearPlan(spec, method, recipe)  # an unknown method fails here, before any work
    return run_layers(model, store, samples, plan, device, token_weights, progress, comm=comm, fp_target=fp_target,
                      lm_head=lm_head, vision=vision)
