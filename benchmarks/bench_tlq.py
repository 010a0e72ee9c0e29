"""TLQ vs GPTQ vs RTN on the reference LM: held-out loss gap to FP, ablations, cost, importance memory.

Usage:
    python benchmarks/bench_tlq.py [--seeds 0 1] [--settings W3g64 W2g64] [--variants default p0.5 ...] [--eval-tokens 40960]
        [--fp-target off|on|both] [--jobs 2] [-o results.json]
    python benchmarks/bench_tlq.py --cost [--repeats 2] [--batch-sizes 1 16]   # importance vs GPTQ/TLQ calibration time
    python benchmarks/bench_tlq.py --cost --importance-only --batch-sizes 16      # the importance pass alone
    python benchmarks/bench_tlq.py --memory      # peak RSS: block-wise importance vs whole-model autograd

Calibration windows come from the "train" part (first 90%) of ../shared/data/text, evaluation from
the "heldout" part (last 10%). The reference LM is 192 wide: g128 does not divide it, so every
setting uses g64 (W4 g64 stands in for W4 g128); W2 is asymmetric, W3/W4 symmetric, the same for
every method. TLQ variants are compared on validation windows from the train part (disjoint from the
calibration windows), never on the held-out text. Prints one JSON object.

Recorded runs: results/bench_tlq_final.json (`--seeds 0 1 2 3 --variants default --fp-target both --jobs 2
--eval-tokens 196608`: the whole held-out part), results/bench_tlq_fp_sweep.json (variant choice with the FP
target, `--seeds 0 1 --variants default lam0.05 lam0.3 p0.5 top0.5 --fp-target on --jobs 2`),
results/bench_tlq_cost.json (`--cost --repeats 2 --batch-sizes 16`), results/bench_tlq.json (earlier ablations).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REF_LM, TEXT_DIR, in_processes  # noqa: E402

# (label, bits, group, sym): the same grid for every method. W2 is asymmetric (issue #3: "W2 g64 asym").
SETTINGS = [("W4g64", 4, 64, True), ("W3g64", 3, 64, True), ("W2g64", 2, 64, False)]
# TLQ variants: chosen on the validation windows (train part), never on the held-out text.
VARIANTS = {
    "default": {},
    "lam0.05": {"lam": 0.05},
    "lam0.3": {"lam": 0.3},
    "lam0.5": {"lam": 0.5},
    "p0.5": {"power": 0.5},
    "global": {"normalise": "global"},
    "top0.5": {"top_fraction": 0.5},
}
VALIDATION_SEED_OFFSET = 10_000


def _quantize(model, samples, bits, group, sym, method, token_weights=None, fp_target=False):
    from quantkit.engine import calibrate_model
    from quantkit.quant.spec import QuantSpec

    quantized = copy.deepcopy(model)
    started = time.perf_counter()
    calibrate_model(quantized, samples, QuantSpec(bits=bits, group_size=group, sym=sym), method=method,
                    token_weights=token_weights, progress=False, fp_target=fp_target)
    return quantized, time.perf_counter() - started


def _train_stream(tokenizer):
    from quantkit.data import resolve_texts, tokenize_documents

    return tokenize_documents(resolve_texts(str(TEXT_DIR), part="train"), tokenizer)


def validation_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, count: int) -> torch.Tensor:
    """[count, seqlen] windows of the train stream that overlap none of the calibration windows of `seed`.

    The calibration windows are redrawn exactly as quantkit.data.draw_windows draws them.
    """
    import random

    found = int(ids.numel())
    calib = random.Random(seed).sample(range(found - seqlen + 1), nsamples)
    taken = sorted(calib)
    picked: list[int] = []
    rng = random.Random(VALIDATION_SEED_OFFSET + seed)
    import bisect

    while len(picked) < count:
        start = rng.randrange(found - seqlen + 1)
        spots = taken
        k = bisect.bisect_left(spots, start)
        near = [spots[j] for j in (k - 1, k) if 0 <= j < len(spots)]
        if any(abs(start - other) < seqlen for other in near):
            continue
        bisect.insort(taken, start)
        picked.append(start)
    return torch.stack([ids[s : s + seqlen] for s in picked])


@torch.no_grad()
def windows_loss(model, windows: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over every predicted token of the windows."""
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        ids = windows[i : i + batch]
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    return total / count


def _methods(variants: list[str], fp_modes: list[bool]) -> list[tuple[str, str, str | None, bool]]:
    """(row name, engine method, TLQ variant, FP target) of every calibration a seed runs."""
    methods = [("rtn", "rtn", None, False), ("gptq", "gptq", None, False)]  # plain GPTQ: every ratio's base
    for fp in fp_modes:
        suffix = "_fp" if fp else ""
        if fp:
            methods.append(("gptq_fp", "gptq", None, True))
        methods += [(f"tlq_{v}{suffix}", "tlq", v, fp) for v in variants]
    return methods


def run_seed(seed: int, nsamples: int, seqlen: int, eval_tokens: int, settings: list[str], variants: list[str],
             fp_modes: list[bool]) -> dict:
    """One calibration draw: FP losses and every method's gaps per setting (one thread)."""
    from transformers import AutoTokenizer

    from quantkit.data import calibration_samples
    from quantkit.eval import evaluate_loss
    from quantkit.importance import TokenImportance, layer_output_gradients
    from quantkit.models import load_model

    torch.set_num_threads(1)
    model = load_model(str(REF_LM), dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(str(REF_LM))

    def heldout_loss(m) -> float:
        return evaluate_loss(m, tokenizer, str(TEXT_DIR), seqlen=256, max_tokens=eval_tokens, part="heldout", progress=False)["loss"]

    fp_heldout = heldout_loss(model)
    samples = calibration_samples(str(TEXT_DIR), tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed, part="train")
    val = validation_windows(_train_stream(tokenizer), nsamples, seqlen, seed, max(1, eval_tokens // 256))
    fp_val = windows_loss(model, val)
    started = time.perf_counter()
    scores, _, _ = layer_output_gradients(model, samples, progress=False)
    importance_seconds = time.perf_counter() - started
    rows = []
    for label, bits, group, sym in (s for s in SETTINGS if s[0] in settings):
        row = {"seed": seed, "setting": label, "sym": sym, "importance_s": round(importance_seconds, 2)}
        for name, method, variant, fp in _methods(variants, fp_modes):
            weights = TokenImportance(scores, samples, seed=seed, **VARIANTS[variant]) if variant else None
            quantized, seconds = _quantize(model, samples, bits, group, sym, method, weights, fp)
            row[f"{name}_gap"] = heldout_loss(quantized) - fp_heldout
            row[f"{name}_val_gap"] = windows_loss(quantized, val) - fp_val
            row[f"{name}_calib_s"] = round(seconds, 2)
            del quantized
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return {"fp_loss": fp_heldout, "fp_val_loss": fp_val, "rows": rows}


def run_quality(seeds: list[int], nsamples: int, seqlen: int, eval_tokens: int, settings: list[str], variants: list[str],
                fp_modes: list[bool], jobs: int = 1) -> dict:
    """RTN/GPTQ/TLQ(+variants, with and without the FP target) gaps to FP per seed and setting, on
    validation windows and held-out text.

    Validation: `eval_tokens` worth of 256-token windows from the train part, disjoint from the
    calibration windows. Held-out: the first `eval_tokens` of the held-out part. Variant choice
    (`chosen`) uses validation numbers only: the lowest mean TLQ/GPTQ gap ratio over seeds and the
    W3/W2 settings. `jobs` seeds run at once, each in its own process.
    """
    args = (nsamples, seqlen, eval_tokens, settings, variants, fp_modes)
    per_seed = in_processes(run_seed, [(seed, *args) for seed in seeds], jobs)
    out: dict = {"fp_loss": per_seed[0]["fp_loss"], "eval_tokens": eval_tokens, "nsamples": nsamples, "seqlen": seqlen,
                 "variants": {v: VARIANTS[v] for v in variants}, "fp_target": fp_modes,
                 "fp_val_loss": {str(seed): r["fp_val_loss"] for seed, r in zip(seeds, per_seed)},
                 "runs": [row for r in per_seed for row in r["rows"]]}
    names = [name for name, *_ in _methods(variants, fp_modes)]
    tlq_names = [n for n in names if n.startswith("tlq_")]
    for row in out["runs"]:
        for name in tlq_names:
            base = "gptq_fp" if name.endswith("_fp") else "gptq"
            for kind in ("", "_val"):
                ref = row[f"{base}{kind}_gap"]
                row[f"{name}_over_{base}{kind}"] = row[f"{name}{kind}_gap"] / ref if ref > 0 else None
                if base != "gptq":
                    row[f"{name}_over_gptq{kind}"] = row[f"{name}{kind}_gap"] / row[f"gptq{kind}_gap"] if row[f"gptq{kind}_gap"] > 0 else None
    summary = {}
    chosen_settings = [s for s in SETTINGS if s[0] in settings]
    for label, *_ in chosen_settings:
        rows = [r for r in out["runs"] if r["setting"] == label]
        means = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k.endswith("_gap")}
        for name in names:
            if name == "gptq":
                continue
            for kind in ("", "_val"):
                ref = means[f"gptq{kind}_gap"]
                means[f"{name}_over_gptq{kind}_of_means"] = means[f"{name}{kind}_gap"] / ref if ref > 0 else None
        summary[label] = means
    out["summary"] = summary
    low_bit = [label for label, bits, *_ in chosen_settings if bits <= 3] or [s[0] for s in chosen_settings]
    val_score = {n: sum(summary[label][f"{n}_over_gptq_val_of_means"] for label in low_bit) / len(low_bit) for n in tlq_names}
    out["validation_choice"] = {"rule": f"min mean over {low_bit} of TLQ/GPTQ validation gap ratio", "scores": val_score,
                                "chosen": min(val_score, key=val_score.get)}
    return out


def run_cost(nsamples: int, seqlen: int, repeats: int, batch_sizes: list[int], importance_only: bool = False) -> dict:
    """Wall and CPU seconds of importance (per batch size), GPTQ and TLQ calibration (without and with the FP
    target), interleaved; min over repeats."""
    from transformers import AutoTokenizer

    from quantkit.data import calibration_samples
    from quantkit.importance import TokenImportance, layer_output_gradients
    from quantkit.models import load_model

    torch.set_num_threads(1)
    model = load_model(str(REF_LM), dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(str(REF_LM))
    samples = calibration_samples(str(TEXT_DIR), tokenizer, nsamples=nsamples, seqlen=seqlen, seed=0, part="train")
    times: dict[str, list[tuple[float, float]]] = {}

    def clock(name, fn):
        wall, cpu = time.perf_counter(), time.process_time()
        value = fn()
        times.setdefault(name, []).append((time.perf_counter() - wall, time.process_time() - cpu))
        return value

    weights = None
    for _ in range(repeats):
        for size in batch_sizes:
            scores, _, _ = clock(f"importance_b{size}", lambda size=size: layer_output_gradients(model, samples, progress=False, batch_size=size))
            weights = TokenImportance(scores, samples)
        if importance_only:
            continue
        clock("gptq_calib", lambda: _quantize(model, samples, 3, 64, True, "gptq"))
        clock("tlq_calib", lambda weights=weights: _quantize(model, samples, 3, 64, True, "tlq", weights))
        clock("tlq_fp_calib", lambda weights=weights: _quantize(model, samples, 3, 64, True, "tlq", weights, True))
    best = {k: {"wall_s": round(min(w for w, _ in v), 2), "cpu_s": round(min(c for _, c in v), 2),
                "all_wall_s": [round(w, 2) for w, _ in v]} for k, v in times.items()}
    out = {"nsamples": nsamples, "seqlen": seqlen, "setting": "W3g64 sym", "threads": 1, "repeats": repeats, "times": best}
    if importance_only:
        return out
    for size in batch_sizes:
        for unit in ("wall_s", "cpu_s"):
            for calib, suffix in (("tlq_calib", ""), ("tlq_fp_calib", "_fp")):
                out[f"cost_ratio{suffix}_b{size}_{unit}"] = round(
                    (best[f"importance_b{size}"][unit] + best[calib][unit]) / best["gptq_calib"][unit], 3
                )
    return out


def _memory_child(mode: str) -> dict:
    """Peak RSS growth of one importance pass on a random 12-layer, 512-wide Llama (8 x 512 tokens)."""
    import tempfile

    from transformers import LlamaConfig, LlamaForCausalLM

    from quantkit.importance import layer_output_gradients, masked_token_loss, scored_positions

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=12,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024)
    model = LlamaForCausalLM(config).eval()
    samples = [{"input_ids": torch.randint(0, 8000, (1, 512))} for _ in range(8)]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    if mode == "whole":
        for p in model.parameters():
            p.requires_grad_(False)
        outputs: list[torch.Tensor] = []

        def keep(module, args, output):
            outputs.append(output[0] if isinstance(output, tuple) else output)

        for sample in samples:
            outputs.clear()
            hooks = [layer.register_forward_hook(keep) for layer in model.model.layers]
            embeds = model.model.embed_tokens(sample["input_ids"]).requires_grad_(True)
            logits = model(inputs_embeds=embeds).logits
            for hook in hooks:
                hook.remove()
            loss = masked_token_loss(logits, sample["input_ids"], scored_positions(sample))
            grads = torch.autograd.grad(loss, outputs)
            [g.pow(2).sum(-1) for g in grads]
    elif mode == "offload":
        with tempfile.TemporaryDirectory() as tmp:
            layer_output_gradients(model, samples, progress=False, offload_dir=tmp)
    else:
        layer_output_gradients(model, samples, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "peak_growth_mb": round(peak - base, 1), "seconds": round(time.perf_counter() - started, 2)}


def run_memory() -> dict:
    """Each mode in a fresh process, so peaks do not mix."""
    results = {}
    for mode in ("whole", "blockwise", "offload"):
        done = subprocess.run([sys.executable, __file__, "--memory-child", mode], capture_output=True, text=True, check=True)
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def main() -> None:
    """Parse arguments, run, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=40960)
    parser.add_argument("--settings", nargs="+", default=["W3g64", "W2g64"], choices=[s[0] for s in SETTINGS])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="TLQ variants to run")
    parser.add_argument("--fp-target", choices=["off", "on", "both"], default="both",
                        help="run GPTQ and TLQ without, with, or both without and with the FP target")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at once, one process (one thread) each")
    parser.add_argument("-o", "--output", help="also write the JSON here")
    parser.add_argument("--cost", action="store_true", help="time importance, GPTQ and TLQ calibration (1 thread)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--importance-only", action="store_true", help="with --cost: time only the importance pass")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--memory-child", default=None)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(_memory_child(args.memory_child)))
        return
    if args.memory:
        print(json.dumps(run_memory()))
        return
    if not (REF_LM / "config.json").is_file():
        sys.exit(f"reference model not found at {REF_LM}")
    if args.cost:
        print(json.dumps(run_cost(args.nsamples, args.seqlen, args.repeats, args.batch_sizes, args.importance_only)))
        return
    fp_modes = {"off": [False], "on": [True], "both": [False, True]}[args.fp_target]
    result = run_quality(args.seeds, args.nsamples, args.seqlen, args.eval_tokens, args.settings, args.variants, fp_modes,
                         args.jobs)
    text = json.dumps(result)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
