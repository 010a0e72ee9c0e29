"""Text sources: local .txt/.jsonl files, globs, directories, HF datasets, comma-separated lists.

Source syntax (a string, a Path, or a list of them):

- ``path/to/file.txt``: the whole file is one document.
- ``path/to/file.jsonl``: one JSON object per line with a string ``"text"`` field (or one JSON array of such
  objects). The records are recognised by their content, whatever the suffix: a ``.json`` or ``.txt`` file of
  such lines is read the same way, and chat (``"messages"``) or image-text (``"image"``) records are refused
  here (quantkit.data.calibration renders them when the file is the whole calibration source).
- ``path/to/dir``: every .txt/.jsonl file under it (recursively), in sorted path order; a
  directory written by ``datasets.Dataset.save_to_disk`` is loaded as a dataset instead.
- ``corpora/*.txt``: a glob (``**`` recurses), matches in sorted order.
- ``hf:NAME[:CONFIG][:SPLIT][:FIELD]``: a Hugging Face dataset (needs ``quantkit[datasets]``);
  empty parts take the defaults (no config, split ``train``, field ``text``). NAME may be a
  local ``save_to_disk`` directory (then CONFIG must be empty).
- ``a.txt,b.jsonl,hf:x``: a comma-separated list of any of the above.

Parts: ``part="heldout"`` keeps the last 10% of each source file's (or dataset's) characters,
``part="train"`` the first 90%, ``part="all"`` everything; this is how the shared corpora are
split (benchmarks calibrate on "train" and evaluate on "heldout").
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from pathlib import Path

from quantkit.errors import QuantkitError, expect_path, one_line
from quantkit.fsutil import name_limit

PARTS = ("all", "train", "heldout")
HELDOUT_FRACTION = 0.1
TEXT_SUFFIXES = (".txt", ".jsonl")
_GLOB_CHARS = "*?["
_DATASET_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")

SourceLike = str | os.PathLike | Sequence[str | os.PathLike]


def check_part(part: str) -> str:
    """Return `part` if it is one of all/train/heldout, else raise QuantkitError."""
    if part not in PARTS:
        raise QuantkitError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    return part


def split_part(texts: Sequence[str], part: str = "all") -> list[str]:
    """Keep one part of a unit's documents: the first 90% (train) or last 10% (heldout) of its characters."""
    check_part(part)
    texts = list(texts)
    if part == "all":
        return texts
    total = sum(len(t) for t in texts)
    cut = total - int(round(total * HELDOUT_FRACTION))  # characters [0, cut) are train
    out: list[str] = []
    pos = 0
    for text in texts:
        start, end = pos, pos + len(text)
        pos = end
        if part == "train":
            piece = text[: max(0, min(end, cut) - start)]
        else:
            piece = text[max(0, cut - start):]
        if piece:
            out.append(piece)
    return out


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise QuantkitError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); convert it to UTF-8") from err
    except OSError as err:
        raise QuantkitError(f"cannot read {path}: {err.strerror}") from err


# The field that makes a JSON record one kind of calibration record (the first that a record holds).
RECORD_KINDS = (("image", "image-text"), ("messages", "chat"), ("text", "text"))
JSON_SUFFIXES = (".jsonl", ".json")


def _record_kind(record: object) -> str | None:
    if isinstance(record, dict):
        for field, kind in RECORD_KINDS:
            if field in record:
                return kind
    return None


def record_kind(path: str | os.PathLike) -> str | None:
    """The kind of records a file holds, whatever its suffix: "image-text", "chat" or "text" for JSON lines
    (or one JSON array) of objects with an "image", "messages" or "text" field, None for a file read as plain
    text. A .jsonl or .json file that holds no such records raises QuantkitError saying what it holds."""
    file = Path(path).expanduser()
    if not file.is_file():
        return None
    first = None
    with file.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip():
                first = line.strip()
                break
    kind = None
    if first is not None and first.startswith("{"):
        try:
            kind = _record_kind(json.loads(first))
        except json.JSONDecodeError:
            kind = None
    elif first is not None and first.startswith("["):
        try:
            items = json.loads(_read_text_file(file))
        except json.JSONDecodeError:
            items = None
        if items == []:
            raise QuantkitError(f"{file} holds an empty JSON array: no calibration records; give some")
        if isinstance(items, list):
            kind = _record_kind(items[0])
    if kind is None and file.suffix.lower() in JSON_SUFFIXES:
        if first is None:
            return None  # empty: the reader says so
        if file.suffix.lower() == ".jsonl" and first.startswith("{"):
            return "text"  # the reader names the line that lacks its "text" field
        raise QuantkitError(
            f"{file} holds no calibration records: give JSON lines (or one JSON array) of objects with a "
            "'text' string, a 'messages' list (chat) or an 'image' path (image-text)"
        )
    return kind


def check_characters(value: object, where: str, field: str = "") -> None:
    """Every string of a record is text: JSON (and Python) can hold a lone UTF-16 surrogate (an escaped "\\ud800"
    without its other half, common in scraped text), which is no character and which no tokenizer encodes."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise QuantkitError(
                f"{where}: {f'field {field!r} ' if field else ''}holds a lone UTF-16 surrogate "
                f"(\\u{ord(value[err.start]):04x}) at character {err.start}, half of a pair and no character; remove it "
                "or replace it (e.g. by U+FFFD)") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_characters(item, where, f"{field}.{key}" if field else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_characters(item, where, f"{field or 'item'}[{index}]")


def jsonl_records(path: str | Path) -> list[tuple[str, object]]:
    """("file:line", parsed value) for every non-blank line of a JSONL file, or ("file:item N", value) for each item
    of a file holding one JSON array; a line that is not JSON raises QuantkitError naming file:line."""
    path = Path(path).expanduser()  # ~/c.jsonl as a text file's ~ is read
    text = _read_text_file(path)
    records: list[tuple[str, object]] | None = None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            items = None
        if isinstance(items, list):
            records = [(f"{path}:item {number}", item) for number, item in enumerate(items, start=1)]
    if records is None:
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                records.append((where, json.loads(line)))
            except json.JSONDecodeError as err:
                raise QuantkitError(f"{where}: invalid JSON ({err.msg}); each line must be one JSON object") from err
    for where, record in records:
        check_characters(record, where)
    return records


def read_jsonl(path: Path, field: str = "text") -> list[str]:
    """The `field` strings of a JSONL file; a bad line raises QuantkitError naming file:line."""
    texts = []
    for where, record in jsonl_records(path):
        if not isinstance(record, dict) or field not in record:
            raise QuantkitError(f"{where}: no {field!r} field; each line must be an object with a {field!r} string")
        if "image" in record:  # read as text, its image would be dropped without a word
            raise QuantkitError(f"{where}: an image-text record among text records (the file's first record is "
                                "text); give each kind a file of its own (image-text data for a vision-language model)")
        value = record[field]
        if not isinstance(value, str):
            raise QuantkitError(f"{where}: field {field!r} is {type(value).__name__}, not a string")
        if not value.strip():
            raise QuantkitError(f"{where}: field {field!r} is empty; drop the record or give it text")
        texts.append(value)
    return texts


def text_file_kind(path: Path) -> str | None:
    """"text" for a file of {"text": ...} records (any suffix), None for plain text; a QuantkitError for chat or
    image-text records, which a text source cannot read."""
    kind = record_kind(path)
    if kind not in (None, "text"):
        raise QuantkitError(
            f"{path} holds {kind} records, not plain text: they are rendered as such only when the file is the whole "
            "calibration source (calibrate/importance --calib FILE); here give plain text or {\"text\": ...} records"
        )
    return kind


def _has_text(path: Path, kind: str | None) -> bool:
    """Whether a text file holds a non-blank character (read until the first), or a text-record file a non-blank text."""
    if kind == "text":
        return any(t.strip() for t in read_jsonl(path))
    try:
        with path.open(encoding="utf-8") as handle:
            while chunk := handle.read(1 << 20):
                if chunk.strip():
                    return True
    except UnicodeDecodeError:
        _read_text_file(path)  # names the byte where the file stops being UTF-8 (plan reads no further than this)
        return True
    return False


def check_text_source(source: SourceLike, part: str = "all") -> None:
    """Before any model loads: every local file of a text source holds text, not chat or image-text records
    (record_kind), and the source holds some text at all; an hf: dataset is on the hub (read later)."""
    from quantkit.models.files import check_hub

    found = remote = False
    for item in _split_sources(source):
        if item.startswith("hf:") and not Path(item[3:].split(":")[0]).expanduser().exists():
            check_hub(item[3:].split(":")[0], "dataset")  # an unreachable hub or a typo fails now, not after a load
        for label, files in _expand(item):
            if files is None:
                remote = True
                continue
            for file in files:
                has = _has_text(file, text_file_kind(file))
                if not has and len(files) == 1 and item == label:
                    raise QuantkitError(f"{label} is empty; give a file with text in it")
                found = found or has
    if not found and not remote:
        raise QuantkitError(f"no text found in {source!r} (part={part}); give a source with text in it")


def _read_file(path: Path) -> list[str]:
    """A file's documents: the "text" of each record of a text-record file (any suffix), else the whole file."""
    if text_file_kind(path) == "text":
        return read_jsonl(path)
    return [_read_text_file(path)]


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in _DATASET_MARKERS)


def _import_datasets():
    try:
        import datasets
    except ImportError as err:
        raise QuantkitError(
            "Hugging Face dataset sources need the `datasets` package; run `pip install quantkit[datasets]`"
        ) from err
    return datasets


def _dataset_texts(ds, field: str, where: str) -> list[str]:
    if field not in ds.column_names:
        raise QuantkitError(f"dataset {where} has no column {field!r} (columns: {', '.join(ds.column_names)}); name the text field as hf:NAME:CONFIG:SPLIT:FIELD")
    if "image" in ds.column_names and field != "image":  # hf: sources are read as text: the images would be dropped
        raise QuantkitError(f"dataset {where} has an 'image' column, and an hf: source is read as text only; give the "
                            "image-text records as a JSONL (or the Dataset as data= to quantize), or drop the column")
    texts = ds[field]
    for number, text in enumerate(texts, start=1):  # a None dropped without a word hides a broken column
        if not isinstance(text, str):
            raise QuantkitError(f"dataset {where}: row {number} of column {field!r} is {type(text).__name__}, not "
                                "text; drop or fill such rows (Dataset.filter) and save it again")
    # empty strings are a text dataset's paragraph breaks (wikitext's train split, docs/commands.md's example, holds
    # thousands): dropped, as a file's empty lines add nothing
    return [t for t in texts if t]


def _no_rows(local: Path) -> Path | None:
    """The save_to_disk folder (or split folder in it) that records no data file: datasets writes none for a
    Dataset of 0 rows and then fails to read its own folder with an IndexError."""
    for state in [local / "state.json", *local.glob("*/state.json")]:
        try:
            if json.loads(state.read_text(encoding="utf-8")).get("_data_files") == []:
                return state.parent
        except (OSError, ValueError, AttributeError):
            continue  # unreadable or not a mapping: load_from_disk says what is wrong with it
    return None


def _load_saved(datasets, local: Path):
    """The Dataset or DatasetDict of a save_to_disk folder; one that holds no rows or that datasets cannot read
    (a missing state.json, a cut arrow file) is one line naming the folder, not datasets' or pyarrow's traceback."""
    if (empty := _no_rows(local)) is not None:
        raise QuantkitError(f"dataset {empty} has no rows (save_to_disk wrote no data file); save a dataset with text in it")
    if not (local / "dataset_dict.json").is_file() and not (local / "state.json").is_file():
        raise QuantkitError(f"dataset folder {local} has no state.json (nor dataset_dict.json), so it is no complete "
                            "save_to_disk folder; save the dataset again with save_to_disk")
    try:
        return datasets.load_from_disk(str(local))
    except Exception as err:  # noqa: BLE001 - datasets and pyarrow raise many kinds for a damaged folder
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise QuantkitError(f"cannot read the dataset folder {local} ({type(err).__name__}: {msg}); a file in it is "
                            "damaged or missing: save the dataset again with save_to_disk") from err


def load_hf(spec: str) -> list[str]:
    """Texts of `hf:NAME[:CONFIG][:SPLIT][:FIELD]` (NAME may be a local save_to_disk directory)."""
    parts = spec[len("hf:"):].split(":") if spec.startswith("hf:") else [spec]
    if len(parts) > 4 or not parts[0]:
        raise QuantkitError(f"bad dataset source {spec!r}; use hf:NAME[:CONFIG][:SPLIT][:FIELD]")
    name, config, split, field = (parts + ["", "", "", ""])[:4]
    named_split, split = split, split or "train"
    field = field or "text"
    datasets = _import_datasets()
    local = Path(name).expanduser()
    if local.exists():
        if not _is_saved_dataset(local):
            raise QuantkitError(f"{local} is not a dataset saved with save_to_disk (no dataset_dict.json/state.json)")
        if config:
            raise QuantkitError(f"a local dataset directory takes no config; use hf:{name}::{split}:{field}")
        ds = _load_saved(datasets, local)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise QuantkitError(f"dataset {local} has no split {split!r} (splits: {', '.join(ds)})")
            ds = ds[split]
        elif named_split:
            raise QuantkitError(f"dataset {local} is one Dataset without splits, so it has no split {named_split!r}; "
                                f"drop the split: hf:{name}::")
    else:
        try:
            ds = datasets.load_dataset(name, config or None, split=split)
        except Exception as err:  # noqa: BLE001 - datasets raises many kinds; report the first line
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise QuantkitError(f"cannot load dataset {spec!r}: {msg}") from err
    return _dataset_texts(ds, field, spec)


def check_source_name(source: str | os.PathLike) -> None:
    """A source string that names nothing and no file system holds as a name (a line break, a part over the file
    system's name limit) is text given where a path belongs: one QuantkitError instead of an OSError from the first
    stat. A file whose name holds a line break exists all the same, and is read."""
    text = os.fspath(source)
    if os.path.lexists(text):
        expect_path("data source", text)  # a pipe or device, bytes that are not UTF-8: one line, not a hang
        return
    if "\n" in text or max(len(os.fsencode(part)) for part in text.split("/")) > name_limit(text):
        raise QuantkitError(f"data source {one_line(text)} is no file, directory, glob or "
                            "hf: dataset; to calibrate on a text itself, pass it in a list: data=[text]")


def _expand(source: str) -> list[tuple[str, list[Path] | None]]:
    """Resolve one source string to [(label, files)] (files None means a dataset spec)."""
    if source.startswith("hf:"):
        return [(source, None)]
    path = Path(source).expanduser()
    if path.is_file():
        return [(source, [path])]
    if path.is_dir():
        if _is_saved_dataset(path):
            return [(source, None)]
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise QuantkitError(f"directory {path} has no .txt or .jsonl files")
        return [(str(p), [p]) for p in files]
    if any(c in source for c in _GLOB_CHARS):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if Path(p).is_file())
        if not files:
            raise QuantkitError(f"no files match {source!r}")
        return [(str(p), [p]) for p in files]
    raise QuantkitError(
        f"data source {source!r} not found; give a .txt/.jsonl file, a directory, a glob or hf:NAME[:CONFIG][:SPLIT][:FIELD]"
    )


def _split_sources(source: SourceLike) -> list[str]:
    if isinstance(source, str | os.PathLike):
        text = os.fspath(source)
        if "," in text and not Path(text).expanduser().exists():
            items = [s.strip() for s in text.split(",")]
        else:
            items = [text]
    else:
        items = [s for item in source for s in _split_sources(item)]
    items = [s for s in items if s]
    if not items:
        raise QuantkitError("no data source given; pass a file, directory, glob or hf:NAME")
    return items


def local_paths(source: SourceLike) -> list[str]:
    """The local paths a source names (outputs must stay away from them)."""
    text = os.fspath(source) if isinstance(source, str | os.PathLike) else ",".join(map(os.fspath, source))
    items = [text] if Path(text).exists() else text.split(",")
    return [s.strip() for s in items if s.strip() and not s.startswith("hf:") and Path(s.strip()).exists()]


def source_units(source: SourceLike, part: str) -> list[tuple[str, list[str]]]:
    """(label, documents restricted to `part`) of every unit of a source, in order: each file (of a
    directory or glob) or dataset is one unit, labelled by its path or hf: spec."""
    check_part(part)
    units: list[tuple[str, list[str]]] = []
    named: dict[str, str] = {}  # each file or dataset once: named twice it would count twice, in a mean or a draw
    for item in _split_sources(source):
        for label, files in _expand(item):
            key = label if files is None else str(files[0].resolve())
            if key in named:
                how = "twice" if named[key] == item else f"by {named[key]!r} and by {item!r}"
                raise QuantkitError(f"{label} is named {how} in the data source; it would count twice (in a mean "
                                    "loss, in the samples drawn): name it once")
            named[key] = item
            if files is None:
                docs = load_hf(label)  # a plain path stays a path (a folder named a:b), not an hf: spec
            else:
                docs = [d for f in files for d in _read_file(f)]
            if not any(d.strip() for d in docs):
                if files is not None and len(files) == 1 and item == label:
                    raise QuantkitError(f"{label} is empty; give a file with text in it")
                continue  # an empty file inside a directory or glob is skipped
            units.append((label, split_part(docs, part)))
    if not any(t.strip() for _, docs in units for t in docs):
        raise QuantkitError(f"no text found in {source!r} (part={part}); give a source with text in it")
    return units


def load_texts(source: SourceLike, part: str = "all") -> list[str]:
    """All documents of a source (see the module doc for the syntax), restricted to `part`."""
    return [t for _, docs in source_units(source, part) for t in docs]


def load_texts_by_source(source: SourceLike, part: str = "all") -> dict[str, list[str]]:
    """The documents of a source per unit (file or dataset, labelled by its path or hf: spec), restricted to
    `part`; a unit named twice keeps its documents under one label. Units whose part holds no text are left out."""
    out: dict[str, list[str]] = {}
    for label, docs in source_units(source, part):
        if any(t.strip() for t in docs):
            out.setdefault(label, []).extend(docs)
    return out
