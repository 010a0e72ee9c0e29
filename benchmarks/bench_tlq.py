"""TLQ vs GPTQ vs RTN on the reference LM: held-out loss gap to FP, ablations, cost, importance memory.

Usage:
    python benchmarks/bench_tlq.py [--seeds 0 1] [--nsamples 128] [--seqlen 256] [--eval-tokens 40000]
    python benchmarks/bench_tlq.py --memory      # peak RSS: block-wise importance vs whole-model autograd

Calibration windows come from the "train" part (first 90%) of ../shared/data/text, evaluation from
the "heldout" part (last 10%). The reference LM is 192 wide: g128 does not divide it, so every
setting uses g64 (W4 g64 stands in for W4 g128). Prints one JSON object.
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

SHARED = Path(__file__).resolve().parents[2] / "shared"
REF_LM = SHARED / "models" / "ref-lm"
TEXT_DIR = SHARED / "data" / "text"
SETTINGS = [("W4g64", 4, 64), ("W3g64", 3, 64), ("W2g64", 2, 64)]
ABLATIONS = [
    ("lam0", {"lam": 0.0}),
    ("lam0.5", {"lam": 0.5}),
    ("p0.5", {"power": 0.5}),
    ("p2", {"power": 2.0}),
    ("top0.25", {"top_fraction": 0.25}),
]


def _quantize(model, samples, bits, group, method, token_weights=None):
    from quantkit.engine import calibrate_model
    from quantkit.quant.spec import QuantSpec

    quantized = copy.deepcopy(model)
    started = time.perf_counter()
    calibrate_model(quantized, samples, QuantSpec(bits=bits, group_size=group), method=method, token_weights=token_weights, progress=False)
    return quantized, time.perf_counter() - started


def run_quality(seeds: list[int], nsamples: int, seqlen: int, eval_tokens: int, ablate_bits: tuple[int, ...]) -> dict:
    """Loss gaps of RTN/GPTQ/TLQ (and TLQ ablations) per seed and bit width."""
    from transformers import AutoTokenizer

    from quantkit.data import calibration_samples
    from quantkit.eval import evaluate_loss
    from quantkit.importance import TokenImportance, layer_output_gradients
    from quantkit.models import load_model

    torch.set_num_threads(2)
    model = load_model(str(REF_LM), dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(str(REF_LM))

    def loss_of(m) -> float:
        return evaluate_loss(m, tokenizer, str(TEXT_DIR), seqlen=256, max_tokens=eval_tokens, part="heldout", progress=False)["loss"]

    fp_loss = loss_of(model)
    out: dict = {"fp_loss": fp_loss, "eval_tokens": eval_tokens, "nsamples": nsamples, "seqlen": seqlen, "runs": []}
    for seed in seeds:
        samples = calibration_samples(str(TEXT_DIR), tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed, part="train")
        started = time.perf_counter()
        scores, report, _ = layer_output_gradients(model, samples, progress=False)
        importance_seconds = time.perf_counter() - started
        default = TokenImportance(scores, samples)
        for label, bits, group in SETTINGS:
            row = {"seed": seed, "setting": label, "importance_s": round(importance_seconds, 2)}
            for method, weights in (("rtn", None), ("gptq", None), ("tlq", default)):
                quantized, seconds = _quantize(model, samples, bits, group, "gptq" if method == "tlq" else method, weights)
                row[f"{method}_gap"] = loss_of(quantized) - fp_loss
                row[f"{method}_calib_s"] = round(seconds, 2)
            row["tlq_over_gptq"] = row["tlq_gap"] / row["gptq_gap"] if row["gptq_gap"] > 0 else None
            row["cost_ratio"] = (importance_seconds + row["tlq_calib_s"]) / row["gptq_calib_s"]
            if bits in ablate_bits:
                for name, options in ABLATIONS:
                    weights = TokenImportance(scores, samples, seed=seed, **options)
                    quantized, _ = _quantize(model, samples, bits, group, "gptq", weights)
                    row[f"tlq_{name}_gap"] = loss_of(quantized) - fp_loss
            out["runs"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    summary = {}
    for label, _, _ in SETTINGS:
        rows = [r for r in out["runs"] if r["setting"] == label]
        means = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k.endswith("_gap")}
        means["tlq_over_gptq_of_means"] = means["tlq_gap"] / means["gptq_gap"] if means["gptq_gap"] > 0 else None
        means["cost_ratio"] = sum(r["cost_ratio"] for r in rows) / len(rows)
        summary[label] = means
    out["summary"] = summary
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
    parser.add_argument("--eval-tokens", type=int, default=40000)
    parser.add_argument("--ablate-bits", type=int, nargs="*", default=[2, 3], help="bit widths to run the TLQ ablations at (none: skip)")
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
    print(json.dumps(run_quality(args.seeds, args.nsamples, args.seqlen, args.eval_tokens, tuple(args.ablate_bits))))


if __name__ == "__main__":
    main()
