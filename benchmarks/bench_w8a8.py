"""Issue #15: weight-activation quantization (W8A8, W4A8: per-channel symmetric weights, int8 dynamic
per-token inputs) on the reference LM's held-out text, beside llm-compressor's SmoothQuant + GPTQ.

Usage (one thread per job):
    OMP_NUM_THREADS=1 python benchmarks/bench_w8a8.py --seeds 0 1 --nsamples 64 --seqlen 256 --jobs 1 \
        --llmc /tmp/llmc-venv/bin/python -o benchmarks/results/bench_w8a8.json

Variants (each with its activations quantized in calibration and evaluation):
    rtn         round-to-nearest weights, no smoothing
    sq_gptq     uniform-weight smoothing (SmoothQuant-equivalent, alpha searched per fold) + GPTQ
    tlq_tlq     TLQ-token-weighted smoothing + TLQ (token-weighted GPTQ fitted to the FP output)
    gptq        GPTQ without smoothing (what smoothing adds)
    tlq_su, tlq, gptq_st   the halves of tlq_tlq apart: TLQ after uniform or no smoothing, GPTQ after the
                TLQ-weighted search
Calibration windows come from the train part (first 90%) of ../shared/data/text, evaluation windows
from the held-out part (last 10%). Each seed is one calibration draw; ratios are paired per seed.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tlq import REF_LM, TEXT_DIR, _train_stream, validation_windows, windows_loss  # noqa: E402
from common import emit, heldout_windows, in_processes, llmc_draws, mean_se  # noqa: E402

SETTINGS = {"W8A8": (8, 8), "W4A8": (4, 8)}  # weight bits, activation bits
# name -> (method, smoothing)
VARIANTS = {"rtn": ("rtn", "none"), "gptq": ("gptq", "none"), "sq_gptq": ("gptq", "uniform"), "tlq_tlq": ("tlq", "tlq"),
            # which half of tlq_tlq makes its gap: the solve (tlq with uniform or no smoothing) or the
            # search's weights (GPTQ after the TLQ-weighted search)
            "tlq_su": ("tlq", "uniform"), "tlq": ("tlq", "none"), "gptq_st": ("gptq", "tlq")}


def run_seed(model_dir: str, seed: int, nsamples: int, seqlen: int, eval_tokens: int, settings: list[str],
             variants: list[str], validation: bool = False) -> dict:
    """One calibration draw: every variant's held-out loss gap to FP per setting, and its seconds."""
    from transformers import AutoTokenizer

    from quantkit.data import calibration_samples
    from quantkit.engine import calibrate_model
    from quantkit.engine.presolve import smoothing_mode
    from quantkit.importance import tlq_token_weights
    from quantkit.models import load_model
    from quantkit.quant.activations import quantized_inputs
    from quantkit.quant.methods import method_for
    from quantkit.quant.spec import QuantSpec

    torch.set_num_threads(1)
    model = load_model(model_dir, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = calibration_samples(str(TEXT_DIR), tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed, part="train")
    if validation:  # for choosing defaults: train-part windows disjoint from this draw's calibration windows
        windows = validation_windows(_train_stream(tokenizer), nsamples, seqlen, seed, max(1, eval_tokens // seqlen))
    else:
        windows = heldout_windows(tokenizer, seqlen, eval_tokens)
    with torch.no_grad():
        fp_loss = windows_loss(model, windows)
    weights, importance_s = None, 0.0
    rows = []
    for label in settings:
        bits, act_bits = SETTINGS[label]
        row = {"seed": seed, "setting": label, "fp_loss": fp_loss}
        for name in variants:
            method, smooth = VARIANTS[name]
            uses_weights = method == "tlq" or smooth == "tlq"
            if uses_weights and weights is None:
                started = time.perf_counter()
                weights = tlq_token_weights(model, samples, progress=False)
                importance_s = time.perf_counter() - started
            quantized = copy.deepcopy(model)
            spec = QuantSpec(bits=bits, group_size=-1, sym=True, act_bits=act_bits)
            started = time.perf_counter()
            calibration = calibrate_model(quantized, samples, spec,
                                          method=method_for(method).with_presolve(smoothing_mode(smooth)),
                                          token_weights=weights if uses_weights else None, progress=False)
            row[f"{name}_calib_s"] = round(time.perf_counter() - started + (importance_s if uses_weights else 0.0), 2)
            with torch.no_grad(), quantized_inputs(quantized, list(calibration.results), act_bits):
                row[f"{name}_gap"] = windows_loss(quantized, windows) - fp_loss
            alphas = [fold["alpha"] for layer in calibration.report["layers"]
                      for fold in layer.get("smoothing", {}).get("folds", {}).values()]
            if alphas:
                row[f"{name}_alphas"] = alphas
            del quantized
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return {"rows": rows, "windows": [int(windows.shape[0]), int(windows.shape[1])], "importance_s": round(importance_s, 2)}


def summarise(rows: list[dict], settings: list[str], variants: list[str], base: str = "sq_gptq") -> dict:
    """Per setting and variant: mean gap (and SE), the paired ratio to `base`, mean seconds."""
    summary = {}
    for label in settings:
        mine = [r for r in rows if r["setting"] == label]
        entry = {}
        for name in variants:
            gaps = [r[f"{name}_gap"] for r in mine]
            mean_gap, se_gap = mean_se(gaps)
            item = {"gap": round(mean_gap, 5), "gap_se": round(se_gap, 5),
                    "calib_s": round(sum(r[f"{name}_calib_s"] for r in mine) / len(mine), 2)}
            if base in variants:
                ratios = [r[f"{name}_gap"] / r[f"{base}_gap"] for r in mine if r[f"{base}_gap"] > 0]
                if ratios:
                    item[f"over_{base}"], item[f"over_{base}_se"] = (round(v, 3) for v in mean_se(ratios))
                item[f"at_most_{base}_every_seed"] = all(r[f"{name}_gap"] <= r[f"{base}_gap"] for r in mine)
            entry[name] = item
        summary[label] = entry
    return summary


def targets(summary: dict, settings: list[str]) -> dict:
    """The issue's targets, read off the summary: W8A8 within 0.01 nats of FP, TLQ-weighted smoothing + TLQ at
    or below the SmoothQuant-equivalent's gap in every cell, and at most 0.8x of it at W4A8."""
    out = {}
    for label in settings:
        cell = summary[label]
        if "tlq_tlq" not in cell or "sq_gptq" not in cell:
            continue
        ratio = cell["tlq_tlq"]["gap"] / cell["sq_gptq"]["gap"] if cell["sq_gptq"]["gap"] > 0 else float("nan")
        out[label] = {"tlq_gap_at_most_sq_gap": cell["tlq_tlq"]["gap"] <= cell["sq_gptq"]["gap"],
                      "tlq_over_sq_ratio_of_means": round(ratio, 3)}
        if label.startswith("W8"):
            out[label]["within_0.01_of_fp"] = {name: item["gap"] <= 0.01 for name, item in cell.items()}
        if label == "W4A8":
            out[label]["tlq_at_most_0.8x_sq"] = ratio <= 0.8
    return out


def main() -> None:
    """Run the seeds (in parallel processes with --jobs) and print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REF_LM))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=40960)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--variants", nargs="+", default=["rtn", "gptq", "sq_gptq", "tlq_tlq"], choices=list(VARIANTS))
    parser.add_argument("--llmc", help="python of an llm-compressor venv: run its SmoothQuant + GPTQ on the same windows")
    parser.add_argument("--validation", action="store_true",
                        help="score on validation windows from the train part (to choose defaults), not the held-out text")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("-o", "--output")
    args = parser.parse_args()
    if args.validation and args.llmc:
        parser.error("--llmc is compared on the held-out text; drop --validation")
    started = time.perf_counter()
    jobs = (args.nsamples, args.seqlen, args.eval_tokens, args.settings, args.variants, args.validation)
    per_seed = in_processes(run_seed, [(args.model, seed, *jobs) for seed in args.seeds], args.jobs)
    rows = [row for result in per_seed for row in result["rows"]]
    out = {
        "model": args.model, "seeds": args.seeds, "nsamples": args.nsamples, "seqlen": args.seqlen,
        "eval": "validation" if args.validation else "heldout",
        "windows": per_seed[0]["windows"], "variants": {name: VARIANTS[name] for name in args.variants},
        "importance_s": [r["importance_s"] for r in per_seed],
        "summary": summarise(rows, args.settings, args.variants),
        "rows": rows,
    }
    if args.llmc:
        llmc = llmc_draws(args.llmc, "llmc_w8a8_runner.py", args.model, args.seeds, args.nsamples, args.seqlen,
                          args.eval_tokens, args.settings, ["--bits", json.dumps([SETTINGS[s][0] for s in args.settings])])
        out["llmcompressor"] = llmc
        for label in args.settings:
            fp = {r["seed"]: r["fp_loss"] for r in rows if r["setting"] == label}
            gaps = [r["loss"] - fp[r["seed"]] for r in llmc if r["setting"] == label]
            mean, se = mean_se(gaps)
            out["summary"][label]["llmc_sq_gptq"] = {
                "gap": round(mean, 5), "gap_se": round(se, 5),
                "calib_s": round(sum(r["seconds"] for r in llmc if r["setting"] == label) / len(gaps), 2)}
    out["targets"] = targets(out["summary"], args.settings)
    out["seconds"] = round(time.perf_counter() - started, 1)
    emit(out, args.output)


if __name__ == "__main__":
    main()
