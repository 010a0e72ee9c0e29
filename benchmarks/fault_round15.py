"""Round 15 of the fault battery (issue #22): a fresh set by another hand, run by fault_battery.py --rounds 15.

Areas none of rounds 1-14 tried: lm-evaluation-harness tasks of your own (`eval --tasks --include-path`) in odd
shapes (empty or missing data, fields missing, labels out of range, generate_until and loglikelihood_rolling
tasks, groups, includes, !function tags, limits and few-shot counts past the documents); names at the length limits
(a 239-byte output name, the longest the atomic writes leave room for, in ASCII and in two-byte characters;
255-byte input names of every kind; paths past PATH_MAX and components past NAME_MAX that do not exist); option
spellings (=value, attached short options, em dashes from copied docs, abbreviations, flags given values, options
before the subcommand, typos and extra arguments on every command, stdin's '-'); models whose shapes are not
multiples of 8 or of the group (vocabulary 63, MLP 36 or 40 wide, hidden 48, one KV head, an explicit head_dim),
tied embeddings under each format, biases on attention and MLP; generation_config.json and tokenizer_config.json
fields real checkpoints carry; the API given a PeftModel, a merged one, a pruned or weight-normed linear, stale
.grad tensors, gradient checkpointing, hooks; runs killed by SIGKILL and then run again into the same output;
environments: PYTHONHASHSEED, an ASCII-only locale without UTF-8 mode or coercion, umask 027/002, stdin as data.
Each case says what a right program does: refuse (one line, exit 2 / one QuantkitError, nothing left behind),
"maybe" (a refusal or a checked success), or "valid" (must be taken, and its result checked).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
from pathlib import Path

import yaml
from fault_battery import (
    EV,
    GPTQ,
    QID_HEADER,
    QUANTKIT_BIN,
    RTN,
    Cases,
    Ran,
    _maybe,
    _plain_loads_like,
    _progress_shown,
    both,
    build_qid_rows,
    cal_ref,
    child,
    csv_rows_ok,
    eval_close_to,
    eval_ok,
    export_ok,
    interrupted,
    json_edit,
    quantize,
    returned_ok,
    run_cli,
    same_as,
    set_ok,
    then,
    tri,
    valid,
    weights_close,
    write,
)
from helpers import make_tokenizer, tiny_model
from helpers import run_cli as raw_cli


def _json_out(result) -> dict:
    """The last stdout line that is a JSON object (lm-evaluation-harness may print before it)."""
    for line in reversed(result.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON object on stdout: {result.stdout[-200:]!r}")


# ---------------------------------------------------------------- A. your own lm-evaluation-harness tasks

LL_RECS = [{"context": "w1 w2", "continuation": " w3"}, {"context": "w4", "continuation": " w5 w6"},
           {"context": "w7 w8 w9", "continuation": " w10"}]
MC_RECS = [{"q": "w1 w2", "choices": ["w3", "w4"], "label": 0}, {"q": "w5", "choices": ["w6", "w7", "w8"], "label": 2},
           {"q": "w9 w10", "choices": ["w11", "w12"], "label": 1}]
PPL = [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}]


def _ll(w: Path, name: str) -> dict:
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(w / f"{name}.jsonl")}},
            "test_split": "test", "output_type": "loglikelihood", "doc_to_text": "context",
            "doc_to_target": "continuation", "metric_list": PPL, "metadata": {"version": 1.0}}


def _mc(w: Path, name: str) -> dict:
    return {**_ll(w, name), "output_type": "multiple_choice", "doc_to_text": "q", "doc_to_choice": "choices",
            "doc_to_target": "label", "metric_list": [{"metric": "acc", "aggregation": "mean",
                                                       "higher_is_better": True}]}


def task(name: str = "qk", kind=_ll, records=LL_RECS, data: str | bytes | None = None, raw: str = "",
         folder: str = "tasks", yaml_name: str | None = None, **fields):
    """A setup: folder/NAME.yaml (kind's fields, `fields` on top, None deleting one, `raw` lines after) and
    NAME.jsonl (records, or `data` as written)."""
    def setup(w: Path) -> None:
        (w / folder).mkdir(parents=True, exist_ok=True)
        doc = kind(w, name)
        for key, value in fields.items():
            if value is None:
                doc.pop(key, None)
            else:
                doc[key] = value
        (w / folder / f"{yaml_name or name}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False) + raw)
        path = w / f"{name}.jsonl"
        if data is None:
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
        else:
            path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return setup


def tasks_ok(*names: str):
    """A check: --json's tasks holds each name with at least one metric, every metric a finite number."""
    def check(w: Path, result) -> str | None:
        doc = _json_out(result)
        for name in names:
            metrics = {k: v for k, v in doc.get("tasks", {}).get(name, {}).items()
                       if "stderr" not in k and k != "alias"}
            if not metrics:
                return f"no metrics for {name}: {str(doc)[:200]}"
            bad = {k: v for k, v in metrics.items() if not (isinstance(v, (int, float)) and math.isfinite(v))}
            if bad:
                return f"{name}: metrics not finite: {bad}"
        return None
    return check


def _tev(*extra, target: str = "model", tasks: str = "qk", include: str = "tasks"):
    return lambda w: run_cli("eval", w / target, "--tasks", tasks, "--include-path", w / include, "--json", *extra)


def _task_cases(out: Cases) -> None:
    add = out.add
    ok = tasks_ok("qk")
    for name, setup, run, kind in [
        ("a loglikelihood task of 3 records (the control)", task(), _tev(), "valid"),
        ("the task on the compressed-tensors export", task(), _tev(target="ct"), "valid"),
        ("the task on the fake W3 export", task(), _tev(target="fake"), "valid"),
        ("the task on the GPTQ export", task(), _tev(target="gptq"), "valid"),
        ("--batch-size 2 over 3 records", task(), _tev("--batch-size", "2"), "valid"),
        ("the YAML in a subfolder of --include-path", task(folder="tasks/sub"), _tev(), "valid"),
        ("--include-path a symlink to the task folder", both(task(folder="real"), lambda w: (w / "tasks").symlink_to(
            w / "real")), _tev(), "valid"),
        ("--include-path a folder named with 255 bytes", task(folder="t" * 255), _tev(include="t" * 255), "valid"),
        ("the YAML named otherwise than its task (mine.yaml, task: qk)", task(yaml_name="mine"), _tev(), "valid"),
        ("-o r.json beside --json", task(), lambda w: run_cli("eval", w / "model", "--tasks", "qk", "--include-path",
                                                              w / "tasks", "--json", "-o", w / "r.json"), "valid"),
        ("--limit 0.5 (a fraction of the documents, as lm-eval reads it)", task(), _tev("--limit", "0.5"), "maybe"),
        ("--limit 2.5 (a fraction above 1)", task(), _tev("--limit", "2.5"), "maybe"),
        ("--limit 1e9 (more than the documents)", task(), _tev("--limit", "1e9"), "maybe"),
        ("--num-fewshot 10 with 3 documents", task(), _tev("--num-fewshot", "10"), "maybe"),
        ("--tasks qk,qk (a task named twice)", task(), _tev(tasks="qk,qk"), "maybe"),
        ("--tasks 'qk, qk2' (a space after the comma)", both(task(), task("qk2")), lambda w: run_cli(
            "eval", w / "model", "--tasks", "qk, qk2", "--include-path", w / "tasks", "--json"), "maybe"),
        ("--tasks QK (the task's name in capitals)", task(), _tev(tasks="QK"), "maybe"),
        ("--tasks beside --data (both asked for)", task(), _tev("--data", "text.txt", *EV), "maybe"),
        ("--stride 8 (a --data option) with --tasks", task(), _tev("--stride", "8"), "maybe"),
        ("a context of 300 words (past the model's 64 positions)", task(records=[
            {"context": " ".join(f"w{i % 60}" for i in range(300)), "continuation": " w1"}] * 2), _tev(), "maybe"),
        ("a record whose continuation is ''", task(records=[*LL_RECS, {"context": "w1", "continuation": ""}]),
         _tev(), "maybe"),
        ("a record whose context is ''", task(records=[*LL_RECS, {"context": "", "continuation": " w1"}]), _tev(),
         "maybe"),
        ("records of words the tokenizer does not know", task(records=[{"context": "zz yy", "continuation": " qq"}] * 2),
         _tev(), "maybe"),
        ("a multiple_choice task (acc)", task(kind=_mc, records=MC_RECS), _tev(), "valid"),
        ("a generate_until task (4 tokens, exact_match)", task(
            output_type="generate_until", generation_kwargs={"until": ["\n"], "max_gen_toks": 4, "do_sample": False},
            metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]), _tev(),
         "maybe"),
        ("a loglikelihood_rolling task (word_perplexity)", task(
            records=[{"text": "w1 w2 w3 w4 w5 w6 w7 w8"}, {"text": "w9 w10 w11"}], output_type="loglikelihood_rolling",
            doc_to_text="", doc_to_target="text", metric_list=[
                {"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}]), _tev(),
         "valid"),
        ("a group YAML naming the task", both(task(), write("tasks/grp.yaml", "group: qkg\ntask:\n  - qk\n")),
         lambda w: run_cli("eval", w / "model", "--tasks", "qkg", "--include-path", w / "tasks", "--json"), "maybe"),
        ("a broken YAML beside the good one", both(task(), write("tasks/zz.yaml", "task: [unclosed\n")), _tev(),
         "maybe"),
        ("two YAMLs defining task qk", both(task(), task(yaml_name="again")), _tev(), "maybe"),
    ]:
        add("tasks15", f"eval --tasks: {name}", run, setup, tri(kind, ok))
    for name, setup, run in [
        ("the data file empty (no documents)", task(data=""), _tev()),
        ("the data file missing", both(task(), lambda w: (w / "qk.jsonl").unlink()), _tev()),
        ("the data file not JSON", task(data="{not json\n"), _tev()),
        ("a multiple_choice label 5 of 2 choices", task(kind=_mc, records=[
            {"q": "w1", "choices": ["w2", "w3"], "label": 5}] * 2), _tev()),
        ("output_type 'bogus'", task(output_type="bogus"), _tev()),
        ("a metric no harness knows ('nosuchmetric')", task(metric_list=[
            {"metric": "nosuchmetric", "aggregation": "mean", "higher_is_better": True}]), _tev()),
        ("a !function tag naming a missing module", task(doc_to_text=None, raw="doc_to_text: !function nope.fn\n"),
         _tev()),
        ("the YAML a list", write("tasks/qk.yaml", "- task: qk\n"), _tev()),
        ("the YAML without its task: key", task(task=None), _tev()),
        ("test_split naming a split the data lacks", task(test_split="validation"), _tev()),
        ("dataset_path json without data files", task(dataset_kwargs=None), _tev()),
        ("dataset_path a missing local folder", task(dataset_path="/nonexistent/quantkit-data", dataset_kwargs=None),
         _tev()),
        ("include: a missing base YAML", task(raw="include: missing_base.yaml\n"), _tev()),
        ("--include-path a missing folder", None, _tev(include="gone")),
        ("--limit -1", task(), _tev("--limit", "-1")),
    ]:
        add("tasks15", f"eval --tasks: {name}", run, setup)


# ---------------------------------------------------------------- B. names at the length limits

def _dir_writers():
    """Commands writing a folder: (args of (w, out, extra)), the check of the written folder (rel -> check))."""
    return {
        "calibrate": (lambda w, o, e: ["calibrate", w / "model", "--calib", w / "text.txt", *RTN, "-o", o, *e],
                      lambda o: export_ok(o)),
        "export": (lambda w, o, e: ["export", w / "ct", "--format", "fake", "-o", o, *e], lambda o: export_ok(o)),
        "importance": (lambda w, o, e: ["importance", w / "model", "--calib", w / "text.txt", "--nsamples", "2",
                                        "--seqlen", "16", "-o", o, *e],
                       lambda o: lambda w, r: None if (w / o / "manifest.json").is_file() else f"no {o}/manifest.json"),
        "demo": (lambda w, o, e: ["demo", "--model", w / "model", "--data", w / "text.txt", "--seqlen", "16",
                                  "--nsamples", "2", "--format", "fake", "-o", o, *e],
                 lambda o: lambda w, r: None if (w / o).is_dir() and any((w / o).iterdir()) else f"no {o}/"),
        "qid plot": (lambda w, o, e: ["qid", "plot", w / "q.csv", "--format", "png", "-o", o],
                     lambda o: lambda w, r: None if list((w / o).glob("*.png")) else f"no figures in {o}/"),
    }


def _file_writers():
    return {
        "eval -o": (lambda w, o: ["eval", w / "model", "--data", w / "text.txt", *EV, "-o", o],
                    lambda o: lambda w, r: None if json.loads((w / o).read_text()) else f"{o} empty"),
        "qid fit -o": (lambda w, o: ["qid", "fit", w / "q.csv", "--bootstrap", "0", "-o", o],
                       lambda o: lambda w, r: None if json.loads((w / o).read_text()).get("fits") else f"{o}: no fits"),
        "qid measure -o": (lambda w, o: ["qid", "measure", w / "model", "--eval", w / "text.txt", "--eval-tokens",
                                         "64", "--eval-seqlen", "16", "--methods", "rtn", "--bits", "4", "--nsamples",
                                         "2", "--calib-seqlen", "16", "--group-size", "32", "--tokens", "1e9",
                                         "--no-progress", "-o", o],
                           lambda o: lambda w, r: None if len((w / o).read_text().splitlines()) >= 2 else f"{o}: no row"),
    }


N239 = "n" * 239  # 255 bytes less the 16 the atomic writes keep for their temporary names
U239 = "é" * 119 + "n"  # 239 bytes of two-byte characters
N240 = "n" * 240
N255 = "n" * 255
FAR = "/".join(["d" * 250] * 17) + "/x"  # past PATH_MAX (4096), none of it there


def _named(src: str, name: str):
    """A setup: a copy of the base's `src` (file or folder) under `name`."""
    def setup(w: Path) -> None:
        (shutil.copytree if (w / src).is_dir() else shutil.copy)(w / src, w / name)
    return setup


def _name_cases(out: Cases) -> None:
    add = out.add
    for command, (args, made) in _dir_writers().items():
        for label, name, kind in [("a 239-byte name (ASCII)", N239, "valid"),
                                  ("a 239-byte name of two-byte characters", U239, "valid"),
                                  ("a 240-byte name (past the 239 the temporary names leave)", N240, "maybe")]:
            add("name15", f"{command} -o {label}", lambda w, a=args, n=name: run_cli(*a(w, w / n, [])), None,
                tri(kind, made(name)))
        if command != "qid plot":
            add("name15", f"{command} --overwrite of an existing 239-byte output", lambda w, a=args: run_cli(
                *a(w, w / N239, ["--overwrite"])), lambda w, a=args: _made_before(a(w, w / N239, [])),
                valid(made(N239)))
        add("name15", f"{command} -o a path past PATH_MAX", lambda w, a=args: run_cli(*a(w, w / FAR, [])))
        add("name15", f"{command} -o a 256-byte name", lambda w, a=args: run_cli(*a(w, w / ("n" * 256), [])))
    for command, (args, made) in _file_writers().items():
        add("name15", f"{command} a 239-byte name", lambda w, a=args: run_cli(*a(w, w / N239)), None,
            valid(made(N239)))
        add("name15", f"{command} a 239-byte name of two-byte characters", lambda w, a=args: run_cli(*a(w, w / U239)),
            None, valid(made(U239)))
        add("name15", f"{command} a 255-byte name", lambda w, a=args: run_cli(*a(w, w / N255)), None,
            _maybe(made(N255)))
        add("name15", f"{command} a path past PATH_MAX", lambda w, a=args: run_cli(*a(w, w / FAR)))
    # a name holding a byte that is no UTF-8 (an old Latin-1 folder): written, or refused in one line
    for command, (args, made) in _dir_writers().items():
        add("name15", f"{command} -o a name with the byte 0xE9 (not UTF-8)", lambda w, a=args: run_cli(
            *a(w, _latin1(w, "sortie"), [])), None, _maybe(made(os.fsdecode(b"sortie\xe9"))))
    for command, (args, made) in _file_writers().items():
        add("name15", f"{command} a name with the byte 0xE9 (not UTF-8)", lambda w, a=args: run_cli(
            *a(w, _latin1(w, "r"))), None, _maybe(made(os.fsdecode(b"r\xe9"))))
    for label, run, check in [
        ("calibrate --calib", lambda w: run_cli("calibrate", w / "model", "--calib", _latin1(w, "t"), *GPTQ, "-o",
                                                w / "out"), same_as(cal_ref(method=GPTQ))),
        ("importance --calib", lambda w: run_cli("importance", w / "model", "--calib", _latin1(w, "t"), "--nsamples",
                                                 "2", "--seqlen", "16", "-o", w / "set"), set_ok()),
        ("calibrate --recipe", lambda w: run_cli("calibrate", w / "model", "--calib", w / "text.txt", *RTN, "--recipe",
                                                 _latin1(w, "r"), "-o", w / "out"), same_as(cal_ref())),
        ("export of", lambda w: run_cli("export", _latin1(w, "c"), "--format", "fake", "-o", w / "out"),
         weights_close("out", "ct", 1e-6)),
        ("qid fit of", lambda w: run_cli("qid", "fit", _latin1(w, "q"), "--bootstrap", "0", "--json"),
         lambda w, r: None if json.loads(r.stdout).get("fits") else "no fits"),
    ]:
        src = {"t": "text.txt", "r": None, "c": "ct", "q": "q.csv"}
        stem = {"calibrate --calib": "t", "importance --calib": "t", "calibrate --recipe": "r", "export of": "c",
                "qid fit of": "q"}[label]

        def setup(w: Path, stem=stem, src=src[stem]) -> None:
            if src is None:
                Path(_latin1(w, stem)).write_text("ignore: [lm_head]\n")
            else:
                _named(src, os.path.basename(_latin1(w, stem)))(w)
        add("name15", f"{label} a name with the byte 0xE9 (not UTF-8)", run, setup, _maybe(check))
    # inputs named with 255 bytes (the most a name holds): a right program reads them
    cal_ok = export_ok()
    for label, setup, run, check in [
        ("calibrate --calib a 255-byte file name", _named("text.txt", N255), lambda w: run_cli(
            "calibrate", w / "model", "--calib", w / N255, *GPTQ, "-o", w / "out"), same_as(cal_ref(method=GPTQ))),
        ("calibrate of a model folder named with 255 bytes", _named("model", N255), lambda w: run_cli(
            "calibrate", w / N255, "--calib", w / "text.txt", *GPTQ, "-o", w / "out"), same_as(cal_ref(method=GPTQ))),
        ("calibrate --recipe a 255-byte file name", write(N255, "ignore: [lm_head]\n"), lambda w: run_cli(
            "calibrate", w / "model", "--calib", w / "text.txt", *RTN, "--recipe", w / N255, "-o", w / "out"),
         same_as(cal_ref())),
        ("calibrate --calib-set a set folder named with 255 bytes", lambda w: (run_cli(
            "importance", w / "model", "--calib", w / "text.txt", "--nsamples", "2", "--seqlen", "16", "-o",
            w / "set"), (w / "set").rename(w / N255)), lambda w: run_cli(
            "calibrate", w / "model", "--calib-set", w / N255, "--group-size", "32", "-o", w / "out"), cal_ok),
        ("calibrate --low-memory --offload-dir a 255-byte folder name", None, lambda w: run_cli(
            "calibrate", w / "model", "--calib", w / "text.txt", *GPTQ, "--low-memory", "--offload-dir", w / N255,
            "-o", w / "out"), same_as(cal_ref("--low-memory", method=GPTQ))),
        ("export of a ct folder named with 255 bytes", _named("ct", N255), lambda w: run_cli(
            "export", w / N255, "--format", "fake", "-o", w / "out"), weights_close("out", "ct", 1e-6)),
        ("eval --data a 255-byte file name", _named("text.txt", N255), lambda w: run_cli(
            "eval", w / "model", "--data", w / N255, *EV), eval_close_to(
            lambda w: ["eval", w / "model", "--data", w / "text.txt", *EV], 0.0)),
        ("eval of a model folder named with 255 bytes", _named("model", N255), lambda w: run_cli(
            "eval", w / N255, "--data", w / "text.txt", *EV), eval_close_to(
            lambda w: ["eval", w / "model", "--data", w / "text.txt", *EV], 0.0)),
        ("importance --calib a 255-byte file name", _named("text.txt", N255), lambda w: run_cli(
            "importance", w / "model", "--calib", w / N255, "--nsamples", "2", "--seqlen", "16", "-o", w / "set"),
         set_ok()),
        ("qid fit of a 255-byte CSV name", _named("q.csv", N255), lambda w: run_cli(
            "qid", "fit", w / N255, "--bootstrap", "0", "--json"), lambda w, r: None if json.loads(r.stdout).get(
            "fits") else "no fits"),
        ("qid plot of a 255-byte CSV name", _named("q.csv", N255), lambda w: run_cli(
            "qid", "plot", w / N255, "--format", "png", "-o", w / "figs"), lambda w, r: None if list(
            (w / "figs").glob("*.png")) else "no figures"),
        ("demo --model a folder named with 255 bytes", _named("model", N255), lambda w: run_cli(
            "demo", "--model", w / N255, "--data", w / "text.txt", "--seqlen", "16", "--nsamples", "2", "--format",
            "fake", "-o", w / "d"), lambda w, r: None if (w / "d").is_dir() else "no d/"),
    ]:
        add("name15", label, run, setup, valid(check))
    # inputs past PATH_MAX or with a component past NAME_MAX: not there, refused in one line
    for label, run in [
        ("calibrate --calib", lambda w, p: run_cli("calibrate", w / "model", "--calib", p, *RTN, "-o", w / "out")),
        ("calibrate of the model", lambda w, p: run_cli("calibrate", p, "--calib", w / "text.txt", *RTN, "-o",
                                                        w / "out")),
        ("calibrate --recipe", lambda w, p: run_cli("calibrate", w / "model", "--calib", w / "text.txt", *RTN,
                                                    "--recipe", p, "-o", w / "out")),
        ("calibrate --calib-set", lambda w, p: run_cli("calibrate", w / "model", "--calib-set", p, "--group-size",
                                                       "32", "-o", w / "out")),
        ("calibrate --chat-template", lambda w, p: run_cli("calibrate", w / "model", "--calib", w / "text.txt", *RTN,
                                                           "--chat-template", p, "-o", w / "out")),
        ("export of", lambda w, p: run_cli("export", p, "--format", "fake", "-o", w / "out")),
        ("eval --data", lambda w, p: run_cli("eval", w / "model", "--data", p, *EV)),
        ("eval of the model", lambda w, p: run_cli("eval", p, "--data", w / "text.txt", *EV)),
        ("importance --calib", lambda w, p: run_cli("importance", w / "model", "--calib", p, "--nsamples", "2",
                                                    "--seqlen", "16", "-o", w / "set")),
        ("qid fit of", lambda w, p: run_cli("qid", "fit", p, "--bootstrap", "0")),
        ("qid plot of", lambda w, p: run_cli("qid", "plot", p, "-o", w / "figs")),
        ("demo --data", lambda w, p: run_cli("demo", "--model", w / "model", "--data", p, "--seqlen", "16",
                                             "--nsamples", "2", "--format", "fake", "-o", w / "d")),
        ("plan --calib", lambda w, p: run_cli("plan", w / "model", "--calib", p, *RTN)),
    ]:
        add("name15", f"{label} a path past PATH_MAX (not there)", lambda w, r=run: r(w, w / FAR))
        add("name15", f"{label} a 256-byte name (not there)", lambda w, r=run: r(w, w / ("x" * 256)))


def _latin1(w: Path, stem: str) -> str:
    """w/STEM\xe9 as Python names it (the byte 0xE9, no UTF-8, kept as a surrogate escape)."""
    return os.fsdecode(bytes(w) + b"/" + stem.encode() + b"\xe9")


def _made_before(args: list) -> None:
    done = run_cli(*args)
    assert done.exit_code == 0, done.output[-300:]


# ---------------------------------------------------------------- C. option spellings and stdin

def _opt_cases(out: Cases) -> None:
    add = out.add
    base = lambda w: ["calibrate", w / "model", "--calib", w / "text.txt"]  # noqa: E731
    ref = same_as(cal_ref())
    gref = same_as(cal_ref(method=GPTQ))
    for name, args, kind, check in [
        ("--bits=4 --group-size=32 (= spellings) equal the plain run", lambda w: [
            *base(w), "--method=rtn", "--nsamples=2", "--seqlen=16", "--group-size=32", "--bits=4", "-o", w / "out"],
         "valid", ref),
        ("--group-size=-1 equals --group-size -1", lambda w: [*base(w), *RTN[:-2], "--group-size=-1", "-o",
                                                              w / "out"], "valid",
         same_as(lambda w: [*base(w), *RTN[:-2], "--group-size", "-1", "-o", w / "ref"])),
        ("-oout (the short option attached) equals -o out", lambda w: [*base(w), *RTN, f"-o{w / 'out'}"], "valid", ref),
        ("-o=out (makes a folder named '=out', as click reads it)", lambda w: [*base(w), *RTN, "-o=out"], "maybe",
         export_ok("=out")),
        ("the options before the model argument", lambda w: ["calibrate", *RTN, "--calib", w / "text.txt", "-o",
                                                             w / "out", w / "model"], "valid", ref),
        ("--format compressed-tensors given twice, the same", lambda w: [*base(w), *RTN, "--format",
                                                                         "compressed-tensors", "--format",
                                                                         "compressed-tensors", "-o", w / "out"],
         "maybe", ref),
        ("--bits ' 4' (a leading space in the value)", lambda w: [*base(w), *RTN, "--bits", " 4", "-o", w / "out"],
         "maybe", ref),
        ("--method 'rtn\\u00a0' (a no-break space from copied docs)", lambda w: [
            *base(w), "--method", "rtn\u00a0", *RTN[2:], "-o", w / "out"], "maybe", ref),
        ("--overwrite=true (a flag given a value)", lambda w: [*base(w), *RTN, "--overwrite=true", "-o", w / "out"],
         "refuse", None),
        ("--json=1 (a flag given a value)", lambda w: [*base(w), *RTN, "--json=1", "-o", w / "out"], "refuse", None),
        ("--method= (an empty = value)", lambda w: [*base(w), "--method=", *RTN[2:], "-o", w / "out"], "refuse", None),
        ("--bits= (an empty = value)", lambda w: [*base(w), *RTN, "--bits=", "-o", w / "out"], "refuse", None),
        ("--nsamp 2 (an abbreviation)", lambda w: [*base(w), "--method", "rtn", "--nsamp", "2", "--seqlen", "16",
                                                   "--group-size", "32", "-o", w / "out"], "refuse", None),
        ("--Bits 4 (capitals)", lambda w: [*base(w), *RTN, "--Bits", "4", "-o", w / "out"], "refuse", None),
        ("\u2014bits 4 (an em dash from a copied doc)", lambda w: [*base(w), *RTN, "\u2014bits", "4", "-o", w / "out"],
         "refuse", None),
        ("\u2013-method rtn (an en dash)", lambda w: [*base(w), "\u2013-method", "rtn", *RTN[2:], "-o", w / "out"],
         "refuse", None),
        ("--calib 'text.txt ' (a trailing space in the path)", lambda w: [
            "calibrate", w / "model", "--calib", f"{w / 'text.txt'} ", *RTN, "-o", w / "out"], "refuse", None),
        ("--json before the subcommand (quantkit --json calibrate)", lambda w: ["--json", *base(w), *RTN, "-o",
                                                                                w / "out"], "refuse", None),
        ("an unknown option before the subcommand (quantkit --bogus calibrate)", lambda w: [
            "--bogus", *base(w), *RTN, "-o", w / "out"], "refuse", None),
        ("the subcommand in capitals (CALIBRATE)", lambda w: ["CALIBRATE", w / "model", "--calib", w / "text.txt",
                                                              *RTN, "-o", w / "out"], "refuse", None),
        ("the subcommand abbreviated (calib)", lambda w: ["calib", w / "model", "--calib", w / "text.txt", *RTN, "-o",
                                                          w / "out"], "refuse", None),
        ("'--' then an option (-- --bits 4)", lambda w: [*base(w), *RTN, "-o", w / "out", "--", "--bits", "4"],
         "refuse", None),
        ("--no-overwrite (no such negation)", lambda w: [*base(w), *RTN, "--no-overwrite", "-o", w / "out"], "refuse",
         None),
        ("--no-json (no such negation)", lambda w: [*base(w), *RTN, "--no-json", "-o", w / "out"], "refuse", None),
        ("--seqlen 0x10 (hex)", lambda w: [*base(w), *RTN[:4], "--seqlen", "0x10", *RTN[6:], "-o", w / "out"],
         "refuse", None),
        ("--seqlen 16.0", lambda w: [*base(w), *RTN[:4], "--seqlen", "16.0", *RTN[6:], "-o", w / "out"], "maybe", ref),
        ("GPTQ with --act-order=... (a flag pair given a value)", lambda w: [*base(w), *GPTQ, "--act-order=false", "-o",
                                                                             w / "out"], "refuse", None),
        ("--sym --asym --sym (the pair given thrice, last --sym)", lambda w: [*base(w), *GPTQ, "--sym", "--asym",
                                                                             "--sym", "-o", w / "out"], "maybe", gref),
    ]:
        add("opt15", f"calibrate {name}", lambda w, a=args: raw_cli(*a(w)), None, tri(kind, check))
    # a typo'd option and an extra argument on every command: one line
    for command, args in [
        ("export", lambda w, e: ["export", w / "ct", "--format", "fake", "-o", w / "out", *e]),
        ("eval", lambda w, e: ["eval", w / "model", "--data", w / "text.txt", *EV, *e]),
        ("importance", lambda w, e: ["importance", w / "model", "--calib", w / "text.txt", "--nsamples", "2",
                                     "--seqlen", "16", "-o", w / "set", *e]),
        ("plan", lambda w, e: ["plan", w / "model", "--calib", w / "text.txt", *RTN, *e]),
        ("demo", lambda w, e: ["demo", "--model", w / "model", "--data", w / "text.txt", "--seqlen", "16",
                               "--nsamples", "2", "--format", "fake", "-o", w / "d", *e]),
        ("qid fit", lambda w, e: ["qid", "fit", w / "q.csv", "--bootstrap", "0", *e]),
        ("qid plot", lambda w, e: ["qid", "plot", w / "q.csv", "-o", w / "figs", *e]),
        ("qid predict", lambda w, e: ["qid", "predict", "--params", "1e9", "--bits", "3", "--tokens", "1e12", *e]),
        ("qid measure", lambda w, e: ["qid", "measure", w / "model", "--eval", w / "text.txt", "--methods", "rtn",
                                      "--bits", "4", "--tokens", "1e9", "-o", w / "m.csv", *e]),
        ("qid (the group's own option, before fit)", lambda w, e: ["qid", *e, "fit", w / "q.csv", "--bootstrap", "0"]),
    ]:
        add("opt15", f"{command} with an option misspelt (--seqeln 16)", lambda w, a=args: raw_cli(
            *a(w, ["--seqeln", "16"])))
        add("opt15", f"{command} with an extra argument", lambda w, a=args: raw_cli(*a(w, ["extra-arg"])))
        add("opt15", f"{command} with a value-less option at the end (--seed)", lambda w, a=args: raw_cli(
            *a(w, ["--seed"])))
    # stdin's '-' where a file is asked: no such file here, one line (quantkit reads no stdin)
    for label, run in [
        ("calibrate --calib -", lambda w: run_cli("calibrate", w / "model", "--calib", "-", *RTN, "-o", w / "out")),
        ("calibrate of the model '-'", lambda w: run_cli("calibrate", "-", "--calib", w / "text.txt", *RTN, "-o",
                                                         w / "out")),
        ("calibrate --recipe -", lambda w: run_cli("calibrate", w / "model", "--calib", w / "text.txt", *RTN,
                                                   "--recipe", "-", "-o", w / "out")),
        ("calibrate --chat-template -", lambda w: run_cli("calibrate", w / "model", "--calib", w / "text.txt", *RTN,
                                                          "--chat-template", "-", "-o", w / "out")),
        ("calibrate --calib-set -", lambda w: run_cli("calibrate", w / "model", "--calib-set", "-", "--group-size",
                                                      "32", "-o", w / "out")),
        ("export -", lambda w: run_cli("export", "-", "--format", "fake", "-o", w / "out")),
        ("eval --data -", lambda w: run_cli("eval", w / "model", "--data", "-", *EV)),
        ("importance --calib -", lambda w: run_cli("importance", w / "model", "--calib", "-", "--nsamples", "2",
                                                   "--seqlen", "16", "-o", w / "set")),
        ("qid fit -", lambda w: run_cli("qid", "fit", "-", "--bootstrap", "0")),
        ("qid plot -", lambda w: run_cli("qid", "plot", "-", "-o", w / "figs")),
        ("qid predict --law -", lambda w: run_cli("qid", "predict", "--law", "-", "--params", "1e9", "--bits", "3",
                                                  "--tokens", "1e12")),
        ("qid measure --eval -", lambda w: run_cli("qid", "measure", w / "model", "--eval", "-", "--methods", "rtn",
                                                   "--bits", "4", "--tokens", "1e9", "-o", w / "m.csv")),
        ("demo --data -", lambda w: run_cli("demo", "--model", w / "model", "--data", "-", "--seqlen", "16",
                                            "--nsamples", "2", "--format", "fake", "-o", w / "d")),
    ]:
        add("stdin15", f"{label} (no file named '-')", run)
    # a file really named '-' in the working folder: it is a file, reading it is right
    add("stdin15", "calibrate --calib - with a text file named '-' in the working folder", lambda w: run_cli(
        "calibrate", w / "model", "--calib", "-", *GPTQ, "-o", w / "out"), _named("text.txt", "-"),
        _maybe(same_as(cal_ref(method=GPTQ))))
    add("stdin15", "qid fit - with a CSV named '-' in the working folder", lambda w: run_cli(
        "qid", "fit", "-", "--bootstrap", "0", "--json"), _named("q.csv", "-"),
        _maybe(lambda w, r: None if json.loads(r.stdout).get("fits") else "no fits"))
    # /dev/stdin in a child process
    text = lambda w: open(w / "text.txt")  # noqa: E731
    add("stdin15", "calibrate --calib /dev/stdin, the text piped in", lambda w: _piped(
        w, text(w), "calibrate", w / "model", "--calib", "/dev/stdin", *GPTQ, "-o", w / "out"), None,
        _maybe(export_ok()))
    add("stdin15", "eval --data /dev/stdin, the text piped in", lambda w: _piped(
        w, text(w), "eval", w / "model", "--data", "/dev/stdin", *EV), None, _maybe(eval_ok))
    add("stdin15", "qid fit /dev/stdin, the CSV piped in", lambda w: _piped(
        w, open(w / "q.csv"), "qid", "fit", "/dev/stdin", "--bootstrap", "0", "--json"), None,
        _maybe(lambda w, r: None if json.loads(r.stdout).get("fits") else "no fits"))
    add("stdin15", "calibrate --calib /dev/stdin with stdin empty (/dev/null)", lambda w: _piped(
        w, subprocess.DEVNULL, "calibrate", w / "model", "--calib", "/dev/stdin", *GPTQ, "-o", w / "out"))
    add("stdin15", "eval --data /dev/stdin with stdin empty (/dev/null)", lambda w: _piped(
        w, subprocess.DEVNULL, "eval", w / "model", "--data", "/dev/stdin", *EV))


def _piped(w: Path, stdin, *args) -> Ran:
    return child(w, *args, stdin=stdin)


# ---------------------------------------------------------------- D. model shapes, ties, biases

def _llama(rel: str = "m", **fields):
    """A setup: a tiny llama at rel (hidden 32, MLP 64, 2 layers, 4 heads, 2 KV heads, vocabulary 64, 64
    positions; `fields` on top) with the word tokenizer."""
    def setup(w: Path) -> None:
        config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
        config.update(fields)
        tiny_model("llama", 0, **config).save_pretrained(w / rel)
        make_tokenizer().save_pretrained(w / rel)
    return setup


def _kept(key: str, rel: str = "out", src: str = "m"):
    """A check: the export loads finite and its tensor `key` equals the source model's (a bias, an embedding)."""
    def check(w: Path, result) -> str | None:
        import torch
        from transformers import AutoModelForCausalLM

        import quantkit

        bad = export_ok(rel)(w, result)
        if bad:
            return bad
        got = quantkit.load_quantized(w / rel).state_dict().get(key)
        want = AutoModelForCausalLM.from_pretrained(w / src).state_dict()[key]
        if got is None:
            return f"no {key} in the export"
        return None if torch.allclose(got.float(), want.float(), atol=1e-3) else f"{key} differs from the model's"
    return check


def _model_cases(out: Cases) -> None:
    add = out.add

    def cal(name, setup, extra, kind, check=None, method=RTN):
        add("model15", name, lambda w, e=extra, m=method: run_cli("calibrate", w / "m", "--calib", w / "text.txt",
                                                                  *m, *e, "-o", w / "out"), setup,
            tri(kind, check or export_ok()))

    v63 = _llama(vocab_size=63)
    cal("vocabulary 63 (not a multiple of 8), RTN", v63, [], "valid")
    cal("vocabulary 63, GPTQ --format gptq", v63, ["--format", "gptq"], "valid", method=GPTQ)
    cal("vocabulary 63, --quantize-lm-head --format fake", v63, ["--quantize-lm-head", "--format", "fake"], "valid")
    cal("vocabulary 63, --quantize-lm-head (compressed-tensors)", v63, ["--quantize-lm-head"], "valid")
    cal("vocabulary 62 (the tokenizer's size exactly), GPTQ", _llama(vocab_size=62), [], "valid", method=GPTQ)
    m36 = _llama(intermediate_size=36)
    cal("MLP 36 wide, group 32 (36 not a multiple)", m36, [], "maybe")
    cal("MLP 36 wide, --group-size -1 --format fake", m36, ["--group-size", "-1", "--format", "fake"], "valid")
    cal("MLP 36 wide, --group-size -1 --format gptq (36 x 4 bits is no whole int32)", m36,
        ["--group-size", "-1", "--format", "gptq"], "maybe")
    cal("MLP 36 wide, --group-size -1 (compressed-tensors)", m36, ["--group-size", "-1"], "maybe")
    m40 = _llama(intermediate_size=40)
    cal("MLP 40 wide, --group-size 8 --format fake", m40, ["--group-size", "8", "--format", "fake"], "valid")
    cal("MLP 40 wide, --group-size -1 --format gptq", m40, ["--group-size", "-1", "--format", "gptq"], "maybe")
    cal("MLP 40 wide, --group-size -1 --format gptq_v2, GPTQ", m40, ["--group-size", "-1", "--format", "gptq_v2"],
        "maybe", method=GPTQ)
    h48 = _llama(hidden_size=48)
    cal("hidden 48 (head_dim 12), group 16", h48, ["--group-size", "16"], "valid")
    cal("hidden 48, group 32 (48 not a multiple)", h48, [], "maybe")
    cal("hidden 48, --group-size -1 --format gptq, GPTQ", h48, ["--group-size", "-1", "--format", "gptq"], "maybe",
        method=GPTQ)
    mqa = _llama(num_key_value_heads=1)
    cal("one KV head (k/v_proj 8 wide), RTN", mqa, [], "valid")
    cal("one KV head, GPTQ --format gptq", mqa, ["--format", "gptq"], "maybe", method=GPTQ)
    cal("one KV head, --format fake --bits 3", mqa, ["--format", "fake", "--bits", "3"], "valid")
    hd = _llama(head_dim=16)
    cal("head_dim 16 given (q_proj 64 wide on hidden 32), GPTQ", hd, [], "valid", method=GPTQ)
    cal("head_dim 16 given, --format gptq", hd, ["--format", "gptq"], "valid")
    tied = _llama(tie_word_embeddings=True)
    for fmt in ("gptq", "gptq_v2", "compressed-tensors", "fake"):
        cal(f"tied embeddings (no lm_head stored), --format {fmt}", tied, ["--format", fmt], "valid",
            _kept("model.embed_tokens.weight"))
    cal("tied embeddings, GPTQ --low-memory", tied, ["--low-memory"], "valid", _kept("model.embed_tokens.weight"),
        method=GPTQ)
    ab = _llama(attention_bias=True)
    for fmt in ("compressed-tensors", "gptq", "fake"):
        cal(f"attention biases, --format {fmt}: the biases kept", ab, ["--format", fmt], "valid",
            _kept("model.layers.0.self_attn.q_proj.bias"))
    mb = _llama(mlp_bias=True)
    cal("MLP biases, GPTQ: the biases kept", mb, [], "valid", _kept("model.layers.1.mlp.down_proj.bias"), method=GPTQ)
    cal("MLP biases, --format gptq --low-memory: the biases kept", mb, ["--format", "gptq", "--low-memory"], "valid",
        _kept("model.layers.1.mlp.down_proj.bias"))
    cal("rope_scaling linear factor 2", _llama(rope_scaling={"rope_type": "linear", "factor": 2.0}), [], "valid",
        method=GPTQ)
    cal("one decoder layer", _llama(num_hidden_layers=1), [], "valid", method=GPTQ)
    cal("max_position_embeddings 16 with --seqlen 16 (the edge)", _llama(max_position_embeddings=16), [], "valid",
        method=GPTQ)
    cal("attention_bias true, --quantize-lm-head --format fake", ab, ["--quantize-lm-head", "--format", "fake"],
        "valid", _kept("model.layers.1.self_attn.v_proj.bias"))


# ---------------------------------------------------------------- E. generation_config and tokenizer_config fields

def _copy_then(src: str, dst: str, rel: str, fields: dict | None, raw: str | None = None):
    """A setup: src copied to dst, then dst/rel updated with fields (or written as raw)."""
    def setup(w: Path) -> None:
        shutil.copytree(w / src, w / dst)
        if raw is not None:
            (w / dst / rel).write_text(raw)
        else:
            json_edit(f"{dst}/{rel}", lambda d: d.update(fields))(w)
    return setup


def _cfg_cases(out: Cases) -> None:
    add = out.add
    gref = same_as(cal_ref(method=GPTQ))
    plain = _plain_loads_like("out")  # the model card's way: AutoModelForCausalLM.from_pretrained(out)
    for name, fields, raw, kind in [
        ("do_sample false beside temperature 0.6 and top_p 0.9 (as Llama 3 ships)",
         dict(do_sample=False, temperature=0.6, top_p=0.9), None, "valid"),
        ("eos_token_id a list [1, 2]", dict(eos_token_id=[1, 2]), None, "valid"),
        ("eos_token_id [1, 999] (999 past the vocabulary)", dict(eos_token_id=[1, 999]), None, "maybe"),
        ("pad_token_id 1 and bos_token_id null", dict(pad_token_id=1, bos_token_id=None), None, "valid"),
        ("transformers_version '99.0.0'", dict(transformers_version="99.0.0"), None, "valid"),
        ("max_new_tokens -1", dict(max_new_tokens=-1), None, "maybe"),
        ("cache_implementation 'bogus'", dict(cache_implementation="bogus"), None, "maybe"),
        ("the file a JSON list", None, "[1, 2]", "maybe"),
        ("the file empty (0 bytes)", None, "", "maybe"),
    ]:
        add("gen15", f"calibrate, generation_config.json: {name}", lambda w: run_cli(
            "calibrate", w / "m2", "--calib", w / "text.txt", *GPTQ, "-o", w / "out"),
            _copy_then("model", "m2", "generation_config.json", fields, raw), tri(kind, then(gref, plain)))
        add("gen15", f"export of ct, its generation_config.json: {name}", lambda w: run_cli(
            "export", w / "ct2", "--format", "fake", "-o", w / "out"),
            _copy_then("ct", "ct2", "generation_config.json", fields, raw),
            tri(kind, then(weights_close("out", "ct", 1e-6), plain)))
    ev_ref = eval_close_to(lambda w: ["eval", w / "ct", "--data", w / "text.txt", *EV], 0.0)
    for name, fields, kind in [
        ("padding_side 'left'", dict(padding_side="left"), "valid"),
        ("truncation_side 'left'", dict(truncation_side="left"), "valid"),
        ("model_max_length 1e30 (transformers' 'no limit')", dict(model_max_length=1000000000000000019884624838656),
         "valid"),
        ("clean_up_tokenization_spaces true", dict(clean_up_tokenization_spaces=True), "valid"),
        ("name_or_path a folder elsewhere", dict(name_or_path="/nonexistent/elsewhere"), "valid"),
        ("tokenizer_class 'PreTrainedTokenizerFast' given", dict(tokenizer_class="PreTrainedTokenizerFast"), "valid"),
        ("add_eos_token true", dict(add_eos_token=True), "maybe"),
        ("auto_map to remote code that is not there", dict(auto_map={"AutoTokenizer": ["tok.MyTok", None]}), "maybe"),
    ]:
        add("tok15", f"calibrate GPTQ, tokenizer_config.json {name}", lambda w: run_cli(
            "calibrate", w / "m2", "--calib", w / "text.txt", *GPTQ, "-o", w / "out"),
            _copy_then("model", "m2", "tokenizer_config.json", fields),
            tri(kind, gref if kind == "valid" else export_ok()))
        add("tok15", f"eval of ct, its tokenizer_config.json {name}", lambda w: run_cli(
            "eval", w / "ct2", "--data", w / "text.txt", *EV), _copy_then("ct", "ct2", "tokenizer_config.json", fields),
            tri(kind, ev_ref if kind == "valid" else eval_ok))


# ---------------------------------------------------------------- F. the API given adapters, pruned, grads, hooks

def _loaded(w: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(w / "model")


def _peft(w: Path):
    """The model with a LoRA adapter on q/v whose random weights are the same at every call (seed 7)."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = _loaded(w)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def _as_merged(w: Path, result) -> str | None:
    """A check of a PeftModel's export: it loads, and its q_proj is near the merged model's q_proj (W + BA), not
    the base's W."""
    import torch

    import quantkit

    bad = export_ok()(w, result)
    if bad:
        return bad
    key = "model.layers.0.self_attn.q_proj.weight"
    got = quantkit.load_quantized(w / "out").state_dict()[key].float()
    merged = _peft(w).merge_and_unload().state_dict()[key].float()
    base = _loaded(w).state_dict()[key].float()
    if torch.equal(merged, base):
        return "the harness's LoRA did nothing"
    near = (got - merged).norm() < (got - base).norm()
    return None if near else "the export holds the base weights: the adapter was dropped"


def _same_call(**kw):
    """A check: out/ equals a call on a fresh loaded model with the same keywords, byte for byte."""
    def check(w: Path, result) -> str | None:
        quantize(w, model=_loaded(w), output_dir=str(w / "ref"), **kw)
        a, b = ((w / r / "model.safetensors").read_bytes() for r in ("out", "ref"))
        return None if a == b else "out/ differs from the same call on a fresh model"
    check.valid = True
    return check


def _stale_grads(w: Path):
    import torch

    model = _loaded(w)
    generator = torch.Generator().manual_seed(5)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator) * 100
    return model


def _hooked(w: Path):
    model = _loaded(w)
    seen = []
    for layer in model.model.layers:
        layer.register_forward_hook(lambda m, i, o: seen.append(1))
    return model


def _pruned(w: Path):
    import torch.nn.utils.prune as prune

    model = _loaded(w)
    prune.l1_unstructured(model.model.layers[0].self_attn.q_proj, "weight", amount=0.5)
    return model


def _weight_normed(w: Path):
    import torch

    model = _loaded(w)
    torch.nn.utils.parametrizations.weight_norm(model.model.layers[0].mlp.up_proj)
    return model


def _checkpointing(w: Path):
    model = _loaded(w)
    model.gradient_checkpointing_enable()
    model.train()
    return model


def _api_cases(out: Cases) -> None:
    api = out.api
    api("api15 a PeftModel (LoRA on q/v, not merged), group_size -1: the adapter in the export or a refusal",
        lambda w: quantize(w, model=_peft(w), group_size=-1), check=_maybe(_as_merged))
    api("api15 a PeftModel (LoRA on q/v, not merged), group 32", lambda w: quantize(w, model=_peft(w)),
        check=_maybe(_as_merged))
    api("api15 a PeftModel, method gptq, group_size -1", lambda w: quantize(w, model=_peft(w), group_size=-1,
                                                                            method="gptq"), check=_maybe(_as_merged))
    api("api15 a PeftModel, output_dir None: the returned model", lambda w: quantize(
        w, model=_peft(w), group_size=-1, output_dir=None), check=_maybe(returned_ok))
    api("api15 a LoRA model merged (merge_and_unload) is an ordinary model", lambda w: quantize(
        w, model=_peft(w).merge_and_unload()), check=valid(_as_merged))
    api("api15 a model with q_proj pruned (torch prune: weight_orig and a mask)", lambda w: quantize(
        w, model=_pruned(w)), check=_maybe(export_ok()))
    api("api15 a model with up_proj under weight_norm (a parametrized weight)", lambda w: quantize(
        w, model=_weight_normed(w)), check=_maybe(export_ok()))
    api("api15 stale .grad on every parameter, TLQ, equals a fresh model's", lambda w: quantize(
        w, model=_stale_grads(w), method="tlq"), check=_same_call(method="tlq"))
    api("api15 gradient checkpointing on and train mode, TLQ, equals a fresh model's", lambda w: quantize(
        w, model=_checkpointing(w), method="tlq"), check=_same_call(method="tlq"))
    api("api15 forward hooks (that only count) on every layer, GPTQ, equals a fresh model's", lambda w: quantize(
        w, model=_hooked(w), method="gptq"), check=_same_call(method="gptq"))
    api("api15 stale .grad, GPTQ, equals a fresh model's", lambda w: quantize(
        w, model=_stale_grads(w), method="gptq"), check=_same_call(method="gptq"))


# ---------------------------------------------------------------- G. killed by SIGKILL, then run again

def _deep(w: Path) -> None:
    from helpers import save_tiny_llama

    save_tiny_llama(w / "deep", hidden=128, layers=8, max_positions=128)


DEEP = ["--method", "gptq", "--nsamples", "8", "--seqlen", "64", "--group-size", "32"]


def _killed(args, wait_for=_progress_shown):
    """A setup: the deep llama, then `quantkit ARGS` in a child killed by SIGKILL once wait_for holds."""
    def setup(w: Path) -> None:
        _deep(w)
        interrupted(w, args(w), signal.SIGKILL, wait_for)
    return setup


def _cells_once(w: Path) -> str | None:
    """m.csv of the killed-and-rerun measure: every row the header's width, each of its 4 cells (rtn/gptq x 4/3
    bits) exactly once."""
    import csv

    with open(w / "m.csv", newline="") as f:
        rows = list(csv.reader(f))
    width = len(rows[0])
    if any(len(r) != width for r in rows[1:]):
        return "m.csv holds a row of another width"
    at = {name: i for i, name in enumerate(rows[0])}
    cells = sorted((r[at["method"]], r[at["bits"]]) for r in rows[1:])
    want = sorted((m, b) for m in ("rtn", "gptq") for b in ("4", "3"))
    return None if cells == want else f"m.csv's cells {cells}, not each of {want} once"


def _demo_made(rel: str):
    return lambda w, r: None if (w / rel).is_dir() and any((w / rel).iterdir()) else f"no {rel}/"


def _kill_cases(out: Cases) -> None:
    add = out.add
    calg = lambda w, *e: ["calibrate", w / "deep", "--calib", w / "text.txt", *DEEP, *e, "-o", w / "out"]  # noqa: E731
    ref = same_as(lambda w: ["calibrate", w / "deep", "--calib", w / "text.txt", *DEEP, "-o", w / "ref"])
    add("kill15", "calibrate killed (SIGKILL) once its progress shows, run again the same: a whole export",
        lambda w: run_cli(*calg(w)), _killed(calg), valid(ref))
    add("kill15", "calibrate killed, run again with --overwrite: a whole export",
        lambda w: run_cli(*calg(w, "--overwrite")), _killed(calg), valid(ref))
    add("kill15", "calibrate --low-memory killed after its first layer, run again without --resume",
        lambda w: run_cli(*calg(w, "--low-memory")), _killed(lambda w: calg(w, "--low-memory"),
                                                             wait_for="out.partial/state.json"), _maybe(ref))
    add("kill15", "calibrate --low-memory killed, then --resume: equals a fresh run",
        lambda w: run_cli(*calg(w, "--resume")), _killed(lambda w: calg(w, "--low-memory"),
                                                         wait_for="out.partial/state.json"), _maybe(ref))
    imp = lambda w: ["importance", w / "deep", "--calib", w / "text.txt", "--nsamples", "8", "--seqlen", "64", "-o",  # noqa: E731
                     w / "set"]
    add("kill15", "importance killed once its progress shows, run again: a whole set", lambda w: run_cli(*imp(w)),
        _killed(imp), valid(set_ok()))
    evo = lambda w: ["eval", w / "deep", "--data", w / "text.txt", "--seqlen", "64", "--batch-size", "1", "--part",  # noqa: E731
                     "all", "-o", w / "r.json"]
    add("kill15", "eval -o r.json killed once its progress shows, run again: r.json whole", lambda w: run_cli(*evo(w)),
        _killed(evo), valid(lambda w, r: None if json.loads((w / "r.json").read_text()) else "r.json empty"))
    qm = lambda w: ["qid", "measure", w / "deep", "--eval", w / "text.txt", "--eval-tokens", "512", "--eval-seqlen",  # noqa: E731
                    "64", "--methods", "rtn,gptq", "--bits", "4,3", "--nsamples", "4", "--calib-seqlen", "64",
                    "--group-size", "32", "--tokens", "1e9", "-o", w / "m.csv"]
    add("kill15", "qid measure killed once its progress shows, run again: whole rows, none twice",
        lambda w: run_cli(*qm(w)), _killed(qm), valid(lambda w, r: _cells_once(w) or csv_rows_ok(w, r)))
    demo = lambda w: ["demo", "--model", w / "deep", "--data", w / "text.txt", "--nsamples", "8", "--seqlen", "64",  # noqa: E731
                      "--format", "fake", "-o", w / "d"]
    add("kill15", "demo on your model killed once its progress shows, run again: d/ made", lambda w: run_cli(
        *demo(w)), _killed(demo), valid(_demo_made("d")))


# ---------------------------------------------------------------- H. environments (child processes)

ASCII_ONLY = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
ACCENTED = "café naïve résumé 東京 "


def _accented_text(w: Path) -> None:
    words = (w / "text.txt").read_text().split()
    (w / "u.txt").write_text(" ".join(ACCENTED + x if i % 50 == 0 else x for i, x in enumerate(words)),
                             encoding="utf-8")


def _umasked(w: Path, mask: int, *args) -> Ran:
    done = subprocess.run([QUANTKIT_BIN, *[str(a) for a in args]], cwd=w, text=True, capture_output=True,
                          stdin=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          preexec_fn=lambda: os.umask(mask), timeout=220)
    return Ran(done.returncode, done.stdout, done.stderr)


def _modes(rel: str, mask: int):
    """A check: rel (a file, or a folder and every file in it) has the mode the umask gives a new file/folder."""
    def check(w: Path, result) -> str | None:
        path = w / rel
        if not path.exists():
            return f"no {rel}"
        paths = [path, *path.rglob("*")] if path.is_dir() else [path]
        for p in paths:
            want = (0o777 if p.is_dir() else 0o666) & ~mask
            got = p.stat().st_mode & 0o777
            if got != want:
                return f"{p.relative_to(w)} has mode {got:o}, umask {mask:03o} gives {want:o}"
        return None
    return check


def _hash_seeds(w: Path, rel: str, files: tuple[str, ...], *args) -> Ran:
    """`quantkit ARGS` (its output at w/rel) under PYTHONHASHSEED 1, then again under 2 into rel2: the files equal."""
    first = child(w, *args, env={"PYTHONHASHSEED": "1"})
    if first.exit_code != 0:
        return first
    second = child(w, *[str(a).replace(str(w / rel), str(w / (rel + "2"))) for a in args],
                   env={"PYTHONHASHSEED": "2"})
    if second.exit_code != 0:
        return second
    for name in files:
        if (w / rel / name).read_bytes() != (w / (rel + "2") / name).read_bytes():
            return Ran(0, first.stdout, f"DIFFER {name}")
    return first


def _no_differ(w: Path, result) -> str | None:
    return "the two runs' files differ" if "DIFFER" in result.stderr else None


def _env_cases(out: Cases) -> None:
    add = out.add
    add("env15", "calibrate GPTQ under PYTHONHASHSEED 1 and 2: the same bytes", lambda w: _hash_seeds(
        w, "out", ("model.safetensors",), "calibrate", w / "model", "--calib", w / "text.txt", *GPTQ, "-o", w / "out"),
        None, valid(_no_differ))
    add("env15", "calibrate TLQ under PYTHONHASHSEED 1 and 2: the same bytes", lambda w: _hash_seeds(
        w, "out", ("model.safetensors",), "calibrate", w / "model", "--calib", w / "text.txt", "--method", "tlq",
        "--nsamples", "2", "--seqlen", "16", "--group-size", "32", "-o", w / "out"), None, valid(_no_differ))
    add("env15", "importance under PYTHONHASHSEED 1 and 2: the same set", lambda w: _hash_seeds(
        w, "set", ("samples.safetensors", "weights.safetensors"), "importance", w / "model", "--calib",
        w / "text.txt", "--nsamples", "2", "--seqlen", "16", "-o", w / "set"), None, valid(_no_differ))
    # an ASCII-only locale with neither UTF-8 mode nor locale coercion: files are UTF-8 whatever the locale
    ref_u = same_as(lambda w: ["calibrate", w / "model", "--calib", w / "u.txt", *GPTQ, "-o", w / "ref"])
    add("env15", "calibrate of UTF-8 text under an ASCII-only locale equals the run under UTF-8", lambda w: child(
        w, "calibrate", w / "model", "--calib", w / "u.txt", *GPTQ, "-o", w / "out", env=ASCII_ONLY),
        _accented_text, valid(ref_u))
    add("env15", "eval of UTF-8 text under an ASCII-only locale equals the run under UTF-8", lambda w: child(
        w, "eval", w / "model", "--data", w / "u.txt", *EV, env=ASCII_ONLY), _accented_text, valid(eval_close_to(
            lambda w: ["eval", w / "model", "--data", w / "u.txt", *EV], 0.0)))
    add("env15", "importance of UTF-8 text under an ASCII-only locale", lambda w: child(
        w, "importance", w / "model", "--calib", w / "u.txt", "--nsamples", "2", "--seqlen", "16", "-o", w / "set",
        env=ASCII_ONLY), _accented_text, valid(set_ok()))
    add("env15", "calibrate of UTF-8 JSONL under an ASCII-only locale equals the run under UTF-8", lambda w: child(
        w, "calibrate", w / "model", "--calib", w / "u.jsonl", *GPTQ, "-o", w / "out", env=ASCII_ONLY),
        lambda w: (_accented_text(w), (w / "u.jsonl").write_text("".join(
            json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in (w / "u.txt").read_text().split(" w1 ")
            if t.strip()), encoding="utf-8")),
        valid(same_as(lambda w: ["calibrate", w / "model", "--calib", w / "u.jsonl", *GPTQ, "-o", w / "ref"])))
    add("env15", "calibrate --recipe with a UTF-8 comment under an ASCII-only locale", lambda w: child(
        w, "calibrate", w / "model", "--calib", w / "text.txt", *RTN, "--recipe", w / "r.yaml", "-o", w / "out",
        env=ASCII_ONLY), write("r.yaml", "# café: the head stays\nignore: [lm_head]\n"), valid(same_as(cal_ref())))
    add("env15", "calibrate --chat-template with UTF-8 text under an ASCII-only locale", lambda w: child(
        w, "calibrate", w / "model", "--calib", w / "c.jsonl", *GPTQ, "--chat-template", w / "t.jinja", "-o",
        w / "out", env=ASCII_ONLY), both(
            write("t.jinja", "{% for m in messages %}{{ m.content }} — {% endfor %}"),
            write("c.jsonl", "".join(json.dumps({"messages": [{"role": "user", "content": "w1 w2 w3"},
                                                             {"role": "assistant", "content": "w4 w5"}]}) + "\n"
                                     for _ in range(4)))),
        valid(same_as(lambda w: ["calibrate", w / "model", "--calib", w / "c.jsonl", *GPTQ, "--chat-template",
                                 w / "t.jinja", "-o", w / "ref"])))
    uq = QID_HEADER + build_qid_rows().replace("m1,", "mödel-ü,")
    add("env15", "qid fit of a CSV with a UTF-8 model label under an ASCII-only locale", lambda w: child(
        w, "qid", "fit", w / "u.csv", "--bootstrap", "0", "--json", env=ASCII_ONLY), write("u.csv", uq.encode()),
        valid(lambda w, r: None if json.loads(r.stdout).get("fits") else "no fits"))
    add("env15", "qid plot of a CSV with a UTF-8 model label under an ASCII-only locale", lambda w: child(
        w, "qid", "plot", w / "u.csv", "--format", "png", "-o", w / "figs", env=ASCII_ONLY), write("u.csv", uq.encode()),
        valid(lambda w, r: None if list((w / "figs").glob("*.png")) else "no figures"))
    add("env15", "calibrate -o a UTF-8 name under an ASCII-only locale (human output)", lambda w: child(
        w, "calibrate", w / "model", "--calib", w / "text.txt", *RTN, "-o", w / "sortie-é", env=ASCII_ONLY),
        None, valid(export_ok("sortie-é")))
    add("env15", "eval -o a UTF-8 name under an ASCII-only locale", lambda w: child(
        w, "eval", w / "model", "--data", w / "text.txt", *EV, "-o", w / "résultat.json", env=ASCII_ONLY),
        None, valid(lambda w, r: None if json.loads((w / "résultat.json").read_text()) else "empty"))
    # umask: a right program's outputs get the modes the user's umask gives
    for mask in (0o027, 0o002):
        add("env15", f"calibrate under umask {mask:03o}: the export's modes", lambda w, m=mask: _umasked(
            w, m, "calibrate", w / "model", "--calib", w / "text.txt", *RTN, "-o", w / "out"), None,
            valid(_modes("out", mask)))
        add("env15", f"eval -o under umask {mask:03o}: r.json's mode", lambda w, m=mask: _umasked(
            w, m, "eval", w / "model", "--data", w / "text.txt", *EV, "-o", w / "r.json"), None,
            valid(_modes("r.json", mask)))
        add("env15", f"importance under umask {mask:03o}: the set's modes", lambda w, m=mask: _umasked(
            w, m, "importance", w / "model", "--calib", w / "text.txt", "--nsamples", "2", "--seqlen", "16", "-o",
            w / "set"), None, valid(_modes("set", mask)))
        add("env15", f"qid fit -o under umask {mask:03o}: the fit's mode", lambda w, m=mask: _umasked(
            w, m, "qid", "fit", w / "q.csv", "--bootstrap", "0", "-o", w / "f.json"), None,
            valid(_modes("f.json", mask)))
    add("env15", "export under umask 027: the export's modes", lambda w: _umasked(
        w, 0o027, "export", w / "ct", "--format", "gptq", "-o", w / "out"), None, valid(_modes("out", 0o027)))
    add("env15", "qid plot under umask 027: the figures' modes", lambda w: _umasked(
        w, 0o027, "qid", "plot", w / "q.csv", "--format", "png", "-o", w / "figs"), None, valid(_modes("figs", 0o027)))


# ---------------------------------------------------------------- I. round trips with odd option combinations

def _rt_cases(out: Cases) -> None:
    add = out.add
    ev_of = lambda rel: ["eval", rel, "--data", "text.txt", *EV]  # noqa: E731

    def chain(*steps):
        """Exports one after another: steps of (src, fmt, dst, extra)."""
        def run(w: Path):
            done = None
            for src, fmt, dst, extra in steps:
                done = run_cli("export", w / src, "--format", fmt, "-o", w / dst, *extra)
                if done.exit_code != 0:
                    return done
            return done
        return run

    for name, steps, check in [
        ("ct -> fake 1KB shards -> compressed-tensors equals ct", [("ct", "fake", "mid", ["--max-shard-size", "1KB"]),
                                                                   ("mid", "compressed-tensors", "out", [])],
         weights_close("out", "ct", 1e-6)),
        ("asym -> fake -> gptq equals asym", [("asym", "fake", "mid", []), ("mid", "gptq", "out", [])],
         weights_close("out", "asym", 1e-6)),
        ("gptq -> gptq_v2 -> gptq equals gptq", [("gptq", "gptq_v2", "mid", []), ("mid", "gptq", "out", [])],
         weights_close("out", "gptq", 1e-6)),
        ("head -> compressed-tensors (lm_head quantized, same format) equals head",
         [("head", "compressed-tensors", "out", [])], weights_close("out", "head", 1e-6)),
        ("fake W3 -> compressed-tensors equals fake", [("fake", "compressed-tensors", "out", [])],
         weights_close("out", "fake", 1e-6)),
        ("a8 (W8A8) -> fake -> compressed-tensors equals a8", [("a8", "fake", "mid", []),
                                                              ("mid", "compressed-tensors", "out", [])],
         weights_close("out", "a8", 1e-6)),
    ]:
        add("rt15", f"export {name}", chain(*steps), None, valid(check))
    for name, src, setup in [
        ("a symlink to ct", "lnct", lambda w: (w / "lnct").symlink_to(w / "ct")),
        ("'ct/' (a trailing slash)", "ct/", None),
        ("'ct/../ct' (a dotted path)", "ct/../ct", None),
        ("ct whose README.md (the model card) is deleted", "ct", lambda w: (w / "ct" / "README.md").unlink()),
        ("ct whose quantkit_report.json is deleted", "ct", lambda w: (w / "ct" / "quantkit_report.json").unlink()),
    ]:
        add("rt15", f"export of {name} --format fake equals ct", lambda w, s=src: run_cli(
            "export", f"{w}/{s}", "--format", "fake", "-o", w / "out"), setup, valid(weights_close("out", "ct", 1e-6)))
    add("rt15", "eval of ct re-exported in 1KB shards equals eval of ct", lambda w: run_cli(*ev_of(w / "sh")),
        lambda w: _made_before(["export", w / "ct", "--format", "compressed-tensors", "--max-shard-size", "1KB", "-o",
                                w / "sh"]), valid(eval_close_to(lambda w: ev_of(w / "ct"), 1e-5)))
    add("rt15", "eval --stride 8 of ct -> fake equals eval --stride 8 of ct", lambda w: run_cli(
        *ev_of(w / "fk"), "--stride", "8"), lambda w: _made_before(["export", w / "ct", "--format", "fake", "-o",
                                                                    w / "fk"]),
        valid(eval_close_to(lambda w: [*ev_of(w / "ct"), "--stride", "8"], 1e-5)))
    add("rt15", "eval --batch-size 3 of gptq -> ct equals eval of gptq", lambda w: run_cli(
        *ev_of(w / "g2c"), "--batch-size", "3"), lambda w: _made_before(["export", w / "gptq", "--format",
                                                                         "compressed-tensors", "-o", w / "g2c"]),
        valid(eval_close_to(lambda w: ev_of(w / "gptq"), 1e-4)))
    add("rt15", "export ct -o ct --overwrite (onto itself)", lambda w: run_cli(
        "export", w / "ct", "--format", "fake", "-o", w / "ct", "--overwrite"))
    add("rt15", "export ct -o ct/sub (inside its input)", lambda w: run_cli(
        "export", w / "ct", "--format", "fake", "-o", w / "ct" / "sub"))
    add("rt15", "export lnct -o ct --overwrite (onto its input through a symlink)", lambda w: run_cli(
        "export", w / "lnct", "--format", "fake", "-o", w / "ct", "--overwrite"),
        lambda w: (w / "lnct").symlink_to(w / "ct"))
    add("rt15", "export ct --format fake into out twice, --overwrite the second time: equals ct", lambda w: run_cli(
        "export", w / "ct", "--format", "fake", "-o", w / "out", "--overwrite"),
        lambda w: _made_before(["export", w / "gptq", "--format", "fake", "-o", w / "out"]),
        valid(weights_close("out", "ct", 1e-6)))
    add("rt15", "calibrate --calib-set made on model, then eval of the export and re-export: equals the export",
        lambda w: run_cli("export", w / "o1", "--format", "gptq", "-o", w / "out"), lambda w: (
            _made_before(["importance", w / "model", "--calib", w / "text.txt", "--nsamples", "2", "--seqlen", "16",
                          "-o", w / "set"]),
            _made_before(["calibrate", w / "model", "--calib-set", w / "set", "--group-size", "32", "-o", w / "o1"])),
        valid(weights_close("out", "o1", 1e-6)))


def fifteenth_round() -> list:
    """Round 15's cases."""
    out = Cases()
    _task_cases(out)
    _name_cases(out)
    _opt_cases(out)
    _model_cases(out)
    _cfg_cases(out)
    _api_cases(out)
    _kill_cases(out)
    _env_cases(out)
    _rt_cases(out)
    return out
