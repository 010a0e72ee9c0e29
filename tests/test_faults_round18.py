"""The fault battery's eighteenth round (benchmarks/fault_round18.py, fault_round18b.py), its eight real faults:
an hf: save_to_disk folder of 0 rows, without its state.json or with a cut arrow file gave datasets' or pyarrow's
exception wrapped; each is now one line naming the folder and what is wrong with it. Each refusal is as
tests/test_faults.py asserts (exit code 2, one `error:` line, nothing left behind).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import assert_fault, save_tiny_llama

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

