"""Experts of families that plain transformers reads only fused: written dense, in the fused layout.

transformers loads per-expert quantized tensors (`experts.<e>.gate_proj.weight_packed`...) only where it can
put them somewhere: its conversion mapping merges per-expert checkpoint keys into the fused parameters
(Mixtral, the Qwen-MoE and DeepSeek families), or its quantizer swaps the fused module for per-expert linears
(Llama 4). Families whose checkpoints keep experts fused (GraniteMoE, Aria, gpt-oss, Qwen3-VL-MoE, MiniMax-M3)
have neither: their per-expert tensors would be dropped as unexpected and the fused parameters initialised at
random. For those, the export stores each experts module's dequantized weights as the fused parameters the
family's checkpoints hold, so transformers loads exactly what quantkit solved (without the experts' compression).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from quantkit.export.installed import transformers_reads_experts
from quantkit.models.expert_layout import join_experts
from quantkit.models.experts import routed_experts
from quantkit.quant.spec import QuantResult

logger = logging.getLogger(__name__)


def dense_fused_experts(model: nn.Module, fp: dict[str, torch.Tensor], results: dict[str, QuantResult],
                        ) -> tuple[dict[str, torch.Tensor], dict[str, QuantResult]]:
    """(fp, results) keyed by `model`'s names, with the experts in them moved from `results` into `fp` as their
    module's fused dense parameters, where transformers reads no per-expert layout for the family (see the
    module doc); unchanged otherwise. A streamed part holding no expert is returned as it is."""
    containers = routed_experts(model)
    if not containers or transformers_reads_experts(model):
        return fp, results
    fp, results = dict(fp), dict(results)
    for name, experts in containers:
        first = next(experts.experts())
        linears = [f"{name}.{e}.{p}" for e in range(experts.num_experts) for p in first.names.all()]
        if not any(n in results or f"{n}.weight" in fp for n in linears):
            continue
        dtype = getattr(first, first.names.down).weight.dtype
        tensors = {}
        for n in linears:
            local = n[len(name) + 1:]
            tensors[f"{local}.weight"] = results.pop(n).dequantize().to(dtype) if n in results else fp.pop(f"{n}.weight")
            if f"{n}.bias" in fp:
                tensors[f"{local}.bias"] = fp.pop(f"{n}.bias")
        for key, value in join_experts(tensors, experts.layout, first.names, experts.num_experts).items():
            fp[f"{name}.{key}"] = value.contiguous()
        if name == containers[0][0]:  # once per export (a streamed export writes one layer per call)
            logger.warning("transformers reads %s's experts only fused: they are written dense (dequantized) in "
                           "the fused layout, the other linears packed", type(model).__name__)
    return fp, results
