"""Block replay: a layer's finished blocks are replayed, not recomputed, in its later passes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from quantkit.engine.capture import LayerInputs
from quantkit.engine.routed import is_routed
from quantkit.models import get_module
from quantkit.models.base import layer_output


class FinishedBlocks:
    """Replays the outputs of a layer's blocks whose linears are all quantized.

    A block is a direct child of the decoder layer holding linears (self_attn, mlp; OPT's fc1).
    Once its last linear is solved, its output on each batch is fixed for the rest of the layer's
    passes (the remaining groups, then the propagation), so it is replayed instead of recomputed.
    Where the block returns its last linear's output (attention: o_proj) and that linear's input
    was kept while its Hessian was summed, the outputs are that linear applied to the kept inputs,
    checked against one real run of the block; otherwise the next pass records them. Only tensors
    no wider than the layer's hidden state are kept, so memory stays one hidden state per block.
    """

    def __init__(self, layer: nn.Module, linear_names: Sequence[str]) -> None:
        self.layer = layer
        self.unsolved: dict[str, set[str]] = {}
        self.last_linear: dict[str, str] = {}
        for name in linear_names:
            block = name.split(".")[0]
            self.unsolved.setdefault(block, set()).add(name)
            if block != name:
                self.last_linear[block] = name
        # a mixture-of-experts block sums its experts' outputs: no one linear's output is the block's
        self.last_linear = {b: n for b, n in self.last_linear.items() if not is_routed(layer, n)}
        self.kept_inputs: dict[str, list[torch.Tensor]] = {}
        self.to_derive: list[str] = []
        self.to_record: list[str] = []
        self.outputs: dict[str, list] = {}
        self.inputs: LayerInputs | None = None
        self.batch = 0

    def keep_input(self, name: str, x: torch.Tensor) -> None:
        """Called with each linear's input during a pass: keeps blocks' last linears' inputs."""
        if name in self.last_linear.values() and x.numel() <= self.inputs.hidden[self.batch].numel():
            self.kept_inputs.setdefault(name, []).append(x.detach().clone())

    def mark_solved(self, names: Sequence[str]) -> None:
        """Note that `names` are quantized; blocks left with no unsolved linear become replayable."""
        for block, pending in list(self.unsolved.items()):
            pending.difference_update(names)
            if pending:
                continue
            del self.unsolved[block]
            # a block is derived from its last linear's kept inputs only where it has one (a rank with no samples
            # keeps none of every block's, which is not the same as keeping all of them)
            kept = self.kept_inputs.get(self.last_linear.get(block, ""), [])
            derivable = block in self.last_linear and self.inputs is not None and len(kept) == len(self.inputs)
            (self.to_derive if derivable else self.to_record).append(block)

    def _derive(self, block: str, module: nn.Module) -> None:
        """Replace `block`'s forward for one pass: a checked real run on batch 0, then derived outputs."""
        linear = get_module(self.layer, self.last_linear[block])
        kept = self.kept_inputs.pop(self.last_linear[block], [])
        real_forward = module.forward

        def forward(*args, **kwargs):
            if self.batch == 0:
                real = real_forward(*args, **kwargs)
                derived = linear(kept[0])
                out = layer_output(real)
                if out.shape != derived.shape or not torch.allclose(out, derived, rtol=1e-5, atol=1e-6):
                    self.to_derive.remove(block)
                    self.to_record.append(block)
                    del module.forward  # the block is not its last linear's output: run it for real
                    return real
                self.outputs[block] = [real]
                return real
            first = linear(kept[self.batch])
            kept[self.batch] = None  # replaced by the output, which is what later passes need
            template = self.outputs[block][0]
            output = (first, *template[1:]) if isinstance(template, tuple) else first
            self.outputs[block].append(output)
            return output

        module.forward = forward

    def passes(self, inputs: LayerInputs) -> Iterator[int]:
        """Batch indices of one pass over `inputs`, with replay, derivation and recording installed."""
        self.inputs = inputs
        recordings: dict[str, list] = {block: [] for block in self.to_record}
        handles = []
        for block, store in recordings.items():
            def record(module: nn.Module, args: tuple, output: object, store: list = store) -> None:
                store.append(output)
            handles.append(get_module(self.layer, block).register_forward_hook(record))
        patched = []
        for block in list(self.outputs) + list(self.to_derive):
            module = get_module(self.layer, block)
            patched.append(module)
            if block in self.outputs:
                module.forward = lambda *args, outputs=self.outputs[block], **kwargs: outputs[self.batch]
            else:
                self._derive(block, module)
        try:
            for self.batch in range(len(inputs)):
                yield self.batch
        finally:
            for handle in handles:
                handle.remove()
            for module in patched:
                module.__dict__.pop("forward", None)
        for block in list(self.to_derive):
            if len(self.outputs.get(block, ())) == len(inputs):
                self.to_derive.remove(block)
            else:  # the pass stopped before the block ran on every batch: record it next pass instead
                self.outputs.pop(block, None)
                self.to_derive.remove(block)
                self.to_record.append(block)
        for block, store in recordings.items():
            if len(store) != len(inputs):
                continue
            self.to_record.remove(block)
            if all(layer_output(out).numel() <= hidden.numel() for out, hidden in zip(store, inputs.hidden)):
                self.outputs[block] = store
