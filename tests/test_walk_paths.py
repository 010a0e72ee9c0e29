"""Every path a `quantkit` command reads or writes, walked through the odd states a file system holds: an input
that is missing, of the other kind (a folder for a file, a file for a folder), empty, binary garbage, a named pipe
(which blocks a reader forever), a link to nothing, or a 300-byte name; an output that exists, lies under a file,
ends in '/' where a file is meant, goes through a link to nothing, lies in a frozen folder, is empty, or has a
300-byte name. A right program refuses each in one `error:` line with exit code 2 and leaves nothing behind, or,
where the input is good after all (a folder output ending in '/', an input under an odd but valid name), does the
work. The commands' path parameters are found by walking quantkit's click group, so a new one is held to the same
states without a line here (test_every_path_parameter_is_walked)."""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import stat
import threading
from pathlib import Path

import click
import pytest
from helpers import run_cli, save_tiny_llama, write_text

from quantkit.cli import SUBCOMMANDS

RTN = ["--method", "rtn", "--nsamples", "2", "--seqlen", "16", "--group-size", "32"]
EV = ["--seqlen", "16", "--max-tokens", "96"]
QID_HEADER = "model,method,bits,group_size,N,D,loss_fp,loss_q,qid,eval_text\n"
LONG = "n" * 300  # one name past every common file system's 255-byte limit

# each command: a good command line over the shared folder's files (keys in {braces}), and for each path parameter
# (its first spelling, or the argument's name) what it is: "file"/"dir"/"data" (a text file, folder or spec) read,
# "out-dir"/"out-file" written, "out-folder" written into (its files kept)
COMMANDS = {
    "calibrate": (["calibrate", "{model}", "--calib", "{text}", *RTN, "-o", "{out}"],
                  {"model": "dir", "--calib": "data", "--recipe": "file", "--calib-set": "dir",
                   "--chat-template": "file", "--offload-dir": "out-folder", "-o": "out-dir"}),
    "plan": (["plan", "{model}", "--calib", "{text}", *RTN],
             {"model": "dir", "--calib": "data", "--recipe": "file", "--calib-set": "dir", "--chat-template": "file",
              "--offload-dir": "out-folder", "-o": "out-dir"}),
    "importance": (["importance", "{model}", "--calib", "{text}", "--nsamples", "2", "--seqlen", "16", "-o", "{out}"],
                   {"model": "dir", "--calib": "data", "--chat-template": "file", "--offload-dir": "out-folder",
                    "-o": "out-dir"}),
    "eval": (["eval", "{model}", "--data", "{text}", *EV],
             {"model_or_dir": "dir", "--data": "data", "--include-path": "dir", "-o": "out-file"}),
    "export": (["export", "{ct}", "--format", "fake", "-o", "{out}"], {"in_dir": "dir", "-o": "out-dir"}),
    "demo": (["demo", "--model", "{model}", "--data", "{text}", "--seqlen", "16", "--nsamples", "2", "--format",
              "fake", "-o", "{out}"], {"--model": "dir", "--data": "data", "-o": "out-dir"}),
    "qid measure": (["qid", "measure", "{model}", "--eval", "{text}", "--eval-tokens", "64", "--eval-seqlen", "16",
                     "--methods", "rtn", "--bits", "4", "--nsamples", "2", "--calib-seqlen", "16", "--group-size", "32",
                     "--tokens", "1e9", "--no-progress", "-o", "{out}"],
                    {"checkpoints": "dir", "--eval": "data", "--calib": "data", "-o": "out-file"}),
    "qid fit": (["qid", "fit", "{csv}", "--bootstrap", "0"], {"csv_path": "file", "-o": "out-file"}),
    "qid predict": (["qid", "predict", "--law", "{fit}", "--params", "1e6", "--bits", "4", "--tokens", "1e9"],
                    {"--law": "file"}),
    "qid training-level": (["qid", "training-level", "{model}", "--law", "{fit}", "--bits", "4", "--qid", "0.1"],
                           {"model": "dir", "--law": "file", "--data": "data", "--calib": "data", "-o": "out-file"}),
    "qid plot": (["qid", "plot", "{csv}", "--format", "png", "-o", "{out}"],
                 {"csv_path": "file", "--fit": "file", "-o": "out-folder"}),
}
# string parameters that name a path (or a hub id or data spec that may be one): model, data and law files
PATH_NAMES = {"model", "model_or_dir", "checkpoints", "calib", "data", "eval", "law_spec"}


def _path_parameters():
    """(command words, the parameter's key as COMMANDS spells it) of every parameter that names a path."""
    def walk(cmd, words):
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, [*words, name])
            return
        for param in cmd.params:
            key = param.opts[0] if isinstance(param, click.Option) else param.name
            named = param.name in PATH_NAMES or (param.name or "").endswith(("_path", "_dir", "output"))
            if isinstance(param.type, click.Path) or (named and not isinstance(param.type, click.Choice)):
                yield " ".join(words), key

    for name, (module, attr, _) in sorted(SUBCOMMANDS.items()):
        yield from walk(getattr(importlib.import_module(module), attr), [name])


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The good inputs, shared read-only: a tiny model, its text, an export, a QiD table and its fit."""
    root = tmp_path_factory.mktemp("walk")
    save_tiny_llama(root / "model")
    write_text(root / "text.txt")
    assert run_cli("calibrate", root / "model", "--calib", root / "text.txt", *RTN, "-o", root / "ct").exit_code == 0
    rows = [f"m{i},gptq,{b},128,{10**6 * (i + 1)},{10**9 * (j + 1)},3.0,{3.0 + 0.01 * (i + j + 1) / b!r},"
            f"{0.01 * (i + j + 1) / b!r},e\n" for i in range(3) for j in range(3) for b in (2, 3, 4)]
    (root / "q.csv").write_text(QID_HEADER + "".join(rows))
    assert run_cli("qid", "fit", root / "q.csv", "--bootstrap", "0", "-o", root / "fit.json").exit_code == 0
    return root


def _argv(command: str, base: Path, out: Path, key: str, value: str) -> list[str]:
    """The command's good line with the parameter `key` given `value` (an argument in its place, an option
    replaced or added)."""
    template, _ = COMMANDS[command]
    good = {"model": base / "model", "text": base / "text.txt", "ct": base / "ct", "csv": base / "q.csv",
            "fit": base / "fit.json", "out": out}
    argv = [str(a).format(**{k: str(v) for k, v in good.items()}) for a in template]
    if key.startswith("-"):
        spellings = {"-o": ("-o",), "--calib-set": ("--calib-set", "--calib")}.get(key, (key,))
        for spelling in spellings:
            if spelling in argv:
                at = argv.index(spelling)
                del argv[at:at + 2]
        low = ["--low-memory"] if key == "--offload-dir" and command in ("calibrate", "plan") else []
        return [*argv, *low, key, value]
    positional = {"model": "{model}", "model_or_dir": "{model}", "checkpoints": "{model}", "in_dir": "{ct}",
                  "csv_path": "{csv}"}[key]
    at = template.index(positional)
    argv[at] = value
    return argv


@contextlib.contextmanager
def _unblocked(pipe: Path, seconds: float = 15.0):
    """Yield a list that says whether the block was still waiting on `pipe` after `seconds`: a reader of a named
    pipe waits for a writer forever, so the watchdog opens it for writing once (the reader then sees its end)."""
    hung: list[bool] = []
    done = threading.Event()

    def watch() -> None:
        if done.wait(seconds) or not pipe.exists() or not stat.S_ISFIFO(os.lstat(pipe).st_mode):
            return
        while not done.is_set():
            try:
                os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO until a reader waits
                hung.append(True)
            except OSError:
                pass
            done.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield hung
    finally:
        done.set()
        watcher.join()


def _bad_inputs(kind: str):
    """(name, maker of the bad path in a folder) for an input of `kind`."""
    other = (lambda w: _mkdir(w / "x")) if kind in ("file", "data") else (lambda w: _write(w / "x", b"text"))
    yield "missing", lambda w: w / "x"
    yield "a folder for a file" if kind in ("file", "data") else "a file for a folder", other
    yield "an empty file", lambda w: _write(w / "x", b"")
    yield "binary garbage", lambda w: _write(w / "x", bytes(range(256)) * 8)
    yield "a named pipe", lambda w: (os.mkfifo(w / "x"), w / "x")[1]
    yield "a link to nothing", lambda w: ((w / "x").symlink_to(w / "gone"), w / "x")[1]
    yield "a 300-byte name", lambda w: w / LONG


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _input_cases():
    for command, (_, params) in COMMANDS.items():
        for key, kind in params.items():
            if kind.startswith("out"):
                continue
            for name, make in _bad_inputs(kind):
                yield pytest.param(command, key, kind, make, id=f"{command} {key} {name}")


def _refused(result, before: dict, after: dict) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output[-600:], repr(result.exception))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "--debug shows the traceback" not in lines[0], lines[0]
    assert after == before, {"added": sorted(set(after) - set(before)), "removed": sorted(set(before) - set(after))}
    return lines[0]


def _state(*roots: Path) -> dict:
    """Every entry under `roots` -> what it holds (a link's target, a pipe, a folder, a file's bytes), read
    without following links or opening pipes."""
    out = {}
    for i, root in enumerate(roots):
        for path in sorted(root.rglob("*")):
            mode = os.lstat(path).st_mode
            held = (f"link to {os.readlink(path)}" if stat.S_ISLNK(mode) else "dir" if stat.S_ISDIR(mode)
                    else path.read_bytes() if stat.S_ISREG(mode) else "special")
            out[f"{i}:{path.relative_to(root)}"] = held
    return out


@pytest.mark.parametrize(("command", "key", "kind", "make"), list(_input_cases()))
def test_a_bad_input_path_is_one_line(base: Path, tmp_path: Path, command: str, key: str, kind: str, make) -> None:
    work = tmp_path / "w"
    work.mkdir()
    bad = make(work)
    before = _state(base, tmp_path)
    with _unblocked(work / "x") as hung:
        result = run_cli(*_argv(command, base, tmp_path / "out", key, str(bad)))
    assert not hung, "the command waited on the named pipe (a reader waits for a writer forever)"
    _refused(result, before, _state(base, tmp_path))


def _bad_outputs(kind: str):
    """(name, maker of the output path in a folder, whether a right run may take it)."""
    yield "existing", lambda w: (_mkdir(w / "o"), _write(w / "o" / "f", b"mine"))[0] if kind != "out-file" \
        else _write(w / "o", b"mine"), kind != "out-dir"
    yield "under a regular file", lambda w: _write(w / "f", b"mine") / "o", False
    yield "ending in '/'", lambda w: f"{w / 'o'}/", kind != "out-file"
    yield "through a link to nothing", lambda w: ((w / "ln").symlink_to(w / "gone"), w / "ln" / "o")[1], False
    yield "an empty name", lambda w: "", False
    yield "a 300-byte name", lambda w: w / LONG, False


def _output_cases():
    for command, (_, params) in COMMANDS.items():
        for key, kind in params.items():
            if kind.startswith("out"):
                for name, make, fine in _bad_outputs(kind):
                    yield pytest.param(command, key, kind, make, fine, id=f"{command} {key} {name}")


@pytest.mark.parametrize(("command", "key"), [(c, k) for c, (_, ps) in COMMANDS.items() for k, v in ps.items()
                                              if v.startswith("out")])
def test_an_output_in_a_frozen_folder_is_one_line(base: Path, tmp_path: Path, immutable, command: str,
                                                  key: str) -> None:
    """A folder no one may create in (chattr +i): refused before the work, naming the output."""
    frozen = immutable(_mkdir(tmp_path / "frozen"))
    before = _state(base, tmp_path)
    result = run_cli(*_argv(command, base, tmp_path / "o", key, str(frozen / "o")))
    assert str(frozen / "o") in _refused(result, before, _state(base, tmp_path))


def test_every_path_parameter_is_walked() -> None:
    """Each command's path parameters (click.Path, or a name saying path) are in COMMANDS, so the walks above
    reach a new one; """
    walked = {(command, key) for command, (_, params) in COMMANDS.items() for key in params}
    assert not set(_path_parameters()) - walked, sorted(set(_path_parameters()) - walked)


GOOD = {"model": "model", "model_or_dir": "model", "--data": "text.txt", "--calib": "text.txt", "in_dir": "ct",
        "csv_path": "q.csv", "--law": "fit.json"}
ODD_INPUTS = [("plan", "model"), ("plan", "--calib"), ("eval", "model_or_dir"), ("eval", "--data"),
              ("export", "in_dir"), ("qid fit", "csv_path"), ("qid predict", "--law")]  # --fit: as --law


@pytest.mark.parametrize(("command", "key"), ODD_INPUTS)
def test_a_good_input_named_with_a_line_break_is_taken(base: Path, tmp_path: Path, command: str, key: str) -> None:
    """A name holding a line break is a name all the same: the input is read and the work done."""
    source, odd = base / GOOD[key], tmp_path / "odd\nname"
    (shutil.copytree if source.is_dir() else shutil.copy)(source, odd)
    result = run_cli(*_argv(command, base, tmp_path / "o", key, str(odd)))
    assert result.exit_code == 0, (result.output[-600:], repr(result.exception))


@pytest.mark.parametrize(("command", "key"), ODD_INPUTS)
def test_a_name_that_is_not_utf8_is_taken_or_one_line(base: Path, tmp_path: Path, command: str, key: str) -> None:
    """A name holding a byte that is no UTF-8 (b"\\xff"): a text, CSV or JSON file (read by Python) is taken; a
    model or export folder, which safetensors and the tokenizers cannot open under such a name (it failed as
    "truncated or corrupt"), is one line before any work, naming the bytes."""
    source, odd = base / GOOD[key], tmp_path / os.fsdecode(b"odd\xff")
    (shutil.copytree if source.is_dir() else shutil.copy)(source, odd)
    before = _state(base, tmp_path)
    result = run_cli(*_argv(command, base, tmp_path / "o", key, str(odd)))
    if source.is_dir():
        assert "not UTF-8" in _refused(result, before, _state(base, tmp_path))
    else:
        assert result.exit_code == 0, (result.output[-600:], repr(result.exception))


@pytest.mark.parametrize("command", [c for c, (_, ps) in COMMANDS.items() if ps.get("-o") == "out-dir"])
def test_a_folder_output_not_utf8_is_one_line_up_front(base: Path, tmp_path: Path, command: str) -> None:
    """A folder of safetensors cannot be written under such a name: refused before the work, not after it."""
    before = _state(base, tmp_path)
    result = run_cli(*_argv(command, base, tmp_path / "o", "-o", os.fsdecode(os.fsencode(tmp_path) + b"/o\xff")))
    assert "not UTF-8" in _refused(result, before, _state(base, tmp_path))


@pytest.mark.parametrize(("command", "key", "kind", "make", "fine"), list(_output_cases()))
def test_a_bad_output_path_is_one_line(base: Path, tmp_path: Path, command: str, key: str, kind: str, make,
                                       fine: bool) -> None:
    work = tmp_path / "w"
    work.mkdir()
    out = make(work)
    before = _state(base, tmp_path)
    result = run_cli(*_argv(command, base, tmp_path / "o", key, str(out)))
    if fine and result.exit_code == 0:  # what was there is kept (a folder written into keeps the user's files)
        after = _state(base, tmp_path)
        given = [name for name in before if name == "1:w/o" or name.startswith("1:w/o/")]
        assert all(after.get(name) == held for name, held in before.items() if name not in given or
                   kind == "out-folder"), "the run changed or removed what it was not given"
        return
    _refused(result, before, _state(base, tmp_path))


def test_names_at_the_limit_are_taken_where_nothing_goes_beside_them(base: Path, tmp_path: Path) -> None:
    """Round 15: a 255-byte --offload-dir name was refused by the output rule (16 bytes kept for temporary names
    beside it), but scratch space is made in place with its files inside; so are the folders above an output. The
    output itself keeps the reserve: its temporary twin goes beside it."""
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    scratch, above = tmp_path / ("s" * limit), tmp_path / ("p" * limit) / "out"
    result = run_cli("calibrate", base / "model", "--calib", base / "text.txt", *RTN, "--low-memory",
                     "--offload-dir", scratch, "-o", above)
    assert result.exit_code == 0, result.output[-600:]
    assert (above / "config.json").is_file() and not scratch.exists()
    before = _state(base, tmp_path)
    line = _refused(run_cli("calibrate", base / "model", "--calib", base / "text.txt", *RTN, "-o",
                            tmp_path / ("o" * (limit - 8))), before, _state(base, tmp_path))
    assert "for the run's temporary names" in line, line


def test_a_data_file_named_in_latin1_is_taken_or_refused_up_front(base: Path, tmp_path: Path) -> None:
    """Round 15: calibrate --calib t\\xe9.txt read the data, then failed writing the model card (UTF-8) after the
    work; the card now writes the name escaped. qid measure, whose table's text columns would hold the name, says so
    before any cell is measured."""
    odd = os.fsdecode(os.fsencode(tmp_path) + b"/t\xe9.txt")
    shutil.copy(base / "text.txt", odd)
    result = run_cli("calibrate", base / "model", "--calib", odd, *RTN, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output[-600:]
    assert "t\\udce9.txt" in (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    argv = _argv("qid measure", base, tmp_path / "m.csv", "--eval", odd)
    before = _state(base, tmp_path)
    assert "not UTF-8" in _refused(run_cli(*argv), before, _state(base, tmp_path))


# a model or export folder given to a command (its key in COMMANDS), and the good folder it is a copy of
FOLDERS = [(c, k) for c, (_, ps) in COMMANDS.items() for k, v in ps.items()
           if v == "dir" and k not in ("--calib-set", "--include-path")]


@pytest.mark.parametrize("inside", ["tokenizer_config.json", "generation_config.json", "config.json"])
@pytest.mark.parametrize(("command", "key"), FOLDERS)
def test_a_named_pipe_inside_a_model_folder_is_one_line(base: Path, tmp_path: Path, command: str, key: str,
                                                        inside: str) -> None:
    """A file of a model or export folder that is a named pipe: its readers passed over what is no regular file, so
    a pipe as tokenizer_config.json or generation_config.json was ignored without a word (exit 0, the export's
    tokenizer settings silently others); refused in one line naming it, as a pipe given as an argument is."""
    folder = tmp_path / "folder"
    shutil.copytree(base / ("ct" if key == "in_dir" else "model"), folder)
    (folder / inside).unlink(missing_ok=True)
    os.mkfifo(folder / inside)
    before = _state(base, tmp_path)
    with _unblocked(folder / inside) as hung:
        result = run_cli(*_argv(command, base, tmp_path / "out", key, str(folder)))
    assert not hung, "the command waited on the named pipe"
    line = _refused(result, before, _state(base, tmp_path))
    assert f"{folder / inside} is a named pipe" in line, line
