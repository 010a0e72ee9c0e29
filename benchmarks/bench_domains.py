"""Issue #24: TLQ against GPTQ with the FP target per corpus, per checkpoint, over calibration draws.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/bench_domains.py --models step500 ref-lm --seeds 0 1 2 3 \
        --settings W2 W3 --variants gptq_fp tlq --jobs 2 -o benchmarks/results/bench_domains_val.json
    ... --heldout --llmc /tmp/llmc-venv/bin/python    # final figures: held-out text, beside llm-compressor
    ... --eval both    # the same quantized models on validation windows (choosing) and held-out windows (reporting)
    OMP_NUM_THREADS=1 python benchmarks/bench_domains.py --cost --models ref-lm --settings W2 \
        --variants gptq_fp os_u16 --repeats 2    # CPU seconds over GPTQ + FP target

Models: ref-lm, its checkpoints step125/step250/step500 (../shared/models), or ref-lm-b / ref-lm-c and their
half-training checkpoints ref-lm-b/steps/step325, ref-lm-c/steps/step400 under $QUANTKIT_BENCH_MODELS
(default /work/bench-models; benchmarks/README.md says how they were trained), or any model directory.
Settings: W2 and W3, symmetric, with each model's group size: W2 takes g64 (g32 where 64 does not divide
every linear's input), W3 takes g128 (g64, g32: the largest that divides them; ref-lm's 192 and 512 take g64).

Calibration: --nsamples x --seqlen windows from the train part (first 90%) of the four corpora of
../shared/data/text, drawn with the draw's seed (quantkit.data.calibration_samples). Evaluation, per corpus:
validation windows from the corpus's train part that overlap no calibration window of the draw (for choosing
defaults), or with --heldout the first windows of the corpus's held-out part (last 10%; final figures only).
--windows windows of --seqlen tokens per corpus (held-out: `all` takes every whole window, 272-641 per corpus of
the four at 128 tokens; --first N also reports the first N of them, scored on the same quantized models). The
overall gap is the mean over corpora (equal tokens each).

Every variant is a row of VARIANTS (the engine method and its options); the token-importance pass runs once
per draw and gradient options and is reused by every variant and setting. Per (setting, variant) the summary
gives the overall and per-corpus gap (mean +- SE over draws) and, against the base variant (--base, default
gptq_fp), the per-corpus ratio (mean of per-draw ratios +- SE, and the ratio of mean gaps) and the worst
corpus. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    SHARED,
    calibration_sources,
    corpus_offsets,
    emit,
    heldout_corpus_windows,
    in_processes,
    mean_se,
    run_llmc_runner,
    validation_corpus_windows,
    window_losses,
)

BENCH_MODELS = Path(os.environ.get("QUANTKIT_BENCH_MODELS", "/work/bench-models"))
MODELS = {
    "ref-lm": SHARED / "models" / "ref-lm",
    **{f"step{s}": SHARED / "models" / "ref-lm" / "steps" / f"step{s}" for s in (125, 250, 500)},
    "ref-lm-b": BENCH_MODELS / "ref-lm-b", "ref-lm-b-step325": BENCH_MODELS / "ref-lm-b" / "steps" / "step325",
    "ref-lm-c": BENCH_MODELS / "ref-lm-c", "ref-lm-c-step400": BENCH_MODELS / "ref-lm-c" / "steps" / "step400",
}
SETTINGS = {"W2": (2, (64, 32)), "W3": (3, (128, 64, 32))}  # bits, group sizes tried in order
TLQ = {"guidance": "layer", "loss": "ce", "draws": 1, "lam": 0.1, "power": 1.0, "output_side": None, "clip": None,
       "factor_every": None}
# factor_every k: the gradient pass runs on every k-th calibration window only (the windows are drawn in random order:
# a random 1/k of them) and feeds the output-side factors alone; every window's tokens weigh 1 (needs lam 1)
GRADIENT_KEYS = ("guidance", "loss", "draws", "output_side", "factor_every")
# The mix guard's variants (tlq_guard, tlq_guard_z2, tlq_guard_z2s, tlq_fisher_guard, tlq_guard_lam0) left with
# quantkit.engine.mix in session 9 (#24): git show dcba035:benchmarks/bench_domains.py has them.
# name -> {"method", "fp_target", "importance": TokenImportance options or None, and optionally "fp_alpha" (FP-target
# strength), "fp_skip" (linears left out of the FP target: fp_alpha 0 by a recipe override),
# "uniform" (linears, by name suffix, solved with uniform token weights: UniformOn)}
VARIANTS: dict[str, dict] = {
    "gptq": {"method": "gptq", "fp_target": False, "importance": None},
    "gptq_fp": {"method": "gptq", "fp_target": True, "importance": None},
    "tlq": {"method": "tlq", "fp_target": True, "importance": TLQ},
    "tlq_nofp": {"method": "tlq", "fp_target": False, "importance": TLQ},
    "tlq_lam0.3": {"method": "tlq", "fp_target": True, "importance": {**TLQ, "lam": 0.3}},
    "tlq_lam0.5": {"method": "tlq", "fp_target": True, "importance": {**TLQ, "lam": 0.5}},
    "tlq_p0.5": {"method": "tlq", "fp_target": True, "importance": {**TLQ, "power": 0.5}},
    "tlq_fisher": {"method": "tlq", "fp_target": True, "importance": {**TLQ, "loss": "fisher"}},
    "tlq_fisher_nodown": {"method": "tlq", "fp_target": True, "importance": {**TLQ, "loss": "fisher"},
                          "fp_skip": ("down_proj",)},
    **{f"tlq_fisher_a{alpha}": {"method": "tlq", "fp_target": True, "importance": {**TLQ, "loss": "fisher"},
                                "fp_alpha": alpha} for alpha in (0.25, 0.5)},
    **{f"tlq_fisher_os{b}": {"method": "tlq", "fp_target": True, "importance": {**TLQ, "loss": "fisher", "output_side": b}}
       for b in (8, 16, 32)},
    # FP-target strength and QEP's down_proj left out, for GPTQ + FP target and TLQ alike
    **{f"{base}_a{alpha}": {**variant, "fp_alpha": alpha} for alpha in (0.25, 0.5)
       for base, variant in (("gptq_fp", {"method": "gptq", "fp_target": True, "importance": None}),
                             ("tlq", {"method": "tlq", "fp_target": True, "importance": TLQ}))},
    # output-side curvature: each linear's block-diagonal E[g g^T] (blocks of b rows) as GPTQ's row metric
    **{f"tlq_os{b}": {"method": "tlq", "fp_target": True, "importance": {**TLQ, "output_side": b}} for b in (8, 16, 32)},
    # bounded weights (RSQ's [1, 3]: clip sqrt(3) bounds the normalised scores to [1/1.73, 1.73], a ratio of 3 at
    # most) with the floor lam picked once on validation; per-sample normalisation already keeps every calibration
    # window (one corpus each) at its share of the total weight
    **{f"tlq_clip{c}" + (f"_lam{lam}" if lam != 0.1 else ""): {"method": "tlq", "fp_target": True,
                                                               "importance": {**TLQ, "clip": c, "lam": lam}}
       for c in (1.73, 3.0) for lam in (0.1, 0.5)},
    # round 6 (#24): the gradients feed only the output-side factor, the token weights stay uniform (lam 1), so no
    # corpus gains or loses input-side weight; with the data's labels (empirical Fisher) or labels drawn from the
    # FP model (the expected Fisher: the KL Hessian's output factor, YAQA's direction); os_u16 was quantkit's default
    # on text from round 7, os_u128 is since round 9 (quantkit.importance.TLQ_DEFAULTS)
    **{f"os_u{b}": {"method": "tlq", "fp_target": True, "importance": {**TLQ, "lam": 1.0, "output_side": b}}
       for b in (4, 8, 16, 32, 64, 128)},  # 32, 64: session 9's block size by width; 128: session 10 (#24)
    **{f"os_ukl{b}": {"method": "tlq", "fp_target": True,
                      "importance": {**TLQ, "lam": 1.0, "loss": "fisher", "output_side": b}} for b in (4, 8, 16)},
    # os_u16 with the factors from half / a quarter of the windows (the gradient pass is a third of its cost)
    **{f"os_u16_f{k}": {"method": "tlq", "fp_target": True,
                        "importance": {**TLQ, "lam": 1.0, "output_side": 16, "factor_every": k}} for k in (2, 4)},
    # KL-Fisher token weights (per-sample normalised: each window is one corpus, so every corpus keeps its share of
    # the weight) on the attention linears only; gate/up/down, where round 5 located TLQ's loss, keep uniform weights
    "tlq_kl_attn": {"method": "tlq", "fp_target": True, "importance": {**TLQ, "loss": "fisher"},
                    "uniform": ("gate_proj", "up_proj", "down_proj")},
    # round 10 (#24): the output-side factor of 128 rows estimated from 16k correlated tokens, shrunk per block
    # toward its diagonal (G' = (1 - a) G + a diag G: less row coupling, the per-row scales kept) or toward the
    # scaled identity (G' = (1 - a) G + a tr(G)/b I: the same as a larger damp); a = 1 is GPTQ's rounding either way.
    # The gradient pass here gives the raw factors (importance_scores); quantkit's default since round 10 is
    # os_u128_si0.1 (quantkit.importance.OUTPUT_SIDE_SHRINK, applied by tlq_token_weights)
    **{f"os_u128_{to}{a}": {"method": "tlq", "fp_target": True,
                            "importance": {**TLQ, "lam": 1.0, "output_side": 128}, "shrink": (to, a)}
       for to in ("sd", "si") for a in (0.05, 0.1, 0.2, 0.3, 0.5)},
    "gptq_fp_nodown": {"method": "gptq", "fp_target": True, "importance": None, "fp_skip": ("down_proj",)},
    "tlq_nodown": {"method": "tlq", "fp_target": True, "importance": TLQ, "fp_skip": ("down_proj",)},
}


def gradient_pass(model, samples: list[dict], key: tuple, **settings):
    """importance_scores of the gradient settings `key` (GRADIENT_KEYS' values), on every factor_every-th window."""
    from quantkit.importance import importance_scores

    options = dict(zip(GRADIENT_KEYS, key))
    every = options.pop("factor_every")
    return importance_scores(model, samples[::every] if every else samples, progress=False, **options, **settings)


def resolve_model(name: str) -> str:
    """A model name of MODELS, or a directory."""
    path = MODELS.get(name, Path(name))
    if not (Path(path) / "config.json").is_file():
        raise SystemExit(f"model {name}: {path} has no config.json (see the module doc for where models live)")
    return str(path)


def group_size(model, choices: tuple[int, ...]) -> int:
    """The first group size in `choices` that divides every decoder-layer linear's input width."""
    widths = {m.in_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n}
    return next(g for g in choices if all(w % g == 0 for w in widths))


def per_corpus_gaps(model, windows: dict[str, torch.Tensor], fp: dict[str, torch.Tensor], first: int | None = None
                    ) -> dict[str, float]:
    """Mean loss gap to FP per corpus (paired by window); with `first`, also each held-out corpus's gap over its
    first windows only (part "heldout_first{first}": the same quantized model scored on fewer windows)."""
    out = {}
    for name, w in windows.items():
        diff = window_losses(model, w) - fp[name]
        out[name] = float(diff.mean())
        if first and name.startswith("heldout/"):
            out[f"heldout_first{first}/{name.split('/', 1)[1]}"] = float(diff[:first].mean())
    return out


class UniformOn:
    """Token weights of an importance source with uniform weight (1 per valid token) on the linears whose names end in
    one of `suffixes` (their Hessians are GPTQ's); linear_names(layer) gives a layer's linears."""

    def __init__(self, importance, linear_names, suffixes: tuple[str, ...]) -> None:
        self.importance, self.linear_names, self.suffixes = importance, linear_names, tuple(suffixes)

    def __getattr__(self, name: str):
        return getattr(self.importance, name)

    def __call__(self, layer: int):
        from quantkit.engine.weights import LayerWeights, as_layer_weights

        found = as_layer_weights(self.importance(layer))
        ones = [valid.float() for valid in self.importance.valid]
        uniform = {n: ones for n in self.linear_names(layer) if n.split(".")[-1] in self.suffixes}
        return LayerWeights(found.output, {**found.linears, **uniform},
                            {n: g for n, g in found.groups.items() if n not in uniform}, found.floor, found.row_metrics)


def shrink_factor(blocks: torch.Tensor, to: str, a: float) -> torch.Tensor:
    """Output-side factor blocks [n, b, b] shrunk by a fraction a toward their diagonal ("sd") or toward the scaled
    identity tr(G)/b I ("si")."""
    diagonal = torch.diagonal(blocks, dim1=1, dim2=2)
    if to == "sd":
        target = torch.diag_embed(diagonal)
    else:
        target = torch.diag_embed(diagonal.mean(-1, keepdim=True).expand_as(diagonal))
    return (1 - a) * blocks + a * target


def calibrate_variant(model, samples, spec, variant: dict, scores: dict, seed: int):
    """A quantized copy of `model` for one variant, its calibration seconds (CPU) and report."""
    from dataclasses import replace

    from quantkit.engine import calibrate_model
    from quantkit.importance import TokenImportance
    from quantkit.quant.recipe import Override, Recipe

    options = variant["importance"]
    weights = None
    if options is not None:
        found = scores[tuple(options[k] for k in GRADIENT_KEYS)]
        layer_scores = found.layer
        if options["factor_every"]:  # the pass saw some windows only; every window's tokens weigh 1
            if options["lam"] != 1.0:
                raise SystemExit("factor_every feeds the output-side factors only: it needs lam 1 (uniform weights)")
            layer_scores = [[torch.ones(s["input_ids"].shape[-1]) for s in samples] for _ in found.layer]
        factors = found.linear_factors
        if variant.get("shrink"):
            factors = [{n: shrink_factor(g, *variant["shrink"]) for n, g in layer.items()} for layer in factors]
        weights = TokenImportance(layer_scores, samples, report=found.report, linear_scores=found.linear, seed=seed,
                                  lam=options["lam"], power=options["power"], clip=options.get("clip"),
                                  linear_factors=factors)
        if variant.get("uniform"):
            from quantkit.models import adapter_for

            weights = UniformOn(weights, adapter_for(model).linear_names, variant["uniform"])
    spec = replace(spec, fp_alpha=variant.get("fp_alpha", 1.0))
    skip = variant.get("fp_skip")
    recipe = Recipe(overrides=[Override(targets=tuple(skip), fp_alpha=0.0)]) if skip else None
    quantized = copy.deepcopy(model)
    started = time.process_time()
    calibration = calibrate_model(quantized, samples, spec, method=variant["method"], token_weights=weights,
                                  progress=False, fp_target=variant["fp_target"], recipe=recipe)
    return quantized, time.process_time() - started, calibration.report


def run_draw(model_name: str, seed: int, args: dict) -> dict:
    """One (model, calibration draw): every variant's per-corpus gap per setting."""
    from transformers import AutoTokenizer

    from quantkit.data import calibration_samples
    from quantkit.models import load_model
    from quantkit.quant.spec import QuantSpec

    torch.set_num_threads(1)
    model_dir = resolve_model(model_name)
    model = load_model(model_dir, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    nsamples, seqlen = args["nsamples"], args["seqlen"]
    samples = calibration_samples(str(SHARED / "data" / "text"), tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed,
                                  part="train")
    for sample, ids in zip(samples, calibration_sources(tokenizer, samples, corpus_offsets(tokenizer), seed, seqlen, nsamples)):
        sample["source_ids"] = ids.unsqueeze(0)  # the corpus of each token
    windows = {}
    if args["eval"] in ("validation", "both"):
        windows |= {f"validation/{n}": w for n, w in validation_corpus_windows(tokenizer, nsamples, seqlen, seed,
                                                                                args["windows"]).items()}
    if args["eval"] in ("heldout", "both"):
        windows |= {f"heldout/{n}": w for n, w in heldout_corpus_windows(tokenizer, seqlen, args["windows"]).items()}
    fp = {name: window_losses(model, w) for name, w in windows.items()}
    scores: dict[tuple, object] = {}
    importance_s: dict[str, float] = {}
    for name in args["variants"]:
        options = VARIANTS[name]["importance"]
        if options is not None:
            key = tuple(options[k] for k in GRADIENT_KEYS)
            if key not in scores:
                started = time.process_time()
                scores[key] = gradient_pass(model, samples, key, seed=seed)
                importance_s["/".join(map(str, key))] = round(time.process_time() - started, 2)
    rows = []
    for label in args["settings"]:
        bits, choices = SETTINGS[label]
        spec = QuantSpec(bits=bits, group_size=group_size(model, choices), sym=True)
        first = args.get("first")
        fp_loss = {n: float(v.mean()) for n, v in fp.items()}
        if first:
            fp_loss |= {f"heldout_first{first}/{n.split('/', 1)[1]}": float(v[:first].mean()) for n, v in fp.items()
                        if n.startswith("heldout/")}
        row = {"model": model_name, "seed": seed, "setting": label, "group_size": spec.group_size,
               "fp_loss": fp_loss, "importance_cpu_s": importance_s}
        for name in args["variants"]:
            quantized, seconds, _ = calibrate_variant(model, samples, spec, VARIANTS[name], scores, seed)
            gaps = per_corpus_gaps(quantized, windows, fp, first)
            scored = [v for n, v in gaps.items() if not n.startswith("heldout_first")]  # --first's part apart
            row[name] = {"gap": sum(scored) / len(scored), "by_corpus": gaps, "calib_cpu_s": round(seconds, 2)}
            del quantized
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return {"rows": rows, "windows": {n: list(w.shape) for n, w in windows.items()}}


def run_cost(model_name: str, args: dict, repeats: int) -> dict:
    """CPU seconds (one thread, min over interleaved repeats) of each variant's importance pass (what it needs
    only: per-linear factors for the output side) and calibration, over
    GPTQ + FP target's calibration. CPU seconds, not wall: the machine is shared."""
    from transformers import AutoTokenizer

    from quantkit.data import calibration_samples
    from quantkit.models import load_model
    from quantkit.quant.spec import QuantSpec

    torch.set_num_threads(1)
    model_dir = resolve_model(model_name)
    model = load_model(model_dir, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = calibration_samples(str(SHARED / "data" / "text"), tokenizer, nsamples=args["nsamples"],
                                  seqlen=args["seqlen"], seed=0, part="train")
    for sample, ids in zip(samples, calibration_sources(tokenizer, samples, corpus_offsets(tokenizer), 0, args["seqlen"],
                                                        args["nsamples"])):
        sample["source_ids"] = ids.unsqueeze(0)
    bits, choices = SETTINGS[args["settings"][0]]
    spec = QuantSpec(bits=bits, group_size=group_size(model, choices), sym=True)
    best: dict[str, float] = {}
    for _ in range(repeats):
        for name in args["variants"]:
            variant = VARIANTS[name]
            options = variant["importance"]
            scores = {}
            if options is not None:
                key = tuple(options[k] for k in GRADIENT_KEYS)
                started = time.process_time()
                scores[key] = gradient_pass(model, samples, key)
                best[f"{name}_importance"] = min(best.get(f"{name}_importance", 1e9), time.process_time() - started)
            _, seconds, _ = calibrate_variant(model, samples, spec, variant, scores, 0)
            best[f"{name}_calibration"] = min(best.get(f"{name}_calibration", 1e9), seconds)
    base = best["gptq_fp_calibration"]
    out = {"model": model_name, "setting": args["settings"][0], "repeats": repeats,
           "cpu_s": {k: round(v, 2) for k, v in best.items()}}
    for name in args["variants"]:
        total = best.get(f"{name}_importance", 0.0) + best[f"{name}_calibration"]
        out[f"{name}_over_gptq_fp"] = round(total / base, 3)
    return out


def run_llmc(python: str, model_name: str, seeds: list[int], args: dict) -> list[dict]:
    """llm-compressor's GPTQModifier (its defaults: actorder static) on the same windows, in its own venv."""
    from transformers import AutoTokenizer

    from quantkit.data import calibration_samples
    from quantkit.models import load_model

    model_dir = resolve_model(model_name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(model_dir, dtype="float32")
    windows = heldout_corpus_windows(tokenizer, args["seqlen"], args["windows"])
    names = list(windows)
    evaluation = torch.cat([windows[n] for n in names])
    wanted = []
    for label in args["settings"]:
        bits, choices = SETTINGS[label]
        wanted.append({"bits": bits, "group_size": group_size(model, choices), "sym": True})
    fp = {name: window_losses(model, w) for name, w in windows.items()}
    runner = Path(__file__).resolve().parent / "llmc_runner.py"
    out = []
    for seed in seeds:
        samples = calibration_samples(str(SHARED / "data" / "text"), tokenizer, nsamples=args["nsamples"],
                                      seqlen=args["seqlen"], seed=seed, part="train")
        calib = torch.cat([s["input_ids"].reshape(1, -1) for s in samples])
        result = run_llmc_runner(python, runner, model_dir, calib, evaluation, ["--settings", json.dumps(wanted)])
        for label, item in zip(args["settings"], result["results"]):
            per_window = torch.tensor(item["window_losses"], dtype=torch.float64)
            gaps, start = {}, 0
            for name in names:
                count = windows[name].shape[0]
                gaps[f"heldout/{name}"] = float((per_window[start : start + count] - fp[name]).mean())
                start += count
            out.append({"model": model_name, "seed": seed, "setting": label, "gap": sum(gaps.values()) / len(gaps),
                        "by_corpus": gaps, "seconds": item["seconds"], "llmcompressor": result["llmcompressor"]})
        print(json.dumps(out[-len(args["settings"]):]), file=sys.stderr, flush=True)
    return out


def _ratio_stats(mine: list[float], base: list[float]) -> dict:
    ratios = [a / b for a, b in zip(mine, base) if b > 0]
    mean, se = mean_se(ratios) if ratios else (float("nan"), float("nan"))
    diff, diff_se = mean_se([a - b for a, b in zip(mine, base)])  # in nats: beyond noise where |diff| > 2 SE
    return {"mean": round(mean, 3), "se": round(se, 3), "of_means": round(sum(mine) / sum(base), 3) if sum(base) > 0 else None,
            "draws_above_1": sum(r > 1 for r in ratios), "diff": round(diff, 5), "diff_se": round(diff_se, 5)}


def part_rows(rows: list[dict], part: str) -> list[dict]:
    """The rows restricted to one evaluation part ("validation" or "heldout"): its corpora only, each variant's
    overall gap the mean over them."""
    out = []
    for row in rows:
        keep = {n.split("/", 1)[1]: n for n in row["fp_loss"] if n.split("/", 1)[0] == part}
        if not keep:
            continue
        new = {k: v for k, v in row.items() if not isinstance(v, dict) or "by_corpus" not in v}
        new["fp_loss"] = {short: row["fp_loss"][full] for short, full in keep.items()}
        for name, value in row.items():
            if isinstance(value, dict) and "by_corpus" in value and all(f in value["by_corpus"] for f in keep.values()):
                by_corpus = {short: value["by_corpus"][full] for short, full in keep.items()}
                new[name] = {**value, "by_corpus": by_corpus, "gap": sum(by_corpus.values()) / len(by_corpus)}
        out.append(new)
    return out


def summarise(rows: list[dict], names: list[str], base: str) -> dict:
    """Per model and setting: every variant's gaps (overall, per corpus) and ratios to `base`, over the draws that
    ran it (its "draws"; ratios paired with `base` on those draws)."""
    out: dict = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        for label in dict.fromkeys(r["setting"] for r in rows if r["model"] == model):
            cell_rows = [r for r in rows if r["model"] == model and r["setting"] == label]
            corpora = list(cell_rows[0]["fp_loss"])
            cell: dict = {"group_size": cell_rows[0]["group_size"], "draws": len(cell_rows)}
            for name in names:
                mine = [r for r in cell_rows if name in r]
                if not mine:
                    continue
                gap, gap_se = mean_se([r[name]["gap"] for r in mine])
                entry: dict = {"draws": len(mine), "seeds": [r["seed"] for r in mine], "gap": round(gap, 5),
                               "gap_se": round(gap_se, 5),
                               "calib_cpu_s": round(sum(r[name].get("calib_cpu_s", r[name].get("seconds", 0)) for r in mine) / len(mine), 2),
                               "by_corpus": {}}
                for corpus in corpora:
                    value, value_se = mean_se([r[name]["by_corpus"][corpus] for r in mine])
                    entry["by_corpus"][corpus] = {"gap": round(value, 5), "gap_se": round(value_se, 5)}
                if all(base in r for r in mine) and name != base:
                    entry[f"over_{base}"] = _ratio_stats([r[name]["gap"] for r in mine], [r[base]["gap"] for r in mine])
                    worst = None
                    for corpus in corpora:
                        stats = _ratio_stats([r[name]["by_corpus"][corpus] for r in mine],
                                             [r[base]["by_corpus"][corpus] for r in mine])
                        entry["by_corpus"][corpus][f"over_{base}"] = stats
                        if worst is None or stats["mean"] > worst[1]:
                            worst = (corpus, stats["mean"])
                    entry[f"worst_corpus_over_{base}"] = {"corpus": worst[0], "mean_ratio": worst[1],
                                                          "of_means": max(entry["by_corpus"][c][f"over_{base}"]["of_means"] or 0
                                                                          for c in corpora)}
                cell[name] = entry
            out[f"{model}/{label}"] = cell
    return out


def attach_llmc(rows: list[dict], llmc_rows: list[dict]) -> None:
    """Put each llm-compressor result beside quantkit's row of the same model, draw and setting (as variant "llmc")."""
    for item in llmc_rows:
        key = (item["model"], item["seed"], item["setting"])
        for row in rows:
            if (row["model"], row["seed"], row["setting"]) == key:
                row["llmc"] = item


def summaries(rows: list[dict], names: list[str], base: str) -> dict:
    """The per-part summaries against `base` (and against llm-compressor on the held-out text where it ran)."""
    out = {}
    parts = dict.fromkeys(n.split("/", 1)[0] for r in rows for n in r["fp_loss"])  # validation, heldout, heldout_firstN
    for part in parts:
        out[f"summary_{part}"] = summarise(part_rows(rows, part), names, base)
    if any("llmc" in r for r in rows):
        with_llmc = [r for r in part_rows(rows, "heldout") if "llmc" in r]
        out["summary_heldout_over_llmc"] = summarise(with_llmc, [*names, "llmc"], "llmc")
    return out


def read_output(path: Path) -> dict:
    """An earlier output (-o JSON), or the rows its run logged so far (its stderr: one JSON line per draw and
    setting, a list per llm-compressor draw) where it has not finished."""
    text = path.read_text()
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict) and "model" not in whole:  # an output, not a log of one row
        return whole
    lines = [json.loads(line) for line in text.splitlines() if line.startswith(("{\"model\"", "[{\"model\""))]
    return {"rows": [x for x in lines if isinstance(x, dict)],
            "llmc_rows": [item for x in lines if isinstance(x, list) for item in x]}


def merge(outputs: list[dict], base: str) -> dict:
    """One summary over several outputs' rows (each (model, draw, setting) once; llm-compressor rows attached)."""
    rows: dict[tuple, dict] = {}
    llmc_rows, names, variants = [], [], {}
    for output in outputs:
        for row in output.get("rows", []):
            key = (row["model"], row["seed"], row["setting"])
            rows[key] = {**rows.get(key, {}), **row}
        llmc_rows += output.get("llmc_rows", [])
        variants |= output.get("variants", {})
    attach_llmc(list(rows.values()), llmc_rows)
    for row in rows.values():
        names += [n for n, v in row.items() if isinstance(v, dict) and "by_corpus" in v and n != "llmc" and n not in names]
    # a variant counts where every row of its (model, setting) has it
    out = {"merged": len(outputs), "models": sorted({k[0] for k in rows}), "variants": variants, "base": base}
    by_cell: dict[tuple, list[dict]] = {}
    for (model, _, setting), row in rows.items():
        by_cell.setdefault((model, setting), []).append(row)
    complete = [r for cell in by_cell.values() for r in cell]
    out |= summaries(complete, names, base)
    out["rows"] = complete
    return out


def main() -> None:
    """Run every (model, draw) (in parallel processes with --jobs) and print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ref-lm"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--windows", type=lambda v: None if v == "all" else int(v), default=48,
                        help="evaluation windows per corpus, or 'all': every whole window of each held-out part")
    parser.add_argument("--first", type=int, help="with --windows all: also each corpus's gap over its first FIRST "
                        "held-out windows, from the same quantized models (summary_heldout_firstFIRST)")
    parser.add_argument("--settings", nargs="+", default=["W2", "W3"], choices=list(SETTINGS))
    parser.add_argument("--variants", nargs="+", default=["gptq_fp", "tlq"], choices=list(VARIANTS))
    parser.add_argument("--base", default="gptq_fp", help="the variant every ratio is taken against")
    parser.add_argument("--heldout", action="store_true", help="evaluate on the held-out part (final figures only)")
    parser.add_argument("--eval", choices=("validation", "heldout", "both"), default=None,
                        help="which text scores the draws (--heldout = heldout; both: the same quantized models on "
                        "validation windows, for choosing, and held-out windows, for reporting)")
    parser.add_argument("--llmc", help="python of an llm-compressor venv: its GPTQ on the same windows (--heldout)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--cost", action="store_true", help="CPU seconds of importance + calibration over GPTQ + FP "
                        "target (first model, first setting, draw 0)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--llmc-only", action="store_true", help="run llm-compressor only (rows to --merge later)")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="summarise the rows of earlier outputs together "
                        "(separate processes per model, llm-compressor run apart); nothing is run")
    parser.add_argument("-o", "--output")
    args = parser.parse_args()
    if args.merge:
        emit(merge([read_output(Path(f)) for f in args.merge], args.base), args.output)
        return
    args.eval = args.eval or ("heldout" if args.heldout else "validation")
    if args.windows is None and args.eval != "heldout":
        parser.error("--windows all takes every held-out window; validation windows need a count")
    if args.first and args.windows is not None:
        parser.error("--first compares against --windows all")
    if args.llmc and args.eval == "validation":
        parser.error("--llmc is compared on the held-out text; add --heldout")
    for name in args.models:
        resolve_model(name)
    if args.base not in args.variants:
        args.variants = [args.base, *args.variants]
    shared = {k: getattr(args, k) for k in ("nsamples", "seqlen", "windows", "first", "settings", "variants", "eval")}
    if args.cost:
        emit(run_cost(args.models[0], shared, args.repeats), args.output)
        return
    started = time.perf_counter()
    jobs = [] if args.llmc_only else [(m, s) for s in args.seeds for m in args.models]  # every model's first draws first
    results = in_processes(run_draw, [(m, s, shared) for m, s in jobs], args.jobs)
    rows = [row for result in results for row in result["rows"]]
    names = list(args.variants)
    llmc_rows = []
    if args.llmc:
        for model in args.models:
            llmc_rows += run_llmc(args.llmc, model, args.seeds, shared)
        attach_llmc(rows, llmc_rows)
        names.append("llmc")
    out = {"models": {m: resolve_model(m) for m in args.models}, "seeds": args.seeds, "nsamples": args.nsamples,
           "seqlen": args.seqlen, "eval": args.eval,
           "windows_per_corpus": results[0]["windows"] if results else None,
           "variants": {n: VARIANTS[n] for n in args.variants}, "base": args.base}
    if args.llmc_only:
        out["llmc_rows"] = llmc_rows
    out |= summaries(rows, names, args.base)
    out["rows"] = rows
    out["wall_s"] = round(time.perf_counter() - started, 1)
    emit(out, args.output)


if __name__ == "__main__":
    main()
