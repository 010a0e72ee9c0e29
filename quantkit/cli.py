"""The `quantkit` command line: one click group, subcommands registered from each room."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import sys

import click

from quantkit.errors import STOPPED_WRITES, Interrupted, QuantkitError, check_tqdm_environment

# (module, attribute, one-line help) of each subcommand. A subcommand's module is imported only when
# that subcommand runs: `quantkit --help` lists these lines without importing torch or transformers
# (tests/test_cli_conventions.py checks each line against its command's docstring).
SUBCOMMANDS = {
    "calibrate": ("quantkit.calibrate.cli", "calibrate", "Quantize MODEL (a local directory or hub id) layer by layer and export it."),
    "plan": ("quantkit.planner.cli", "plan", "What `quantkit calibrate` with the same options needs per rank, on disk and in time, before it runs."),
    "importance": ("quantkit.importance.cli", "importance", "Compute TLQ token importance of MODEL on --calib data and save a token-level calibration set."),
    "eval": ("quantkit.eval.cli", "eval_cmd", "Mean token cross-entropy (nats) and perplexity of a model or a quantkit export on text."),
    "export": ("quantkit.export.cli", "export", "Rewrite the quantkit output IN_DIR (any format) in --format, without re-quantizing."),
    "qid": ("quantkit.qid.cli", "qid", "QiD scaling laws: QiD = loss(quantized) - loss(16-bit) on held-out text, vs N, D and bits."),
    "demo": ("quantkit.demo.cli", "demo", "Train (or load) a small LM, quantize it with RTN and GPTQ at 4 and 3 bits, and compare held-out loss."),
}

# Exit codes: 2 for bad input and failed I/O, 128 + the signal number for SIGINT (130) and SIGTERM (143).
EXIT_ERROR = 2


def describe_error(err: BaseException) -> str:
    """One line for an error that is not a QuantkitError: what failed, and where when known."""
    if isinstance(err, OSError):
        what = err.strerror or str(err) or type(err).__name__
        where = f": {err.filename}" if err.filename else ""
        hint = STOPPED_WRITES.get(err.errno or -1)
        return f"{what}{where}" + (f" ({hint})" if hint else "")
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    if "No space left on device" in text:
        return f"{type(err).__name__}: the disk is full while writing ({first}); free some space or write elsewhere"
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


_STOPS = (signal.SIGINT, signal.SIGTERM)
_EXITS_AFTER = "quantkit_exits_after"  # main()'s answer, carried to invoke() in the click context's meta


def _hold_stops() -> None:
    for s in _STOPS:
        signal.signal(s, signal.SIG_IGN)


def _raise_interrupted(signum: int, frame) -> None:
    # Later signals are held while the first one unwinds: the cleanup is short (temporary outputs removed, ranks
    # given 5 s before SIGKILL) and cutting it short would leave partial output behind.
    _hold_stops()
    raise Interrupted(signum)


def _nul_byte(args: list[str]) -> str | None:
    """The message for an argument holding a NUL byte (an in-process caller's string: no real command line holds one),
    which the OS refuses in any path ("embedded null byte") once the work has begun; None where there is none."""
    at = next((i for i, arg in enumerate(args) if "\x00" in arg), None)
    if at is None:
        return None
    option = args[at - 1] if at and args[at - 1].startswith("-") and "=" not in args[at - 1] else None
    what = f"{option} {args[at]!r}" if option else f"the argument {args[at]!r}"
    return f"{what} holds a NUL byte, which no file name or value can hold; give it without"


def _unusable_argument(args: list[str]) -> str | None:
    """The message for an argument naming a named pipe, socket or device (`--calib fifo`): whichever command reads it
    would wait on the pipe forever, or read a device without end, before any check of its content; None where none
    does."""
    from quantkit.errors import special_file_problem

    for arg in args:
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        problem = special_file_problem(value) if value not in ("", "-") else None
        if problem is not None:
            return problem
    return None


def _one_line(err: click.ClickException) -> str:
    """A click error as one line: a value holding a line break (a file name may) would make a second one."""
    return " ".join(err.format_message().split())


class _Diagnostics:
    """sys.stderr for a command: where a write fails (2>/dev/full: ENOSPC; a closed reader), the stream is pointed at
    /dev/null and the command goes on, since progress bars and warnings that cannot be shown must not stop the work
    (a good run exited 1 with nothing exported) nor turn a refusal's exit code 2 into 1."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def __getattr__(self, name: str):
        return getattr(self._stream, name)

    def _quiet(self, call, *args):
        try:
            return call(*args)
        except OSError:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())
            with contextlib.suppress(OSError, ValueError):
                return call(*args)  # what was held in the buffer goes to /dev/null now
            return None

    def write(self, text: str) -> int:
        return self._quiet(self._stream.write, text) or len(text)

    def flush(self) -> None:
        self._quiet(self._stream.flush)


class QuantkitGroup(click.Group):
    """Lazy subcommands; any error becomes one line on stderr and exit code 2 (--debug: the traceback)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Every subcommand name, without importing any of them."""
        return sorted(SUBCOMMANDS)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list of `quantkit --help`, from SUBCOMMANDS' help lines (no subcommand imported)."""
        rows = [(name, SUBCOMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return self._load(name)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        """The subcommand, once no option that takes one value is given twice (click would keep the last)."""
        from quantkit.cli_options import repeated_option

        name, command, rest = super().resolve_command(ctx, args)
        problem = ((repeated_option(command, rest, ctx) if command is not None else None) or _nul_byte(rest)
                   or _unusable_argument(rest))
        if problem:
            raise click.UsageError(problem, ctx)
        return name, command, rest

    @staticmethod
    def _load(name: str) -> click.Command | None:
        if name not in SUBCOMMANDS:
            return None
        module, attr, _ = SUBCOMMANDS[name]
        try:
            return getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as err:
            if err.name and module.startswith(err.name):
                return None  # that room is not built yet
            raise

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """click's main with SIGINT and SIGTERM unwinding as Interrupted; the process's own command line (argv,
        standalone: it exits next) holds them until the process has gone."""
        given = sys.stderr
        # None where fd 2 was closed (2>&-): click then writes nothing there, and there is no stream to guard
        sys.stderr = given if given is None or isinstance(given, _Diagnostics) else _Diagnostics(given)
        try:
            os.getcwd()
        except FileNotFoundError:  # torch's import dies there ("oneMKL FATAL ERROR"), and relative paths mean nothing
            click.echo("error: the working folder no longer exists (it was deleted after the shell entered it); cd "
                       "to an existing folder and run again", err=True)
            sys.exit(EXIT_ERROR)
        try:
            check_tqdm_environment()
        except QuantkitError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(EXIT_ERROR)
        # SIGTERM unwinds like Ctrl-C so that atomic outputs remove their temporary directories.
        handlers = {s: signal.getsignal(s) for s in _STOPS}
        try:
            for s in handlers:
                signal.signal(s, _raise_interrupted)
        except ValueError:  # not the main thread (an embedding application): leave signals to it
            handlers = {}
        # Python's exit runs atexit callbacks (torch's compile-time report imports tabulate -> wcwidth): a signal
        # there, or between the command's end and the exit, would raise KeyboardInterrupt where no line is made of it
        exits_after = bool(handlers) and args is None and standalone_mode  # the process's own command line
        try:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra, **{_EXITS_AFTER: exits_after})
        finally:
            sys.stderr = given
            if exits_after:
                _hold_stops()
            else:
                for s, handler in handlers.items():
                    if handler is not None:  # None: installed outside Python, nothing to put back
                        signal.signal(s, handler)

    def make_context(self, info_name, args, parent=None, **extra) -> click.Context:
        """click's context, holding in its meta whether the process exits when the command ends (main's call: its
        own, so that a command line run inside another one, as CliRunner does, keeps its own answer)."""
        exits_after = bool(extra.pop(_EXITS_AFTER, False))
        try:
            ctx = super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise  # bare `quantkit`: the help, as click shows it
        except click.UsageError as err:  # `quantkit --bogus calibrate`: the group's own options, before invoke's lines
            if "--debug" in args or os.environ.get("QUANTKIT_DEBUG") == "1":
                raise
            click.echo(f"error: {_one_line(err)}", err=True)
            sys.exit(EXIT_ERROR)
        ctx.meta[_EXITS_AFTER] = exits_after
        return ctx

    def invoke(self, ctx: click.Context):
        from quantkit.fsutil import clear_kept, kept_note, private_tempdir

        debug = bool(ctx.params.get("debug")) or os.environ.get("QUANTKIT_DEBUG") == "1"
        clear_kept()
        try:
            with private_tempdir():
                return super().invoke(ctx)
        # a subgroup given no subcommand (`quantkit qid`): its help, as click shows a bare `quantkit`'s, not one line
        except (click.exceptions.Exit, click.exceptions.Abort, click.exceptions.NoArgsIsHelpError):
            raise
        except KeyboardInterrupt as err:
            signum = getattr(err, "signum", signal.SIGINT)
            kept = kept_note() or "nothing was written"
            click.echo(f"error: interrupted ({signal.Signals(signum).name}); {kept}", err=True)
            sys.exit(128 + signum)
        except click.exceptions.ClickException as err:
            if debug:
                raise
            click.echo(f"error: {_one_line(err)}", err=True)
            sys.exit(EXIT_ERROR)
        except BrokenPipeError:
            # stdout's reader is gone (`quantkit ... | head`): end quietly as Unix tools do, with SIGPIPE's status;
            # stdout goes to /dev/null so that its flush at exit does not raise again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(128 + signal.SIGPIPE)
        except Exception as err:  # noqa: BLE001 - the CLI boundary: one line, never a traceback without --debug
            if debug:
                raise
            # the environment stopping a write (a full disk) is no bug: no traceback to offer
            known = isinstance(err, QuantkitError) or (isinstance(err, OSError) and err.errno in STOPPED_WRITES)
            message = str(err) if isinstance(err, QuantkitError) else describe_error(err)
            message += "" if known else " (--debug shows the traceback)"
            kept = kept_note()
            line = f"{message}; {kept}" if kept else message
            click.echo(f"error: {' '.join(line.split())}", err=True)
            sys.exit(EXIT_ERROR)
        finally:
            if ctx.meta.get(_EXITS_AFTER):
                _hold_stops()


@click.group(cls=QuantkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="quantkit")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error instead of one line.")
def main(debug: bool) -> None:
    """quantkit: post-training quantization (TLQ, GPTQ, RTN) and QiD scaling laws."""
    configure_logging(debug)
    # a file name whose bytes the locale cannot decode (b"\xff") reaches Python as surrogates: lines naming it are
    # written back as the same bytes (as ls does), where a strict UTF-8 stream fails on the first one
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="surrogateescape")


def configure_logging(debug: bool) -> None:
    """The `quantkit` logger's records on stderr: warnings, or everything with --debug (once per process)."""
    logger = logging.getLogger("quantkit")
    handler = next((h for h in logger.handlers if getattr(h, "quantkit_cli", False)), None)
    if handler is None:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler.quantkit_cli = True
        logger.addHandler(handler)
    handler.setStream(sys.stderr)  # this invocation's stderr (an embedding application may have swapped it)
    logger.setLevel(logging.DEBUG if debug else logging.WARNING)


if __name__ == "__main__":
    main()
