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
