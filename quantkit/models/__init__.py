"""Adapter registry and model loading."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from quantkit.errors import QuantkitError
from quantkit.models import gpt_neox, llama, llava, llava_onevision, opt, qwen2, qwen2_vl
from quantkit.models.base import Adapter, get_module, layer_output
from quantkit.models.checks import check_model_weights

logger = logging.getLogger(__name__)

ADAPTERS: tuple[Adapter, ...] = (
    llama.ADAPTER,
    qwen2.ADAPTER,
    gpt_neox.ADAPTER,
    opt.ADAPTER,
    qwen2_vl.ADAPTER,
    qwen2_vl.ADAPTER_2_5,
    llava.ADAPTER,
    llava_onevision.ADAPTER,
)

__all__ = [
    "ADAPTERS",
    "Adapter",
    "adapter_for",
    "get_module",
    "is_vlm",
    "layer_output",
    "load_model",
    "register",
    "supported_model_types",
]


def register(adapter: Adapter) -> None:
    """Add an adapter (used by the VLM families and by users with their own architectures)."""
    global ADAPTERS
    ADAPTERS = tuple(a for a in ADAPTERS if a.name != adapter.name) + (adapter,)


def supported_model_types() -> list[str]:
    """Every config.model_type an adapter covers."""
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for(model_or_config) -> Adapter:
    """The adapter for a model (or its config), or a QuantkitError naming the supported ones."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise QuantkitError(
        f"unsupported architecture {model_type!r}; supported model types: {', '.join(supported_model_types())}"
    )


def is_vlm(model_or_config) -> bool:
    """True for a vision-language family (its adapter lists vision modules kept in full precision)."""
    return bool(adapter_for(model_or_config).vision)


def _check_text_backbone(config) -> None:
    """LLaVA-style configs name their text model; only Llama-layout backbones have our linear names."""
    text_config = getattr(config, "text_config", None)
    text_type = getattr(text_config, "model_type", None)
    if config.model_type in llava.ADAPTER.model_types + llava_onevision.ADAPTER.model_types and text_type not in (
        None,
        *llava.LLAMA_LAYOUT_TEXT_TYPES,
    ):
        raise QuantkitError(
            f"unsupported {config.model_type} text backbone {text_type!r}; supported: {', '.join(llava.LLAMA_LAYOUT_TEXT_TYPES)}"
        )


# quant_method of a checkpoint's quantization_config -> (the module transformers needs, what to install).
QUANTIZED_LOADERS = {"gptq": ("gptqmodel", "pip install gptqmodel optimum")}


def check_quantized_loadable(config, name_or_path: str) -> None:
    """Raise QuantkitError naming what to install when transformers cannot load `config`'s quantized checkpoint here."""
    qc = getattr(config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    method = getattr(method, "value", method)
    if method not in QUANTIZED_LOADERS:
        return
    module, install = QUANTIZED_LOADERS[method]
    if importlib.util.find_spec(module) is None:
        raise QuantkitError(missing_loader_message(name_or_path, method, install))


def missing_loader_message(name_or_path: str, method: str, install: str) -> str:
    """The one line saying which package transformers needs to load a `method` checkpoint."""
    return (f"{name_or_path} is a {method.upper()} checkpoint, which transformers loads only through optimum and "
            f"gptqmodel; run `{install}` (quantkit.load_quantized reads quantkit's own exports without them)")


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide transformers' per-tensor loading bar for one load (quantkit shows its own progress), then put it
    back as the caller had it: a notebook's own transformers settings are left alone."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def looks_local(name: str) -> bool:
    """Whether a model name is meant as a path rather than a hub id."""
    return (
        Path(name).exists()
        or name.startswith((".", "/", "~"))
        or (os.sep in name.rstrip(os.sep) and name.count("/") != 1)
    )


def load_model(name_or_path: str, dtype: str = "auto", revision: str | None = None, config=None) -> nn.Module:
    """Load a causal LM or a VLM (local dir or hub id) on CPU in eval mode, after checking its architecture;
    `config` is its config when already read (quantkit.models.files.ModelFiles.config)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    if looks_local(name_or_path) and not (Path(name_or_path) / "config.json").is_file():
        raise QuantkitError(f"model path {name_or_path} not found or has no config.json; give a model directory or a hub id")
    if config is None:
        try:
            config = AutoConfig.from_pretrained(name_or_path, revision=revision)
        except OSError as err:
            raise QuantkitError(f"cannot load model config for {name_or_path!r}: {str(err).splitlines()[0]}") from err
    adapter = adapter_for(config)
    _check_text_backbone(config)
    check_quantized_loadable(config, name_or_path)
    torch_dtype = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    auto_class = AutoModelForImageTextToText if adapter.vision else AutoModelForCausalLM
    logger.info("loading %s as %s", name_or_path, auto_class.__name__)
    try:
        with quiet_loading():
            model, info = auto_class.from_pretrained(name_or_path, revision=revision, dtype=torch_dtype, config=config,
                                                     output_loading_info=True)
    except NameError as err:
        # optimum refers to gptqmodel's QuantizeConfig without importing it when gptqmodel is absent or broken
        if "QuantizeConfig" not in str(err):
            raise
        raise QuantkitError(missing_loader_message(name_or_path, "gptq", QUANTIZED_LOADERS["gptq"][1])) from err
    # transformers initialises a missing tensor randomly and only warns; quantizing it would export noise
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise QuantkitError(f"{name_or_path}: tensor {missing[0]}{more} is not in the checkpoint; the model is incomplete")
    check_model_weights(model, name_or_path)
    model.eval()
    model.config.use_cache = False
    return model
