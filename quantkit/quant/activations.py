"""Per-token dynamic symmetric fake-quantization of a linear's input (W8A8 / W4A8 activations), and the hooks that
apply it to a model's quantized linears.

Each token's row x gets its own scale s = max|x| / divisor, is rounded to integers clamped to the
signed range [-2**(bits-1), 2**(bits-1) - 1] and multiplied back by s. The default divisor is
qmax = 2**(bits-1) - 1, the convention of vLLM's dynamic per-token int8 kernel; compressed-tensors'
own fake-quantization (what transformers applies when it loads the export) divides by half the
integer range, (2**bits - 1) / 2.

The hooks (ActivationQuantizer) serve the calibration loop (the quantized stream's layers, so every later
linear and layer sees inputs after activation quantization) and a loaded W8A8/W4A8 export. They are forward
pre-hooks, so hooks registered after them (the Hessian accumulators) see the quantized input.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from quantkit.errors import QuantkitError

ACT_BITS = (4, 8)


def act_qmax(bits: int) -> int:
    """The largest signed code of a `bits`-bit activation grid."""
    return (1 << (bits - 1)) - 1


def check_act_bits(bits: int | None) -> None:
    """Raise QuantkitError unless `bits` is None (weight-only) or a supported activation width."""
    if bits is not None and bits not in ACT_BITS:
        raise QuantkitError(f"--act-bits must be one of {ACT_BITS} (or omitted for weight-only), got {bits}")


def token_scales(x: torch.Tensor, bits: int = 8, divisor: float | None = None) -> torch.Tensor:
    """Per-token scales max|x| / divisor over the last dimension, shaped [..., 1] (all-zero rows get 1)."""
    divisor = float(act_qmax(bits)) if divisor is None else float(divisor)
    absmax = x.abs().amax(dim=-1, keepdim=True)
    scale = absmax / divisor
    # an all-zero row quantizes to zeros whatever its scale; 1 keeps the division finite
    return torch.where(absmax > 0, scale, torch.ones_like(scale))


def fake_quantize_tokens(x: torch.Tensor, bits: int = 8, divisor: float | None = None) -> torch.Tensor:
    """x with each token (row of the last dimension) rounded to its own symmetric `bits`-bit grid, dequantized."""
    check_act_bits(bits)
    scale = token_scales(x, bits, divisor)
    low, high = -(1 << (bits - 1)), act_qmax(bits)
    return torch.clamp(torch.round(x / scale), low, high) * scale


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
        self._handles = [root.get_submodule(name).register_forward_pre_hook(self._hook) for name in self.names]

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
