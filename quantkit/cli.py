"""The `quantkit` command line: one click group, subcommands registered from each room."""

from __future__ import annotations

import importlib
import signal
import sys

import click

from quantkit.errors import QuantkitError

# (module, attribute) of each subcommand; imported lazily so `quantkit --help` stays fast.
SUBCOMMANDS = {
    "calibrate": ("quantkit.calibrate", "calibrate"),
    "importance": ("quantkit.importance_cli", "importance"),
    "eval": ("quantkit.eval.cli", "eval_cmd"),
    "export": ("quantkit.export.cli", "export"),
    "qid": ("quantkit.qid.cli", "qid"),
    "demo": ("quantkit.demo.cli", "demo"),
}


class QuantkitGroup(click.Group):
    """Lazy subcommands; a QuantkitError anywhere becomes one line on stderr and exit code 2."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name in SUBCOMMANDS if self._load(name) is not None)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return self._load(name)

    @staticmethod
    def _load(name: str) -> click.Command | None:
        if name not in SUBCOMMANDS:
            return None
        module, attr = SUBCOMMANDS[name]
        try:
            return getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as err:
            if err.name and module.startswith(err.name):
                return None  # that room is not built yet
            raise

    def invoke(self, ctx: click.Context):
        # SIGTERM becomes SystemExit so that atomic outputs remove their temporary directories.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        try:
            return super().invoke(ctx)
        except QuantkitError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


@click.group(cls=QuantkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="quantkit")
def main() -> None:
    """quantkit: post-training quantization (TLQ, GPTQ, RTN) and QiD scaling laws."""


if __name__ == "__main__":
    main()
