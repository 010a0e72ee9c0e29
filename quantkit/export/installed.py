"""What the installed transformers loads, asked of transformers itself (its conversion tables, or a load of a tiny
export), so that a load line or a card stays true on every supported release instead of naming one."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from quantkit.models.experts import routed_experts

if TYPE_CHECKING:
    from quantkit.export.formats.base import Format

logger = logging.getLogger(__name__)


def transformers_reads_experts(model: nn.Module) -> bool:
    """Whether plain transformers loads `model`'s experts from per-expert quantized tensors."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter
    from transformers.quantizers.base import MODULES_TO_PATCH_FOR_QUANTIZATION
    from transformers.utils.quantization_config import QuantizationMethod

    for _, experts in routed_experts(model):
        patch = MODULES_TO_PATCH_FOR_QUANTIZATION.get(experts.fused_class.__name__, {})
        # transformers' quantizer for the export's config (its method name, not a quantkit format name)
        methods = {str(getattr(m, "value", m)) for m in patch.get("quantization_methods", [])}
        if QuantizationMethod.COMPRESSED_TENSORS.value in methods:
            return True
    return any(isinstance(t, WeightConverter) and any("experts.*." in p for p in t.source_patterns)
               for t in get_model_conversion_mapping(model, add_legacy=False))


@functools.cache
def transformers_decodes_each_scheme(fmt: type[Format]) -> bool:
    """Whether the installed transformers loads an asymmetric export of `fmt` (compressed-tensors) whose linears have
    several widths with each linear's own scheme (CompressedTensorsConfig(dequantize=True)), on a one-layer Llama whose
    o_proj is 8-bit and down_proj 4-bit (5.25 decodes every linear with one config group's scheme; 5.21 each with its
    own)."""
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig, LlamaConfig

    from quantkit.export.common import ExportPlan, Setting, trivial_g_idx
    from quantkit.quant.spec import QuantResult

    config = LlamaConfig(vocab_size=8, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1,
                         num_key_value_heads=1, tie_word_embeddings=False)
    state = {k: v.detach() for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    # linears vLLM loads alone (quantization_config warns of a fused q/k/v or gate/up of several settings)
    results = {f"model.layers.0.{p}": QuantResult(
        qweight=torch.randint(0, 1 << bits, (32, 32), generator=generator, dtype=torch.uint8),
        scales=torch.rand(32, 1, generator=generator) + 0.5,
        zeros=torch.randint(0, 1 << bits, (32, 1), generator=generator, dtype=torch.uint8),
        g_idx=trivial_g_idx(32, 32), bits=bits, group_size=32, sym=False, act_order=False)
        for p, bits in (("self_attn.o_proj", 8), ("mlp.down_proj", 4))}
    for name, r in results.items():
        del state[f"{name}.weight"]
        state.update(fmt().encode(name, r, torch.float32)[0])
    fp_linears = tuple(k[: -len(".weight")] for k in state if k.endswith("proj.weight")) + ("lm_head",)
    config.quantization_config = fmt().quantization_config(
        ExportPlan(settings={n: Setting.of(r) for n, r in results.items()}, fp_linears=fp_linears))
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()), \
                contextlib.redirect_stdout(io.StringIO()):
            config.save_pretrained(tmp)
            save_file(state, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
            weights = dict(AutoModelForCausalLM.from_pretrained(
                tmp, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)).named_parameters())
            return all(torch.allclose(weights[f"{n}.weight"], r.dequantize(), atol=1e-5) for n, r in results.items())
    except Exception as err:  # noqa: BLE001 - a load error is this transformers' answer
        logger.debug("transformers fails on an asymmetric export of several schemes: %s", err)
        return False
    finally:
        transformers.logging.set_verbosity(verbosity)


@functools.cache
def transformers_reads_asymmetric_experts(fmt: type[Format]) -> bool:
    """Whether the installed transformers decompresses MoE experts that `fmt` (compressed-tensors) stores asymmetric:
    its MoE weight conversion (CompressedTensorsDequantize), asked for one 4-bit per-channel expert with its zero point,
    gives that expert's dequantized weight (5.25 hands the compressor no zero point: 'Asymmetric quant requires
    zero-point values', and from_pretrained fails on the export)."""
    from types import SimpleNamespace

    from quantkit.export.common import trivial_g_idx
    from quantkit.quant.spec import QuantResult

    try:
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from transformers.integrations.compressed_tensors import CompressedTensorsDequantize
    except ImportError:  # no MoE conversion of compressed-tensors experts in this transformers
        return False
    generator = torch.Generator().manual_seed(0)
    r = QuantResult(qweight=torch.randint(0, 16, (8, 32), generator=generator, dtype=torch.uint8),
                    scales=torch.rand(8, 1, generator=generator) + 0.5,
                    zeros=torch.randint(0, 16, (8, 1), generator=generator, dtype=torch.uint8),
                    g_idx=trivial_g_idx(32, 32), bits=4, group_size=-1, sym=False, act_order=False)
    tensors, _ = fmt().encode("e", r, torch.float32)
    scheme = QuantizationScheme(targets=["Linear"], format="pack-quantized",
                                weights=QuantizationArgs(num_bits=4, symmetric=False, strategy="channel"))
    quantizer = SimpleNamespace(compressor=SimpleNamespace(quantization_config=SimpleNamespace(format="pack-quantized")))
    holder = nn.Module()
    holder.w = nn.Parameter(torch.zeros(1))  # the fused parameter the conversion fills (its dtype is read)
    try:
        out = CompressedTensorsDequantize(quantizer, scheme).convert(
            {k.replace("e.", "experts.0.w1."): [v] for k, v in tensors.items()}, [], [], full_layer_name="w",
            model=holder)
        return torch.allclose(next(iter(out.values()))[0], r.dequantize(), atol=1e-5)
    except Exception as err:  # noqa: BLE001 - a conversion error is this transformers' answer
        logger.debug("transformers fails on an asymmetric compressed-tensors expert: %s", err)
        return False
