"""Round 14 of the fault battery (issue #22): a fresh set by another hand, run by fault_battery.py --rounds 14.

Rounds 1-13 tried most faults on one command (calibrate, mostly). This round crosses them: the same odd data
files given to importance, eval, demo and qid measure; odd tokenizer files in the model folder under calibrate,
eval and importance; odd states at the output path (the names the atomic writes use for their own temporary and
set-aside folders already taken, a FIFO, a file, a path under a file, an empty name) for every command that
writes; the Python API's device, dtype and keyword spellings; re-exports with odd --max-shard-size values; QiD
tables with duplicate rows, CRLF, semicolons and unicode headers given to qid plot and qid fit --by-bits.
Each case says what a right program does: refuse (one line, exit 2 / one QuantkitError, nothing left behind),
"maybe" (a refusal or a checked success), or "valid" (must be taken, and its result checked).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fault_battery import (
    EV,
    QID_HEADER,
    RTN,
    Cases,
    _maybe,
    api_same_as,
    both,
    build_qid_rows,
    csv_rows_ok,
    eval_ok,
    export_ok,
    json_edit,
    quantize,
    returned_ok,
    run_cli,
    set_ok,
    tri,
    valid,
    weights_close,
    write,
)


def _set_made(w: Path, result) -> str | None:
    return set_ok()(w, result)


def _demo_ok(w: Path, result) -> str | None:
    return None if (w / "out").is_dir() and any((w / "out").iterdir()) else "exit 0 but no out/"


def _measured(w: Path, result) -> str | None:
    return csv_rows_ok(w, result)


# ---------------------------------------------------------------- odd data files under the other commands

DATA_CMDS = {
    "importance": (lambda w, d: run_cli("importance", w / "model", "--calib", d, "--nsamples", "2", "--seqlen", "16",
                                        "-o", w / "set"), _set_made),
    "eval": (lambda w, d: run_cli("eval", w / "model", "--data", d, *EV), eval_ok),
    "demo": (lambda w, d: run_cli("demo", "--model", w / "model", "--data", d, "--seqlen", "16", "--nsamples", "2",
                                  "--format", "fake", "-o", w / "out"), _demo_ok),
    "qid measure": (lambda w, d: run_cli("qid", "measure", w / "model", "--eval", d, "--eval-tokens", "64",
                                         "--eval-seqlen", "16", "--methods", "rtn", "--bits", "4", "--nsamples", "2",
                                         "--calib-seqlen", "16", "--group-size", "32", "--tokens", "1e9",
                                         "--no-progress", "-o", w / "m.csv"), _measured),
}


def _text(w: Path) -> str:
    return (w / "text.txt").read_text()


def _put(rel: str, make):
    """A setup writing rel from the case folder (make(w) -> str or bytes)."""
    def setup(w: Path) -> None:
        content = make(w)
        path = w / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return setup


def _empty_txts(w: Path) -> None:
    (w / "dd").mkdir()
    for name in ("a.txt", "b.txt"):
        (w / "dd" / name).write_text("")


DATA_FAULTS = [  # (name, the data path relative to w, setup, kind)
    ("only spaces, tabs and newlines", "d.txt", write("d.txt", " \t \n\n  \t\n" * 200), "refuse"),
    ("one 6000-word line with no newline", "d.txt", _put("d.txt", lambda w: " ".join(_text(w).split()[:6000])),
     "valid"),
    ("UTF-16-LE with a BOM", "d.txt", _put("d.txt", lambda w: ("\ufeff" + _text(w)).encode("utf-16-le")), "maybe"),
    ("Latin-1 bytes (an invalid UTF-8 byte) mid-text", "d.txt", _put("d.txt", lambda w: _text(w)[:400].encode()
                                                                   + b" caf\xe9 " + _text(w)[400:].encode()), "maybe"),
    ("only NUL bytes", "d.txt", write("d.txt", b"\x00" * 4000), "refuse"),
    ("a .jsonl whose records' text is ''", "d.jsonl", write("d.jsonl", '{"text": ""}\n' * 6), "refuse"),
    ("a .jsonl whose records' text is 5", "d.jsonl", write("d.jsonl", '{"text": 5}\n' * 6), "refuse"),
    ("a .jsonl with a truncated last line", "d.jsonl", _put("d.jsonl", lambda w: "".join(
        json.dumps({"text": line}) + "\n" for line in _text(w).splitlines() if line.strip()) + '{"text": "w1 w'),
     "refuse"),
    ("a directory holding only empty .txt files", "dd", _empty_txts, "refuse"),
    ("a glob matching nothing", "nothing*.txt", None, "refuse"),
    ("a CRLF copy of text.txt", "d.txt", _put("d.txt", lambda w: _text(w).replace("\n", "\r\n").encode()), "valid"),
    ("a .json array of {'text'} records", "d.json", _put("d.json", lambda w: json.dumps(
        [{"text": line} for line in _text(w).splitlines() if line.strip()])), "maybe"),
    ("ten words (under one 16-token window)", "d.txt", write("d.txt", "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10\n"), "refuse"),
    ("a .jsonl of {'messages'} chats (the model has no chat template, none given)", "d.jsonl", write(
        "d.jsonl", "".join(json.dumps({"messages": [{"role": "user", "content": "w1 w2 w3 " * 8},
                                                    {"role": "assistant", "content": "w4 w5 " * 8}]}) + "\n"
                           for _ in range(4))), "refuse"),
]


def _data_cases(out: Cases) -> None:
    for command, (run, ok) in DATA_CMDS.items():
        for name, rel, setup, kind in DATA_FAULTS:
            out.add("data14", f"{command}: {name}", lambda w, r=run, rel=rel: r(w, w / rel), setup, tri(kind, ok))


# ---------------------------------------------------------------- odd tokenizer files in the model folder

def _tok_cfg(**fields):
    return json_edit("model/tokenizer_config.json", lambda d: d.update(fields))


def _tok_json(edit):
    return json_edit("model/tokenizer.json", edit)


def _truncate_tok(w: Path) -> None:
    path = w / "model" / "tokenizer.json"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _added_500(d: dict) -> None:
    d.setdefault("added_tokens", []).append({"id": 500, "content": "w1", "single_word": False, "lstrip": False,
                                             "rstrip": False, "normalized": False, "special": False})


CHATS = "".join(json.dumps({"messages": [{"role": "user", "content": "w1 w2 w3 " * 6},
                                         {"role": "assistant", "content": "w4 w5 w6 " * 6}]}) + "\n" for _ in range(4))

TOK_FAULTS = [  # (name, setup, data, kind)
    ("a chat_template that raises, plain text (the template unused)",
     _tok_cfg(chat_template="{{ raise_exception('no') }}"), "text.txt", "valid"),
    ("a chat_template that raises, chat records", both(
        _tok_cfg(chat_template="{{ raise_exception('no') }}"), write("c.jsonl", CHATS)), "c.jsonl", "refuse"),
    ("a chat_template with a syntax error, chat records", both(
        _tok_cfg(chat_template="{% for m in messages %}{{ m.content }"), write("c.jsonl", CHATS)), "c.jsonl",
     "refuse"),
    ("a chat_template rendering nothing, chat records", both(_tok_cfg(chat_template="{# nothing #}"),
                                                              write("c.jsonl", CHATS)), "c.jsonl", "refuse"),
    ("chat_template a list of named templates, chat records", both(_tok_cfg(chat_template=[
        {"name": "default", "template": "{% for m in messages %}{{ m.content }} {% endfor %}"}]),
        write("c.jsonl", CHATS)), "c.jsonl", "maybe"),
    ("eos_token '<nope>' (not in the vocabulary)", _tok_cfg(eos_token="<nope>"), "text.txt", "maybe"),
    ("pad_token the eos token", _tok_cfg(pad_token="<eos>"), "text.txt", "valid"),
    ("bos_token '<eos>' and add_bos_token true", _tok_cfg(bos_token="<eos>", add_bos_token=True), "text.txt",
     "maybe"),
    ("tokenizer.json cut in half", _truncate_tok, "text.txt", "refuse"),
    ("tokenizer_config.json a JSON list", write("model/tokenizer_config.json", "[1, 2]"), "text.txt", "refuse"),
    ("model_max_length 4 (under seqlen 16)", _tok_cfg(model_max_length=4), "text.txt", "maybe"),
    ("an added token 'w1' with id 500 (past the 64 rows)", _tok_json(_added_500), "text.txt", "refuse"),
    ("tokenizer.json deleted (tokenizer_config.json left)", lambda w: (w / "model" / "tokenizer.json").unlink(),
     "text.txt", "refuse"),
    ("tokenizer.json's vocabulary emptied", _tok_json(lambda d: d["model"].update(vocab={})), "text.txt", "refuse"),
]


TOK_CMDS = {
    "calibrate": (lambda w, d: run_cli("calibrate", w / "model", "--calib", w / d, *RTN, "-o", w / "out"),
                  export_ok()),
    "eval": (lambda w, d: run_cli("eval", w / "model", "--data", w / d, *EV), eval_ok),
    "importance": (lambda w, d: run_cli("importance", w / "model", "--calib", w / d, "--nsamples", "2", "--seqlen",
                                        "16", "-o", w / "set"), _set_made),
}


def _tok_cases(out: Cases) -> None:
    for command, (run, ok) in TOK_CMDS.items():
        for name, setup, data, kind in TOK_FAULTS:
            out.add("tok14", f"{command}: {name}", lambda w, r=run, d=data: r(w, d), setup, tri(kind, ok))


# ---------------------------------------------------------------- odd states at the output path

def _dir_writers():
    """Commands writing a folder: (name, args of (w, out, overwrite), check of the written folder)."""
    return {
        "calibrate": (lambda w, o, ow: ["calibrate", w / "model", "--calib", w / "text.txt", *RTN, "-o", o, *ow],
                      lambda o: lambda w, r: export_ok(o)(w, r)),
        "export": (lambda w, o, ow: ["export", w / "ct", "--format", "gptq", "-o", o, *ow],
                   lambda o: lambda w, r: export_ok(o)(w, r)),
        "importance": (lambda w, o, ow: ["importance", w / "model", "--calib", w / "text.txt", "--nsamples", "2",
                                         "--seqlen", "16", "-o", o, *ow],
                       lambda o: lambda w, r: None if (w / o / "manifest.json").is_file() else f"no {o}/manifest.json"),
        "demo": (lambda w, o, ow: ["demo", "--model", w / "model", "--data", w / "text.txt", "--seqlen", "16",
                                   "--nsamples", "2", "--format", "fake", "-o", o, *ow],
                 lambda o: lambda w, r: None if (w / o).is_dir() and any((w / o).iterdir()) else f"no {o}/"),
        "qid plot": (lambda w, o, ow: ["qid", "plot", w / "q.csv", "--format", "png", "-o", o],
                     lambda o: lambda w, r: None if list((w / o).glob("*.png")) else f"no figures in {o}/"),
    }


def _file_writers():
    return {
        "eval -o": (lambda w, o: ["eval", w / "model", "--data", w / "text.txt", *EV, "-o", o],
                    lambda o: lambda w, r: None if json.loads((w / o).read_text()) else f"{o} empty"),
        "qid fit -o": (lambda w, o: ["qid", "fit", w / "q.csv", "--bootstrap", "0", "-o", o],
                       lambda o: lambda w, r: None if json.loads((w / o).read_text()).get("fits") else f"{o}: no fits"),
    }


def _intact(rel: str, also):
    """A check: `also` holds, and rel (the user's own entry beside the output) is still there, unchanged."""
    def check(w: Path, result) -> str | None:
        bad = also(w, result)
        if bad:
            return bad
        path = w / rel
        if not os.path.lexists(path):
            return f"{rel} (the user's, beside the output) was removed"
        if path.is_file() and path.read_bytes() != b"mine":
            return f"{rel} (the user's) was changed"
        if path.is_dir() and not (path / "keep.txt").is_file():
            return f"{rel}/keep.txt (the user's) was removed"
        return None
    return check


def _prior_out(command: str, run):
    """out/ made before by the same command (so --overwrite has something to set aside)."""
    def setup(w: Path) -> None:
        done = run_cli(*run(w, w / "out", []))
        assert done.exit_code == 0, done.output[-300:]
    return setup


def _out_cases(out: Cases) -> None:
    add = out.add
    pid = os.getpid()  # the battery runs the CLI in-process: its set-aside folder is .out.old-PID
    for command, (args, made) in _dir_writers().items():
        ow = ["--overwrite"] if command not in ("qid plot",) else []
        if command != "qid plot":
            for name, setup in [
                (".out.old-PID a non-empty folder (PID the running process's: --overwrite sets out/ aside there)", lambda w: (
                    (w / f".out.old-{pid}").mkdir(), (w / f".out.old-{pid}" / "keep.txt").write_text("mine"))),
                (".out.old-PID a file", write(f".out.old-{pid}", "mine")),
            ]:
                add("out14", f"{command} --overwrite of out/ with {name}", lambda w, a=args, o=ow: run_cli(
                    *a(w, w / "out", o)), both(_prior_out(command, args), setup),
                    valid(_intact(f".out.old-{pid}", made("out"))))
        add("out14", f"{command} -o out with a folder '.out.tmp-x' beside it (a temp-like name)",
            lambda w, a=args: run_cli(*a(w, w / "out", [])), lambda w: (
                (w / ".out.tmp-x").mkdir(), (w / ".out.tmp-x" / "keep.txt").write_text("mine")),
            valid(_intact(".out.tmp-x", made("out"))))
        add("out14", f"{command} -o out with a file 'out.partial' beside it", lambda w, a=args: run_cli(
            *a(w, w / "out", [])), write("out.partial", "mine"), valid(_intact("out.partial", made("out"))))
        add("out14", f"{command} -o a FIFO", lambda w, a=args: run_cli(*a(w, w / "fifo", [])),
            lambda w: os.mkfifo(w / "fifo"))
        add("out14", f"{command} -o an existing empty file", lambda w, a=args: run_cli(*a(w, w / "f", [])),
            write("f", ""))
        add("out14", f"{command} -o a path under a regular file (text.txt/out)", lambda w, a=args: run_cli(
            *a(w, w / "text.txt" / "out", [])))
        add("out14", f"{command} -o '' (an empty name)", lambda w, a=args: run_cli(*a(w, "", [])))
        add("out14", f"{command} -o a path through a dangling symlink (gone/x)", lambda w, a=args: run_cli(
            *a(w, w / "ln" / "x", [])), lambda w: (w / "ln").symlink_to(w / "gone"),
            _maybe(made("ln/x")))
    for command, (args, made) in _file_writers().items():
        add("out14", f"{command} an existing folder", lambda w, a=args: run_cli(*a(w, w / "dir")),
            lambda w: (w / "dir").mkdir())
        add("out14", f"{command} a name with a trailing slash (r.json/)", lambda w, a=args: run_cli(
            *a(w, str(w / "r.json") + "/")))
        add("out14", f"{command} a path under a regular file (text.txt/r.json)", lambda w, a=args: run_cli(
            *a(w, w / "text.txt" / "r.json")))
        add("out14", f"{command} '' (an empty name)", lambda w, a=args: run_cli(*a(w, "")))
        add("out14", f"{command} with a folder '.r.json.tmp-x' beside it", lambda w, a=args: run_cli(
            *a(w, w / "r.json")), lambda w: ((w / ".r.json.tmp-x").mkdir(),
                                             (w / ".r.json.tmp-x" / "keep.txt").write_text("mine")),
            valid(_intact(".r.json.tmp-x", made("r.json"))))
        add("out14", f"{command} a new file in a new folder (new/r.json)", lambda w, a=args: run_cli(
            *a(w, w / "new" / "r.json")), None, valid(made("new/r.json")))
        add("out14", f"{command} a read-only existing file", lambda w, a=args: run_cli(*a(w, w / "r.json")),
            lambda w: ((w / "r.json").write_text("mine"), (w / "r.json").chmod(0o444)),
            _maybe(made("r.json")))


# ---------------------------------------------------------------- the API's device, dtype and keyword spellings

def _api_cases(out: Cases) -> None:
    import numpy as np
    import torch

    api = out.api
    same = api_same_as({})
    for name, kw, kind in [
        ("device='cuda' on a machine without CUDA", dict(device="cuda"), "refuse"),
        ("device='cuda:0' on a machine without CUDA", dict(device="cuda:0"), "refuse"),
        ("device=torch.device('cuda', 1) without CUDA", dict(device=torch.device("cuda", 1)), "refuse"),
        ("device='mps' (no MPS here)", dict(device="mps"), "refuse"),
        ("device='meta'", dict(device="meta"), "refuse"),
        ("device=0 (an int: CUDA 0)", dict(device=0), "refuse"),
        ("device='' (an empty name)", dict(device=""), "refuse"),
        ("device='gpu' (no such torch device)", dict(device="gpu"), "refuse"),
        ("device='cpu:1' equals cpu", dict(device="cpu:1"), "maybe"),
        ("device='CPU' equals cpu", dict(device="CPU"), "maybe"),
        ("device=None equals the default", dict(device=None), "maybe"),
        ("dtype='int8' (not a float type)", dict(dtype="int8"), "refuse"),
        ("dtype=torch.int8", dict(dtype=torch.int8), "refuse"),
        ("dtype=5", dict(dtype=5), "refuse"),
        ("dtype='float32' equals the default", dict(dtype="float32"), "maybe"),
        ("dtype=torch.float32 equals the default", dict(dtype=torch.float32), "maybe"),
        ("dtype='auto' equals the default", dict(dtype="auto"), "valid"),
        ("bits=np.int64(4) equals bits 4", dict(bits=np.int64(4)), "valid"),
        ("group_size=np.int64(32) equals 32", dict(group_size=np.int64(32)), "valid"),
        ("nsamples=np.int32(2) equals 2", dict(nsamples=np.int32(2)), "valid"),
        ("seqlen=torch.tensor(16) equals 16", dict(seqlen=torch.tensor(16)), "maybe"),
        ("bits=4.0 equals 4", dict(bits=4.0), "maybe"),
        ("bits=4.5", dict(bits=4.5), "refuse"),
        ("bits=True", dict(bits=True), "refuse"),
        ("group_size=32.5", dict(group_size=32.5), "refuse"),
        ("seed=2**70", dict(seed=2 ** 70), "maybe"),
        ("format='GPTQ' (capitals)", dict(format="GPTQ"), "maybe"),
        ("format='compressed_tensors' (underscore)", dict(format="compressed_tensors"), "maybe"),
        ("format='safetensors'", dict(format="safetensors"), "refuse"),
        ("method='RTN' (capitals)", dict(method="RTN"), "maybe"),
        ("method='rtn ' (a trailing space)", dict(method="rtn "), "maybe"),
        ("method=''", dict(method=""), "refuse"),
        ("an unknown keyword nsample=2 (a typo)", dict(nsample=2), "refuse"),
        ("a keyword 'group-size' (a CLI spelling)", {"group-size": 32}, "refuse"),
        ("a keyword 'output' (not output_dir)", dict(output="x"), "refuse"),
    ]:
        def check_of(kw=kw, kind=kind):
            if kind == "refuse":
                return None
            if any(k in kw for k in ("format", "progress", "reload")):
                return tri(kind, lambda w, r: export_ok()(w, r))
            return tri(kind, same)
        api(f"api14 {name}", lambda w, k=kw: quantize(w, **k), check=check_of())
    # keywords around the model and tokenizer
    api("api14 a loaded model, its tokenizer loaded, output_dir None: a quantized model returned",
        lambda w: quantize(w, model=__import__("transformers").AutoModelForCausalLM.from_pretrained(w / "model"),
                           tokenizer_or_processor=__import__("transformers").AutoTokenizer.from_pretrained(
                               w / "model"), output_dir=None), check=valid(returned_ok))
    api("api14 tokenizer_or_processor a loaded tokenizer equals none given", lambda w: quantize(
        w, tokenizer_or_processor=__import__("transformers").AutoTokenizer.from_pretrained(w / "model")),
        check=valid(same))
    api("api14 tokenizer_or_processor a missing folder", lambda w: quantize(w, tokenizer_or_processor=str(w / "gone")))
    api("api14 tokenizer_or_processor a file (text.txt)", lambda w: quantize(w, tokenizer_or_processor=str(
        w / "text.txt")))
    api("api14 tokenizer_or_processor the ct export (another folder with the same tokenizer)", lambda w: quantize(
        w, tokenizer_or_processor=str(w / "ct")), check=_maybe(same))
    api("api14 tokenizer_or_processor a dict", lambda w: quantize(w, tokenizer_or_processor={"vocab": {}}))
    api("api14 model a Path equals it as a str", lambda w: quantize(w, model=w / "model"), check=valid(same))
    api("api14 model a loaded model in float16 (dtype kept), output_dir set", lambda w: quantize(
        w, model=__import__("transformers").AutoModelForCausalLM.from_pretrained(w / "model",
                                                                                  torch_dtype=torch.float16)),
        check=_maybe(lambda w, r: export_ok()(w, r)))
    api("api14 model a loaded model already on the meta device", lambda w: quantize(
        w, model=__import__("transformers").AutoModelForCausalLM.from_pretrained(w / "model").to("meta")))
    api("api14 model the tokenizer (a loaded tokenizer as the model)", lambda w: quantize(
        w, model=__import__("transformers").AutoTokenizer.from_pretrained(w / "model")))
    api("api14 model a torch.nn.Linear", lambda w: quantize(w, model=torch.nn.Linear(64, 64)))
    api("api14 model the ct export (already quantized)", lambda w: quantize(w, model=str(w / "ct")))
    api("api14 output_dir the model's own folder", lambda w: quantize(w, output_dir=str(w / "model")))
    api("api14 output_dir an existing file", lambda w: quantize(w, output_dir=str(w / "text.txt")))
    api("api14 output_dir a Path under a regular file", lambda w: quantize(w, output_dir=w / "text.txt" / "o"))


# ---------------------------------------------------------------- re-exports with odd shard sizes

def _exp_cases(out: Cases) -> None:
    add = out.add
    # head/ has lm_head quantized, which a GPTQ checkpoint cannot hold: it goes to fake
    for src, fmt in [("ct", "gptq_v2"), ("gptq", "compressed-tensors"), ("asym", "gptq"), ("head", "fake")]:
        for size, kind in [("1KB", "valid"), ("0", "refuse"), ("-5MB", "refuse"), ("5GiB", "maybe"),
                           ("nan", "refuse")]:
            good = weights_close("out", src, 1e-6)
            add("exp14", f"export {src} --format {fmt} --max-shard-size {size!r}", lambda w, s=src, f=fmt, z=size:
                run_cli("export", w / s, "--format", f, "--max-shard-size", z, "-o", w / "out"), None, tri(kind, good))
    add("exp14", "export a8 (W8A8) --format gptq (no activation quantization in gptq)", lambda w: run_cli(
        "export", w / "a8", "--format", "gptq", "-o", w / "out"))
    add("exp14", "export a8 (W8A8) --format gptq_v2", lambda w: run_cli(
        "export", w / "a8", "--format", "gptq_v2", "-o", w / "out"))
    add("exp14", "export gptq -> ct -> gptq equals gptq", lambda w: (
        run_cli("export", w / "gptq", "--format", "compressed-tensors", "-o", w / "mid"),
        run_cli("export", w / "mid", "--format", "gptq", "-o", w / "out"))[1], None,
        valid(weights_close("out", "gptq", 1e-6)))
    add("exp14", "export of the fp model (not quantized) --format gptq", lambda w: run_cli(
        "export", w / "model", "--format", "gptq", "-o", w / "out"))
    add("exp14", "export of a 1KB-sharded export back to one file equals the source", lambda w: (
        run_cli("export", w / "ct", "--format", "compressed-tensors", "--max-shard-size", "1KB", "-o", w / "mid"),
        run_cli("export", w / "mid", "--format", "compressed-tensors", "-o", w / "out"))[1], None,
        valid(weights_close("out", "ct", 1e-6)))


# ---------------------------------------------------------------- QiD tables under plot and fit --by-bits

def _qid_body(kind: str) -> str | bytes:
    body = QID_HEADER + build_qid_rows()
    rows = body.strip().split("\n")
    return {
        "dup": "\n".join(rows + rows[1:4]) + "\n",
        "dupall": "\n".join(rows + rows[1:]) + "\n",
        "crlf": body.replace("\n", "\r\n"),
        "semi": body.replace(",", ";"),
        "bom": "\ufeff" + body,
        "uhead": body.replace("model,", "modèl,", 1),
        "tab": body.replace(",", "\t"),
        "cr": body.replace("\n", "\r"),
        "u16": body.encode("utf-16"),
        "quotedhdr": body.replace(QID_HEADER, ",".join(f'"{c}"' for c in QID_HEADER.strip().split(",")) + "\n"),
        "trailing": "\n".join(r + "," for r in rows) + "\n",
        "nul": body.replace("\n", "\n\x00", 1),
    }[kind]


def _plot_ok(w: Path, result) -> str | None:
    return None if list((w / "figs").glob("*.png")) else "no figures"


def _fit_ok(w: Path, result) -> str | None:
    doc = json.loads(result.stdout)
    return None if doc.get("fits") else "no fits"


def _qid_cases(out: Cases) -> None:
    add = out.add
    for kind, name, verdict in [
        ("dup", "three rows repeated", "maybe"), ("dupall", "every row twice", "maybe"),
        ("crlf", "CRLF line ends", "valid"), ("semi", "semicolons for commas", "refuse"),
        ("bom", "a UTF-8 BOM", "valid"), ("uhead", "a unicode header 'modèl' for 'model' (an optional column)", "maybe"),
        ("tab", "tabs for commas", "refuse"),
        ("u16", "UTF-16 with a BOM", "maybe"), ("quotedhdr", "every header cell quoted", "valid"),
        ("trailing", "a trailing comma on every row", "maybe"),
    ]:
        body = _qid_body(kind)
        add("qid14", f"plot: {name}", lambda w: run_cli("qid", "plot", w / "t.csv", "--format", "png", "-o",
                                                        w / "figs"), write("t.csv", body), tri(verdict, _plot_ok))
        add("qid14", f"fit --by-bits: {name}", lambda w: run_cli("qid", "fit", w / "t.csv", "--by-bits", "--bootstrap",
                                                                 "0", "--json"), write("t.csv", body),
            tri(verdict, _fit_ok))


def fourteenth_round() -> list:
    """Round 14's cases."""
    out = Cases()
    _data_cases(out)
    _tok_cases(out)
    _out_cases(out)
    _api_cases(out)
    _exp_cases(out)
    _qid_cases(out)
    return out

