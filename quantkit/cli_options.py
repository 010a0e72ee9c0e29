"""Click options every command spells the same way (one output option, old spellings kept as hidden aliases)."""

from __future__ import annotations

from collections.abc import Callable

import click

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


def repeated_option(command: click.Command, args: list[str], ctx: click.Context) -> str | None:
    """The message for an option `args` give twice that takes one value (click keeps the last silently: `--calib a
    --calib b` calibrates on b alone), or for both spellings of an on/off flag (`--sym --no-sym`); None when there is
    none. Options documented as repeatable (multiple=True) and counters are left alone; a group's subcommand is
    followed into (`qid measure ...`)."""
    spelled: dict[str, click.Option] = {}
    for param in command.params:
        if isinstance(param, click.Option):
            spelled.update(dict.fromkeys([*param.opts, *param.secondary_opts], param))
    seen: dict[int, tuple[str, str | None]] = {}
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if token == "--":
            return None
        name, value = token, None
        if token.startswith("--") and "=" in token:
            name, value = token.split("=", 1)
        elif token.startswith("-") and not token.startswith("--") and len(token) > 2 and token[:2] in spelled:
            name, value = token[:2], token[2:]
        param = spelled.get(name)
        if param is None:
            if not token.startswith("-") and isinstance(command, click.Group):
                sub = command.get_command(ctx, token)
                return repeated_option(sub, args[i:], ctx) if sub is not None else None
            continue
        takes_value = not param.is_flag and not param.count
        if takes_value and value is None and param.nargs >= 1:
            value = " ".join(args[i:i + param.nargs])
            i += param.nargs
        if param.multiple or param.count:
            continue
        if id(param) in seen:
            first, before = seen[id(param)]
            if takes_value:
                what = f"{first} is given twice" if first == name else f"{first} and {name} (one option) are both given"
                return f"{what} ({before!r}, then {value!r}) and only one value is read; give it once"
            if (first in param.secondary_opts) != (name in param.secondary_opts):
                return f"{first} and {name} are both given; give one of them"
        seen[id(param)] = (name, value)
    return None
