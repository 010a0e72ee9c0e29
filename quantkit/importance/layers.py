"""Where TLQ's gradient pass gets its decoder layers: from a model held whole in memory (HeldLayers), or read from
the model's safetensors files one at a time onto a meta-device skeleton (FileLayers, for --low-memory), so that a
model larger than the RAM has its token weights too. quantkit.importance.gradients asks for layer i on the device
(get) and says when it is done with it (done); nothing else in the pass depends on where the layers live."""

from __future__ import annotations

import torch
from torch import nn

from quantkit.engine.capture import (
    LayerInputs,
    batching_works,
    first_of_each_kind,
    move_outside_layers,
)
from quantkit.engine.streaming import release_layer
from quantkit.models.base import Adapter
from quantkit.models.streamed import WeightSource, load_layer


class HeldLayers:
    """The decoder layers of a model loaded whole: each moved to the device while used and back to the CPU after."""

    streamed = False  # the whole forward's graph may be kept (gradients: `whole`): every layer is at hand

    def __init__(self, model: nn.Module, adapter: Adapter, device: torch.device | str) -> None:
        self.model, self.adapter, self.device = model, adapter, device
        self.layers = adapter.decoder_layers(model)

    def get(self, index: int) -> nn.Module:
        """Decoder layer `index` on the device."""
        return self.layers[index].to(self.device)  # Module.to moves in place: layers[index] is the same module

    def done(self, index: int) -> None:
        """Layer `index` is not needed until the next get."""
        if str(self.device) != "cpu":
            self.layers[index].to("cpu")

    def close(self) -> None:
        """The whole model back on the CPU, as it came."""
        if str(self.device) != "cpu":
            self.model.to("cpu")


class FileLayers(HeldLayers):
    """The decoder layers of a quantkit.models.streamed.build_skeleton model, read from its files when asked for and
    put back on the meta device when done: one decoder layer is held at a time.

    The pass then reads each layer twice (its forward, storing the next layer's input, and its recomputed backward;
    the top layer once) and the first layer of each kind once more for the batching probe; the kept-graph path
    (every layer live at once) is off. The layers are read as stored in `dtype` ("auto": the files' own)."""

    streamed = True

    def __init__(self, model: nn.Module, adapter: Adapter, source: WeightSource, device: torch.device | str,
                 dtype: str = "auto") -> None:
        super().__init__(model, adapter, device)
        self.source, self.dtype = source, dtype

    def get(self, index: int) -> nn.Module:
        """Decoder layer `index` read from the files, on the device."""
        return load_layer(self.model, self.adapter, self.source, index, self.dtype).to(self.device)

    def done(self, index: int) -> None:
        """Layer `index` back on the meta device, its memory freed."""
        release_layer(self.model, self.adapter, index)

    def close(self) -> None:
        """What the skeleton holds outside the layers back on the CPU (the layers stay on meta)."""
        move_outside_layers(self.model, self.adapter, "cpu")


@torch.no_grad()
def batching_works_on(access: HeldLayers, inputs: LayerInputs, chunk: list[int]) -> bool:
    """Whether the first layer of each kind gives the same outputs on `chunk` batched as one sample at a time
    (engine.capture.batching_works), each layer got from `access` for the check."""
    try:
        for index in first_of_each_kind(access.layers, inputs):
            inputs.use_layer(index)
            try:
                works = batching_works(access.get(index), inputs, chunk)
            finally:
                access.done(index)
            if not works:
                return False
    finally:
        inputs.use_layer(0)
    return True
