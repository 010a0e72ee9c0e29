"""Adapters (derived from the model by quantkit.models.discover, with what family files add) and model loading."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import pickle
import weakref
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from quantkit.errors import QuantkitError, first_line, refuse_special_in
from quantkit.models import gpt_neox, llama, opt
from quantkit.models.base import Adapter, Family, get_module, layer_output
from quantkit.models.checks import check_model_weights, source_name
from quantkit.models.discover import derive_adapter, is_image_text

logger = logging.getLogger(__name__)

FAMILIES: tuple[Family, ...] = (llama.FAMILY, gpt_neox.FAMILY, opt.FAMILY)

__all__ = [
    "FAMILIES",
    "Adapter",
    "Family",
    "adapter_for",
    "auto_class_for",
    "family_for",
    "get_module",
    "is_vlm",
    "layer_output",
    "load_model",
    "register",
    "source_name",
]

_DERIVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def register(family: Family) -> None:
    """Add a family's overrides (smoothing folds, vision modules) for its model types."""
    global FAMILIES
    FAMILIES = tuple(f for f in FAMILIES if f.name != family.name) + (family,)
    _DERIVED.clear()


def family_for(config) -> Family | None:
    """The family file covering a config's model type, or its text model's (a VLM's language model)."""
    text = getattr(config, "text_config", None)
    for model_type in (getattr(config, "model_type", None), getattr(text, "model_type", None)):
        for family in FAMILIES:
            if model_type in family.model_types:
                return family
    return None


def adapter_for(model: nn.Module | object) -> Adapter:
    """The adapter of a built model (derived once per model object), or of a config (derived from its model built
    on the meta device); a QuantkitError naming what was not found. A model's fused experts become per-expert
    linears first, and Conv1D layers linears (quantkit.models.conv1d), in place (the model computes what it computed)."""
    from quantkit.models.conv1d import linears_from_conv1d
    from quantkit.models.experts import unfuse_experts

    if not isinstance(model, nn.Module):
        import torch

        with torch.device("meta"):
            model = auto_class_for(model).from_config(model)
    # quantkit works on a mixture of experts with one linear per expert projection: fused experts are split first;
    # GPT-2-style Conv1D layers become linears
    changed = linears_from_conv1d(model)
    changed = unfuse_experts(model) or changed
    adapter = None if changed else _DERIVED.get(model)
    if adapter is None:
        adapter = derive_adapter(model, family_for(model.config))
        _DERIVED[model] = adapter
    return adapter


def is_vlm(model_or_config) -> bool:
    """True for a vision-language model (a vision side beside its text decoder)."""
    return is_image_text(getattr(model_or_config, "config", model_or_config))


def auto_class_for(config):
    """The transformers Auto class that builds `config`'s model: image-text or causal LM; a QuantkitError for
    a model type transformers has neither for."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    if is_image_text(config) and model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    raise QuantkitError(f"unsupported architecture {model_type!r}: transformers has no causal-LM or image-text model "
                        "for it")


# quant_method of a checkpoint's quantization_config -> (the module transformers needs, what to install).
QUANTIZED_LOADERS = {"gptq": ("gptqmodel", "pip install gptqmodel optimum")}


def check_quantized_loadable(config, name_or_path: str) -> None:
    """Raise QuantkitError naming what to install when transformers cannot load `config`'s quantized checkpoint here."""
    qc = getattr(config, "quantization_config", None)
    method = _quant_method(config)
    if method in QUANTIZED_LOADERS:
        module, install = QUANTIZED_LOADERS[method]
        if importlib.util.find_spec(module) is None:
            raise QuantkitError(missing_loader_message(name_or_path, method, install))
    elif method is not None:
        _check_quantizer_environment(qc, method, name_or_path)


def _quant_method(config) -> str | None:
    """The quant_method of a config's quantization_config (a dict or transformers' object), or None."""
    qc = getattr(config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return getattr(method, "value", method)


def check_quantized_runs(model: nn.Module, name_or_path: str) -> None:
    """Raise QuantkitError when `model` is a pre-quantized checkpoint whose own forward fails on a probe input:
    then its quantized kernels, not its architecture, are why quantkit cannot use it."""
    import torch

    from quantkit.models.probe import error_line, probe_sample

    method = _quant_method(model.config)
    if method is None:
        return
    try:
        with torch.no_grad():
            model(**probe_sample(model.config))
    except Exception as err:  # noqa: BLE001 - any failure of the checkpoint's own forward is the reason
        tb = err.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        package = tb.tb_frame.f_globals.get("__name__", "?").split(".")[0] if tb is not None else "?"
        raise QuantkitError(f"{name_or_path} is a {method} checkpoint that transformers loads but cannot run here: "
                            f"its own forward fails in {package} ({error_line(err)}); evaluate it where {method} "
                            "runs it, or the full-precision model it was made from") from None


def _check_quantizer_environment(qc: object, method: str, name_or_path: str) -> None:
    """transformers' own check of what its quantizer for `method` needs installed, as from_pretrained makes it
    (AutoHfQuantizer.from_config, then validate_environment): a missing package is one line naming it; anything else
    is left to the loading, which says it in its own words."""
    import copy

    from transformers.quantizers.auto import AutoHfQuantizer

    # the check imports the quantizer's package, whose import may log advice (bitsandbytes: an optional CPU kernel
    # from the hub it could not fetch) that printed before a refusal's one line; a package that cannot run says so
    # when it runs (check_quantized_runs)
    was_disabled = logging.root.manager.disable
    logging.disable(max(was_disabled, logging.WARNING))
    try:
        fields = copy.deepcopy(qc) if isinstance(qc, dict) else qc.to_dict()
        if not AutoHfQuantizer.supports_quant_method(fields):
            return
        quantizer = AutoHfQuantizer.from_config(fields, pre_quantized=True)
        quantizer.validate_environment(device_map=None, weights_only=True)
    except ImportError as err:
        why = " ".join(str(err).split())
        raise QuantkitError(f"{name_or_path} is a {method} checkpoint, which transformers cannot load here: {why} "
                            "(quantkit.load_quantized reads quantkit's own exports without it)") from None
    except Exception:  # noqa: BLE001 - not this check's to judge
        return
    finally:
        logging.disable(was_disabled)


def missing_loader_message(name_or_path: str, method: str, install: str) -> str:
    """The one line saying which package transformers needs to load a `method` checkpoint."""
    return (f"{name_or_path} is a {method.upper()} checkpoint, which transformers loads only through optimum and "
            f"gptqmodel; run `{install}` (quantkit.load_quantized reads quantkit's own exports without them)")


class _Held(logging.Filter):
    """A logger filter that keeps every record back (for the caller to let through or drop)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide transformers' per-tensor loading bar for one load (quantkit shows its own progress), then put it
    back as the caller had it: a notebook's own transformers settings are left alone. transformers' warnings of the
    load (its LOAD REPORT) are held until it has finished, and dropped where it fails or is interrupted."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # transformers writes the report in a `finally`: a SIGINT mid-load printed a table of the half-loaded model's
    # keys before the run's one error line
    loader_log, held = logging.getLogger("transformers.modeling_utils"), _Held()
    loader_log.addFilter(held)
    try:
        yield
    except BaseException:
        held.records.clear()
        raise
    finally:
        loader_log.removeFilter(held)
        if was_enabled:
            hf_logging.enable_progress_bar()
    for record in held.records:
        loader_log.handle(record)


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
    from transformers import AutoConfig
    if looks_local(name_or_path):
        refuse_special_in(Path(name_or_path).expanduser(), f"model folder {name_or_path}")
        if not (Path(name_or_path).expanduser() / "config.json").is_file():
            raise QuantkitError(f"model path {name_or_path} not found or has no config.json; give a model directory or "
                                "a hub id")
        name_or_path = str(Path(name_or_path).expanduser())  # ~ as the shell reads it (transformers takes it literally)
    if config is None:
        try:
            config = AutoConfig.from_pretrained(name_or_path, revision=revision)
        except OSError as err:
            raise QuantkitError(f"cannot load model config for {name_or_path!r}: {str(err).splitlines()[0]}") from err
    auto_class = auto_class_for(config)
    check_quantized_loadable(config, name_or_path)
    torch_dtype = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
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
    except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as err:
        # a .bin checkpoint torch cannot unpickle (safetensors files are checked before this load)
        raise QuantkitError(f"cannot load the weights of {name_or_path}: {first_line(err)}; save or download them "
                            "again") from None
    # transformers initialises a missing tensor randomly and only warns; quantizing it would export noise
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise QuantkitError(f"{name_or_path}: tensor {missing[0]}{more} is not in the checkpoint; the model is incomplete")
    check_model_weights(model, name_or_path)
    model.eval()
    model.config.use_cache = False
    try:
        adapter_for(model)  # a model quantkit cannot handle fails here, in one line
    except QuantkitError:
        check_quantized_runs(model, name_or_path)  # a checkpoint whose own quantized layers fail says so instead
        raise
    return model
