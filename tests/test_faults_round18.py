"""The fault battery's eighteenth round (benchmarks/fault_round18.py, fault_round18b.py), its eight real faults:
an hf: save_to_disk folder of 0 rows, without its state.json or with a cut arrow file gave datasets' or pyarrow's
exception wrapped; each is now one line naming the folder and what is wrong with it. A law JSON without gamma
predicted with gamma 0 (docs/qid.md: every coefficient is needed). An export whose weight_scale is inf was
re-exported into non-finite weights. quantize() inside the caller's torch.autocast exported another model than the
same call outside it. A recipe (or any path) given as a multi-line text was quoted over as many lines. Each refusal
is as tests/test_faults.py asserts (exit code 2, one `error:` line, nothing left behind; at the API one QuantkitError
on one line)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_fault, run_cli, save_tiny_llama, write_text

import quantkit

RTN = ["--method", "rtn", "--nsamples", "2", "--seqlen", "16", "--group-size", "16"]


def _saved(root: Path, texts: list[str]) -> Path:
    datasets = pytest.importorskip("datasets")
    folder = root / "ds"
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(folder))
    return folder


def _calibrate(tmp_path: Path, folder: Path, fragment: str) -> str:
    model = save_tiny_llama(tmp_path / "m")
    return assert_fault(tmp_path, ["calibrate", model, "--calib", f"hf:{folder}", *RTN, "-o", tmp_path / "out"],
                        fragment)


def test_a_dataset_of_no_rows_is_refused(tmp_path: Path) -> None:
    folder = _saved(tmp_path, [])
    import datasets

    assert datasets.Dataset.from_dict({"text": []}).num_rows == 0  # the reference: what was saved has no rows
    _calibrate(tmp_path, folder, f"dataset {folder} has no rows")


def test_a_save_to_disk_folder_without_state_json_is_refused(tmp_path: Path) -> None:
    folder = _saved(tmp_path, [f"w{i} w{i + 1}" for i in range(50)])
    (folder / "state.json").unlink()
    import datasets

    with pytest.raises(FileNotFoundError):  # the reference: datasets' own reading cannot take the folder
        datasets.load_from_disk(str(folder))
    line = _calibrate(tmp_path, folder, f"dataset folder {folder} has no state.json")
    assert "save_to_disk" in line, line


def test_a_save_to_disk_folder_with_a_cut_arrow_file_is_refused(tmp_path: Path) -> None:
    folder = _saved(tmp_path, [f"w{i} w{i + 1}" for i in range(200)])
    for arrow in folder.glob("*.arrow"):
        arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    import datasets

    with pytest.raises(OSError):  # the reference: pyarrow cannot read the cut file under datasets' own reading
        datasets.load_from_disk(str(folder))
    line = _calibrate(tmp_path, folder, f"cannot read the dataset folder {folder}")
    assert "save the dataset again" in line, line


def test_a_whole_dataset_folder_is_still_read(tmp_path: Path) -> None:
    """No refusal of a good folder: its texts are those datasets reads."""
    texts = [f"w{i} w{i + 1}" for i in range(20)]
    folder = _saved(tmp_path, texts)
    import datasets

    from quantkit.data.sources import load_hf

    assert load_hf(f"hf:{folder}") == datasets.load_from_disk(str(folder))["text"] == texts


PREDICT = ["--params", "1e6", "--bits", "4", "--tokens", "1e8", "--json"]


def test_a_law_without_gamma_is_refused(tmp_path: Path) -> None:
    """docs/qid.md: a law JSON needs every coefficient; gamma read as 0 gave a QiD that ignores the bit width."""
    law = tmp_path / "l.json"
    law.write_text(json.dumps({"k": 2, "alpha": 0.5, "beta": 0.25}))
    assert_fault(tmp_path, ["qid", "predict", "--law", law, *PREDICT], f"{law} lacks a numeric 'gamma'")
    law.write_text(json.dumps({"k": 2, "beta": 0.25}))
    assert_fault(tmp_path, ["qid", "predict", "--law", law, *PREDICT], "lacks a numeric 'alpha' and 'gamma'")


def test_a_whole_law_predicts_by_hand(tmp_path: Path) -> None:
    law = tmp_path / "l.json"
    law.write_text(json.dumps({"k": 2, "alpha": 0.5, "beta": 0.25, "gamma": 1.5}))
    result = run_cli("qid", "predict", "--law", law, *PREDICT)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["qid"] == pytest.approx(2 * 1e8**0.25 / (1e6**0.5 * 4**1.5), rel=1e-12)


def _fit_file(path: Path, bits: int | None, params: dict) -> None:
    """A `qid fit -o`-shaped file of one unified rtn fit: pooled (bits None) or one --by-bits fit at `bits`."""
    fit = {"law": "unified", "method": "rtn", "bits": bits, "params": {n: {"value": v} for n, v in params.items()}}
    path.write_text(json.dumps({"fits": [fit]}))


def test_a_pooled_fit_without_gamma_is_refused_and_a_by_bits_fit_needs_none(tmp_path: Path) -> None:
    """A --by-bits fit folds the bits into k (it fits no gamma), so it predicts k D^beta / N^alpha at its width;
    a fit pooled over bits without gamma is a damaged file."""
    fit = tmp_path / "fit.json"
    _fit_file(fit, None, {"k": 2, "alpha": 0.5, "beta": 0.25})
    assert_fault(tmp_path, ["qid", "predict", "--law", fit, *PREDICT], "lacks a numeric 'gamma'")
    _fit_file(fit, 4, {"k": 2, "alpha": 0.5, "beta": 0.25})
    result = run_cli("qid", "predict", "--law", fit, *PREDICT)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["qid"] == pytest.approx(2 * 1e8**0.25 / 1e6**0.5, rel=1e-12)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny Llama, its text and its RTN compressed-tensors export, shared read-only."""
    root = tmp_path_factory.mktemp("round18")
    model, text = save_tiny_llama(root / "model"), write_text(root / "text.txt")
    result = run_cli("calibrate", model, "--calib", text, *RTN, "-o", root / "ct")
    assert result.exit_code == 0, result.output
    return {"model": model, "text": text, "ct": root / "ct"}


SCALE = "model.layers.0.mlp.down_proj.weight_scale"


def _scale_edit(src: Path, dst: Path, value: float) -> Path:
    """A copy of the export whose down_proj weight_scale holds `value` in its first entry."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    path = dst / "model.safetensors"
    state = load_file(path)
    state[SCALE][0, 0] = value
    save_file(state, path, metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_a_non_finite_scale_of_an_export_is_refused_by_name(tmp_path: Path, exported: dict, value: float) -> None:
    """export, eval and load_quantized wrote or scored non-finite weights from it without a word."""
    from safetensors.torch import load_file

    edited = _scale_edit(exported["ct"], tmp_path / "ed", value)
    scale = load_file(edited / "model.safetensors")[SCALE]
    assert not bool(torch.isfinite(scale).all())  # the reference: the stored scale, and so the weight, is not finite
    what = "1 infinite" if value == float("inf") else "1 NaN"
    fragment = f"tensor {SCALE} (decoder layer 0) holds {what} value(s)"
    assert_fault(tmp_path, ["export", edited, "--format", "fake", "-o", tmp_path / "out"], fragment)
    assert_fault(tmp_path, ["eval", edited, "--data", exported["text"], "--seqlen", "16"], fragment)
    with pytest.raises(quantkit.QuantkitError, match=re.escape(fragment)):
        quantkit.load_quantized(edited)


def test_a_finite_scale_edit_is_carried(tmp_path: Path, exported: dict) -> None:
    """No refusal of a finite edit: the fake export's down_proj row 0, group 0 is the unedited one times the edit's
    factor (codes times scale), every other weight the unedited one's."""
    from safetensors.torch import load_file

    scale = float(load_file(exported["ct"] / "model.safetensors")[SCALE][0, 0])
    weights = {}
    for name, src in [("plain", exported["ct"]), ("edited", _scale_edit(exported["ct"], tmp_path / "ed", 2.0))]:
        result = run_cli("export", src, "--format", "fake", "-o", tmp_path / name)
        assert result.exit_code == 0, result.output
        weights[name] = load_file(tmp_path / name / "model.safetensors")["model.layers.0.mlp.down_proj.weight"].float()
    plain, edited = weights["plain"], weights["edited"]
    assert torch.allclose(edited[0, :16], plain[0, :16] * (2.0 / scale), rtol=1e-3, atol=0)
    assert torch.equal(edited[1:], plain[1:]) and torch.equal(edited[0, 16:], plain[0, 16:])


@pytest.mark.parametrize("method", ["gptq", None], ids=["gptq", "default"])
def test_quantize_inside_autocast_exports_the_call_outside_it(tmp_path: Path, exported: dict, method: str | None) -> None:
    """The caller's torch.autocast('cpu', bfloat16) reached the calibration forwards: another export, no word.
    The reference is the same call outside autocast, byte for byte."""
    kw = {"data": str(exported["text"]), "method": method, "nsamples": 2, "seqlen": 16, "group_size": 16,
          "progress": False}
    quantkit.quantize(str(exported["model"]), output_dir=str(tmp_path / "plain"), **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        quantkit.quantize(str(exported["model"]), output_dir=str(tmp_path / "cast"), **kw)
        assert torch.is_autocast_enabled("cpu")  # the caller's state is given back
    plain, cast = ((tmp_path / d / "model.safetensors").read_bytes() for d in ("plain", "cast"))
    assert plain == cast


YAML = "overrides:\n  - targets: [down_proj]\n    bits: 8\n"


def _api_error(call) -> str:
    """The one QuantkitError of a call, its message on one line."""
    with pytest.raises(quantkit.QuantkitError) as err:
        call()
    message = str(err.value)
    assert message.splitlines() == [message], message
    return message


def test_a_recipe_given_as_yaml_text_is_one_line(tmp_path: Path, exported: dict) -> None:
    """quantize(recipe=<YAML text>) quoted the text over 4 lines; one line now says a str is a path. The same content
    as a mapping (the reference: yaml's own reading of the text) is taken."""
    import yaml

    kw = {"data": str(exported["text"]), "method": "rtn", "nsamples": 2, "seqlen": 16, "group_size": 16,
          "progress": False}
    message = _api_error(lambda: quantkit.quantize(str(exported["model"]), recipe=YAML, **kw))
    assert "is YAML text, not a path" in message and "mapping" in message and "Recipe" in message, message
    assert not list(tmp_path.iterdir())
    done = quantkit.quantize(str(exported["model"]), recipe=yaml.safe_load(YAML), output_dir=str(tmp_path / "out"), **kw)
    assert done.results["model.layers.0.mlp.down_proj"].bits == 8


@pytest.mark.parametrize("argument", ["chat_template", "calib_set", "model"])
def test_a_multi_line_text_given_as_a_path_is_one_line(tmp_path: Path, exported: dict, argument: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Every path or name the API echoes shows a pasted text on one line (its repr), not over as many lines. A
    model name no hub id can be is "not found", not "the hub cannot be reached" (huggingface_hub refuses the name
    itself, before any network: the reference)."""
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    kw = {"data": str(exported["text"]), "method": "rtn", "nsamples": 2, "seqlen": 16, "group_size": 16,
          "progress": False, argument: YAML}
    model = kw.pop("model", str(exported["model"]))
    if argument == "calib_set":
        kw.pop("data")  # the set replaces the data
    message = _api_error(lambda: quantkit.quantize(model, **kw))
    assert repr(YAML) in message, message
    if argument == "model":
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HFValidationError

        with pytest.raises(HFValidationError):
            HfApi().model_info(YAML, timeout=10)
        assert "not found: no such local path and no model of that name" in message, message


def test_load_quantized_of_a_multi_line_text_is_one_line() -> None:
    assert repr(YAML) in _api_error(lambda: quantkit.load_quantized(YAML))
