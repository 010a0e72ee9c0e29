"""Held-out accuracy of the shapes-task VLM under FP, RTN, GPTQ and TLQ at W4 and W3.

    python benchmarks/train_vlm.py --out /tmp/quantkit-vlm/model     # once, ~5 min
    python benchmarks/bench_vlm.py --model /tmp/quantkit-vlm/model

Calibration: image-text records (questions and captions on new images) written as JSONL under
--workdir and read with quantkit.data.images.image_text_samples, so the samples carry the
processor's outputs plus loss_mask (answer tokens) and vision_mask (image tokens). TLQ's token
weights come from quantkit.importance.tlq_token_weights on the FP model, once per calibration
seed, and are reused across bit widths. Only the language model's decoder-layer linears are
quantized; the vision tower, projector and lm_head stay FP. Prints one JSON object.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_vlm import EVAL_SEED  # noqa: E402
from vlm_task import accuracy, make_examples, write_jsonl  # noqa: E402

CALIB_SEED = 1_000_000  # calibration images: a seed range neither training nor evaluation uses


def quantized_accuracy(model, processor, samples, heldout, bits: int, group_size: int, method: str, weights=None) -> dict:
    """Accuracy of a copy of `model` quantized with `method` at `bits`."""
    from quantkit.engine.layerwise import calibrate_model
    from quantkit.quant.spec import QuantSpec

    qmodel = copy.deepcopy(model)
    spec = QuantSpec(bits=bits, group_size=group_size)
    started = time.perf_counter()
    calibrate_model(qmodel, samples, spec, method=method, token_weights=weights, progress=False)
    seconds = time.perf_counter() - started
    return {**accuracy(qmodel, processor, heldout), "calib_seconds": round(seconds, 2)}


@click.command()
@click.option("--model", "model_dir", default="/tmp/quantkit-vlm/model", show_default=True)
@click.option("--workdir", default="/tmp/quantkit-vlm/calib", show_default=True)
@click.option("--bits", default="4,3", show_default=True)
@click.option("--group-size", default=-1, show_default=True, help="-1: per-channel")
@click.option("--nsamples", default=64, show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True, help="calibration-sample seeds")
@click.option("--heldout", "n_heldout", default=768, show_default=True)
@click.option("--lam", default=0.1, show_default=True, help="TLQ floor weight")
@click.option("--methods", default="rtn,gptq,tlq", show_default=True)
@click.option("--threads", default=1, show_default=True)
def main(model_dir: str, workdir: str, bits: str, group_size: int, nsamples: int, seeds: str, n_heldout: int, lam: float, methods: str, threads: int) -> None:
    """Run the benchmark and print JSON."""
    from quantkit.data.images import image_text_samples, load_processor
    from quantkit.models import load_model

    torch.set_num_threads(threads)
    started = time.perf_counter()
    model = load_model(model_dir, dtype="float32")
    processor = load_processor(model_dir)
    heldout = make_examples(n_heldout, EVAL_SEED)
    pool = make_examples(4 * nsamples, CALIB_SEED, captions=0.15)
    jsonl = write_jsonl(pool, workdir)
    fp = accuracy(model, processor, heldout)
    bit_list = [int(b) for b in bits.split(",")]
    method_list = methods.split(",")
    runs: dict = {f"w{b}": {m: [] for m in method_list} for b in bit_list}
    for seed in (int(s) for s in seeds.split(",")):
        samples = image_text_samples(jsonl, processor, nsamples=nsamples, seed=seed)
        weights = None
        if "tlq" in method_list:
            from quantkit.importance import tlq_token_weights

            weights = tlq_token_weights(model, samples, lam=lam, progress=False)
        for b in bit_list:
            for method in method_list:
                result = quantized_accuracy(
                    model, processor, samples, heldout, b, group_size, method, weights if method == "tlq" else None
                )
                result["seed"] = seed
                runs[f"w{b}"][method].append(result)
                print(json.dumps({"bits": b, "method": method, **result}), file=sys.stderr, flush=True)
    summary = {}
    for key, per_method in runs.items():
        summary[key] = {}
        for method, results in per_method.items():
            accs = [r["accuracy"] for r in results]
            summary[key][method] = {
                "accuracy_mean": round(statistics.fmean(accs), 4),
                "accuracy_sd": round(statistics.stdev(accs), 4) if len(accs) > 1 else 0.0,
                "retained_pct": round(100 * statistics.fmean(accs) / fp["accuracy"], 2) if fp["accuracy"] else None,
                "answer_nll_mean": round(statistics.fmean(r["answer_nll"] for r in results), 4),
                "per_seed": [round(a, 4) for a in accs],
            }
    report = {
        "model": model_dir,
        "fp": fp,
        "settings": {"group_size": group_size, "nsamples": nsamples, "seeds": seeds, "heldout": n_heldout, "tlq_lam": lam},
        "summary": summary,
        "runs": runs,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
