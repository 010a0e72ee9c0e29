"""The tidy QiD table: one CSV row per (checkpoint, method, bits) cell, appended as cells finish.

Columns (COLUMNS): model (path or hub id[@revision]), N (non-embedding parameters), params
(all parameters), D (training tokens), step, bits, method, group_size, loss_fp, loss_q,
qid = loss_q - loss_fp (nats/token), eval_tokens, seconds, eval_text, error (empty unless the
cell failed; then the numeric result columns are empty), qid_se (standard error of qid from a
paired bootstrap over the eval windows: FP and quantized losses resampled on the same windows),
eval_windows (how many windows the bootstrap resampled). Tables written before qid_se existed
(LEGACY_COLUMNS) still read, and appending to one keeps its columns.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from quantkit.errors import QuantkitError

COLUMNS = (
    "model", "N", "params", "D", "step", "bits", "method", "group_size",
    "loss_fp", "loss_q", "qid", "eval_tokens", "seconds", "eval_text", "error", "qid_se", "eval_windows",
)
LEGACY_COLUMNS = COLUMNS[: COLUMNS.index("error") + 1]
# Columns a fit needs; everything else is informational.
FIT_COLUMNS = ("N", "D", "bits", "method", "qid")
INT_COLUMNS = ("N", "params", "D", "step", "bits", "group_size", "eval_tokens", "eval_windows")
FLOAT_COLUMNS = ("loss_fp", "loss_q", "qid", "seconds", "qid_se")
KEY_COLUMNS = ("model", "method", "bits", "group_size", "eval_text")


@dataclass
class QidTable:
    """Parsed rows (dicts of typed values) plus rows that failed at measurement time; source names the file."""

    rows: list[dict] = field(default_factory=list)
    error_rows: list[dict] = field(default_factory=list)
    dropped_partial_line: bool = False
    source: str = "CSV"

    def keys(self) -> set[tuple]:
        """Resume keys of every recorded cell, failed ones included."""
        return {cell_key(r) for r in self.rows + self.error_rows}

    def methods(self, method: str | None, doing: str) -> list[str]:
        """The methods whose rows to `doing` (fit, plot): every method measured, or `method`, which must be one."""
        methods = sorted({r["method"] for r in self.rows})
        if method is not None:
            if method not in methods:
                raise QuantkitError(f"no rows for method {method!r}; the table has: {', '.join(methods) or 'none'}")
            return [method]
        if not methods:
            raise QuantkitError(f"the table holds no successful measurements to {doing}")
        return methods


    def check_one_eval_text(self, rows: list[dict]) -> None:
        """`rows` were measured on one eval text (rows without the column count as any): QiD on different texts is
        not comparable, and one law fitted to both would be no law of either."""
        texts: dict[str, object] = {}
        for r in rows:
            if r.get("eval_text") not in (None, ""):
                texts.setdefault(str(r["eval_text"]), r.get("_line"))
        if len(texts) > 1:
            (a, line_a), (b, line_b) = list(texts.items())[:2]
            raise QuantkitError(f"{self.source}: the rows were measured on {len(texts)} eval texts ({a!r} at line "
                                f"{line_a}, {b!r} at line {line_b}); QiD on different texts is not comparable, so one law "
                                "cannot fit them together: fit each text's rows apart (one CSV per --eval) or measure "
                                "on one text")


def cell_key(row: dict) -> tuple:
    """The identity of one measured cell (what resuming compares)."""
    return (str(row["model"]), str(row["method"]), int(row["bits"]), int(row["group_size"]), str(row["eval_text"]))


def _parse_number(value: str, column: str, line: int, as_int: bool) -> float | int | None:
    """Parse one numeric cell; empty means missing; anything else non-numeric is an error."""
    text = value.strip()
    if text == "":
        return None
    try:
        number = float(text)
    except ValueError:
        raise QuantkitError(f"line {line}, column {column!r}: {value!r} is not a number; fix or delete that row") from None
    if not math.isfinite(number) and column != "seconds":
        raise QuantkitError(f"line {line}, column {column!r}: {value!r} is not finite; fix or delete that row")
    if as_int:
        if number != int(number):
            raise QuantkitError(f"line {line}, column {column!r}: {value!r} is not an integer; fix or delete that row")
        return int(number)
    return number


# Ranges a measured cell's numbers must lie in: a value outside is a corrupt or hand-edited row, which a fit
# would otherwise drop quietly (QiD <= 0 is different: a real measurement in the noise, reported as excluded).
ROW_RANGES = {
    # N and D up to the ranges where the laws mean anything (quantkit.qid.laws.PLAUSIBLE, as predict refuses)
    "N": (1, 1e15, "a parameter count"), "params": (1, 1e15, "a parameter count"), "D": (1, 1e17, "a token count"),
    "step": (0, None, "a training step"), "bits": (1, 16, "a bit width"), "eval_tokens": (1, None, "a token count"),
    "eval_windows": (1, None, "a window count"), "loss_fp": (0, None, "a loss in nats"),
    "loss_q": (0, None, "a loss in nats"), "qid_se": (0, None, "a standard error"), "seconds": (0, None, "a duration"),
}


def check_row(row: dict, where: str) -> None:
    """Every number of a measured cell in its range (ROW_RANGES; group_size positive or -1), else a QuantkitError
    naming the line and column."""
    for column, (low, high, what) in ROW_RANGES.items():
        value = row.get(column)
        if value is None or not math.isfinite(value):
            continue
        if value < low or (high is not None and value > high):
            span = f"at least {low:g}" if high is None else f"between {low:g} and {high:g}"
            raise QuantkitError(f"{where}, column {column!r}: {value!r} is not {what} ({span}); fix or delete that row")
    qid, loss_q, loss_fp = row.get("qid"), row.get("loss_q"), row.get("loss_fp")
    if all(v is not None and math.isfinite(v) for v in (qid, loss_q, loss_fp)) and \
            abs(qid - (loss_q - loss_fp)) > 1e-3 * max(1.0, abs(loss_q)):
        raise QuantkitError(f"{where}, column 'qid': {qid!r} is not loss_q - loss_fp ({loss_q!r} - {loss_fp!r}); the row "
                            "was edited or mixed up: fix or delete it")
    group = row.get("group_size")
    if group is not None and group != -1 and group < 1:
        raise QuantkitError(f"{where}, column 'group_size': {group!r} is not a group size (positive, or -1 per channel); "
                            "fix or delete that row")


LOG_COLUMNS = ("qid", "N", "D", "bits")  # a law in log space takes the logarithm of each


def check_points(points: list[dict]) -> None:
    """A QuantkitError naming the first point (its CSV line, else its index) whose QiD, N, D or bits is not a number
    above 0: a law in log space takes the logarithm of each (fit_table leaves QiD <= 0 rows out and lists them;
    the point-level fits are given points to fit, all of them)."""
    bad = [p for p in points if not in_log_space(p)]
    if not bad:
        return
    p = bad[0]
    column = next(c for c in LOG_COLUMNS if not positive(p.get(c)))
    where = f"line {p['_line']}" if p.get("_line") else f"point {points.index(p)}"
    more = f" ({len(bad)} such points)" if len(bad) > 1 else ""
    raise QuantkitError(f"{where}: {column} {p.get(column)!r} is not > 0{more}; a law in log space needs QiD, N, D and "
                        "bits > 0: leave such points out (fit_table leaves QiD <= 0 rows out and lists them)")


def positive(value: object) -> bool:
    """A finite number above 0."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def in_log_space(row: dict) -> bool:
    """Whether every column a law takes the logarithm of (LOG_COLUMNS) is a finite number above 0."""
    return all(positive(row.get(c)) for c in LOG_COLUMNS)


def split_points(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(points with QiD > 0, excluded entries for QiD <= 0 with line/model/bits/qid)."""
    kept, excluded = [], []
    for r in rows:
        if in_log_space(r):
            kept.append(r)
        else:
            excluded.append({"line": r.get("_line"), "model": r.get("model"), "method": r.get("method"),
                             "bits": r["bits"], "N": r["N"], "D": r["D"], "qid": r["qid"], "qid_se": r.get("qid_se"),
                             "reason": "qid <= 0 (no logarithm)" if not positive(r["qid"]) else "non-positive N, D or bits"})
    return kept, excluded


def _read_csv(lines: list[str], source: str) -> Iterator[list[str]]:
    """csv.reader's rows of `lines`, where what it cannot read (a field over its size limit, a NUL) is one
    QuantkitError naming the line rather than csv.Error's bare message."""
    reader = csv.reader(io.StringIO("".join(lines)))
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise QuantkitError(f"{source} line {reader.line_num} cannot be read as CSV ({err}); fix or delete that "
                                "row") from None
        yield values


def parse_table(text: str, source: str = "CSV", required: tuple[str, ...] = FIT_COLUMNS) -> QidTable:
    """Parse CSV text; a last line without its newline (an interrupted write) is dropped."""
    table = QidTable(source=source)
    text = text.removeprefix("\ufeff")  # a byte-order mark, as spreadsheets write "CSV UTF-8"
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        table.dropped_partial_line = True
    lines = [ln for ln in text.splitlines(keepends=True) if ln.strip() and not ln.startswith("#")]
    if not lines:
        raise QuantkitError(f"{source} is empty; measure a grid first with `quantkit qid measure`")
    reader = _read_csv(lines, source)
    header = [h.strip() for h in next(reader)]
    twice = sorted({h for h in header if header.count(h) > 1})
    if twice:
        raise QuantkitError(f"{source}'s header names column {twice[0]!r} twice; a QiD table names each column once "
                            "(as `quantkit qid measure` writes it): delete one of them")
    missing = [c for c in required if c not in header]
    if missing:
        raise QuantkitError(
            f"{source} lacks column(s) {', '.join(missing)}; a QiD table needs {', '.join(required)} "
            "(as written by `quantkit qid measure`)"
        )
    for number, values in enumerate(reader, start=2):
        if len(values) != len(header):
            raise QuantkitError(
                f"{source} line {number} has {len(values)} fields, the header has {len(header)}; fix or delete that row"
            )
        raw = dict(zip(header, values))
        row: dict = {}
        for column, value in raw.items():
            if column in INT_COLUMNS:
                row[column] = _parse_number(value, column, number, as_int=True)
            elif column in FLOAT_COLUMNS:
                row[column] = _parse_number(value, column, number, as_int=False)
            else:
                row[column] = value
        row["_line"] = number
        if raw.get("error", "").strip():
            table.error_rows.append(row)
            continue
        empty = [c for c in required if row.get(c) in (None, "")]
        if empty:
            raise QuantkitError(f"{source} line {number} has no value for {', '.join(empty)}; fix or delete that row")
        check_row(row, f"{source} line {number}")
        table.rows.append(row)
    return table


def read_table(path: str | os.PathLike, required: tuple[str, ...] = FIT_COLUMNS) -> QidTable:
    """Read and validate a QiD CSV file."""
    p = Path(path)
    if not p.is_file():
        raise QuantkitError(f"QiD table {p} not found; give the CSV written by `quantkit qid measure`")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise QuantkitError(f"QiD table {p} is not UTF-8 text (byte {err.start}); give the CSV written by "
                            "`quantkit qid measure`") from None
    return parse_table(text, source=str(p), required=required)


def _format(value: object) -> str:
    """CSV text of one value: floats with full precision, None as empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


@contextlib.contextmanager
def locked_table(path: str | os.PathLike) -> Iterator[None]:
    """Hold the QiD CSV `path` for one measuring run, from reading its finished cells to its last row: an flock on
    the file (made empty where missing, removed again if still empty at the end), or one QuantkitError. Two runs into
    one CSV both found a cell missing and both wrote it; a table counted twice skews the fit."""
    import fcntl

    from quantkit.fsutil import make_parents, remove_created

    path = Path(path)
    above = next((p for p in path.parents if p.exists()), None)
    if path.is_dir() or (above is not None and not above.is_dir()):
        yield  # the output checks refuse the path
        return
    # the folders too, before the lock: two runs into a new folder each found no file to lock and both measured
    created = make_parents(path.parent)
    made = not path.exists()
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    except BaseException:
        remove_created(created)
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise QuantkitError(f"{path} is being written by another quantkit qid measure; wait for it to end (a rerun "
                            "then measures only the cells still missing), or write to another --output") from None
    try:
        yield
    finally:
        if made and os.fstat(fd).st_size == 0:
            path.unlink(missing_ok=True)
        os.close(fd)
        remove_created(created)  # those still empty: a run that wrote no row leaves no folder


class TableWriter:
    """Append rows to a QiD CSV, one flushed and fsynced line per cell (resumable)."""

    def __init__(self, path: str | os.PathLike):
        """Open `path` for appending: cut a partial last line, check the header, or write one."""
        self.path = Path(path)
        # what this writer makes (folders, the file) and the length it found: what discard() takes back
        self._made = [d for d in (self.path.parent, *self.path.parent.parents) if not d.exists()]  # deepest first
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._new = not self.path.exists()
        existing = b"" if self._new else self.path.read_bytes()
        if existing and not existing.endswith(b"\n"):
            with open(self.path, "r+b") as fh:
                fh.truncate(existing.rfind(b"\n") + 1)
            existing = existing[: existing.rfind(b"\n") + 1]
        self._start = len(existing)
        header_lines = [ln for ln in existing.decode("utf-8-sig").splitlines() if ln.strip() and not ln.startswith("#")]
        self.columns = COLUMNS
        if header_lines:
            header = tuple(h.strip() for h in next(csv.reader([header_lines[0]])))
            if header not in (COLUMNS, LEGACY_COLUMNS):
                raise QuantkitError(
                    f"{self.path} has columns {list(header)}, not the QiD table's {list(COLUMNS)}; use a new --output file"
                )
            self.columns = header
        self._fh = open(self.path, "a", encoding="utf-8", newline="")
        self._writer = csv.writer(self._fh, lineterminator="\n")
        if not header_lines:
            self._writer.writerow(COLUMNS)
            self._flush()

    def _flush(self) -> None:
        """Push the written line to disk."""
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def write(self, row: dict) -> None:
        """Append one cell (missing columns empty)."""
        self._writer.writerow([_format(row.get(c)) for c in self.columns])
        self._flush()

    def close(self) -> None:
        """Close the file."""
        self._fh.close()

    def discard(self) -> None:
        """Close, and take back every line this writer wrote (the file, and folders it made, removed): a run refused
        part way leaves the table as it found it."""
        self.close()
        if self._new:
            self.path.unlink(missing_ok=True)
            for folder in self._made:
                folder.rmdir()
        else:
            with open(self.path, "r+b") as fh:
                fh.truncate(self._start)

    def __enter__(self) -> TableWriter:
        """Context-manager entry."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Context-manager exit: close."""
        self.close()
