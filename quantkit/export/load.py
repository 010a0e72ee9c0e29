"""Loading a quantkit checkpoint as a transformers model holding the dequantized float weights."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from quantkit.errors import QuantkitError, expect_path
from quantkit.export.common import MANIFEST, Checkpoint, float_dtype
from quantkit.export.reader import read_checkpoint, read_json
from quantkit.models.experts import (
    fuse_experts,
    model_key,
    routed_experts,
    unfuse_experts,
    unfused_state,
)


def dense_state(ckpt: Checkpoint, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """FP tensors plus each quantized linear's dequantized weight (in `dtype`, default the FP dtype)."""
    dtype = dtype or float_dtype(ckpt.fp_tensors)
    state = dict(ckpt.fp_tensors)
    for name, r in ckpt.results.items():
        state[f"{name}.weight"] = r.dequantize().to(dtype)
    return state


def build_model(config: dict, path: str | os.PathLike, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The transformers model an export's config.json describes (its architectures' class, else a causal LM),
    built on the current device (meta for names and shapes only)."""
    import transformers

    cfg = dict(config)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise QuantkitError(f"{Path(path) / 'config.json'} has no model_type")
    try:
        built = transformers.AutoConfig.for_model(model_type, **cfg)
    except Exception as err:  # noqa: BLE001
        raise QuantkitError(f"cannot build a {model_type!r} config from {path}: {err}") from err
    arch = (cfg.get("architectures") or [None])[0]
    model_cls = getattr(transformers, arch, None) if arch else None
    kwargs = {} if dtype is None else {"dtype": dtype}
    if model_cls is not None:
        return model_cls._from_config(built, **kwargs)
    return transformers.AutoModelForCausalLM.from_config(built, **kwargs)


def model_name(config: dict) -> str:
    """The class (else the model type) an export's config.json names."""
    return (config.get("architectures") or [None])[0] or str(config.get("model_type"))


def check_tensor_names(ckpt: Checkpoint) -> None:
    """Every tensor of an export is a quantized linear's or a parameter or buffer of the model its config.json
    describes (built on the meta device); a stray tensor is named (transformers would drop it silently)."""
    with torch.device("meta"):
        model = build_model(ckpt.config, ckpt.path)
    rename = model_key(model) if unfuse_experts(model) else (lambda key: key)
    known = set(model.state_dict(keep_vars=True))
    # experts written dense in the fused layout (quantkit.export.experts): the names unfused_state splits
    known_fused = {f"{name}.{k}{bias}" for name, experts in routed_experts(model)
                   for k in experts.layout.fused_names() for bias in ("", "_bias")}
    names = [*ckpt.fp_tensors, *(f"{module}.weight" for module in ckpt.results)]
    for name in sorted(names):
        key = rename(name)
        if key not in known and key not in known_fused:
            raise QuantkitError(f"{ckpt.path}: tensor {name} does not belong to a {model_name(ckpt.config)} model; "
                                "the export is damaged or was edited, export it again")


def load_quantized(path: str | os.PathLike) -> torch.nn.Module:
    """Load any quantkit output as a transformers model holding the dequantized float weights (another
    quantized checkpoint goes through transformers' own loader, with what it needs named if missing)."""
    from transformers.initialization import no_init_weights

    root = Path(expect_path("load_quantized(path)", path))
    foreign = root.is_dir() and not (root / MANIFEST).is_file() and (root / "config.json").is_file()
    if foreign and "quantization_config" in read_json(root / "config.json"):
        from quantkit.models import load_model

        return load_model(str(root))
    ckpt = read_checkpoint(path)
    dtype = float_dtype(ckpt.fp_tensors)
    with no_init_weights():
        model = build_model(ckpt.config, path, dtype)
    state = dense_state(ckpt, dtype)
    # experts are stored per expert: load them into per-expert linears, then join them into transformers' fused ones
    unfused = unfuse_experts(model)
    if unfused:
        rename = model_key(model)
        # experts written dense in the fused layout (quantkit.export.experts) split like any fused checkpoint's
        state = unfused_state(model, {rename(k): v for k, v in state.items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise QuantkitError(f"{path}: tensor {unexpected[0]} does not belong to a {model_name(ckpt.config)} model")
    model.tie_weights()
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ptrs = {t.data_ptr() for k, t in model.state_dict().items() if k in state}
    really_missing = [k for k in missing if k in params and params[k].data_ptr() not in loaded_ptrs]
    if really_missing:
        raise QuantkitError(f"{path}: tensor {really_missing[0]} is missing; the checkpoint is incomplete")
    if unfused:
        fuse_experts(model)
    act_bits = (ckpt.manifest.get("spec") or {}).get("act_bits")
    if act_bits is not None:  # a W8A8/W4A8 export runs with its linears' inputs quantized, as it was calibrated
        from quantkit.quant.activations import quantize_model_activations

        quantize_model_activations(model, sorted(ckpt.results), int(act_bits))
    from quantkit.models.checks import check_model_weights

    check_model_weights(model, str(path))  # a NaN in a stored FP tensor (a norm, the embedding) scores as loss nan
    model.eval()
    return model
