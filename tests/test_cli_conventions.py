"""CLI conventions a new user meets first: fast --help, one output option, help on every option, a clean
clone after `make demo`, and one line naming what to install for a GPTQ checkpoint transformers cannot load."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from helpers import run_calibration, save_tiny_llama, write_text

from quantkit.cli import SUBCOMMANDS, main
from quantkit.cli_options import OUTPUT_ALIASES

REPO = Path(__file__).resolve().parents[1]


def _commands():
    """(path, command) of every subcommand and sub-subcommand."""
    def walk(cmd, path):
        yield path, cmd
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, [*path, name])

    for name, (module, attr, _) in SUBCOMMANDS.items():
        yield from walk(getattr(importlib.import_module(module), attr), [name])


def test_top_level_help_imports_no_subcommand() -> None:
    code = ("import sys, time; t = time.perf_counter(); from quantkit.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(time.perf_counter() - t, 'torch' in sys.modules, 'transformers' in sys.modules)")
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    seconds, torch_loaded, hf_loaded = out.split()[-3:]
    assert (torch_loaded, hf_loaded) == ("False", "False")
    assert float(seconds) < 1.0, f"--help took {seconds}s in-process ({time.perf_counter() - started:.1f}s with start-up)"
    for name in SUBCOMMANDS:
        assert name in out


def test_listed_help_is_each_commands_docstring() -> None:
    for name, (module, attr, line) in SUBCOMMANDS.items():
        command = getattr(importlib.import_module(module), attr)
        assert command.help.strip().splitlines()[0] == line, name


def test_every_option_has_help() -> None:
    missing = [f"{' '.join(path)} {param.opts[0]}" for path, cmd in _commands() for param in cmd.params
               if isinstance(param, click.Option) and not param.help]
    assert not missing


def test_output_is_spelled_one_way_with_hidden_aliases() -> None:
    for path, cmd in _commands():
        for param in cmd.params:
            if isinstance(param, click.Option) and "-o" in param.opts:
                assert "--output" in param.opts, path
                assert set(OUTPUT_ALIASES) <= set(param.opts), path
                record = param.get_help_record(click.Context(cmd))
                assert record[0].startswith("-o, --output") and "--out-dir" not in record[0] and "--out," not in record[0]


def test_old_output_spellings_still_work(tmp_path) -> None:
    for flag in ("--out", "--out-dir", "-o", "--output"):
        result = CliRunner().invoke(main, ["qid", "plot", str(tmp_path / "missing.csv"), flag, str(tmp_path / "figs")])
        assert result.exit_code == 2 and "No such option" not in result.output, (flag, result.output)


def test_make_demo_writes_under_an_ignored_path() -> None:
    recipe = (REPO / "Makefile").read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    target = recipe.split(" -o ", 1)[1].split()[0]
    ignored = subprocess.run(["git", "check-ignore", "-q", f"{target}/results.json"], cwd=REPO)
    assert ignored.returncode == 0, f"make demo writes {target}, which git does not ignore"
    assert subprocess.run(["git", "check-ignore", "-q", "quantkit-demo/x"], cwd=REPO).returncode == 0


def test_repo_points_at_nothing_outside_it() -> None:
    assert "DESIGN.md" not in (REPO / "README.md").read_text()
    for recipe in (REPO / "calib").glob("*.yaml"):
        assert "../" not in recipe.read_text().split("sources:", 1)[1], recipe


@pytest.fixture(scope="module")
def gptq_export(tmp_path_factory) -> Path:
    """A quantkit GPTQ export of a tiny Llama, without quantkit.json: for transformers' own loader alone."""
    from quantkit.quant.spec import QuantSpec

    root = tmp_path_factory.mktemp("gptq")
    model = save_tiny_llama(root / "model")
    out = root / "out"
    run_calibration(str(model), str(out), QuantSpec(bits=4, group_size=32), method="rtn",
                    calib=str(write_text(root / "t.txt")), nsamples=2, seqlen=16, format="gptq", progress=False)
    (out / "quantkit.json").unlink()
    return out


@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is not None, reason="gptqmodel is installed here")
def test_gptq_checkpoint_without_gptqmodel_names_the_install(gptq_export, tmp_path) -> None:
    import quantkit
    from quantkit.errors import QuantkitError

    with pytest.raises(QuantkitError, match=r"pip install gptqmodel optimum"):
        quantkit.load_quantized(gptq_export)
    text = write_text(tmp_path / "e.txt", words=200)
    result = CliRunner().invoke(main, ["eval", str(gptq_export), "--data", str(text), "--seqlen", "16"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "pip install gptqmodel" in lines[0]
    assert "NameError" not in result.output


@pytest.mark.parametrize("args", [["--json", "calibrate"], ["--bogus", "calibrate", "x"], ["--debug=1", "eval"]])
def test_an_option_the_group_lacks_is_one_line(args: list) -> None:
    """Round 15: an option before the subcommand (`quantkit --json calibrate`) printed click's usage block, 4 lines,
    where every other usage error is one `error:` line."""
    result = CliRunner().invoke(main, args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert args[0].split("=")[0] in lines[0], lines[0]


@pytest.mark.parametrize("words", [[], ["qid"]])
def test_a_bare_group_prints_its_help(words: list) -> None:
    """A group given no subcommand prints the help its --help prints (click's own text, the reference), with the same
    exit code as a bare `quantkit` (2: no command ran); `quantkit qid` squashed the group's help onto one error line."""
    bare = CliRunner().invoke(main, words)
    asked = CliRunner().invoke(main, [*words, "--help"])
    assert asked.exit_code == 0 and "Commands:" in asked.stdout
    assert bare.exit_code == 2 and bare.output.strip() == asked.stdout.strip(), bare.output
