"""Round 16 of the fault battery (issue #22): a fresh set by another hand, run by fault_battery.py --rounds 16.

Areas none of rounds 1-15 tried: `--help`/`-h` of every command and subcommand (help wins over bad arguments,
prints on stdout, writes nothing) and the top-level's --version; the Python API's effect on the process that
calls it (grad mode, default dtype, threads, environment, working folder, signal handlers, logging, warnings
filters, open files, threads, umask, the global random generators) after a taken, a refused and a failed call;
the loaded model a user hands the API (its training flag, requires_grad, use_cache, hooks left behind, and the
in-place quantized object against its own export); calls in a row in one process (the model's files replaced
between two calls, a refused call before a good one, a VLM before an LM; the CLI in-process likewise), against
a fresh child process; models of the wrong kind (encoders, seq2seq, classifiers, bare base models, a vision
classifier, a VLM where a text-only command is asked) for every command; decoder families and configs the
adapters accept that no round built (GPT-2's Conv1D, GPT-NeoX sequential residual and partial rotary, OPT's
project_in/out and post-norm, Falcon, Bloom's ALiBi, Gemma 2's soft-capping, Cohere's logit scale, Granite's
multipliers, OLMo 2, Phi, StableLM, StarCoder 2, Mistral's sliding window below --seqlen, Llama's yarn, dynamic
and llama3 rope, one-expert MoE) under calibrate (a quantized copy, loading in plain transformers) and plan
(= calibrate --dry-run); sharded exports with a shard or the index deleted and exports whose config was edited in
ways users do (the layer count, vocabulary, model_type relabelled), then eval, export, calibrate and load.
Each case says what a right program does: refuse (one line, exit 2 / one QuantkitError, nothing left behind),
"maybe" (a refusal or a checked success), or "valid" (must be taken, and its result checked).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from fault_battery import (
    EV,
    GPTQ,
    RTN,
    TEXT_IDS,
    Cases,
    _maybe,
    _plain_loads_like,
    child,
    eval_ok,
    export_ok,
    faithful,
    json_edit,
    loss_of,
    plan_equals_dry_run,
    quantize,
    set_ok,
    tree,
    tri,
    valid,
    weights_close,
)
from helpers import config_of, make_tokenizer, tiny_model
from helpers import run_cli as raw_cli

LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=64, max_position_embeddings=64)


def _nothing_new(w: Path) -> str | None:
    """None when the case folder still equals the shared base it was copied from."""
    now, base = tree(w), tree(w.parent / "base")
    if now == base:
        return None
    added = sorted(set(now) - set(base))
    return f"the run changed the folder: added {added[:3]}, changed {[k for k in base if now.get(k) != base[k]][:3]}"


# ---------------------------------------------------------------- A. --help and --version

COMMANDS = [[], ["calibrate"], ["eval"], ["export"], ["plan"], ["importance"], ["demo"], ["qid"], ["qid", "fit"],
            ["qid", "measure"], ["qid", "plot"], ["qid", "predict"], ["qid", "training-level"]]


def _helped(words: list[str]):
    """A check: help of `quantkit WORDS` on stdout (its first line 'Usage: quantkit WORDS'), nothing on stderr,
    nothing written."""
    def check(w: Path, result) -> str | None:
        lines = result.stdout.splitlines()
        # in-process, click names the program after the group's function (main); a shell names it quantkit
        wants = [" ".join([f"Usage: {prog}", *words]) + " " for prog in ("quantkit", "main")]
        if not lines or not any((lines[0] + " ").startswith(want) for want in wants):
            return f"stdout does not start with {wants[0]!r}: {result.stdout[:120]!r}"
        if "Options:" not in result.stdout:
            return "the help lists no options"
        if result.stderr.strip():
            return f"help also wrote to stderr: {result.stderr.strip()[:120]!r}"
        return _nothing_new(w)
    return check


def _help_cases(out: Cases) -> None:
    add = out.add
    for words in COMMANDS:
        label = " ".join(["quantkit", *words])
        for flag in ("--help", "-h"):
            add("help16", f"{label} {flag}", lambda w, a=[*words, flag]: raw_cli(*a), None, valid(_helped(words)))
    for name, args, words, kind in [
        ("calibrate of a missing model --help (help wins)", lambda w: ["calibrate", w / "nope", "--help"],
         ["calibrate"], "valid"),
        ("calibrate --help after the full run's options", lambda w: ["calibrate", w / "model", "--calib",
                                                                     w / "text.txt", *RTN, "-o", w / "out", "--help"],
         ["calibrate"], "valid"),
        ("calibrate --bits 99 --help (a bad value before help)", lambda w: ["calibrate", "--bits", "99", "--help"],
         ["calibrate"], "maybe"),
        ("eval --json --help", lambda w: ["eval", "--json", "--help"], ["eval"], "valid"),
        ("export of ct -o out --help (nothing exported)", lambda w: ["export", w / "ct", "--format", "fake", "-o",
                                                                    w / "out", "--help"], ["export"], "valid"),
        ("importance -o set --help (nothing made)", lambda w: ["importance", w / "model", "--calib", w / "text.txt",
                                                               "-o", w / "set", "--help"], ["importance"], "valid"),
        ("demo -o d --help (nothing trained)", lambda w: ["demo", "-o", w / "d", "--help"], ["demo"], "valid"),
        ("qid fit of a missing table --help", lambda w: ["qid", "fit", w / "nope.csv", "--help"], ["qid", "fit"],
         "valid"),
        ("qid plot -o figs --help (nothing drawn)", lambda w: ["qid", "plot", w / "q.csv", "-o", w / "figs",
                                                               "--help"], ["qid", "plot"], "valid"),
        ("qid --help fit (the group's help)", lambda w: ["qid", "--help", "fit"], ["qid"], "maybe"),
        ("--help calibrate (the top level's help)", lambda w: ["--help", "calibrate"], [], "maybe"),
    ]:
        add("help16", name, lambda w, a=args: raw_cli(*a(w)), None, tri(kind, _helped(words)))

    def version_ok(w: Path, result) -> str | None:
        import quantkit

        if quantkit.__version__ not in result.stdout:
            return f"--version does not print {quantkit.__version__}: {result.stdout[:80]!r}"
        return _nothing_new(w)
    add("help16", "quantkit --version names quantkit.__version__", lambda w: raw_cli("--version"), None,
        valid(version_ok))
    for name, args in [
        ("quantkit help (no such command)", ["help"]),
        ("quantkit calibrate --help=yes (the flag given a value)", ["calibrate", "--help=yes"]),
        ("quantkit -V (no such short option)", ["-V"]),
        ("quantkit calibrate --version (the top level's option after the subcommand)", ["calibrate", "--version"]),
        ("quantkit qid fit --hlep (a typo of --help)", ["qid", "fit", "--hlep"]),
        ("quantkit qid (the group without its subcommand)", ["qid"]),
    ]:
        add("help16", name, lambda w, a=args: raw_cli(*a))


# ---------------------------------------------------------------- B. what an API call leaves in the process

def _open_files() -> list[str]:
    """What the process's file descriptors point at, less multiprocessing's own once-per-process pieces (its
    resource tracker's pipe, its shared-memory heap arenas /dev/shm/pym-*), which the first spawn starts and
    keeps for the process's life by design."""
    from multiprocessing import resource_tracker

    tracker = getattr(resource_tracker._resource_tracker, "_fd", None)
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own descriptor, closed by now
            continue
        if int(fd) != tracker and not target.startswith("/dev/shm/pym-"):
            found.append(target)
    return sorted(found)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _process_state() -> dict:
    """What a library call must leave as it found it in its caller's process."""
    import transformers

    gc.collect()
    return {
        "torch grad mode": torch.is_grad_enabled(),
        "torch inference mode": torch.is_inference_mode_enabled(),
        "torch default dtype": str(torch.get_default_dtype()),
        "torch threads": torch.get_num_threads(),
        "torch deterministic algorithms": torch.are_deterministic_algorithms_enabled(),
        "torch anomaly detection": torch.is_anomaly_enabled(),
        "torch float32 matmul precision": torch.get_float32_matmul_precision(),
        "working folder": os.getcwd(),
        "environment": dict(os.environ),
        "umask": _umask(),
        "SIGINT handler": signal.getsignal(signal.SIGINT),
        "SIGTERM handler": signal.getsignal(signal.SIGTERM),
        "SIGHUP handler": signal.getsignal(signal.SIGHUP),
        "transformers verbosity": transformers.logging.get_verbosity(),
        "root logger": (logging.getLogger().level, len(logging.getLogger().handlers)),
        "warnings filters": [repr(f) for f in warnings.filters],
        "sys.path": list(sys.path),
        "tempfile.tempdir": tempfile.tempdir,
        "recursion limit": sys.getrecursionlimit(),
        "python threads": sorted(t.name for t in threading.enumerate()),
        "open files": _open_files(),
        "sys.excepthook": sys.excepthook,
    }


def _rng_state() -> dict:
    import numpy

    return {"torch's global generator": hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest(),
            "python's random": hashlib.sha256(repr(random.getstate()).encode()).hexdigest(),
            "numpy's global generator": hashlib.sha256(repr(numpy.random.get_state()).encode()).hexdigest()}


def _probed(call, state=_process_state):
    """A run: `call(w)` between two snapshots of `state`; returns what it gave, its QuantkitError (caught) and the
    snapshot entries that changed (a non-QuantkitError propagates: the battery's traceback)."""
    from quantkit.errors import QuantkitError

    def run(w: Path) -> dict:
        before = state()
        value = error = None
        try:
            value = call(w)
        except QuantkitError as err:
            error = err
        after = state()
        changed = []
        for key in before:
            if before[key] == after[key]:
                continue
            if isinstance(before[key], dict):
                keys = sorted(k for k in set(before[key]) | set(after[key]) if before[key].get(k) != after[key].get(k))
                changed.append(f"{key} ({', '.join(f'{k}: {before[key].get(k)!r} -> {after[key].get(k)!r}' for k in keys[:3])})")
            else:
                changed.append(f"{key} ({before[key]!r} -> {after[key]!r})"[:160])
        return {"value": value, "error": error, "changed": changed}
    return run


def _left_as_found(then_check=None, refused: bool = False):
    """A check of a _probed run: taken (then_check on it) or refused with one QuantkitError line (refused), and
    nothing in the snapshot changed."""
    def check(w: Path, result) -> str | None:
        error = result["error"]
        if refused:
            if error is None:
                return "taken: the input was to be refused"
            if "\n" in str(error):
                return f"refused in more than one line: {str(error)[:160]!r}"
        elif error is not None:
            return f"refused: {str(error)[:200]}"
        if result["changed"]:
            return "the call changed its caller's process: " + "; ".join(result["changed"])[:400]
        return then_check(w, result["value"]) if then_check and not refused else None
    check.valid = True
    return check


def _nan_model(w: Path) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(w / "model", w / "nanm")
    state = load_file(w / "nanm" / "model.safetensors")
    state["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(state, w / "nanm" / "model.safetensors", metadata={"format": "pt"})


def _loaded(w: Path, rel: str = "model"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(w / rel)


def _ret_ok(w: Path, value) -> str | None:
    return export_ok()(w, value)


def _state_cases(out: Cases) -> None:
    import quantkit

    add = out.add
    calls = [
        ("quantize RTN of a path", lambda w: quantize(w), None, False),
        ("quantize GPTQ of a path", lambda w: quantize(w, method="gptq"), None, False),
        ("quantize TLQ (a gradient pass) of a path", lambda w: quantize(w, method="tlq"), None, False),
        ("quantize with the default method (TLQ with the FP target)", lambda w: quantize(w, method=None), None, False),
        ("quantize GPTQ of a loaded model (in place)", lambda w: quantize(w, model=_loaded(w), method="gptq"), None,
         False),
        ("quantize GPTQ low_memory=True (streamed)", lambda w: quantize(w, method="gptq", low_memory=True), None,
         False),
        ("quantize act_bits=8 (W8A8)", lambda w: quantize(w, bits=8, group_size=-1, act_bits=8), None, False),
        ("quantize output_dir=None (the model returned)", lambda w: quantize(w, output_dir=None), None, False),
        ("quantize GPTQ nproc=2 (two ranks spawned)", lambda w: quantize(w, method="gptq", nproc=2), None, False),
        ("load_quantized of the compressed-tensors export", lambda w: quantkit.load_quantized(w / "ct"), None, False),
        ("load_quantized of the GPTQ export", lambda w: quantkit.load_quantized(w / "gptq"), None, False),
        ("a quantize refused up front (data file missing)", lambda w: quantize(w, data=str(w / "nope.txt")), None,
         True),
        ("a quantize refused after loading (NaN in a weight)", lambda w: quantize(w, model=str(w / "nanm")),
         _nan_model, True),
        ("a quantize refused (group_size 48 divides no width)", lambda w: quantize(w, group_size=48), None, True),
        ("a load_quantized refused (a plain model folder's text file)", lambda w: quantkit.load_quantized(
            w / "text.txt"), None, True),
    ]
    for name, call, setup, refused in calls:
        taken_check = None if refused else (
            (lambda w, v: None) if name.startswith("load_quantized") or "output_dir=None" in name else _ret_ok)
        add("state16", f"{name}: the caller's process left as found (grad mode, dtype, threads, env, cwd, signals, "
            "logging, warnings, files, threads)", _probed(call), setup,
            _left_as_found(taken_check, refused), api=True)
    for name, call, setup, refused in calls[:5] + calls[11:13]:
        add("state16", f"{name}: the global random generators (torch, random, numpy) left as found",
            _probed(call, _rng_state), setup, _left_as_found(None, refused), api=True)


# ---------------------------------------------------------------- C. the loaded model a user hands the API

def _hooks_on(model) -> list[str]:
    return [name for name, m in model.named_modules()
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or getattr(m, "_forward_hooks_with_kwargs",
                                                                                          None)]


def _handed(prepare, **kw):
    """A run: the model loaded, `prepare(model)` (the user's own state), then quantize(model) in place; returns
    (model, what the user set, the result)."""
    def run(w: Path):
        model = _loaded(w)
        before = prepare(model)
        result = quantize(w, model=model, **kw)
        return model, before, result
    return run


def _flag_kept(read):
    """A check: read(model) after the call equals what it was before (the user's setting restored), and the
    export loads."""
    def check(w: Path, result) -> str | None:
        model, before, _ = result
        after = read(model)
        if after != before:
            return f"the user's model changed: {before!r} before the call, {after!r} after"
        return export_ok()(w, result)
    check.valid = True
    return check


def _no_hooks(w: Path, result) -> str | None:
    model, _, _ = result
    left = _hooks_on(model)
    return f"hooks left on the user's model: {left[:3]}" if left else export_ok()(w, result)


def _in_place_is_export(w: Path, result) -> str | None:
    """The user's model object after the call computes what the export does (it was quantized in place)."""
    import quantkit

    model, _, _ = result
    model.eval()
    with torch.no_grad():
        a = model(torch.tensor(TEXT_IDS)).logits
        b = quantkit.load_quantized(w / "out").eval()(torch.tensor(TEXT_IDS)).logits
    diff = (a - b).abs().max().item()
    return None if diff <= 1e-4 else f"the in-place model's logits differ from its export's by {diff:.3g}"


def _grads(model) -> dict:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _handed_cases(out: Cases) -> None:
    add = out.add

    def train(model):
        model.train()
        return model.training

    def evalm(model):
        model.eval()
        return model.training

    def frozen(model):
        for p in model.parameters():
            p.requires_grad_(False)
        return _grads(model)

    def half_frozen(model):
        for p in model.model.layers[0].parameters():
            p.requires_grad_(False)
        return _grads(model)

    def cache_on(model):
        model.config.use_cache = True
        return model.config.use_cache

    def cache_off(model):
        model.config.use_cache = False
        return model.config.use_cache

    for method in ("rtn", "gptq", "tlq"):
        add("model16", f"API {method}: a model in eval mode stays in eval mode", _handed(evalm, method=method),
            None, _flag_kept(lambda m: m.training), api=True)
        add("model16", f"API {method}: a model in train mode (a fine-tuning script's) stays in train mode",
            _handed(train, method=method), None, _flag_kept(lambda m: m.training), api=True)
        add("model16", f"API {method}: every parameter frozen (requires_grad False) stays frozen",
            _handed(frozen, method=method), None, _flag_kept(_grads), api=True)
        add("model16", f"API {method}: layer 0 frozen, the rest trainable: the flags kept",
            _handed(half_frozen, method=method), None, _flag_kept(_grads), api=True)
        add("model16", f"API {method}: no hooks left on the user's model", _handed(evalm, method=method), None,
            valid(_no_hooks), api=True)
        add("model16", f"API {method}: the in-place model computes its export's logits", _handed(evalm, method=method),
            None, valid(_in_place_is_export), api=True)
    add("model16", "API gptq: config.use_cache True stays True", _handed(cache_on, method="gptq"), None,
        _flag_kept(lambda m: m.config.use_cache), api=True)
    add("model16", "API gptq: config.use_cache False stays False", _handed(cache_off, method="gptq"), None,
        _flag_kept(lambda m: m.config.use_cache), api=True)
    add("model16", "API gptq low_memory: a loaded model's training flag kept", _handed(train, method="gptq",
                                                                                      low_memory=True), None,
        _maybe(_flag_kept(lambda m: m.training)), api=True)


# ---------------------------------------------------------------- D. calls in a row in one process

def _reseeded(w: Path, rel: str = "model", seed: int = 3) -> None:
    """The model folder's weights replaced by another seed's (same config, same tokenizer)."""
    from safetensors.torch import save_file

    model = tiny_model("llama", seed, **LLAMA)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, w / rel / "model.safetensors",
              metadata={"format": "pt"})


def _child_ref(*args):
    """The reference: `quantkit calibrate ARGS -o ref` in a fresh child process."""
    return lambda w: child(w, *args(w), "-o", w / "ref")


def _same_weights_as_child(args, rel: str = "out", shared: bool = False):
    """A check: load_quantized(rel) equals the export of the same calibrate run in a fresh child process (shared:
    the run is on the base's own unchanged files, so one child's export, kept beside the case folders, serves
    every such case)."""
    def check(w: Path, result) -> str | None:
        import quantkit

        bad = export_ok(rel)(w, result)
        if bad:
            return bad
        ref = w.parent / "ref16-fresh" if shared else w / "ref"
        if not ref.is_dir():
            done = child(w, *args(w), "-o", ref)
            if done.exit_code != 0:
                return f"the child's reference run failed: {done.stderr[-200:]}"
        a, b = quantkit.load_quantized(w / rel).state_dict(), quantkit.load_quantized(ref).state_dict()
        if a.keys() != b.keys():
            return "other tensors than the fresh process's export"
        worst = max(((a[k].float() - b[k].float()).abs().max().item(), k) for k in a)
        return None if worst[0] <= 1e-6 else f"{worst[1]} differs from a fresh process's run by {worst[0]:.3g}"
    check.valid = True
    return check


def _cal_args(method=RTN, model: str = "model"):
    return lambda w: ["calibrate", w / model, "--calib", w / "text.txt", *method]


def _permuted_tokenizer(w: Path) -> None:
    """The model's tokenizer re-saved with its word ids permuted (same words, other ids)."""
    from helpers import WORDS
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(reversed(WORDS))
    vocab = {t: i for i, t in enumerate(["<unk>", "<eos>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (w / "model" / name).unlink(missing_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(w / "model")


def _row_cases(out: Cases) -> None:
    add = out.add

    def api_then(first, between, **kw):
        def run(w: Path):
            try:
                first(w)
            except Exception:  # noqa: BLE001 - the first call's own outcome is not the case
                pass
            if between:
                between(w)
            return quantize(w, **kw)
        return run

    gptq = _cal_args(GPTQ)
    for name, first, between, kw, args in [
        ("quantize, the model's weights replaced, quantize again: the new weights'",
         lambda w: quantize(w, output_dir=str(w / "o1"), method="gptq"), _reseeded, dict(method="gptq"), gptq),
        ("quantize, the tokenizer's ids permuted, quantize again: the new tokenizer's",
         lambda w: quantize(w, output_dir=str(w / "o1"), method="gptq"), _permuted_tokenizer, dict(method="gptq"),
         gptq),
        ("quantize, the text file rewritten, quantize again: the new text's",
         lambda w: quantize(w, output_dir=str(w / "o1"), method="gptq"),
         lambda w: (w / "text.txt").write_text(" ".join(f"w{(i * 7) % 60}" for i in range(2000))),
         dict(method="gptq"), gptq),
        ("a refused quantize (NaN weight), then the good model: equals a fresh process",
         lambda w: (_nan_model(w), quantize(w, model=str(w / "nanm"), method="gptq")), None, dict(method="gptq"),
         gptq),
        ("a refused quantize (group 48), then group 32: equals a fresh process",
         lambda w: quantize(w, group_size=48, method="gptq"), None, dict(method="gptq"), gptq),
        ("a quantize of the VLM, then the LM: equals a fresh process",
         lambda w: _vlm_call(w), None, dict(method="gptq"), gptq),
        ("a TLQ quantize, then GPTQ: equals a fresh process",
         lambda w: quantize(w, output_dir=str(w / "o1"), method="tlq"), None, dict(method="gptq"), gptq),
        ("a low_memory quantize, then in memory: equals a fresh process",
         lambda w: quantize(w, output_dir=str(w / "o1"), method="gptq", low_memory=True), None, dict(method="gptq"),
         gptq),
        ("a W8A8 quantize, then W4 GPTQ: equals a fresh process",
         lambda w: quantize(w, output_dir=str(w / "o1"), bits=8, group_size=-1, act_bits=8), None,
         dict(method="gptq"), gptq),
        ("a quantize of a loaded model, then of its path: equals a fresh process",
         lambda w: quantize(w, model=_loaded(w), output_dir=str(w / "o1"), method="gptq"), None,
         dict(method="gptq"), gptq),
    ]:
        add("row16", f"API: {name}", api_then(first, between, **kw), None,
            _same_weights_as_child(args, shared=between is None), api=True)

    def cli_then(first, between, second):
        def run(w: Path):
            raw_cli(*first(w))
            if between:
                between(w)
            return raw_cli(*second(w))
        return run

    out_gptq = lambda w: [*gptq(w), "-o", w / "out"]  # noqa: E731
    for name, first, between in [
        ("calibrate, the model's weights replaced, calibrate again: the new weights'",
         lambda w: [*gptq(w), "-o", w / "o1"], _reseeded),
        ("calibrate, the tokenizer's ids permuted, calibrate again", lambda w: [*gptq(w), "-o", w / "o1"],
         _permuted_tokenizer),
        ("a refused calibrate (--bits 5), then the good one", lambda w: [*gptq(w), "--bits", "5", "-o", w / "o1"],
         None),
        ("an eval of the model, then calibrate", lambda w: ["eval", w / "model", "--data", w / "text.txt", *EV], None),
        ("a TLQ importance, then GPTQ calibrate", lambda w: ["importance", w / "model", "--calib", w / "text.txt",
                                                             "--nsamples", "2", "--seqlen", "16", "-o", w / "set"],
         None),
    ]:
        add("row16", f"CLI in one process: {name}", cli_then(first, between, out_gptq), None,
            _same_weights_as_child(gptq, shared=between is None))

    def eval_fresh(rel: str):
        def check(w: Path, result) -> str | None:
            bad = eval_ok(w, result)
            if bad:
                return bad
            done = child(w, "eval", w / rel, "--data", w / "text.txt", *EV)
            if done.exit_code != 0:
                return f"the child's eval failed: {done.stderr[-200:]}"
            a, b = loss_of(result.output), loss_of(done.stdout + done.stderr)
            return None if abs(a - b) <= 1e-5 else f"loss {a} vs a fresh process's {b}"
        check.valid = True
        return check

    ev_model = lambda w: ["eval", w / "model", "--data", w / "text.txt", *EV]  # noqa: E731
    add("row16", "CLI in one process: eval, the model's weights replaced, eval again: the new weights' loss",
        cli_then(ev_model, _reseeded, ev_model), None, eval_fresh("model"))
    add("row16", "CLI in one process: eval, the tokenizer's ids permuted, eval again: the new tokenizer's loss",
        cli_then(ev_model, _permuted_tokenizer, ev_model), None, eval_fresh("model"))
    add("row16", "CLI in one process: eval of ct, ct replaced by the GPTQ export's re-export, eval again",
        cli_then(lambda w: ["eval", w / "ct", "--data", w / "text.txt", *EV],
                 lambda w: raw_cli("export", w / "gptq", "--format", "compressed-tensors", "-o", w / "ct",
                                   "--overwrite"),
                 lambda w: ["eval", w / "ct", "--data", w / "text.txt", *EV]), None, eval_fresh("ct"))

    def load_twice(w: Path):
        import quantkit

        quantkit.load_quantized(w / "o")
        done = raw_cli("export", w / "gptq", "--format", "fake", "-o", w / "o", "--overwrite")
        assert done.exit_code == 0, done.output
        return quantkit.load_quantized(w / "o")

    def same_as_copy(w: Path, model) -> str | None:
        import quantkit

        shutil.copytree(w / "o", w / "copy")
        a, b = model.state_dict(), quantkit.load_quantized(w / "copy").state_dict()
        worst = max((a[k].float() - b[k].float()).abs().max().item() for k in b)
        return None if a.keys() == b.keys() and worst == 0 else f"the second load differs from a copy's ({worst:.3g})"
    add("row16", "API: load_quantized(o), o overwritten with another export, load_quantized(o): the new one",
        load_twice, lambda w: raw_cli("export", w / "ct", "--format", "fake", "-o", w / "o"), valid(same_as_copy),
        api=True)


def _vlm_call(w: Path):
    from PIL import Image

    records = []
    for line in (w / "vl" / "data.jsonl").read_text().splitlines():
        r = json.loads(line)
        r["image"] = Image.open(w / "vl" / r["image"]).convert("RGB")
        records.append(r)
    return quantize(w, model=str(w / "vlm"), data=records, seqlen=256, output_dir=str(w / "o1"), method="rtn")


# ---------------------------------------------------------------- E. models of the wrong kind

def _save(rel: str, make, tokenizer: bool = True):
    def setup(w: Path) -> None:
        torch.manual_seed(0)
        make().save_pretrained(w / rel)
        if tokenizer:
            make_tokenizer().save_pretrained(w / rel)
    return setup


def _wrong_kinds() -> dict:
    import transformers as t

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=64,
                 max_position_embeddings=64)
    return {
        "a BERT masked LM (an encoder)": _save("k", lambda: t.BertForMaskedLM(config_of("bert", **small))),
        "a RoBERTa classifier (an encoder)": _save("k", lambda: t.RobertaForSequenceClassification(config_of(
            "roberta", **{**small, "max_position_embeddings": 70}, num_labels=2))),
        "a T5 (seq2seq)": _save("k", lambda: t.T5ForConditionalGeneration(config_of(
            "t5", d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=64))),
        "a BART (seq2seq, whose decoder transformers can build alone)": _save("k", lambda: t.BartForConditionalGeneration(
            config_of("bart", d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                      decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64,
                      max_position_embeddings=64))),
        "a Llama sequence classifier (no lm_head)": _save("k", lambda: t.LlamaForSequenceClassification(config_of(
            "llama", **LLAMA, num_labels=2, pad_token_id=0))),
        "a bare LlamaModel (an embedding model, no head)": _save("k", lambda: t.LlamaModel(config_of("llama", **LLAMA))),
        "a ViT image classifier (no tokenizer)": _save("k", lambda: t.ViTForImageClassification(config_of(
            "vit", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=8)), tokenizer=False),
    }


def _kind_cases(out: Cases) -> None:
    add = out.add
    commands = {
        "calibrate": lambda w: raw_cli("calibrate", w / "k", "--calib", w / "text.txt", *RTN, "-o", w / "out"),
        "eval": lambda w: raw_cli("eval", w / "k", "--data", w / "text.txt", *EV),
        "importance": lambda w: raw_cli("importance", w / "k", "--calib", w / "text.txt", "--nsamples", "2",
                                        "--seqlen", "16", "-o", w / "set"),
        "plan": lambda w: raw_cli("plan", w / "k", "--calib", w / "text.txt", *RTN),
        "export (a model, not a quantkit output)": lambda w: raw_cli("export", w / "k", "--format", "fake", "-o",
                                                                      w / "out"),
        "qid measure": lambda w: raw_cli("qid", "measure", w / "k", "--eval", w / "text.txt", "--eval-tokens", "64",
                                         "--eval-seqlen", "16", "--methods", "rtn", "--bits", "4", "--nsamples", "2",
                                         "--calib-seqlen", "16", "--group-size", "32", "--tokens", "1e9",
                                         "--no-progress", "-o", w / "m.csv"),
    }
    for kind, setup in _wrong_kinds().items():
        for command, run in commands.items():
            if command.startswith(("export", "qid")) and "BERT" not in kind and "classifier (no" not in kind:
                continue  # the readers every command shares: two kinds suffice for these two
            add("kind16", f"{command} of {kind}", run, setup)
        add("kind16", f"API quantize of {kind} (its folder)", lambda w: quantize(w, model=str(w / "k")), setup,
            api=True)
    import quantkit

    add("kind16", "API load_quantized of a plain (not quantized) model folder", lambda w: quantkit.load_quantized(
        w / "model"), None, _maybe(lambda w, m: None if m is not None else "nothing loaded"), api=True)
    add("kind16", "demo --model of a BERT masked LM", lambda w: raw_cli(
        "demo", "--model", w / "k", "--data", w / "text.txt", "--seqlen", "16", "--nsamples", "2", "--format",
        "fake", "-o", w / "d"), _wrong_kinds()["a BERT masked LM (an encoder)"])
    # a VLM where a text-only command is asked: its language model on text is a fair reading, or a refusal
    add("kind16", "eval of the VLM on text (its language model)", lambda w: raw_cli(
        "eval", w / "vlm", "--data", w / "text.txt", *EV), None, _maybe(eval_ok))
    add("kind16", "demo --model the VLM", lambda w: raw_cli(
        "demo", "--model", w / "vlm", "--data", w / "text.txt", "--seqlen", "16", "--nsamples", "2", "--format",
        "fake", "-o", w / "d"), None, _maybe(lambda w, r: None if (w / "d").is_dir() else "no d/"))
    add("kind16", "qid measure of the VLM on text", lambda w: raw_cli(
        "qid", "measure", w / "vlm", "--eval", w / "text.txt", "--eval-tokens", "64", "--eval-seqlen", "16",
        "--methods", "rtn", "--bits", "4", "--nsamples", "2", "--calib-seqlen", "16", "--group-size", "32",
        "--tokens", "1e9", "--no-progress", "-o", w / "m.csv"), None,
        _maybe(lambda w, r: None if len((w / "m.csv").read_text().splitlines()) == 2 else "not one row"))
    add("kind16", "importance of the VLM on plain text", lambda w: raw_cli(
        "importance", w / "vlm", "--calib", w / "text.txt", "--nsamples", "2", "--seqlen", "16", "-o", w / "set"),
        None, _maybe(lambda w, r: None if (w / "set" / "manifest.json").is_file() else "no manifest"))


# ---------------------------------------------------------------- F. decoder families and configs never built

def _fam(model_type: str, tie: bool | None = None, **fields):
    """A setup: a tiny `model_type` causal LM at m/ (its own fields, hidden 32/64, vocabulary 64), the word
    tokenizer beside it."""
    def setup(w: Path) -> None:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        config = config_of(model_type, **fields)
        if tie is not None:
            config.tie_word_embeddings = tie
        AutoModelForCausalLM.from_config(config).save_pretrained(w / "m")
        make_tokenizer().save_pretrained(w / "m")
    return setup


def _families() -> dict:
    ll = LLAMA
    return {
        "gpt2 (Conv1D, tied, biases)": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=64,
                                                     bos_token_id=1, eos_token_id=1)),
        "gpt2 n_inner 96 (an MLP 3x wide, not 4x)": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                                 vocab_size=64, n_inner=96, bos_token_id=1,
                                                                 eos_token_id=1)),
        "gpt2 scale_attn_by_inverse_layer_idx and reorder_and_upcast_attn": ("gpt2", dict(
            n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=64, scale_attn_by_inverse_layer_idx=True,
            reorder_and_upcast_attn=True, bos_token_id=1, eos_token_id=1)),
        "gpt_neox sequential residual (use_parallel_residual false)": ("gpt_neox", dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
            max_position_embeddings=64, use_parallel_residual=False, bos_token_id=1, eos_token_id=1)),
        "gpt_neox rotary_pct 0.25 (partial rotary)": ("gpt_neox", dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
            max_position_embeddings=64, rotary_pct=0.25, bos_token_id=1, eos_token_id=1)),
        "opt word_embed_proj_dim 16 (project_in/project_out linears)": ("opt", dict(
            hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
            max_position_embeddings=64, word_embed_proj_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=1)),
        "opt do_layer_norm_before false (post-norm, as opt-350m)": ("opt", dict(
            hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
            max_position_embeddings=64, do_layer_norm_before=False, pad_token_id=0, bos_token_id=1,
            eos_token_id=1)),
        "opt without biases (enable_bias false)": ("opt", dict(
            hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
            max_position_embeddings=64, enable_bias=False, pad_token_id=0, bos_token_id=1, eos_token_id=1)),
        "falcon new_decoder_architecture (grouped KV)": ("falcon", dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2, vocab_size=64,
            new_decoder_architecture=True, bos_token_id=1, eos_token_id=1)),
        "falcon alibi and sequential attention (parallel_attn false)": ("falcon", dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=64, alibi=True,
            parallel_attn=False, bos_token_id=1, eos_token_id=1)),
        "bloom (ALiBi, fused query_key_value)": ("bloom", dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=64,
                                                              bos_token_id=1, eos_token_id=1)),
        "gemma2 (soft-capping, sliding window 8, head_dim 16)": ("gemma2", dict(
            **{**ll, "head_dim": 16}, sliding_window=8, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
            pad_token_id=0, bos_token_id=1, eos_token_id=1)),
        "cohere (logit_scale 0.0625, tied)": ("cohere", dict(**ll, logit_scale=0.0625, pad_token_id=0,
                                                              bos_token_id=1, eos_token_id=1)),
        "granite (embedding, residual, attention and logits multipliers)": ("granite", dict(
            **ll, embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0078125,
            logits_scaling=8.0, pad_token_id=0, bos_token_id=1, eos_token_id=1)),
        "olmo2 (q/k norms)": ("olmo2", dict(**ll, pad_token_id=0, bos_token_id=1, eos_token_id=1)),
        "phi (partial rotary 0.5, dense, q/k layernorm)": ("phi", dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
            max_position_embeddings=64, partial_rotary_factor=0.5, qk_layernorm=True, bos_token_id=1,
            eos_token_id=1)),
        "stablelm (qkv bias, parallel residual)": ("stablelm", dict(
            **ll, use_qkv_bias=True, use_parallel_residual=True, bos_token_id=1, eos_token_id=1)),
        "starcoder2 (biases, sliding window 8)": ("starcoder2", dict(**ll, sliding_window=8, use_bias=True,
                                                                      bos_token_id=1, eos_token_id=1)),
        "mistral sliding_window 4 (below --seqlen 16)": ("mistral", dict(**ll, sliding_window=4)),
        "llama rope yarn factor 4 (original 16 positions)": ("llama", dict(**ll, rope_parameters={
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0})),
        "llama rope dynamic factor 2": ("llama", dict(**ll, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                            "rope_theta": 10000.0})),
        "llama rope llama3 (factor 8, original 16 positions)": ("llama", dict(**ll, rope_parameters={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16, "rope_theta": 500000.0})),
        "llama head_dim 24 (q_proj 96 wide on hidden 32)": ("llama", dict(**ll, head_dim=24)),
        "llama tied with attention and MLP biases": ("llama", dict(**ll, tie_word_embeddings=True, attention_bias=True,
                                                                   mlp_bias=True)),
        "mixtral one expert, top-1": ("mixtral", dict(**ll, num_local_experts=1, num_experts_per_tok=1,
                                                       sliding_window=None)),
        "qwen3_moe one expert, top-1": ("qwen3_moe", dict(**ll, num_experts=1, num_experts_per_tok=1,
                                                           moe_intermediate_size=32)),
    }


def _fam_cases(out: Cases) -> None:
    add = out.add
    for index, (name, (model_type, fields)) in enumerate(_families().items()):
        setup = _fam(model_type, **fields)
        # GPT-2's Conv1D layers and Falcon's FalconLinear: compressed-tensors is refused for them (its loaders quantize
        # nn.Linear only; transformers' Falcon code reads a packed linear's weight as it loads), and gptq/gptq_v2 need
        # gptqmodel to load in plain transformers: the fake format holds for both checks
        fmt = ["--format", "fake"] if model_type in ("gpt2", "falcon") else []
        args = lambda w, m=RTN, f=fmt: ["calibrate", w / "m", "--calib", w / "text.txt", *m, *f, "-o", w / "out"]  # noqa: E731
        moe = "expert" in name
        add("fam16", f"{name}: RTN export is a quantized copy", lambda w, a=args: raw_cli(*a(w)), setup,
            valid(faithful("m", quantized="expert" if moe else None)))
        add("fam16", f"{name}: GPTQ export loads in plain transformers as load_quantized reads it",
            lambda w, a=args: raw_cli(*a(w, GPTQ)), setup, valid(_plain_loads_like("out")))
        if index % 2 == 0:
            add("fam16", f"{name}: plan --json equals calibrate --dry-run --json", lambda w, f=fmt: raw_cli(
                "plan", w / "m", "--calib", w / "text.txt", *GPTQ, *f, "--json"), setup,
                valid(plan_equals_dry_run("m", *GPTQ, *fmt)))
    # plan promises what calibrate with the same options needs: options calibrate refuses are refused by plan too
    gpt2 = _families()["gpt2 (Conv1D, tied, biases)"]
    narrow = ("llama", dict(**LLAMA, head_dim=4))  # o_proj reads 16 columns: group 32 divides nothing there
    falcon = _families()["falcon new_decoder_architecture (grouped KV)"]
    for name, (model_type, fields), command in [
        ("calibrate of falcon in the default format (compressed-tensors, whose export transformers cannot load)",
         falcon, ["calibrate"]),
        ("plan of falcon in the default format (compressed-tensors, which calibrate refuses for FalconLinear)", falcon,
         ["plan"]),
        ("plan of gpt2 in the default format (compressed-tensors, which calibrate refuses for Conv1D)", gpt2,
         ["plan"]),
        ("plan with group 32 where o_proj is 16 wide (calibrate refuses the group)", narrow, ["plan"]),
        ("calibrate --dry-run with group 32 where o_proj is 16 wide (the run refuses the group)", narrow,
         ["calibrate", "--dry-run"]),
    ]:
        add("fam16", name, lambda w, c=command: raw_cli(c[0], w / "m", "--calib", w / "text.txt", *GPTQ, *c[1:],
                                                        *(["-o", w / "out"] if c[0] == "calibrate" else [])),
            _fam(model_type, **fields))


# ---------------------------------------------------------------- G. exports edited before eval, export, load

def _sharded(w: Path) -> list[str]:
    done = raw_cli("export", w / "ct", "--format", "compressed-tensors", "--max-shard-size", "2KB", "-o", w / "sh")
    assert done.exit_code == 0, done.output
    return sorted(p.name for p in (w / "sh").glob("*.safetensors"))


def _shard_gone(w: Path) -> None:
    shards = _sharded(w)
    assert len(shards) > 2, shards
    (w / "sh" / shards[1]).unlink()


def _index_gone(w: Path) -> None:
    _sharded(w)
    (w / "sh" / "model.safetensors.index.json").unlink()


def _index_stale(w: Path) -> None:
    """The index names one more shard than there are (a copy cut short by a crash)."""
    _sharded(w)
    path = w / "sh" / "model.safetensors.index.json"
    doc = json.loads(path.read_text())
    key = sorted(doc["weight_map"])[0]
    doc["weight_map"][key] = "model-00099-of-00099.safetensors"
    path.write_text(json.dumps(doc))


def _export_cases(out: Cases) -> None:
    import quantkit

    add = out.add
    readers = {
        "eval": lambda w, rel: raw_cli("eval", w / rel, "--data", w / "text.txt", *EV),
        "export": lambda w, rel: raw_cli("export", w / rel, "--format", "fake", "-o", w / "out"),
        "calibrate (a quantized export as the model)": lambda w, rel: raw_cli(
            "calibrate", w / rel, "--calib", w / "text.txt", *RTN, "-o", w / "out"),
        "qid measure": lambda w, rel: raw_cli(
            "qid", "measure", w / rel, "--eval", w / "text.txt", "--eval-tokens", "64", "--eval-seqlen", "16",
            "--methods", "rtn", "--bits", "4", "--nsamples", "2", "--calib-seqlen", "16", "--group-size", "32",
            "--tokens", "1e9", "--no-progress", "-o", w / "m.csv"),
    }
    edits = [
        ("a sharded export with its second shard deleted", "sh", _shard_gone),
        ("a sharded export whose index.json is deleted (shards kept)", "sh", _index_gone),
        ("a sharded export whose index names a shard that is not there", "sh", _index_stale),
        ("ct whose config.json num_hidden_layers is 1 (its layer 1 tensors orphaned)", "ct",
         json_edit("ct/config.json", lambda d: d.update(num_hidden_layers=1))),
        ("ct whose config.json vocab_size is 128 (the embedding is 64 rows)", "ct",
         json_edit("ct/config.json", lambda d: d.update(vocab_size=128))),
        ("ct whose config.json hidden_size is 64 (the weights are 32 wide)", "ct",
         json_edit("ct/config.json", lambda d: d.update(hidden_size=64))),
    ]
    for label, rel, setup in edits:
        for command, run in readers.items():
            add("export16", f"{command} of {label}", lambda w, r=run, x=rel: r(w, x), setup)
        add("export16", f"API load_quantized of {label}", lambda w, x=rel: quantkit.load_quantized(w / x), setup,
            api=True)
    # the same weights relabelled as a family with identical layers (a Llama saved as Mistral): read alike
    relabel = json_edit("ct/config.json", lambda d: d.update(model_type="mistral", architectures=[
        "MistralForCausalLM"], sliding_window=None))
    add("export16", "export of ct relabelled mistral (the same layers): equals ct's weights", lambda w: raw_cli(
        "export", w / "ct", "--format", "fake", "-o", w / "out"), relabel, _maybe(weights_close("out", "ct", 1e-6)))
    add("export16", "eval of ct relabelled mistral", lambda w: raw_cli("eval", w / "ct", "--data", w / "text.txt", *EV),
        relabel, _maybe(eval_ok))
    add("export16", "eval of the sharded export (2KB shards, untouched) equals eval of ct", lambda w: raw_cli(
        "eval", w / "sh", "--data", w / "text.txt", *EV), lambda w: _sharded(w), valid(_eval_equal("ct")))
    add("export16", "export of the sharded export to one file equals ct", lambda w: raw_cli(
        "export", w / "sh", "--format", "compressed-tensors", "-o", w / "out"), lambda w: _sharded(w),
        valid(weights_close("out", "ct", 0.0)))
    add("export16", "importance of the ct export (a quantized model as the set's model)", lambda w: raw_cli(
        "importance", w / "ct", "--calib", w / "text.txt", "--nsamples", "2", "--seqlen", "16", "-o", w / "set"),
        None, _maybe(set_ok()))


def _eval_equal(ref_rel: str):
    def check(w: Path, result) -> str | None:
        bad = eval_ok(w, result)
        if bad:
            return bad
        other = raw_cli("eval", w / ref_rel, "--data", w / "text.txt", *EV)
        a, b = loss_of(result.output), loss_of(other.output)
        return None if abs(a - b) <= 1e-6 else f"loss {a} vs {ref_rel}'s {b}"
    return check


def sixteenth_round() -> list:
    """Round 16's cases."""
    out = Cases()
    _help_cases(out)
    _state_cases(out)
    _handed_cases(out)
    _row_cases(out)
    _kind_cases(out)
    _fam_cases(out)
    _export_cases(out)
    return out
