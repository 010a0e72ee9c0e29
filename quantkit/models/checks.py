"""What a model's weights must hold before anything is calibrated: float values, all of them finite.

A NaN in one embedding row or norm weight survives RTN and GPTQ untouched (they quantize the decoder
linears) and is exported as it came; integer weights are cast and quantized as if they were values. Both are
refused here by tensor name, from a loaded model or from the safetensors files, before any work.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from quantkit.errors import QuantkitError

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")  # safetensors header names
_LAYER = re.compile(r"\.(?:layers|h|blocks|block)\.(\d+)\.")


def where_in_model(name: str) -> str:
    """Where a tensor sits, for a message: "decoder layer 3", "the embeddings" or "outside the decoder layers"."""
    found = _LAYER.search(f".{name}")
    if found:
        return f"decoder layer {found.group(1)}"
    if "embed" in name or "wte" in name or "wpe" in name:
        return "the embeddings"
    return "outside the decoder layers"


def check_weight(name: str, tensor: torch.Tensor, source: str) -> None:
    """A float tensor with finite values only; else a QuantkitError naming `source`, the tensor and its layer."""
    if not tensor.is_floating_point():
        raise QuantkitError(
            f"{source}: weight {name} ({where_in_model(name)}) is {str(tensor.dtype).removeprefix('torch.')}, not a "
            "float tensor; quantkit quantizes float weights: save the model in float32, float16 or bfloat16"
        )
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        nan = int(torch.isnan(tensor).sum())
        inf = int(tensor.numel() - int(finite.sum()) - nan)
        counts = " and ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "infinite")) if n)
        raise QuantkitError(
            f"{source}: weight {name} ({where_in_model(name)}) holds {counts} value(s) among its {tensor.numel()}; the model "
            "is broken and its quantized copy would be too: fix or download the weights again"
        )


def check_full_precision(config, name: str) -> None:
    """A model to quantize is a full-precision one: a checkpoint whose config declares a quantization (a
    quantkit export, a GPTQ or compressed-tensors download) holds packed codes the solvers cannot start from."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return
    method = qc.get("quant_method") if isinstance(qc, Mapping) else getattr(qc, "quant_method", None)
    method = getattr(method, "value", method) or "quantized"
    raise QuantkitError(f"{name} is already quantized (its config.json has a {method} quantization_config); quantize "
                        "the full-precision model it was made from (`quantkit export` converts a quantkit export to "
                        "another format)")


def check_model_weights(model: torch.nn.Module, source: str | None = None) -> None:
    """Every parameter of a loaded model is float and finite (tied parameters checked once; the integer codes
    of an already quantized checkpoint are left alone)."""
    config = getattr(model, "config", None)
    source = source or str(getattr(config, "_name_or_path", "") or type(model).__name__)
    packed = getattr(config, "quantization_config", None) is not None  # a quantized checkpoint's integer codes
    for name, param in model.named_parameters():
        if param.device.type == "meta" or (packed and not param.is_floating_point()):
            continue
        check_weight(name, param.detach(), source)


def check_stored_dtypes(stored: Mapping[str, str], float_params: Iterable[str], source: str) -> None:
    """From safetensors headers only: each of `float_params` that the checkpoint stores (name -> header dtype)
    is stored as a float, not as integers transformers would cast and quantkit would quantize as values."""
    for name in float_params:
        dtype = stored.get(name)
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise QuantkitError(
                f"{source}: weight {name} ({where_in_model(name)}) is stored as {dtype}, not as floats; quantkit "
                "quantizes float weights: save the model in float32, float16 or bfloat16"
            )


def check_weight_files(files: Iterable[str | os.PathLike], source: str) -> None:
    """Every float tensor of these safetensors files is finite, read one tensor at a time (for runs that
    stream layers from disk and so never hold the whole model)."""
    from safetensors import safe_open

    for path in files:
        with safe_open(os.fspath(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensor = handle.get_tensor(key)
                if tensor.is_floating_point():
                    check_weight(key, tensor, f"{source} ({Path(path).name})")


def check_vocabulary(tokens: int, rows: int | None, tokenizer: str) -> None:
    """A tokenizer of `tokens` ids fits an embedding of `rows`: no id past the last row, and not so few ids that
    most rows would never be read (models pad their vocabulary by a few percent at most; a tokenizer covering
    less than half of it belongs to another model, and its ids mean other words to this one)."""
    if rows is None:
        return
    if tokens > rows:
        raise QuantkitError(f"{tokenizer} has {tokens} tokens but the model's embedding holds {rows}; they do not "
                            "belong together: give the model's own tokenizer")
    if tokens < rows / 2:
        raise QuantkitError(f"{tokenizer} has {tokens} tokens but the model's embedding holds {rows}: most of the "
                            "model's vocabulary would never be used, so the tokenizer is another model's; give the "
                            "model's own tokenizer")


def embedding_rows(model_or_config: object) -> int | None:
    """Rows of a model's input embedding (a loaded model's, else its config's vocab_size; a VLM's text model's)."""
    if isinstance(model_or_config, torch.nn.Module) and hasattr(model_or_config, "get_input_embeddings"):
        try:
            return int(model_or_config.get_input_embeddings().num_embeddings)
        except (AttributeError, NotImplementedError, TypeError):
            pass
    config = getattr(model_or_config, "config", model_or_config)
    for cfg in (getattr(config, "text_config", None), config):
        value = getattr(cfg, "vocab_size", None) if cfg is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_tokenizer_fits(tokenizer_or_processor: object, model_or_config: object,
                         what: str = "the tokenizer given (tokenizer_or_processor=)") -> None:
    """A given tokenizer (or a processor's) fits the model's embedding (check_vocabulary)."""
    tokenizer = getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)
    try:
        tokens = len(tokenizer)
    except TypeError:
        return  # not a tokenizer: the data's reader says what it needs
    check_vocabulary(tokens, embedding_rows(model_or_config), what)
