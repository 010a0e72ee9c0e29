"""Issue #23 item 8: GPTQ and TLQ on a small trained mixture-of-experts LM, beside llm-compressor's GPTQ.

Usage:
    python benchmarks/train_moe.py                       # once: /work/bench-models/moe-lm (outside the repo)
    python benchmarks/bench_moe.py --model /work/bench-models/moe-lm --seeds 0 1 2 3 \
        --llmc /tmp/llmc-venv/bin/python -o benchmarks/results/bench_moe.json
    (or one process per seed, -o seedN.json, then --merge seed0.json ... -o benchmarks/results/bench_moe.json)

Each seed is one calibration draw of windows from the train part (first 90%) of ../shared/data/text; every
variant is scored on the held-out last 10% of each corpus (the same windows for every draw), per corpus and
over all four. Variants: quantkit GPTQ (each expert on its routed tokens, the default), GPTQ with every
expert on every token (--all-experts), GPTQ with the FP target (gptq_fp: the CLI's default on text), TLQ
(importance-weighted, FP target), and llm-compressor 0.14's
GPTQModifier (actorder static, its defaults) in its own venv, with its default of calibrating every expert
on every token and with routed tokens only. Gaps are loss(quantized) - loss(FP) in nats; ratios are paired
per draw. The report also gives the routed tokens per expert of each layer (quantkit's count). Prints one
JSON object.
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
from bench_tlq import windows_loss  # noqa: E402
from common import TEXT_DIR, emit, environment, mean_se, run_llmc_runner, windows_kl  # noqa: E402

SETTINGS = {"W4g32": (4, 32, True), "W2g64": (2, 64, False)}
# name -> (engine method, every expert on every token, FP target: None = the method's default)
VARIANTS = {"gptq": ("gptq", False, None), "gptq_all": ("gptq", True, None), "gptq_fp": ("gptq", False, True),
            "tlq": ("tlq", False, None)}
# llm-compressor's two calibration modes: every expert on every token (its default), or routed tokens only
LLMC_MODES = {True: "all", False: "routed"}
LLMC_RUNNER = Path(__file__).resolve().parent / "llmc_runner.py"


def corpus_windows(tokenizer, seqlen: int, count: int) -> dict[str, torch.Tensor]:
    """Per corpus, up to `count` consecutive [seqlen] windows of its held-out part (last 10%)."""
    from quantkit.data import resolve_texts, tokenize_documents

    out = {}
    for path in sorted(Path(TEXT_DIR).glob("*.txt")):
        ids = tokenize_documents(resolve_texts(str(path), part="heldout"), tokenizer)
        n = min(count, ids.numel() // seqlen)
        out[path.stem] = ids[: n * seqlen].reshape(n, seqlen)
    return out


def losses(model, windows: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean cross-entropy per corpus and over every corpus's tokens ("all")."""
    per = {name: windows_loss(model, w) for name, w in windows.items()}
    tokens = {name: w[:, 1:].numel() for name, w in windows.items()}
    per["all"] = sum(per[n] * tokens[n] for n in tokens) / sum(tokens.values())
    return per


def divergences(model, fp, windows: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean KL(FP || quantized) per token, per corpus and over every corpus's tokens ("all")."""
    per = {name: windows_kl(model, fp, w) for name, w in windows.items()}
    tokens = {name: w[:, 1:].numel() for name, w in windows.items()}
    per["all"] = sum(per[n] * tokens[n] for n in tokens) / sum(tokens.values())
    return per


def tokens_per_expert(report: dict) -> list[list[int]]:
    """Routed calibration tokens of each expert, per layer (from the gate/up projections' reports)."""
    out = []
    for layer in report["layers"]:
        counts = {}
        for name, entry in layer["linears"].items():
            parts = name.split(".")
            if "routed_tokens" in entry and "experts" in parts:
                counts[int(parts[parts.index("experts") + 1])] = entry["routed_tokens"]
        out.append([counts[e] for e in sorted(counts)])
    return out


def run_seed(model_dir: str, seed: int, nsamples: int, seqlen: int, windows: dict[str, torch.Tensor],
             variants: list[str], llmc: str | None, llmc_modes: list[str], settings: list[str]) -> list[dict]:
    """One calibration draw: every variant's gaps per setting (one thread)."""
    from transformers import AutoTokenizer

    from quantkit.data import calibration_samples
    from quantkit.engine import calibrate_model
    from quantkit.importance import tlq_token_weights
    from quantkit.models import load_model
    from quantkit.quant.methods import method_for
    from quantkit.quant.spec import QuantSpec

    torch.set_num_threads(1)
    fp = load_model(model_dir, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = calibration_samples(str(TEXT_DIR), tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed, part="train")
    fp_loss = losses(fp, windows)
    weights, importance_s = None, 0.0
    if "tlq" in variants:
        started = time.perf_counter()
        weights = tlq_token_weights(fp, samples, progress=False)
        importance_s = time.perf_counter() - started
    rows = []
    for label, (bits, group, sym) in ((k, SETTINGS[k]) for k in settings):
        row = {"seed": seed, "setting": label, "fp_loss": fp_loss}
        for name in variants:
            method, all_experts, fp_target = VARIANTS[name]
            model = copy.deepcopy(fp)
            spec = QuantSpec(bits=bits, group_size=group, sym=sym)
            started = time.process_time()
            cal = calibrate_model(model, samples, spec, method=method_for(method).with_all_experts(all_experts),
                                  progress=False, token_weights=weights if method == "tlq" else None,
                                  fp_target=fp_target)
            row[f"{name}_cpu_s"] = round(time.process_time() - started + (importance_s if method == "tlq" else 0), 2)
            got = losses(model, windows)
            row[f"{name}_gap"] = {k: got[k] - fp_loss[k] for k in got}
            row[f"{name}_kl"] = divergences(model, fp, windows)
            if name == "gptq":
                row["tokens_per_expert"] = tokens_per_expert(cal.report)
            del model
        rows.append(row)
    if llmc:
        calib = torch.cat([s["input_ids"] for s in samples])
        everything = torch.cat(list(windows.values()))
        wanted = [{"bits": b, "group_size": g, "sym": s, "all_experts": every, "ignore": ["re:.*mlp.gate$"]}
                  for b, g, s in (SETTINGS[k] for k in settings) for every in (True, False) if LLMC_MODES[every] in llmc_modes]
        found = run_llmc_runner(llmc, LLMC_RUNNER, model_dir, calib, everything, ["--settings", json.dumps(wanted), "--kl"],
                                parts=windows)
        for row in rows:
            bits, group, sym = SETTINGS[row["setting"]]
            for result in found["results"]:
                if (result["bits"], result["group_size"], result["sym"]) != (bits, group, sym):
                    continue
                key = "llmc" if result["all_experts"] else "llmc_routed"
                gaps = {k: v - row["fp_loss"][k] for k, v in result["part_losses"].items()}
                gaps["all"] = result["loss"] - row["fp_loss"]["all"]
                row[f"{key}_gap"] = gaps
                row[f"{key}_kl"] = {**result["part_kl"], "all": result["kl"]}
                row[f"{key}_s"] = round(result["seconds"], 2)
            row["llmcompressor"] = found["llmcompressor"]
    return rows


def summarise(rows: list[dict], variants: list[str]) -> dict:
    """Mean gap and KL to FP (and their standard errors) per setting, variant and corpus; paired per-draw ratios."""
    out = {}
    for label in SETTINGS:
        mine = [r for r in rows if r["setting"] == label]
        if not mine:
            continue
        out[label] = {}
        for metric, key in (("gap", "gaps"), ("kl", "kl")):
            names = [v for v in [*variants, "llmc", "llmc_routed"] if all(f"{v}_{metric}" in r for r in mine)]
            if not names:
                continue
            table = {}
            for name in names:
                table[name] = {}
                for part in mine[0][f"{name}_{metric}"]:
                    mean, se = mean_se([r[f"{name}_{metric}"][part] for r in mine])
                    table[name][part] = {"mean": mean, "se": se}
            ratios = {}
            for num, den in (("gptq", "llmc"), ("gptq_all", "llmc"), ("gptq", "llmc_routed"), ("tlq", "gptq"),
                             ("tlq", "llmc"), ("gptq_all", "gptq"), ("gptq_fp", "gptq"), ("gptq_fp", "llmc"),
                             ("tlq", "gptq_fp"), ("llmc_routed", "llmc")):
                if num in table and den in table:
                    per_draw = [r[f"{num}_{metric}"]["all"] / r[f"{den}_{metric}"]["all"] for r in mine]
                    mean, se = mean_se(per_draw)
                    # the paired difference per draw: its SE, over the denominator's mean, is the ratio of means' SE
                    diff, diff_se = mean_se([r[f"{num}_{metric}"]["all"] - r[f"{den}_{metric}"]["all"] for r in mine])
                    ratios[f"{num}/{den}"] = {"of_means": table[num]["all"]["mean"] / table[den]["all"]["mean"],
                                              "of_means_se": diff_se / abs(table[den]["all"]["mean"]),
                                              "per_draw_mean": mean, "per_draw_se": se,
                                              "paired_difference": diff, "paired_difference_se": diff_se}
            out[label][key] = table
            out[label]["ratios" if metric == "gap" else "kl_ratios"] = ratios
    return out


def read_run(path: str) -> dict:
    """A run's JSON, or the per-draw lines (stderr) of a run stopped before its end: its finished draws' rows."""
    text = Path(path).read_text()
    if text.lstrip().startswith("{"):
        return json.loads(text)
    rows = [row for line in text.splitlines() if line.startswith("[") for row in json.loads(line)]
    return {"rows": rows, "cpu_seconds": 0.0}


def main() -> None:
    """Run the draws and print (and optionally write) the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/work/bench-models/moe-lm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=16, help="held-out windows per corpus")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--llmc", default=None, help="python of a venv with llm-compressor (omit to skip it)")
    parser.add_argument("--llmc-modes", nargs="+", default=["all", "routed"], choices=["all", "routed"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--merge", nargs="+", default=None,
                        help="join these runs' JSON (one per seed or per variant, run in parallel), or the per-draw stderr "
                             "lines of a run stopped early; the first must be a whole run's JSON (its header is kept)")
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args()
    if args.merge:
        runs = [read_run(p) for p in args.merge]
        joined: dict[tuple, dict] = {}  # runs of other variants on the same draws add their columns to its rows
        for row in (row for run in runs for row in run["rows"]):
            joined.setdefault((row["seed"], row["setting"]), {}).update(row)
        rows = list(joined.values())
        variants = [v for v in VARIANTS if any(f"{v}_gap" in row for row in rows)]
        emit({**runs[0], "seeds": sorted({row["seed"] for row in rows}), "summary": summarise(rows, variants),
              "rows": rows, "cpu_seconds": round(sum(run["cpu_seconds"] for run in runs), 1)}, args.output)
        return
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    windows = corpus_windows(AutoTokenizer.from_pretrained(args.model), args.seqlen, args.eval_windows)
    started = time.process_time()
    rows = []
    for seed in args.seeds:
        rows += run_seed(args.model, seed, args.nsamples, args.seqlen, windows, args.variants, args.llmc,
                         args.llmc_modes, args.settings)
        print(json.dumps([row for row in rows if row["seed"] == seed]), file=sys.stderr, flush=True)  # one line per draw
    training = json.loads((Path(args.model) / "training.json").read_text())
    emit({"benchmark": "bench_moe", "model": args.model, "training": training, "seeds": args.seeds,
          "nsamples": args.nsamples, "seqlen": args.seqlen,
          "eval_tokens_per_corpus": {k: int(w.numel()) for k, w in windows.items()},
          "settings": {k: {"bits": b, "group_size": g, "sym": s} for k, (b, g, s) in SETTINGS.items() if k in args.settings},
          "summary": summarise(rows, args.variants), "rows": rows, "cpu_seconds": round(time.process_time() - started, 1),
          "environment": environment()}, args.output)


if __name__ == "__main__":
    main()
