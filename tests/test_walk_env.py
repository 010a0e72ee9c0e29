"""The environment a command starts in: a working folder deleted under the shell (torch's import died there with
"Intel oneMKL FATAL ERROR", no `error:` line), a TMPDIR that is missing, a file or frozen, an HF_HOME that is a
file. A right program says what is wrong in one `error:` line with exit code 2, or, where the environment still
lets it work (Python falls back from an unusable TMPDIR to /tmp), does the work and leaves nothing there. These
run the installed `quantkit` command in a child process: the environment is the process's own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import save_tiny_llama, write_text

QUANTKIT = Path(sys.executable).parent / "quantkit"
CHILD = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("env")
    save_tiny_llama(root / "model")
    write_text(root / "text.txt")
    return root


def _run(args: list, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(QUANTKIT), *map(str, args)], capture_output=True, text=True, timeout=120,
                          env={**CHILD, **(env or {})}, cwd=cwd)


def _one_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (done.returncode, done.stderr)
    return lines[0]


@pytest.mark.parametrize("args", [["qid", "predict", "--law", "ouyang2024-gptq", "--params", "1e6", "--bits", "4"],
                                  ["eval", "{model}", "--data", "{text}", "--seqlen", "16", "--max-tokens", "96"]])
def test_a_deleted_working_folder_is_one_line(base: Path, tmp_path: Path, args: list) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    given = [a.format(model=base / "model", text=base / "text.txt") for a in args]
    # the shell enters the folder, which is then removed: the command starts with no working folder
    script = 'cd "$1" && rmdir "$1" && shift && exec "$@"'
    done = subprocess.run(["sh", "-c", script, "sh", str(gone), str(QUANTKIT), *given], capture_output=True,
                          text=True, timeout=120, env=CHILD)
    assert "working folder no longer exists" in _one_line(done)


@pytest.mark.parametrize("tmpdir", ["missing", "a file", "frozen"])
def test_an_unusable_tmpdir_falls_back_and_leaves_nothing(base: Path, tmp_path: Path, immutable, tmpdir: str) -> None:
    """Python's tempfile skips a TMPDIR it cannot write in (for the next of /tmp, /var/tmp, the working folder):
    the run is done, and nothing is left in the TMPDIR given."""
    where = tmp_path / "t"
    if tmpdir == "a file":
        where.write_text("mine")
    elif tmpdir == "frozen":
        where.mkdir()
        immutable(where)
    done = _run(["calibrate", base / "model", "--calib", base / "text.txt", "--method", "rtn", "--nsamples", "2",
                 "--seqlen", "16", "--group-size", "32", "-o", tmp_path / "out"], env={"TMPDIR": str(where)})
    assert done.returncode == 0, done.stderr[-600:]
    assert (tmp_path / "out" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if tmpdir == "missing" else ["out", "t"])
    assert not where.is_dir() or not list(where.iterdir())


def test_an_hf_home_that_is_a_file_is_one_line_for_a_hub_model(base: Path, tmp_path: Path) -> None:
    """A hub id is looked up in HF_HOME: where that is a file, one line names the cause (a local model needs no
    HF_HOME, and is read as ever)."""
    home = tmp_path / "home"
    home.write_text("mine")
    done = _run(["eval", "no-such-org/no-such-model", "--data", base / "text.txt", "--seqlen", "16"],
                env={"HF_HOME": str(home)})
    _one_line(done)
    local = _run(["eval", base / "model", "--data", base / "text.txt", "--seqlen", "16", "--max-tokens", "96"],
                 env={"HF_HOME": str(home)})
    assert local.returncode == 0, local.stderr[-600:]
    assert home.read_text() == "mine"


def test_a_utf8_output_name_under_an_ascii_locale_is_one_line_up_front(base: Path, tmp_path: Path) -> None:
    """Round 15: under LC_ALL=C (no UTF-8 mode) Python holds 'é' of -o sortie-é as surrogates, which the tokenizers'
    writer cannot take: the export failed after the work, and then an earlier fix called the name not UTF-8. One line
    up front says what to change; with PYTHONUTF8=1 the same name is written."""
    out = tmp_path / "sortie-é"
    args = ["calibrate", base / "model", "--calib", base / "text.txt", "--method", "rtn", "--nsamples", "2",
            "--seqlen", "16", "--group-size", "32", "-o", out]
    ascii_only = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    assert "run with a UTF-8 locale" in _one_line(_run(args, env=ascii_only))
    assert not list(tmp_path.iterdir())
    done = _run(args, env={**ascii_only, "PYTHONUTF8": "1"})
    assert done.returncode == 0 and (out / "config.json").is_file(), done.stderr[-600:]
    # plain LC_ALL=C: Python's locale coercion and UTF-8 mode (PEP 538/540, on by default) read the name as UTF-8
    shutil.rmtree(out)
    plain = subprocess.run([str(QUANTKIT), *map(str, args)], capture_output=True, text=True, timeout=120,
                           env={**{k: v for k, v in CHILD.items() if k not in ("PYTHONUTF8", "PYTHONCOERCECLOCALE")},
                                "LC_ALL": "C", "LANG": "C"})
    assert plain.returncode == 0 and (out / "config.json").is_file(), plain.stderr[-600:]
