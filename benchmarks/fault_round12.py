"""Round 12 of the fault battery (issue #22): a fresh set by another hand, run by fault_battery.py --rounds 12.

What rounds 1-11 did not try: the calibration recipe YAML a user writes (every key with a wrong type, booleans for
numbers, duplicated keys, anchors and merge keys, several documents, tags, odd suffixes, weights that overflow) and
the quantization recipe YAML likewise; chat records with roles missing, out of order, empty or odd content and
chat-template files that fail to render; image-text records whose image is URL-looking, a data URI, corrupt, an
unusual mode or shape, or the same PNG spelled another valid way; a calibration set edited between `importance`
and `calibrate` (manifest fields, sample ids, weights) or its model edited after; `export` chains and exports whose
quantkit.json was edited before re-export; `eval` windows, strides, parts and outputs; `qid predict`/`fit`/`plot`
with odd numbers and tables; the Python API's Recipe/Override/load_quantized types; and the process environment
(HOME, TMPDIR, HF_HOME, locale, read-only cwd) in a child process. Valid inputs spelled another way carry a check
against an independent reference run.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import torch
from fault_battery import (
    CHAT_TEMPLATE,
    QID_HEADER,
    RTN,
    Cases,
    _make_set,
    _maybe,
    _set_file,
    both,
    build_qid_rows,
    cal_ref,
    child,
    eval_close_to,
    eval_ok,
    export_ok,
    finite_model,
    json_edit,
    mount_tmpfs,
    quantize,
    returned_ok,
    run_cli,
    same_as,
    tri,
    valid,
    write,
)

# names rounds 1-11 used already (the same inputs): left out
EARLIER = {'--chat-template a directory', '--calib-set with --chat-template', '--floor-fraction 0.3 without --top-fraction', '--top-fraction nan', '--power -1', '--power nan', '--lam nan', '--per-modality on a text model', '--guidance linear --row-groups 0', '--seed -1', '--device meta', "--max-shard-size '5gb'", "--max-shard-size '5 GB'", "--max-shard-size '5GiB'", "--max-shard-size '1.5MB'", "--max-shard-size '0'", "--max-shard-size '1e3'", '--stride -4', '--max-tokens 0', '--max-tokens -1', '--batch-size -1', 'predict --params 0', 'predict --params inf', 'predict --bits 0', 'fit --level 0', 'fit --level 1', 'fit --level nan', 'fit --huber-delta 0 --estimator huber', 'fit --huber-delta nan --estimator huber', 'Recipe.from_dict(None)', 'TMPDIR a missing folder', 'HF_HOME a file', 'HF_HUB_OFFLINE=1 with a hub id'}
PLAIN = "sources:\n  - path: text.txt\n"
SET_RUN = ["--group-size", "32"]
NO_COUNTS = ["--method", "rtn", "--group-size", "32"]  # the recipe's own nsamples and seqlen apply
VLM_RUN = ["--method", "rtn", "--nsamples", "2", "--seqlen", "256", "--group-size", "32"]


def _mount(rel: str, readonly: bool = False):
    """mount_tmpfs, the mount recorded where the running battery unmounts it (it runs as __main__, whose MOUNTS is
    not the imported fault_battery's)."""
    import sys

    import fault_battery

    def setup(w: Path) -> None:
        mount_tmpfs(rel, readonly=readonly)(w)
        main = sys.modules.get("__main__")
        if getattr(main, "MOUNTS", None) is not None and main.MOUNTS is not fault_battery.MOUNTS:
            main.MOUNTS.append(fault_battery.MOUNTS.pop())
    return setup


def _need_set(w: Path) -> None:
    """set/: the llama's calibration set (2 x 16 tokens), made once in the shared base and copied in."""
    base = w.parent / "base"
    if not (base / "set12").is_dir():  # not "set": every later case folder is a copy of the base
        _make_set(base)
        (base / "set").rename(base / "set12")
    if not (w / "set").is_dir():
        shutil.copytree(base / "set12", w / "set")


def _set_tensors(name: str, edit):
    """A setup editing set/NAME's tensors and renewing its hash in the manifest (an edited, consistent set)."""
    return both(_need_set, _set_file(name, edit))


def _set_manifest(edit):
    return both(_need_set, json_edit("set/manifest.json", edit))


def _set_ref(w: Path) -> list:
    return ["calibrate", w / "model", "--calib-set", w.parent / "base" / "set12", *SET_RUN, "-o", w / "ref"]


def _model_tensor(key: str, edit):
    def setup(w: Path) -> None:
        from safetensors.torch import load_file, save_file

        state = load_file(w / "model" / "model.safetensors")
        state[key] = edit(state[key].clone()).contiguous()
        save_file(state, w / "model" / "model.safetensors", metadata={"format": "pt"})
    return setup


def _chat(records: list, name: str = "chat.jsonl", raw: str | None = None):
    """A setup writing chat records (or raw text) and the plain chat template t.jinja."""
    def setup(w: Path) -> None:
        (w / "t.jinja").write_text(CHAT_TEMPLATE)
        (w / name).write_text(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in records))
    return setup


def _words(i: int, n: int = 12) -> str:
    return " ".join(f"w{(7 * i + 3 * j) % 60}" for j in range(n))


def _msgs(i: int, roles=("user", "assistant")) -> list:
    return [{"role": r, "content": _words(i + k)} for k, r in enumerate(roles)]


CHATS = [{"messages": _msgs(i)} for i in range(6)]


def _chat_ref(w: Path) -> list:
    return ["calibrate", w / "model", "--calib", w / "cref.jsonl", "--chat-template", w / "t.jinja", *RTN, "-o",
            w / "ref"]


def _with_chat_ref(setup):
    def both_(w: Path) -> None:
        setup(w)
        (w / "cref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHATS))
    return both_


def _vl(edit, name: str = "d.jsonl"):
    """A setup writing vl/NAME: vl/data.jsonl's records after edit(w, records)."""
    def setup(w: Path) -> None:
        records = [json.loads(line) for line in (w / "vl" / "data.jsonl").read_text().splitlines() if line.strip()]
        edit(w, records)
        (w / "vl" / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return setup


def _img_all(value_of):
    def edit(w: Path, records: list) -> None:
        for i, r in enumerate(records):
            r["image"] = value_of(w, i, r["image"])
    return edit


def _img_first(value_of):
    def edit(w: Path, records: list) -> None:
        records[0]["image"] = value_of(w, 0, records[0]["image"])
    return edit


def _new_image(name: str, make):
    def value_of(w: Path, i: int, old: str) -> str:
        make(w / "vl" / name)
        return name
    return value_of


def _pil(mode: str, size=(56, 56), fmt: str | None = None, **save):
    def make(path: Path) -> None:
        from PIL import Image

        Image.new(mode, size, 128 if mode in ("L", "I;16", "I", "F", "P", "1") else (200, 20, 20, 0)[:len(mode)]
                  ).save(path, format=fmt, **save)
    return make


def _gif_frames(path: Path) -> None:
    from PIL import Image

    frames = [Image.new("P", (56, 56), c) for c in (1, 80, 160)]
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _tiff_pages(path: Path) -> None:
    from PIL import Image

    pages = [Image.new("RGB", (56, 56), c) for c in ((255, 0, 0), (0, 255, 0))]
    pages[0].save(path, format="TIFF", save_all=True, append_images=pages[1:])


def _vl_ref(w: Path) -> list:
    return ["calibrate", w / "vlm", "--calib", w / "vl" / "data.jsonl", *VLM_RUN, "-o", w / "ref"]


def _copy_png_as(suffix: str):
    def value_of(w: Path, i: int, old: str) -> str:
        new = old.rsplit(".", 1)[0] + suffix
        shutil.copy(w / "vl" / old, w / "vl" / new)
        return new
    return value_of


def _qid_rows() -> list[list[str]]:
    return list(csv.reader(io.StringIO(QID_HEADER + build_qid_rows())))


def _table(edit) -> str:
    rows = _qid_rows()
    edit(rows)
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


def _cell(col: str, value: str, row: int = 1):
    def edit(rows: list) -> None:
        rows[row][rows[0].index(col)] = value
    return edit


def _every(col: str, value: str):
    def edit(rows: list) -> None:
        for r in rows[1:]:
            r[rows[0].index(col)] = value
    return edit


def _fit_json(w: Path) -> None:
    done = run_cli("qid", "fit", w / "q.csv", "--bootstrap", "0", "--law", "unified", "-o", w / "fit.json")
    assert done.exit_code == 0, done.output[-300:]


def _predict_same(*ref_args):
    """A check: the prediction's JSON equals that of the reference spelling."""
    def check(w: Path, result) -> str | None:
        ref = run_cli("qid", "predict", *ref_args, "--json")
        if ref.exit_code != 0:
            return f"the reference prediction failed: {ref.output[-200:]}"
        return None if json.loads(ref.stdout) == json.loads(result.stdout) else "the prediction differs from the reference's"
    check.valid = True
    return check


def _finite_prediction(w: Path, result) -> str | None:
    import math

    doc = json.loads(result.stdout)
    nums = [v for v in doc.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return None if nums and all(math.isfinite(v) for v in nums) else f"a non-finite prediction: {doc}"


def _fit_finite(w: Path, result) -> str | None:
    import math

    text = result.stdout
    try:
        doc = json.loads(text)
    except ValueError:
        return "not JSON"
    bad = []

    def walk(x, where=""):
        if isinstance(x, float) and not math.isfinite(x):
            bad.append(where)
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{where}.{k}")
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, f"{where}[{i}]")
    walk(doc)
    return f"non-finite fit values at {bad[:3]}" if bad else None


def _figs(rel: str = "figs"):
    def check(w: Path, result) -> str | None:
        made = list((w / rel).glob("*.png")) if (w / rel).is_dir() else []
        return None if made and all(p.stat().st_size > 100 for p in made) else f"no PNG figures in {rel}/"
    return check


def _set_same_as(*extra, data: str = "text.txt"):
    """A check: set/'s samples and weights equal, byte for byte, a reference `importance` run's in ref/."""
    def check(w: Path, result) -> str | None:
        done = run_cli("importance", w / "model", "--calib", w / data, "--nsamples", "2", "--seqlen", "16", *extra,
                       "-o", w / "ref")
        if done.exit_code != 0:
            return f"the reference importance failed: {done.output[-200:]}"
        for name in ("samples.safetensors", "weights.safetensors"):
            if (w / "set" / name).read_bytes() != (w / "ref" / name).read_bytes():
                return f"set/{name} differs from the reference run's"
        return None
    check.valid = True
    return check


def _logits_like(rel: str, ref_rel: str, tol: float = 1e-4):
    def check(w: Path, result) -> str | None:
        from fault_battery import TEXT_IDS

        import quantkit

        a, b = quantkit.load_quantized(w / rel), quantkit.load_quantized(w / ref_rel)
        bad = finite_model(a)
        if bad:
            return bad
        with torch.no_grad():
            x, y = (m(torch.tensor(TEXT_IDS)).logits.float() for m in (a, b))
        worst = (x - y).abs().max().item()
        return None if worst <= tol else f"{rel}'s logits differ from {ref_rel}'s by {worst:.3g}"
    check.valid = True
    return check


def _chain(w: Path, src: str, *formats: str) -> Path:
    previous = w / src
    for i, fmt in enumerate(formats):
        done = run_cli("export", previous, "--format", fmt, "-o", w / f"c{i}")
        assert done.exit_code == 0, f"chain step {fmt}: {done.output[-200:]}"
        previous = w / f"c{i}"
    return previous


def _qk_edit(rel: str, edit):
    """A setup: x/ a copy of the export `rel` whose quantkit.json is edited."""
    def setup(w: Path) -> None:
        shutil.copytree(w / rel, w / "x")
        json_edit("x/quantkit.json", edit)(w)
    return setup


def _spec(key: str, value):
    return lambda d: d["spec"].update({key: value})


def twelfth_round() -> list:
    """Round 12's cases."""
    out = Cases()
    cli, cal, api, add = out.cli, out.cal, out.api, out.add

    # ---- calibration recipes (--calib r.yaml): the file a user writes
    same_plain = same_as(cal_ref(data="ref.yaml"))
    for name, text, kind, method in [
        ("nsamples: true (a boolean for a count)", "nsamples: true\nseqlen: 16\n" + PLAIN, "", NO_COUNTS),
        ("seqlen: yes (YAML 1.1 boolean)", "nsamples: 2\nseqlen: yes\n" + PLAIN, "", NO_COUNTS),
        ("nsamples: 2.0 (a float)", "nsamples: 2.0\nseqlen: 16\n" + PLAIN, "", NO_COUNTS),
        ("nsamples: '2' (a string)", "nsamples: '2'\nseqlen: 16\n" + PLAIN, "", NO_COUNTS),
        ("seqlen: 0x10 (YAML hex integer, 16)", "nsamples: 2\nseqlen: 0x10\n" + PLAIN, "maybe", NO_COUNTS),
        ("seqlen: 1_6 (YAML 1.1 underscore integer)", "nsamples: 2\nseqlen: 1_6\n" + PLAIN, "maybe", NO_COUNTS),
        ("nsamples: null", "nsamples: null\nseqlen: 16\n" + PLAIN, "", NO_COUNTS),
        ("seqlen: .inf", "nsamples: 2\nseqlen: .inf\n" + PLAIN, "", NO_COUNTS),
        ("seqlen 100 beyond the model's 64 positions", "nsamples: 2\nseqlen: 100\n" + PLAIN, "maybe", NO_COUNTS),
        ("kind: TEXT (capitals)", "kind: TEXT\n" + PLAIN, "maybe", RTN),
        ("kind: null", "kind: null\n" + PLAIN, "", RTN),
        ("kind: [text]", "kind: [text]\n" + PLAIN, "", RTN),
        ("kind: image-qa for a text model on a text file", "kind: image-qa\n" + PLAIN, "", RTN),
        ("name: a list", "name: [a, b]\n" + PLAIN, "maybe", RTN),
        ("description: a mapping", "description: {a: 1}\n" + PLAIN, "maybe", RTN),
        ("source weight: true", "sources:\n  - path: text.txt\n    weight: true\n", "", RTN),
        ("source weight: '0.5' (a string)", "sources:\n  - path: text.txt\n    weight: '0.5'\n", "", RTN),
        ("source weight and fraction both, different", "sources:\n  - path: text.txt\n    weight: 1\n"
         "    fraction: 0.2\n", "", RTN),
        ("source part: null", "sources:\n  - path: text.txt\n    part: null\n", "", RTN),
        ("source part: TRAIN", "sources:\n  - path: text.txt\n    part: TRAIN\n", "maybe", RTN),
        ("source path: ''", "sources:\n  - path: ''\n", "", RTN),
        ("source path: null", "sources:\n  - path: null\n", "", RTN),
        ("source path: 5", "sources:\n  - path: 5\n", "", RTN),
        ("source path: a list of two files", "sources:\n  - path: [text.txt, text.txt]\n", "", RTN),
        ("source path 'text.txt ' (a trailing space)", "sources:\n  - path: 'text.txt '\n", "", RTN),
        ("source path ~/ that does not exist", "sources:\n  - path: ~/no-such-quantkit-file.txt\n", "", RTN),
        ("source path a glob matching nothing", "sources:\n  - path: 'nothing-*.txt'\n", "", RTN),
        ("source path a folder with only an export", "sources:\n  - path: ct\n", "", RTN),
        ("source path the recipe file itself through ./", "sources:\n  - path: ./r.yaml\n", "", RTN),
        ("source path a second recipe", "sources:\n  - path: ref.yaml\n", "maybe", RTN),
        ("source entry a number", "sources:\n  - 5\n", "", RTN),
        ("source entry null", "sources:\n  - null\n", "", RTN),
        ("sources: a string", "sources: text.txt\n", "maybe", RTN),
        ("sources listed twice (duplicated key, the second a missing file)",
         PLAIN + "sources:\n  - path: missing.txt\n", "", RTN),
        ("nsamples given twice (duplicated key)", "nsamples: 2\nnsamples: 0\nseqlen: 16\n" + PLAIN, "", NO_COUNTS),
        ("two YAML documents", PLAIN + "---\n" + PLAIN, "", RTN),
        ("a top-level list of sources", "- path: text.txt\n", "", RTN),
        ("a top-level string", "text.txt\n", "", RTN),
        ("only comments", "# nothing here\n# at all\n", "", RTN),
        ("a !!python/object tag", "sources: !!python/object/apply:os.getcwd []\n", "", RTN),
        ("a !!binary path", "sources:\n  - path: !!binary dGV4dC50eHQ=\n", "", RTN),
        ("an alias to an undefined anchor", "sources:\n  - path: *nowhere\n", "", RTN),
        ("nested aliases nine deep (a billion laughs)",
         "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
         "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\nsources: *d\n", "", RTN),
        ("weights 1e308 and 1e308 (their sum overflows)", "sources:\n  - path: text.txt\n    weight: 1.0e308\n"
         "  - path: t2.txt\n    weight: 1.0e308\n", "maybe", RTN),
        ("weights 5e-324 and 0 (a subnormal total)", "sources:\n  - path: text.txt\n    weight: 5.0e-324\n"
         "  - path: t2.txt\n    weight: 0\n", "maybe", RTN),
        ("three sources for two samples", "sources:\n  - path: text.txt\n  - path: t2.txt\n  - path: t3.txt\n",
         "maybe", RTN),
        ("a source of chat records in a text recipe", "sources:\n  - path: chat.jsonl\n", "maybe", RTN),
    ]:
        setup = both(write("r.yaml", text), write("ref.yaml", PLAIN),
                     lambda w: [shutil.copy(w / "text.txt", w / n) for n in ("t2.txt", "t3.txt")],
                     _chat(CHATS))
        cal("datarecipe12", name, data="r.yaml", method=method, setup=setup,
            check=tri(kind, export_ok()))
    for name, text, fname in [
        ("a merge key (<<) in a source equals the plain recipe", "sources:\n  - <<: {path: text.txt}\n    weight: 1\n", "r.yaml"),
        ("JSON flow style in a .yaml equals the plain recipe", '{"sources": [{"path": "text.txt"}]}', "r.yaml"),
        ("suffix .YML in capitals equals the plain recipe", PLAIN, "r.YML"),
        ("a UTF-8 BOM equals the plain recipe", "\ufeff" + PLAIN, "r.yaml"),
        ("an explicit document start and end equals the plain recipe", "---\n" + PLAIN + "...\n", "r.yaml"),
        ("the absolute path of the text equals the plain recipe", None, "r.yaml"),
        ("path ./sub/../text.txt equals the plain recipe", "sources:\n  - path: ./sub/../text.txt\n", "r.yaml"),
        ("weight 2 on a single source equals the plain recipe", "sources:\n  - path: text.txt\n    weight: 2\n",
         "r.yaml"),
        ("fraction: 1 (the alias) equals the plain recipe", "sources:\n  - path: text.txt\n    fraction: 1\n",
         "r.yaml"),
        ("a quoted key and value equals the plain recipe", "\"sources\":\n  - \"path\": \"text.txt\"\n", "r.yaml"),
        ("source as a bare string equals the plain recipe", "sources:\n  - text.txt\n", "r.yaml"),
        ("$VAR in the path (set) equals the plain recipe", "sources:\n  - path: $QK12_DIR/text.txt\n", "r.yaml"),
    ]:
        def setup(w: Path, text=text, fname=fname) -> None:
            body = text
            if body is None:
                body = f"sources:\n  - path: {w / 'text.txt'}\n"
            (w / fname).write_text(body)
            (w / "sub").mkdir(exist_ok=True)
            (w / "ref.yaml").write_text(PLAIN)
            import os
            os.environ["QK12_DIR"] = str(w)
        cal("datarecipe12", name, data=fname, setup=setup, check=same_plain)
    cal("datarecipe12", "nsamples and seqlen from the recipe equal the same given as options",
        data="r.yaml", method=NO_COUNTS, setup=both(write("r.yaml", "nsamples: 2\nseqlen: 16\n" + PLAIN),
                                                    write("ref.yaml", PLAIN)),
        check=same_as(cal_ref(data="ref.yaml")))

    # ---- quantization recipes (--recipe q.yaml)
    no_recipe = same_as(cal_ref())
    for name, text, kind in [
        ("targets given twice (duplicated key)", "targets: [q_proj]\ntargets: [k_proj]\n", ""),
        ("two documents", "targets: [q_proj]\n---\nignore: [k_proj]\n", ""),
        ("a top-level list", "- q_proj\n- k_proj\n", ""),
        ("Targets (capital T)", "Targets: [q_proj]\n", ""),
        ("target (singular)", "target: [q_proj]\n", ""),
        ("targets: [null]", "targets: [null]\n", ""),
        ("targets: [5]", "targets: [5]\n", ""),
        ("targets: ['']", "targets: ['']\n", ""),
        ("targets re:[ (an unclosed class)", "targets: ['re:[']\n", ""),
        ("targets a layer that does not exist", "targets: [layers.99.mlp.down_proj]\n", ""),
        ("targets 'q_proj.' (a trailing dot)", "targets: ['q_proj.']\n", ""),
        ("ignore: Linear (every linear)", "ignore: Linear\n", ""),
        ("ignore: ''", "ignore: ''\n", ""),
        ("overrides item without targets", "overrides:\n  - bits: 8\n", ""),
        ("overrides item targets: []", "overrides:\n  - targets: []\n    bits: 8\n", ""),
        ("override group_size: true", "overrides:\n  - targets: [q_proj]\n    group_size: true\n", ""),
        ("override group_size: 0", "overrides:\n  - targets: [q_proj]\n    group_size: 0\n", ""),
        ("override group_size: -2", "overrides:\n  - targets: [q_proj]\n    group_size: -2\n", ""),
        ("override group_size: 48 (does not divide 32 columns)",
         "overrides:\n  - targets: [q_proj]\n    group_size: 48\n", "maybe"),
        ("override group_size: 32.0", "overrides:\n  - targets: [q_proj]\n    group_size: 32.0\n", ""),
        ("override bits: 4.5", "overrides:\n  - targets: [q_proj]\n    bits: 4.5\n", ""),
        ("override bits: '8'", "overrides:\n  - targets: [q_proj]\n    bits: '8'\n", ""),
        ("override act_order: 1", "overrides:\n  - targets: [q_proj]\n    act_order: 1\n", ""),
        ("override sym: 0", "overrides:\n  - targets: [q_proj]\n    sym: 0\n", ""),
        ("override sym: null only", "overrides:\n  - targets: [q_proj]\n    sym: null\n", ""),
        ("override fp_alpha: true", "overrides:\n  - targets: [q_proj]\n    fp_alpha: true\n", ""),
        ("override fp_alpha: 2", "overrides:\n  - targets: [q_proj]\n    fp_alpha: 2\n", ""),
        ("override fp_alpha: -0.5", "overrides:\n  - targets: [q_proj]\n    fp_alpha: -0.5\n", ""),
        ("override method: ''", "overrides:\n  - targets: [q_proj]\n    method: ''\n", ""),
        ("override method: awq", "overrides:\n  - targets: [q_proj]\n    method: awq\n", ""),
        ("override with an unknown key damp", "overrides:\n  - targets: [q_proj]\n    damp: 0.1\n", ""),
        ("override targets a pattern matching nothing", "overrides:\n  - targets: [nothing_proj]\n    bits: 8\n", ""),
        ("a !!python/name tag", "targets: !!python/name:os.getcwd\n", ""),
        ("a tab-separated key (invalid YAML)", "targets:\t[q_proj]\n", "maybe"),
        ("a billion laughs in targets",
         "a: &a [q, q, q, q, q, q, q, q, q]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\ntargets: *b\n", ""),
    ]:
        cal("quantrecipe12", name, "--recipe", "q.yaml", setup=write("q.yaml", text), check=tri(kind, export_ok()))
    for name, text in [
        ("targets: Linear equals no recipe", "targets: Linear\n"),
        ("targets: 're:.*' equals no recipe", "targets: ['re:.*']\n"),
        ("an empty mapping {} equals no recipe", "{}\n"),
        ("overrides: null equals no recipe", "overrides: null\n"),
        ("ignore lm_head twice through an anchor and alias equals no recipe", "ignore: [&h lm_head, *h]\n"),
        ("an override restating bits 4 through a merge key equals no recipe",
         "overrides:\n  - {<<: {bits: 4}, targets: [Linear]}\n"),
        ("targets every linear by suffix equals no recipe",
         "targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]\n"),
    ]:
        cal("quantrecipe12", name, "--recipe", "q.yaml", setup=write("q.yaml", text), check=no_recipe)
    cal("quantrecipe12", "overrides: a single mapping (one override) equals the list of it", "--recipe", "q.yaml",
        setup=both(write("q.yaml", "overrides: {targets: [q_proj], bits: 8}\n"),
                   write("qref.yaml", "overrides:\n  - targets: [q_proj]\n    bits: 8\n")),
        check=_maybe(same_as(cal_ref("--recipe", "qref.yaml"))))
    cal("quantrecipe12", "a recipe as JSON in a .json file equals the YAML one", "--recipe", "q.json",
        setup=both(write("q.json", '{"overrides": [{"targets": ["q_proj"], "bits": 8}]}'),
                   write("qref.yaml", "overrides:\n  - targets: [q_proj]\n    bits: 8\n")),
        check=same_as(cal_ref("--recipe", "qref.yaml")))
    cal("quantrecipe12", "a recipe with a BOM equals the plain one", "--recipe", "q.yaml",
        setup=both(write("q.yaml", "\ufeffoverrides:\n  - targets: [q_proj]\n    bits: 8\n"),
                   write("qref.yaml", "overrides:\n  - targets: [q_proj]\n    bits: 8\n")),
        check=same_as(cal_ref("--recipe", "qref.yaml")))

    # ---- chat records and chat templates
    chat = ["--chat-template", "t.jinja"]
    same_chat = same_as(_chat_ref)

    def recs(fn):
        return [fn(i) for i in range(6)]
    for name, records, kind in [
        ("a message without role", recs(lambda i: {"messages": [{"content": _words(i)},
                                                                {"role": "assistant", "content": _words(i + 1)}]}), ""),
        ("a message without content", recs(lambda i: {"messages": [{"role": "user"},
                                                                   {"role": "assistant", "content": _words(i)}]}), ""),
        ("content null", recs(lambda i: {"messages": [{"role": "user", "content": None},
                                                      {"role": "assistant", "content": _words(i)}]}), ""),
        ("content an integer", recs(lambda i: {"messages": [{"role": "user", "content": 5},
                                                            {"role": "assistant", "content": 7}]}), ""),
        ("empty content everywhere", recs(lambda i: {"messages": [{"role": "user", "content": ""},
                                                                  {"role": "assistant", "content": ""}]}), ""),
        ("messages: []", recs(lambda i: {"messages": []}), ""),
        ("messages a string", recs(lambda i: {"messages": _words(i)}), ""),
        ("messages a mapping", recs(lambda i: {"messages": {"role": "user", "content": _words(i)}}), ""),
        ("messages nested in a list", recs(lambda i: {"messages": [_msgs(i)]}), ""),
        ("role 'bot' (unknown)", recs(lambda i: {"messages": _msgs(i, ("user", "bot"))}), "maybe"),
        ("role 5", recs(lambda i: {"messages": [{"role": 5, "content": _words(i)}]}), ""),
        ("assistant first, user second", recs(lambda i: {"messages": _msgs(i, ("assistant", "user"))}), "maybe"),
        ("user only (no assistant tokens)", recs(lambda i: {"messages": _msgs(i, ("user",))}), "maybe"),
        ("two assistants in a row", recs(lambda i: {"messages": _msgs(i, ("user", "assistant", "assistant"))}),
         "maybe"),
        ("a tool message with tool_calls", recs(lambda i: {"messages": [
            {"role": "user", "content": _words(i)},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                "name": "f", "arguments": {"x": 1}}}]},
            {"role": "tool", "content": _words(i + 1)}, {"role": "assistant", "content": _words(i + 2)}]}), "maybe"),
        ("content a list of text parts", recs(lambda i: {"messages": [
            {"role": "user", "content": [{"type": "text", "text": _words(i)}]},
            {"role": "assistant", "content": [{"type": "text", "text": _words(i + 1)}]}]}), "maybe"),
        ("key 'message' (typo) for messages", recs(lambda i: {"message": _msgs(i)}), ""),
        ("key 'Messages' (capital)", recs(lambda i: {"Messages": _msgs(i)}), ""),
        ("both messages and text in each record", recs(lambda i: {"messages": _msgs(i), "text": _words(i)}),
         "maybe"),
        ("system only", recs(lambda i: {"messages": _msgs(i, ("system",))}), "maybe"),
    ]:
        cal("chat12", name, *chat, data="chat.jsonl", setup=_chat(records), check=tri(kind, export_ok()))
    for name, records in [
        ("an extra 'id' per record equals the plain records", [{"id": i, **r} for i, r in enumerate(CHATS)]),
        ("an extra 'name' per message equals the plain records",
         [{"messages": [{**m, "name": "n"} for m in r["messages"]]} for r in CHATS]),
        ("keys in another order equal the plain records",
         [{"messages": [{"content": m["content"], "role": m["role"]} for m in r["messages"]]} for r in CHATS]),
    ]:
        cal("chat12", name, *chat, data="chat.jsonl", setup=_with_chat_ref(_chat(records)), check=same_chat)
    plain_lines = [json.dumps(r) for r in CHATS]
    for name, raw in [
        ("indented JSON spacing equals the plain records", "\n".join(json.dumps(r, indent=None, separators=(" ,", " : "))
                                                                     for r in CHATS) + "\n"),
        ("\\u-escaped ASCII equals the plain records", "\n".join(
            line.replace("w1", "\\u0077\\u0031") for line in plain_lines) + "\n"),
        ("blank lines between records equal the plain records", "\n\n".join(plain_lines) + "\n\n"),
        ("CRLF line ends equal the plain records", "\r\n".join(plain_lines) + "\r\n"),
        ("no newline at the end equals the plain records", "\n".join(plain_lines)),
    ]:
        cal("chat12", name, *chat, data="chat.jsonl", setup=_with_chat_ref(_chat([], raw=raw)), check=same_chat)
    for name, template, kind in [
        ("template file empty", "", ""),
        ("template with a syntax error", "{% for m in messages %}{{ m.content }", ""),
        ("template that raises", "{{ raise_exception('no chats here') }}", ""),
        ("template rendering nothing", "{% for m in messages %}{% endfor %}", ""),
        ("template reading an undefined attribute of an undefined name", "{{ nothing.at.all }}", ""),
        ("template looping past the sandbox's range", "{% for i in range(10**9) %}x{% endfor %}", ""),
        ("template of invalid UTF-8 bytes", b"\xff\xfe{{ messages }}\x80", ""),
        ("template rendering a constant", "w1 w2 w3 w4 w5 w6 w7 w8", "maybe"),
        ("template with {% generation %} markers", "{% for m in messages %}{% if m.role == 'assistant' %}"
         "{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }} {% endif %}{% endfor %}", "maybe"),
        ("template importing another file", "{% include 'other.jinja' %}", ""),
    ]:
        cal("chat12", f"--chat-template: {name}", "--chat-template", "tt.jinja", data="chat.jsonl",
            setup=both(_chat(CHATS), write("tt.jinja", template)), check=tri(kind, export_ok()))
    cal("chat12", "--chat-template a directory", "--chat-template", "ct", data="chat.jsonl", setup=_chat(CHATS))
    cal("chat12", "--chat-template with plain text data", "--chat-template", "t.jinja", setup=_chat(CHATS),
        check=_maybe(export_ok()))
    cal("chat12", "--chat-template the tokenizer.json", "--chat-template", "model/tokenizer.json", data="chat.jsonl",
        setup=_chat(CHATS))
    cli("chat12", "importance --chat-template with a template that raises", lambda w: [
        "importance", w / "model", "--calib", w / "chat.jsonl", "--chat-template", w / "tt.jinja", "--nsamples", "2",
        "--seqlen", "16", "-o", w / "set"],
        setup=both(_chat(CHATS), write("tt.jinja", "{{ raise_exception('x') }}")))

    # ---- image-text records (the tiny Qwen2-VL)
    def vcal(name, edit, kind="", check=None, extra=()):
        add("vlm12", name, lambda w: run_cli("calibrate", w / "vlm", "--calib", w / "vl" / "d.jsonl", *VLM_RUN, *extra,
                                             "-o", w / "out"),
            _vl(edit), check if check is not None else tri(kind, export_ok()))
    vcal("image 'http://127.0.0.1:9/x.png' (a URL, nothing listening)",
         _img_first(lambda w, i, old: "http://127.0.0.1:9/x.png"))
    vcal("image 'file://' + the absolute path", _img_all(lambda w, i, old: f"file://{w / 'vl' / old}"), "maybe")
    vcal("image a data: URI of a PNG", _img_first(lambda w, i, old: "data:image/png;base64,"
                                                  + __import__("base64").b64encode((w / "vl" / old).read_bytes()).decode()),
         "maybe")
    vcal("image ''", _img_first(lambda w, i, old: ""))
    vcal("image null", _img_first(lambda w, i, old: None))
    vcal("image 5", _img_first(lambda w, i, old: 5))
    vcal("image a list of one path", _img_first(lambda w, i, old: [old]), "maybe")
    vcal("image a mapping {'path': ...}", _img_first(lambda w, i, old: {"path": old}), "maybe")
    vcal("image the img/ folder", _img_first(lambda w, i, old: "img"))
    vcal("image ~/ that does not exist", _img_first(lambda w, i, old: "~/no-such-quantkit.png"))
    vcal("image a PNG signature then garbage", _img_all(_new_image(
        "bad.png", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 50))))
    vcal("image a JPEG start-of-image marker only", _img_all(_new_image(
        "bad.jpg", lambda p: p.write_bytes(b"\xff\xd8\xff"))))
    vcal("image a JSON file named .png", _img_all(_new_image("j.png", lambda p: p.write_text('{"a": 1}'))))
    vcal("image an SVG file", _img_all(_new_image(
        "v.svg", lambda p: p.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>'))))
    vcal("image 1x1 pixel", _img_all(_new_image("one.png", _pil("RGB", (1, 1)))), "maybe")
    vcal("image 1x600 (aspect 600)", _img_all(_new_image("thin.png", _pil("RGB", (1, 600)))), "maybe")
    vcal("image 900x700 (many patches for seqlen 256)", _img_all(_new_image("big.png", _pil("RGB", (900, 700)))),
         "maybe")
    vcal("image CMYK JPEG", _img_all(_new_image("c.jpg", _pil("CMYK", fmt="JPEG"))), "maybe")
    vcal("image 16-bit grayscale PNG", _img_all(_new_image("g16.png", _pil("I;16"))), "maybe")
    vcal("image 1-bit PNG", _img_all(_new_image("b1.png", _pil("1"))), "maybe")
    vcal("image float TIFF (mode F)", _img_all(_new_image("f.tif", _pil("F", fmt="TIFF"))), "maybe")
    vcal("image palette PNG with transparency", _img_all(_new_image("p.png", _pil("P", transparency=0))), "maybe")
    vcal("image animated GIF of 3 frames", _img_all(_new_image("a.gif", _gif_frames)), "maybe")
    vcal("image multi-page TIFF", _img_all(_new_image("m.tif", _tiff_pages)), "maybe")
    vcal("image WebP", _img_all(_new_image("w.webp", _pil("RGB", fmt="WEBP"))), "maybe")
    vcal("image BMP", _img_all(_new_image("b.bmp", _pil("RGB", fmt="BMP"))), "maybe")
    vcal("image LA (grey and alpha) PNG", _img_all(_new_image("la.png", _pil("LA"))), "maybe")
    same_vl = same_as(_vl_ref)
    vcal("PNGs named .jpg equal the PNG records", _img_all(_copy_png_as(".jpg")), check=same_vl)
    vcal("PNGs named .PNG equal the PNG records", _img_all(_copy_png_as(".PNG")), check=same_vl)
    vcal("PNGs without a suffix equal the PNG records", _img_all(_copy_png_as("")), check=same_vl)
    vcal("paths ./img/N.png equal the PNG records", _img_all(lambda w, i, old: "./" + old), check=same_vl)
    vcal("paths img//N.png equal the PNG records", _img_all(lambda w, i, old: old.replace("/", "//")), check=same_vl)
    vcal("paths img/../img/N.png equal the PNG records", _img_all(lambda w, i, old: old.replace("img/", "img/../img/")),
         check=same_vl)
    vcal("an extra 'id' per record equals the plain records",
         lambda w, records: [r.update(id=i) for i, r in enumerate(records)], check=same_vl)
    vcal("text '' beside an image", lambda w, records: [r.update(text="") for r in records if "text" in r])
    vcal("text null beside an image", lambda w, records: [r.update(text=None) for r in records if "text" in r])
    vcal("a record with neither text nor messages", lambda w, records: [r.pop("text", None) or r.pop("messages", None)
                                                                        for r in records[:2]])

    # ---- calibration sets edited between importance and calibrate
    def setcal(name, setup, kind="", check=None, extra=()):
        add("calibset12", name, lambda w: run_cli("calibrate", w / "model", "--calib-set", w / "set", *SET_RUN, *extra,
                                                  "-o", w / "out"),
            setup, check if check is not None else tri(kind, export_ok()))
    same_set = same_as(_set_ref)
    for name, edit, kind in [
        ("manifest model_type 'mistral'", lambda d: d.update(model_type="mistral"), ""),
        ("manifest architectures ['MistralForCausalLM']", lambda d: d.update(architectures=["MistralForCausalLM"]), ""),
        ("manifest tokenizer_hash of zeros", lambda d: d.update(tokenizer_hash="0" * 64), ""),
        ("manifest config_hash of zeros", lambda d: d.update(config_hash="0" * 64), ""),
        ("manifest max_tokens 0", lambda d: d.update(max_tokens=0), "same"),
        ("manifest max_tokens -16", lambda d: d.update(max_tokens=-16), "same"),
        ("manifest sample_keys []", lambda d: d.update(sample_keys=[]), ""),
        ("manifest sample_keys 'input_ids' (a string)", lambda d: d.update(sample_keys="input_ids"), "maybe"),
        ("manifest files {}", lambda d: d.update(files={}), ""),
        ("manifest files a list", lambda d: d.update(files=list(d["files"])), ""),
        ("manifest files hash truncated", lambda d: d["files"].update(
            {"weights.safetensors": d["files"]["weights.safetensors"][:10]}), ""),
        ("manifest num_layers 0", lambda d: d.update(num_layers=0), ""),
        ("manifest num_layers '2' (a string)", lambda d: d.update(num_layers="2"), "maybe"),
        ("manifest seqlen true", lambda d: d.update(seqlen=True), "maybe"),
        ("manifest nsamples 2.0", lambda d: d.update(nsamples=2.0), "maybe"),
        ("manifest format_version true", lambda d: d.update(format_version=True), "maybe"),
        ("manifest format missing", lambda d: d.pop("format"), ""),
        ("manifest settings.lam 'x'", lambda d: d["settings"].update(lam="x"), "maybe"),
        ("manifest model_type missing", lambda d: d.pop("model_type"), "maybe"),
        ("manifest a top-level list", None, ""),
    ]:
        if edit is None:
            setcal(name, both(_need_set, write("set/manifest.json", "[]")))
            continue
        # round 9's judgement on a manifest's informational counts: taken, when the result equals the set's own
        setcal(name, _set_manifest(edit), check=_maybe(same_set)) if kind == "same" else setcal(
            name, _set_manifest(edit), kind)
    for name, edit in [
        ("manifest files hashes in capitals", lambda d: d["files"].update({k: v.upper() for k, v in d["files"].items()})),
        ("manifest with an extra unknown field", lambda d: d.update(note="made on my laptop")),
        ("manifest calib naming a file since deleted", lambda d: d.update(calib="/nonexistent/text.txt")),
        ("manifest report null", lambda d: d.update(report=None)),
        ("manifest seconds 1e300", lambda d: d.update(seconds=1e300)),
    ]:
        setcal(name, _set_manifest(edit), check=valid(same_set) if name.startswith(("manifest calib", "manifest seconds"))
               else _maybe(same_set))
    setcal("manifest pretty-printed with indent 4 equals the compact one",
           both(_need_set, lambda w: (w / "set" / "manifest.json").write_text(
               json.dumps(json.loads((w / "set" / "manifest.json").read_text()), indent=4))), check=valid(same_set))
    setcal("manifest with a BOM", both(_need_set, lambda w: (w / "set" / "manifest.json").write_text(
        "\ufeff" + (w / "set" / "manifest.json").read_text())), "maybe")
    setcal("manifest with trailing garbage", both(_need_set, lambda w: (w / "set" / "manifest.json").write_text(
        (w / "set" / "manifest.json").read_text() + "}garbage")))
    setcal("manifest NaN in seqlen", _set_manifest(lambda d: d.update(seqlen=float("nan"))), check=_maybe(same_set))

    def ids(edit):
        def fn(state: dict) -> None:
            for k in [k for k in state if k.endswith("input_ids")]:
                state[k] = edit(state[k].clone())
        return fn
    for name, edit in [
        ("sample ids 64 (one past the vocabulary)", ids(lambda t: t.index_fill_(-1, torch.tensor([3]), 64))),
        ("sample ids -1", ids(lambda t: t.index_fill_(-1, torch.tensor([3]), -1))),
        ("sample ids float32", ids(lambda t: t.float())),
        ("sample ids 2**40", ids(lambda t: t.index_fill_(-1, torch.tensor([0]), 2 ** 40))),
    ]:
        setcal(name, _set_tensors("samples.safetensors", edit))

    def wts(edit):
        return _set_tensors("weights.safetensors", lambda s: s.update(weights=edit(s["weights"].clone())))
    setcal("weights NaN at one token", wts(lambda t: t.view(-1).index_fill_(0, torch.tensor([2]), float("nan"))
                                           .view(t.shape)))
    setcal("weights negative everywhere", wts(lambda t: -t.abs() - 1))
    setcal("weights -0.0 at every token (all zero)", wts(lambda t: t * 0 - 0.0))
    setcal("weights 1e38 at every token", wts(lambda t: t * 0 + 1e38), "maybe")
    setcal("weights bfloat16", wts(lambda t: t.bfloat16()), "maybe")
    setcal("weights transposed", wts(lambda t: t.transpose(0, -1).contiguous()))
    setcal("weights.safetensors replaced by samples.safetensors (hash renewed)", both(
        _need_set, lambda w: shutil.copy(w / "set" / "samples.safetensors", w / "set" / "weights.safetensors"),
        _set_tensors("weights.safetensors", lambda s: None)))
    setcal("an extra tensor in weights.safetensors", _set_tensors(
        "weights.safetensors", lambda s: s.update(extra=torch.ones(3))), "maybe")
    setcal("the model's q_proj scaled by 2 after importance", both(
        _need_set, _model_tensor("model.layers.0.self_attn.q_proj.weight", lambda t: t * 2)))
    setcal("the model's config rope_theta changed after importance", both(
        _need_set, json_edit("model/config.json", lambda d: d.update(rope_theta=1234.0))))
    setcal("the model's tokenizer_config edited after importance (model_max_length 7)", both(
        _need_set, json_edit("model/tokenizer_config.json", lambda d: d.update(model_max_length=7))), "maybe")
    setcal("the model's generation_config edited after importance", both(
        _need_set, json_edit("model/generation_config.json", lambda d: d.update(temperature=0.3))),
        check=valid(same_set))
    for name, extra, kind in [
        ("--calib-set with --seqlen 32 (the set has 16)", ["--seqlen", "32"], ""),
        ("--calib-set with --nsamples 5 (the set has 2)", ["--nsamples", "5"], ""),
        ("--calib-set with --chat-template", ["--chat-template", "t.jinja"], ""),
        ("--calib-set with --part heldout", ["--part", "heldout"], ""),
        ("--calib-set with --seed 7", ["--seed", "7"], "maybe"),
        ("--calib-set with --method rtn", ["--method", "rtn"], "maybe"),
        ("--calib-set with --nsamples 2 --seqlen 16 (the set's own)", ["--nsamples", "2", "--seqlen", "16"], "maybe"),
    ]:
        setcal(name, both(_need_set, _chat(CHATS)), kind, extra=extra)
    add("calibset12", "--calib-set given as set/manifest.json", lambda w: run_cli(
        "calibrate", w / "model", "--calib-set", w / "set" / "manifest.json", *SET_RUN, "-o", w / "out"),
        _need_set, _maybe(same_set))
    add("calibset12", "--calib-set given with a trailing slash equals the set", lambda w: run_cli(
        "calibrate", w / "model", "--calib-set", str(w / "set") + "/", *SET_RUN, "-o", w / "out"),
        _need_set, valid(same_set))
    add("calibset12", "--calib-set and --calib both", lambda w: run_cli(
        "calibrate", w / "model", "--calib-set", w / "set", "--calib", w / "text.txt", *SET_RUN, "-o", w / "out"),
        _need_set)
    add("calibset12", "--calib-set of the VLM's set for the llama", lambda w: run_cli(
        "calibrate", w / "model", "--calib-set", w / "vset", *SET_RUN, "-o", w / "out"),
        _vlm_set)

    # ---- importance options and outputs
    def icli(name, extra, kind="", check=None, setup=None, data="text.txt", model="model"):
        add("importance12", name, lambda w: run_cli("importance", w / model, "--calib", w / data, "--nsamples", "2",
                                                    "--seqlen", "16", *extra, "-o", w / "set"),
            setup, check if check is not None else tri(kind, export_ok_set()))
    for name, extra, kind in [
        ("--floor-fraction 1.5 with --top-fraction 0.5", ["--top-fraction", "0.5", "--floor-fraction", "1.5"], ""),
        ("--floor-fraction -0.1 with --top-fraction 0.5", ["--top-fraction", "0.5", "--floor-fraction", "-0.1"], ""),
        ("--floor-fraction nan with --top-fraction 0.5", ["--top-fraction", "0.5", "--floor-fraction", "nan"], ""),
        ("--floor-fraction 0 with --top-fraction 0.5", ["--top-fraction", "0.5", "--floor-fraction", "0"], "maybe"),
        ("--floor-fraction 1 with --top-fraction 0.5", ["--top-fraction", "0.5", "--floor-fraction", "1"], "maybe"),
        ("--floor-fraction 0.3 without --top-fraction", ["--floor-fraction", "0.3"], "maybe"),
        ("--top-fraction nan", ["--top-fraction", "nan"], ""),
        ("--top-fraction inf", ["--top-fraction", "inf"], ""),
        ("--top-fraction 1e-9 (keeps no token)", ["--top-fraction", "1e-9"], "maybe"),
        ("--power -1", ["--power", "-1"], "maybe"),
        ("--power nan", ["--power", "nan"], ""),
        ("--power 1e6", ["--power", "1e6"], "maybe"),
        ("--lam nan", ["--lam", "nan"], ""),
        ("--lam 1.5", ["--lam", "1.5"], ""),
        ("--lam -inf", ["--lam", "-inf"], ""),
        ("--per-modality on a text model", ["--per-modality"], "maybe"),
        ("--output-side 7 (does not divide 32 rows)", ["--output-side", "7"], "maybe"),
        ("--output-side 1000 (more than the rows)", ["--output-side", "1000"], "maybe"),
        ("--guidance linear --row-groups 0", ["--guidance", "linear", "--row-groups", "0"], ""),
        ("--guidance linear --row-groups 3 (does not divide 32)", ["--guidance", "linear", "--row-groups", "3"],
         "maybe"),
        ("--importance-loss fisher --fisher-draws 0", ["--importance-loss", "fisher", "--fisher-draws", "0"], ""),
        ("--seed -1", ["--seed", "-1"], "maybe"),
        ("--device meta", ["--device", "meta"], ""),
        ("--device cuda (none here)", ["--device", "cuda"], ""),
        ("--offload-dir a file", ["--offload-dir", "text.txt"], ""),
        ("--part heldout", ["--part", "heldout"], "maybe"),
    ]:
        icli(name, extra, kind)
    icli("--calib the shared set folder", [], data="set0", setup=lambda w: (_need_set(w), shutil.move(
        str(w / "set"), str(w / "set0"))) and None)
    icli("--calib a VLM image-text JSONL for the llama", [], data="vl/data.jsonl")
    icli("model is the ct export", [], model="ct", kind="maybe")
    icli("model is the VLM on plain text", [], model="vlm", kind="maybe")
    icli("-o an existing set without --overwrite", [], setup=_need_set)
    icli("--calib ./text.txt equals text.txt", [], data="./text.txt", check=_set_same_as())
    icli("--json gives the manifest written (plus where)", ["--json"], check=valid(lambda w, r: None if {
        k: v for k, v in json.loads(r.stdout).items() if k != "output"} == json.loads(
        (w / "set" / "manifest.json").read_text()) else "--json differs from manifest.json"))
    add("importance12", "-o the ct export --overwrite (not an input: replaced as asked)", lambda w: run_cli(
        "importance", w / "model", "--calib", w / "text.txt", "--nsamples", "2", "--seqlen", "16", "-o", w / "ct",
        "--overwrite"), None, _maybe(lambda w, r: None if (w / "ct" / "manifest.json").is_file() else "no set in ct/"))
    add("importance12", "--offload-dir inside -o (the set right, no offload files left in it)", lambda w: run_cli(
        "importance", w / "model", "--calib", w / "text.txt", "--nsamples", "2", "--seqlen", "16", "-o", w / "set",
        "--offload-dir", w / "set" / "o"), None, _maybe(lambda w, r: export_ok_set()(w, r) or (
            None if not any((w / "set" / "o").rglob("*")) else "offload files left in set/o")))
    for name, args in [
        ("-o the model folder --overwrite", lambda w: ["importance", w / "model", "--calib", w / "text.txt",
                                                       "--nsamples", "2", "--seqlen", "16", "-o", w / "model",
                                                       "--overwrite"]),
        ("-o the text file --overwrite", lambda w: ["importance", w / "model", "--calib", w / "text.txt", "--nsamples",
                                                    "2", "--seqlen", "16", "-o", w / "text.txt", "--overwrite"]),
        ("-o inside the model folder", lambda w: ["importance", w / "model", "--calib", w / "text.txt", "--nsamples",
                                                  "2", "--seqlen", "16", "-o", w / "model" / "set"]),
    ]:
        cli("importance12", name, args)

    # ---- export chains and edited quantkit.json
    def ecli(name, src, fmt, setup=None, check=None, extra=()):
        add("export12", name, lambda w: run_cli("export", w / src, "--format", fmt, *extra, "-o", w / "out"), setup,
            check)
    for chain in [("fake", "gptq_v2", "compressed-tensors"), ("gptq", "fake", "gptq"),
                  ("gptq_v2", "gptq", "fake", "compressed-tensors"), ("compressed-tensors", "compressed-tensors")]:
        ecli(f"ct -> {' -> '.join(chain)} -> gptq equals ct's logits", f"c{len(chain) - 1}", "gptq",
             setup=lambda w, c=chain: _chain(w, "ct", *c) and None, check=_logits_like("out", "ct"))
    ecli("fake (3 bit) -> fake -> fake equals fake's logits", "c0", "fake",
         setup=lambda w: _chain(w, "fake", "fake") and None, check=_logits_like("out", "fake"))
    ecli("asym -> gptq -> gptq_v2 equals asym's logits", "c0", "gptq_v2",
         setup=lambda w: _chain(w, "asym", "gptq") and None, check=_logits_like("out", "asym"))
    ecli("head (lm_head quantized) -> fake equals head's logits", "head", "fake", check=_logits_like("out", "head"))
    for name, edit, kind in [
        ("spec.bits 3 on a 4-bit export", _spec("bits", 3), ""),
        ("spec.bits 8 on a 4-bit export", _spec("bits", 8), ""),
        ("spec.group_size 64 on a group-32 export", _spec("group_size", 64), ""),
        ("spec.group_size -1 on a group-32 export", _spec("group_size", -1), ""),
        ("spec.sym false on a symmetric export", _spec("sym", False), ""),
        ("spec.bits '4' (a string)", _spec("bits", "4"), "maybe"),
        ("spec missing", lambda d: d.pop("spec"), ""),
        ("format 'gptq' on a compressed-tensors export", lambda d: d.update(format="gptq"), ""),
        ("format 'awq'", lambda d: d.update(format="awq"), ""),
        ("n_blocks 3 (2 stored)", lambda d: d.update(n_blocks=3), ""),
        ("quantized_modules one short", lambda d: d.update(quantized_modules=d["quantized_modules"][1:]), ""),
        ("quantized_modules naming a missing module", lambda d: d["quantized_modules"].append("model.layers.9.x"), ""),
        ("module_specs with a bogus module", lambda d: d.update(module_specs={"model.layers.0.self_attn.q_proj": {
            "bits": 8, "group_size": 32, "sym": True}}), ""),
        ("dtype 'float16' on a float32 export", lambda d: d.update(dtype="float16"), "maybe"),
        ("dtype 'int8'", lambda d: d.update(dtype="int8"), ""),
        ("quantkit_version '99.0.0'", lambda d: d.update(quantkit_version="99.0.0"), "maybe"),
        ("linear_order reversed", lambda d: d.update(linear_order=d["linear_order"][::-1]), "maybe"),
        ("fp_linears []", lambda d: d.update(fp_linears=[]), "maybe"),
    ]:
        for fmt in ("gptq", "fake")[: 2 if name.startswith(("spec.bits 3", "format", "quantized_modules one")) else 1]:
            ecli(f"ct with quantkit.json {name} -> {fmt}", "x", fmt, setup=_qk_edit("ct", edit),
                 check=tri(kind, _logits_like("out", "ct")) if kind else None)
    ecli("gptq with quantkit.json spec.bits 2 -> ct", "x", "compressed-tensors", setup=_qk_edit("gptq", _spec("bits", 2)))
    ecli("fake with quantkit.json spec.bits 4 (3 stored) -> gptq", "x", "gptq", setup=_qk_edit("fake", _spec("bits", 4)))
    ecli("quantkit.json a JSON list", "x", "fake", setup=both(lambda w: shutil.copytree(w / "ct", w / "x"),
                                                              write("x/quantkit.json", "[]")))
    ecli("quantkit.json with a BOM", "x", "fake", setup=both(lambda w: shutil.copytree(w / "ct", w / "x"), lambda w: (
        w / "x" / "quantkit.json").write_text("\ufeff" + (w / "ct" / "quantkit.json").read_text())),
        check=_maybe(_logits_like("out", "ct")))
    for size, kind in [("1KB", "valid"), ("5gb", "maybe"), ("5 GB", "maybe"), ("5GiB", "maybe"), ("1.5MB", "maybe"),
                       ("0", ""), ("-1GB", ""), ("abc", ""), ("", ""), ("1e3", "maybe"), ("nanMB", ""), ("infGB", "")]:
        ecli(f"--max-shard-size {size!r}", "ct", "fake", extra=("--max-shard-size", size),
             check=tri(kind, _logits_like("out", "ct")) if kind else None)
    ecli("the calibration set as IN_DIR", "set", "fake", setup=_need_set)
    ecli("the VLM (not an export) as IN_DIR", "vlm", "fake")
    add("export12", "-o IN_DIR itself --overwrite", lambda w: run_cli("export", w / "ct", "--format", "fake", "-o",
                                                                       w / "ct", "--overwrite"))
    add("export12", "-o a folder inside IN_DIR", lambda w: run_cli("export", w / "ct", "--format", "fake", "-o",
                                                                    w / "ct" / "sub"))

    # ---- eval windows, parts and outputs
    def ecl(name, extra, kind="", check=None, target="model", setup=None):
        add("eval12", name, lambda w: run_cli("eval", w / target, "--data", w / "text.txt", *extra), setup,
            check if check is not None else tri(kind, eval_ok))
    base = ["--seqlen", "16", "--max-tokens", "96"]
    ref_eval = eval_close_to(lambda w: ["eval", w / "model", "--data", w / "text.txt", *base], tol=1e-5)
    for name, extra, kind in [
        ("--seqlen 100 beyond the model's 64 positions", ["--seqlen", "100", "--max-tokens", "200"], ""),
        ("--seqlen 65 (one past the positions)", ["--seqlen", "65", "--max-tokens", "200"], ""),
        ("--seqlen 1 (no next token in a window)", ["--seqlen", "1", "--max-tokens", "16"], ""),
        ("--stride 32 beyond --seqlen 16 (tokens skipped)", [*base, "--stride", "32"], "maybe"),
        ("--stride -4", [*base, "--stride", "-4"], ""),
        ("--stride 4 (overlapping windows)", [*base, "--stride", "4"], "maybe"),
        ("--max-tokens 0", ["--seqlen", "16", "--max-tokens", "0"], ""),
        ("--max-tokens -1", ["--seqlen", "16", "--max-tokens", "-1"], ""),
        ("--max-tokens 10 below --seqlen 16", ["--seqlen", "16", "--max-tokens", "10"], "maybe"),
        ("--batch-size -1", [*base, "--batch-size", "-1"], ""),
        ("--device meta", [*base, "--device", "meta"], ""),
        ("--device 'cpu ' (a trailing space)", [*base, "--device", "cpu "], "maybe"),
        ("--tasks ''", [*base, "--tasks", ""], ""),
        ("--tasks ','", [*base, "--tasks", ","], ""),
        ("--limit -1 without --tasks", [*base, "--limit", "-1"], ""),
        ("--num-fewshot -1 without --tasks", [*base, "--num-fewshot", "-1"], ""),
        ("--part train --max-tokens 96", [*base, "--part", "train"], "maybe"),
        ("-o a folder", [*base, "-o", "model"], ""),
        ("-o the data file", [*base, "-o", "text.txt"], ""),
        ("-o in a missing folder", [*base, "-o", "nowhere/e.json"], "maybe"),
    ]:
        ecl(name, extra, kind)
    ecl("--batch-size 1000 equals the default batches", [*base, "--batch-size", "1000"], check=valid(ref_eval))
    ecl("--batch-size 1 equals the default batches", [*base, "--batch-size", "1"], check=valid(ref_eval))
    ecl("--stride 16 (= --seqlen) equals no --stride", [*base, "--stride", "16"], check=valid(ref_eval))
    ecl("--device cpu:0 equals --device cpu", [*base, "--device", "cpu:0"], check=_maybe(ref_eval))
    ecl("--json -o e.json writes the same JSON it prints", [*base, "--json", "-o", "e.json"], check=valid(
        lambda w, r: None if json.loads(r.stdout) == json.loads((w / "e.json").read_text()) else "e.json differs"))
    for name, data, kind in [("--data 'text.txt,' (a trailing comma)", "{t},", "maybe"),
                             ("--data ',' (only a comma)", ",", ""),
                             ("--data the set folder", "{w}/set", ""),
                             ("--data the model folder", "{w}/model", ""),
                             ("--data chat records", "{w}/chat.jsonl", "maybe"),
                             ("--data image-text records", "{w}/vl/data.jsonl", "maybe"),
                             ("--data a calibration recipe", "{w}/ref.yaml", "maybe"),
                             ("--data text.txt twice in a comma list", "{t},{t}", "maybe")]:
        add("eval12", name, lambda w, d=data: run_cli("eval", w / "model", "--data", d.format(t=w / "text.txt", w=w),
                                                      *base),
            both(_need_set, _chat(CHATS), write("ref.yaml", PLAIN)), tri(kind, eval_ok))
    for target, kind in [("set", ""), ("vlm", "maybe"), ("fake", "valid"), ("head", "valid"), ("a8", "valid")]:
        ecl(f"eval of the {target} folder", base, kind, target=target, setup=_need_set)

    # ---- qid predict, fit and plot
    def pcli(name, extra, kind="", check=None, setup=None):
        add("qid12", f"predict {name}", lambda w: run_cli("qid", "predict", *[str(x).format(w=w) for x in extra],
                                                          "--json"), setup,
            check if check is not None else tri(kind, _finite_prediction))
    P = ["--params", "1e9", "--bits", "3"]
    for name, extra, kind in [
        ("--params 0", ["--params", "0", "--bits", "3", "--tokens", "1e12"], ""),
        ("--params -1e9", ["--params", "-1e9", "--bits", "3", "--tokens", "1e12"], ""),
        ("--params nan", ["--params", "nan", "--bits", "3", "--tokens", "1e12"], ""),
        ("--params inf", ["--params", "inf", "--bits", "3", "--tokens", "1e12"], ""),
        ("--params 1e400 (overflows to inf)", ["--params", "1e400", "--bits", "3", "--tokens", "1e12"], ""),
        ("--bits 0", ["--params", "1e9", "--bits", "0", "--tokens", "1e12"], ""),
        ("--bits -3", ["--params", "1e9", "--bits", "-3", "--tokens", "1e12"], ""),
        ("--bits nan", ["--params", "1e9", "--bits", "nan", "--tokens", "1e12"], ""),
        ("--bits 2.5", ["--params", "1e9", "--bits", "2.5", "--tokens", "1e12"], "maybe"),
        ("--bits 64", ["--params", "1e9", "--bits", "64", "--tokens", "1e12"], "maybe"),
        ("--tokens 0", [*P, "--tokens", "0"], ""),
        ("--tokens -1e12", [*P, "--tokens", "-1e12"], ""),
        ("--tokens nan", [*P, "--tokens", "nan"], ""),
        ("--tokens inf", [*P, "--tokens", "inf"], ""),
        ("--qid 0", [*P, "--qid", "0"], ""),
        ("--qid -0.1", [*P, "--qid", "-0.1"], ""),
        ("--qid nan", [*P, "--qid", "nan"], ""),
        ("--qid inf", [*P, "--qid", "inf"], ""),
        ("--qid 1e-300 (needs astronomically few tokens)", [*P, "--qid", "1e-300"], "maybe"),
        ("--tokens and --qid both", [*P, "--tokens", "1e12", "--qid", "0.1"], ""),
        ("neither --tokens nor --qid", P, ""),
        ("--law ''", [*P, "--tokens", "1e12", "--law", ""], ""),
        ("--law OUYANG2024-GPTQ (capitals)", [*P, "--tokens", "1e12", "--law", "OUYANG2024-GPTQ"], "maybe"),
        ("--law the QiD CSV", [*P, "--tokens", "1e12", "--law", "{w}/q.csv"], ""),
        ("--law the model folder", [*P, "--tokens", "1e12", "--law", "{w}/model"], ""),
        ("--method with a published law", [*P, "--tokens", "1e12", "--method", "rtn"], "maybe"),
    ]:
        pcli(name, extra, kind)
    for name, extra, ref in [
        ("--params 1000000000 equals 1e9", ["--params", "1000000000", "--bits", "3", "--tokens", "1e12"],
         [*P, "--tokens", "1e12"]),
        ("--bits 3.0 equals 3", ["--params", "1e9", "--bits", "3.0", "--tokens", "1e12"], [*P, "--tokens", "1e12"]),
        ("--tokens 1E12 equals 1e12", [*P, "--tokens", "1E12"], [*P, "--tokens", "1e12"]),
        ("--tokens 1e+12 equals 1e12", [*P, "--tokens", "1e+12"], [*P, "--tokens", "1e12"]),
        ("--params=1e9 (= form) equals --params 1e9", ["--params=1e9", "--bits=3", "--tokens=1e12"],
         [*P, "--tokens", "1e12"]),
    ]:
        pcli(name, extra, check=_predict_same(*ref))
    for name, edit, kind in [
        ("fit JSON with a NaN exponent", lambda d: __import__("fault_battery")._set_all(d, "alpha", float("nan")), ""),
        ("fit JSON with k 0", lambda d: __import__("fault_battery")._set_all(d, "k", 0), ""),
        ("fit JSON with alpha a string", lambda d: __import__("fault_battery")._set_all(d, "alpha", "0.3"), ""),
        ("fit JSON empty object", lambda d: d.clear(), ""),
        ("fit JSON with an extra field", lambda d: d.update(note="x"), "maybe"),
    ]:
        pcli(f"--law {name}", [*P, "--tokens", "1e12", "--law", "{w}/fit.json"], kind,
             setup=both(_fit_json, json_edit("fit.json", edit)))
    pcli("--law a fit JSON with --method awq (absent)", [*P, "--tokens", "1e12", "--law", "{w}/fit.json", "--method",
                                                         "awq"], setup=_fit_json)
    for name, edit, kind in [
        ("N '1B' (a unit suffix)", _cell("N", "1B"), ""),
        ("N '1,000,000' (thousands separators, quoted)", _cell("N", "1,000,000"), ""),
        ("N 1_000_000 (underscores)", _cell("N", "1_000_000"), "maybe"),
        ("D '1e9 tokens' (a unit)", _cell("D", "1e9 tokens"), ""),
        ("bits '4bit'", _cell("bits", "4bit"), ""),
        ("bits 0", _cell("bits", "0"), ""),
        ("N -1", _cell("N", "-1"), ""),
        ("D 0", _cell("D", "0"), ""),
        ("D inf", _cell("D", "inf"), ""),
        ("N nan", _cell("N", "nan"), ""),
        ("qid '5%'", _cell("qid", "5%"), ""),
        ("loss_q inf", _cell("loss_q", "inf"), ""),
        ("loss_fp nan", _cell("loss_fp", "nan"), ""),
        ("every qid the same", _every("qid", "0.01"), "maybe"),
        ("every N the same", _every("N", "1000000"), "maybe"),
        ("every bits 4", _every("bits", "4"), "maybe"),
        ("every row duplicated", lambda rows: rows.extend([list(r) for r in rows[1:]]), "maybe"),
        ("a column 'N' twice", lambda rows: [r.append(r[rows[0].index("N")]) for r in rows], ""),
        ("header in capitals", lambda rows: rows.__setitem__(0, [c.upper() for c in rows[0]]), "maybe"),
        ("an empty method cell", _cell("method", ""), "maybe"),
        ("qid negative zero", _cell("qid", "-0.0"), "maybe"),
    ]:
        body = _table(edit)
        add("qid12", f"fit: {name}", lambda w: run_cli("qid", "fit", w / "t.csv", "--bootstrap", "0", "--json"),
            write("t.csv", body), tri(kind, _fit_finite))
        if name.startswith(("N ", "D ", "qid", "every row", "header")):  # plot reads the same table: a sample
            add("qid12", f"plot: {name}", lambda w: run_cli("qid", "plot", w / "t.csv", "-o", w / "figs"),
                write("t.csv", body), tri("maybe" if kind == "maybe" else "", _figs()))
    for name, extra, kind in [
        ("--format ''", ["--format", ""], ""),
        ("--format 'png,' (a trailing comma)", ["--format", "png,"], "maybe"),
        ("--format PNG (capitals)", ["--format", "PNG"], "maybe"),
        ("--format png,png", ["--format", "png,png"], "maybe"),
        ("--fit the table's own unified fit", ["--fit", "fit.json"], "valid"),
        ("--fit the CSV itself", ["--fit", "q.csv"], ""),
    ]:
        add("qid12", f"plot {name}", lambda w, e=extra: run_cli("qid", "plot", w / "q.csv", *e, "-o", w / "figs"),
            _fit_json, tri(kind, _figs()))
    for name, extra, kind in [
        ("--level 0", ["--level", "0"], ""), ("--level 1", ["--level", "1"], ""), ("--level nan", ["--level", "nan"], ""),
        ("--level 95 (a percent)", ["--level", "95"], ""), ("--bootstrap 1 --level 0.95", ["--bootstrap", "1"], "maybe"),
        ("--huber-delta 0 --estimator huber", ["--estimator", "huber", "--huber-delta", "0"], ""),
        ("--huber-delta nan --estimator huber", ["--estimator", "huber", "--huber-delta", "nan"], ""),
        ("--method '' ", ["--method", ""], ""),
        ("-o the CSV itself", ["-o", "q.csv"], ""),
        ("-o a folder", ["-o", "model"], ""),
    ]:
        add("qid12", f"fit {name}", lambda w, e=extra: run_cli("qid", "fit", w / "q.csv", "--bootstrap", "0", *e,
                                                                "--json"),
            None, tri(kind, _fit_finite))

    # ---- Python API: Recipe, Override, load_quantized
    import numpy as np

    def rmod():
        from quantkit.quant import recipe
        return recipe
    no_api = api_same(dict())
    for name, call, kind in [
        ("Override(targets=[], bits=8)", lambda w: rmod().Override(targets=[], bits=8), ""),
        ("Override(targets='q_proj') with nothing set", lambda w: rmod().Override(targets="q_proj"), ""),
        ("Override(targets=['q_proj'], bits=np.int64(8))", lambda w: quantize(w, recipe=rmod().Recipe(
            overrides=[rmod().Override(targets=["q_proj"], bits=np.int64(8))])), "maybe"),
        ("Override(targets=['q_proj'], group_size=np.float32(32))", lambda w: rmod().Override(
            targets=["q_proj"], group_size=np.float32(32)), ""),
        ("Override(targets=['q_proj'], fp_alpha=float('nan'))", lambda w: rmod().Override(
            targets=["q_proj"], fp_alpha=float("nan")), ""),
        ("Override(targets=['q_proj'], method='GPTQ')", lambda w: quantize(w, recipe=rmod().Recipe(
            overrides=[rmod().Override(targets=["q_proj"], method="GPTQ")])), "maybe"),
        ("Override(targets=[Path('q_proj')])", lambda w: rmod().Override(targets=[Path("q_proj")], bits=8), ""),
        ("Recipe(targets={'q_proj'}) (a set)", lambda w: quantize(w, recipe=rmod().Recipe(targets={"q_proj"})),
         "maybe"),
        ("Recipe(overrides=[{'targets': ['q_proj'], 'bits': 8}]) (dicts)", lambda w: quantize(w, recipe=rmod().Recipe(
            overrides=[{"targets": ["q_proj"], "bits": 8}])), "maybe"),
        ("Recipe(ignore=None, targets=None)", lambda w: quantize(w, recipe=rmod().Recipe(ignore=None, targets=None)),
         "maybe"),
        ("Recipe.from_dict(None)", lambda w: rmod().Recipe.from_dict(None), ""),
        ("Recipe.from_dict({'targets': 5})", lambda w: rmod().Recipe.from_dict({"targets": 5}), ""),
        ("Recipe.from_yaml(b'q.yaml') (bytes)", lambda w: rmod().Recipe.from_yaml(b"q.yaml"), "maybe"),
        ("Recipe.from_yaml(the model folder)", lambda w: rmod().Recipe.from_yaml(w / "model"), ""),
        ("quantize(recipe='q.yaml') (a path string)", lambda w: quantize(w, recipe=str(w / "q.yaml")), "maybe"),
        ("quantize(recipe=Path('q.yaml'))", lambda w: quantize(w, recipe=w / "q.yaml"), "maybe"),
        ("quantize(recipe=123)", lambda w: quantize(w, recipe=123), ""),
        ("quantize(recipe=['q_proj']) (a list)", lambda w: quantize(w, recipe=["q_proj"]), ""),
        ("quantize(recipe=True)", lambda w: quantize(w, recipe=True), ""),
    ]:
        api(name, call, setup=write("q.yaml", "targets: [q_proj]\n"),
            check=tri(kind, returned_ok) if kind else None)
    api("quantize(recipe={}) equals no recipe", lambda w: quantize(w, recipe={}), check=_maybe(no_api))
    api("quantize(recipe=Recipe()) equals no recipe", lambda w: quantize(w, recipe=rmod().Recipe()), check=no_api)

    def lq(**kw):
        def call(w: Path):
            import quantkit
            return quantkit.load_quantized(**{"path": w / "ct", **kw})
        return call
    for name, kw, kind in [
        ("load_quantized(dtype='fp16')", dict(dtype="fp16"), "maybe"),
        ("load_quantized(dtype='FLOAT16')", dict(dtype="FLOAT16"), "maybe"),
        ("load_quantized(dtype=torch.int8)", dict(dtype=torch.int8), ""),
        ("load_quantized(dtype=16)", dict(dtype=16), ""),
        ("load_quantized(dtype=torch.float8_e4m3fn)", dict(dtype=torch.float8_e4m3fn), ""),
        ("load_quantized(dtype=np.float32)", dict(dtype=np.float32), "maybe"),
        ("load_quantized(dtype='')", dict(dtype=""), ""),
        ("load_quantized(device='cpu')", dict(device="cpu"), ""),
        ("load_quantized(trust_remote_code=True)", dict(trust_remote_code=True), ""),
        ("load_quantized(path=b'...') (bytes)", dict(path=b"ct"), "maybe"),
        ("load_quantized(path=None)", dict(path=None), ""),
        ("load_quantized(path=3)", dict(path=3), ""),
        ("load_quantized(path=the quantkit.json file)", None, "maybe"),
        ("load_quantized(path=the set folder)", None, ""),
        ("load_quantized(path=the plain model folder)", None, "maybe"),
    ]:
        if kw is None:
            rel = {"the quantkit.json file": "ct/quantkit.json", "the set folder": "set",
                   "the plain model folder": "model"}[name.split("path=")[1][:-1]]
            api(name, lambda w, r=rel: lq(path=w / r)(w), setup=_need_set,
                check=tri(kind, lambda w, m: finite_model(m)) if kind else None)
        else:
            api(name, lq(**kw), check=tri(kind, lambda w, m: finite_model(m)) if kind else None)
    api("load_quantized(dtype='bfloat16') is close to float32's", lq(dtype="bfloat16"),
        check=valid(lambda w, m: None if next(m.parameters()).dtype == torch.bfloat16 else "not bfloat16"))
    api("load_quantized(str(path) + '/') equals the path", lambda w: lq(path=str(w / "ct") + "/")(w),
        check=valid(lambda w, m: finite_model(m)))

    # ---- the process environment (a child process)
    def env_case(name, env=None, unset=(), kind="valid", setup=None, args=None, cwd=None, check=None):
        def run(w: Path):
            a = args(w) if args else ["calibrate", w / "model", "--calib", w / "text.txt", *RTN, "-o", w / "out"]
            return child(w, *a, env={k: v.format(w=w) for k, v in (env or {}).items()}, unset=unset,
                         cwd=cwd(w) if cwd else None)
        add("env12", name, run, setup, check if check is not None else tri(kind, same_as(cal_ref())))
    env_case("HOME unset", unset=("HOME",))
    env_case("HOME=/nonexistent", env={"HOME": "/nonexistent/home"})
    env_case("TMPDIR a missing folder", env={"TMPDIR": "{w}/no-tmp"})
    env_case("TMPDIR a file", env={"TMPDIR": "{w}/text.txt"})
    env_case("TMPDIR a read-only mount", env={"TMPDIR": "{w}/rotmp"}, setup=_mount("rotmp", readonly=True))
    env_case("HF_HOME a file", env={"HF_HOME": "{w}/text.txt"})
    env_case("HF_HOME a read-only mount", env={"HF_HOME": "{w}/rohf"}, setup=_mount("rohf", readonly=True))
    env_case("XDG_CACHE_HOME a file", env={"XDG_CACHE_HOME": "{w}/text.txt"})
    env_case("LANG=C LC_ALL=C with non-ASCII paths", env={"LANG": "C", "LC_ALL": "C"},
             setup=lambda w: (shutil.copytree(w / "model", w / "modèle"), shutil.copy(w / "text.txt", w / "données.txt"))
             and None,
             args=lambda w: ["calibrate", w / "modèle", "--calib", w / "données.txt", *RTN, "-o", w / "out"])
    env_case("LC_ALL=C and PYTHONIOENCODING=ascii: a missing non-ASCII file", env={
        "LC_ALL": "C", "LANG": "C", "PYTHONIOENCODING": "ascii"}, kind="",
        args=lambda w: ["calibrate", w / "model", "--calib", w / "données-absentes.txt", *RTN, "-o", w / "out"])
    env_case("a read-only cwd with a relative -o", kind="", setup=_mount("rocwd", readonly=True),
             cwd=lambda w: w / "rocwd",
             args=lambda w: ["calibrate", w / "model", "--calib", w / "text.txt", *RTN, "-o", "out"])
    env_case("a read-only cwd with an absolute -o", setup=_mount("rocwd", readonly=True),
             cwd=lambda w: w / "rocwd")
    env_case("HF_HUB_OFFLINE=1 with a hub id", env={"HF_HUB_OFFLINE": "1"}, kind="",
             args=lambda w: ["calibrate", "quantkit-test/no-such-model", "--calib", w / "text.txt", *RTN, "-o",
                             w / "out"])
    env_case("OMP_NUM_THREADS=abc", env={"OMP_NUM_THREADS": "abc"}, kind="maybe")
    return [case for case in out if case.name not in EARLIER]


def _vlm_set(w: Path) -> None:
    done = run_cli("importance", w / "vlm", "--calib", w / "vl" / "data.jsonl", "--nsamples", "2", "--seqlen", "256",
                   "-o", w / "vset")
    assert done.exit_code == 0, done.output[-300:]


def export_ok_set():
    """A check of an importance run: set/manifest.json is there and its weights are finite and non-negative."""
    def check(w: Path, result) -> str | None:
        from safetensors.torch import load_file

        if not (w / "set" / "manifest.json").is_file():
            return "no set/manifest.json"
        weights = load_file(w / "set" / "weights.safetensors")["weights"]
        if not torch.isfinite(weights).all() or (weights < 0).any():
            return "non-finite or negative token weights"
        return None
    return check


def api_same(ref_kw: dict):
    from fault_battery import api_same_as

    return api_same_as(ref_kw)
