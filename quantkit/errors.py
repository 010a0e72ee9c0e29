"""User-facing errors: the CLI prints their message on one line and exits with code 2."""

import signal


class QuantkitError(Exception):
    """Bad input or an unusable model/data: the message says what was wrong and what to do."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: unwinds like Ctrl-C (temporary outputs are removed on the way out)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)
