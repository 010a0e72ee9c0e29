"""Issue #12: TLQ's gradient guidance variants vs GPTQ (act-order on for every method), on validation
windows (choosing defaults) or on held-out text (the final table, beside llm-compressor).

Usage:
    python benchmarks/bench_guidance.py --model ../shared/models/ref-lm --seeds 0 1 2 3 --settings W2g64a W3g64s \
        --variants gptq gptq_fp tlq tlq_linear tlq_fisher ... --jobs 2 -o results/bench_guidance_val.json
    python benchmarks/bench_guidance.py --cost --settings W2g64a --variants gptq_fp tlq tlq_linear --repeats 2
    python benchmarks/bench_guidance.py --heldout --settings W2g64a W2g64s W3g64a W3g64s W4g64a W4g64s \
        --variants rtn gptq gptq_fp tlq --llmc /tmp/llmc-venv/bin/python -o results/bench_guidance_heldout.json

Every variant is a row of VARIANTS: the engine method, the FP target, coordinate-descent sweeps and,
for TLQ, the importance options (guidance, row groups, loss, draws, lam, power). Calibration windows
come from the train part (first 90%) of ../shared/data/text. Validation windows come from the train
part too, disjoint from the calibration windows (bench_tlq.validation_windows); the held-out text is
the last 10%, read only with --heldout. Each seed is one calibration draw; ratios are paired per
seed (variant gap / GPTQ gap on the same draw), summarised by their mean and standard error.
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

# (bits, group size, sym) per setting label; the reference LM is 192 wide, so g64 stands in for g128
SETTINGS = {
    "W2g64a": (2, 64, False), "W2g64s": (2, 64, True),
    "W3g64a": (3, 64, False), "W3g64s": (3, 64, True),
    "W4g64a": (4, 64, False), "W4g64s": (4, 64, True),
    # for widths that 64 does not divide (the 672-wide MLP of a hidden-256 Llama)
    "W2g32a": (2, 32, False), "W3g32s": (3, 32, True),
}
TLQ = {"guidance": "layer", "row_groups": 1, "loss": "ce", "draws": 1, "lam": 0.1, "power": 1.0}
# name -> (method, fp_target, cd_sweeps, importance options or None)
VARIANTS = {
    "rtn": ("rtn", False, 0, None),
    "gptq": ("gptq", False, 0, None),
    "gptq_fp": ("gptq", True, 0, None),
    "gptq_fp_cd": ("gptq", True, 4, None),
    "tlq_nofp": ("tlq", False, 0, TLQ),
    "tlq": ("tlq", True, 0, TLQ),
    "tlq_cd": ("tlq", True, 4, TLQ),
    "tlq_p0.5": ("tlq", True, 0, {**TLQ, "power": 0.5}),
    "tlq_lam0.5": ("tlq", True, 0, {**TLQ, "lam": 0.5}),
    "tlq_fisher": ("tlq", True, 0, {**TLQ, "loss": "fisher", "draws": 1}),
    "tlq_fisher4": ("tlq", True, 0, {**TLQ, "loss": "fisher", "draws": 4}),
    "tlq_linear": ("tlq", True, 0, {**TLQ, "guidance": "linear"}),
    "tlq_linear_p0.5": ("tlq", True, 0, {**TLQ, "guidance": "linear", "power": 0.5}),
    "tlq_linear_g4": ("tlq", True, 0, {**TLQ, "guidance": "linear", "row_groups": 4}),
    "tlq_linear_fisher": ("tlq", True, 0, {**TLQ, "guidance": "linear", "loss": "fisher"}),
    "tlq_linear_fisher4": ("tlq", True, 0, {**TLQ, "guidance": "linear", "loss": "fisher", "draws": 4}),
    "tlq_linear_cd": ("tlq", True, 4, {**TLQ, "guidance": "linear"}),
    "tlq_fisher_cd": ("tlq", True, 4, {**TLQ, "loss": "fisher"}),
    # GPTQ on the first half / quarter of the samples: what a smaller effective sample size costs
    "gptq_fp_s50": ("gptq", True, 0, None),
    "gptq_fp_s25": ("gptq", True, 0, None),
    "gptq_s50": ("gptq", False, 0, None),
    # without act-order (quantkit's earlier default): where the issue saw the token weights hurt at W2
    "gptq_noact": ("gptq", False, 0, None),
    "tlq_nofp_noact": ("tlq", False, 0, TLQ),
    "gptq_fp_noact": ("gptq", True, 0, None),
    "tlq_noact": ("tlq", True, 0, TLQ),
}
SUBSAMPLE = {"gptq_fp_s50": 0.5, "gptq_fp_s25": 0.25, "gptq_s50": 0.5}
NO_ACT_ORDER = {"gptq_noact", "tlq_nofp_noact", "gptq_fp_noact", "tlq_noact"}
GRADIENT_KEYS = ("guidance", "row_groups", "loss", "draws")


def run_seed(model_dir: str, seed: int, nsamples: int, seqlen: int, eval_tokens: int, settings: list[str],
             variants: list[str], heldout: bool) -> dict:
    """One calibration draw: every variant's loss gap to FP per setting (one thread)."""
    from transformers import AutoTokenizer

    from quantkit.data import calibration_samples
    from quantkit.engine import calibrate_model
    from quantkit.importance import TokenImportance, importance_scores
    from quantkit.models import load_model
    from quantkit.quant.spec import QuantSpec

    torch.set_num_threads(1)
    model = load_model(model_dir, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = calibration_samples(str(TEXT_DIR), tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed, part="train")
    if heldout:
        windows = heldout_windows(tokenizer, seqlen, eval_tokens)
    else:
        windows = validation_windows(_train_stream(tokenizer), nsamples, seqlen, seed, max(1, eval_tokens // seqlen))
    fp_loss = windows_loss(model, windows)
    scores: dict[tuple, tuple] = {}  # gradient options -> (ImportanceScores, seconds)
    rows = []
    for label in settings:
        bits, group, sym = SETTINGS[label]
        row = {"seed": seed, "setting": label, "fp_loss": fp_loss}
        for name in variants:
            method, fp_target, sweeps, options = VARIANTS[name]
            weights = None
            if options is not None:
                key = tuple(options[k] for k in GRADIENT_KEYS)
                if key not in scores:
                    started = time.perf_counter()
                    found = importance_scores(model, samples, progress=False, seed=seed, **dict(zip(GRADIENT_KEYS, key)))
                    scores[key] = (found, time.perf_counter() - started)
                found, seconds = scores[key]
                row[f"{name}_importance_s"] = round(seconds, 2)
                weights = TokenImportance(found.layer, samples, report=found.report, linear_scores=found.linear, seed=seed,
                                          lam=options["lam"], power=options["power"])
            quantized = copy.deepcopy(model)
            spec = QuantSpec(bits=bits, group_size=group, sym=sym, cd_sweeps=sweeps, act_order=name not in NO_ACT_ORDER)
            used = samples[: max(1, int(len(samples) * SUBSAMPLE.get(name, 1.0)))]
            started = time.perf_counter()
            calibration = calibrate_model(quantized, used, spec, method=method, token_weights=weights, progress=False,
                                          fp_target=fp_target)
            row[f"{name}_calib_s"] = round(time.perf_counter() - started, 2)
            row[f"{name}_gap"] = windows_loss(quantized, windows) - fp_loss
            if weights is not None and label == settings[0]:
                row[f"{name}_weights"] = _weights_summary(calibration.report)
            del quantized
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_weights")}), file=sys.stderr, flush=True)
    return {"rows": rows, "windows": [int(windows.shape[0]), int(windows.shape[1])]}


def _weights_summary(report: dict) -> dict:
    """Per layer, the token-weight diagnosis of its first linear (and its mean ESS over linears)."""
    out = {}
    for layer in report["layers"]:
        entries = [entry["token_weights"] for entry in layer["linears"].values() if "token_weights" in entry]
        if entries:
            out[str(layer["layer"])] = {
                "ess_share_mean": round(sum(e["ess_share"] for e in entries) / len(entries), 4),
                "ess_share_min": min(e["ess_share"] for e in entries),
                "top1pct_weight_share_max": max(e["top1pct_weight_share"] for e in entries),
                "floor_only_tokens_max": max(e.get("floor_only_tokens", 0) for e in entries),
            }
    return out


def summarise(rows: list[dict], settings: list[str], variants: list[str], base: str = "gptq") -> dict:
    """Per setting and variant: mean gap, and the paired ratio to `base` (mean and SE over seeds)."""
    summary = {}
    for label in settings:
        mine = [r for r in rows if r["setting"] == label]
        entry = {}
        for name in variants:
            gaps = [r[f"{name}_gap"] for r in mine]
            ratios = [r[f"{name}_gap"] / r[f"{base}_gap"] for r in mine if r[f"{base}_gap"] > 0]
            mean_gap, se_gap = mean_se(gaps)
            mean_ratio, se_ratio = mean_se(ratios) if ratios else (float("nan"), float("nan"))
            diffs = [r[f"{name}_gap"] - r[f"{base}_gap"] for r in mine]
            mean_diff, se_diff = mean_se(diffs)
            entry[name] = {"gap": round(mean_gap, 5), "gap_se": round(se_gap, 5), f"over_{base}": round(mean_ratio, 3),
                           f"over_{base}_se": round(se_ratio, 3), f"minus_{base}": round(mean_diff, 5),
                           f"minus_{base}_se": round(se_diff, 5),
                           "ratio_of_means": round(mean_gap / (sum(r[f"{base}_gap"] for r in mine) / len(mine)), 3),
                           "calib_s": round(sum(r[f"{name}_calib_s"] for r in mine) / len(mine), 2)}
        summary[label] = entry
    return summary


def run_cost(model_dir: str, nsamples: int, seqlen: int, variants: list[str], repeats: int, label: str) -> dict:
    """CPU and wall seconds (one thread, min over repeats, interleaved) of each variant's importance pass and
    calibration, and the ratio of importance + calibration to GPTQ with the FP target. CPU seconds are
    the figure to read on a shared machine: other processes stretch the wall clock, not them."""
    from transformers import AutoTokenizer

    from quantkit.data import calibration_samples
    from quantkit.engine import calibrate_model
    from quantkit.importance import TokenImportance, importance_scores
    from quantkit.models import load_model
    from quantkit.quant.spec import QuantSpec

    torch.set_num_threads(1)
    model = load_model(model_dir, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = calibration_samples(str(TEXT_DIR), tokenizer, nsamples=nsamples, seqlen=seqlen, seed=0, part="train")
    bits, group, sym = SETTINGS[label]
    best: dict[str, dict[str, float]] = {}

    def clock(key: str, work) -> object:
        wall, cpu = time.perf_counter(), time.process_time()
        value = work()
        spent = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
        mine = best.setdefault(key, spent)
        for k, v in spent.items():
            mine[k] = min(mine[k], v)
        return value

    for _ in range(repeats):
        for name in variants:
            method, fp_target, sweeps, options = VARIANTS[name]
            weights = None
            if options is not None:
                found = clock(f"{name}_importance", lambda options=options: importance_scores(
                    model, samples, progress=False, **{k: options[k] for k in GRADIENT_KEYS}))
                weights = TokenImportance(found.layer, samples, linear_scores=found.linear, lam=options["lam"],
                                          power=options["power"])
            spec = QuantSpec(bits=bits, group_size=group, sym=sym, cd_sweeps=sweeps)
            quantized = copy.deepcopy(model)
            clock(f"{name}_calibration", lambda spec=spec, method=method, weights=weights, fp_target=fp_target, quantized=quantized:
                  calibrate_model(quantized, samples, spec, method=method, token_weights=weights, progress=False,
                                  fp_target=fp_target))
    out: dict = {"setting": label, "repeats": repeats, "seconds": {k: {m: round(v, 2) for m, v in d.items()} for k, d in best.items()}}
    base = best["gptq_fp_calibration"]
    for name in variants:
        total = {m: best.get(f"{name}_importance", {m: 0.0})[m] + best[f"{name}_calibration"][m] for m in base}
        out[f"{name}_over_gptq_fp"] = {m: round(total[m] / base[m], 3) for m in base}
    return out


def main() -> None:
    """Run the seeds (in parallel processes with --jobs) and print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REF_LM))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=40960)
    parser.add_argument("--settings", nargs="+", default=["W2g64a", "W3g64s"], choices=list(SETTINGS))
    parser.add_argument("--variants", nargs="+", default=["gptq", "gptq_fp", "tlq"], choices=list(VARIANTS))
    parser.add_argument("--heldout", action="store_true", help="evaluate on the held-out part (final figures only)")
    parser.add_argument("--llmc", help="python of an llm-compressor venv: run its GPTQ on the same windows (--heldout)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--cost", action="store_true", help="time importance + calibration against GPTQ with the FP target")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("-o", "--output")
    args = parser.parse_args()
    if args.cost:
        names = ["gptq_fp", *[v for v in args.variants if v != "gptq_fp"]]
        result = run_cost(args.model, args.nsamples, args.seqlen, names, args.repeats, args.settings[0])
        emit(result, args.output)
        return
    if "gptq" not in args.variants:
        args.variants = ["gptq", *args.variants]
    started = time.perf_counter()
    jobs = (args.model, args.nsamples, args.seqlen, args.eval_tokens, args.settings, args.variants, args.heldout)
    per_seed = in_processes(run_seed, [(jobs[0], seed, *jobs[1:]) for seed in args.seeds], args.jobs)
    rows = [row for result in per_seed for row in result["rows"]]
    out = {
        "model": args.model, "seeds": args.seeds, "nsamples": args.nsamples, "seqlen": args.seqlen,
        "eval": "heldout" if args.heldout else "validation", "windows": per_seed[0]["windows"],
        "variants": {name: VARIANTS[name] for name in args.variants},
        "summary": summarise(rows, args.settings, args.variants),
        "rows": rows,
    }
    if "gptq_fp" in args.variants:
        out["summary_over_gptq_fp"] = summarise(rows, args.settings, args.variants, base="gptq_fp")
    if args.llmc:
        wanted = [{"bits": SETTINGS[s][0], "group_size": SETTINGS[s][1], "sym": SETTINGS[s][2]} for s in args.settings]
        llmc = llmc_draws(args.llmc, "llmc_runner.py", args.model, args.seeds, args.nsamples, args.seqlen,
                          args.eval_tokens, args.settings, ["--settings", json.dumps(wanted)])
        out["llmcompressor"] = llmc
        for label in args.settings:
            mine = {r["seed"]: r for r in rows if r["setting"] == label}
            theirs = [r for r in llmc if r["setting"] == label]
            for name in args.variants:
                ratios = [(mine[r["seed"]][f"{name}_gap"]) / (r["loss"] - mine[r["seed"]]["fp_loss"]) for r in theirs]
                mean, se = mean_se(ratios)
                out["summary"][label][name]["over_llmc"] = round(mean, 3)
                out["summary"][label][name]["over_llmc_se"] = round(se, 3)
            gaps = [r["loss"] - mine[r["seed"]]["fp_loss"] for r in theirs]
            mean, se = mean_se(gaps)
            out["summary"][label]["llmc"] = {"gap": round(mean, 5), "gap_se": round(se, 5),
                                             "seconds": round(sum(r["seconds"] for r in theirs) / len(theirs), 2)}
    out["seconds"] = round(time.perf_counter() - started, 1)
    emit(out, args.output)


if __name__ == "__main__":
    main()
