"""Click options every command spells the same way (one output option, old spellings kept as hidden aliases)."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import click

from quantkit.bounds import BOUNDS, Bound

# Spellings earlier versions used for the output option; still accepted, no longer shown in --help.
OUTPUT_ALIASES = ("--out", "--out-dir")


class AliasedOption(click.Option):
    """An option that also accepts `hidden_aliases`, which --help does not show."""

    def __init__(self, *args, hidden_aliases: tuple[str, ...] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hidden_aliases = frozenset(hidden_aliases)

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        """The help line without the hidden aliases."""
        shown, self.opts = self.opts, [o for o in self.opts if o not in self.hidden_aliases]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = shown


def output_option(dest: str = "output", help: str = "Output directory.", **kwargs) -> Callable:
    """`-o/--output` (also accepting --out and --out-dir) stored in parameter `dest`."""
    return click.option("-o", "--output", *OUTPUT_ALIASES, dest, cls=AliasedOption, hidden_aliases=OUTPUT_ALIASES,
                        help=help, **kwargs)


def repeated_option(command: click.Command, args: list[str], ctx: click.Context | None) -> str | None:
    """The message for an option `args` give twice that takes one value (click keeps the last silently: `--calib a
    --calib b` calibrates on b alone), or for both spellings of an on/off flag (`--sym --no-sym`); None when there is
    none. Options documented as repeatable (multiple=True), counters and plain flags are left alone; a group's
    subcommand is followed into (`qid measure ...`). click's own parser reads `args` (so -o/--out, --x=v, -oX and
    `--` mean what they mean to click); a parse error is left to the real parse to report."""
    check_parser()
    own = click.Context(command, parent=ctx, resilient_parsing=True)
    seen: dict[int, tuple[str, str | None]] = {}
    given, rest = _given(command, args, own)
    for param, spelling, value in given:
        value = " ".join(value) if isinstance(value, tuple) else value
        if id(param) in seen:
            first, before = seen[id(param)]
            if not param.is_flag:
                what = (f"{first} is given twice" if first == spelling
                        else f"{first} and {spelling} (one option) are both given")
                return f"{what} ({before!r}, then {value!r}) and only one value is read; give it once"
            if (first in param.secondary_opts) != (spelling in param.secondary_opts):
                return f"{first} and {spelling} are both given; give one of them"
        seen[id(param)] = (spelling, value)
    if isinstance(command, click.Group) and rest:
        sub = command.get_command(own, rest[0])
        return repeated_option(sub, rest[1:], own) if sub is not None else None
    return None


def _given(command: click.Command, args: list[str], own: click.Context) -> tuple[list[tuple], list[str]]:
    """(option, spelling, value) of each single-value option or on/off flag in `args`, in their order, and what is
    left for a subcommand."""
    # Command.make_parser's parser is click's (8.0 to 8.5; deprecated since 8.2, to go in 9.0): check_parser
    # refuses a click whose parser does not answer as it does here, rather than let repeats through unseen
    parser = command.make_parser(own)
    spelled: dict[int, tuple[click.Option, click.Option, str]] = {}
    for param in command.get_params(own):
        if not isinstance(param, click.Option) or param.multiple or param.count or (param.is_flag and
                                                                                  not param.secondary_opts):
            continue
        for spelling in (*param.opts, *param.secondary_opts):
            # each spelling registered on its own (its values under its own name), with a copy of the option as the
            # parse's `obj`: click's order list, one entry per occurrence, then says which spelling came where
            stand_in = copy.copy(param)
            spelled[id(stand_in)] = (stand_in, param, spelling)
            parser.add_option(obj=stand_in, opts=[spelling], dest=spelling, nargs=param.nargs,
                              action="append_const" if param.is_flag else "append")
    values, rest, order = parser.parse_args(list(args))
    values_of = {spelling: iter(values.get(spelling, ())) for _, _, spelling in spelled.values()}
    given = [(param, spelling, next(values_of[spelling]))
             for _, param, spelling in (spelled[id(item)] for item in order if id(item) in spelled)]
    return given, rest


_PROBE = ["-o", "a", "x", "--out=b", "--on", "-ob", "--off", "--", "--on"]
_PROBE_ANSWER = ([("-o", "a"), ("--out", "b"), ("--on", None), ("-o", "b"), ("--off", None)], ["x", "--on"])


@functools.cache
def _parser_answers() -> bool:
    probe = click.Command("probe", params=[click.Option(["-o", "--out"]), click.Option(["--on/--off"])])
    try:
        given, rest = _given(probe, list(_PROBE), click.Context(probe, resilient_parsing=True))
        return ([(spelling, value) for _, spelling, value in given], rest) == _PROBE_ANSWER
    except Exception:  # noqa: BLE001 - any failure of the probe means the same: this click's parser is not the one read
        return False


def check_parser() -> None:
    """Refuse, in one line, a click whose option parser no longer reads arguments as repeated_option needs."""
    if not _parser_answers():
        from importlib.metadata import version

        from quantkit.errors import QuantkitError

        raise QuantkitError(
            f"click {version('click')} does not parse options as click 8.4 and 8.5 do (Command.make_parser), which "
            "quantkit needs to refuse an option given twice; install click>=8.4.2,<9 (pip install 'click>=8.4.2,<9')")


class Bounded(click.ParamType):
    """A number option checked as click reads it, before the command's body runs, against its entry of
    quantkit.bounds.BOUNDS (the API's checks read the same). The refusal is one line naming the option, exit 2, as
    every usage error."""

    def __init__(self, bound: Bound) -> None:
        self.bound = bound
        self.name = "integer" if bound.integer else "float"

    def convert(self, value, param: click.Parameter | None, ctx: click.Context | None):
        """`value` (a string from the command line, or the default) as a checked int or float."""
        import math

        b = self.bound
        number = (click.INT if b.integer else click.FLOAT).convert(value, param, ctx)
        flag = param.opts[0] if param is not None and getattr(param, "opts", None) else "the value"
        shown = number if b.integer else f"{number:g}"
        if not b.integer and not math.isfinite(number):
            raise click.UsageError(f"{flag} must be a finite number, got {shown}", ctx)
        if number in b.allowed:
            return number
        allowed = ", ".join(map(str, b.allowed))
        if b.allowed and b.least is None:
            raise click.UsageError(f"{flag} must be one of {allowed}, got {shown}", ctx)
        least = f"{allowed} or at least" if b.allowed else "at least"
        for broken, words in ((b.least is not None and number < b.least, f"{least} {_shown(b.least)}"),
                              (b.above is not None and number <= b.above, f"above {_shown(b.above)}"),
                              (b.below is not None and number >= b.below, f"below {_shown(b.below)}"),
                              (b.most is not None and number > b.most, f"at most {_shown(b.most)}")):
            if broken:
                raise click.UsageError(f"{flag} must be {words}, got {shown}", ctx)
        return number


def _shown(bound: float) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


def bounded(name: str) -> Bounded:
    """The option type of the number option `name` (its entry of quantkit.bounds.BOUNDS)."""
    return Bounded(BOUNDS[name])
