"""User-facing errors: the CLI prints their message on one line and exits with code 2."""

import signal


class QuantkitError(Exception):
    """Bad input or an unusable model/data: the message says what was wrong and what to do."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: unwinds like Ctrl-C (temporary outputs are removed on the way out)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def closest(given: object, choices) -> str | None:
    """The choice nearest to `given` (case first, then spelling), or None when nothing is near."""
    import difflib

    names = [str(c) for c in choices]
    text = str(given)
    folded = [c for c in names if c.lower() == text.lower()]
    if folded:
        return folded[0]
    near = difflib.get_close_matches(text, names, n=1, cutoff=0.6)
    return near[0] if near else None


def unknown_choice(what: str, given: object, choices) -> QuantkitError:
    """The error for a name that is not one of `choices`: the nearest valid one first, then all of them."""
    near = closest(given, choices)
    hint = f"did you mean {near!r}? " if near is not None else ""
    return QuantkitError(f"unknown {what} {given!r}; {hint}choose from {', '.join(map(str, choices))}")


def first_line(err: BaseException) -> str:
    """The error's message on one line: libraries put the real reason on a second line often enough."""
    text = " ".join(str(err).split())
    if not text:
        return type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."
