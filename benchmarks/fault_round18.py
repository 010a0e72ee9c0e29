"""Round 18 of the fault battery (issue #22): a fresh set by another hand, run by fault_battery.py --rounds 18.

Areas, each crossed with what rounds 1-16 tried there: quantization recipes whose mixed settings are checked
linear by linear against uniform RTN runs (RTN rounds each linear alone, so a mixed run must equal, linear by
linear, the uniform run of that linear's settings; an override method rtn inside a GPTQ run must equal the RTN
codes), recipes spelled as JSON and through the API; calibration recipes with sources beside and away from the
recipe file, $VAR and ~ paths and weights that are the same shares spelled otherwise; datasets saved with
`save_to_disk` (Dataset and DatasetDict, split and field, empty, cut, without state.json) as --calib and --data;
calibration sets made by `importance` and reused with the same or other settings, models, tokenizers and after
their files were cut; image-text records with several images, URLs, URIs, image-token text, 16-bit and other
odd pixel modes, on qwen2_vl and the newer families; eval's windows, strides, batches, parts and sources at the
edges checked against a plain-transformers loss computed here; qid predict/fit on tables made from a known law
(one row, duplicates, huge ranges, a constant N) checked against the law by hand, qid measure against eval;
export chains that must give back the exact tensors, shard sizes at the edges, re-exports of an edited export,
exports loaded by plain transformers exactly as their model card's load line says; the Python API under
inference mode, autocast, float64 defaults, deterministic algorithms, from a thread, two threads at once, with
accelerate hooks or disk offload, a half-precision model, keyword names of other toolkits; MoE experts that no
token reaches (their codes must be RTN's), top-k equal to the expert count, shared experts, DeepSeek-V3 group
routing, gpt-oss and Qwen3-MoE layer patterns.
Each case says what a right program does: refuse (one line, exit 2 / one QuantkitError, nothing left behind),
"maybe" (a refusal or a checked success), or "valid" (must be taken, and its result checked).
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from fault_battery import (
    RTN,
    TEXT_IDS,
    Cases,
    _bytes_of,
    _maybe,
    export_ok,
    faithful,
    quantize,
    run_cli,
    tri,
    valid,
    vlm_faithful,
)
from helpers import make_tokenizer, random_model, tiny_config

GPTQ = ["--method", "gptq", "--nsamples", "2", "--seqlen", "16", "--group-size", "32"]
VLM_RUN = ["--method", "rtn", "--nsamples", "2", "--seqlen", "256", "--group-size", "32"]


# ---------------------------------------------------------------- inputs built once, copied into a case

_CACHE: dict[str, Path] = {}
_ROOT: list[Path] = []


def _cache_root() -> Path:
    if not _ROOT:
        _ROOT.append(Path(tempfile.mkdtemp(prefix="quantkit-round18-")))
        atexit.register(shutil.rmtree, _ROOT[0], True)
    return _ROOT[0]


def built(name: str, make: Callable[[Path], None]) -> Callable[[Path], None]:
    """A setup copying the folder `name`, made once by make(path) (in a cache beside the battery), into the case."""
    def setup(w: Path) -> None:
        if name not in _CACHE:
            path = _cache_root() / name
            shutil.rmtree(path, ignore_errors=True)
            make(path)
            _CACHE[name] = path
        if not (w / name).exists():
            shutil.copytree(_CACHE[name], w / name)
    return setup


def chain(*setups) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        for s in setups:
            if s is not None:
                s(w)
    return setup


def _save_moe(model_type: str, **fields) -> Callable[[Path], None]:
    """A tiny MoE of model_type (as tests/helpers.tiny_moe builds it, with `fields` on top) and the word tokenizer."""
    def make(path: Path) -> None:
        from helpers import MOE_FIELDS

        base = dict(intermediate_size=32, vocab_size=64, max_position_embeddings=64) | MOE_FIELDS.get(model_type, {})
        model = random_model(tiny_config(model_type, **(base | fields)), 0).eval()
        model.save_pretrained(path)
        make_tokenizer().save_pretrained(path)
    return make


def _save_vlm(family: str) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        from helpers import build_vlm

        model, processor = build_vlm(family)
        model.save_pretrained(path)
        processor.save_pretrained(path)
    return make


def _cli(*args) -> Callable[[Path], None]:
    """A setup running `quantkit ARGS` (of the case folder) that must succeed."""
    def setup(w: Path) -> None:
        done = run_cli(*[a(w) if callable(a) else a for a in args])
        assert done.exit_code == 0, done.output[-300:]
    return setup


def _p(rel: str):
    return lambda w: w / rel


def _write(rel: str, content) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        text = content(w) if callable(content) else content
        (w / rel).parent.mkdir(parents=True, exist_ok=True)
        (w / rel).write_bytes(text) if isinstance(text, bytes) else (w / rel).write_text(text)
    return setup


def _state(path: Path, rel: str = "model") -> dict:
    import quantkit

    return quantkit.load_quantized(path / rel).state_dict()


def _fp_state(path: Path, rel: str = "model") -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path / rel).state_dict()


def _logits(model) -> torch.Tensor:
    rows = model.get_input_embeddings().num_embeddings
    with torch.no_grad():
        return model(torch.tensor(TEXT_IDS) % rows).logits.float()


# ---------------------------------------------------------------- A. quantization recipes, checked linear by linear

LINEAR = re.compile(r"\.(q|k|v|o|gate|up|down)_proj\.weight$")


def stitched(*rules, method=RTN, model: str = "model", fmt: tuple = ()):
    """A check of a mixed run into out/: each linear's weight (load_quantized) equals, for the first rule
    (regex searched in its name, what) that matches, the model's own weight (what "fp"), nothing checked (None),
    or the same linear of a uniform reference run with `what` options (a list) on top of `method`."""
    def check(w: Path, result) -> str | None:
        bad = export_ok()(w, result)
        if bad:
            return bad
        got = _state(w, "out")
        fp = _fp_state(w, model)
        refs: dict[int, dict] = {}
        checked = 0
        for name in got:
            if not LINEAR.search(name):
                continue
            for i, (pattern, what) in enumerate(rules):
                if not re.search(pattern, name):
                    continue
                if what is None:
                    break
                if what == "fp":
                    expected = fp[name]
                else:
                    if i not in refs:
                        done = run_cli("calibrate", w / model, "--calib", w / "text.txt", *method, *fmt, *what,
                                       "-o", w / f"ref{i}")
                        if done.exit_code != 0:
                            return f"the reference run {what} failed: {done.output[-200:]}"
                        refs[i] = _state(w, f"ref{i}")
                    expected = refs[i][name]
                diff = (got[name].float() - expected.float()).abs().max().item()
                if diff > 1e-6:
                    return f"{name} differs by {diff:.3g} from {'the model' if what == 'fp' else what}'s"
                checked += 1
                break
        return None if checked else "no linear checked"
    check.valid = True
    return check


def _recipe_cal(body: str, *extra, name: str = "r.yaml", method=RTN):
    return (lambda w: ["calibrate", w / "model", "--calib", w / "text.txt", *method, *extra, "--recipe", w / name,
                       "-o", w / "out"]), _write(name, body)


def _recipe_cases(out: Cases) -> None:
    add = out.add
    every = (r".", [])
    for label, body, rules, extra in [
        ("down_proj at 8 bits", "overrides:\n  - targets: [down_proj]\n    bits: 8\n",
         [("down_proj", ["--bits", "8"]), every], ()),
        ("layer 0 at 2 bits by re:", "overrides:\n  - targets: ['re:.*layers\\.0\\..*']\n    bits: 2\n",
         [(r"layers\.0\.", ["--bits", "2"]), every], ()),
        ("o_proj at group 16", "overrides:\n  - targets: [o_proj]\n    group_size: 16\n",
         [("o_proj", ["--group-size", "16"]), every], ()),
        ("mlp asymmetric", "overrides:\n  - targets: ['re:.*mlp\\..*']\n    sym: false\n",
         [(r"mlp\.", ["--asym"]), every], ()),
        ("a later override wins where two match (mlp 8, then down_proj 2)",
         "overrides:\n  - targets: ['re:.*mlp\\..*']\n    bits: 8\n  - targets: [down_proj]\n    bits: 2\n",
         [("down_proj", ["--bits", "2"]), (r"mlp\.", ["--bits", "8"]), every], ()),
        ("the run's --bits 8 with q_proj overridden to 3", "overrides:\n  - targets: [q_proj]\n    bits: 3\n",
         [("q_proj", ["--bits", "3"]), (r".", ["--bits", "8"])], ("--bits", "8")),
        ("targets the attention only: the MLP keeps its exact weights", "targets: ['re:.*self_attn\\..*']\n",
         [(r"mlp\.", "fp"), every], ()),
        ("ignore layer 0's q and k by one re:", "ignore: ['re:.*layers\\.0\\.self_attn\\.(q|k)_proj$']\n",
         [(r"layers\.0\.self_attn\.(q|k)_proj", "fp"), every], ()),
        ("ignore wins over an override naming the same linear and another",
         "ignore: [layers.1.mlp.down_proj]\noverrides:\n  - targets: [down_proj]\n    bits: 8\n",
         [(r"layers\.1\.mlp\.down_proj", "fp"), ("down_proj", ["--bits", "8"]), every], ()),
        ("three settings in one override (bits 3, group 16, asym)",
         "overrides:\n  - targets: [v_proj]\n    bits: 3\n    group_size: 16\n    sym: false\n",
         [("v_proj", ["--bits", "3", "--group-size", "16", "--asym"]), every], ()),
        ("the same recipe as JSON in a .json file", '{"overrides": [{"targets": ["down_proj"], "bits": 8}]}',
         [("down_proj", ["--bits", "8"]), every], ()),
    ]:
        name = "r.json" if "JSON" in label else "r.yaml"
        args, setup = _recipe_cal(body, *extra, name=name)
        add("recipe18", f"RTN recipe, {label}: each linear equals the uniform run of its settings",
            lambda w, a=args: run_cli(*a(w)), setup, stitched(*rules, method=[*RTN, *extra]))
    for fmt in ("fake", "gptq"):
        args, setup = _recipe_cal("overrides:\n  - targets: [up_proj]\n    bits: 8\n", "--format", fmt)
        add("recipe18", f"RTN recipe up_proj at 8 bits in --format {fmt}: each linear equals its uniform run",
            lambda w, a=args: run_cli(*a(w)), setup,
            stitched(("up_proj", ["--bits", "8"]), every, fmt=("--format", fmt)))
    for target in ("o_proj", "down_proj"):
        args, setup = _recipe_cal(f"overrides:\n  - targets: [{target}]\n    method: rtn\n", method=GPTQ)
        add("recipe18", f"GPTQ run with {target} overridden to method rtn: {target} holds exactly the RTN codes",
            lambda w, a=args: run_cli(*a(w)), setup, stitched((target, []), (r".", None), method=RTN))
    args, setup = _recipe_cal("overrides:\n  - targets: [down_proj]\n    sym: no\n")
    add("recipe18", "YAML 1.1 'sym: no' (a boolean false): down_proj asymmetric", lambda w, a=args: run_cli(*a(w)),
        setup, _maybe(stitched(("down_proj", ["--asym"]), every)))
    args, setup = _recipe_cal("ignore: [layers.1.mlp]\n")
    add("recipe18", "ignore a parent module (layers.1.mlp, no linear's own name)", lambda w, a=args: run_cli(*a(w)),
        setup, _maybe(stitched((r"layers\.1\.mlp\.", "fp"), every)))
    args, setup = _recipe_cal("overrides:\n  - targets: [down_proj]\n    act_order: false\n")
    add("recipe18", "an act_order override in an RTN run (RTN has no column order)", lambda w, a=args: run_cli(*a(w)),
        setup, _maybe(stitched(every)))

    for label, body in [
        ("override group 48 (divides no input width)", "overrides:\n  - targets: [q_proj]\n    group_size: 48\n"),
        ("override group 0", "overrides:\n  - targets: [q_proj]\n    group_size: 0\n"),
        ("override bits 16", "overrides:\n  - targets: [q_proj]\n    bits: 16\n"),
        ("override method tlq in an RTN run", "overrides:\n  - targets: [q_proj]\n    method: tlq\n"),
        ("fp_alpha in an RTN run (no FP target)", "overrides:\n  - targets: [q_proj]\n    fp_alpha: 0.5\n"),
        ("override key 'bit' (typo of bits)", "overrides:\n  - targets: [q_proj]\n    bit: 8\n"),
        ("targets a layer that does not exist (layers.2)", "targets: ['re:.*layers\\.2\\..*']\n"),
        ("an invalid regex (re:[)", "targets: ['re:[']\n"),
        ("ignore every linear (ignore: [Linear])", "ignore: [Linear]\n"),
        ("targets lm_head without --quantize-lm-head", "targets: [lm_head]\n"),
        ("a suffix not on a dot boundary (proj)", "overrides:\n  - targets: [proj]\n    bits: 8\n"),
        ("a JSON array at the top", '[{"targets": ["q_proj"], "bits": 8}]'),
        ("an override whose linears are all ignored", "ignore: [q_proj]\noverrides:\n  - targets: [q_proj]\n    bits: 8\n"),
    ]:
        args, setup = _recipe_cal(body)
        add("recipe18", f"bad recipe: {label}", lambda w, a=args: run_cli(*a(w)), setup)

    def api_recipe(value):
        def run(w: Path):
            from quantkit import Override, Recipe

            recipe = value(w, Recipe, Override)
            return quantize(w, recipe=recipe)
        return run

    body = "overrides:\n  - targets: [down_proj]\n    bits: 8\n"
    for label, value in [
        ("a pathlib.Path to the YAML", lambda w, rc, ov: w / "r.yaml"),
        ("Recipe(overrides=(Override(...),)) as a tuple", lambda w, rc, ov: rc(overrides=(ov(targets=["down_proj"], bits=8),))),
    ]:
        add("recipe18", f"API recipe as {label}: each linear equals its uniform run", api_recipe(value),
            _write("r.yaml", body), stitched(("down_proj", ["--bits", "8"]), every), api=True)
    add("recipe18", "API recipe as a YAML string (not a path)", api_recipe(lambda w, rc, ov: body),
        None, api=True)


# ---------------------------------------------------------------- B. calibration data: datasets on disk, calibration recipes

TEXTS = [" ".join(f"w{(7 * i + 3 * j) % 60}" for j in range(40)) for i in range(6)]


def _jsonl(rel: str, texts=TEXTS) -> Callable[[Path], None]:
    return _write(rel, "".join(json.dumps({"text": t}) + "\n" for t in texts))


def _saved(rel: str, texts=TEXTS, column: str = "text", splits: tuple | None = None, extra=None):
    def setup(w: Path) -> None:
        from datasets import Dataset, DatasetDict

        rows = {column: list(texts), **(extra or {})}
        ds = Dataset.from_dict(rows)
        (DatasetDict({s: ds for s in splits}) if splits else ds).save_to_disk(str(w / rel))
    return setup


def same_run(ref_args: Callable[[Path], list], must_take: bool = True):
    """A check: out/model.safetensors equals that of the reference run (its -o replaced by w/ref)."""
    def check(w: Path, result) -> str | None:
        args = ref_args(w)
        args[args.index("-o") + 1] = w / "ref"
        done = run_cli(*args)
        if done.exit_code != 0:
            return f"the reference run failed: {done.output[-200:]}"
        a, b = _bytes_of(w / "out" / "model.safetensors"), _bytes_of(w / "ref" / "model.safetensors")
        return None if a and a == b else "out/ differs from the reference run's"
    check.valid = must_take
    return check


def _gq(data: str, *extra):
    return lambda w: ["calibrate", w / "model", "--calib", data.replace("@", str(w)), *GPTQ, *extra, "-o", w / "out"]


def _calib_cases(out: Cases) -> None:
    add = out.add
    ref = _gq("@/t.jsonl")
    for label, data, setup, kind in [
        ("hf:DIR of a Dataset saved with save_to_disk", "hf:@/ds", _saved("ds"), "valid"),
        ("a save_to_disk folder as a plain path", "@/ds", _saved("ds"), "valid"),
        ("hf:DIR::train of a DatasetDict", "hf:@/dd::train", _saved("dd", splits=("train", "test")), "valid"),
        ("hf:DIR:::content (the field under another name)", "hf:@/ds:::content", _saved("ds", column="content"),
         "valid"),
        ("hf:DIR of a DatasetDict, no split named", "hf:@/dd", _saved("dd", splits=("train", "test")), "maybe"),
    ]:
        add("calib18", f"GPTQ on {label}: the bytes of the same texts as JSONL", lambda w, d=data: run_cli(*_gq(d)(w)),
            chain(setup, _jsonl("t.jsonl")), tri(kind, same_run(ref)))
    for label, data, setup in [
        ("hf:DIR with a field that is no column", "hf:@/ds:::body", _saved("ds")),
        ("hf:DIR with an int field", "hf:@/ds:::id", _saved("ds", extra={"id": list(range(6))})),
        ("a Dataset of 0 rows", "hf:@/ds", _saved("ds", texts=[])),
        ("a Dataset of one 3-token row (too little for 2 x 16)", "hf:@/ds", _saved("ds", texts=["w1 w2 w3"])),
        ("a save_to_disk folder without its state.json", "hf:@/ds",
         chain(_saved("ds"), lambda w: (w / "ds" / "state.json").unlink())),
        ("a save_to_disk folder whose arrow file is cut in half", "hf:@/ds",
         chain(_saved("ds"), lambda w: [p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
                                         for p in (w / "ds").glob("*.arrow")])),
        ("a Dataset whose text column holds lists", "hf:@/ds", _saved("ds", texts=[["w1 w2"], ["w3"]])),
        ("hf: of a plain file", "hf:@/text.txt", None),
    ]:
        add("calib18", f"bad --calib: {label}", lambda w, d=data: run_cli(*_gq(d)(w)), setup)

    # calibration recipes (YAML): the same sources spelled otherwise must draw the same samples
    def recipe(rel: str, body: str):
        return _write(rel, body)
    plain = "nsamples: 2\nseqlen: 16\nsources:\n  - path: text.txt\n"
    ref_r = _gq("@/plain.yaml")
    for label, data, setup, kind in [
        ("a recipe in a subfolder naming ../text.txt", "@/sub/r.yaml",
         recipe("sub/r.yaml", plain.replace("text.txt", "../text.txt")), "valid"),
        ("a recipe naming the text by its absolute path", "@/r.yaml",
         lambda w: (w / "r.yaml").write_text(plain.replace("text.txt", str(w / "text.txt"))), "valid"),
        ("a recipe naming $QK18_DATA/text.txt (set)", "@/r.yaml",
         recipe("r.yaml", plain.replace("text.txt", "$QK18_DATA/text.txt")), "valid"),
        ("a recipe whose source has weight 3 (alone: all samples)", "@/r.yaml",
         recipe("r.yaml", plain + "    weight: 3\n"), "valid"),
        ("a recipe with a second source of weight 0", "@/r.yaml",
         recipe("r.yaml", plain + "    weight: 1\n  - path: t.jsonl\n    weight: 0\n"), "maybe"),
        ("a recipe whose source is a save_to_disk folder (hf:DIR)", "@/r.yaml",
         lambda w: (w / "r.yaml").write_text(plain.replace("text.txt", f"hf:{w}/ds")), "maybe"),
    ]:
        def run(w: Path, d=data):
            os.environ["QK18_DATA"] = str(w)
            try:
                return run_cli(*_gq(d)(w))
            finally:
                os.environ.pop("QK18_DATA", None)
        add("calib18", f"GPTQ on {label}: the bytes of the plain recipe", run,
            chain(recipe("plain.yaml", plain), setup, _jsonl("t.jsonl"), _saved("ds")), tri(kind, same_run(ref_r)))
    add("calib18", "two sources with weights 3 and 1 equal the same with 0.75 and 0.25",
        lambda w: run_cli(*_gq("@/a.yaml")(w)),
        chain(recipe("a.yaml", "nsamples: 4\nseqlen: 16\nsources:\n  - path: text.txt\n    weight: 3\n"
                               "  - path: t.jsonl\n    weight: 1\n"),
              recipe("b.yaml", "nsamples: 4\nseqlen: 16\nsources:\n  - path: text.txt\n    weight: 0.75\n"
                               "  - path: t.jsonl\n    weight: 0.25\n"), _jsonl("t.jsonl")),
        valid(same_run(_gq("@/b.yaml"))))
    for label, body, setup in [
        ("a source at $QK18_UNSET/text.txt (unset)", plain.replace("text.txt", "$QK18_UNSET/text.txt"), None),
        ("a negative weight", plain + "    weight: -1\n", None),
        ("every weight 0", plain + "    weight: 0\n", None),
        ("a weight .inf", plain + "    weight: .inf\n", None),
        ("kind image-caption on a text model", "kind: image-caption\n" + plain, None),
        ("kind text over image-text records", plain.replace("text.txt", "vl/data.jsonl"), None),
        ("a source that is a calibration set folder", plain.replace("text.txt", "s"), _cli(
            "importance", _p("model"), "--calib", _p("text.txt"), "--nsamples", "2", "--seqlen", "16", "-o", _p("s"))),
        ("a source naming the recipe itself", plain.replace("text.txt", "r.yaml"), None),
        ("a heldout part too short for 64 windows of 16", plain.replace("nsamples: 2", "nsamples: 64")
         + "    part: heldout\n", None),
    ]:
        add("calib18", f"bad calibration recipe: {label}", lambda w: run_cli(*_gq("@/r.yaml")(w)),
            chain(recipe("r.yaml", body), setup))


# ---------------------------------------------------------------- C. calibration sets reused

def _set_of(rel: str = "set", model: str = "model", *extra) -> Callable[[Path], None]:
    return _cli("importance", _p(model), "--calib", _p("text.txt"), "--nsamples", "2", "--seqlen", "16", *extra,
                "-o", _p(rel))


def _with_set(*extra, model: str = "model", setrel: str = "set"):
    return lambda w: ["calibrate", w / model, "--calib-set", w / setrel, "--group-size", "32", *extra, "-o", w / "out"]


def _cut(rel_glob: str, keep: float = 0.5) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        for p in sorted(w.glob(rel_glob)):
            p.write_bytes(p.read_bytes()[: int(p.stat().st_size * keep)])
    return setup


def _set_cases(out: Cases) -> None:
    add = out.add
    plain = _with_set()
    for label, args, setup, kind in [
        ("--nsamples 2 --seqlen 16 (the set's own)", _with_set("--nsamples", "2", "--seqlen", "16"), None, "valid"),
        ("the set's folder copied elsewhere", _with_set(setrel="moved/set2"),
         lambda w: shutil.copytree(w / "set", w / "moved" / "set2"), "valid"),
        ("the set reached through a symlink", _with_set(setrel="ln"), lambda w: (w / "ln").symlink_to(w / "set"),
         "valid"),
        ("the set's path with a trailing slash", lambda w: [*_with_set()(w)[:3], str(w / "set") + "/",
                                                            *_with_set()(w)[4:]], None, "valid"),
        ("the set read-only (chmod 555, files 444)", plain,
         lambda w: [os.chmod(p, 0o444) for p in (w / "set").iterdir()] + [os.chmod(w / "set", 0o555)], "valid"),
    ]:
        add("set18", f"calibrate --calib-set, {label}: the bytes of the plain reuse", lambda w, a=args: run_cli(*a(w)),
            chain(_set_of(), setup), tri(kind, same_run(plain)))
    for label, args, kind in [
        ("--method gptq", _with_set("--method", "gptq"), "valid"),
        ("--bits 2 then --bits 8 from one set (the 8-bit run)", _with_set("--bits", "8"), "valid"),
        ("--format fake", _with_set("--format", "fake"), "valid"),
        ("--method rtn (reads no data)", _with_set("--method", "rtn"), "maybe"),
    ]:
        add("set18", f"calibrate --calib-set with {label}", lambda w, a=args: run_cli(*a(w)), _set_of(),
            tri(kind, faithful("model")))
    for label, args, setup in [
        ("--seqlen 32 beside a set of 16", _with_set("--seqlen", "32"), None),
        ("a set made on the model, used on another seed's copy", _with_set(model="m2"),
         lambda w: __import__("helpers").save_tiny_llama(w / "m2", seed=5)),
        ("a set of the llama used on a qwen3", _with_set(model="qwen3"),
         built("qwen3", lambda p: __import__("helpers").save_tiny_causal_lm(p.parent, "qwen3"))),
        ("the set's safetensors cut in half", plain, _cut("set/*.safetensors")),
        ("the set's manifest.json gone", plain, lambda w: (w / "set" / "manifest.json").unlink()),
        ("the set's safetensors gone, manifest kept", plain,
         lambda w: [p.unlink() for p in (w / "set").glob("*.safetensors")]),
        ("the model's tokenizer replaced after the set (other word order)", plain,
         lambda w: _permuted_tokenizer(w / "model")),
        ("the set given as --calib (a folder of no text)", lambda w: ["calibrate", w / "model", "--calib", w / "set",
                                                                     *GPTQ, "-o", w / "out"], None),
        ("the set given to eval --data", lambda w: ["eval", w / "model", "--data", w / "set", "--seqlen", "16"], None),
        ("the set given to importance --calib", lambda w: ["importance", w / "model", "--calib", w / "set",
                                                            "--nsamples", "2", "--seqlen", "16", "-o", w / "s2"], None),
    ]:
        add("set18", f"bad reuse of a set: {label}", lambda w, a=args: run_cli(*a(w)), chain(_set_of(), setup))
    def api_set(w: Path):
        import quantkit

        return quantkit.quantize(str(w / "model"), calib_set=w / "set", group_size=32, progress=False,
                                 output_dir=str(w / "out"))
    add("set18", "API calib_set= a pathlib.Path: the bytes of the CLI's reuse", api_set, _set_of(), same_run(plain),
        api=True)


def _permuted_tokenizer(folder: Path) -> None:
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    words = sorted(k for k in vocab if re.fullmatch(r"w\d+", k))
    ids = [vocab[k] for k in words]
    for k, i in zip(words, ids[1:] + ids[:1]):
        vocab[k] = i
    (folder / "tokenizer.json").write_text(json.dumps(data))


# ---------------------------------------------------------------- D. image-text records

def _records(w: Path) -> list[dict]:
    out = []
    for line in (w / "vl" / "data.jsonl").read_text().splitlines():
        r = json.loads(line)
        r["image"] = str(w / "vl" / r["image"])
        out.append(r)
    return out


def _vl_edit(edit: Callable[[Path, list], None]) -> Callable[[Path], None]:
    """d.jsonl: vl/data.jsonl's records with absolute image paths, each edited."""
    def setup(w: Path) -> None:
        records = _records(w)
        edit(w, records)
        (w / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return setup


def _each(edit: Callable[[Path, dict], None]) -> Callable[[Path, list], None]:
    def apply(w: Path, records: list) -> None:
        for r in records:
            edit(w, r)
    return apply


def _png(w: Path, name: str, mode: str, size=(56, 56), fmt: str = "PNG") -> str:
    import numpy
    from PIL import Image

    if mode == "I;16":
        image = Image.fromarray((numpy.arange(size[0] * size[1]).reshape(size[::-1]) * 37 % 65536).astype("uint16"))
    elif mode == "I":
        image = Image.fromarray((numpy.arange(size[0] * size[1]).reshape(size[::-1]) * 9973).astype("int32"))
    elif mode == "F":
        image = Image.fromarray(numpy.linspace(0, 1, size[0] * size[1], dtype="float32").reshape(size[::-1]))
    else:
        image = Image.new("RGB", size, (200, 30, 30)).convert(mode)
    image.save(w / name, format=fmt)
    return str(w / name)


def _two_images(w: Path, r: dict) -> None:
    r["image"] = [r["image"], r["image"]]


def _two_image_parts(w: Path, r: dict) -> None:
    text = r.pop("text", None) or r["messages"][-1]["content"]
    r["image"] = [r["image"], r["image"]]
    r["messages"] = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                  {"type": "text", "text": "what colour is the square ?"}]},
                     {"role": "assistant", "content": [{"type": "text", "text": text}]}]


def _caption_with(token: str) -> Callable[[Path, dict], None]:
    def edit(w: Path, r: dict) -> None:
        r.pop("messages", None)
        r["text"] = f"a {token} red square ."
    return edit


def _image_is(value: Callable[[Path], str]) -> Callable[[Path, dict], None]:
    def edit(w: Path, r: dict) -> None:
        r["image"] = value(w)
    return edit


def _vl_cal(model: str = "vlm"):
    return lambda w: ["calibrate", w / model, "--calib", w / "d.jsonl", *VLM_RUN, "-o", w / "out"]


def _vlm_cases(out: Cases) -> None:
    add = out.add
    families = {"vlm": None, "vlm_llava": "llava", "vlm_internvl": "internvl"}
    for folder, family in families.items():
        made = built(folder, _save_vlm(family)) if family else None
        label = family or "qwen2_vl"
        for what, edit, kind in [
            ("a list of two images with a caption", _each(_two_images), "maybe"),
            ("two image parts in its messages and two images", _each(_two_image_parts), "maybe"),
            ("a 16-bit grayscale PNG (I;16)", _each(_image_is(lambda w: _png(w, "g16.png", "I;16"))), "maybe"),
            ("a 32-bit integer TIFF (I)", _each(_image_is(lambda w: _png(w, "i32.tif", "I", fmt="TIFF"))), "maybe"),
            ("a grayscale+alpha PNG (LA)", _each(_image_is(lambda w: _png(w, "la.png", "LA"))), "valid"),
        ][: 5 if family is None else 3]:
            add("vlm18", f"{label}: every record with {what}", lambda w, m=folder: run_cli(*_vl_cal(m)(w)),
                chain(made, _vl_edit(edit)), tri(kind, vlm_faithful(folder)))
        for token in ("<|image_pad|>", "<image>") if family is None else ("<image>",):
            add("vlm18", f"{label}: a caption holding the literal image token {token}",
                lambda w, m=folder: run_cli(*_vl_cal(m)(w)), chain(made, _vl_edit(_each(_caption_with(token)))),
                _maybe(vlm_faithful(folder)))
    for what, value in [
        ("an http URL (offline)", lambda w: "http://127.0.0.1:9/x.png"),
        ("a bare base64 string (no data: prefix)", lambda w: __import__("base64").b64encode(
            (w / "vl" / "img" / "0.png").read_bytes()).decode()),
        ("a directory", lambda w: str(w / "vl" / "img")),
        ("a text file named .png", lambda w: (w / "t.png").write_text("not an image") and str(w / "t.png")),
        ("an empty .png", lambda w: (w / "e.png").write_bytes(b"") or str(w / "e.png")),
        ("an SVG file", lambda w: (w / "s.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="8" '
                                                          'height="8"/>') and str(w / "s.svg")),
    ]:
        add("vlm18", f"qwen2_vl: a record whose image is {what}", lambda w: run_cli(*_vl_cal()(w)),
            _vl_edit(lambda w, rs, v=value: rs.__setitem__(0, {**rs[0], "image": v(w)}) or
                     [r.__setitem__("image", v(w)) for r in rs]))
    for what, value, kind in [
        ("null (a text-only chat on a VLM?)", lambda w: None, "maybe"),
        ("a file:// URI", lambda w: "file://" + str(w / "vl" / "img" / "0.png"), "maybe"),
        ("a path with ~ (HOME the case folder)", lambda w: "~/vl/img/0.png", "maybe"),
        ("a 1 x 1 image", lambda w: _png(w, "one.png", "RGB", (1, 1)), "maybe"),
        ("a 1 x 600 strip", lambda w: _png(w, "strip.png", "RGB", (1, 600)), "maybe"),
        ("a 900 x 900 image", lambda w: _png(w, "big.png", "RGB", (900, 900)), "maybe"),
    ]:
        def run(w: Path):
            old = os.environ.get("HOME")
            os.environ["HOME"] = str(w)
            try:
                return run_cli(*_vl_cal()(w))
            finally:
                if old is None:
                    os.environ.pop("HOME", None)
                else:
                    os.environ["HOME"] = old
        add("vlm18", f"qwen2_vl: every record's image {what}", run,
            _vl_edit(_each(lambda w, r, v=value: r.__setitem__("image", v(w)))), tri(kind, vlm_faithful("vlm")))
    add("vlm18", "qwen2_vl: a chat record with an image part and no image field", lambda w: run_cli(*_vl_cal()(w)),
        _vl_edit(lambda w, rs: [r.pop("image") for r in rs if "messages" in r] and [
            r.__setitem__("messages", [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what ?"}]},
                                       {"role": "assistant", "content": "red"}]) for r in rs if "messages" in r]))
    add("vlm18", "qwen2_vl: two image parts in the messages, one image", lambda w: run_cli(*_vl_cal()(w)),
        _vl_edit(_each(lambda w, r: (_two_image_parts(w, r), r.__setitem__("image", r["image"][0])))))
    add("vlm18", "qwen2_vl: one image, a list of three image paths in the record with one missing",
        lambda w: run_cli(*_vl_cal()(w)),
        _vl_edit(_each(lambda w, r: r.__setitem__("image", [r["image"], r["image"], str(w / "gone.png")]))))


# ---------------------------------------------------------------- E. eval's numbers against plain transformers

def plain_loss(folder: Path, docs: list[str], seqlen: int, stride: int | None = None,
               max_tokens: int | None = None) -> tuple[float, int, int]:
    """(mean nll, scored tokens, windows) of plain transformers on the documents joined by eos, with sliding windows
    of seqlen tokens stepping by stride, each scoring only the targets no earlier window scored (the usual strided
    perplexity), written here apart from quantkit's code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    lm = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids: list[int] = []
    for i, d in enumerate(docs):
        if i:
            ids.append(tok.eos_token_id)
        ids.extend(tok(d, add_special_tokens=False)["input_ids"])
    if max_tokens is not None:
        ids = ids[:max_tokens]
    stride = stride or seqlen
    ids_t = torch.tensor(ids)
    total, count, windows, reached = 0.0, 0, 0, 1  # target 0 has no context
    begin = 0
    while reached < len(ids):
        end = min(begin + seqlen, len(ids))
        if end > reached:
            with torch.no_grad():
                logp = torch.log_softmax(lm(ids_t[None, begin:end]).logits[0].double(), -1)
            for t in range(max(reached, begin + 1), end):
                total -= logp[t - begin - 1, ids[t]].item()
                count += 1
            reached = end
            windows += 1
        begin += stride
    return total / count, count, windows


def _docs(w: Path, rel: str, part: str = "all") -> list[str]:
    path = w / rel
    texts = ([json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
             if rel.endswith(".jsonl") else [path.read_text()])
    if part == "all":
        return texts
    total = sum(map(len, texts))
    cut = total - round(total * 0.1)
    out, pos = [], 0
    for t in texts:
        piece = t[: max(0, min(pos + len(t), cut) - pos)] if part == "train" else t[max(0, cut - pos):]
        pos += len(t)
        if piece:
            out.append(piece)
    return out


def eval_like_plain(model: str, data: str, seqlen: int, stride: int | None = None, max_tokens: int | None = None,
                    part: str = "all", tol: float = 1e-4, counts: bool = True):
    """A check of `eval --json`: its loss (and tokens, windows) equal plain_loss's on the same text."""
    def check(w: Path, result) -> str | None:
        doc = json.loads(result.stdout)
        loss, tokens, windows = plain_loss(w / model, _docs(w, data, part), seqlen, stride, max_tokens)
        if not math.isfinite(doc.get("loss", float("nan"))) or abs(doc["loss"] - loss) > tol:
            return f"loss {doc.get('loss')} vs plain transformers' {loss:.6f}"
        if counts and (doc.get("tokens"), doc.get("windows")) != (tokens, windows):
            return f"tokens/windows {doc.get('tokens')}/{doc.get('windows')} vs {tokens}/{windows} by hand"
        return None
    check.valid = True
    return check


def _ev(target: str, data: str, *extra):
    return lambda w: run_cli("eval", w / target, "--data", w / data, "--json", *extra)


def _eval_cases(out: Cases) -> None:
    add = out.add
    for label, extra, kw in [
        ("--seqlen 16 --stride 8 (overlapping)", ["--seqlen", "16", "--stride", "8", "--max-tokens", "200"],
         dict(seqlen=16, stride=8, max_tokens=200)),
        ("--seqlen 16 --stride 1", ["--seqlen", "16", "--stride", "1", "--max-tokens", "60"],
         dict(seqlen=16, stride=1, max_tokens=60)),
        ("--seqlen 2 (the least)", ["--seqlen", "2", "--max-tokens", "40"], dict(seqlen=2, max_tokens=40)),
        ("--seqlen 64 (max_position_embeddings)", ["--seqlen", "64", "--max-tokens", "300"],
         dict(seqlen=64, max_tokens=300)),
        ("--max-tokens equal to --seqlen (one window)", ["--seqlen", "16", "--max-tokens", "16"],
         dict(seqlen=16, max_tokens=16)),
        ("--max-tokens 17 (a second window of 1 target)", ["--seqlen", "16", "--max-tokens", "17"],
         dict(seqlen=16, max_tokens=17)),
        ("--batch-size 1", ["--seqlen", "16", "--max-tokens", "200", "--batch-size", "1"],
         dict(seqlen=16, max_tokens=200)),
        ("--batch-size 1000 (past the windows)", ["--seqlen", "16", "--max-tokens", "200", "--batch-size", "1000"],
         dict(seqlen=16, max_tokens=200)),
    ]:
        add("eval18", f"eval --part all {label}: loss, tokens, windows as plain transformers",
            _ev("model", "text.txt", "--part", "all", *extra), None, eval_like_plain("model", "text.txt", **kw))
    for part in ("heldout", "train"):
        add("eval18", f"eval --part {part} of a text file: as plain transformers on its {part} characters",
            _ev("model", "text.txt", "--part", part, "--seqlen", "16"), None,
            eval_like_plain("model", "text.txt", 16, part=part))
        add("eval18", f"eval --part {part} of JSONL records (eos between them): as plain transformers",
            _ev("model", "t.jsonl", "--part", part, "--seqlen", "16"), _jsonl("t.jsonl"),
            eval_like_plain("model", "t.jsonl", 16, part=part))
    add("eval18", "eval of JSONL records --part all --stride 5: as plain transformers",
        _ev("model", "t.jsonl", "--part", "all", "--seqlen", "16", "--stride", "5"), _jsonl("t.jsonl"),
        eval_like_plain("model", "t.jsonl", 16, 5))
    add("eval18", "eval with no --part (heldout by default): as plain transformers on the last 10%",
        _ev("model", "text.txt", "--seqlen", "16"), None, eval_like_plain("model", "text.txt", 16, part="heldout"))
    add("eval18", "eval of the fake export: as plain transformers loading it",
        _ev("fake", "text.txt", "--part", "all", "--seqlen", "32"), None, eval_like_plain("fake", "text.txt", 32))
    add("eval18", "eval of a save_to_disk folder: as plain transformers on its rows (eos between them)",
        lambda w: run_cli("eval", w / "model", "--data", f"hf:{w}/ds", "--json", "--part", "all", "--seqlen", "16"),
        chain(_saved("ds"), _jsonl("t.jsonl")), eval_like_plain("model", "t.jsonl", 16))

    def by_source(w: Path, result) -> str | None:
        doc = json.loads(result.stdout)
        parts = doc.get("by_source") or {}
        if len(parts) != 2:
            return f"by_source has {len(parts)} entries, not 2: {list(parts)}"
        total = n = 0
        for rel in ("d/a.txt", "d/b.txt"):
            key = next((k for k in parts if k.endswith(rel.split("/")[1])), None)
            if key is None:
                return f"no by_source entry for {rel}"
            loss, tokens, _ = plain_loss(w / "model", _docs(w, rel), 16)
            if abs(parts[key]["loss"] - loss) > 1e-4 or parts[key]["tokens"] != tokens:
                return f"{rel}: {parts[key]} vs plain transformers' loss {loss:.6f} over {tokens}"
            total, n = total + loss * tokens, n + tokens
        return None if abs(doc["loss"] - total / n) <= 1e-4 else f"overall {doc['loss']} vs {total / n:.6f}"
    by_source.valid = True

    def two_files(w: Path) -> None:
        (w / "d").mkdir()
        words = (w / "text.txt").read_text().split()
        (w / "d" / "a.txt").write_text(" ".join(words[:300]))
        (w / "d" / "b.txt").write_text(" ".join(words[300:700]))
    add("eval18", "eval of a folder of two files --part all: each source and the overall as plain transformers",
        lambda w: run_cli("eval", w / "model", "--data", w / "d", "--json", "--part", "all", "--seqlen", "16"),
        two_files, by_source)
    add("eval18", "eval of a comma list of two files: each source and the overall as plain transformers",
        lambda w: run_cli("eval", w / "model", "--data", f"{w}/d/a.txt,{w}/d/b.txt", "--json", "--part", "all",
                          "--seqlen", "16"), two_files, by_source)

    def short_left_out(w: Path, result) -> str | None:
        doc = json.loads(result.stdout)
        loss, tokens, _ = plain_loss(w / "model", _docs(w, "d/a.txt"), 16)
        return None if abs(doc["loss"] - loss) <= 1e-4 and doc["tokens"] == tokens else (
            f"overall {doc['loss']} over {doc['tokens']} vs a.txt alone {loss:.6f} over {tokens}")
    short_left_out.valid = True
    add("eval18", "eval of a folder where one file holds less than a window: the other alone",
        lambda w: run_cli("eval", w / "model", "--data", w / "d", "--json", "--part", "all", "--seqlen", "16"),
        lambda w: (two_files(w), (w / "d" / "b.txt").write_text("w1 w2 w3")), short_left_out)
    add("eval18", "eval of the same file twice in a comma list",
        lambda w: run_cli("eval", w / "model", "--data", f"{w}/text.txt,{w}/text.txt", "--json", "--part", "all",
                          "--seqlen", "16"), None, _maybe(eval_like_plain("model", "text.txt", 16, counts=False)))
    for label, extra in [
        ("--max-tokens 15 under --seqlen 16", ["--seqlen", "16", "--max-tokens", "15"]),
        ("--seqlen 65 over max_position_embeddings 64", ["--seqlen", "65"]),
        ("--stride 17 over --seqlen 16", ["--seqlen", "16", "--stride", "17"]),
        ("--part heldout of a text whose last 10% is under one window", ["--seqlen", "64", "--part", "heldout",
                                                                         "--max-tokens", "100"]),
    ]:
        data = "s.txt" if "10%" in label else "text.txt"
        add("eval18", f"bad eval: {label}", lambda w, e=extra, d=data: run_cli("eval", w / "model", "--data", w / d, *e),
            _write("s.txt", " ".join(["w1"] * 300)))


# ---------------------------------------------------------------- F. qid numbers against a known law

LAW = dict(k=2.0, alpha=0.5, beta=0.25, gamma=1.5)


def _law_qid(n: float, d: float, p: float, law=LAW) -> float:
    return law["k"] * d ** law["beta"] / (n ** law["alpha"] * p ** law["gamma"])


def _law_rows(ns=(1e6, 4e6, 1.6e7), ds=(1e8, 1e9, 1e10), ps=(2, 3, 4), method: str = "gptq", repeat: int = 1,
              se: str | None = None) -> str:
    header = "model,method,bits,group_size,N,D,loss_fp,loss_q,qid,eval_text" + (",qid_se" if se else "") + "\n"
    rows = []
    for i, n in enumerate(ns):
        for d in ds:
            for p in ps:
                q = _law_qid(n, d, p)
                rows.append(f"m{i},{method},{p},128,{n:g},{d:g},3.0,{3.0 + q!r},{q!r},e" + (f",{se}" if se else "")
                            + "\n")
    return header + "".join(rows * repeat)


def fit_recovers(law=LAW, rel_tol: float = 1e-4):
    def check(w: Path, result) -> str | None:
        doc = json.loads(result.stdout)
        fits = [f for f in doc.get("fits", []) if f.get("law") == "unified"]
        if len(fits) != 1:
            return f"{len(fits)} unified fits, not 1"
        for key, value in law.items():
            got = fits[0]["params"][key]["value"]
            if not abs(got - value) <= rel_tol * abs(value):
                return f"{key} fitted {got}, the law's is {value}"
        return None
    check.valid = True
    return check


def predicted(expect: Callable[[], dict], rel_tol: float = 1e-9):
    def check(w: Path, result) -> str | None:
        doc = json.loads(result.stdout)
        for key, value in expect().items():
            got = doc.get(key)
            if not isinstance(got, (int, float)) or not abs(got - value) <= rel_tol * abs(value):
                return f"{key} {got} vs {value} by hand"
        return None
    check.valid = True
    return check


def _qid_cases(out: Cases) -> None:
    add = out.add
    law_file = _write("law.json", json.dumps(LAW))
    for n, d, p in [(1e6, 1e8, 4), (1.0, 1.0, 1.0), (1e15, 1e17, 16), (3.3e9, 2.2e12, 3), (7e5, 1e3, 2.5)]:
        q = _law_qid(n, d, p)
        kind = "maybe" if p != int(p) else "valid"  # every QiD here lies in (0, 20]; a fractional width may be refused
        args = ["qid", "predict", "--law", "law.json", "--params", f"{n:g}", "--bits", f"{p:g}", "--tokens", f"{d:g}",
                "--json"]
        add("qid18", f"qid predict N={n:g} D={d:g} P={p:g} (QiD {q:.3g} by hand)",
            lambda w, a=args: run_cli(*[w / x if x == "law.json" else x for x in a]), law_file,
            tri(kind, predicted(lambda q=q: {"qid": q})))
    for n, p, q in [(1e6, 4, 0.01), (1e9, 3, 0.05), (2e7, 2, 0.3)]:
        d = (q * n ** LAW["alpha"] * p ** LAW["gamma"] / LAW["k"]) ** (1 / LAW["beta"])
        kind = "valid" if 1 <= d <= 1e17 else "bad"
        add("qid18", f"qid predict --qid {q} N={n:g} P={p}: tokens {d:.4g} by hand (inverse)",
            lambda w, n=n, p=p, q=q: run_cli("qid", "predict", "--law", w / "law.json", "--params", f"{n:g}",
                                             "--bits", str(p), "--qid", str(q), "--json"), law_file,
            tri(kind, predicted(lambda d=d: {"tokens": d}, 1e-6)))
    for label, law in [
        ("without gamma", {k: v for k, v in LAW.items() if k != "gamma"}),
        ("with k 0", {**LAW, "k": 0.0}),
        ("with k negative", {**LAW, "k": -2.0}),
        ("with alpha NaN (as JSON NaN)", {**LAW, "alpha": float("nan")}),
    ]:
        add("qid18", f"bad qid predict law {label}", lambda w: run_cli(
            "qid", "predict", "--law", w / "l.json", "--params", "1e6", "--bits", "4", "--tokens", "1e8", "--json"),
            _write("l.json", json.dumps(law)))
    add("qid18", "qid predict --law of a fit JSON (qid fit -o): the fitted law's QiD by hand",
        lambda w: run_cli("qid", "predict", "--law", w / "fit.json", "--method", "gptq", "--params", "1e6", "--bits",
                          "4", "--tokens", "1e8", "--json"),
        chain(_write("law.csv", _law_rows()), _cli("qid", "fit", _p("law.csv"), "--method", "gptq", "--law", "unified",
                                                   "--bootstrap", "0", "-o", _p("fit.json"))),
        _maybe(predicted(lambda: {"qid": _law_qid(1e6, 1e8, 4)}, 1e-6)))

    def fit(rel: str, *extra):
        return lambda w: run_cli("qid", "fit", w / rel, "--method", "gptq", "--law", "unified", "--bootstrap", "0",
                                 "--json", *extra)
    for label, body, kind in [
        ("27 rows of the law exactly", _law_rows(), "valid"),
        ("every row twice", _law_rows(repeat=2), "valid"),
        ("N from 1e3 to 1e14, D from 1e3 to 1e16", _law_rows(ns=(1e3, 1e8, 1e14), ds=(1e3, 1e9, 1e16)), "valid"),
        ("a qid_se column of one value (exact rows: any weights)", _law_rows(se="0.001"), "valid"),
        ("the rows in reverse order", "".join([_law_rows().splitlines(True)[0]] + _law_rows().splitlines(True)[:0:-1]),
         "valid"),
    ]:
        add("qid18", f"qid fit of {label}: the law's parameters", fit("t.csv"), _write("t.csv", body),
            tri(kind, fit_recovers()))
    other = _law_rows(method="rtn").splitlines(True)[1:]
    skewed = [line.split(",") for line in other]
    for cells in skewed:
        cells[8] = repr(float(cells[8]) * 3)
        cells[7] = repr(3.0 + float(cells[8]))
    mixed = _law_rows() + "".join(",".join(c) for c in skewed)
    add("qid18", "qid fit --method gptq of a table that also holds rtn rows (3x the QiD): the gptq law",
        fit("t.csv"), _write("t.csv", mixed), valid(fit_recovers()))
    for label, body in [
        ("one row", "".join(_law_rows().splitlines(True)[:2])),
        ("one N only (alpha undetermined)", _law_rows(ns=(1e6,))),
        ("one token count only (beta undetermined)", _law_rows(ds=(1e9,))),
        ("the header only", _law_rows().splitlines(True)[0]),
        ("a row with D 1e400 (inf)", _law_rows().replace(",1e+08,", ",1e400,", 1)),
    ]:
        add("qid18", f"bad qid fit: {label}", fit("t.csv"), _write("t.csv", body))
    for label, body, kind in [
        ("27 rows of the law", _law_rows(), "valid"),
        ("every row twice", _law_rows(repeat=2), "valid"),
    ]:
        def drawn(w: Path, result) -> str | None:
            files = [p for p in (w / "figs").rglob("*") if p.is_file() and p.stat().st_size > 0]
            return None if files else "no figure written"
        add("qid18", f"qid plot of {label}", lambda w: run_cli("qid", "plot", w / "t.csv", "--format", "png", "-o",
                                                                 w / "figs"), _write("t.csv", body), tri(kind, drawn))

    def measured_like_eval(w: Path, result) -> str | None:
        import csv

        rows = list(csv.DictReader((w / "q.csv").open()))
        if len(rows) != 1:
            return f"{len(rows)} rows, not 1"
        row = rows[0]
        qid = float(row["loss_q"]) - float(row["loss_fp"])
        if abs(float(row["qid"]) - qid) > 1e-9:
            return f"qid {row['qid']} is not loss_q - loss_fp ({qid})"
        fp = run_cli("eval", w / "model", "--data", w / "text.txt", "--part", "heldout", "--seqlen", "16", "--json")
        q = run_cli("eval", w / "ct16", "--data", w / "text.txt", "--part", "heldout", "--seqlen", "16", "--json")
        a, b = json.loads(fp.stdout)["loss"], json.loads(q.stdout)["loss"]
        if abs(float(row["loss_fp"]) - a) > 1e-4 or abs(float(row["loss_q"]) - b) > 1e-4:
            return f"measure's losses {row['loss_fp']}/{row['loss_q']} vs eval's {a}/{b} (heldout, seqlen 16)"
        return None
    measured_like_eval.valid = False
    add("qid18", "qid measure of one RTN cell: its losses equal eval's of the model and of the RTN export",
        lambda w: run_cli("qid", "measure", w / "model", "--tokens", "1e6", "--eval", w / "text.txt", "--bits", "4",
                          "--methods", "rtn", "--group-size", "32", "--eval-seqlen", "16", "--nsamples", "2",
                          "--calib-seqlen", "16", "--no-progress", "-o", w / "q.csv"),
        _cli("calibrate", _p("model"), "--calib", _p("text.txt"), *RTN, "-o", _p("ct16")), measured_like_eval)


# ---------------------------------------------------------------- G. export chains, shards, edited exports, cards

def raw_tensors_equal(rel: str, ref_rel: str):
    """A check: the safetensors of rel hold exactly ref_rel's tensors (names, dtypes, values), shards merged."""
    def check(w: Path, result) -> str | None:
        from safetensors.torch import load_file

        def merged(folder: Path) -> dict:
            out = {}
            for p in sorted(folder.glob("*.safetensors")):
                out.update(load_file(p))
            return out
        a, b = merged(w / rel), merged(w / ref_rel)
        if a.keys() != b.keys():
            return f"other tensors than {ref_rel}: {sorted(set(a) ^ set(b))[:3]}"
        for k in a:
            if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k]):
                return f"{k} differs from {ref_rel}'s"
        return None
    check.valid = True
    return check


def card_loads(rel: str = "out", tol: float = 1e-4):
    """A check: the model card's first Python block, run as written (the folder for THIS_REPO_OR_DIR), gives a
    model whose logits equal load_quantized's."""
    def check(w: Path, result) -> str | None:
        import quantkit

        card = (w / rel / "README.md").read_text()
        blocks = re.findall(r"```python\n(.*?)```", card, re.S)
        if not blocks:
            return "the model card has no Python load block"
        scope: dict = {}
        exec(blocks[0].replace("THIS_REPO_OR_DIR", str(w / rel)), scope)  # noqa: S102 - the card's own line
        plain = scope.get("model")
        if plain is None:
            return "the card's block defines no model"
        diff = (_logits(plain.eval()) - _logits(quantkit.load_quantized(w / rel))).abs().max().item()
        return None if diff <= tol else f"the card's load gives logits {diff:.3g} away from load_quantized's"
    check.valid = True
    return check


def _export(src: str, fmt: str, *extra, out: str = "out"):
    return lambda w: run_cli("export", w / src, "--format", fmt, *extra, "-o", w / out)


def _scale_edit(rel: str, factor: float) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        from safetensors.torch import load_file, save_file

        shutil.copytree(w / rel, w / "ed")
        path = w / "ed" / "model.safetensors"
        state = load_file(path)
        key = next(k for k in sorted(state) if k.endswith("layers.0.mlp.down_proj.weight_scale"))
        state[key] = state[key] * factor
        save_file(state, path, metadata={"format": "pt"})
    return setup


def _export_cases(out: Cases) -> None:
    add = out.add
    for src, fmts in [("ct", ("fake", "compressed-tensors")), ("ct", ("gptq", "compressed-tensors")),
                      ("ct", ("gptq_v2", "fake", "compressed-tensors")), ("gptq", ("compressed-tensors", "gptq")),
                      ("asym", ("fake", "compressed-tensors")),
                      ("head", ("fake", "compressed-tensors")), ("a8", ("fake", "compressed-tensors")),
                      ("fake", ("compressed-tensors", "fake"))]:
        steps = [_cli("export", _p(src if i == 0 else f"s{i - 1}"), "--format", f, "-o", _p(f"s{i}"))
                 for i, f in enumerate(fmts[:-1])]
        add("export18", f"export {src} -> {' -> '.join(fmts)}: the exact tensors of {src}",
            _export(f"s{len(fmts) - 2}", fmts[-1]), chain(*steps), raw_tensors_equal("out", src))
    for size, kind in [("1B", "maybe"), ("1KB", "valid"), ("9999TB", "valid"), ("1.5KB", "maybe"), ("2048", "maybe")]:
        add("export18", f"export ct --max-shard-size {size}: ct's tensors, loaded by the card's line",
            _export("ct", "compressed-tensors", "--max-shard-size", size), None,
            tri(kind, _both(raw_tensors_equal("out", "ct"), card_loads())))
    for size in ("0", "-1KB", "5XB", "5GB5"):
        add("export18", f"bad export --max-shard-size {size!r}", _export("ct", "fake", "--max-shard-size", size))
    add("export18", "export of a 1KB-sharded export to fake: ct's weights",
        _export("sh", "fake"), _cli("export", _p("ct"), "--format", "compressed-tensors", "--max-shard-size", "1KB",
                                    "-o", _p("sh")), valid(_weights_of("out", "ct")))
    add("export18", "export of an export whose down_proj scale was doubled: the edit carried (weights as loaded)",
        _export("ed", "fake"), _scale_edit("ct", 2.0), _maybe(_weights_of("out", "ed")))
    add("export18", "export of an export whose down_proj scale was made negative", _export("ed", "fake"),
        _scale_edit("ct", -1.0), _maybe(_weights_of("out", "ed")))
    add("export18", "export of an export whose down_proj scale was made inf", _export("ed", "fake"),
        _scale_edit("ct", float("inf")))
    # W8A8: transformers quantizes the inputs with max|x|/127.5 where quantkit divides by 127 (docs/formats.md:
    # "differ from quantkit's own by a fraction of a rounding step"), so its logits are held to 1e-2, not 1e-4
    for rel, label, tol in [("ct", "compressed-tensors W4", 1e-4), ("asym", "asymmetric compressed-tensors", 1e-4),
                            ("head", "compressed-tensors with lm_head", 1e-4), ("a8", "W8A8", 1e-2)]:
        add("export18", f"the {label} export loaded by its card's line: load_quantized's logits",
            lambda w: None, None, card_loads(rel, tol), api=True)
    for src, fmt in [("ct", "fake"), ("gptq", "compressed-tensors"), ("asym", "fake")]:
        add("export18", f"export {src} -> {fmt}, loaded by the new card's line: load_quantized's logits",
            _export(src, fmt), None, card_loads())
    args, setup = _recipe_cal("overrides:\n  - targets: [down_proj]\n    bits: 8\n  - targets: [o_proj]\n"
                              "    group_size: -1\n")
    add("export18", "a mixed-recipe export loaded by its card's line: load_quantized's logits",
        lambda w, a=args: run_cli(*a(w)), setup, card_loads())


def _both(*checks):
    def check(w: Path, result) -> str | None:
        for c in checks:
            bad = c(w, result)
            if bad:
                return bad
        return None
    check.valid = all(getattr(c, "valid", False) for c in checks)
    return check


def _weights_of(rel: str, ref_rel: str):
    def check(w: Path, result) -> str | None:
        bad = export_ok(rel)(w, result)
        if bad:
            return bad
        a, b = _state(w, rel), _state(w, ref_rel)
        if a.keys() != b.keys():
            return f"other tensors than {ref_rel}'s"
        worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        return None if worst <= 1e-6 else f"weights differ from {ref_rel}'s by {worst:.3g}"
    check.valid = True
    return check


def eighteenth_round() -> list:
    """Round 18's cases (the second half in fault_round18b.py)."""
    from fault_round18b import api_cases, moe_cases

    out = Cases()
    for part in (_recipe_cases, _calib_cases, _set_cases, _vlm_cases, _eval_cases, _qid_cases, _export_cases,
                 api_cases, moe_cases):
        part(out)
    return out
