"""The block-wise backward's pieces: every layer's stored FP inputs (in RAM or on disk), chunks of samples that
share their layer kwargs, and the head's cross-entropy gradient formed directly (quantkit.importance.gradients
runs the pass)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from quantkit.engine.capture import LayerInputs
from quantkit.models.base import layer_output


class StoredInputs:
    """Every layer's FP input per sample: in RAM, or one safetensors file per layer on disk."""

    def __init__(self, offload_dir: str | Path | None) -> None:
        self.memory: dict[int, list[torch.Tensor]] = {}
        self.root: Path | None = None
        if offload_dir is not None:
            Path(offload_dir).mkdir(parents=True, exist_ok=True)
            self.root = Path(tempfile.mkdtemp(prefix="tlq-inputs-", dir=offload_dir))

    def put(self, layer: int, hidden: list[torch.Tensor]) -> None:
        """Keep layer `layer`'s inputs (one per sample)."""
        if self.root is None:
            self.memory[layer] = [h.detach() for h in hidden]
            return
        # clone: batched outputs are views of one chunk tensor, and safetensors refuses shared storage
        save_file({str(i): h.detach().cpu().clone() for i, h in enumerate(hidden)}, self.root / f"layer{layer}.safetensors")

    @contextlib.contextmanager
    def reader(self, layer: int) -> Iterator:
        """A function sample index -> layer `layer`'s input for it, while the block lasts (the memory copy goes)."""
        if self.root is None:
            hidden = self.memory.pop(layer)
            yield lambda i: hidden[i]
            return
        with safe_open(self.root / f"layer{layer}.safetensors", framework="pt") as handle:
            yield lambda i: handle.get_tensor(str(i))

    def close(self) -> None:
        """Drop every stored input (the offload folder too)."""
        self.memory.clear()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Turn off parameter gradients (only input gradients are wanted) and dropout."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    training = module.training
    for p, _ in flags:
        p.requires_grad_(False)
    module.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        module.train(training)


def chunks(indices: Sequence[int], size: int) -> list[list[int]]:
    """`indices` in consecutive runs of at most `size`."""
    indices = list(indices)
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def run_chunk(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One decoder layer on a batch [B, T, d] of samples that share `kwargs` (batch-1 tensors broadcast)."""
    return layer_output(layer(hidden, **kwargs))


def block_gram(g: torch.Tensor) -> torch.Tensor:
    """sum_t g_t g_t^T per block: g [T, n, b] -> [n, b, b]. The product is symmetric, so its bottom-left quarter is the
    top-right one mirrored: 3/4 of the multiplications (the factors are a fifth of the pass on a small model), each
    entry still one dot product over t."""
    x = g.transpose(0, 1)  # [n, T, b]
    half, width = x.shape[-1] // 2, x.shape[-1]
    gram = torch.empty((x.shape[0], width, width), dtype=x.dtype, device=x.device)
    top = torch.bmm(x[..., :half].transpose(1, 2), x)  # the first half of the rows, every column
    gram[:, :half] = top
    gram[:, half:, half:] = torch.bmm(x[..., half:].transpose(1, 2), x[..., half:])
    gram[:, half:, :half] = top[..., half:].transpose(1, 2)
    return gram


# Rows of the lm_head + cross-entropy gradient computed at once: a [rows, vocab] block of logits
# and its softmax stay in cache (a whole chunk's logits, [B * T, V], do not, which costs ~2x).
HEAD_ROWS = 512


def head_gradient(
    head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, input_ids: list[torch.Tensor],
    scored: list[torch.Tensor], samplers: list[list[torch.Generator]] | None = None,
) -> torch.Tensor:
    """d/d(hidden) of the sum over a chunk's samples of each one's mean cross-entropy at its scored
    positions: [draws, B, T, d].

    hidden [B, T, d] is the final norm's output and `head` maps [1, rows, d] to the model's logits
    [1, rows, V] (Adapter.logits: lm_head and any scaling or soft-capping). Only scored rows go through it, in blocks
    of HEAD_ROWS, and the cross-entropy gradient is formed directly, w * (softmax - onehot),
    instead of by autograd through log_softmax (which keeps [B * T, V] logits, their log-softmax
    and its gradient). Each sample's gradient is that of its own mean loss.

    Labels are the data's next tokens, or with `samplers` (one generator per sample and draw) drawn
    from the model's own softmax: the gradient of the Fisher of the KL to the FP model, which does
    not single out the calibration text's hardest tokens. Each draw gives one gradient.
    """
    rows, labels, weights, uniforms = [], [], [], []
    length = hidden.shape[1]
    draws = 1 if samplers is None else len(samplers[0])
    for j, (ids, mask) in enumerate(zip(input_ids, scored)):
        positions = mask.nonzero().reshape(-1)
        rows.append(positions + j * length)
        labels.append(ids.reshape(-1).cpu()[positions + 1])
        weights.append(torch.full((positions.numel(),), 1.0 / max(1, positions.numel())))
        if samplers is not None:
            # one uniform per (draw, position), drawn per sample: labels do not depend on chunking
            uniforms.append(torch.stack([torch.rand(positions.numel(), generator=g, dtype=torch.float64) for g in samplers[j]]))
    device = hidden.device
    row, label, weight = (torch.cat(t).to(device) for t in (rows, labels, weights))
    uniform = torch.cat(uniforms, dim=1).to(device) if samplers is not None else None
    flat = hidden.detach().reshape(-1, hidden.shape[-1])
    grad = torch.zeros((draws, *flat.shape), dtype=flat.dtype, device=device)
    for start in range(0, row.numel(), HEAD_ROWS):
        block = row[start : start + HEAD_ROWS]
        end = start + block.numel()
        x = flat.index_select(0, block).requires_grad_(True)
        with torch.enable_grad():
            logits = head(x.unsqueeze(0)).squeeze(0)
        with torch.no_grad():
            probs = torch.softmax(logits.float(), dim=-1)
            cumulative = None if uniform is None else probs.double().cumsum(dim=-1)  # shared by every draw
        for draw in range(draws):
            with torch.no_grad():
                if uniform is None:
                    target = label[start:end]
                else:
                    wanted = (uniform[draw, start:end] * cumulative[:, -1]).unsqueeze(1)
                    target = torch.searchsorted(cumulative, wanted).reshape(-1).clamp_max(probs.shape[-1] - 1)
                upstream = probs if draw + 1 == draws else probs.clone()  # the last draw may take probs itself
                upstream[torch.arange(block.numel(), device=device), target] -= 1.0
                upstream.mul_(weight[start:end, None])
            (found,) = torch.autograd.grad(logits, x, grad_outputs=upstream.to(logits.dtype), retain_graph=draw + 1 < draws)
            grad[draw].index_copy_(0, block, found)
    return grad.reshape(draws, *hidden.shape)


# The gradient pass keeps the forward's autograd graph (one chunk through every layer: no recompute, about a third
# less work) where that graph stays under this many bytes; above it (an LLM at a few thousand tokens per window
# needs GBs per layer) the block-wise backward recomputes each layer from its stored input and holds one block.
KEPT_GRAPH_BYTES = 1 << 30


class GraphTooLarge(Exception):
    """The first chunk's graph through every layer would pass KEPT_GRAPH_BYTES: the pass goes block-wise."""


@contextlib.contextmanager
def saved_bytes(layer: nn.Module) -> Iterator[dict[int, int]]:
    """The activations autograd saves inside the block, bytes by storage (`layer`'s parameters not counted: they
    are there anyway; each storage counted once)."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield saved


def chunk_through_layers(
    layers: Sequence[nn.Module], inputs: LayerInputs, chunk: list[int], hidden: torch.Tensor,
    hooks_for: Callable[[int, nn.Module], contextlib.AbstractContextManager], top: Callable, draws: int,
    first_input: bool, budget: int | None = None,
) -> list[torch.Tensor]:
    """One chunk [B, T, d] through every decoder layer with autograd, the graph kept, and each draw's backward
    from `top(last layer output)` = (final tensor, [draws, ...] upstream gradients) down to every layer's output
    (and to `hidden` with `first_input`, so that layer 0's linears see their output gradients): per layer, the
    gradient at its output [B, draws, T, d]. Linear hooks from `hooks_for(index, layer)` fire in the backward as in
    the block-wise pass; the same operations on the same inputs, so the same numbers.

    With a `budget`, layer 0's saved activations (its input differentiable, as every later layer's is) times the
    layers are held to it: over it, GraphTooLarge before any other layer runs (the measure is this forward's own,
    not a forward more)."""
    with contextlib.ExitStack() as stack, torch.enable_grad():
        for index, layer in enumerate(layers):
            stack.enter_context(hooks_for(index, layer))
        # x's gradient is only asked for with first_input: the backward stops at layer 0's output otherwise
        x = hidden.detach().requires_grad_(first_input or budget is not None)
        outputs, y = [], x
        for index, layer in enumerate(layers):
            inputs.use_layer(index)
            with saved_bytes(layer) if index == 0 and budget is not None else contextlib.nullcontext({}) as saved:
                y = run_chunk(layer, y, inputs.kwargs_for(chunk[0]))
            if sum(saved.values()) * len(layers) > (budget or 0):
                raise GraphTooLarge
            if not y.requires_grad:  # layer 0 without its input's gradient: its output is where the gradient ends
                y.requires_grad_(True)
            outputs.append(y)
        final, upstream = top(y)
        wanted = outputs + ([x] if first_input else [])
        found = [torch.autograd.grad(final, wanted, grad_outputs=upstream[draw], retain_graph=draw + 1 < draws)
                 for draw in range(draws)]
    return [torch.stack([per_draw[index] for per_draw in found], dim=1) for index in range(len(layers))]
