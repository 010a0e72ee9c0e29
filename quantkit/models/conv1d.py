"""GPT-2-style Conv1D layers as linears.

transformers' Conv1D (GPT-2, GPT-SW3, OpenAI GPT) computes x @ W + b with W stored [in, out]: an nn.Linear whose
weight is W.T. `linears_from_conv1d` replaces each Conv1D by a TransposedLinear holding W.T, so discovery, Hessians
and every solver treat it as any other linear. Its state dict keeps the checkpoint's [in, out] layout (saving
transposes back, loading transposes in): checkpoint shapes, --low-memory layer loading and the FP tensors an export
writes stay the family's own. Quantized results are the linear's ([out, in], GPTQ's layout for a Conv1D too, as
optimum builds its QuantLinear from one); formats that store dense weights transpose them back (Layout.transposed).
"""

from __future__ import annotations

import torch
from torch import nn


class TransposedLinear(nn.Linear):
    """A Conv1D as an nn.Linear (weight [out, in]) whose state dict stores the weight [in, out], as Conv1D does."""

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if prefix + "weight" in destination:
            destination[prefix + "weight"] = destination[prefix + "weight"].t()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + "weight"
        if key in state_dict:
            state_dict[key] = state_dict[key].t().contiguous()  # contiguous as linears_from_conv1d makes it
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def linears_from_conv1d(model: nn.Module) -> bool:
    """Replace every transformers Conv1D of `model` by a TransposedLinear computing the same (in place; meta weights
    stay on meta); whether any was replaced."""
    from transformers.pytorch_utils import Conv1D

    found = [(name, m) for name, m in model.named_modules() if isinstance(m, Conv1D)]
    for name, conv in found:
        width_in, width_out = conv.weight.shape
        linear = TransposedLinear(width_in, width_out, bias=conv.bias is not None, device="meta")
        linear.weight = nn.Parameter(conv.weight.detach().t().contiguous(), requires_grad=conv.weight.requires_grad)
        if conv.bias is not None:
            linear.bias = conv.bias
        linear.train(conv.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    return bool(found)


def transposed_linears(model: nn.Module) -> tuple[str, ...]:
    """Names of the model's linears stored [in, out] in its checkpoints (Conv1D, or what linears_from_conv1d made)."""
    from transformers.pytorch_utils import Conv1D

    return tuple(sorted(n for n, m in model.named_modules() if isinstance(m, (TransposedLinear, Conv1D))))


def checkpoint_layout(weight: torch.Tensor) -> torch.Tensor:
    """A linear's [out, in] weight in a Conv1D checkpoint's [in, out] layout."""
    return weight.t().contiguous()
