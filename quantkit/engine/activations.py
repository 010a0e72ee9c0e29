"""Activation quantization in a model: each quantized linear sees its input fake-quantized per token.

Used by the calibration loop (the quantized stream's layers, so every later linear and layer sees
inputs after activation quantization) and by evaluation of an export with act_bits. The hooks are
forward pre-hooks, so hooks registered after them (the Hessian accumulators) see the quantized input.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from quantkit.models.base import get_module
from quantkit.quant.activations import check_act_bits, fake_quantize_tokens


class ActivationQuantizer:
    """Forward pre-hooks fake-quantizing the inputs of named linears of a module (remove() takes them off).

    Linears fed the very same tensor (q/k/v, gate/up) get the very same quantized tensor, quantized
    once: the calibration loop recognises shared inputs by identity.
    """

    def __init__(self, root: nn.Module, names: Iterable[str], bits: int, divisor: float | None = None) -> None:
        check_act_bits(bits)
        self.bits, self.divisor = bits, divisor
        self.names = list(names)
        # the last (input, quantized input) pair; holding the input keeps its id from being reused
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self._handles = [get_module(root, name).register_forward_pre_hook(self._hook) for name in self.names]

    def _hook(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        if self._last is None or self._last[0] is not x:
            self._last = (x, fake_quantize_tokens(x, self.bits, self.divisor))
        return (self._last[1], *args[1:])

    def remove(self) -> None:
        """Take the hooks off (the module runs unquantized inputs again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._last = None


@contextlib.contextmanager
def quantized_inputs(root: nn.Module, names: Iterable[str], bits: int | None,
                     divisor: float | None = None) -> Iterator[ActivationQuantizer | None]:
    """ActivationQuantizer on `names` of `root` for the block's duration (nothing when bits is None)."""
    if bits is None:
        yield None
        return
    quantizer = ActivationQuantizer(root, names, bits, divisor)
    try:
        yield quantizer
    finally:
        quantizer.remove()


def quantize_model_activations(model: nn.Module, names: Iterable[str], bits: int,
                               divisor: float | None = None) -> ActivationQuantizer:
    """Install activation quantization on `model`'s linears `names` for good (kept on the model as
    `quantkit_activation_quantizer`, so that it lives as long as the model)."""
    quantizer = ActivationQuantizer(model, names, bits, divisor)
    model.quantkit_activation_quantizer = quantizer
    return quantizer
