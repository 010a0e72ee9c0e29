"""Loading a quantkit checkpoint as a transformers model holding the dequantized float weights."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from quantkit.errors import (
    QuantkitError,
    checked_call,
    closest,
    expect_path,
    expect_utf8,
    short_repr,
)
from quantkit.export.common import MANIFEST, Checkpoint, float_dtype
from quantkit.export.reader import build_model, model_name, read_checkpoint, read_json
from quantkit.models.conv1d import checkpoint_layout
from quantkit.models.experts import (
    fuse_experts,
    model_key,
    unfuse_experts,
    unfused_state,
)


def dense_state(ckpt: Checkpoint, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """FP tensors plus each quantized linear's dequantized weight (in `dtype`, default the FP dtype), in the layout of
    the model's checkpoints (a Conv1D's [in, out])."""
    dtype = dtype or float_dtype(ckpt.fp_tensors)
    state = dict(ckpt.fp_tensors)
    transposed = set(ckpt.manifest.get("transposed") or ())
    for name, r in ckpt.results.items():
        weight = r.dequantize().to(dtype)
        state[f"{name}.weight"] = checkpoint_layout(weight) if name in transposed else weight
    return state


LOAD_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _second_positional(value: object) -> str:
    """What to do with a second positional argument of load_quantized: other loaders take a device or a dtype there
    (torch.load's map_location, from_pretrained's habits), and a quiet guess between them would load the wrong thing."""
    if isinstance(value, torch.dtype) or (isinstance(value, str) and value in (*LOAD_DTYPES, "auto")):
        return f"reads as a dtype: give it by name, dtype={value!r}"
    if isinstance(value, (str, torch.device)):
        try:
            torch.device(value)
        except (RuntimeError, ValueError, TypeError):
            pass
        else:
            return ("reads as a device: the model loads on the CPU; move it with model.to(device) after loading "
                    "(dtype= is the one other argument)")
    return "is no argument of it: it takes path and dtype= (by name), and loads on the CPU"


@checked_call
def load_quantized(path: str | os.PathLike, *more: object, dtype: torch.dtype | str | None = None,
                   **unknown: object) -> torch.nn.Module:
    """Load any quantkit output as a transformers model holding the dequantized float weights (another
    quantized checkpoint goes through transformers' own loader, with what it needs named if missing), on the CPU.
    dtype: torch.float32, torch.float16 or torch.bfloat16 (or its name); None or "auto": the export's own.
    path is the only positional argument (a second one is refused, by what it reads as)."""
    from transformers.initialization import no_init_weights

    if more:
        raise QuantkitError(f"load_quantized() takes one positional argument, path; the second, "
                            f"{short_repr(more[0])}, {_second_positional(more[0])}")
    root = Path(expect_path("load_quantized(path)", path))
    expect_utf8(root, "load_quantized(path)")
    if unknown:
        name = sorted(unknown)[0]
        near = closest(name, ("path", "dtype"))
        hint = f"did you mean {near!r}? " if near is not None else ""
        raise QuantkitError(f"load_quantized() has no argument {name!r}; {hint}it takes path and dtype, and loads on "
                            "the CPU (move the model with model.to(device) after loading)")
    wanted = load_dtype(dtype)
    foreign = root.is_dir() and not (root / MANIFEST).is_file() and (root / "config.json").is_file()
    if foreign and "quantization_config" in read_json(root / "config.json"):
        from quantkit.models import load_model

        names = {v: k for k, v in LOAD_DTYPES.items()}
        return load_model(str(root), dtype=names[wanted] if wanted is not None else "auto")
    ckpt = read_checkpoint(path)
    dtype = wanted or float_dtype(ckpt.fp_tensors)
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
    act_bits = (ckpt.manifest.get("spec") or {}).get("act_bits")
    if act_bits is None and unfused:
        fuse_experts(model)
    if act_bits is not None:  # a W8A8/W4A8 export runs with its linears' inputs quantized, as it was calibrated
        from quantkit.quant.activations import quantize_model_activations

        # each expert's input is quantized on its own, so the experts stay the per-expert linears calibration ran
        # (transformers' fused experts compute every expert inside one module: no input to hook per expert)
        rename = model_key(model) if unfused else None
        names = sorted(rename(f"{n}.weight").removesuffix(".weight") if rename else n for n in ckpt.results)
        quantize_model_activations(model, names, int(act_bits))
    from quantkit.models.checks import QUANTIZED_MARK, check_model_weights

    check_model_weights(model, str(path))  # a NaN in a stored FP tensor (a norm, the embedding) scores as loss nan
    setattr(model, QUANTIZED_MARK, f"loaded from the export {path}")
    model.eval()
    return model


def load_dtype(dtype: object) -> torch.dtype | None:
    """load_quantized's dtype argument as a torch dtype (None: the export's own)."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype) and dtype in LOAD_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in LOAD_DTYPES:
        return LOAD_DTYPES[dtype]
    near = closest(str(dtype).removeprefix("torch."), LOAD_DTYPES) if isinstance(dtype, (str, torch.dtype)) else None
    hint = f"did you mean torch.{near}? " if near is not None else ""
    raise QuantkitError(f"load_quantized(dtype=) must be torch.float32, torch.float16 or torch.bfloat16 (or its name, "
                        f"or 'auto' for the export's own); {hint}got {short_repr(dtype)}")
