"""quantkit.quantize: the same codes as `quantkit calibrate` for every kind of model and data, and the
CLI's one-line errors as QuantkitError with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import assert_same_files, make_tokenizer, save_tiny_llama, write_text

import quantkit
from quantkit.cli import main
from quantkit.export import read_checkpoint

SETTINGS = dict(method="gptq", bits=4, group_size=16, nsamples=4, seqlen=16, seed=3)


def cli_args(model: Path, text: Path, out: Path, **changes) -> list[str]:
    """`quantkit calibrate` with SETTINGS (and `changes`) as flags."""
    settings = {**SETTINGS, **changes}
    args = ["calibrate", str(model), "--calib", str(text), "-o", str(out)]
    for key, value in settings.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A tiny Llama, its text, and the CLI's export of one run."""
    root = tmp_path_factory.mktemp("api")
    model = save_tiny_llama(root / "model")
    text = write_text(root / "text.txt")
    result = CliRunner().invoke(main, cli_args(model, text, root / "cli"))
    assert result.exit_code == 0, result.output
    return {"root": root, "model": model, "text": text, "cli": root / "cli"}


def assert_same_codes(results: dict, export: Path) -> None:
    """`results` are exactly the codes, scales and zeros of `export`."""
    stored = read_checkpoint(export).results
    assert sorted(results) == sorted(stored)
    for name, r in results.items():
        for part in ("qweight", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(r, part), getattr(stored[name], part)), (name, part)


def assert_model_is_export(model: torch.nn.Module, export: Path) -> None:
    """The in-memory model holds exactly the weights the export decodes to."""
    loaded = quantkit.load_quantized(export).state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded[key]), key


def test_path_and_source_match_the_cli(run, tmp_path) -> None:
    out = tmp_path / "api"
    quantized = quantkit.quantize(str(run["model"]), data=str(run["text"]), output_dir=out, progress=False, **SETTINGS)
    model, report = quantized
    assert report["method"] == "gptq" and report["format"] == "compressed-tensors"
    assert_same_codes(quantized.results, run["cli"])
    assert_same_files(run["cli"], out)
    assert_model_is_export(model, run["cli"])
    # usable at once: a forward pass on the quantized model
    assert model(input_ids=torch.tensor([[2, 3, 4]])).logits.shape == (1, 3, 64)


@pytest.mark.parametrize("kind", ["texts", "dataset"])
def test_loaded_model_and_in_memory_data_match_the_cli(run, tmp_path, kind) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run["model"])
    texts = [run["text"].read_text()]
    if kind == "dataset":
        datasets = pytest.importorskip("datasets")
        data = datasets.Dataset.from_dict({"text": texts})
    else:
        data = texts
    out = tmp_path / "api"
    quantized = quantkit.quantize(model, make_tokenizer(), data=data, output_dir=out, progress=False, **SETTINGS)
    assert quantized.model is model  # quantized in place
    assert_same_codes(quantized.results, run["cli"])
    assert_model_is_export(model, run["cli"])
    from transformers import AutoTokenizer

    # the given tokenizer went into the export through its own save_pretrained
    assert AutoTokenizer.from_pretrained(out)("w1 w2")["input_ids"] == make_tokenizer()("w1 w2")["input_ids"]


def test_tokenizer_is_saved_by_save_pretrained_from_a_path_and_a_loaded_model(run, tmp_path) -> None:
    """Without a given tokenizer the export holds the one the source builds, written by transformers'
    own save_pretrained (the same files as saving it directly), also for a loaded model without one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = tmp_path / "reference"
    source_tokenizer = AutoTokenizer.from_pretrained(run["model"])
    source_tokenizer.save_pretrained(reference)
    model = AutoModelForCausalLM.from_pretrained(run["model"])
    quantkit.quantize(model, data=[run["text"].read_text()], output_dir=tmp_path / "loaded", progress=False, **SETTINGS)
    for out in (run["cli"], tmp_path / "loaded"):
        for path in reference.iterdir():
            assert (out / path.name).read_bytes() == path.read_bytes(), (out, path.name)
        exported = AutoTokenizer.from_pretrained(out)
        assert exported("w5 w7 w59")["input_ids"] == source_tokenizer("w5 w7 w59")["input_ids"]


def test_no_output_dir_writes_nothing(run, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    model, report = quantkit.quantize(str(run["model"]), data=str(run["text"]), progress=False, method="rtn",
                                      bits=4, group_size=16, nsamples=2, seqlen=16)
    assert list(tmp_path.iterdir()) == [] and report["method"] == "rtn"


def test_default_method_on_text_is_tlq_with_output_side_factors(run) -> None:
    """On text the default is TLQ with the FP target, uniform token weights and 128-row output-side factors: the same
    codes as naming those settings, and not GPTQ + FP target's (the factors changed the rounding)."""
    common = dict(group_size=16, nsamples=2, seqlen=16, progress=False)
    default = quantkit.quantize(str(run["model"]), data=str(run["text"]), **common)
    assert default.report["method"] == "tlq" and default.report["fp_target"]
    named = quantkit.quantize(str(run["model"]), data=str(run["text"]), method="tlq",
                              importance={"lam": 1.0, "output_side": 128}, **common)
    gptq = quantkit.quantize(str(run["model"]), data=str(run["text"]), method="gptq", fp_target=True, **common)
    assert default.results.keys() == named.results.keys()
    assert all(torch.equal(default.results[n].qweight, named.results[n].qweight) for n in default.results)
    assert not all(torch.equal(default.results[n].qweight, gptq.results[n].qweight) for n in default.results)


def test_default_method_follows_the_calibration_data(tmp_path) -> None:
    """Issue #24's choice: TLQ with the FP target; its gradient pass gives uniform token weights and 128-row output-side
    factors on text, token weights (lam 0.1) on image-text, nothing to compute from a --calib-set; an explicit
    option, fp_target or method wins; under low_memory the same (its gradient pass streams the layers)."""
    from quantkit.calibrate import build_job

    text = tmp_path / "t.txt"
    text.write_text("some text " * 50)
    images = tmp_path / "i.jsonl"
    images.write_text(json.dumps({"image": "a.png", "text": "a caption"}) + "\n")
    on_text, on_images = (1.0, 128), (0.1, None)
    cases = [(str(text), {}, ("tlq", True, on_text)), (["one text", "another"], {}, ("tlq", True, on_text)),
             (str(images), {}, ("tlq", True, on_images)),
             ([{"image": "a.png", "text": "a caption"}], {}, ("tlq", True, on_images)),
             (None, {"calib_set": str(tmp_path)}, ("tlq", True, None)),
             (str(text), {"fp_target": False}, ("tlq", False, on_text)),
             (str(text), {"importance": {"lam": 0.1, "output_side": 0}}, ("tlq", True, (0.1, None))),
             (str(images), {"importance": {"output_side": 8}}, ("tlq", True, (0.1, 8))),
             (str(images), {"method": "gptq"}, ("gptq", False, None))]
    for data, options, expected in cases:
        quantization = build_job("org/model", data, **options).quantization
        settings = quantization.importance
        got = None if settings is None else (settings["lam"], settings["output_side"])
        assert (quantization.method.name, quantization.fp_target, got) == expected, (data, options)
    for data, on in ((str(images), on_images), (str(text), on_text)):  # --low-memory streams TLQ's gradient pass too
        low = build_job("org/model", data, low_memory=True, output_dir=str(tmp_path / "o")).quantization
        assert (low.method.name, low.fp_target, (low.importance["lam"], low.importance["output_side"])) == ("tlq", True, on)
    with pytest.raises(quantkit.QuantkitError, match="output_side"):
        build_job("org/model", str(text), importance={"output_side": -2})


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"bits": 5}, "bits"),
    ({"group_size": 7}, "group size"),
    ({"nsamples": 500}, "too little text"),
    ({"method": "awq"}, "awq"),
])
def test_bad_input_raises_the_cli_line(run, tmp_path, changes, fragment) -> None:
    out = tmp_path / "api"
    with pytest.raises(quantkit.QuantkitError) as caught:
        quantkit.quantize(str(run["model"]), data=str(run["text"]), output_dir=out, progress=False,
                          **{**SETTINGS, **changes})
    assert fragment in str(caught.value) and "\n" not in str(caught.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    if changes.get("method") == "awq":
        return  # click refuses the choice itself, before quantkit's code
    result = CliRunner().invoke(main, cli_args(run["model"], run["text"], tmp_path / "cli", **changes))
    assert result.exit_code == 2
    # a number out of its bound is refused by the option's type as click parses it, in the CLI's words (the
    # bound is the API's: quantkit.bounds)
    cli_line = "--bits must be one of 2, 3, 4, 8, got 5" if "bits" in changes else str(caught.value)
    assert result.output.strip().splitlines()[-1] == f"error: {cli_line}"


def test_bad_data_and_options(run, tmp_path) -> None:
    for data, fragment in [(None, "no calibration data"), (42, "got int"), ([], "(empty)"), ([1, 2], "int items"),
                           ([{"image": 3, "text": "x"}], "processor")]:
        with pytest.raises(quantkit.QuantkitError, match=fragment):
            quantkit.quantize(str(run["model"]), data=data, progress=False, **SETTINGS)
    with pytest.raises(quantkit.QuantkitError, match="unknown option 'bogus'"):
        quantkit.quantize(str(run["model"]), data=str(run["text"]), bogus=1)
    with pytest.raises(quantkit.QuantkitError, match="already exists"):
        quantkit.quantize(str(run["model"]), data=str(run["text"]), output_dir=run["cli"], **SETTINGS)
    with pytest.raises(quantkit.QuantkitError, match="one process"):
        quantkit.quantize(str(run["model"]), data=[run["text"].read_text()], nproc=2, output_dir=tmp_path / "o",
                          **SETTINGS)


def test_logging_and_transformers_settings(run, caplog) -> None:
    """quantkit logs through the `quantkit` logger and leaves transformers' own settings as the caller had them."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    with caplog.at_level(logging.INFO, logger="quantkit"):
        quantkit.quantize(str(run["model"]), data=str(run["text"]), method="rtn", group_size=16, nsamples=2,
                          seqlen=16, progress=False)
    assert any(r.name.startswith("quantkit.") and "calibrating" in r.getMessage() for r in caplog.records)
    assert hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == verbosity


def test_fit_limits_blas_threads_with_threadpoolctl() -> None:
    from threadpoolctl import threadpool_info

    from quantkit.qid.regression import single_threaded_blas

    with single_threaded_blas():
        assert all(pool["num_threads"] == 1 for pool in threadpool_info() if pool["user_api"] == "blas")


def test_numpy_numbers_and_text_given_as_a_path(run) -> None:
    """numpy integers count as numbers (seed= included: torch's and random's seeds take only Python ints) and numpy
    bools as bools (refused before), and give the CLI's codes; a text passed where a path belongs is one
    QuantkitError saying to pass it in a list."""
    import numpy as np

    settings = {**SETTINGS, "seed": np.int64(SETTINGS["seed"]), "bits": np.int64(4), "nsamples": np.int32(4),
                "sym": np.bool_(True), "lm_head": np.bool_(False)}
    quantized = quantkit.quantize(str(run["model"]), data=str(run["text"]), progress=np.bool_(False), **settings)
    assert_same_codes(quantized.results, run["cli"])
    text = run["text"].read_text()[:2000]
    with pytest.raises(quantkit.QuantkitError, match=r"is no file, directory, glob or hf: dataset; .* data=\[text\]"):
        quantkit.quantize(str(run["model"]), data=text, progress=False, **SETTINGS)
