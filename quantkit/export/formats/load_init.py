"""Whether transformers can initialise a model whose packed linears have lost their weight, as it does while loading
a compressed-tensors checkpoint: its quantizer replaces each packed linear's `weight` by weight_packed/weight_scale
before loading, and transformers (5.x) then runs the family's weight initialisation over every module (the tensors the
checkpoint filled are skipped, but a missing attribute is read all the same). Falcon's init reads each FalconLinear's
weight, NanoChat's attention init its child o_proj's weight: such a family cannot load the export at all.

The probe mirrors PreTrainedModel.initialize_weights (smart_apply): children first, each module initialised by the
_initialize_weights of the innermost PreTrainedModel holding it, under transformers' guarded init functions, on a
fresh copy of the model built on the meta device (no memory, no arithmetic)."""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterable

import torch

# (model class, config JSON, packed names) -> the failing module and error, or None
_CACHE: dict[tuple[type, str, tuple[str, ...]], tuple[str, str] | None] = {}


def init_failure(model: torch.nn.Module, packed: Iterable[str]) -> tuple[str, str] | None:
    """(module name, error) of the first module whose load-time weight initialisation fails once the linears
    `packed` have no weight, where the same model with its weights initialises; None where all of it initialises
    (or transformers' load-time init is not there to mirror). Measured on a meta-device copy, cached."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or not hasattr(model, "_initialize_weights"):
        return None
    key = (type(model), model.config.to_json_string(), tuple(sorted(packed)))
    if key not in _CACHE:
        _CACHE[key] = _probe(type(model), model.config, key[2])
    return _CACHE[key]


def _fresh(cls: type, config: object) -> torch.nn.Module | None:
    """`cls` built from `config` on the meta device as from_pretrained builds it before loading (init not run)."""
    try:
        with torch.device("meta"):
            return cls._from_config(copy.deepcopy(config))
    except Exception:  # noqa: BLE001 - a model transformers cannot build is its loaders' to refuse, not this probe's
        return None


def _probe(cls: type, config: object, packed: tuple[str, ...]) -> tuple[str, str] | None:
    model = _fresh(cls, config)
    if model is None:
        return None
    for name in packed:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue  # a name the built model holds otherwise (fused experts): compressed-tensors packs no linear there
        if isinstance(module, torch.nn.Linear) and "weight" in module._parameters:
            del module.weight
    failed = _initialise(model)
    if failed is None:
        return None
    # a failure the whole model has too (an init that cannot run on the meta device) is not the packing's
    whole = _fresh(cls, config)
    return failed if whole is not None and _initialise(whole) is None else None


def _initialise(model: torch.nn.Module) -> tuple[str, str] | None:
    """transformers' load-time initialisation of every module (initialize_weights' order and dispatch); the first
    module whose init raises, with the error, else None."""
    from transformers import PreTrainedModel, initialization

    custom = bool(getattr(model, "is_custom_code", lambda: False)())

    def init_with(owner: PreTrainedModel):
        takes_flag = len(inspect.signature(owner._initialize_weights).parameters) > 1  # 5.21 takes the module only
        return (lambda m: owner._initialize_weights(m, custom)) if takes_flag else owner._initialize_weights

    def walk(module: torch.nn.Module, init, prefix: str) -> tuple[str, str] | None:
        for name, child in module.named_children():
            failed = walk(child, init_with(child) if isinstance(child, PreTrainedModel) else init, f"{prefix}{name}.")
            if failed is not None:
                return failed
        try:
            init(module)
        except Exception as err:  # noqa: BLE001 - whatever the family's init raises, from_pretrained raises too
            return prefix.rstrip(".") or type(model).__name__, f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        return None

    guard = getattr(initialization, "guard_torch_init_functions", contextlib.nullcontext)
    with torch.no_grad(), guard():
        return walk(model, init_with(model), "")
