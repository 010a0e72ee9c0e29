"""Issue #23 item 8: GPTQ and TLQ on a small trained mixture-of-experts LM, beside llm-compressor's GPTQ.

Usage:
    python benchmarks/train_moe.py                       # once: /work/bench-models/moe-lm (outside the repo)
    python benchmarks/bench_moe.py --model /work/bench-models/moe-lm --seeds 0 1 2 3 \
        --llmc /tmp/llmc-venv/bin/python -o benchmarks/results/bench_moe.json
    (or one process per seed, -o seedN.json, then --merge seed0.json ... -o benchmarks/results/bench_moe.json)

Each seed is one calibration draw of windows from the train part (first 90%) of ../shared/data/text; every
variant is scored on the held-out last 10% of each corpus (the same windows for every draw), per corpus and
over all four, and with --eval validation|both on validation windows of each corpus's train part that overlap
no calibration window of the draw (for choosing; rows' `val_*` keys). Variants: quantkit GPTQ (each expert on its
routed tokens), GPTQ with every expert on every token (gptq_all: --expert-tokens all), GPTQ with routed tokens
plus the every-token prior (gptq_mix: --expert-tokens mix; gptq_mix_q and gptq_mix_4 with the prior at 0.25x and
4x its weight), GPTQ with the FP target (gptq_fp: the CLI's default
on text), TLQ (importance-weighted, FP target; tlq_mix with the prior), and llm-compressor 0.14's
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
from common import (  # noqa: E402
    TEXT_DIR,
    emit,
    environment,
    mean_se,
    run_llmc_runner,
    validation_corpus_windows,
)

SETTINGS = {"W4g32": (4, 32, True), "W2g64": (2, 64, False)}
# name -> (engine method, expert tokens (quantkit.quant.methods.EXPERT_TOKENS), FP target: None = the method's default)
VARIANTS = {"gptq": ("gptq", "routed", None), "gptq_all": ("gptq", "all", None), "gptq_mix": ("gptq", "mix", None),
            "gptq_fp": ("gptq", "routed", True), "tlq": ("tlq", "routed", None), "tlq_mix": ("tlq", "mix", None),
            "gptq_mix_q": ("gptq", "mix", None), "gptq_mix_4": ("gptq", "mix", None)}
# mix's every-token prior in tokens per projection input (Method.expert_prior; 1 where not named): the strength of the
# shrinkage of a rarely chosen expert's Hessian towards the every-token one, from routed (0) towards all (infinite)
PRIORS = {"gptq_mix_q": 0.25, "gptq_mix_4": 4.0}
# the expert statistics chosen between on validation text (gptq: routed)
CANDIDATES = ("gptq", "gptq_all", "gptq_mix", "gptq_mix_q", "gptq_mix_4")
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


class FPReference:
    """The FP model's logits on each corpus's windows, kept (float32, [n, L - 1, V]), so a quantized model's loss and
    KL(FP || quantized) cost one forward of it: the same figures as bench_tlq.windows_loss and common.windows_kl
    (batches of 16, loss from float32 logits, KL in float64), without the FP forward per variant."""

    def __init__(self, fp, windows: dict[str, torch.Tensor], batch: int = 16, kl: bool = True) -> None:
        self.windows, self.batch, self.kl = windows, batch, kl
        with torch.no_grad():
            self.logits = {name: [fp(input_ids=w[i : i + batch]).logits[:, :-1].float() for i in range(0, w.shape[0], batch)]
                           for name, w in windows.items()}
        self.fp_loss = self.scores(None)[0]

    @torch.no_grad()
    def scores(self, model) -> tuple[dict[str, float], dict[str, float]]:
        """Mean loss and KL(FP || model) per token, per corpus and over every corpus's tokens ("all"); model None: FP.
        Without `kl` (validation: the choice reads losses) the KL is left out: it costs more than the forward."""
        loss, kl, tokens = {}, {}, {}
        for name, w in self.windows.items():
            total, div, count = 0.0, 0.0, 0
            for k, i in enumerate(range(0, w.shape[0], self.batch)):
                ids = w[i : i + self.batch]
                ref = self.logits[name][k]
                logits = ref if model is None else model(input_ids=ids).logits[:, :-1].float()
                total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                                 reduction="sum"))
                if self.kl and model is not None:
                    mine = torch.log_softmax(logits.double(), dim=-1)
                    theirs = torch.log_softmax(ref.double(), dim=-1)
                    div += float((theirs.exp() * (theirs - mine)).sum())
                count += ids[:, 1:].numel()
            loss[name], kl[name], tokens[name] = total / count, div / count, count
        for table in (loss, kl):
            table["all"] = sum(table[n] * tokens[n] for n in tokens) / sum(tokens.values())
        return loss, kl if self.kl else None


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


def run_seed(model_dir: str, seed: int, nsamples: int, seqlen: int, windows: dict[str, torch.Tensor] | None,
             variants: list[str], llmc: str | None, llmc_modes: list[str], settings: list[str],
             validation: int = 0) -> list[dict]:
    """One calibration draw: every variant's gaps per setting (one thread), on the held-out `windows` (None: none)
    and on `validation` windows per corpus of the train part clear of the draw's calibration windows."""
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
    val = None if not validation else FPReference(fp, {
        Path(name).stem: w for name, w in validation_corpus_windows(tokenizer, nsamples, seqlen, seed, validation).items()},
        kl=False)
    held = None if windows is None else FPReference(fp, windows)
    weights, importance_s = None, 0.0
    if "tlq" in variants:
        started = time.perf_counter()
        weights = tlq_token_weights(fp, samples, progress=False)
        importance_s = time.perf_counter() - started
    rows = []
    for label, (bits, group, sym) in ((k, SETTINGS[k]) for k in settings):
        row = {"seed": seed, "setting": label}
        if held:
            row["fp_loss"] = held.fp_loss
        if val:
            row["val_fp_loss"] = val.fp_loss
        for name in variants:
            method, expert_tokens, fp_target = VARIANTS[name]
            model = copy.deepcopy(fp)
            spec = QuantSpec(bits=bits, group_size=group, sym=sym)
            started = time.process_time()
            cal = calibrate_model(model, samples, spec, method=method_for(method).with_expert_tokens(expert_tokens, PRIORS.get(name, 1.0)),
                                  progress=False, token_weights=weights if method == "tlq" else None,
                                  fp_target=fp_target)
            row[f"{name}_cpu_s"] = round(time.process_time() - started + (importance_s if method == "tlq" else 0), 2)
            for prefix, part in (("", held), ("val_", val)):
                if part:
                    got, kl = part.scores(model)
                    row[f"{prefix}{name}_gap"] = {k: got[k] - part.fp_loss[k] for k in got}
                    if kl is not None:
                        row[f"{prefix}{name}_kl"] = kl
            if name == "gptq":
                row["tokens_per_expert"] = tokens_per_expert(cal.report)
            del model
        rows.append(row)
    if llmc and windows:
        calib = torch.cat([s["input_ids"] for s in samples])
        everything = torch.cat(list(windows.values()))
        wanted = [{"bits": b, "group_size": g, "sym": s, "all_experts": every, "ignore": ["re:.*mlp.gate$"]}
                  for b, g, s in (SETTINGS[k] for k in settings) for every in (True, False) if LLMC_MODES[every] in llmc_modes]
        found = run_llmc_runner(llmc, LLMC_RUNNER, model_dir, calib, everything, ["--settings", json.dumps(wanted), "--kl"],
                                parts=windows)
        fp_loss = held.fp_loss
        for row in rows:
            bits, group, sym = SETTINGS[row["setting"]]
            for result in found["results"]:
                if (result["bits"], result["group_size"], result["sym"]) != (bits, group, sym):
                    continue
                key = "llmc" if result["all_experts"] else "llmc_routed"
                gaps = {k: v - fp_loss[k] for k, v in result["part_losses"].items()}
                gaps["all"] = result["loss"] - fp_loss["all"]
                row[f"{key}_gap"] = gaps
                row[f"{key}_kl"] = {**result["part_kl"], "all": result["kl"]}
                row[f"{key}_s"] = round(result["seconds"], 2)
            row["llmcompressor"] = found["llmcompressor"]
    return rows


def summarise(rows: list[dict], variants: list[str]) -> dict:
    """Mean gap and KL to FP (and their standard errors) per setting, variant and corpus, over the draws that ran the
    variant (`draws`); paired per-draw ratios over the draws that ran both (merged runs may cover other draws)."""
    out = {}
    for label in SETTINGS:
        mine = [r for r in rows if r["setting"] == label]
        if not mine:
            continue
        out[label] = {}
        for prefix, metric, key, ratios_key in (("", "gap", "gaps", "ratios"), ("", "kl", "kl", "kl_ratios"),
                                                ("val_", "gap", "val_gaps", "val_ratios"),
                                                ("val_", "kl", "val_kl", "val_kl_ratios")):
            names = [v for v in [*variants, "llmc", "llmc_routed"] if any(f"{prefix}{v}_{metric}" in r for r in mine)]
            if not names:
                continue
            table = {}
            for name in names:
                have = [r for r in mine if f"{prefix}{name}_{metric}" in r]
                table[name] = {"draws": len(have)}
                for part in have[0][f"{prefix}{name}_{metric}"]:
                    mean, se = mean_se([r[f"{prefix}{name}_{metric}"][part] for r in have])
                    table[name][part] = {"mean": mean, "se": se}
            ratios = {}
            for num, den in (("gptq", "llmc"), ("gptq_all", "llmc"), ("gptq_mix", "llmc"), ("gptq", "llmc_routed"),
                             ("tlq", "gptq"), ("tlq", "llmc"), ("gptq_all", "gptq"), ("gptq_mix", "gptq"),
                             ("gptq_mix", "gptq_all"), ("gptq_mix_q", "gptq"), ("gptq_mix_4", "gptq"),
                             ("gptq_mix_q", "llmc"), ("gptq_mix_4", "llmc"), ("gptq_fp", "gptq"), ("gptq_fp", "llmc"), ("tlq", "gptq_fp"),
                             ("tlq_mix", "gptq_mix"), ("tlq_mix", "tlq"), ("tlq_mix", "llmc"), ("llmc_routed", "llmc")):
                both = [r for r in mine if f"{prefix}{num}_{metric}" in r and f"{prefix}{den}_{metric}" in r]
                if len(both) > 1:
                    ratios[f"{num}/{den}"] = {"draws": len(both), **paired(both, f"{prefix}{num}_{metric}",
                                                                             f"{prefix}{den}_{metric}")}
            out[label][key] = table
            out[label][ratios_key] = ratios
    choice = choose(rows)
    if choice:
        out["validation_choice"] = choice
    return out


def paired(rows: list[dict], num: str, den: str, part: str = "all") -> dict:
    """Ratio of two columns' means over draws on corpus `part`, with the paired per-draw figures."""
    per_draw = [r[num][part] / r[den][part] for r in rows]
    mean, se = mean_se(per_draw)
    # the paired difference per draw: its SE, over the denominator's mean, is the ratio of means' SE
    diff, diff_se = mean_se([r[num][part] - r[den][part] for r in rows])
    den_mean = mean_se([r[den][part] for r in rows])[0]
    return {"of_means": mean_se([r[num][part] for r in rows])[0] / den_mean, "of_means_se": diff_se / abs(den_mean),
            "per_draw_mean": mean, "per_draw_se": se, "paired_difference": diff, "paired_difference_se": diff_se}


def choose(rows: list[dict]) -> dict | None:
    """The expert statistics (CANDIDATES) chosen on validation windows: worst corpus first, mean second.

    Each candidate's validation loss gap over routed GPTQ's (ratio of means over draws), per setting and corpus;
    its score is the worst (largest) of these over every setting and corpus, and the lowest score wins; where the
    two lowest scores are within one paired SE of each other, the lower mean over settings of the "all" ratio wins.
    """
    candidates = [c for c in CANDIDATES if any(f"val_{c}_gap" in r for r in rows)]
    if "gptq" not in candidates or len(candidates) < 2:
        return None
    table: dict[str, dict] = {c: {} for c in candidates}
    for label in SETTINGS:
        mine = [r for r in rows if r["setting"] == label and all(f"val_{c}_gap" in r for c in candidates)]
        if not mine:
            continue
        for c in candidates:
            table[c][label] = {part: paired(mine, f"val_{c}_gap", "val_gptq_gap", part) for part in mine[0]["val_gptq_gap"]}
    scores = {}
    for c in candidates:
        cells = [(label, part, v) for label, parts in table[c].items() for part, v in parts.items() if part != "all"]
        label, part, worst = max(cells, key=lambda cell: cell[2]["of_means"])
        mean = sum(parts["all"]["of_means"] for parts in table[c].values()) / len(table[c])
        scores[c] = {"worst": worst["of_means"], "worst_se": worst["of_means_se"], "worst_at": f"{label} {part}",
                     "mean_all": mean}
    order = sorted(candidates, key=lambda c: scores[c]["worst"])
    best, second = order[0], order[1]
    tie = scores[second]["worst"] - scores[best]["worst"] <= max(scores[best]["worst_se"], scores[second]["worst_se"])
    if tie and scores[second]["mean_all"] < scores[best]["mean_all"]:
        best = second
    return {"rule": choose.__doc__.split("\n\n")[1].replace("\n", " ").strip(), "draws": sorted({r["seed"] for r in rows}),
            "scores": scores, "chosen": best, "ratios_to_routed": table}


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
    parser.add_argument("--validation-windows", type=int, default=16, help="validation windows per corpus (no KL)")
    parser.add_argument("--eval", choices=("heldout", "validation", "both"), default="heldout",
                        help="score on held-out windows (reporting), validation windows (choosing), or both")
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
        variants = [v for v in VARIANTS if any(f"{v}_gap" in row or f"val_{v}_gap" in row for row in rows)]
        emit({**runs[0], "seeds": sorted({row["seed"] for row in rows}), "summary": summarise(rows, variants),
              "rows": rows, "cpu_seconds": round(sum(run["cpu_seconds"] for run in runs), 1)}, args.output)
        return
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    windows = None if args.eval == "validation" else corpus_windows(
        AutoTokenizer.from_pretrained(args.model), args.seqlen, args.eval_windows)
    started = time.process_time()
    rows = []
    for seed in args.seeds:
        rows += run_seed(args.model, seed, args.nsamples, args.seqlen, windows, args.variants, args.llmc,
                         args.llmc_modes, args.settings, 0 if args.eval == "heldout" else args.validation_windows)
        print(json.dumps([row for row in rows if row["seed"] == seed]), file=sys.stderr, flush=True)  # one line per draw
    training = json.loads((Path(args.model) / "training.json").read_text())
    emit({"benchmark": "bench_moe", "model": args.model, "training": training, "seeds": args.seeds,
          "nsamples": args.nsamples, "seqlen": args.seqlen,
          "eval": args.eval, "eval_tokens_per_corpus": {k: int(w.numel()) for k, w in (windows or {}).items()},
          "validation_windows_per_corpus": 0 if args.eval == "heldout" else args.validation_windows,
          "settings": {k: {"bits": b, "group_size": g, "sym": s} for k, (b, g, s) in SETTINGS.items() if k in args.settings},
          "summary": summarise(rows, args.variants), "rows": rows, "cpu_seconds": round(time.process_time() - started, 1),
          "environment": environment()}, args.output)


if __name__ == "__main__":
    main()
