"""Issue #24, round 5: what TLQ's mix guard does, and where TLQ's per-corpus loss comes from (bench_domains.py's
calibration windows: 128 x 128 tokens per draw from the train part of the four corpora, each token's corpus as its
source).

Usage (one process each, OMP_NUM_THREADS=1):
    python benchmarks/tlq_guard_check.py identity --models ref-lm step500 --seeds 0 1 2 3 --settings W3 W2
        # per (model, draw, setting): the guard's chosen shares, how many weight entries differ from GPTQ + FP
        # target's (0: the same model, so the same loss on any text), each checked group's held-out error of
        # TLQ's candidate (share 0) over uniform (worst source, mean over sources, worst z), CPU seconds
    python benchmarks/tlq_guard_check.py swap --models ref-lm --seeds 0 --settings W3
        # held-out gap per corpus (96 x 128 tokens each) of GPTQ + FP target (A), TLQ (B) and hybrids: A with one
        # decoder layer of B, B with one layer of A, A with one kind of linear of B in every layer; each hybrid's
        # difference to A per corpus, mean +- SE over the held-out windows
Prints one JSON line per (model, draw, setting) to stderr and one JSON object to stdout (or -o).
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
import bench_domains as bd  # noqa: E402
from common import (  # noqa: E402
    SHARED,
    calibration_sources,
    corpus_offsets,
    emit,
    heldout_corpus_windows,
    window_losses,
)

TLQ_KEY = tuple(bd.TLQ[k] for k in bd.GRADIENT_KEYS)


def draw(model_name: str, seed: int):
    """(model, tokenizer, calibration samples with source_ids, TLQ's importance scores with output factors, CPU s)."""
    from transformers import AutoTokenizer

    from quantkit.data import calibration_samples
    from quantkit.importance import importance_scores
    from quantkit.models import load_model

    model_dir = bd.resolve_model(model_name)
    model = load_model(model_dir, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = calibration_samples(str(SHARED / "data" / "text"), tokenizer, nsamples=128, seqlen=128, seed=seed,
                                  part="train")
    for sample, ids in zip(samples, calibration_sources(tokenizer, samples, corpus_offsets(tokenizer), seed, 128, 128)):
        sample["source_ids"] = ids.unsqueeze(0)
    started = time.process_time()
    scores = {TLQ_KEY: importance_scores(model, samples, progress=False, seed=seed, output_factors=True,
                                         **dict(zip(bd.GRADIENT_KEYS, TLQ_KEY)))}
    return model, tokenizer, samples, scores, time.process_time() - started


def spec_for(model, label: str):
    """bench_domains' QuantSpec of a setting (W2 g64, W3 g64 on these models)."""
    from quantkit.quant.spec import QuantSpec

    bits, choices = bd.SETTINGS[label]
    return QuantSpec(bits=bits, group_size=bd.group_size(model, choices), sym=True)


def identity(model_name: str, seed: int, settings: list[str]) -> list[dict]:
    """The guard against GPTQ + FP target, weight for weight, and its checks."""
    model, _, samples, scores, importance_s = draw(model_name, seed)
    out = []
    for label in settings:
        spec = spec_for(model, label)
        base, base_s, _ = bd.calibrate_variant(model, samples, spec, bd.VARIANTS["gptq_fp"], scores, seed)
        guard, guard_s, report = bd.calibrate_variant(model, samples, spec, bd.VARIANTS["tlq_guard_z2s"], scores, seed)
        a, b = base.state_dict(), guard.state_dict()
        checks = {str(layer["layer"]): {n: e["mix"]["held_out_error_over_uniform"]["0.0"]
                                        for n, e in layer["linears"].items()
                                        if "held_out_error_over_uniform" in e.get("mix", {}) and n.endswith(("q_proj", "gate_proj"))}
                  for layer in report["layers"]}
        out.append({"model": model_name, "seed": seed, "setting": label,
                    "shares": sorted({e["mix"]["uniform_share"] for layer in report["layers"] for e in layer["linears"].values()}),
                    "weights_differing": sum(int((a[k] != b[k]).sum()) for k in a),
                    "quantized_weights": sum(a[k].numel() for k in a if "layers." in k and k.endswith("proj.weight")),
                    "cpu_s": {"importance": round(importance_s, 2), "gptq_fp": round(base_s, 2), "guard": round(guard_s, 2)},
                    "guard_over_gptq_fp": round((importance_s + guard_s) / base_s, 3), "share0_check": checks})
        print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out


def swap(model_name: str, seed: int, settings: list[str]) -> list[dict]:
    """Per-corpus held-out gaps of GPTQ + FP target, TLQ and the layer / linear-kind hybrids."""
    model, tokenizer, samples, scores, _ = draw(model_name, seed)
    windows = heldout_corpus_windows(tokenizer, 128, 96)
    fp = {n: window_losses(model, w) for n, w in windows.items()}
    out = []
    for label in settings:
        spec = spec_for(model, label)
        a_model, _, _ = bd.calibrate_variant(model, samples, spec, bd.VARIANTS["gptq_fp"], scores, seed)
        b_model, _, _ = bd.calibrate_variant(model, samples, spec, bd.VARIANTS["tlq"], scores, seed)
        per_a = {n: window_losses(a_model, w) - fp[n] for n, w in windows.items()}
        a, b = a_model.state_dict(), b_model.state_dict()
        layers = len([k for k in a if k.endswith("mlp.down_proj.weight")])
        kinds = {"q_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",), "gate_proj": ("gate_proj", "up_proj"),
                 "down_proj": ("down_proj",)}
        hybrids = {"tlq": (b, lambda key: False)}
        hybrids |= {f"A_with_B_layer{i}": (a, lambda key, i=i: f"layers.{i}." in key) for i in range(layers)}
        hybrids |= {f"B_with_A_layer{i}": (b, lambda key, i=i: f"layers.{i}." in key) for i in range(layers)}
        hybrids |= {f"A_with_B_{kind}": (a, lambda key, names=names: any(f".{n}." in key for n in names))
                    for kind, names in kinds.items()}
        row = {"model": model_name, "seed": seed, "setting": label,
               "gptq_fp": {n: round(float(v.mean()), 6) for n, v in per_a.items()}}
        for name, (start, take_other) in hybrids.items():
            other = b if start is a else a
            hybrid = copy.deepcopy(a_model)
            hybrid.load_state_dict({k: other[k] if take_other(k) else v for k, v in start.items()})
            entry = {}
            for corpus, w in windows.items():
                d = window_losses(hybrid, w) - fp[corpus] - per_a[corpus]
                entry[corpus] = [round(float(d.mean()), 6), round(float(d.std() / d.numel() ** 0.5), 6)]
            row[name] = {"minus_gptq_fp": entry}
            del hybrid
        out.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return out


def main() -> None:
    """Run one check over the models, draws and settings given; print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=("identity", "swap"))
    parser.add_argument("--models", nargs="+", default=["ref-lm"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--settings", nargs="+", default=["W3"], choices=list(bd.SETTINGS))
    parser.add_argument("-o", "--output")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for model_name in args.models:
        for seed in args.seeds:
            rows += (identity if args.check == "identity" else swap)(model_name, seed, args.settings)
    emit({"check": args.check, "argv": sys.argv[1:], "rows": rows}, args.output)


if __name__ == "__main__":
    main()
