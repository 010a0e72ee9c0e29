"""Adapter registry and model loading."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from quantkit.errors import QuantkitError
from quantkit.models import gpt_neox, llama, opt, qwen2
from quantkit.models.base import Adapter, get_module, layer_output

ADAPTERS: tuple[Adapter, ...] = (llama.ADAPTER, qwen2.ADAPTER, gpt_neox.ADAPTER, opt.ADAPTER)

__all__ = ["ADAPTERS", "Adapter", "adapter_for", "get_module", "layer_output", "load_model", "supported_model_types"]


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


def load_model(name_or_path: str, dtype: str = "auto", revision: str | None = None) -> nn.Module:
    """Load a causal LM (local dir or hub id) on CPU in eval mode, after checking its architecture."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    local = Path(name_or_path)
    looks_local = local.exists() or name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.rstrip(os.sep) and name_or_path.count("/") != 1
    if looks_local and not (local / "config.json").is_file():
        raise QuantkitError(f"model path {name_or_path} not found or has no config.json; give a model directory or a hub id")
    try:
        config = AutoConfig.from_pretrained(name_or_path, revision=revision)
    except OSError as err:
        raise QuantkitError(f"cannot load model config for {name_or_path!r}: {str(err).splitlines()[0]}") from err
    adapter_for(config)
    torch_dtype = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(name_or_path, revision=revision, dtype=torch_dtype)
    model.eval()
    model.config.use_cache = False
    return model
