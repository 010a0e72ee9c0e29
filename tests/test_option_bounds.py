"""Every number option of every `quantkit` command refuses an absurd value up front: an integer past its bound
(10**25 hung `qid fit --bootstrap`, overflowed torch in `--threads`), a float that is not finite (`demo
--train-seconds 1e309` trained without end), nan, and a negative count. One line naming the option, exit 2,
before any work: well under a second, nothing written. The commands are found by walking quantkit's click group,
so a new command's option is held to the same rule without a line here."""

from __future__ import annotations

import importlib
import time

import click
import pytest
from click.testing import CliRunner

from quantkit.cli import SUBCOMMANDS, main
from quantkit.cli_options import Bounded

NUMBER_TYPES = (click.types.IntParamType, click.types.FloatParamType, Bounded)


def _number_options():
    def walk(cmd, path):
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, [*path, name])
            return
        for param in cmd.params:
            if isinstance(param.type, NUMBER_TYPES):
                yield path, param, any("-o" in other.opts for other in cmd.params)

    for name, (module, attr, _) in sorted(SUBCOMMANDS.items()):
        yield from walk(getattr(importlib.import_module(module), attr), [name])


def _cases():
    for path, param, output in _number_options():
        integer = isinstance(param.type, click.types.IntParamType) or getattr(param.type, "integer", False)
        values = [str(10**25), "nan", "inf"] if integer else ["inf", "-inf", "nan", "1e309"]
        least = getattr(param.type, "least", None)
        if least is not None and least >= 0 and -1 not in getattr(param.type, "allowed", ()):
            values.append("-1")
        if not integer and getattr(param.type, "most", None) is not None:
            values.append(repr(param.type.most * 10))
        for value in values:
            yield pytest.param(path, param, output, value, id=f"{' '.join(path)} {param.opts[0]} {value}")


def test_every_number_option_is_bounded() -> None:
    """Every number option of every command (calibrate's, plan's and importance's too, which build_job checked only
    after parsing) is read by the shared bounded type, from the one table of bounds."""
    loose = [f"{' '.join(path)} {param.opts[0]}" for path, param, _ in _number_options()
             if not isinstance(param.type, Bounded)]
    assert not loose, f"number options without a bound (use quantkit.cli_options.bounded): {loose}"


@pytest.mark.parametrize(("path", "param", "output", "value"), list(_cases()))
def test_absurd_number_is_one_line_before_any_work(tmp_path, path, param, output, value) -> None:
    """No other argument is given: the option is read (and refused) before click asks for the missing ones."""
    out = tmp_path / "out"
    started = time.perf_counter()
    result = CliRunner().invoke(main, [*path, *(["-o", str(out)] if output else []), param.opts[0], value])
    seconds = time.perf_counter() - started
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert param.opts[0] in lines[0], lines[0]
    assert seconds < 1.0, f"{seconds:.2f}s: work started before the refusal"
    assert not out.exists()


@pytest.mark.parametrize(("seqlen", "nsamples", "words"), [
    (100_000, 64, "--nsamples 64 x --seqlen 100000 = 6400000 tokens"),
    (100_000, 1, "--seqlen 100000 is longer than the held-out part"),
])
def test_demo_windows_past_its_corpus_are_refused_before_training(tmp_path, seqlen, nsamples, words) -> None:
    """The demo's corpus size is known before it is generated: windows it cannot hold are one line, not a minute of
    training first (10**25 is the type's refusal; a count under 2**31 past the corpus is this one's)."""
    started = time.perf_counter()
    result = CliRunner().invoke(main, ["demo", "-o", str(tmp_path / "demo"), "--seqlen", str(seqlen),
                                       "--nsamples", str(nsamples)])
    assert result.exit_code == 2 and words in result.stderr, result.stderr
    assert time.perf_counter() - started < 5.0
    assert not (tmp_path / "demo").exists()
