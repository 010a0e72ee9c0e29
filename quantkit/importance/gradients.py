"""TLQ's gradient pass: raw token scores from a block-wise backward, per layer output or per linear
(per output-row group), with the data's labels or Fisher labels drawn from the FP model.

Memory: the forward pass stores every layer's FP input for each sample (in RAM, or in one safetensors file per layer
under an offload directory), then the backward runs block by block from the top, recomputing each layer from its stored
input; only one decoder layer (plus final norm and lm_head for the top) and one chunk's activations are live at a time
(the layers in memory, or read from the files one at a time: quantkit.importance.layers).
Where one chunk's autograd graph through every layer is small (backward.KEPT_GRAPH_BYTES; CPU, no offload) each
chunk runs forward through every layer and back instead: no stored inputs, no recompute, the same numbers.
Samples that share their layer kwargs (plain text of one length) run in chunks of
``batch_size`` along the batch dimension (checked once against per-sample outputs; else one
sample at a time). The top block runs the last decoder layer with autograd, so that layer is
not run twice.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from quantkit.engine.capture import capture_layer_inputs, run_layer
from quantkit.engine.weights import row_ranges
from quantkit.errors import QuantkitError
from quantkit.importance.backward import (
    KEPT_GRAPH_BYTES,
    GraphTooLarge,
    StoredInputs,
    block_gram,
    chunk_through_layers,
    chunks,
    frozen,
    head_gradient,
    run_chunk,
)
from quantkit.importance.layers import HeldLayers, batching_works_on
from quantkit.importance.masks import scored_positions, valid_mask
from quantkit.models import adapter_for, get_module
from quantkit.models.base import Adapter

GUIDANCE_CHOICES = ("layer", "linear")
LOSS_CHOICES = ("ce", "fisher")


def check_guidance(guidance: str, row_groups: int, loss: str, draws: int) -> None:
    """Raise QuantkitError on gradient-guidance settings out of range."""
    if guidance not in GUIDANCE_CHOICES:
        raise QuantkitError(f"guidance must be one of {GUIDANCE_CHOICES}, got {guidance!r}")
    if loss not in LOSS_CHOICES:
        raise QuantkitError(f"importance loss must be one of {LOSS_CHOICES}, got {loss!r}")
    if row_groups < 1:
        raise QuantkitError(f"row groups must be at least 1, got {row_groups}")
    if row_groups > 1 and guidance != "linear":
        raise QuantkitError("output-row groups need per-linear guidance (--guidance linear)")
    if draws < 1:
        raise QuantkitError(f"Fisher draws must be at least 1, got {draws}")
    if draws > 1 and loss != "fisher":
        raise QuantkitError(f"{draws} Fisher draws (--fisher-draws) sample labels for the Fisher loss only; "
                            "add --importance-loss fisher or drop --fisher-draws")


@dataclass
class ImportanceScores:
    """Raw scores of one gradient pass: per layer output, and per linear with linear guidance."""

    layer: list[list[torch.Tensor]]  # [layers][samples] -> [T]: ||dL/dy_{l,t}||^2
    linear: list[dict[str, list[torch.Tensor]]] | None  # [layers]{linear: [samples] -> [T] or [T, g]}
    report: dict
    gradients: list[list[torch.Tensor]] | None = None  # [layers][samples] -> [T, d] (keep_gradients)
    # [layers]{linear: [blocks, b, b]}: each linear's output-side factor, block-diagonal (output_side=b)
    linear_factors: list[dict[str, torch.Tensor]] | None = None


def _row_group_squares(grad: torch.Tensor, groups: int) -> torch.Tensor:
    """Squared gradient summed over each output-row group (row_groups): [..., out] -> [..., groups]."""
    squares = grad.float().square()
    if groups == 1:
        return squares.sum(-1, keepdim=True)
    return torch.stack([squares[..., low:high].sum(-1) for low, high in row_ranges(grad.shape[-1], groups)], dim=-1)


@contextlib.contextmanager
def _output_gradient_hooks(layer: nn.Module, names: Sequence[str], on_grad):
    """While active, every backward through `layer` calls on_grad(name, grad) with the gradient at the output of
    each linear in `names`."""
    handles = []
    for name in names:
        def forward_hook(module: nn.Module, args: tuple, output: torch.Tensor, name: str = name) -> None:
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(lambda grad, name=name: on_grad(name, grad))
        handles.append(get_module(layer, name).register_forward_hook(forward_hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _linear_output_hooks(layer: nn.Module, names: Sequence[str], groups: int, found: dict[str, list[torch.Tensor]]):
    """While active, every backward through `layer` appends [B, T, groups] squared output gradients of
    each linear in `names` to found[name] (one entry per backward: per draw)."""
    return _output_gradient_hooks(
        layer, names, lambda name, grad: found[name].append(_row_group_squares(grad.detach(), groups)))


@dataclass(frozen=True)
class GradientSettings:
    """Which gradients the pass takes and how it batches them (importance_scores' keyword settings)."""

    batch_size: int = 16  # samples that share their layer kwargs run this many at a time
    guidance: str = "layer"  # the gradient at each layer's output, or at each linear's ("linear")
    row_groups: int = 1  # with linear guidance: groups of each linear's output rows
    loss: str = "ce"  # the data's labels, or labels drawn from the FP model ("fisher")
    draws: int = 1  # Fisher labels per position
    seed: int = 0  # of the Fisher draws
    output_side: int | None = None  # also sum each linear's block-diagonal output-side factor (blocks of b rows)


def _linear_factor_hooks(layer: nn.Module, names: Sequence[str], block: int, sums: dict[str, torch.Tensor]):
    """While active, every backward through `layer` adds each linear's block-diagonal sum of g g^T over its output
    rows to sums[name] (float64 [out / b, b, b]), in blocks of b = gcd(block, out) rows: `block` where it divides
    the linear's rows, else the largest width that divides both (engine.solve.GroupSolve joins linears of two
    widths at the smaller)."""
    def add(name: str, grad: torch.Tensor) -> None:
        out = grad.shape[-1]
        width = math.gcd(block, out)
        part = block_gram(grad.detach().reshape(-1, out // width, width).float()).double().cpu()
        sums[name] = part if name not in sums else sums[name] + part

    return _output_gradient_hooks(layer, names, add)


def importance_scores(
    model: nn.Module,
    samples: Sequence[dict],
    *,
    device: torch.device | str = "cpu",
    offload_dir: str | Path | None = None,
    progress: bool = True,
    keep_gradients: bool = False,
    adapter: Adapter | None = None,
    layers_from: HeldLayers | None = None,
    **settings,
) -> ImportanceScores:
    """Raw scores ||dL/dy_{l,t}||^2 [layers][samples] -> [T] via a block-wise backward, and with
    guidance "linear" each linear's ||dL/dz_{j,t}||^2 at its own output z (per output-row group).
    `settings` are GradientSettings' fields.

    Samples that share their layer kwargs (plain text of one length) run `batch_size` at a
    time, concatenated along the batch dimension, in the forward and in each block's
    backward; a probe on layer 0 checks that the shared kwargs broadcast over the batch
    (batched output == per-sample output) and falls back to one sample at a time otherwise.
    Peak memory: one block plus one chunk's activations (and the stored layer inputs), or where it is small
    (KEPT_GRAPH_BYTES) one chunk's graph through every layer, which saves the recompute.

    loss "ce" differentiates the cross-entropy on the data's next tokens; "fisher" draws `draws`
    labels per position from the FP model's own softmax (seeded by `seed`, per sample and draw) and
    averages the squared gradients over the draws: the empirical Fisher of the KL to the FP model.
    Each block's forward is recomputed once and differentiated once per draw. Linear guidance reads
    the linears' output gradients with hooks in the same backward (layer 0, whose output gradient
    alone needs no recompute, is then recomputed too).

    output_side=b sums each linear's output-side factor sum_t g_t g_t^T / tokens, g = dL/dz at the linear's
    output z, block-diagonal over b consecutive output rows ([out / b, b, b]; read with hooks in the same
    backward, layer 0 recomputed): GPTQ's row metric (quantkit.quant.gptq, feedback across rows).
    `layers_from` gives the decoder layers (importance.layers.FileLayers: read from a streamed skeleton's files).
    """
    g = GradientSettings(**settings)
    batch_size, guidance, row_groups, loss, draws, seed, output_side = (
        g.batch_size, g.guidance, g.row_groups, g.loss, g.draws, g.seed, g.output_side)
    adapter = adapter or adapter_for(model)
    if not samples:
        raise QuantkitError("no calibration samples for token importance")
    if batch_size < 1:
        raise QuantkitError(f"importance batch size must be at least 1, got {batch_size}")
    check_guidance(guidance, row_groups, loss, draws)
    started = time.perf_counter()
    access = layers_from or HeldLayers(model, adapter, device)
    num_layers = len(access.layers)
    per_linear = guidance == "linear"
    moe = next((i for i in range(num_layers) if adapter.layouts[i].experts), None)
    if per_linear and moe is not None:
        # an expert projection sees only the tokens routed to it: its output gradient has no [batch, tokens] rows
        raise QuantkitError(f"--guidance linear (importance guidance='linear') weighs each linear's own tokens, "
                            f"which the routed experts of layer {moe} ({getattr(model.config, 'model_type', '?')}, "
                            "a mixture of experts) do not have; use --guidance layer (the default)")
    if output_side is not None and output_side < 1:
        raise QuantkitError(f"output-side factor blocks must be at least 1 row, got {output_side}")
    hooked = per_linear or output_side is not None  # linear outputs are read in the backward
    draws = draws if loss == "fisher" else 1
    scored = [scored_positions(s) for s in samples]
    empty = {i for i, m in enumerate(scored) if not bool(m.any())}
    stored = StoredInputs(offload_dir)
    scores: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
    linear_scores: list[dict[str, list]] | None = (
        [{name: [None] * len(samples) for name in adapter.linear_names(index)} for index in range(num_layers)]
        if per_linear else None
    )
    gradients: list[list[torch.Tensor]] | None = [[] for _ in range(num_layers)] if keep_gradients else None
    valid_tokens = sum(int(valid_mask(s).sum()) for s in samples)
    bar = tqdm(total=2 * num_layers, desc="importance", disable=not progress)
    batched = False
    live = [i for i in range(len(samples)) if i not in empty]
    # grads[i]: [draws, T, d], the gradient at the current layer's output for each draw
    grads: list[torch.Tensor | None] = [None] * len(samples)
    samplers = None
    if loss == "fisher":
        samplers = [
            [torch.Generator().manual_seed(seed * 1_000_003 + index * 1_009 + draw) for draw in range(draws)]
            for index in range(len(samples))
        ]

    def record(index: int) -> None:
        for grad in grads:
            # a token's score sums over everything after the token axis (hyper-connection layers: [T, streams, d])
            scores[index].append(grad.float().pow(2).flatten(2).sum(-1).mean(0).reshape(-1).cpu())
            if gradients is not None:
                gradients[index].append(grad[0].float().cpu())

    blocks: list[dict[str, torch.Tensor]] = [{} for _ in range(num_layers)]

    def hooks_on(index: int, layer: nn.Module, found: dict[str, list[torch.Tensor]]):
        stack = contextlib.ExitStack()
        if per_linear:
            stack.enter_context(_linear_output_hooks(layer, list(found), row_groups, found))
        if output_side is not None:
            stack.enter_context(_linear_factor_hooks(layer, list(found), output_side, blocks[index]))
        return stack

    def record_linears(index: int, chunk: list[int], found: dict[str, list[torch.Tensor]]) -> None:
        for name, per_draw in found.items():
            if not per_draw:  # an unused linear: no gradient reached it
                raise QuantkitError(f"linear {name} of layer {index} received no gradient; use layer guidance")
            mean = torch.stack(per_draw).mean(0)  # [B, T, groups], averaged over draws
            for j, i in enumerate(chunk):
                value = mean[j].cpu()
                linear_scores[index][name][i] = value[:, 0] if row_groups == 1 else value
            per_draw.clear()

    def backward_block(index: int, layer: nn.Module, read, want_input: bool) -> None:
        """Recompute layer `index` from its stored input and push every draw's gradient below it."""
        inputs.use_layer(index)
        found = {name: [] for name in adapter.linear_names(index)}
        for chunk in chunks(live, size):
            x = torch.cat([read(i) for i in chunk]).to(device).requires_grad_(True)
            below = []
            with hooks_on(index, layer, found), torch.enable_grad():
                y = run_chunk(layer, x, inputs.kwargs_for(chunk[0]))
                for draw in range(draws):
                    upstream = torch.cat([grads[i][draw : draw + 1] for i in chunk])
                    (grad,) = torch.autograd.grad(y, x, grad_outputs=upstream, retain_graph=draw + 1 < draws)
                    below.append(grad)
            del y
            if per_linear:
                record_linears(index, chunk, found)
            if want_input:
                stacked = torch.stack(below, dim=1)  # [B, draws, T, d]
                for j, i in enumerate(chunk):
                    grads[i] = stacked[j]

    @torch.no_grad()
    def store_inputs() -> None:
        """FP forward up to the last layer's input, storing each layer's input on the way (block-wise only)."""
        for index in range(num_layers - 1):
            inputs.enter_layer(index)
            layer = access.get(index)
            if index > 0 or hooked:  # layer 0's input is differentiated only for its linears
                stored.put(index, inputs.hidden)
            if batched:
                outputs: list[torch.Tensor] = []
                for chunk in chunks(range(len(samples)), batch_size):
                    hidden = torch.cat([inputs.hidden[i] for i in chunk])
                    outputs.extend(run_chunk(layer, hidden, inputs.kwargs[0]).split(1))
                inputs.hidden = outputs
            else:
                inputs.hidden = [run_layer(layer, inputs, i) for i in range(len(samples))]
            access.done(index)
            bar.update(1)

    try:
        with frozen(model):
            with torch.no_grad():
                inputs = capture_layer_inputs(model, adapter, samples, device)
                if batch_size > 1:
                    batched = batching_works_on(access, inputs, list(range(min(batch_size, len(samples)))))
                size = batch_size if batched else 1
                # The forward's graph kept where small (under KEPT_GRAPH_BYTES, measured on the first chunk's forward):
                # on the CPU (the block-wise pass moves one layer at a time to a device), without additions between
                # layers (enter_layer adds them to the whole set at once), with every layer in memory (not FileLayers).
                whole = not (offload_dir or access.streamed or inputs.between) and str(device) == "cpu" and bool(live)
                if not whole:
                    store_inputs()
            # The chunk's loss is the sum of its samples' mean losses: each sample gets its own gradient.
            last = num_layers - 1
            norm = adapter.norm(model)
            head = functools.partial(adapter.logits, model)
            for i in empty:
                zeros = torch.zeros((draws, *inputs.hidden[i].shape[1:]), dtype=inputs.hidden[i].dtype)
                grads[i] = zeros
                if per_linear:
                    shape = (zeros.shape[1],) if row_groups == 1 else (zeros.shape[1], row_groups)
                    for index in range(num_layers):
                        for name in adapter.linear_names(index):
                            linear_scores[index][name][i] = torch.zeros(shape)
            if whole:  # each chunk through every layer with its graph kept, then its backward: no recompute
                try:
                    per_layer = [list(grads) for _ in range(num_layers)]  # the empty samples' zeros
                    for count, chunk in enumerate(chunks(live, size)):
                        found_by_layer = [{name: [] for name in adapter.linear_names(index)} for index in range(num_layers)]

                        def top(y: torch.Tensor, chunk: list[int] = chunk) -> tuple[torch.Tensor, torch.Tensor]:
                            normed = norm(y)
                            chunk_samplers = None if samplers is None else [samplers[i] for i in chunk]
                            return normed, head_gradient(head, normed, [samples[i]["input_ids"] for i in chunk],
                                                         [scored[i] for i in chunk], chunk_samplers)
                        at_outputs = chunk_through_layers(
                            access.layers, inputs, chunk, torch.cat([inputs.hidden[i] for i in chunk]).to(device),
                            lambda index, layer, found=found_by_layer: hooks_on(index, layer, found[index]), top, draws, hooked,
                            budget=KEPT_GRAPH_BYTES if count == 0 else None)
                        for index, stacked in enumerate(at_outputs):
                            if per_linear:
                                record_linears(index, chunk, found_by_layer[index])
                            for j, i in enumerate(chunk):
                                per_layer[index][i] = stacked[j]
                    inputs.hidden = []
                    for index in reversed(range(num_layers)):
                        grads = per_layer[index]
                        record(index)
                    bar.update(2 * num_layers)
                except GraphTooLarge:  # on the first chunk's layer 0, before any backward: nothing recorded yet
                    whole = False
                    store_inputs()
            if not whole:
                # Top block: last decoder layer + final norm + lm_head + loss, with autograd, one chunk
                # at a time: gives dL/dy at the last layer's output and, through it, at its input (the
                # output of the layer below), without a separate no-grad forward of the last layer.
                below: list[torch.Tensor | None] = list(grads)
                inputs.enter_layer(last)
                layer = access.get(last)
                found = {name: [] for name in adapter.linear_names(last)}
                for chunk in chunks(live, size):
                    x = torch.cat([inputs.hidden[i] for i in chunk]).detach().to(device)
                    with hooks_on(last, layer, found):
                        with torch.enable_grad():
                            if last > 0 or hooked:
                                x.requires_grad_(True)
                            y = run_chunk(layer, x, inputs.kwargs_for(chunk[0]))
                            if not y.requires_grad:  # one-layer model: nothing below y needs a gradient
                                y.requires_grad_(True)
                            normed = norm(y)
                        chunk_samplers = None if samplers is None else [samplers[i] for i in chunk]
                        upstream = head_gradient(
                            head, normed, [samples[i]["input_ids"] for i in chunk], [scored[i] for i in chunk], chunk_samplers
                        )
                        wanted = [y, x] if last > 0 or hooked else [y]
                        at_output, at_input = [], []
                        for draw in range(draws):
                            found_draw = torch.autograd.grad(normed, wanted, grad_outputs=upstream[draw], retain_graph=draw + 1 < draws)
                            at_output.append(found_draw[0])
                            if last > 0:
                                at_input.append(found_draw[1])
                    del normed, upstream, y
                    if per_linear:
                        record_linears(last, chunk, found)
                    output_stack = torch.stack(at_output, dim=1)  # [B, draws, T, d]
                    input_stack = torch.stack(at_input, dim=1) if at_input else None
                    for j, i in enumerate(chunk):
                        grads[i] = output_stack[j]
                        if input_stack is not None:
                            below[i] = input_stack[j]
                access.done(last)
                inputs.hidden = []
                record(last)
                bar.update(2)
                if last > 0:
                    grads = below
                    record(last - 1)
                # Block-wise backward: recompute layer `index` from its stored input, push dL/dy down.
                for index in reversed(range(1, last)):
                    with stored.reader(index) as read:
                        backward_block(index, access.get(index), read, want_input=True)
                    access.done(index)
                    record(index - 1)
                    bar.update(1)
                if hooked and last > 0:
                    with stored.reader(0) as read:
                        backward_block(0, access.get(0), read, want_input=False)
                    access.done(0)
                bar.update(1)
    finally:
        stored.close()
        bar.close()
        access.close()
    report = {
        "samples": len(samples),
        "layers": num_layers,
        "scored_tokens": int(sum(int(m.sum()) for m in scored)),
        "empty_loss_mask_samples": sorted(empty),
        "offload": offload_dir is not None,
        "batch_size": batch_size if batched else 1,
        "kept_graph": whole,  # the forward's graph kept (no recompute) or the block-wise backward
        "guidance": guidance,
        "row_groups": row_groups,
        "loss": loss,
        "draws": draws,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if empty:
        warnings.warn(f"{len(empty)} samples have an empty loss mask; their tokens get uniform weights", stacklevel=2)
    linear_factors = None
    if output_side is not None:
        linear_factors = [{name: total / (draws * max(1, valid_tokens)) for name, total in row.items()} for row in blocks]
        report["output_side"] = output_side
    return ImportanceScores(scores, linear_scores, report, gradients, linear_factors)


def layer_output_gradients(
    model: nn.Module,
    samples: Sequence[dict],
    *,
    device: torch.device | str = "cpu",
    offload_dir: str | Path | None = None,
    progress: bool = True,
    keep_gradients: bool = False,
    adapter: Adapter | None = None,
    batch_size: int = 16,
) -> tuple[list[list[torch.Tensor]], dict, list[list[torch.Tensor]] | None]:
    """(scores, report, gradients) of importance_scores with the data loss and layer guidance:
    scores ||dL/dy_{l,t}||^2 [layers][samples] -> [T]; gradients [layers][samples] -> [T, d] only
    with keep_gradients (for tests and the walkthrough)."""
    found = importance_scores(
        model, samples, device=device, offload_dir=offload_dir, progress=progress, keep_gradients=keep_gradients,
        adapter=adapter, batch_size=batch_size,
    )
    return found.layer, found.report, found.gradients
