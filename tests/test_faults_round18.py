"""The fault battery's eighteenth round (benchmarks/fault_round18.py, fault_round18b.py), its eight real faults:
an hf: save_to_disk folder of 0 rows, without its state.json or with a cut arrow file gave datasets' or pyarrow's
exception wrapped; each is now one line naming the folder and what is wrong with it. Each refusal is as
tests/test_faults.py asserts (exit code 2, one `error:` line, nothing left behind).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import assert_fault, run_cli, save_tiny_llama

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

