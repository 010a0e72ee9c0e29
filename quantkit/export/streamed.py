"""The export sink of a low-memory run: the final checkpoint written a decoder layer at a time."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from quantkit.export.common import Layout
from quantkit.export.experts import dense_fused_experts
from quantkit.export.writer import renamed_linears, write_checkpoint_streamed
from quantkit.memory import fix_mmap_threshold, trim_heap
from quantkit.models import adapter_for
from quantkit.models.conv1d import transposed_linears
from quantkit.models.experts import checkpoint_key, checkpoint_module
from quantkit.quant.spec import QuantResult, QuantSpec


class LayerResults(Protocol):
    """Results held a decoder layer at a time (quantkit.engine.streaming.StreamedResults)."""

    outside: dict[str, QuantResult]  # results outside the decoder layers (vision side, head), in memory

    def __contains__(self, name: object) -> bool: ...

    def layer(self, index: int) -> tuple[dict[str, QuantResult], dict[str, torch.Tensor]]:
        """Decoder layer `index`'s results and FP tensors."""


def export_streamed(
    model: nn.Module, results: LayerResults, output: str | os.PathLike, *, fmt: str, spec: QuantSpec | None,
    source: str | None, report: dict, overwrite: bool,
) -> Path:
    """Write the final checkpoint from the skeleton's non-layer tensors and `results`' layers.

    Layer by layer: each layer is read, encoded and spooled by write_checkpoint_streamed, then
    freed, so memory does not grow with the number of layers; `spec` is the run's solver settings.
    """
    fix_mmap_threshold()  # for an export on its own; a streamed calibration has set it already
    adapter = adapter_for(model)
    prefix = adapter.layers + "."
    fp: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for key, t in model.state_dict().items():
        if key.startswith(prefix):
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            continue  # tied duplicate (lm_head to the embeddings)
        seen.add(ident)
        fp[key] = t.detach()
    n_layers = len(adapter.decoder_layers(model))
    for name in results.outside:
        fp.pop(f"{name}.weight", None)

    # a model with unfused experts is written with the family's checkpoint names (as save_quantized writes it)
    key, module = checkpoint_key(model), checkpoint_module(model)

    def parts() -> Iterator[tuple[dict[str, torch.Tensor], dict[str, QuantResult]]]:
        yield {key(k): t for k, t in fp.items()}, {module(n): r for n, r in results.outside.items()}
        for index in range(n_layers):
            layer_results, layer_fp = results.layer(index)
            layer_fp, layer_results = dense_fused_experts(model, layer_fp, layer_results)
            yield {key(k): t for k, t in layer_fp.items()}, {module(n): r for n, r in layer_results.items()}
            del layer_results, layer_fp
            trim_heap()

    # by the model's own names: loaders match the ignore list against the model they build
    fp_linears = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in results)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    layout = Layout(tuple(adapter.sub_names()), n_layers, tuple(fp_linears), renamed_linears(model, module),
                    tuple(module(n) for n in transposed_linears(model)))
    return write_checkpoint_streamed(config, parts(), output, fmt=fmt, spec=spec, layout=layout, source=source,
                                     report=report, overwrite=overwrite)
