"""Every argument of a calibration job checked at the boundary, before anything else: type, range, the allowed
names (case included) and the options that contradict each other. The CLI's option types do most of this for
`quantkit calibrate`; quantkit.quantize gets the same one-line QuantkitError, naming the argument as Python spells
it and its flag, instead of a TypeError from deep inside."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from typing import Any

from quantkit.bounds import checker
from quantkit.errors import (
    QuantkitError,
    expect_bool,
    expect_choice,
    expect_int,
    expect_names,
    expect_path,
    expect_utf8,
    short_repr,
)

# the flag of each option whose flag is not --option-name (None: the CLI has no such option)
FLAGS = {"output_dir": "-o", "lm_head": "--quantize-lm-head", "vision": "--quantize-vision", "importance": None,
         "hooks": None, "progress": None, "recipe": "--recipe"}
DTYPES = ("auto", "float32", "float16", "bfloat16")
# the CLI's flag of each of TLQ's gradient-pass options (build_job's importance keys)
IMPORTANCE_FLAG_OF = {"guidance": "--guidance", "row_groups": "--row-groups", "loss": "--importance-loss",
                      "draws": "--fisher-draws", "lam": "--lam", "power": "--power", "output_side": "--output-side"}


def flag_of(name: str) -> str | None:
    """The CLI flag of a build_job option."""
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def _str(name: str, value: Any, *, optional: bool = False, flag: str | None = None) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise QuantkitError(f"{name} ({flag}) must be a non-empty string, got {value!r} ({type(value).__name__})")
    return value


def _hooks(name: str, value: Any, *, flag: str | None = None) -> None:
    """A test's instrumentation: None, or the Hooks the engine calls (anything else failed deep in the run)."""
    from quantkit.engine.comm import Hooks

    if value is not None and not isinstance(value, Hooks):
        raise QuantkitError(f"{name} must be None or a quantkit.engine.comm.Hooks, got {short_repr(value)}")


def _devices(name: str, value: Any, *, flag: str | None = None) -> None:
    if value is None:
        return
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise QuantkitError(f"{name} ({flag}) must be a list of GPU ids such as [0, 1], got {value!r}")
    if not list(value):  # no ids is not "no devices" (None): the run went on as if it were not given, as --devices '' did
        raise QuantkitError(f"{name} ({flag}) is empty; give GPU ids such as [0, 1], or None for the default")
    for index in value:
        expect_int(name, index, least=0, flag=flag)


def _importance(name: str, value: Any, *, flag: str | None = None) -> None:
    """TLQ's gradient-pass options: known names (the nearest offered), each of its type."""
    if value is None:
        return
    checks = _importance_checks()
    if not isinstance(value, dict):
        raise QuantkitError(f"importance must be a dict of TLQ's options ({', '.join(checks)}), "
                            f"got {value!r} ({type(value).__name__})")
    expect_names("importance option", value, checks)
    for key, item in value.items():
        if item is not None:  # None: the data kind's default (quantkit.importance.tlq_defaults)
            checks[key](f"importance[{key!r}]", item, flag=IMPORTANCE_FLAG_OF[key])


def _checks() -> dict[str, Callable[..., Any]]:
    """Each option's check, called as check(name, value, flag=...)."""
    from quantkit.data.sources import PARTS
    from quantkit.export.formats import FORMATS
    from quantkit.quant.methods import EXPERT_TOKENS, METHODS
    from quantkit.quant.smooth import AUTO, SMOOTH_MODES
    from quantkit.quant.spec import SUPPORTED_BITS

    def one_of(choices, optional=False):
        return partial(expect_choice, choices=tuple(choices), optional=optional)

    boolean, maybe_bool = expect_bool, partial(expect_bool, optional=True)

    def path(name: str, value: Any, flag: str | None = None) -> str | None:
        """A path as the shell gives it: `~/x` is under the home folder (Python's open would make a folder '~')."""
        given = expect_path(name, value, optional=True, flag=flag)
        if given is not None and name == "calib_set":  # a folder of safetensors
            expect_utf8(given, f"{name} ({flag})" if flag else name)
        return None if given is None else os.path.expanduser(given)

    return {
        "method": one_of(METHODS, optional=True), "bits": one_of(SUPPORTED_BITS),
        "group_size": checker("group_size"), "sym": boolean, "act_order": boolean,
        "static_groups": maybe_bool, "damp": checker("damp"), "mse": boolean,
        "cd_sweeps": checker("cd_sweeps"), "act_bits": one_of((4, 8), optional=True), "smooth": one_of((AUTO, *SMOOTH_MODES)),
        "fp_target": maybe_bool, "lm_head": boolean, "vision": boolean, "expert_tokens": one_of(EXPERT_TOKENS, optional=True), "recipe": lambda *a, **k: None,
        "importance": _importance, "dtype": one_of(DTYPES), "calib_set": path, "nsamples": checker("nsamples", optional=True),
        "seqlen": checker("seqlen", optional=True), "seed": checker("seed"), "part": one_of(PARTS), "chat_template": path,
        "device": _str, "nproc": checker("nproc"), "devices": _devices,
        "dist_timeout": checker("dist_timeout"), "low_memory": boolean, "offload_dir": path,
        "resume": boolean, "progress": boolean, "hooks": _hooks, "output_dir": path,
        "format": one_of(FORMATS, optional=True), "overwrite": boolean,
        "push_to_hub": partial(_str, optional=True), "private": maybe_bool,
    }


def _importance_checks() -> dict[str, Callable[..., Any]]:
    from quantkit.importance import GUIDANCE_CHOICES, LOSS_CHOICES

    return {"guidance": partial(expect_choice, choices=GUIDANCE_CHOICES),
            "row_groups": checker("row_groups"), "loss": partial(expect_choice, choices=LOSS_CHOICES),
            "draws": checker("draws"), "lam": checker("lam"), "power": checker("power"),
            "output_side": lambda *a, **k: None}  # resolve_importance checks it, for `quantkit importance` too


def check_model_argument(model: Any) -> None:
    """The model is a local directory or hub id (str or os.PathLike), or a loaded transformers model."""
    if isinstance(model, (str, os.PathLike)):
        if not os.fspath(model):
            raise QuantkitError("model is an empty string; give a model directory, a hub id or a loaded model")
        expect_path("model", model)  # a pipe, a name past the file system's limit
        return
    import torch

    if isinstance(model, torch.nn.Module) and hasattr(model, "config"):
        # PEFT's wrappers and adapter layers (a PeftModel, LoRA injected in place): their lora_A/lora_B are linears
        # the run would quantize as the model's own, under names (base_model.model...) no loader of the export knows
        where = next((name for name, m in model.named_modules() if type(m).__module__.split(".")[0] == "peft"), None)
        if where is not None:
            raise QuantkitError(f"model holds PEFT adapters (a {type(model).__name__}"
                                f"{f', at {where}' if where else ''}), which would be quantized as layers of their "
                                "own; merge them first (model = model.merge_and_unload()) and pass the merged model")
        return
    what = (f"a torch {type(model).__name__} without a transformers config" if isinstance(model, torch.nn.Module)
            else short_repr(model))
    raise QuantkitError(f"model must be a model directory, a hub id or a loaded transformers model "
                        f"(AutoModelForCausalLM.from_pretrained(...)), got {what}")


def check_tokenizer_argument(tokenizer: Any) -> None:
    """A given tokenizer_or_processor is a transformers tokenizer or processor object (None: the model's own)."""
    if tokenizer is None:
        return
    from transformers import PreTrainedTokenizerBase, ProcessorMixin

    if isinstance(tokenizer, (PreTrainedTokenizerBase, ProcessorMixin)):
        return
    hint = " (a path? load it with AutoTokenizer.from_pretrained(path))" if isinstance(tokenizer, (str, os.PathLike)) else ""
    raise QuantkitError(f"tokenizer_or_processor must be a transformers tokenizer or processor, got "
                        f"{short_repr(tokenizer)}{hint}; leave it out to use the model's own")


def check_data_argument(data: Any) -> None:
    """In-memory data can be counted and indexed: a generator or a streaming dataset cannot be drawn from."""
    if data is None or isinstance(data, (str, os.PathLike)) or hasattr(data, "__len__") or not hasattr(data, "__iter__"):
        return  # a path, a sized collection, or no collection at all (the data's reader names what it takes)
    raise QuantkitError(f"data must be a path, a list or a datasets.Dataset, got {short_repr(data)} with no length "
                        "(a generator or streaming dataset); pass a list of what to calibrate on, e.g. "
                        "list(dataset.take(128))")


def check_arguments(model: Any, data: Any, tokenizer: Any, options: dict, defaults: dict) -> None:
    """Every build_job argument on its own (unknown option names refused with the nearest valid one), then the
    options that contradict each other; a QuantkitError names the first problem."""
    expect_names("option", options, defaults)
    check_model_argument(model)
    check_tokenizer_argument(tokenizer)
    check_data_argument(data)
    checks = _checks()
    for name, value in options.items():
        checked = checks[name](name, value, flag=flag_of(name))
        if isinstance(checked, (int, float)) and type(checked) is not type(value) and not isinstance(value, bool):
            options[name] = checked  # numpy scalars pass as numbers, but torch's and random's seeds take Python ones
        elif isinstance(checked, str) and isinstance(value, (str, os.PathLike)) and checked != os.fspath(value):
            options[name] = checked  # a path with ~ expanded
    given = {**defaults, **options}
    if data is not None and given["calib_set"] is not None:
        raise QuantkitError("--calib (data=) and --calib-set (calib_set=) are two sources of samples; give one")
    if given["private"] is not None and given["push_to_hub"] is None:
        raise QuantkitError("--private (private=) makes the hub repo of --push-to-hub private; give --push-to-hub "
                            "OWNER/NAME or drop --private")
    if given["resume"] and given["output_dir"] is None:
        raise QuantkitError("--resume continues an interrupted --low-memory run into its -o directory (output_dir=); "
                            "give it")


def check_set_arguments(data: Any, importance: dict | None) -> None:
    """`quantkit importance`'s DataSpec and TLQ options, checked as build_job checks the same options of a
    calibration job: one place of their types and bounds (a seed past 2**63 - 1 or 10**25 row groups is refused
    by both, not taken by one until torch's sampler or the gradient pass fails)."""
    checks = _checks()
    for name in ("nsamples", "seqlen", "seed", "part", "chat_template"):
        checks[name](name, getattr(data, name), flag=flag_of(name))
    tlq = _importance_checks()  # the set's own options (top_fraction, floor_fraction, per_modality) are not a job's
    _importance("importance", {key: value for key, value in (importance or {}).items() if key in tlq})
