"""Running a model's decoder layers on a probe: every layer passed through while the model's own code runs
around them (passthrough_layers: the engine captures calibration inputs the same way), and one layer run
alone on its recorded call, on meta tensors or as a random-weight copy where its weights are not loaded."""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable, Iterator

import torch
from torch import nn

from quantkit.errors import QuantkitError, first_line

PROBE_TOKENS = 8


class StopForward(Exception):
    """Raised inside a forward pass once the wanted tensors are seen."""


def error_line(err: BaseException) -> str:
    """An error's type and its message on one line."""
    return f"{type(err).__name__}: {first_line(err)}"


def keyword_call(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A layer call with every argument after the hidden state given by name (Gemma 4 passes its per-layer input
    positionally), so that the call replays from the hidden state and keywords alone."""
    if len(args) <= 1:
        return args, kwargs
    params = list(inspect.signature(type(layer).forward).parameters.values())[1:]  # without self
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(names) < len(args) or any(p.kind == p.POSITIONAL_ONLY for p in params[1:len(args)]):
        return args, kwargs
    return args[:1], {**kwargs, **dict(zip(names[1:], args[1:]))}


@contextlib.contextmanager
def passthrough_layers(layers: nn.ModuleList, output_items: int, record: Callable[[int, tuple, dict], None],
                       stop_after: int | None = None) -> Iterator[None]:
    """While active, decoder layer i records its call, record(i, args, kwargs), instead of running, and hands
    its hidden state on unchanged (as a tuple of `output_items` where layers return tuples); the forward
    stops (StopForward) once layer `stop_after` has been recorded."""

    def make(index: int, layer: nn.Module):
        def forward(*args, **kwargs):
            args, kwargs = keyword_call(layer, args, kwargs)
            record(index, args, kwargs)
            if index == stop_after:
                raise StopForward
            hidden = args[0] if args else kwargs["hidden_states"]
            return (hidden, *[None] * (output_items - 1)) if output_items else hidden
        return forward

    for index, layer in enumerate(layers):
        layer.forward = make(index, layer)
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


def probe_sample(config) -> dict:
    """A short token sequence every model accepts."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None) or 2 * PROBE_TOKENS
    ids = (torch.arange(PROBE_TOKENS) % max(1, vocab - 1) + 1).reshape(1, -1)
    return {"input_ids": ids}


@contextlib.contextmanager
def outside_layers_on_cpu(model: nn.Module, layers: nn.ModuleList) -> Iterator[None]:
    """While active, meta tensors outside the decoder layers are uninitialised CPU tensors (pages a probe
    never touches take no memory), so the model's own code can run up to, around and after the layers."""
    inside = {id(m) for m in layers.modules()}
    swapped = []
    for module in model.modules():
        if id(module) in inside:
            continue
        for store in (module._parameters, module._buffers):
            for key, tensor in list(store.items()):
                if tensor is not None and tensor.device.type == "meta":
                    swapped.append((store, key, tensor))
                    # integer buffers are indices (OpenAI GPT's position_ids): zeros, as probe positions are
                    empty = torch.empty(tensor.shape, dtype=tensor.dtype) if tensor.is_floating_point() else \
                        torch.zeros(tensor.shape, dtype=tensor.dtype)
                    store[key] = nn.Parameter(empty, requires_grad=False) if isinstance(tensor, nn.Parameter) else empty
    try:
        yield
    finally:
        for store, key, tensor in swapped:
            store[key] = tensor


def _on(value: object, device: str, fill: bool = False, key: str = "") -> object:
    """`value` with its tensors moved to `device`; meta tensors given values where `fill` (masks attend to
    everything, positions are zero, hidden states small random numbers)."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "meta" or not fill:
            return value.to(device)
        if value.dtype == torch.bool:
            return torch.ones(value.shape, dtype=torch.bool, device=device)
        if not value.is_floating_point() or "mask" in key:
            return torch.zeros(value.shape, dtype=value.dtype, device=device)
        return (torch.randn(value.shape, generator=torch.Generator().manual_seed(0)) * 0.1).to(value.dtype)
    if isinstance(value, dict):
        return {k: _on(v, device, fill, k) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_on(v, device, fill, key) for v in value)
    return value


def _materialised(layer: nn.Module) -> nn.Module:
    """A CPU copy of a meta-device layer with small random weights (for a probe that needs values)."""
    clone = copy.deepcopy(layer)
    real_buffers = {name: b for name, b in layer.named_buffers() if b.device.type != "meta"}
    clone = clone.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in clone.parameters():
            if param.is_floating_point():
                param.copy_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.02)
            else:
                param.zero_()
        for name, buf in clone.named_buffers():
            if name in real_buffers:
                buf.copy_(real_buffers[name])
            else:
                buf.zero_()
    return clone


@torch.no_grad()
def probe_layer(layer: nn.Module, args: tuple, kwargs: dict, watch: Callable[[nn.Module], list]) -> tuple[object, list]:
    """Run `layer` once on its recorded call, hooks from `watch` installed; return (output, events).

    A layer with meta weights runs on meta tensors; where that fails (an operation needs values), a
    materialised copy runs instead."""
    attempts = []
    if any(p.device.type == "meta" for p in layer.parameters()):
        attempts.append((layer, "meta", False))
        attempts.append((None, "cpu", True))
    else:
        device = next((p.device for p in layer.parameters()), torch.device("cpu"))
        attempts.append((layer, device, False))
    error: BaseException | None = None
    for module, device, fill in attempts:
        module = module if module is not None else _materialised(layer)
        events: list = []
        handles = watch(module, events)
        try:
            out = module(*_on(args, device, fill), **_on(kwargs, device, fill))
            return out, events
        except Exception as err:  # noqa: BLE001 - the next attempt, or one line below
            error = err
        finally:
            for handle in handles:
                handle.remove()
    raise QuantkitError(f"a decoder layer ({type(layer).__name__}) fails on a probe input: {error_line(error)}")
