"""User-facing errors: the CLI prints their message on one line and exits with code 2."""

import errno
import os
import re
import signal
import sys


class QuantkitError(Exception):
    """Bad input or an unusable model/data: the message says what was wrong and what to do."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: unwinds like Ctrl-C (temporary outputs are removed on the way out)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def check_tqdm_environment() -> None:
    """Raise QuantkitError naming a TQDM_* environment variable tqdm cannot read: tqdm converts each into its own
    default's type as it is imported (TQDM_MININTERVAL=abc: ValueError), and torch imports it, so every command and
    every API call that needs torch would fail inside that import."""
    names = sorted(k for k in os.environ if k.startswith("TQDM_"))
    if not names:
        return  # nothing to read: no import here (`quantkit --help` and `import quantkit` stay fast)
    try:
        import tqdm.std  # noqa: F401 - the import is the check
    except (ValueError, TypeError) as err:
        bad = [n for n in names if repr(os.environ[n]) in str(err)] or names
        raise QuantkitError(f"tqdm cannot read the environment variable "
                            f"{', '.join(f'{n}={os.environ[n]!r}' for n in bad)} ({err}); correct or unset it") from None


def closest(given: object, choices) -> str | None:
    """The choice nearest to `given` (case first, then the one choice that has it as a word: tokenizer ->
    tokenizer_or_processor, then spelling), or None when nothing is near."""
    import difflib

    names = [str(c) for c in choices]
    text = str(given)
    folded = [c for c in names if c.lower() == text.lower()]
    if folded:
        return folded[0]
    worded = [c for c in names if text.lower() in c.lower().split("_")]
    if len(worded) == 1:
        return worded[0]
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


# writes the environment stops (errno -> what to do): one line naming the output, not a library's error
STOPPED_WRITES = {
    errno.ENOSPC: "the disk is full; free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is exhausted; free some space or write elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.EFBIG: "a file would grow past the size this process may write (ulimit -f) or the file system holds; raise "
                 "the limit or write elsewhere",
    errno.ENAMETOOLONG: "a path there is too long for the file system; choose a shorter one",
}


def stopped_write(err: BaseException, out: os.PathLike, tmp: os.PathLike) -> QuantkitError | None:
    """One line for a write into `tmp` (the temporary twin of `out`) that the environment stopped, where `err` is
    one: an OSError, or what safetensors ("(os error 28)") and torch.save (a short write) raise for it; else None."""
    if not isinstance(err, Exception) or isinstance(err, QuantkitError):
        return None
    cause, filename = None, None
    for seen in (err, err.__cause__, err.__context__):
        if isinstance(seen, OSError) and seen.errno in STOPPED_WRITES:
            cause, filename = STOPPED_WRITES[seen.errno], seen.filename
            break
    code = re.search(r"\(os error (\d+)\)", str(err))
    if cause is None and code is not None:
        cause = STOPPED_WRITES.get(int(code.group(1)))
    if cause is None and "unexpected pos" in str(err):  # torch.save's writer: fewer bytes written than given
        cause = "the write stopped short (a full disk or a file-size limit); free some space or write elsewhere"
    if cause is None:
        return None
    where = out if filename is None or os.fspath(filename).startswith(os.fspath(tmp)) else filename
    return QuantkitError(f"cannot write {where}: {cause}")


def checked_call(target):
    """`target` (a function, or a class, whose __init__ is wrapped) with the shape of each call checked first: an
    unknown keyword, a missing argument or a positional one too many is one QuantkitError naming it (with the nearest
    known name), as the API's other refusals are, not Python's TypeError."""
    import functools
    import inspect

    func = target.__init__ if isinstance(target, type) else target
    signature = inspect.signature(func)
    loose = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    known = [n for n, p in signature.parameters.items() if n != "self" and p.kind not in loose]
    name = target.__name__

    @functools.wraps(func)
    def call(*args, **kwargs):
        try:
            signature.bind(*args, **kwargs)
        except TypeError as err:
            unknown = next((k for k in kwargs if k not in signature.parameters), None)
            if unknown is not None:
                near = closest(unknown, known)
                hint = f"did you mean {near!r}? " if near is not None else ""
                raise QuantkitError(f"{name}() has no argument {unknown!r}; {hint}it takes {', '.join(known)}") from None
            raise QuantkitError(f"{name}(): {first_line(err)}; it takes {', '.join(known)}") from None
        return func(*args, **kwargs)

    if isinstance(target, type):
        target.__init__ = call
        return target
    return call


# ---------------------------------------------------------------- arguments checked at the API's boundary
# The CLI's option types make these checks for it; the Python API gets the same one-line errors instead of a
# TypeError from deep inside. Each names the argument as Python spells it and, where there is one, its flag.


def _named(name: str, flag: str | None) -> str:
    return f"{name} ({flag})" if flag else name


def short_repr(value: object) -> str:
    """A value for a one-line message: its repr and type where the repr is short and on one line, else its type."""
    text = repr(value)
    return f"{text} ({type(value).__name__})" if len(text) <= 80 and "\n" not in text else f"a {type(value).__name__}"


_kind = short_repr


def one_line(value: object, limit: int = 80) -> str:
    """A user's value (a path, a name) inside a one-line message: as typed where it is one short line, else its repr
    cut to `limit` characters with its length: a text given where a path belongs (a YAML or Jinja text, a line
    break in a name) would otherwise spread the message over as many lines as it has."""
    text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    if len(text) <= limit and "".join(text.splitlines()) == text:  # every line break str.splitlines knows
        return text
    shown = repr(text)
    return shown if len(shown) <= limit else f"{shown[:limit - 3]}... ({len(text)} characters)"


# the largest count or size taken (expect_int's bound, and --output-side's: see expect_int for why)
MOST_COUNT = 2**31 - 1


def expect_int(name: str, value: object, *, least: int | None = None, allowed: tuple = (), optional: bool = False,
               flag: str | None = None, most: int = MOST_COUNT) -> int | None:
    """`value` if it is an int (not a bool, not a float), at least `least` or one of `allowed`, and at most `most`
    (counts and sizes beyond 2**31 overflow torch's and the samplers' integers long before they mean anything)."""
    import numbers

    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise QuantkitError(f"{_named(name, flag)} must be an integer, got {_kind(value)}")
    value = int(value)
    if allowed and value not in allowed and (least is None or value < least):
        span = ", ".join(map(str, allowed)) + (f" or at least {least}" if least is not None else "")
        raise QuantkitError(f"{_named(name, flag)} must be {span}, got {value}")
    if not allowed and least is not None and value < least:
        raise QuantkitError(f"{_named(name, flag)} must be at least {least}, got {value}")
    if value > most:
        raise QuantkitError(f"{_named(name, flag)} must be at most {most}, got {value}")
    return value


def expect_number(name: str, value: object, *, least: float | None = None, below: float | None = None,
                  above: float | None = None, most: float | None = None, optional: bool = False,
                  flag: str | None = None) -> float | None:
    """`value` as a float if it is a finite real number (not a bool) with least <= value, above < value,
    value < below and value <= most where those are given."""
    import math
    import numbers

    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise QuantkitError(f"{_named(name, flag)} must be a finite number, got {_kind(value)}")
    value = float(value)
    if (least is not None and value < least) or (above is not None and value <= above) or \
            (below is not None and value >= below) or (most is not None and value > most):
        bounds = [f">= {least:g}" if least is not None else None, f"> {above:g}" if above is not None else None,
                  f"< {below:g}" if below is not None else None, f"<= {most:g}" if most is not None else None]
        raise QuantkitError(f"{_named(name, flag)} must be {' and '.join(b for b in bounds if b)}, got {value:g}")
    return value


def expect_bool(name: str, value: object, *, optional: bool = False, flag: str | None = None) -> bool | None:
    """`value` if it is True or False (a numpy bool too, what `array > 0` gives; None too where optional): no
    truthy strings or numbers."""
    if value is None and optional:
        return None
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):
        return bool(value)
    if not isinstance(value, bool):
        raise QuantkitError(f"{_named(name, flag)} must be True or False, got {_kind(value)}")
    return value


def expect_choice(name: str, value: object, choices, *, optional: bool = False, flag: str | None = None):
    """`value` if it is one of `choices` exactly (case included); else the nearest one is offered."""
    import numbers

    if value is None and optional:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)  # a numpy integer is an integer: bits=np.int64(4) is bits=4
    if isinstance(value, bool) or not any(value == c and type(value) is type(c) for c in choices):
        near = closest(value, choices) if isinstance(value, str) else None
        hint = f"did you mean {next(c for c in choices if str(c) == near)!r}? " if near is not None else ""
        got = repr(value) if any(type(value) is type(c) for c in choices) else _kind(value)
        raise QuantkitError(f"{_named(name, flag)} must be one of {', '.join(map(repr, choices))}; {hint}got {got}")
    return value


def special_file(path: str | os.PathLike) -> str | None:
    """What `path` is where it names a named pipe, a socket or a device, else None (missing, a file, a folder): a
    reader of a pipe waits for a writer forever, and a device is endless or empty, so no path of quantkit's takes one."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # missing, a name too long, a NUL byte: the path's own checks say which
        return None
    kinds = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    return next((what for test, what in kinds if test(mode)), None)


def expect_utf8(path: str | os.PathLike, what: str,
                why: str = "safetensors and the tokenizers cannot open or write") -> None:
    """One QuantkitError where Python holds `path` with lone surrogates, which the Rust libraries (safetensors, the
    tokenizers) cannot take: bytes that are not UTF-8 (such a model folder failed as "truncated or corrupt", such an
    output after the work), or UTF-8 read under an ASCII locale (LC_ALL=C). Files Python reads take any name."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
        return
    except UnicodeEncodeError:
        pass
    try:
        os.fsencode(text).decode("utf-8")
    except UnicodeDecodeError:
        raise QuantkitError(f"{what} {os.fsencode(text)!r} holds bytes that are not UTF-8, which {why}; rename it, "
                            "or link to it under a UTF-8 name") from None
    # still needed on Python 3.11: its C-locale coercion and UTF-8 mode (PEP 538/540) make LC_ALL=C read names as
    # UTF-8, but with both off (PYTHONCOERCECLOCALE=0 PYTHONUTF8=0) a name holds surrogates, which safetensors writes
    # (a path) and the tokenizers' save does not ('surrogates not allowed', measured with tokenizers 0.23)
    raise QuantkitError(f"{what} {os.fsencode(text)!r} is UTF-8, but this process reads names as ASCII (file system "
                        f"encoding {sys.getfilesystemencoding()}: LC_ALL=C with Python's UTF-8 mode off), and so {why}; "
                        "run with a UTF-8 locale (LC_ALL=C.UTF-8) or PYTHONUTF8=1")


def special_file_problem(path: str | os.PathLike) -> str | None:
    """The message for a `path` that names a named pipe, socket or device, else None (the CLI's and the API's own)."""
    kind = special_file(path)
    if kind is None:
        return None
    return (f"{os.fspath(path)} is {kind}, no regular file or folder (a reader of a pipe waits for a writer forever); "
            "give a regular file")


def refuse_special_in(folder: str | os.PathLike, what: str) -> None:
    """One QuantkitError where an entry of `folder` (its own, not those below) is a named pipe, socket or device: the
    readers of a model or export folder pass over what is no regular file (transformers' tokenizer_config.json and
    generation_config.json lookups), so such a file was ignored without a word, or blocked the one reader opening it."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:  # missing, or no folder: the folder's own checks say which
        return
    for name in names:
        problem = special_file_problem(os.path.join(folder, name))
        if problem is not None:
            raise QuantkitError(f"{what}: {problem}")


def refuse_special(path: str | os.PathLike, what: str) -> None:
    """One QuantkitError where `path` (named `what` in the message) is a named pipe, socket or device."""
    problem = special_file_problem(path)
    if problem is not None:
        raise QuantkitError(f"{what} {problem}")


def expect_path(name: str, value: object, *, optional: bool = False, flag: str | None = None) -> str | None:
    """`value` as a str if it is a non-empty str or os.PathLike that names no pipe, socket or device."""
    if value is None and optional:
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise QuantkitError(f"{_named(name, flag)} must be a path (str or os.PathLike), got {_kind(value)}")
    if "\0" in str(os.fspath(value)):
        raise QuantkitError(f"{_named(name, flag)} holds a NUL byte, which no file name can: {os.fspath(value)!r}")
    refuse_special(value, _named(name, flag))
    try:
        os.stat(value)
    except OSError as err:  # pathlib's is_file() and exists() raise this one, where they answer False for the rest
        if err.errno == errno.ENAMETOOLONG:
            raise QuantkitError(f"{_named(name, flag)} {one_line(value)}: the path or "
                                "a name in it is too long for the file system; choose a shorter name") from None
    return os.fspath(value)


def expect_names(what: str, given, known) -> None:
    """Every name in `given` is one of `known`; else one error for the first unknown one, with the nearest."""
    known = sorted(known)
    for name in given:
        if name not in known:
            near = closest(name, known)
            hint = f"did you mean {near!r}? " if near is not None else ""
            raise QuantkitError(f"unknown {what} {name!r}; {hint}known: {', '.join(known)}")
