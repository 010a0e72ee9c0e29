"""The demo: train (or load) a small LM, quantize it with RTN and GPTQ, export, reload, evaluate, tabulate."""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from quantkit.errors import QuantkitError
from quantkit.fsutil import atomic_dir, atomic_file, check_output_dir
from quantkit.quant.methods import method_for


def pick_group_size(widths: Sequence[int], candidates: Sequence[int] = (128, 64, 32)) -> int:
    """The largest candidate group size dividing every input width, else -1 (per-channel)."""
    for g in candidates:
        if all(w % g == 0 for w in widths):
            return g
    return -1


def _linear_widths(model: torch.nn.Module) -> list[int]:
    from quantkit.models import adapter_for

    adapter = adapter_for(model)
    widths = set()
    for layer in adapter.decoder_layers(model):
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                widths.add(module.in_features)
    return sorted(widths)


def _check_format_stores(model: torch.nn.Module, fmt: str, bits: Sequence[int]) -> None:
    """Every linear the demo quantizes is storable in `fmt` at every width, before the first step (GPTQ's 3-bit
    words need widths that are multiples of 32)."""
    from quantkit.engine.checks import candidate_linears
    from quantkit.export.formats import format_for
    from quantkit.models import adapter_for, get_module

    stores = format_for(fmt)
    for name in candidate_linears(model, adapter_for(model)):
        linear = get_module(model, name)
        for b in bits:
            stores.check_linear(name, linear.out_features, linear.in_features, b)


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors")) / 2**20


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def format_table(result: dict) -> str:
    """The demo's results as a plain-text table (one row per model)."""
    head = f"{'method':<8} {'bits':>4} {'group':>5} {'loss':>8} {'ppl':>9} {'delta':>8} {'calib s':>8} {'MB':>7}"
    lines = [head, "-" * len(head)]
    for row in result["rows"]:
        delta = "" if row["delta_loss"] is None else f"{row['delta_loss']:+.4f}"
        calib = "" if row["calib_seconds"] is None else f"{row['calib_seconds']:.1f}"
        group = "" if row["group_size"] is None else str(row["group_size"])
        lines.append(
            f"{row['method']:<8} {row['bits']:>4} {group:>5} {row['loss']:>8.4f} {row['ppl']:>9.3f} {delta:>8} {calib:>8} {row['export_mb']:>7.3f}"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class DemoSettings:
    """What the demo trains, quantizes and evaluates (run_demo's keyword settings)."""

    train_seconds: float = 60.0
    seed: int = 0
    corpus_chars: int = 400_000
    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    seqlen: int = 128
    batch_size: int = 16
    max_steps: int = 100_000
    lr: float = 3e-3
    methods: tuple[str, ...] = ("rtn", "gptq")
    bits: tuple[int, ...] = (4, 3)
    group_size: int | None = None  # default: the largest of 128, 64, 32 dividing every linear's width
    nsamples: int = 64
    fmt: str = "gptq_v2"
    eval_max_tokens: int | None = 50_000


def disk_bytes(files: Any, d: DemoSettings, corpus: bool) -> int:
    """About what the demo writes: one export per method and bit width of your model (`files`, its ModelFiles), else
    of the model it trains (float32, tied embeddings; each export counted at that size), with the trained model
    itself and the generated corpus (`corpus`)."""
    from quantkit.calibrate.preflight import export_bytes
    from quantkit.train import TrainSettings

    exports = len(d.methods) * len(d.bits)
    if files is not None:
        return len(d.methods) * sum(export_bytes(files, b, d.fmt) for b in d.bits)
    inter = TrainSettings(hidden_size=d.hidden_size).mlp_width  # the width train_causal_lm gives the demo's model
    params = d.vocab_size * d.hidden_size + d.num_layers * (4 * d.hidden_size**2 + 3 * d.hidden_size * inter)
    return (d.corpus_chars if corpus else 0) + 4 * params * (1 + exports)


def run_demo(model: str | None = None, data: str | None = None, out: str | os.PathLike = "./quantkit-demo", *,
             overwrite: bool = False, progress: bool = True, **settings) -> dict:
    """Run the whole demo into `out` and return its results ({"rows": [...], ...}); see `quantkit demo --help`.
    `settings` are DemoSettings' fields.

    Without `model`: generate the grammar corpus (or use `data`), train a small Llama for about
    `train_seconds`, then for each method x bits calibrate a copy on the corpus' train part
    (`nsamples` windows of `seqlen`), export it in `fmt`, load the export back with
    quantkit.load_quantized and evaluate held-out loss (the last 10% of the text) of FP and exports.
    With `model` (and `data`, required then): the same on that model and text.
    """
    unknown = sorted(set(settings) - {f.name for f in fields(DemoSettings)})
    if unknown:
        raise QuantkitError(f"unknown demo settings {unknown}")
    d = DemoSettings(**settings)
    train_seconds, seed, corpus_chars, seqlen, nsamples, fmt = (d.train_seconds, d.seed, d.corpus_chars, d.seqlen,
                                                               d.nsamples, d.fmt)
    methods, bits, group_size, eval_max_tokens, max_steps = d.methods, d.bits, d.group_size, d.eval_max_tokens, d.max_steps
    from quantkit.data import calibration_samples, load_texts
    from quantkit.eval.loss import evaluate_loss
    from quantkit.export import load_quantized
    from quantkit.export.formats import check_format
    from quantkit.quant.spec import QuantSpec

    if model is not None and data is None:
        raise QuantkitError("--model needs --data: give the text to calibrate on (train part) and evaluate on (heldout part)")
    check_format(fmt)
    for m in methods:
        method_for(m)  # unknown methods fail before any work
    for b in bits:
        QuantSpec(bits=b).validate()
    out = check_output_dir(out, overwrite)
    quiet = not progress
    started = time.perf_counter()
    torch.manual_seed(seed)
    summary: dict = {"out": str(out), "seed": seed, "format": fmt, "rows": []}
    with atomic_dir(out, overwrite) as tmp:
        if data is None:
            from quantkit.demo.corpus import generate_corpus

            _log(f"[demo] generating a {corpus_chars // 1000} KB corpus", quiet)
            text = generate_corpus(corpus_chars, seed=seed)
            corpus_path = tmp / "corpus" / "corpus.txt"
            corpus_path.parent.mkdir(parents=True)
            corpus_path.write_text(text, encoding="utf-8")
            source = str(corpus_path)
            summary["data"] = "generated: corpus/corpus.txt (train: first 90%, heldout: last 10%)"
        else:
            source = data
            summary["data"] = data
        train_texts = load_texts(source, part="train")
        heldout_texts = load_texts(source, part="heldout")

        if model is None:
            from quantkit.train import train_causal_lm

            _log(f"[demo] training a {d.num_layers}-layer, {d.hidden_size}-wide Llama for ~{train_seconds:g}s on CPU", quiet)
            model_dir = tmp / "fp-model"
            train_causal_lm(
                train_texts, model_dir, vocab_size=d.vocab_size, hidden_size=d.hidden_size, num_layers=d.num_layers,
                num_heads=d.num_heads, seqlen=seqlen, batch_size=d.batch_size, steps=max_steps, lr=d.lr,
                warmup=min(20, max_steps // 10 + 1), seed=seed, max_seconds=train_seconds,
                corpora=[Path(source).name if data is None else data], heldout="last 10% of each corpus",
                progress=progress,
            )
            summary["training"] = json.loads((model_dir / "training.json").read_text())
            model_source = str(model_dir)
            summary["model"] = "trained: fp-model"
        else:
            model_source = model
            summary["model"] = model
        from quantkit.eval.load import load_for_eval

        fp_model, tokenizer = load_for_eval(model_source)
        fp_model.eval()
        gs = group_size if group_size is not None else pick_group_size(_linear_widths(fp_model))
        summary["group_size"] = gs

        # drawn before the FP evaluation so that too little text is one line before any work is shown
        samples = calibration_samples(train_texts, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed)
        _check_format_stores(fp_model, fmt, bits)
        _log("[demo] evaluating the FP model on the held-out text", quiet)
        fp_eval = evaluate_loss(fp_model, tokenizer, heldout_texts, seqlen=seqlen, max_tokens=eval_max_tokens, progress=progress)
        fp_mb = _dir_mb(Path(model_source)) if Path(model_source).is_dir() else float("nan")
        summary["eval"] = {"seqlen": seqlen, "tokens": fp_eval["tokens"], "part": "heldout"}
        summary["rows"].append({
            "method": "fp", "bits": 32 if next(fp_model.parameters()).dtype == torch.float32 else 16,
            "group_size": None, "loss": fp_eval["loss"], "ppl": fp_eval["ppl"], "delta_loss": None,
            "calib_seconds": None, "export_mb": fp_mb, "path": None if model is not None else "fp-model",
        })
        from quantkit.calibrate import ExportSpec, QuantizationSpec, calibrate_loaded, export_loaded

        for b in bits:
            for method in methods:
                name = f"{method}-w{b}"
                _log(f"[demo] {name}: calibrate, export ({fmt}), reload, evaluate", quiet)
                chosen = method_for(method)
                quantization = QuantizationSpec(weights=QuantSpec(bits=b, group_size=gs), method=chosen,
                                                fp_target=chosen.fp_target_on(None))
                qmodel = copy.deepcopy(fp_model)
                t0 = time.perf_counter()
                outcome = calibrate_loaded(qmodel, samples, quantization, progress=progress)
                calib_s = time.perf_counter() - t0
                export_dir = tmp / name
                export_loaded(outcome, ExportSpec(output=str(export_dir), fmt=fmt), quantization.weights,
                              source=model_source)
                del outcome, qmodel
                loaded = load_quantized(export_dir)
                ev = evaluate_loss(loaded, tokenizer, heldout_texts, seqlen=seqlen, max_tokens=eval_max_tokens, progress=progress)
                del loaded
                summary["rows"].append({
                    "method": method, "bits": b, "group_size": gs, "loss": ev["loss"], "ppl": ev["ppl"],
                    "delta_loss": ev["loss"] - fp_eval["loss"], "calib_seconds": round(calib_s, 3),
                    "export_mb": _dir_mb(export_dir), "path": name,
                })
        summary["seconds"] = round(time.perf_counter() - started, 1)
        with atomic_file(tmp / "results.json") as f:
            f.write_text(json.dumps(summary, indent=1) + "\n")
    return summary
