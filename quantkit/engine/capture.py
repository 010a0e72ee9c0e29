"""Capture what the decoder layers receive (layer 0's hidden states, every layer's arguments), and run one
decoder layer alone on it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from quantkit.data.samples import SOURCE_KEY
from quantkit.errors import QuantkitError
from quantkit.models.base import Adapter, get_module, layer_output
from quantkit.models.probe import StopForward, passthrough_layers

# Keyword arguments a layer gets during a full forward that must not be replayed: caches are
# per-call state, and use_cache is forced off.
_DROP_KWARGS = {"cache", "past_key_values", "past_key_value", "layer_past", "use_cache", "output_attentions"}


# Keys a calibration sample may carry besides the model's forward kwargs: which tokens' predictions
# count in the loss (loss_mask) and which tokens are vision tokens (vision_mask), both [1, T] bool, and
# which source each token comes from (source_ids, [1, T] long: for per-source analysis), none of them a layer kwarg.
SAMPLE_META_KEYS = frozenset({"loss_mask", "vision_mask", SOURCE_KEY})


def model_inputs(sample: dict) -> dict:
    """The forward kwargs of a calibration sample, without its metadata masks."""
    return {k: v for k, v in sample.items() if k not in SAMPLE_META_KEYS}


def to_device(value: object, device: torch.device | str) -> object:
    """Move tensors inside nested tuples/lists/dicts to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a is b or a == b


@dataclass
class LayerInputs:
    """Per-sample hidden states entering the current layer, and the extra kwargs layers take.

    `kwargs` holds the current layer's: one dict per sample, or a single shared dict when every
    sample's kwargs are equal (plain text of one length: the usual case, and it saves memory).
    `layer_kwargs` holds every layer's where they differ between layers (sliding-window and full
    attention masks, per-type rotary tables; layers taking the same share one list); use_layer
    switches `kwargs` to a layer's. `between` holds what the model adds to the hidden states before
    a layer, per sample (Qwen3-VL's deepstack adds vision features after the first layers);
    enter_layer adds it.
    """

    hidden: list[torch.Tensor]
    kwargs: list[dict]
    sizes: list[int] | None = None  # samples stacked in each entry of `hidden` (None: one each)
    layer_kwargs: list[list[dict]] | None = None
    between: dict[int, list[torch.Tensor | None]] | None = None  # layer -> per-sample addition before it

    def use_layer(self, index: int) -> None:
        """Make `kwargs` decoder layer `index`'s."""
        if self.layer_kwargs is not None:
            self.kwargs = self.layer_kwargs[index]

    def enter_layer(self, index: int) -> None:
        """use_layer, and add to the hidden states what the model adds between layer index - 1 and `index`."""
        self.use_layer(index)
        for i, added in enumerate((self.between or {}).get(index, ())):
            if added is not None:
                self.hidden[i] = self.hidden[i] + added.to(self.hidden[i].device, self.hidden[i].dtype)

    def batch_weights(self, weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-entry token weights from per-sample ones, concatenated within each stacked batch
        (per-sample [T] or [1, T] weights become [tokens]; [T, g] ones, [tokens, g])."""
        if self.sizes is None:
            return list(weights)
        batches, start = [], 0
        for size in self.sizes:
            batches.append(torch.cat([w.reshape(-1) if w.dim() < 2 or w.shape[0] == 1 else w for w in weights[start : start + size]]))
            start += size
        return batches

    def kwargs_for(self, index: int) -> dict:
        """The layer kwargs of sample `index`."""
        return self.kwargs[0] if len(self.kwargs) == 1 else self.kwargs[index]

    def __len__(self) -> int:
        return len(self.hidden)


def stack_samples(inputs: LayerInputs, batch_size: int, layers: nn.ModuleList | None = None,
                  device: torch.device | str = "cpu") -> LayerInputs:
    """Stack samples into batches of `batch_size` where they share layer kwargs and shape (and, where `layers`
    is given, where each kind of layer's batched output equals its per-sample outputs: batching_works_for).

    Larger matmuls and fewer module calls make each layer pass several times cheaper on CPU for
    small models; samples with their own kwargs (Qwen2-VL's mrope positions) stay one by one, and so do
    samples whose shared kwargs are built for one sample (BLOOM's ALiBi bias, XGLM's checked mask size).
    """
    shapes = {tuple(h.shape) for h in inputs.hidden}
    shared = all(len(kwargs) == 1 for kwargs in (inputs.layer_kwargs or [inputs.kwargs])) and not inputs.between
    if batch_size <= 1 or len(inputs.kwargs) != 1 or not shared or len(shapes) != 1 or inputs.sizes is not None:
        return inputs
    if next(iter(shapes))[0] != 1:
        return inputs
    if layers is not None and len(inputs) > 1 and not batching_works_for(layers, inputs, [0, min(batch_size, len(inputs)) - 1],
                                                                         device):
        return inputs
    hidden = [torch.cat(inputs.hidden[i : i + batch_size]) for i in range(0, len(inputs.hidden), batch_size)]
    return LayerInputs(hidden=hidden, kwargs=inputs.kwargs, sizes=[h.shape[0] for h in hidden],
                       layer_kwargs=inputs.layer_kwargs)


def move_outside_layers(model: nn.Module, adapter: Adapter, device: torch.device | str) -> None:
    """Move every parameter and buffer that is not inside a decoder layer to `device`."""
    prefix = adapter.layers + "."
    for name, module in model.named_modules():
        if name == adapter.layers or name.startswith(prefix):
            continue
        for key, param in list(module._parameters.items()):
            if param is not None and param.device != torch.device(device):
                module._parameters[key] = nn.Parameter(param.data.to(device), requires_grad=param.requires_grad)
        for key, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[key] = buf.to(device)


def run_until_first_layer(model: nn.Module, adapter: Adapter, samples: Iterable[dict], device: torch.device | str,
                          grab: Callable[[nn.Module, tuple, dict], None] | None = None) -> None:
    """Forward each sample up to decoder layer 0 (embeddings and any vision side run); `grab` sees
    that layer's args and kwargs first."""

    def stop(module: nn.Module, args: tuple, kw: dict) -> None:
        if grab is not None:
            grab(module, args, kw)
        raise StopForward

    handle = adapter.decoder_layers(model)[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for sample in samples:
            try:
                model(**to_device(model_inputs(sample), device), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()


def _unchanged(seen: torch.Tensor, passed: torch.Tensor) -> bool:
    """Whether the head (or final norm) reads the last layer's hidden state as it was handed on: the same
    tensor, or a view of all of it (the causal-LM classes slice the positions whose logits they keep)."""
    return seen is passed or (seen.shape == passed.shape and seen.data_ptr() == passed.data_ptr()
                              and seen.stride() == passed.stride())


def _identical(a: dict, b: dict) -> bool:
    """The same keys holding the very same objects (layers of one type get one mask, one rotary table)."""
    return a.keys() == b.keys() and all(a[k] is b[k] for k in a)


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, adapter: Adapter, samples: Iterable[dict], device: torch.device | str = "cpu"
) -> LayerInputs:
    """Run the model on each sample with its decoder layers passed through (quantkit.models.discover) and
    record layer 0's hidden states and every layer's kwargs; the returned inputs are layer 0's."""
    move_outside_layers(model, adapter, device)
    layers = adapter.decoder_layers(model)
    hidden: list[torch.Tensor] = []
    calls: list[list[dict]] = [[] for _ in layers]
    between: dict[int, list[torch.Tensor | None]] = {}
    passed: list[torch.Tensor] = []  # what the previous (passed-through) layer handed on
    last_done = [False]  # whether the last layer has run in the current sample's forward

    def record(index: int, args: tuple, kw: dict) -> None:
        kw = dict(kw)
        state = args[0] if args else kw.pop("hidden_states")
        if index == 0:
            hidden.append(state.detach())
        elif state is not passed[0]:  # the model changed the hidden states between the layers
            between.setdefault(index, [None] * (len(hidden) - 1)).append((state - passed[0]).detach())
        elif index in between:
            between[index].append(None)
        passed[:] = [state]
        last_done[:] = [index == len(layers) - 1]
        calls[index].append({k: v for k, v in kw.items() if k not in _DROP_KWARGS})

    first_after = (*adapter.after_layers(), adapter.lm_head)[0]

    def after_last(module: nn.Module, args: tuple) -> None:
        if not last_done[0]:  # the final norm also runs before the layers (NanoChat)
            return
        last_done[0] = False
        if args and not _unchanged(args[0], passed[0]):
            raise QuantkitError(f"{adapter.name} changes the hidden states after its last decoder layer, before "
                                f"{first_after}; quantkit cannot replay that")
        raise StopForward

    # the forward runs on to the final norm (or head), so that a change after the last layer is seen
    stop = get_module(model, first_after).register_forward_pre_hook(after_last)
    try:
        with passthrough_layers(layers, adapter.layer_output_items, record):
            for sample in samples:
                try:
                    model(**to_device(model_inputs(sample), device), use_cache=False)
                except StopForward:
                    pass
                for added in between.values():
                    added.extend([None] * (len(hidden) - len(added)))
    finally:
        stop.remove()
    kinds: list[tuple[list[dict], list[dict]]] = []  # (as recorded, as kept) per distinct layer kwargs
    per_layer: list[list[dict]] = []
    for recorded in calls:
        kept = next((k for r, k in kinds if len(r) == len(recorded) and all(map(_identical, r, recorded))), None)
        if kept is None:
            kept = recorded[:1] if recorded and all(_same(recorded[0], k) for k in recorded[1:]) else recorded
            kinds.append((recorded, kept))
        per_layer.append(kept)
    return LayerInputs(hidden=hidden, kwargs=per_layer[0] if per_layer else [],
                       layer_kwargs=per_layer if len(kinds) > 1 else None, between=between or None)


def run_layer(layer: nn.Module, inputs: LayerInputs, index: int) -> torch.Tensor:
    """Decoder layer output for sample `index` of `inputs`."""
    return layer_output(layer(inputs.hidden[index], **inputs.kwargs_for(index)))


@torch.no_grad()
def batching_works_for(layers: nn.ModuleList, inputs: LayerInputs, chunk: list[int], device: torch.device | str) -> bool:
    """batching_works on the first layer of each kind (its modules' classes and the kwargs it takes), each moved to `device`
    for the check and back: a hybrid's attention layers take other masks than its linear-attention layers, and
    some read theirs per sample (Qwen4-Exp's token indexer). All layers run on the first layer's inputs."""
    try:
        for index in first_of_each_kind(layers, inputs):
            layer = layers[index]
            inputs.use_layer(index)
            home = next((p.device for p in layer.parameters()), torch.device(device))
            works = batching_works(layer.to(device), inputs, chunk)
            layer.to(home)
            if not works:
                return False
    finally:
        inputs.use_layer(0)
    return True


def first_of_each_kind(layers: nn.ModuleList, inputs: LayerInputs) -> list[int]:
    """The index of the first layer of each kind (its modules' classes and the kwargs it takes): read from the
    modules' classes alone, so layers on the meta device (a streamed skeleton) have their kinds too."""
    first: dict[tuple, int] = {}
    for index, layer in enumerate(layers):
        kind = (tuple(type(m).__name__ for m in layer.modules()),
                id(inputs.layer_kwargs[index]) if inputs.layer_kwargs is not None else 0)
        first.setdefault(kind, index)
    return sorted(first.values())


def batching_works(layer: nn.Module, inputs: LayerInputs, chunk: list[int]) -> bool:
    """Whether the shared layer kwargs broadcast over a batch: batched output == per-sample output."""
    if any(len(kwargs) != 1 for kwargs in (inputs.layer_kwargs or [inputs.kwargs])) or len(chunk) < 2:
        return False
    first, last = chunk[0], chunk[-1]
    try:
        batched = layer_output(layer(torch.cat([inputs.hidden[first], inputs.hidden[last]]), **inputs.kwargs[0]))
        alone = [run_layer(layer, inputs, first), run_layer(layer, inputs, last)]
    except (RuntimeError, ValueError, IndexError, TypeError):
        return False
    if batched.shape[0] != 2:
        return False
    scale = max(float(a.abs().max()) for a in alone) or 1.0
    return all(
        a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale))
        for a, b in zip(alone, batched.split(1))
    )
