"""Every public callable of quantkit (quantkit.__all__) walked through the wrong values a caller gives: None where
a value is needed, a value of another type (a string for a number, a list for a string, a bool for a count or a
number for a flag), NaN and infinity for numbers, an unknown keyword, a missing or surplus argument. A right API
answers each with one QuantkitError naming the argument, before any work, writing nothing; never a TypeError,
ValueError or AttributeError from deep inside. The expectations are written here from what each argument means
(quantkit's own checks are not read), and the walk fails where a new argument is not in them."""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path

import pytest
from helpers import save_tiny_llama, write_text

import quantkit
from quantkit import QuantkitError
from quantkit.calibrate import OPTIONS

NAN, INF = math.nan, math.inf
COUNT = [None, "4", [4], True, NAN, INF, 4.5]  # an integer is needed
MAYBE_COUNT = COUNT[1:]  # an integer, or None for the default
FLAG = [None, "yes", [True], 1, NAN]  # True or False
MAYBE_FLAG = FLAG[1:]
NUMBER = [None, "0.01", [0.01], True, NAN, INF]  # a finite float
NAME = [None, 4, ["x"], True]  # one string of a few
MAYBE_NAME = NAME[1:]
PATH = [5, ["x"], True, NAN]  # a path, or None

# quantkit.quantize: its own arguments and every option (quantkit.calibrate.OPTIONS) by what it is
QUANTIZE = {
    "model": [None, 123, ["x"], True], "tokenizer_or_processor": [123, True, ["x"]], "data": [123, True, [1]],
    "bits": COUNT, "group_size": COUNT, "cd_sweeps": COUNT, "seed": COUNT, "nproc": COUNT,
    "nsamples": MAYBE_COUNT, "seqlen": MAYBE_COUNT, "act_bits": MAYBE_COUNT,
    "sym": FLAG, "act_order": FLAG, "mse": FLAG, "lm_head": FLAG, "vision": FLAG, "low_memory": FLAG, "resume": FLAG,
    "progress": FLAG, "overwrite": FLAG, "reload": FLAG,
    "static_groups": MAYBE_FLAG, "fp_target": MAYBE_FLAG, "private": MAYBE_FLAG,
    "damp": NUMBER, "dist_timeout": NUMBER,
    "smooth": NAME, "dtype": NAME, "part": NAME, "device": NAME,
    "method": MAYBE_NAME, "format": MAYBE_NAME, "expert_tokens": MAYBE_NAME, "push_to_hub": MAYBE_NAME,
    "calib_set": PATH, "chat_template": PATH, "offload_dir": PATH, "output_dir": PATH,
    "devices": [5, True, NAN, "0,1"], "importance": ["x", [1], True, 5], "recipe": [5, True, ["x"]],
    "hooks": [5, "x", True],
}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("api_walk")
    save_tiny_llama(root / "model")
    write_text(root / "text.txt")
    return root


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_size if p.is_file() else "dir" for p in sorted(root.rglob("*"))}


def _one_error(call, name: str, *roots: Path) -> str:
    """`call()` raises one QuantkitError naming `name`, and nothing under `roots` changes."""
    before = [_files(r) for r in roots]
    with pytest.raises(QuantkitError) as caught:
        call()
    assert name in str(caught.value), str(caught.value)
    assert "\n" not in str(caught.value).strip(), str(caught.value)
    assert [_files(r) for r in roots] == before
    return str(caught.value)


def test_every_public_callable_is_walked() -> None:
    """quantkit.__all__'s callables are walked below, but for QuantkitError (any message is one) and Quantized
    (quantize's result, made by it); a new one fails here until its arguments are walked."""
    callables = {n for n in quantkit.__all__ if callable(getattr(quantkit, n))}
    assert callables == {"quantize", "load_quantized", "Recipe", "Override", "QuantkitError", "Quantized"}
    own = [n for n, p in inspect.signature(quantkit.quantize).parameters.items()
           if p.kind is not inspect.Parameter.VAR_KEYWORD]
    assert set(QUANTIZE) == {*own, *OPTIONS}, sorted(set(QUANTIZE) ^ {*own, *OPTIONS})


def _quantize_cases():
    for name, values in QUANTIZE.items():
        for value in values:
            yield pytest.param(name, value, id=f"{name}={value!r}")


@pytest.mark.parametrize(("name", "value"), list(_quantize_cases()))
def test_quantize_refuses_a_wrong_value_by_name(base: Path, tmp_path: Path, name: str, value: object) -> None:
    args = dict(model=str(base / "model"), data=str(base / "text.txt"), method="rtn", nsamples=2, seqlen=16,
                group_size=32, output_dir=str(tmp_path / "out"), progress=False)
    args[name] = value
    _one_error(lambda: quantkit.quantize(**args), name, base, tmp_path)


@pytest.mark.parametrize(("call", "words"), [
    (lambda m, t: quantkit.quantize(m, data=t, bitz=4), "'bitz'; did you mean 'bits'?"),
    (lambda m, t: quantkit.quantize(m, None, t, data=t), "multiple values for argument 'data'"),
    (lambda m, t: quantkit.quantize(m, None, t, "rtn"), "too many positional arguments"),
    (lambda m, t: quantkit.quantize(data=t), "'model'"),
    (lambda m, t: quantkit.load_quantized(m, dtyp="float32"), "dtyp"),
    (lambda m, t: quantkit.load_quantized(), "path"),
    (lambda m, t: quantkit.Recipe(target=["q_proj"]), "has no argument 'target'; did you mean 'targets'?"),
    (lambda m, t: quantkit.Recipe(["q_proj"], [], [], 4), "too many positional arguments"),
    (lambda m, t: quantkit.Override(bits=4), "'targets'"),
    (lambda m, t: quantkit.Override(["q_proj"], bit=4), "has no argument 'bit'; did you mean 'bits'?"),
])
def test_a_call_of_the_wrong_shape_is_one_error(base: Path, call, words: str) -> None:
    """An unknown keyword (with the nearest name), an argument given twice, one positional too many, a missing one."""
    _one_error(lambda: call(str(base / "model"), str(base / "text.txt")), words, base)


@pytest.mark.parametrize(("name", "value"), [("path", v) for v in (None, 5, ["x"], True, NAN)]
                         + [("dtype", v) for v in (5, ["x"], True, "float77", NAN)])
def test_load_quantized_refuses_a_wrong_value_by_name(base: Path, name: str, value: object) -> None:
    args = {"path": str(base / "model"), name: value}
    _one_error(lambda: quantkit.load_quantized(**args), name, base)


RECIPE = {"targets": [5, True, [1], NAN], "ignore": [5, True, [1]], "overrides": [None, 5, True, ["x"]]}
OVERRIDE = {"targets": [None, 5, True, [1]], "bits": ["4", True, NAN, INF, 4.5, 5], "group_size": ["64", True, NAN, 4.5],
            "sym": [1, "yes", NAN], "act_order": [1, "yes"], "method": [5, True, ["x"], "GPTQ"],
            "fp_alpha": ["x", NAN, INF, True]}


@pytest.mark.parametrize(("cls", "name", "value"),
                         [("Recipe", n, v) for n, vs in RECIPE.items() for v in vs]
                         + [("Override", n, v) for n, vs in OVERRIDE.items() for v in vs])
def test_a_recipe_refuses_a_wrong_value_by_name(cls: str, name: str, value: object) -> None:
    """Recipe and Override fields (an override of bits=5, a capitalised method, a NaN alpha included)."""
    args = {"targets": ("q_proj",)} if cls == "Override" else {}
    args[name] = value
    _one_error(lambda: getattr(quantkit, cls)(**args), name)


@pytest.mark.parametrize("value", [None, 5, True, [1], "targets: [q_proj]"])
def test_recipe_from_dict_refuses_what_is_no_mapping(value: object) -> None:
    _one_error(lambda: quantkit.Recipe.from_dict(value), "recipe")


@pytest.mark.parametrize("value", [None, 5, True, ["x"]])
def test_recipe_from_yaml_refuses_what_is_no_path(value: object) -> None:
    _one_error(lambda: quantkit.Recipe.from_yaml(value), "path")


def _bad_path(kind: str, w: Path) -> str:
    """A path in `w` in the odd state `kind` (as tests/test_walk_paths.py gives the command line)."""
    x = w / "x"
    if kind == "empty file":
        x.write_bytes(b"")
    elif kind == "garbage":
        x.write_bytes(bytes(range(256)) * 8)
    elif kind == "folder":
        x.mkdir()
    elif kind == "named pipe":
        os.mkfifo(x)
    elif kind == "link to nothing":
        x.symlink_to(w / "gone")
    elif kind == "300-byte name":
        x = w / ("n" * 300)
    elif kind == "under a file":
        x.write_text("mine")
        x = x / "o"
    elif kind == "existing folder":
        x.mkdir()
        (x / "f").write_text("mine")
    return str(x)


INPUT_STATES = ["missing", "empty file", "garbage", "folder", "named pipe", "link to nothing", "300-byte name"]
OUTPUT_STATES = ["under a file", "link to nothing", "named pipe", "300-byte name", "existing folder"]


@pytest.mark.parametrize(("name", "state"), [(n, s) for n in ("model", "data", "calib_set", "chat_template", "recipe")
                                             for s in INPUT_STATES]
                         + [(n, s) for n in ("output_dir", "offload_dir") for s in OUTPUT_STATES
                            if not (n == "offload_dir" and s == "existing folder")])
def test_quantize_refuses_a_path_in_an_odd_state(base: Path, tmp_path: Path, name: str, state: str) -> None:
    """Each path argument as the CLI's walk gives them: one QuantkitError naming the path, nothing written (a pipe
    is refused, not waited on; a name past the limit is no OSError)."""
    work = tmp_path / "w"
    work.mkdir()
    bad = _bad_path(state, work)
    args = dict(model=str(base / "model"), data=str(base / "text.txt"), method="rtn", nsamples=2, seqlen=16,
                group_size=32, output_dir=str(tmp_path / "out"), progress=False, low_memory=name == "offload_dir")
    args[name] = bad
    if name == "calib_set":
        args["data"] = None
    _one_error(lambda: quantkit.quantize(**args), bad[:40], base, tmp_path)


@pytest.mark.parametrize("state", INPUT_STATES)
def test_load_quantized_refuses_a_path_in_an_odd_state(tmp_path: Path, state: str) -> None:
    bad = _bad_path(state, tmp_path)
    _one_error(lambda: quantkit.load_quantized(bad), bad[:40], tmp_path)
