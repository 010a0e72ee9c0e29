"""The fault battery's fourteenth round (benchmarks/fault_round14.py), output paths: a crashed run's set-aside
folder under --overwrite, a path through a dangling symlink, an empty -o and a file name ending in '/'. Each is now
refused before any work as tests/test_faults.py asserts (exit code 2, one `error:` line, nothing left behind), or,
for the leftover, the run succeeds and leaves the leftover alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import assert_fault, one_error_line, run_cli, save_tiny_llama, write_text

from quantkit.fsutil import atomic_dir

RTN = ["--method", "rtn", "--nsamples", "2", "--seqlen", "16", "--group-size", "32"]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny Llama and its text, shared read-only."""
    root = tmp_path_factory.mktemp("round14")
    return {"root": root, "model": save_tiny_llama(root / "model"), "text": write_text(root / "text.txt")}


@pytest.mark.parametrize("leftover", ["folder", "file"])
def test_overwrite_leaves_a_crashed_runs_set_aside_entry_alone(tmp_path: Path, leftover: str) -> None:
    """--overwrite set the old output aside as .OUT.old-PID; where a crashed run with the same process id had left
    that name (a non-empty folder or a file), the run failed after the work ("Directory not empty")."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    stale = tmp_path / f".out.old-{os.getpid()}"
    if leftover == "folder":
        stale.mkdir()
        (stale / "keep.txt").write_text("mine")
    else:
        stale.write_text("mine")
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert (stale / "keep.txt" if leftover == "folder" else stale).read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", stale.name])


def test_calibrate_overwrite_beside_a_leftover_set_aside_folder(made: dict, tmp_path: Path) -> None:
    """The same through the CLI: calibrate --overwrite replaces out/ and keeps the leftover's files."""
    args = ["calibrate", made["model"], "--calib", made["text"], *RTN, "-o", tmp_path / "out"]
    assert run_cli(*args).exit_code == 0
    stale = tmp_path / f".out.old-{os.getpid()}"
    stale.mkdir()
    (stale / "keep.txt").write_text("mine")
    result = run_cli(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "config.json").is_file() and (stale / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", stale.name])


@pytest.mark.parametrize("command", ["calibrate", "qid plot"])
def test_a_path_through_a_dangling_symlink_is_refused(made: dict, tmp_path: Path, command: str) -> None:
    """-o ln/x with ln a link to a missing folder failed after the work with "File exists: ln"."""
    (tmp_path / "ln").symlink_to(tmp_path / "gone")
    out = tmp_path / "ln" / "x"
    args = {"calibrate": ["calibrate", made["model"], "--calib", made["text"], *RTN, "-o", out],
            "qid plot": ["qid", "plot", tmp_path / "q.csv", "--format", "png", "-o", out]}[command]
    result = run_cli(*args)
    assert result.exit_code == 2, result.output
    line = one_error_line(result.stderr)
    assert f"{tmp_path / 'ln'} is a symbolic link to {tmp_path / 'gone'}, which does not exist" in line, line
    assert [p.name for p in tmp_path.iterdir()] == ["ln"]


@pytest.mark.parametrize("command", [["qid", "plot", "q.csv", "--format", "png"], ["qid", "fit", "q.csv"]])
def test_an_empty_output_name_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list) -> None:
    """qid plot -o '' wrote its figures into the working folder and qid fit -o '' wrote nothing, both exit 0;
    calibrate, export, importance, demo and eval refused the empty name."""
    (tmp_path / "q.csv").write_text("N,D,P,bits,method,qid\n")
    monkeypatch.chdir(tmp_path)
    assert_fault(tmp_path, [*command, "-o", ""], "-o '' is an empty name; give a path")


@pytest.mark.parametrize("command", ["eval", "qid fit"])
def test_a_file_output_ending_in_a_slash_is_refused(made: dict, tmp_path: Path, command: str) -> None:
    """eval -o r.json/ and qid fit -o r.json/ wrote a file r.json, ignoring the slash that names a folder."""
    out = f"{tmp_path / 'r.json'}/"
    args = {"eval": ["eval", made["model"], "--data", made["text"], "--seqlen", "16", "--max-tokens", "96"],
            "qid fit": ["qid", "fit", made["root"] / "q.csv", "--bootstrap", "0"]}[command]
    assert_fault(tmp_path, [*args, "-o", out], "ends in '/', which names a folder; give a file path without it")
