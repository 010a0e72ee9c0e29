"""Round 20 of the fault battery (issue #22): a fresh set by another hand, run by fault_battery.py --rounds 20.

The data and artifact side, each door crossed with what rounds 1-18 tried there: text through every door `--calib`
and `--data` have (folders holding other files, hidden and nested ones, globs with ?, [] and **, relative, ~ and
symlinked paths, names holding ':' or ',', JSON arrays and JSON lines under any suffix, several documents split
into files, comma lists and records, --part over each of them, checked against the plain file or a JSONL of the
same documents, and the parts cut here by hand); `hf:` datasets saved with save_to_disk whose features are of each
type (large_string, ints, floats, bools, lists, structs, class labels, images), with formats set, rows selected,
shuffled, filtered or sharded, DatasetDicts of other splits, None/empty/blank rows, an "image" column on a text
model, folders named with ':' or ','; calibration sets made by `importance` from each door and reused (the
default method's run on the same text is the reference); calibration recipes (the shipped calib/text.yaml and
calib/image-caption.yaml with their variables, sources that are folders, globs, datasets and records, parts,
aliases and suffixes) beside quantization recipes; `--resume` after the data behind a folder, glob, dataset,
recipe or set changed; chats with system prompts, several turns and tools in every container (JSON array, .txt,
tokenizer_config, chat_template.jinja, the API's lists and Datasets); image-text records moved, relative and
absolute, through the API and a Dataset; eval and qid measure on the same text through each door (the losses
must equal the plain file's); exports moved, linked or stripped of their card and report given back to export,
eval and load_quantized; qid law files and fit tables in other shapes; the API's data conventions (one text as a
file, Datasets in each format, DatasetDict, dicts of columns, paths in lists).
Each case says what a right program does: refuse (one line, exit 2 / one QuantkitError, nothing left behind),
"maybe" (a refusal or a checked success), or "valid" (must be taken, and its result checked).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from fault_battery import (
    CHAT_TEMPLATE,
    GPTQ,
    Cases,
    _bytes_of,
    _maybe,
    export_ok,
    failing_after_first_layer,
    plan_equals_dry_run,
    quantize,
    run_cli,
    valid,
)
from fault_round18 import (
    LAW,
    _law_qid,
    _law_rows,
    _save_vlm,
    built,
    chain,
    fit_recovers,
    predicted,
    tri,
)

ROOT = Path(__file__).resolve().parents[1]
VGQ = ["--method", "gptq", "--nsamples", "2", "--seqlen", "256", "--group-size", "32"]


def _at(w: Path, spec: str) -> str:
    """A source spec with '@' standing for the case folder."""
    return spec.replace("@", str(w))


def _gq(data: str, *extra, model: str = "model", out: str = "out", method=GPTQ) -> Callable[[Path], list]:
    """`calibrate MODEL --calib DATA` (GPTQ 2 x 16, group 32 unless method) args."""
    return lambda w: ["calibrate", w / model, "--calib", _at(w, data), *method, *[_at(w, e) for e in extra], "-o",
                      w / out]


def _in_env(env: dict, args: Callable[[Path], list]) -> Callable[[Path], object]:
    """A run of `quantkit ARGS` with `env` ('@' the case folder) set for the call only."""
    return lambda w: _env_call(w, env, lambda _w: run_cli(*args(_w)))


def same_bytes(ref: Callable[[Path], list], rel: str = "out", env: dict | None = None):
    """A check: rel/model.safetensors equals, byte for byte, that of the reference CLI run `ref` (its -o replaced
    by w/ref); a valid input spelled another way of the reference's."""
    def check(w: Path, result) -> str | None:
        args = ref(w)
        args[args.index("-o") + 1] = w / "ref"
        done = _in_env(env or {}, lambda _w: args)(w)
        if done.exit_code != 0:
            return f"the reference run failed: {done.output[-200:]}"
        a, b = _bytes_of(w / rel / "model.safetensors"), _bytes_of(w / "ref" / "model.safetensors")
        return None if a and a == b else f"{rel}/ differs from the reference run's"
    check.valid = True
    return check


def _write(rel: str, content) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        text = content(w) if callable(content) else content
        (w / rel).parent.mkdir(parents=True, exist_ok=True)
        (w / rel).write_bytes(text) if isinstance(text, bytes) else (w / rel).write_text(text)
    return setup


def _copy(src: str, dst: str) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        (w / dst).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (w / src).is_dir() else shutil.copy)(w / src, w / dst)
    return setup


def _link(target: str, name: str) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        (w / name).parent.mkdir(parents=True, exist_ok=True)
        (w / name).symlink_to(w / target)
    return setup


def _text(w: Path) -> str:
    return (w / "text.txt").read_text()


def _docs(w: Path) -> list[str]:
    """text.txt's 2000 words as three documents of 700, 700 and 600 words."""
    words = _text(w).split()
    return [" ".join(words[:700]), " ".join(words[700:1400]), " ".join(words[1400:])]


def _jsonl_of(docs: Callable[[Path], list[str]]) -> Callable[[Path], str]:
    return lambda w: "".join(json.dumps({"text": d}) + "\n" for d in docs(w))


def _cut(text: str, part: str) -> str:
    """The train (first 90%) or heldout (last 10%) characters of one file, as docs/commands.md defines them, cut
    here by hand: the held-out part is round(10%) of the characters."""
    keep = len(text) - int(round(len(text) * 0.1))
    return text[:keep] if part == "train" else text[keep:]


def _two_files(names=("a.txt", "b.txt"), folder: str = "d") -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        a, b, _ = _docs(w)
        (w / folder).mkdir(parents=True, exist_ok=True)
        (w / folder / names[0]).write_text(a)
        (w / folder / names[1]).write_text(b)
    return setup


def _ab(w: Path) -> list[str]:
    return _docs(w)[:2]


def _ba(w: Path) -> list[str]:
    return _docs(w)[1::-1]


# ---------------------------------------------------------------- A. text through every door

def _text_door_cases(out: Cases) -> None:
    add = out.add
    ref = _gq("@/text.txt")
    home = {"HOME": "@"}
    for label, data, setup, kind, env in [
        ("a folder holding text.txt alone", "@/d", _copy("text.txt", "d/text.txt"), "valid", None),
        ("a folder holding text.txt beside a README.md, a .csv and a .py", "@/d",
         chain(_copy("text.txt", "d/text.txt"), _write("d/README.md", "# notes\n"), _write("d/x.csv", "a,b\n1,2\n"),
               _write("d/x.py", "print(1)\n")), "valid", None),
        ("a folder holding text.txt and an empty .txt", "@/d",
         chain(_copy("text.txt", "d/text.txt"), _write("d/empty.txt", "")), "valid", None),
        ("a folder holding text.txt and a .txt of blanks", "@/d",
         chain(_copy("text.txt", "d/text.txt"), _write("d/blank.txt", " \n\t\n")), "maybe", None),
        ("a folder holding text.txt two levels down", "@/d", _copy("text.txt", "d/x/y/text.txt"), "valid", None),
        ("a folder holding text.txt in a hidden sub-folder", "@/d", _copy("text.txt", "d/.cache/text.txt"), "maybe",
         None),
        ("a folder whose text is in a .TXT (upper-case suffix)", "@/d", _copy("text.txt", "d/TEXT.TXT"), "valid", None),
        ("a folder reached through a symlink", "@/dl", chain(_copy("text.txt", "d/text.txt"), _link("d", "dl")),
         "valid", None),
        ("a folder path with a trailing slash", "@/d/", _copy("text.txt", "d/text.txt"), "valid", None),
        ("a glob d/*.txt of one file", "@/d/*.txt", _copy("text.txt", "d/text.txt"), "valid", None),
        ("a glob d/**/*.txt of one file two levels down", "@/d/**/*.txt", _copy("text.txt", "d/x/y/text.txt"),
         "valid", None),
        ("a glob tex?.txt", "@/tex?.txt", None, "valid", None),
        ("a glob [t]ext.txt", "@/[t]ext.txt", None, "valid", None),
        ("./text.txt (relative to the cwd)", "./text.txt", None, "valid", None),
        ("text.txt (relative, no ./)", "text.txt", None, "valid", None),
        ("~/text.txt with HOME the case folder", "~/text.txt", None, "valid", home),
        ("a symlink to text.txt", "@/tl.txt", _link("text.txt", "tl.txt"), "valid", None),
        ("a file named a:b.txt", "@/a:b.txt", _copy("text.txt", "a:b.txt"), "valid", None),
        ("a file named a,b.txt (a comma in its name)", "@/a,b.txt", _copy("text.txt", "a,b.txt"), "valid", None),
        ("a file named hf:x.txt given as ./hf:x.txt", "./hf:x.txt", _copy("text.txt", "hf:x.txt"), "valid", None),
        ("a file named notes.md", "@/notes.md", _copy("text.txt", "notes.md"), "valid", None),
        ("a file without a suffix", "@/corpus", _copy("text.txt", "corpus"), "valid", None),
        ("a comma list of one file and a trailing comma", "@/text.txt,", None, "maybe", None),
        ("one file with spaces around it", " @/text.txt ", None, "maybe", None),
        ("the text as one JSONL record", "@/t.jsonl", _write("t.jsonl", _jsonl_of(lambda w: [_text(w)])), "valid",
         None),
        ("the text as one JSON array item in a .json", "@/t.json",
         _write("t.json", lambda w: json.dumps([{"text": _text(w)}])), "valid", None),
        ("the text as a pretty-printed JSON array (indent 2)", "@/t.json",
         _write("t.json", lambda w: json.dumps([{"text": _text(w)}], indent=2)), "valid", None),
        ("the text as one JSONL record in a file named .txt", "@/t.txt",
         _write("t.txt", _jsonl_of(lambda w: [_text(w)])), "valid", None),
        ("the text as one JSONL record in a file without a suffix", "@/records",
         _write("records", _jsonl_of(lambda w: [_text(w)])), "valid", None),
        ("the text as one JSONL record with id, meta and score fields", "@/t.jsonl",
         _write("t.jsonl", lambda w: json.dumps({"id": 7, "meta": {"src": "x", "n": [1, 2]}, "text": _text(w),
                                                 "score": 0.5}) + "\n"), "valid", None),
        ("the text as one JSONL record inside a folder", "@/d", _write("d/t.jsonl", _jsonl_of(lambda w: [_text(w)])),
         "valid", None),
        ("the text as one JSONL record in a folder as .JSONL", "@/d",
         _write("d/T.JSONL", _jsonl_of(lambda w: [_text(w)])), "valid", None),
    ]:
        run = _in_env(env, _gq(data)) if env else (lambda w, d=data: run_cli(*_gq(d)(w)))
        add("src20", f"GPTQ on {label}: the bytes of --calib text.txt", run, setup, tri(kind, same_bytes(ref)))
    for label, data, setup in [
        ("a folder holding only a .md file", "@/d", _copy("text.txt", "d/notes.md")),
        ("a folder holding only a save_to_disk dataset's sub-folder and a .md", "@/d",
         chain(_saved("d/ds", lambda w: [_text(w)]), _write("d/notes.md", "x"))),
        ("text.txt gzip-compressed (text.txt.gz)", "@/text.txt.gz",
         lambda w: (w / "text.txt.gz").write_bytes(__import__("gzip").compress((w / "text.txt").read_bytes()))),
        ("a glob that matches only folders (d*)", "@/d*", lambda w: (w / "d1").mkdir()),
        ("a comma list of ',' alone", ",", None),
        ("a file holding a JSON array of strings", "@/t.json", _write("t.json", lambda w: json.dumps(_docs(w)))),
        ("a .jsonl whose records hold the text under 'content'", "@/t.jsonl",
         _write("t.jsonl", lambda w: "".join(json.dumps({"content": d}) + "\n" for d in _docs(w)))),
        ("a .jsonl whose second record is a chat", "@/t.jsonl",
         _write("t.jsonl", lambda w: json.dumps({"text": _text(w)}) + "\n" + json.dumps(
             {"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]}) + "\n")),
    ]:
        add("src20", f"bad --calib: {label}", lambda w, d=data: run_cli(*_gq(d)(w)), setup)


def _multi_doc_cases(out: Cases) -> None:
    add = out.add
    for label, data, setup, docs, extra in [
        ("a folder of a.txt and b.txt", "@/d", _two_files(), _ab, ()),
        ("a folder of 10.txt and 9.txt (sorted as strings: 10 first)", "@/d", _two_files(("10.txt", "9.txt")), _ab,
         ()),
        ("a comma list b.txt,a.txt (its own order)", "@/d/b.txt,@/d/a.txt", _two_files(), _ba, ()),
        ("a comma list with a space after the comma", "@/d/a.txt, @/d/b.txt", _two_files(), _ab, ()),
        ("a glob d/*.txt of a.txt and b.txt", "@/d/*.txt", _two_files(), _ab, ()),
        ("a folder of a.txt and b.jsonl (one record)", "@/d",
         chain(_two_files(), lambda w: (w / "d" / "b.txt").rename(w / "d" / "b.jsonl"),
               lambda w: (w / "d" / "b.jsonl").write_text(json.dumps({"text": _ab(w)[1]}) + "\n")), _ab, ()),
        ("a.txt and a dataset of b in a comma list", "@/d/a.txt,hf:@/ds",
         chain(_two_files(), _saved("ds", lambda w: [_ab(w)[1]])), _ab, ()),
        ("a dataset of rows a and b", "hf:@/ds", _saved("ds", _ab), _ab, ()),
        ("one .jsonl of the two records in a folder", "@/d", _write("d/t.jsonl", _jsonl_of(_ab)), _ab, ()),
    ]:
        add("docs20", f"GPTQ on {label}: the bytes of a JSONL of the same documents",
            lambda w, d=data, e=extra: run_cli(*_gq(d, *e)(w)), chain(setup, _write("ref.jsonl", _jsonl_of(docs))),
            same_bytes(_gq("@/ref.jsonl")))
    for part in ("train", "heldout"):
        for label, data, setup in [
            ("a folder of a.txt and b.txt", "@/d", _two_files()),
            ("a comma list a.txt,b.txt", "@/d/a.txt,@/d/b.txt", _two_files()),
        ]:
            add("docs20", f"GPTQ --part {part} on {label}: each file's {part} part, cut by hand, as JSONL",
                lambda w, d=data, p=part: run_cli(*_gq(d, "--part", p)(w)),
                chain(setup, _write("ref.jsonl", _jsonl_of(lambda w, p=part: [_cut(t, p) for t in _ab(w)]))),
                same_bytes(_gq("@/ref.jsonl")))
        add("docs20", f"GPTQ --part {part} on text.txt: its {part} characters, cut by hand, as a file",
            lambda w, p=part: run_cli(*_gq("@/text.txt", "--part", p)(w)),
            _write("ref.txt", lambda w, p=part: _cut(_text(w), p)), same_bytes(_gq("@/ref.txt")))
        add("docs20", f"GPTQ --part {part} on a one-row dataset: the row's {part} characters as a file",
            lambda w, p=part: run_cli(*_gq("hf:@/ds", "--part", p)(w)),
            chain(_saved("ds", lambda w: [_text(w)]), _write("ref.txt", lambda w, p=part: _cut(_text(w), p))),
            same_bytes(_gq("@/ref.txt")))


# ---------------------------------------------------------------- B. hf: datasets saved to disk

def _saved(rel: str, rows: Callable[[Path], list], column: str = "text", extra: dict | None = None,
           features: dict | None = None, splits: tuple | None = None, post: Callable | None = None,
           shards: int | None = None) -> Callable[[Path], None]:
    """A save_to_disk folder of `rows` (a function of the case folder) under `column`, with extra columns (values
    per row, or functions of the rows' count), their features, as a DatasetDict of `splits`, edited by post(ds)."""
    def setup(w: Path) -> None:
        from datasets import Dataset, DatasetDict, Features, Value

        texts = rows(w)
        data = {column: texts}
        for k, v in (extra or {}).items():
            data[k] = v(len(texts)) if callable(v) else v
        feats = None
        if features is not None:
            feats = Features({column: features.get(column, Value("string")),
                              **{k: features[k] for k in data if k != column}})
        ds = Dataset.from_dict(data, features=feats)
        if post is not None:
            ds = post(ds)
        target = DatasetDict({s: ds for s in splits}) if splits else ds
        kw = {"num_shards": shards} if shards else {}
        (w / rel).parent.mkdir(parents=True, exist_ok=True)
        target.save_to_disk(str(w / rel), **kw)
    return setup


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _hf_cases(out: Cases) -> None:
    from datasets import ClassLabel, Image, Sequence, Value

    add = out.add
    three = _docs
    ref = _gq("@/ref.jsonl")
    refw = _write("ref.jsonl", _jsonl_of(three))
    for label, setup, data, kind in [
        ("text as large_string", _saved("ds", three, features={"text": Value("large_string")}), "hf:@/ds", "valid"),
        ("an int64, a float32 and a bool column beside", _saved(
            "ds", three, extra={"n": lambda k: list(range(k)), "f": lambda k: [0.5] * k, "b": lambda k: [True] * k},
            features={"n": Value("int64"), "f": Value("float32"), "b": Value("bool")}), "hf:@/ds", "valid"),
        ("a list-of-ints column beside", _saved("ds", three, extra={"ids": lambda k: [[1, 2, 3]] * k},
                                                features={"ids": Sequence(Value("int32"))}), "hf:@/ds", "valid"),
        ("a struct column beside", _saved("ds", three, extra={"meta": lambda k: [{"src": "x", "n": 1}] * k}),
         "hf:@/ds", "valid"),
        ("a ClassLabel column beside", _saved("ds", three, extra={"label": lambda k: [0, 1, 0][:k]},
                                              features={"label": ClassLabel(names=["a", "b"])}), "hf:@/ds", "valid"),
        ("an Image column named 'picture' beside", _saved(
            "ds", three, extra={"picture": lambda k: [{"bytes": _png_bytes(), "path": None}] * k},
            features={"picture": Image()}), "hf:@/ds", "maybe"),
        ("a 'messages' column beside the text", _saved(
            "ds", three, extra={"messages": lambda k: [[{"role": "user", "content": "w1"}]] * k}), "hf:@/ds", "maybe"),
        ("a DatasetDict, no split named (train read)", _saved("ds", three, splits=("train", "test")), "hf:@/ds",
         "valid"),
        ("a DatasetDict of one 'validation' split, named", _saved("ds", three, splits=("validation",)),
         "hf:@/ds::validation", "valid"),
        ("a DatasetDict given as a plain path (no hf:)", _saved("ds", three, splits=("train", "test")), "@/ds",
         "valid"),
        ("hf:DIR:: (config and split empty)", _saved("ds", three), "hf:@/ds::", "valid"),
        ("hf:DIR::: (all parts empty)", _saved("ds", three), "hf:@/ds:::", "valid"),
        ("hf:DIR:::text (the default field named)", _saved("ds", three), "hf:@/ds:::text", "valid"),
        ("a Dataset saved in 3 shards", _saved("ds", three, shards=3), "hf:@/ds", "valid"),
        ("a Dataset saved with format numpy", _saved("ds", three, post=lambda d: d.with_format("numpy")), "hf:@/ds",
         "valid"),
        ("a Dataset saved with format torch", _saved("ds", three, post=lambda d: d.with_format("torch")), "hf:@/ds",
         "valid"),
        ("a Dataset saved with format pandas", _saved("ds", three, post=lambda d: d.with_format("pandas")),
         "hf:@/ds", "valid"),
        ("a Dataset of four rows filtered to the three", _saved(
            "ds", lambda w: [*three(w), "w1 w2 w3 drop"], post=lambda d: d.filter(lambda r: "drop" not in r["text"])),
         "hf:@/ds", "valid"),
        ("a save_to_disk folder named 'a:b' given as a plain path", _saved("a:b", three), "@/a:b", "valid"),
        ("a save_to_disk folder named 'a,b' given as a plain path", _saved("a,b", three), "@/a,b", "valid"),
        ("a save_to_disk folder reached through a symlink", chain(_saved("ds", three), _link("ds", "dsl")), "@/dsl",
         "valid"),
        ("hf:./ds (relative to the cwd)", _saved("ds", three), "hf:./ds", "valid"),
    ]:
        add("hf20", f"GPTQ on a dataset with {label}: the bytes of a JSONL of its rows",
            lambda w, d=data: run_cli(*_gq(d)(w)), chain(setup, refw), tri(kind, same_bytes(ref)))
    for label, post, order in [
        ("rows selected as [2, 0, 1] (an indices mapping)", lambda d: d.select([2, 0, 1]), [2, 0, 1]),
        ("rows shuffled (seed 1)", lambda d: d.shuffle(seed=1), None),
    ]:
        def rows_ref(w: Path, post=post, order=order) -> str:
            from datasets import Dataset

            texts = list(post(Dataset.from_dict({"text": three(w)}))["text"]) if order is None else [
                three(w)[i] for i in order]
            return "".join(json.dumps({"text": t}) + "\n" for t in texts)
        add("hf20", f"GPTQ on a dataset with {label}: the bytes of a JSONL of its rows in that order",
            lambda w: run_cli(*_gq("hf:@/ds")(w)), chain(_saved("ds", three, post=post), _write("ref.jsonl", rows_ref)),
            same_bytes(ref))
    add("hf20", "GPTQ on hf:~/ds (HOME the case folder): the bytes of a JSONL of its rows",
        _in_env({"HOME": "@"}, _gq("hf:~/ds")), chain(_saved("ds", three), refw), valid(same_bytes(ref)))
    add("hf20", "GPTQ on a folder holding text.txt and a save_to_disk sub-folder (read: the .txt files)",
        lambda w: run_cli(*_gq("@/d")(w)), chain(_copy("text.txt", "d/text.txt"), _saved("d/ds", three)),
        _maybe(same_bytes(_gq("@/text.txt"))))
    for label, setup, data in [
        ("an 'image' column of images on a text model", _saved(
            "ds", three, extra={"image": lambda k: [{"bytes": _png_bytes(), "path": None}] * k},
            features={"image": Image()}), "hf:@/ds"),
        ("an 'image' column of paths on a text model", _saved("ds", three, extra={"image": lambda k: ["x.png"] * k}),
         "hf:@/ds"),
        ("a None row among the texts", _saved("ds", lambda w: [*three(w)[:2], None, three(w)[2]]), "hf:@/ds"),
        ("an empty-string row among the texts", _saved("ds", lambda w: [*three(w)[:2], "", three(w)[2]]), "hf:@/ds"),
        ("a blank row among the texts", _saved("ds", lambda w: [*three(w)[:2], "  \n ", three(w)[2]]), "hf:@/ds"),
        ("two None rows of three", _saved("ds", lambda w: [None, three(w)[0], None]), "hf:@/ds"),
        ("the text column named 'Text', no field given", _saved("ds", three, column="Text"), "hf:@/ds"),
        ("a split named on a plain Dataset (::test)", _saved("ds", three), "hf:@/ds::test"),
        ("a DatasetDict of one 'validation' split, none named", _saved("ds", three, splits=("validation",)),
         "hf:@/ds"),
        ("a DatasetDict whose train split has no rows", _saved("ds", lambda w: [], features={}, splits=("train",)),
         "hf:@/ds"),
        ("hf:DIR:cfg (a config on a local folder)", _saved("ds", three), "hf:@/ds:cfg"),
        ("hf:DIR with five parts", _saved("ds", three), "hf:@/ds::train:text:x"),
        ("hf: alone", None, "hf:"),
        ("a dataset folder whose dataset_info.json is not JSON", chain(
            _saved("ds", three), _write("ds/dataset_info.json", "{not json")), "hf:@/ds"),
    ]:
        add("hf20", f"bad dataset: {label}", lambda w, d=data: run_cli(*_gq(d)(w)), setup)


# ---------------------------------------------------------------- C. calibration sets made from each door, reused

def _set_from(data: str, *extra, rel: str = "set", model: str = "model", seqlen: str = "16") -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        done = run_cli("importance", w / model, "--calib", _at(w, data), "--nsamples", "2", "--seqlen", seqlen,
                       *[_at(w, e) for e in extra], "-o", w / rel)
        assert done.exit_code == 0, done.output[-300:]
    return setup


def _use_set(*extra, rel: str = "set", model: str = "model") -> Callable[[Path], list]:
    return lambda w: ["calibrate", w / model, "--calib-set", w / rel, "--group-size", "32", *[_at(w, e) for e in extra],
                      "-o", w / "out"]


def _tlq(data: str, *extra, model: str = "model") -> Callable[[Path], list]:
    """The default method's run on DATA (2 x 16, group 32): a set's reuse must give its bytes."""
    return lambda w: ["calibrate", w / model, "--calib", _at(w, data), "--nsamples", "2", "--seqlen", "16",
                      "--group-size", "32", *[_at(w, e) for e in extra], "-o", w / "out"]


def _set_cases(out: Cases) -> None:
    add = out.add
    one = _jsonl_of(lambda w: [_text(w)])
    for label, data, setup, kind in [
        ("a folder holding text.txt", "@/d", _copy("text.txt", "d/text.txt"), "valid"),
        ("a one-row dataset", "hf:@/ds", _saved("ds", lambda w: [_text(w)]), "valid"),
        ("one JSONL record", "@/t.jsonl", _write("t.jsonl", one), "valid"),
        ("a glob", "@/tex*.txt", None, "valid"),
        ("a plain calibration recipe", "@/r.yaml", _write("r.yaml", "nsamples: 2\nseqlen: 16\nsources:\n"
                                                                    "  - path: text.txt\n"), "valid"),
        ("a folder of a.txt and b.txt (two sources)", "@/d", _two_files(), "maybe"),
    ]:
        ref = _tlq("@/text.txt") if "two sources" not in label else _tlq("@/d")
        add("set20", f"a set made by importance from {label}, reused: the default run's bytes on text.txt",
            lambda w: run_cli(*_use_set()(w)), chain(setup, _set_from(data)), tri(kind, same_bytes(ref)))
    add("set20", "a set made with --part train, reused: the default run's bytes on the train part cut by hand",
        lambda w: run_cli(*_use_set()(w)), chain(_set_from("@/text.txt", "--part", "train"),
                                                  _write("ref.txt", lambda w: _cut(_text(w), "train"))),
        same_bytes(_tlq("@/ref.txt")))
    add("set20", "a set made with --seed 3, reused with --seed 3: the default run's bytes with --seed 3",
        lambda w: run_cli(*_use_set("--seed", "3")(w)), _set_from("@/text.txt", "--seed", "3"),
        same_bytes(_tlq("@/text.txt", "--seed", "3")))
    add("set20", "a set reused after the text it came from was deleted", lambda w: run_cli(*_use_set()(w)),
        chain(_copy("text.txt", "t2.txt"), _set_from("@/t2.txt"), lambda w: (w / "t2.txt").unlink()),
        same_bytes(_tlq("@/text.txt")))
    add("set20", "a set reused on an identical copy of the model folder", lambda w: run_cli(*_use_set(model="m2")(w)),
        chain(_set_from("@/text.txt"), _copy("model", "m2")), same_bytes(_tlq("@/text.txt")))
    add("set20", "a set reused with a quantization recipe: the default run's bytes with the recipe",
        lambda w: run_cli(*_use_set("--recipe", "@/q.yaml")(w)),
        chain(_set_from("@/text.txt"), _write("q.yaml", "overrides:\n  - targets: [down_proj]\n    bits: 8\n")),
        same_bytes(_tlq("@/text.txt", "--recipe", "@/q.yaml")))
    add("set20", "a set made on chats (--chat-template), reused: the default run's bytes on the chats",
        lambda w: run_cli(*_use_set()(w)), chain(_chats("c.jsonl", SYS_CHATS), _set_from(
            "@/c.jsonl", "--chat-template", "@/t.jinja")), same_bytes(_tlq("@/c.jsonl", "--chat-template", "@/t.jinja")))
    add("set20", "a set made with --seed 3, reused with --seed 1", lambda w: run_cli(*_use_set("--seed", "1")(w)),
        _set_from("@/text.txt", "--seed", "3"))
    add("set20", "a set made on chats, reused with --chat-template of another template", lambda w: run_cli(
        *_use_set("--chat-template", "@/t2.jinja")(w)), chain(_chats("c.jsonl", SYS_CHATS), _set_from(
            "@/c.jsonl", "--chat-template", "@/t.jinja"), _write("t2.jinja", "{% for m in messages %}{{ m.role }} "
                                                                               "{{ m.content }} {% endfor %}")))
    add("set20", "a set reused after the model's tokenizer gained a chat template",
        lambda w: run_cli(*_use_set()(w)), chain(_set_from("@/text.txt"), _template_in_config),
        _maybe(same_bytes(_tlq("@/text.txt"))))


# ---------------------------------------------------------------- D. calibration recipes, shipped and new

PLAIN = "nsamples: 2\nseqlen: 16\nsources:\n  - path: {}\n"


def _recipe_cases(out: Cases) -> None:
    add = out.add
    shipped = str(ROOT / "calib" / "text.yaml")
    n2 = ("--nsamples", "2", "--seqlen", "16")
    add("crecipe20", "the shipped calib/text.yaml, QUANTKIT_TEXT_DATA a folder: the bytes of --calib DIR --part train",
        _in_env({"QUANTKIT_TEXT_DATA": "@/d"}, _gq(shipped, *n2)), _copy("text.txt", "d/text.txt"),
        same_bytes(_gq("@/d", "--part", "train")))
    add("crecipe20", "the shipped calib/text.yaml, QUANTKIT_TEXT_DATA a file: the bytes of --calib FILE --part train",
        _in_env({"QUANTKIT_TEXT_DATA": "@/text.txt"}, _gq(shipped, *n2)), None,
        tri("maybe", same_bytes(_gq("@/text.txt", "--part", "train"))))
    add("crecipe20", "the shipped calib/text.yaml with its own counts (128 x 512) on a copy of it: too little text",
        _in_env({"QUANTKIT_TEXT_DATA": "@/d"}, lambda w: ["calibrate", w / "model", "--calib", w / "text.yaml",
                                                          "--method", "gptq", "--group-size", "32", "-o", w / "out"]),
        chain(_copy("text.txt", "d/text.txt"), lambda w: shutil.copy(shipped, w / "text.yaml")))
    add("crecipe20", "the shipped calib/text.yaml with QUANTKIT_TEXT_DATA unset",
        lambda w: run_cli(*_gq(shipped, *n2)(w)), lambda w: os.environ.pop("QUANTKIT_TEXT_DATA", None))
    add("crecipe20", "the shipped calib/text.yaml with QUANTKIT_TEXT_DATA an empty folder",
        _in_env({"QUANTKIT_TEXT_DATA": "@/e"}, _gq(shipped, *n2)), lambda w: (w / "e").mkdir())
    add("crecipe20", "the shipped calib/text.yaml with QUANTKIT_TEXT_DATA ''",
        _in_env({"QUANTKIT_TEXT_DATA": ""}, _gq(shipped, *n2)), None)
    ref = _gq("@/plain.yaml")
    plain = _write("plain.yaml", PLAIN.format("text.txt"))
    for label, body, setup, kind in [
        ("a source that is a folder", PLAIN.format("d"), _copy("text.txt", "d/text.txt"), "valid"),
        ("a source that is a glob", PLAIN.format("'tex*.txt'"), None, "valid"),
        ("a source that is a one-row dataset (hf:DIR)", None, _saved("ds", lambda w: [_text(w)]), "valid"),
        ("a source that is one JSONL record", PLAIN.format("t.jsonl"),
         _write("t.jsonl", _jsonl_of(lambda w: [_text(w)])), "valid"),
        ("a source at ~/text.txt (HOME the case folder)", PLAIN.format("~/text.txt"), None, "valid"),
        ("'fraction: 1.0' for the weight", PLAIN.format("text.txt") + "    fraction: 1.0\n", None, "valid"),
        ("'kind: text' and a name spelled out", "name: mine\nkind: text\n" + PLAIN.format("text.txt"), None, "valid"),
        ("the recipe written as JSON (a YAML subset)", '{"nsamples": 2, "seqlen": 16, "sources": [{"path": '
         '"text.txt"}]}', None, "valid"),
        ("comments and a document start marker", "---\n# mine\n" + PLAIN.format("text.txt") + "# end\n", None,
         "valid"),
        ("a source that is a comma list of one file", PLAIN.format("'text.txt,'"), None, "maybe"),
        ("a source given twice with weights 1 and 0", PLAIN.format("text.txt") + "    weight: 1\n  - path: text.txt\n"
         "    weight: 0\n", None, "maybe"),
    ]:
        def make(w: Path, body=body) -> None:
            (w / "r.yaml").write_text(body if body is not None else PLAIN.format(f"hf:{w}/ds"))
        add("crecipe20", f"a calibration recipe with {label}: the bytes of the plain recipe",
            _in_env({"HOME": "@"} if "~" in label else {}, _gq("@/r.yaml")), chain(plain, setup, make),
            tri(kind, same_bytes(ref)))
    for suffix in (".yml", ".YAML"):
        add("crecipe20", f"the plain recipe named r{suffix}: the bytes of plain.yaml",
            lambda w, s=suffix: run_cli(*_gq(f"@/r{s}")(w)), chain(plain, _copy("plain.yaml", f"r{suffix}")),
            same_bytes(ref))
    for part in ("train", "heldout"):
        add("crecipe20", f"a recipe source with part: {part}: the bytes of --calib text.txt --part {part}",
            lambda w: run_cli(*_gq("@/r.yaml")(w)), _write("r.yaml", PLAIN.format("text.txt") + f"    part: {part}\n"),
            same_bytes(_gq("@/text.txt", "--part", part)))
    add("crecipe20", "a recipe asking 4 x 16 under --nsamples 2: the bytes of the plain (2 x 16) recipe",
        lambda w: run_cli(*_gq("@/r.yaml", "--nsamples", "2")(w)),
        chain(plain, _write("r.yaml", PLAIN.format("text.txt").replace("nsamples: 2", "nsamples: 4"))),
        same_bytes(ref))
    add("crecipe20", "a calibration recipe beside a quantization recipe: the bytes of text.txt with the recipe",
        lambda w: run_cli(*_gq("@/plain.yaml", "--recipe", "@/q.yaml")(w)),
        chain(plain, _write("q.yaml", "overrides:\n  - targets: [o_proj]\n    bits: 8\n")),
        same_bytes(_gq("@/text.txt", "--recipe", "@/q.yaml")))
    add("crecipe20", "a recipe with --part train on the command line", lambda w: run_cli(
        *_gq("@/plain.yaml", "--part", "train")(w)), plain, _maybe(same_bytes(_gq("@/text.txt", "--part", "train"))))
    add("crecipe20", "eval --data of a calibration recipe", lambda w: run_cli(
        "eval", w / "model", "--data", w / "plain.yaml", "--seqlen", "16", "--json"), plain,
        _maybe(eval_same(lambda w: ["eval", w / "model", "--data", w / "text.txt", "--seqlen", "16", "--json"])))
    for label, args, setup in [
        ("a calibration recipe given to --recipe", _gq("@/text.txt", "--recipe", "@/plain.yaml"), plain),
        ("a quantization recipe given to --calib", _gq("@/q.yaml"),
         _write("q.yaml", "overrides:\n  - targets: [o_proj]\n    bits: 8\n")),
        ("a recipe whose source is a quantization recipe", _gq("@/r.yaml"),
         chain(_write("q.yaml", "ignore: [lm_head]\n"), _write("r.yaml", PLAIN.format("q.yaml")))),
        ("a recipe whose sources key is a mapping", _gq("@/r.yaml"),
         _write("r.yaml", "nsamples: 2\nseqlen: 16\nsources:\n  path: text.txt\n")),
        ("a recipe whose source weight is the string 'half'", _gq("@/r.yaml"),
         _write("r.yaml", PLAIN.format("text.txt") + "    weight: half\n")),
        ("a recipe whose source is a folder of chats", _gq("@/r.yaml"),
         chain(_chats("d/c.jsonl", SYS_CHATS), _write("r.yaml", PLAIN.format("d")))),
        ("the image-caption kind over a text model (shipped calib/image-caption.yaml)",
         _gq(str(ROOT / "calib" / "image-caption.yaml"), "--nsamples", "2", "--seqlen", "16"), None),
    ]:
        add("crecipe20", f"bad recipe: {label}", _in_env({"QUANTKIT_IMAGE_DATA": "@/vl"}, args), setup)


# ---------------------------------------------------------------- E. quantization recipes in new combinations

def _qrecipe_cases(out: Cases) -> None:
    add = out.add
    q8 = _write("q.yaml", "overrides:\n  - targets: [down_proj]\n    bits: 8\n")
    add("qrecipe20", "a recipe run --low-memory: the bytes of the same run in memory",
        lambda w: run_cli(*_gq("@/text.txt", "--recipe", "@/q.yaml", "--low-memory")(w)), q8,
        same_bytes(_gq("@/text.txt", "--recipe", "@/q.yaml")))
    add("qrecipe20", "a recipe run on a folder of the text: the bytes of the run on text.txt",
        lambda w: run_cli(*_gq("@/d", "--recipe", "@/q.yaml")(w)), chain(q8, _copy("text.txt", "d/text.txt")),
        same_bytes(_gq("@/text.txt", "--recipe", "@/q.yaml")))
    add("qrecipe20", "a recipe under the default method on a dataset: the bytes of the run on text.txt",
        lambda w: run_cli(*_tlq("hf:@/ds", "--recipe", "@/q.yaml")(w)),
        chain(q8, _saved("ds", lambda w: [_text(w)])), same_bytes(_tlq("@/text.txt", "--recipe", "@/q.yaml")))
    add("qrecipe20", "plan --recipe --json equals calibrate --dry-run --recipe --json",
        lambda w: run_cli("plan", w / "model", *GPTQ, "--recipe", w / "q.yaml", "--json"), q8,
        valid(lambda w, r: plan_equals_dry_run("model", *GPTQ, "--recipe", str(w / "q.yaml"))(w, r)))
    add("qrecipe20", "a recipe (YAML path) through the API on data=[text]: the CLI run's bytes",
        lambda w: quantize(w, data=[_text(w)], method="gptq", recipe=str(w / "q.yaml")), q8,
        same_bytes(_gq("@/text.txt", "--recipe", "@/q.yaml")), api=True)
    add("qrecipe20", "a recipe of W8 down_proj with --act-bits 8 --bits 8 --group-size -1", lambda w: run_cli(
        *_gq("@/text.txt", "--recipe", "@/q.yaml", "--act-bits", "8", "--bits", "8", "--group-size", "-1")(w)), q8,
        _maybe(export_ok()))
    add("qrecipe20", "a recipe with an lm_head override at 8 bits and --quantize-lm-head", lambda w: run_cli(
        *_gq("@/text.txt", "--recipe", "@/q.yaml", "--quantize-lm-head")(w)),
        _write("q.yaml", "overrides:\n  - targets: [lm_head]\n    bits: 8\n"), _maybe(export_ok()))
    stop = _stop_on("@/text.txt", "--recipe", "@/q.yaml", before=(q8,))
    add("qrecipe20", "--resume with the same recipe: a fresh run's bytes",
        _resume("@/text.txt", "--recipe", "@/q.yaml"), stop, valid(_fresh("@/text.txt", "--recipe", "@/q.yaml")))
    add("qrecipe20", "--resume with the recipe copied to another path (same bytes)",
        _resume("@/text.txt", "--recipe", "@/q2.yaml"), chain(stop, _copy("q.yaml", "q2.yaml")),
        _maybe(_fresh("@/text.txt", "--recipe", "@/q2.yaml")))
    add("qrecipe20", "--resume with the recipe file edited in place (down_proj 2 bits)",
        _resume("@/text.txt", "--recipe", "@/q.yaml"),
        chain(stop, _write("q.yaml", "overrides:\n  - targets: [down_proj]\n    bits: 2\n")),
        _maybe(_fresh("@/text.txt", "--recipe", "@/q.yaml")))
    add("qrecipe20", "--resume with another recipe file", _resume("@/text.txt", "--recipe", "@/q3.yaml"),
        chain(stop, _write("q3.yaml", "overrides:\n  - targets: [o_proj]\n    bits: 8\n")))


def _stop_on(data: str, *extra, before: tuple = ()) -> Callable[[Path], None]:
    """out.partial of a --low-memory GPTQ run on DATA stopped after its first layer (after the `before` setups)."""
    def setup(w: Path) -> None:
        for step in before:
            step(w)
        with failing_after_first_layer():
            done = run_cli("calibrate", w / "model", "--calib", _at(w, data), *GPTQ, *[_at(w, e) for e in extra],
                           "--low-memory", "-o", w / "out")
        assert done.exit_code == 2 and (w / "out.partial" / "state.json").is_file(), done.output[-300:]
    return setup


def _resume(data: str, *extra) -> Callable[[Path], object]:
    return lambda w: run_cli("calibrate", w / "model", "--calib", _at(w, data), *GPTQ,
                             *[_at(w, e) for e in extra], "--low-memory", "--resume", "-o", w / "out")


def _fresh(data: str, *extra):
    """A check: the resumed export equals a fresh --low-memory run on the inputs as they are now."""
    def check(w: Path, result) -> str | None:
        done = run_cli("calibrate", w / "model", "--calib", _at(w, data), *GPTQ, *[_at(w, e) for e in extra],
                       "--low-memory", "-o", w / "fresh")
        if done.exit_code != 0:
            return f"a fresh run refuses what the resume took: {done.output[-200:]}"
        a, b = _bytes_of(w / "out" / "model.safetensors"), _bytes_of(w / "fresh" / "model.safetensors")
        return None if a and a == b else "the export differs from a fresh run on the data as it is now"
    return check


def _resume_cases(out: Cases) -> None:
    add = out.add
    folder = _copy("text.txt", "d/text.txt")
    other = _write("d/text.txt", lambda w: " ".join(reversed(_text(w).split())))
    chats = _chats("c.jsonl", SYS_CHATS)
    tpl = ("--chat-template", "@/t.jinja")
    for label, stop_data, data, extra, before, then, kind in [
        ("a folder, unchanged", "@/d", "@/d", (), (folder,), (), "valid"),
        ("a folder whose file was rewritten (words reversed)", "@/d", "@/d", (), (folder,), (other,), "maybe"),
        ("a folder that gained a second file", "@/d", "@/d", (), (folder,),
         (_write("d/more.txt", lambda w: _docs(w)[0]),), "maybe"),
        ("a glob that now matches one more file", "@/d/*.txt", "@/d/*.txt", (), (folder,),
         (_write("d/more.txt", lambda w: _docs(w)[0]),), "maybe"),
        ("a dataset, unchanged", "hf:@/ds", "hf:@/ds", (), (_saved("ds", _docs),), (), "valid"),
        ("a dataset saved again with other rows", "hf:@/ds", "hf:@/ds", (), (_saved("ds", _docs),),
         (lambda w: shutil.rmtree(w / "ds"), _saved("ds", lambda w: _docs(w)[::-1])), "maybe"),
        ("a recipe whose source text was rewritten (the recipe unchanged)", "@/r.yaml", "@/r.yaml", (),
         (folder, _write("r.yaml", PLAIN.format("d/text.txt"))), (other,), "maybe"),
        ("chats, unchanged", "@/c.jsonl", "@/c.jsonl", tpl, (chats,), (), "valid"),
        ("chats whose template file was edited", "@/c.jsonl", "@/c.jsonl", tpl, (chats,),
         (_write("t.jinja", "{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}"),), "maybe"),
        ("text.txt, given on resume as one JSONL record of it", "@/text.txt", "@/t.jsonl", (),
         (_write("t.jsonl", _jsonl_of(lambda w: [_text(w)])),), (), "maybe"),
        ("text.txt touched (mtime only)", "@/text.txt", "@/text.txt", (), (),
         (lambda w: os.utime(w / "text.txt", (1e9, 1e9)),), "maybe"),
    ]:
        add("resume20", f"--resume on {label}: a fresh run's bytes", _resume(data, *extra),
            chain(_stop_on(stop_data, *extra, before=before), *then), tri(kind, _fresh(data, *extra)))
    # a recipe naming $QK20_DATA: stopped with it naming d/, resumed with it naming e/ (other text)
    var = {"QK20_DATA": "@/e"}
    add("resume20", "--resume on a recipe whose $VAR now names another folder: a fresh run's bytes",
        lambda w: _env_call(w, var, _resume("@/r.yaml")),
        chain(folder, _copy("text.txt", "e/text.txt"), _write("e/text.txt", lambda w: _docs(w)[2] + " " + _docs(w)[0]),
              _write("r.yaml", PLAIN.format("$QK20_DATA/text.txt")),
              lambda w: _env_call(w, {"QK20_DATA": "@/d"}, _stop_on("@/r.yaml"))),
        _maybe(lambda w, r: _env_call(w, var, lambda _w: _fresh("@/r.yaml")(_w, r))))
    add("resume20", "--resume on a set, unchanged: a fresh run's bytes", lambda w: run_cli(
        "calibrate", w / "model", "--calib-set", w / "set", *GPTQ[:2], "--group-size", "32", "--low-memory", "--resume",
        "-o", w / "out"), chain(_set_from("@/text.txt"), _stop_set()), valid(_fresh_set()))
    add("resume20", "--resume on a set remade with --seed 3", lambda w: run_cli(
        "calibrate", w / "model", "--calib-set", w / "set", *GPTQ[:2], "--group-size", "32", "--low-memory", "--resume",
        "-o", w / "out"), chain(_set_from("@/text.txt"), _stop_set(), lambda w: shutil.rmtree(w / "set"),
                                _set_from("@/text.txt", "--seed", "3")), _maybe(_fresh_set()))


def _env_call(w: Path, env: dict, call: Callable[[Path], object]):
    """call(w) with `env` ('@' the case folder) set for its duration only."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update({k: _at(w, v) for k, v in env.items()})
    try:
        return call(w)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _stop_set() -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        with failing_after_first_layer():
            done = run_cli("calibrate", w / "model", "--calib-set", w / "set", *GPTQ[:2], "--group-size", "32",
                           "--low-memory", "-o", w / "out")
        assert done.exit_code == 2 and (w / "out.partial" / "state.json").is_file(), done.output[-300:]
    return setup


def _fresh_set():
    def check(w: Path, result) -> str | None:
        done = run_cli("calibrate", w / "model", "--calib-set", w / "set", *GPTQ[:2], "--group-size", "32",
                       "--low-memory", "-o", w / "fresh")
        if done.exit_code != 0:
            return f"a fresh run refuses what the resume took: {done.output[-200:]}"
        a, b = _bytes_of(w / "out" / "model.safetensors"), _bytes_of(w / "fresh" / "model.safetensors")
        return None if a and a == b else "the export differs from a fresh run on the set as it is now"
    return check


# ---------------------------------------------------------------- G. chats in every container

def _words(i: int, n: int = 8) -> str:
    return " ".join(f"w{(5 * i + 3 * j) % 60}" for j in range(n))


SYS_CHATS = [{"messages": [{"role": "system", "content": _words(i, 4)}, {"role": "user", "content": _words(i + 1)},
                           {"role": "assistant", "content": _words(i + 2)}]} for i in range(6)]
# the same conversations with the system prompt folded into the user turn: CHAT_TEMPLATE renders each content and a
# space whatever its role, so both render the same text (GPTQ reads every token; the loss mask is TLQ's only)
FOLDED = [{"messages": [{"role": "user", "content": r["messages"][0]["content"] + " " + r["messages"][1]["content"]},
                        r["messages"][2]]} for r in SYS_CHATS]
TURNS = [{"messages": [{"role": "user", "content": _words(i)}, {"role": "assistant", "content": _words(i + 1, 4)},
                       {"role": "user", "content": _words(i + 2, 4)}, {"role": "assistant", "content": _words(i + 3)}]}
         for i in range(6)]
TURNS_FOLDED = [{"messages": [{"role": "user", "content": " ".join(m["content"] for m in r["messages"][:3])},
                              r["messages"][3]]} for r in TURNS]


def _chats(rel: str, records: list, raw: Callable[[list], str] | None = None) -> Callable[[Path], None]:
    """rel holding the chat records (one per line, or raw(records)) and t.jinja the plain template."""
    def setup(w: Path) -> None:
        (w / "t.jinja").write_text(CHAT_TEMPLATE)
        (w / rel).parent.mkdir(parents=True, exist_ok=True)
        (w / rel).write_text(raw(records) if raw else "".join(json.dumps(r) + "\n" for r in records))
    return setup


def _template_in_config(w: Path) -> None:
    path = w / "model" / "tokenizer_config.json"
    doc = json.loads(path.read_text())
    doc["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(doc))


def _chat_ref(rel: str = "ref.jsonl") -> Callable[[Path], list]:
    return _gq(f"@/{rel}", "--chat-template", "@/t.jinja")


def _chat_cases(out: Cases) -> None:
    add = out.add
    tpl = ("--chat-template", "@/t.jinja")
    ref = chain(_chats("ref.jsonl", SYS_CHATS))
    same = same_bytes(_chat_ref())
    for label, data, setup, extra, kind in [
        ("the chats as one JSON array in a .json", "@/c.json", _chats("c.json", SYS_CHATS, json.dumps), tpl, "valid"),
        ("the chats as a pretty-printed JSON array", "@/c.json",
         _chats("c.json", SYS_CHATS, lambda r: json.dumps(r, indent=2)), tpl, "valid"),
        ("the chats in a file named .txt", "@/c.txt", _chats("c.txt", SYS_CHATS), tpl, "valid"),
        ("the chats in a file without a suffix", "@/chats", _chats("chats", SYS_CHATS), tpl, "valid"),
        ("the template in tokenizer_config.json (no --chat-template)", "@/c.jsonl",
         chain(_chats("c.jsonl", SYS_CHATS), _template_in_config), (), "valid"),
        ("the template as model/chat_template.jinja (no --chat-template)", "@/c.jsonl",
         chain(_chats("c.jsonl", SYS_CHATS), _copy("t.jinja", "model/chat_template.jinja")), (), "valid"),
        ("--chat-template beside another template in the tokenizer (the flag wins)", "@/c.jsonl",
         chain(_chats("c.jsonl", SYS_CHATS), lambda w: _write("model/chat_template.jinja",
                                                            "{% for m in messages %}{{ m.role }} {% endfor %}")(w)),
         tpl, "valid"),
        ("the system prompt folded into the user turn (the same rendered text)", "@/c.jsonl",
         _chats("c.jsonl", FOLDED), tpl, "valid"),
        ("a 'tools' list on each record (the template ignores it)", "@/c.jsonl",
         _chats("c.jsonl", [{**r, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}
                            for r in SYS_CHATS]), tpl, "valid"),
        ("an 'id' and a 'source' on each record", "@/c.jsonl",
         _chats("c.jsonl", [{"id": i, "source": "x", **r} for i, r in enumerate(SYS_CHATS)]), tpl, "valid"),
        ("the chats through ~/c.jsonl (HOME the case folder)", "~/c.jsonl", _chats("c.jsonl", SYS_CHATS), tpl,
         "valid"),
        ("the chats through a symlink", "@/cl.jsonl", chain(_chats("c.jsonl", SYS_CHATS), _link("c.jsonl", "cl.jsonl")),
         tpl, "valid"),
        ("a chat dataset saved to disk (hf:DIR, a messages column)", "hf:@/ds", chain(
            _chats("c.jsonl", SYS_CHATS), _saved("ds", lambda w: [r["messages"] for r in SYS_CHATS], column="messages")),
         tpl, "maybe"),
        ("each record's messages under 'image': null too", "@/c.jsonl",
         _chats("c.jsonl", [{**r, "image": None} for r in SYS_CHATS]), tpl, "maybe"),
    ]:
        add("chat20", f"GPTQ on {label}: the bytes of the plain chats with --chat-template",
            _in_env({"HOME": "@"}, _gq(data, *extra)), chain(ref, setup), tri(kind, same))
    add("chat20", "GPTQ on multi-turn chats (--seqlen 32): the bytes of the same turns folded into one exchange",
        lambda w: run_cli(*_gq("@/c.jsonl", *tpl, "--seqlen", "32")(w)),
        chain(_chats("c.jsonl", TURNS), _chats("ref.jsonl", TURNS_FOLDED)),
        same_bytes(_gq("@/ref.jsonl", *tpl, "--seqlen", "32")))
    add("chat20", "GPTQ on chats with tool calls and a tool turn", lambda w: run_cli(*_gq("@/c.jsonl", *tpl)(w)),
        _chats("c.jsonl", [{"messages": [
            {"role": "system", "content": _words(i, 4)}, {"role": "user", "content": _words(i + 1)},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                "name": "f", "arguments": "{}"}}]},
            {"role": "tool", "content": _words(i + 2, 4)}, {"role": "assistant", "content": _words(i + 3)}]}
            for i in range(6)]), _maybe(export_ok()))
    add("chat20", "GPTQ on chats with --nsamples 6 (every record)", lambda w: run_cli(
        *_gq("@/c.jsonl", *tpl, "--nsamples", "6")(w)), _chats("c.jsonl", SYS_CHATS), valid(export_ok()))
    for label, data, setup, extra in [
        ("chats in a folder", "@/d", _chats("d/c.jsonl", SYS_CHATS), tpl),
        ("chats in a comma list with text.txt", "@/c.jsonl,@/text.txt", _chats("c.jsonl", SYS_CHATS), tpl),
        ("chats matched by a glob", "@/c*.jsonl", _chats("c.jsonl", SYS_CHATS), tpl),
        ("chats with --part train", "@/c.jsonl", _chats("c.jsonl", SYS_CHATS), (*tpl, "--part", "train")),
        ("chats with --nsamples 7 (six records)", "@/c.jsonl", _chats("c.jsonl", SYS_CHATS), (*tpl, "--nsamples", "7")),
        ("chats whose third record is a text record", "@/c.jsonl",
         _chats("c.jsonl", [*SYS_CHATS[:2], {"text": _words(9)}, *SYS_CHATS[3:]]), tpl),
        ("text records whose third record is a chat", "@/c.jsonl",
         _chats("c.jsonl", [{"text": _words(i, 40)} for i in range(2)] + [SYS_CHATS[0]]), ()),
        ("chats without a template anywhere", "@/c.jsonl", _chats("c.jsonl", SYS_CHATS), ()),
        ("chats whose records hold an empty messages list after the first", "@/c.jsonl",
         _chats("c.jsonl", [SYS_CHATS[0]] + [{"messages": []}] * 5), tpl),
    ]:
        add("chat20", f"bad chats: {label}", lambda w, d=data, e=extra: run_cli(*_gq(d, *e)(w)), setup)
    # the API's chat conventions
    add("chat20", "API data=a list of the chat records (chat_template=): the CLI's bytes", lambda w: quantize(
        w, data=SYS_CHATS, method="gptq", chat_template=str(w / "t.jinja")), ref, same, api=True)
    add("chat20", "API data=a Dataset of a messages column: the CLI's bytes", lambda w: quantize(
        w, data=_mem_ds({"messages": [r["messages"] for r in SYS_CHATS]}), method="gptq",
        chat_template=str(w / "t.jinja")), ref, same, api=True)
    add("chat20", "API data=a Dataset of messages and an id column: the CLI's bytes", lambda w: quantize(
        w, data=_mem_ds({"messages": [r["messages"] for r in SYS_CHATS], "id": list(range(6))}), method="gptq",
        chat_template=str(w / "t.jinja")), ref, same, api=True)
    add("chat20", "API data=the chats file path and the template in the tokenizer: the CLI's bytes",
        lambda w: quantize(w, data=str(w / "ref.jsonl"), method="gptq"), chain(ref, _template_in_config), same,
        api=True)
    add("chat20", "API data=a Dataset of messages and text columns", lambda w: quantize(
        w, data=_mem_ds({"messages": [r["messages"] for r in SYS_CHATS], "text": ["w1 w2"] * 6}), method="gptq",
        chat_template=str(w / "t.jinja")), ref, api=True)
    add("chat20", "API chat_template= beside data=[text]", lambda w: quantize(
        w, data=[_text(w)], method="gptq", chat_template=str(w / "t.jinja")), ref, api=True)


def _mem_ds(columns: dict):
    from datasets import Dataset

    return Dataset.from_dict(columns)


# ---------------------------------------------------------------- H. image-text records

def _vl(w: Path) -> None:
    """vl/ (image-text records, relative image paths) when the base has none."""
    if not (w / "vl" / "data.jsonl").is_file():
        from helpers import write_image_dataset

        write_image_dataset(w / "vl", n=4)


def _vl_records(w: Path, absolute: bool = True) -> list[dict]:
    out = []
    for line in (w / "vl" / "data.jsonl").read_text().splitlines():
        r = json.loads(line)
        if absolute:
            r["image"] = str(w / "vl" / r["image"])
        out.append(r)
    return out


def _vl_write(rel: str, transform: Callable[[Path, list], str]) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        (w / rel).parent.mkdir(parents=True, exist_ok=True)
        (w / rel).write_text(transform(w, _vl_records(w)))
    return setup


def _vlm_cases(out: Cases) -> None:
    add = out.add
    vlm = built("vlm", _save_vlm("qwen2_vl"))
    base = chain(vlm, _vl)
    ref = same_bytes(_gq("@/vl/data.jsonl", model="vlm", method=VGQ))
    lines = _vl_write
    for label, data, setup, kind in [
        ("the records with absolute image paths", "@/a.jsonl",
         lines("a.jsonl", lambda w, rs: "".join(json.dumps(r) + "\n" for r in rs)), "valid"),
        ("the records as one JSON array in a .json", "@/a.json", lines("a.json", lambda w, rs: json.dumps(rs)),
         "valid"),
        ("the records in a file named .txt", "@/a.txt",
         lines("a.txt", lambda w, rs: "".join(json.dumps(r) + "\n" for r in rs)), "valid"),
        ("the file moved to a sibling folder, paths ../vl/img/N.png", "@/other/a.jsonl",
         lines("other/a.jsonl", lambda w, rs: "".join(json.dumps({**r, "image": "../vl/" + str(
             Path(r["image"]).relative_to(w / "vl"))}) + "\n" for r in rs)), "valid"),
        ("the records with an 'id' field each", "@/a.jsonl",
         lines("a.jsonl", lambda w, rs: "".join(json.dumps({"id": i, **r}) + "\n" for i, r in enumerate(rs))), "valid"),
        ("the file reached through a symlink in another folder (relative paths)", "@/o/l.jsonl",
         lambda w: ((w / "o").mkdir(), (w / "o" / "l.jsonl").symlink_to(w / "vl" / "data.jsonl")), "maybe"),
        ("a copy of vl/ reached as ~/vl2/data.jsonl (HOME the case folder)", "~/vl2/data.jsonl",
         _copy("vl", "vl2"), "valid"),
    ]:
        add("vlm20", f"qwen2_vl GPTQ on {label}: the bytes of vl/data.jsonl",
            _in_env({"HOME": "@"}, _gq(data, model="vlm", method=VGQ)), chain(base, setup), tri(kind, ref))
    add("vlm20", "qwen2_vl API data=the records (absolute paths): the CLI's bytes", lambda w: quantize(
        w, model=str(w / "vlm"), data=_vl_records(w), method="gptq", seqlen=256), base, ref, api=True)
    caption_ref = same_bytes(_gq("@/vt.jsonl", model="vlm", method=VGQ))
    captions = _write("vt.jsonl", lambda w: "".join(json.dumps(r) + "\n" for r in _caption_records(w)))
    add("vlm20", "qwen2_vl API data=a Dataset of an Image column and captions: the CLI's bytes on the same records",
        lambda w: quantize(w, model=str(w / "vlm"), data=_image_ds(w), method="gptq", seqlen=256),
        chain(base, captions), caption_ref, api=True)
    add("vlm20", "qwen2_vl API data=a Dataset of image paths and captions: the CLI's bytes on the same records",
        lambda w: quantize(w, model=str(w / "vlm"), data=_image_ds(w, paths=True), method="gptq", seqlen=256),
        chain(base, captions), caption_ref, api=True)
    # 100 copies of the records: enough caption text for 2 x 256 tokens, so a reading of the captions alone (the
    # images dropped) is not refused for too little text
    add("vlm20", "qwen2_vl on a dataset saved to disk of image paths and captions (hf:DIR, 400 rows)", lambda w: run_cli(
        *_gq("hf:@/ds", model="vlm", method=VGQ)(w)), chain(base, _write("vt.jsonl", lambda w: "".join(
            json.dumps(r) + "\n" for r in _caption_records(w)) * 100), lambda w: __import__("datasets").concatenate_datasets(
                [_image_ds(w, paths=True)] * 100).save_to_disk(str(w / "ds"))), _maybe(caption_ref))
    add("vlm20", "a text model API data=image-text records", lambda w: quantize(w, data=_vl_records(w), method="gptq"),
        base, api=True)
    add("vlm20", "a text model API data=a Dataset with an Image column", lambda w: quantize(
        w, data=_image_ds(w), method="gptq"), base, api=True)
    add("vlm20", "importance on the VLM's records, then calibrate --calib-set: the default run's bytes",
        lambda w: run_cli("calibrate", w / "vlm", "--calib-set", w / "set", "--group-size", "32", "-o", w / "out"),
        chain(base, _set_from("@/vl/data.jsonl", model="vlm", seqlen="256")),
        _maybe(same_bytes(lambda w: ["calibrate", w / "vlm", "--calib", w / "vl" / "data.jsonl", "--nsamples", "2",
                                     "--seqlen", "256", "--group-size", "32", "-o", w / "out"])))


def _caption_records(w: Path) -> list[dict]:
    """vl/'s records as captions (a chat record's turns joined), absolute image paths: a Dataset holds one form."""
    return [{"image": r["image"], "text": r.get("text") or " ".join(m["content"] for m in r["messages"])}
            for r in _vl_records(w)]


def _image_ds(w: Path, paths: bool = False):
    """A Dataset of _caption_records: an 'image' column (Image feature, or path strings) and a 'text' column."""
    from datasets import Dataset, Image

    records = _caption_records(w)
    ds = Dataset.from_dict({"image": [r["image"] for r in records], "text": [r["text"] for r in records]})
    return ds if paths else ds.cast_column("image", Image())


# ---------------------------------------------------------------- I. eval and qid measure through each door

def eval_same(ref: Callable[[Path], list]):
    """A check of `eval --json`: loss and scored tokens equal the reference eval's."""
    def check(w: Path, result) -> str | None:
        other = run_cli(*ref(w))
        if other.exit_code != 0:
            return f"the reference eval failed: {other.output[-200:]}"
        a, b = json.loads(result.stdout), json.loads(other.stdout)
        if abs(a.get("loss", float("nan")) - b["loss"]) > 1e-6 or a.get("tokens") != b.get("tokens"):
            return f"loss/tokens {a.get('loss')}/{a.get('tokens')} vs the plain file's {b['loss']}/{b.get('tokens')}"
        return None
    check.valid = True
    return check


def _eval_cases(out: Cases) -> None:
    add = out.add
    for target in ("model", "ct"):
        def ev(data: str, *extra, t=target):
            return lambda w: ["eval", w / t, "--data", _at(w, data), "--seqlen", "16", "--json", *extra]
        for label, data, setup, extra in [
            ("a folder holding text.txt", "@/d", _copy("text.txt", "d/text.txt"), ()),
            ("a glob of text.txt", "@/tex*.txt", None, ()),
            ("one JSONL record of the text", "@/t.jsonl", _write("t.jsonl", _jsonl_of(lambda w: [_text(w)])), ()),
            ("a one-row dataset (hf:DIR)", "hf:@/ds", _saved("ds", lambda w: [_text(w)]), ()),
            ("a one-row dataset, --part all", "hf:@/ds", _saved("ds", lambda w: [_text(w)]), ("--part", "all")),
        ]:
            add("eval20", f"eval {target} on {label}: the loss and tokens of text.txt",
                lambda w, d=data, e=extra, ev=ev: run_cli(*ev(d, *e)(w)), setup, eval_same(ev("@/text.txt", *extra)))
    add("eval20", "eval of the heldout part of a folder of two files: the loss of the parts cut by hand",
        lambda w: run_cli("eval", w / "model", "--data", w / "d", "--seqlen", "16", "--json", "--part", "heldout"),
        chain(_two_files(), _write("h/a.txt", lambda w: _cut(_ab(w)[0], "heldout")),
              _write("h/b.txt", lambda w: _cut(_ab(w)[1], "heldout"))),
        eval_same(lambda w: ["eval", w / "model", "--data", w / "h", "--seqlen", "16", "--json", "--part", "all"]))
    add("eval20", "eval of a fake export moved to another folder: the loss of the fake export",
        lambda w: run_cli("eval", w / "moved", "--data", w / "text.txt", "--seqlen", "16", "--json"),
        _copy("fake", "moved"),
        eval_same(lambda w: ["eval", w / "fake", "--data", w / "text.txt", "--seqlen", "16", "--json"]))
    add("eval20", "eval of ct re-exported to fake: the loss of ct",
        lambda w: run_cli("eval", w / "f2", "--data", w / "text.txt", "--seqlen", "16", "--json"),
        lambda w: _ok(run_cli("export", w / "ct", "--format", "fake", "-o", w / "f2")),
        lambda w, r: _close(w, r, lambda w: ["eval", w / "ct", "--data", w / "text.txt", "--seqlen", "16", "--json"]))
    out[-1].valid = True
    add("eval20", "eval of ct through a symlink with a trailing slash: the loss of ct",
        lambda w: run_cli("eval", str(w / "cl") + "/", "--data", w / "text.txt", "--seqlen", "16", "--json"),
        _link("ct", "cl"),
        eval_same(lambda w: ["eval", w / "ct", "--data", w / "text.txt", "--seqlen", "16", "--json"]))
    for label, data, setup in [
        ("a folder holding text.txt", "@/d", _copy("text.txt", "d/text.txt")),
        ("a one-row dataset (hf:DIR)", "hf:@/ds", _saved("ds", lambda w: [_text(w)])),
        ("one JSONL record of the text", "@/t.jsonl", _write("t.jsonl", _jsonl_of(lambda w: [_text(w)]))),
    ]:
        add("qid20", f"qid measure --eval {label}: the losses of --eval text.txt",
            lambda w, d=data: run_cli(*_measure(_at(w, d), "m.csv")(w)), setup, _measure_same(_measure("@/text.txt",
                                                                                                       "ref.csv")))


def _ok(done) -> None:
    assert done.exit_code == 0, done.output[-300:]


def _close(w: Path, result, ref: Callable[[Path], list], tol: float = 1e-5) -> str | None:
    other = run_cli(*ref(w))
    if other.exit_code != 0:
        return f"the reference eval failed: {other.output[-200:]}"
    a, b = json.loads(result.stdout)["loss"], json.loads(other.stdout)["loss"]
    return None if abs(a - b) <= tol else f"loss {a} vs the reference's {b}"


def _measure(data: str, csv: str) -> Callable[[Path], list]:
    return lambda w: ["qid", "measure", w / "model", "--tokens", "1e6", "--eval", _at(w, data), "--bits", "4",
                      "--methods", "rtn", "--group-size", "32", "--eval-seqlen", "16", "--nsamples", "2",
                      "--calib-seqlen", "16", "--calib", w / "text.txt", "--no-progress", "-o", w / csv]


def _measure_same(ref: Callable[[Path], list]):
    def check(w: Path, result) -> str | None:
        import csv

        done = run_cli(*ref(w))
        if done.exit_code != 0:
            return f"the reference measure failed: {done.output[-200:]}"
        a = list(csv.DictReader((w / "m.csv").open()))
        b = list(csv.DictReader((w / "ref.csv").open()))
        if len(a) != 1 or len(b) != 1:
            return f"{len(a)} rows vs the reference's {len(b)}"
        for key in ("loss_fp", "loss_q", "qid"):
            if abs(float(a[0][key]) - float(b[0][key])) > 1e-9:
                return f"{key} {a[0][key]} vs the plain file's {b[0][key]}"
        return None
    check.valid = True
    return check


# ---------------------------------------------------------------- J. exports given back

def _export_cases(out: Cases) -> None:
    add = out.add

    def logits_equal(rel: str, ref_rel: str):
        def check(w: Path, result) -> str | None:
            import torch
            from fault_battery import TEXT_IDS

            import quantkit

            bad = export_ok(rel)(w, result)
            if bad:
                return bad
            ids = torch.tensor(TEXT_IDS)
            with torch.no_grad():
                a = quantkit.load_quantized(w / rel)(ids).logits
                b = quantkit.load_quantized(w / ref_rel)(ids).logits
            diff = (a - b).abs().max().item()
            return None if diff <= 1e-5 else f"logits {diff:.3g} away from {ref_rel}'s"
        check.valid = True
        return check
    for label, setup, src in [
        ("ct without its README.md and quantkit_report.json", chain(_copy("ct", "c2"), lambda w: [
            (w / "c2" / n).unlink(missing_ok=True) for n in ("README.md", "quantkit_report.json")]), "c2"),
        ("ct moved to a folder named with a space and ':'", _copy("ct", "c 2:x"), "c 2:x"),
        ("ct reached through a symlink", _link("ct", "cl"), "cl"),
        ("ct's files read-only", chain(_copy("ct", "c2"), lambda w: [os.chmod(p, 0o444) for p in (w / "c2").iterdir()]),
         "c2"),
    ]:
        add("export20", f"export of {label} to fake: the same tensors as ct's export to fake",
            lambda w, s=src: run_cli("export", w / s, "--format", "fake", "-o", w / "out"), chain(setup, lambda w: _ok(
                run_cli("export", w / "ct", "--format", "fake", "-o", w / "ref"))), _same_files("out", "ref"))
        add("export20", f"load_quantized of {label}: ct's logits", lambda w, s=src: __import__(
            "quantkit").load_quantized(w / s), setup, logits_equal(src, "ct"), api=True)
    add("export20", "export ct -> fake -> ct -> fake: the first fake's tensors", lambda w: run_cli(
        "export", w / "c2", "--format", "fake", "-o", w / "out"), lambda w: [_ok(run_cli(*a)) for a in (
            ["export", w / "ct", "--format", "fake", "-o", w / "f1"],
            ["export", w / "f1", "--format", "compressed-tensors", "-o", w / "c2"])], _same_files("out", "f1"))
    add("export20", "eval of ct with quantkit.json removed", lambda w: run_cli(
        "eval", w / "c2", "--data", w / "text.txt", "--seqlen", "16", "--json"),
        chain(_copy("ct", "c2"), lambda w: (w / "c2" / "quantkit.json").unlink()),
        _maybe(lambda w, r: _close(w, r, lambda w: ["eval", w / "ct", "--data", w / "text.txt", "--seqlen", "16",
                                                    "--json"])))
    add("export20", "an export given as --calib", lambda w: run_cli(*_gq("@/ct")(w)), None)
    add("export20", "an export's model.safetensors given as --calib", lambda w: run_cli(
        *_gq("@/ct/model.safetensors")(w)), None)
    add("export20", "an export's quantkit_report.json given as --calib", lambda w: run_cli(
        *_gq("@/ct/quantkit_report.json")(w)), None)
    add("export20", "an export given as --calib-set", lambda w: run_cli(
        "calibrate", w / "model", "--calib-set", w / "ct", "--group-size", "32", "-o", w / "out"), None)
    add("export20", "an export given as eval --data", lambda w: run_cli(
        "eval", w / "model", "--data", w / "ct", "--seqlen", "16"), None)


def _same_files(rel: str, ref_rel: str):
    def check(w: Path, result) -> str | None:
        a, b = _bytes_of(w / rel / "model.safetensors"), _bytes_of(w / ref_rel / "model.safetensors")
        return None if a and a == b else f"{rel}/model.safetensors differs from {ref_rel}'s"
    check.valid = True
    return check


# ---------------------------------------------------------------- K. qid law files and tables

def _qid_cases(out: Cases) -> None:
    add = out.add
    q = _law_qid(1e6, 1e8, 4)

    def predict(rel: str = "l.json"):
        return lambda w: run_cli("qid", "predict", "--law", w / rel, "--params", "1e6", "--bits", "4", "--tokens",
                                 "1e8", "--json")
    for label, body, kind in [
        ("extra keys (name, r2, method)", json.dumps({**LAW, "name": "mine", "r2": 0.99, "method": "gptq"}), "valid"),
        ("keys in another order", json.dumps(dict(reversed(list(LAW.items())))), "valid"),
        ("integers where floats are (k 2)", json.dumps({**LAW, "k": 2}), "valid"),
        ("a UTF-8 BOM", "\ufeff" + json.dumps(LAW), "maybe"),
        ("CRLF and indentation", json.dumps(LAW, indent=2).replace("\n", "\r\n"), "valid"),
        ("a draws list of the law itself", json.dumps({**LAW, "draws": [LAW, LAW]}), "maybe"),
        ("an empty draws list", json.dumps({**LAW, "draws": []}), "maybe"),
    ]:
        add("qid20", f"qid predict --law of a JSON law with {label}: QiD {q:.4g} by hand", predict(),
            _write("l.json", body), tri(kind, predicted(lambda: {"qid": q})))
    for label, body in [
        ("k as a string", json.dumps({**LAW, "k": "2"})),
        ("gamma true", json.dumps({**LAW, "gamma": True})),
        ("beta null", json.dumps({**LAW, "beta": None})),
        ("the law inside a list", json.dumps([LAW])),
        ("a trailing comma", json.dumps(LAW)[:-1] + ",}"),
        ("an empty file", ""),
        ("alpha Infinity", json.dumps({**LAW, "alpha": float("inf")})),
        ("k 1e308 (an answer past 20 nats)", json.dumps({**LAW, "k": 1e308})),
        ("a draws entry without beta", json.dumps({**LAW, "draws": [{"k": 2.0, "alpha": 0.5, "gamma": 1.5}]})),
        ("the law as YAML in a .json", "k: 2.0\nalpha: 0.5\nbeta: 0.25\ngamma: 1.5\n"),
    ]:
        add("qid20", f"bad qid predict law: {label}", predict(), _write("l.json", body))
    add("qid20", "bad qid predict law: a folder", predict("lawdir"), lambda w: (w / "lawdir").mkdir())
    add("qid20", "bad qid predict law: a fit table CSV", predict("t.csv"), _write("t.csv", _law_rows()))

    def fit(rel: str, *extra):
        return lambda w: run_cli("qid", "fit", w / rel, "--method", "gptq", "--law", "unified", "--bootstrap", "0",
                                 "--json", *extra)
    rows = _law_rows()
    header, *body = rows.splitlines(True)
    for label, text, kind in [
        ("a notes column at the end", header.rstrip("\n") + ",notes\n" + "".join(r.rstrip("\n") + ",x\n" for r in body),
         "valid"),
        ("a notes column first, holding commas in quotes", "notes," + header + "".join('"a, b",' + r for r in body),
         "valid"),
        ("the bits column as 4.0 (floats)", header + "".join(r.replace(",gptq,2,", ",gptq,2.0,") for r in body),
         "valid"),
        ("a blank line at the end and between rows", header + "\n".join(body) + "\n\n", "valid"),
    ]:
        add("qid20", f"qid fit of the law's rows with {label}: the law's parameters", fit("t.csv"),
            _write("t.csv", text), tri(kind, fit_recovers()))
    add("qid20", "qid fit of a qid fit's JSON", fit("fit.json"), chain(_write("t.csv", rows), lambda w: _ok(run_cli(
        "qid", "fit", w / "t.csv", "--method", "gptq", "--law", "unified", "--bootstrap", "0", "-o", w / "fit.json"))))
    add("qid20", "qid fit of a law JSON", fit("l.json"), _write("l.json", json.dumps(LAW)))
    add("qid20", "qid plot --fit of a hand-written law JSON", lambda w: run_cli(
        "qid", "plot", w / "t.csv", "--fit", w / "l.json", "--method", "gptq", "--format", "png", "-o", w / "figs"),
        chain(_write("t.csv", rows), _write("l.json", json.dumps(LAW))),
        _maybe(lambda w, r: None if any(p.stat().st_size for p in (w / "figs").rglob("*") if p.is_file())
               else "no figure written"))
    add("qid20", "qid plot --fit of a fit whose JSON was cut in half", lambda w: run_cli(
        "qid", "plot", w / "t.csv", "--fit", w / "fit.json", "--method", "gptq", "--format", "png", "-o", w / "figs"),
        chain(_write("t.csv", rows), lambda w: _ok(run_cli("qid", "fit", w / "t.csv", "--method", "gptq", "--law",
                                                           "unified", "--bootstrap", "0", "-o", w / "fit.json")),
              lambda w: (w / "fit.json").write_text((w / "fit.json").read_text()[:200])))


# ---------------------------------------------------------------- L. the API's data conventions

def _api_cases(out: Cases) -> None:
    add = out.add
    file_ref = same_bytes(_gq("@/text.txt"))
    for label, data in [
        ("[text] (one text: windows, as a file)", lambda w: [_text(w)]),
        ("a one-row Dataset", lambda w: _mem_ds({"text": [_text(w)]})),
        ("a one-row Dataset, text large_string", lambda w: _typed_ds([_text(w)], "large_string")),
        ("a one-row Dataset with format numpy", lambda w: _mem_ds({"text": [_text(w)]}).with_format("numpy")),
        ("a one-row Dataset with format torch", lambda w: _mem_ds({"text": [_text(w)]}).with_format("torch")),
        ("a one-row Dataset with format pandas", lambda w: _mem_ds({"text": [_text(w)]}).with_format("pandas")),
        ("a one-row Dataset with int, float and struct columns",
         lambda w: _mem_ds({"text": [_text(w)], "n": [1], "f": [0.5], "meta": [{"a": "x"}]})),
        ("a one-row Dataset taken from a DatasetDict['train']",
         lambda w: __import__("datasets").DatasetDict({"train": _mem_ds({"text": [_text(w)]})})["train"]),
        ("a one-row Dataset selected out of three", lambda w: _mem_ds({"text": ["w1 w2", _text(w), "w3"]}).select([1])),
        ("a os.PathLike object of text.txt", lambda w: _PathLike(w / "text.txt")),
        ("'hf:DIR' of a one-row dataset", lambda w: f"hf:{w}/ds"),
        ("the folder holding text.txt", lambda w: str(w / "d")),
        ("a plain calibration recipe path", lambda w: str(w / "plain.yaml")),
    ]:
        add("api20", f"API data={label}: the bytes of --calib text.txt", lambda w, d=data: quantize(
            w, data=d(w), method="gptq", output_dir=str(w / "out")),
            chain(_saved("ds", lambda w: [_text(w)]), _copy("text.txt", "d/text.txt"),
                  _write("plain.yaml", PLAIN.format("text.txt"))), file_ref, api=True)
    for label, data in [
        ("a Dataset of three texts", lambda w: _mem_ds({"text": _docs(w)})),
        ("a Dataset of three texts with format numpy", lambda w: _mem_ds({"text": _docs(w)}).with_format("numpy")),
        ("a Dataset of three texts, text large_string", lambda w: _typed_ds(_docs(w), "large_string")),
        ("a list of three {'text': ...} records", lambda w: [{"text": t} for t in _docs(w)]),
        ("three texts as numpy.str_ items", lambda w: [__import__("numpy").str_(t) for t in _docs(w)]),
    ]:
        kind = "maybe" if "records" in label else "valid"
        add("api20", f"API data={label}: the bytes of data=the list of the three texts", lambda w, d=data: quantize(
            w, data=d(w), method="gptq"), None, tri(kind, _api_list_ref()), api=True)
    for part in ("train", "heldout"):
        add("api20", f"API data=[text], part={part!r}: the bytes of data=[its {part} part cut by hand]",
            lambda w, p=part: quantize(w, data=[_text(w)], method="gptq", part=p), None,
            _api_ref(lambda w, p=part: [_cut(_text(w), p)]), api=True)
    add("api20", "API data=[Path('a.txt'), Path('b.txt')] (a list of paths)", lambda w: quantize(
        w, data=[w / "d" / "a.txt", w / "d" / "b.txt"], method="gptq"), _two_files(),
        _maybe(same_bytes(_gq("@/d/a.txt,@/d/b.txt"))), api=True)
    for label, data, setup in [
        ("a DatasetDict", lambda w: __import__("datasets").DatasetDict({"train": _mem_ds({"text": _docs(w)})}), None),
        ("a dict of columns {'text': [...]}", lambda w: {"text": _docs(w)}, None),
        ("[the path of text.txt] (a path in a list is a text)", lambda w: [str(w / "text.txt")], None),
        ("b'text.txt' (bytes)", lambda w: str(w / "text.txt").encode(), None),
        ("a Dataset with a text column of ints", lambda w: _mem_ds({"text": [1, 2, 3]}), None),
        ("a Dataset whose text rows are all empty strings", lambda w: _mem_ds({"text": ["", "", ""]}), None),
        ("a Dataset with an 'image' column of paths on a text model",
         lambda w: _mem_ds({"text": _docs(w), "image": ["x.png"] * 3}), None),
        ("a Dataset of 0 rows", lambda w: _mem_ds({"text": []}), None),
        ("'hf:DIR' of an empty-string row among three", lambda w: f"hf:{w}/ds",
         _saved("ds", lambda w: [_docs(w)[0], "", _docs(w)[1]])),
    ]:
        add("api20", f"API bad data: {label}", lambda w, d=data: quantize(w, data=d(w), method="gptq"), setup,
            api=True)
    add("api20", "API data= and calib_set= both", lambda w: quantize(
        w, data=str(w / "text.txt"), calib_set=str(w / "set"), method=None), _set_from("@/text.txt"), api=True)


class _PathLike:
    """An os.PathLike that is not a pathlib.Path (as some projects' path types are)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __fspath__(self) -> str:
        return str(self.path)


def _typed_ds(texts: list, dtype: str):
    from datasets import Dataset, Features, Value

    return Dataset.from_dict({"text": texts}, features=Features({"text": Value(dtype)}))


def _api_ref(texts: Callable[[Path], list]):
    """A check: out/ equals the API call on the list texts(w) with the same options."""
    def check(w: Path, result) -> str | None:
        quantize(w, data=texts(w), method="gptq", output_dir=str(w / "ref"))
        a, b = _bytes_of(w / "out" / "model.safetensors"), _bytes_of(w / "ref" / "model.safetensors")
        return None if a and a == b else "out/ differs from the call on the plain list"
    check.valid = True
    return check


def _api_list_ref():
    return _api_ref(_docs)


def twentieth_round() -> list:
    """Round 20's cases."""
    out = Cases()
    for part in (_text_door_cases, _multi_doc_cases, _hf_cases, _set_cases, _recipe_cases, _qrecipe_cases,
                 _resume_cases, _chat_cases, _vlm_cases, _eval_cases, _export_cases, _qid_cases, _api_cases):
        part(out)
    return out
