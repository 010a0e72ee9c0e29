"""Issue #24, diagnosis: where one calibration draw's TLQ answer-NLL gap on the VLM comes from.

Usage (session 13: model-b-s1, W2 per-channel, the draw whose TLQ gap was 3.9x GPTQ + FP target's):

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/diagnose_vlm.py --model /work/bench-models/vlm-b-s1 \
        --workdir /tmp/vlm13/diag --seed 1602 --compare 1600,1601,1603 --bits 2 --heldout 2048 -o diag.json

For the draw --seed (its 64 samples drawn as bench_vlm.py draws them) it reports:
- token weights (quantkit's image-text TLQ default, lam --lam) per layer: the largest weight over the median, the
  effective sample size as a share of the tokens, the share of the weight on the top 1% of tokens, the share of
  tokens that carries half of the weight, the mean weight of image, target (answer or caption) and other text
  tokens, and the largest single weights with their sample, position and kind; the same per layer for the
  --compare draws (weights only), so that the draw can be read against ordinary ones;
- answer-NLL gaps to FP on --heldout questions of --split: GPTQ + FP target, TLQ, and exact hybrids calibrated
  again: TLQ's weights in one layer only (uniform elsewhere: GPTQ + FP target there) and in every layer but one;
- with --swap: the TLQ model with one linear's quantized weight taken from the GPTQ + FP target model, per linear
  (approximate: the layers above were solved on TLQ's outputs).
Prints one JSON object.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vlm import POOL_FACTOR, check_disjoint, model_task, quantized  # noqa: E402
from vlm_task import CALIB_SEED, EVAL_SEED, VAL_SEED, accuracy, make_examples, write_jsonl  # noqa: E402


def draw_samples(processor, task: str, seed: int, nsamples: int, workdir: Path) -> list[dict]:
    """The calibration samples of one draw, exactly as bench_vlm.py draws them."""
    from quantkit.data.images import image_text_samples

    pool = make_examples(POOL_FACTOR * nsamples, CALIB_SEED + seed, captions=0.15, task=task)
    return image_text_samples(write_jsonl(pool, workdir / f"seed{seed}"), processor, nsamples=nsamples, seed=seed)


def token_kinds(samples: list[dict]) -> list[torch.Tensor]:
    """Per sample [T] int: 0 image token, 1 target token (loss_mask: answer or caption), 2 other text."""
    from quantkit.importance import vision_tokens

    out = []
    for s in samples:
        kind = torch.full((int(s["input_ids"].shape[-1]),), 2)
        kind[s["loss_mask"].reshape(-1).bool()] = 1
        kind[vision_tokens(s)] = 0
        out.append(kind)
    return out


def layer_statistics(weights: list[torch.Tensor], valid: list[torch.Tensor], kinds: list[torch.Tensor],
                     top: int = 5) -> dict:
    """How one layer's token weights (per sample [T]) are spread: see the module docstring."""
    flat = torch.cat([w[v] for w, v in zip(weights, valid)]).double()
    kind = torch.cat([k[v] for k, v in zip(kinds, valid)])
    total = float(flat.sum())
    ordered = flat.sort(descending=True).values
    half = int((ordered.cumsum(0) < total / 2).sum()) + 1
    where = [(float(w[t]), index, t, int(k[t])) for index, (w, v, k) in enumerate(zip(weights, valid, kinds))
             for t in range(w.numel()) if v[t]]
    where.sort(reverse=True)
    names = ("image", "target", "text")
    return {
        "tokens": int(flat.numel()),
        "max_over_median": round(float(ordered[0] / flat.median()), 2),
        "ess_share": round(total**2 / float(flat.square().sum()) / flat.numel(), 4),
        "top1pct_share": round(float(ordered[: max(1, flat.numel() // 100)].sum()) / total, 4),
        "tokens_half_weight_share": round(half / flat.numel(), 4),
        "mean_weight": {names[k]: round(float(flat[kind == k].mean()), 4) for k in range(3) if bool((kind == k).any())},
        "weight_share": {names[k]: round(float(flat[kind == k].sum()) / total, 4) for k in range(3)},
        "largest": [{"weight": round(w, 2), "sample": i, "position": t, "kind": names[k]} for w, i, t, k in where[:top]],
    }


class LayersOnly:
    """TLQ's token weights in the chosen layers, uniform (GPTQ's) in the others."""

    def __init__(self, importance, layers: set[int]) -> None:
        self.importance, self.layers, self.floor = importance, layers, importance.floor

    def __call__(self, layer: int) -> list[torch.Tensor]:
        """The layer's weights per sample: TLQ's, or 1 on every real token."""
        if layer in self.layers:
            return self.importance(layer)
        return [v.float() for v in self.importance.valid]


@click.command()
@click.option("--model", "model_dir", required=True)
@click.option("--workdir", required=True, type=click.Path(path_type=Path))
@click.option("--seed", required=True, type=int, help="the calibration draw diagnosed")
@click.option("--compare", default="", help="other calibration draws: their token weights only")
@click.option("--bits", default=2, show_default=True)
@click.option("--nsamples", default=64, show_default=True)
@click.option("--heldout", "n_heldout", default=2048, show_default=True)
@click.option("--split", type=click.Choice(["heldout", "val"]), default="heldout", show_default=True)
@click.option("--lam", default=0.1, show_default=True)
@click.option("--swap", is_flag=True, help="also score the TLQ model with each linear taken from GPTQ + FP target's")
@click.option("--threads", default=1, show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None)
def main(model_dir: str, workdir: Path, seed: int, compare: str, bits: int, nsamples: int, n_heldout: int,
         split: str, lam: float, swap: bool, threads: int, output: Path | None) -> None:
    """Diagnose one draw and print JSON."""
    from quantkit.data.images import load_processor
    from quantkit.importance import tlq_token_weights
    from quantkit.models import load_model

    torch.set_num_threads(threads)
    started = time.perf_counter()
    others = [int(s) for s in compare.split(",") if s]
    eval_seed = EVAL_SEED if split == "heldout" else VAL_SEED
    check_disjoint(model_dir, [seed, *others], eval_seed)
    model = load_model(model_dir, dtype="float32")
    processor = load_processor(model_dir)
    task = model_task(model_dir)
    weights_report = {}
    importance = None
    for s in [seed, *others]:
        samples = draw_samples(processor, task, s, nsamples, workdir)
        found = tlq_token_weights(model, samples, lam=lam, progress=False)
        kinds = token_kinds(samples)
        weights_report[str(s)] = [layer_statistics(row, found.valid, kinds) for row in found.weights]
        if s == seed:
            importance, seed_samples = found, samples
    examples = make_examples(n_heldout, eval_seed, task=task)
    fp = accuracy(model, processor, examples)

    def gap(qmodel) -> dict:
        scores = accuracy(qmodel, processor, examples)
        # per question kind too: the draw's TLQ gap on s1 was almost all in `where` (results/bench_vlm_round11_heldout_s1)
        return {"all" if key == "answer_nll" else key.removeprefix("nll_"): round(scores[key] - fp[key], 6)
                for key in scores if key.startswith("nll_") or key == "answer_nll"}

    def calibrate(method: str, weights=None):
        return quantized(model, seed_samples, bits, True, -1, method, True, weights)

    gptq, *_ = calibrate("gptq")
    tlq, *_, names = calibrate("tlq", importance)
    gaps = {"gptq_fp": gap(gptq), "tlq_fp": gap(tlq)}
    print(json.dumps(gaps), file=sys.stderr, flush=True)
    layers = range(importance.num_layers)
    for layer in layers:
        gaps[f"tlq_layer{layer}_only"] = gap(calibrate("tlq", LayersOnly(importance, {layer}))[0])
        gaps[f"tlq_but_layer{layer}"] = gap(calibrate("tlq", LayersOnly(importance, set(layers) - {layer}))[0])
        print(json.dumps({k: v for k, v in gaps.items() if f"layer{layer}" in k}), file=sys.stderr, flush=True)
    swaps = {}
    if swap:
        modules = dict(tlq.named_modules())
        source = dict(gptq.named_modules())
        for name in names:
            kept = modules[name].weight.data.clone()
            modules[name].weight.data.copy_(source[name].weight.data)
            swaps[name] = gap(tlq)
            modules[name].weight.data.copy_(kept)
            print(json.dumps({name: swaps[name]}), file=sys.stderr, flush=True)
    report = {"model": model_dir, "seed": seed, "bits": bits, "split": split, "examples": n_heldout, "lam": lam,
              "fp_answer_nll": fp["answer_nll"], "gaps": gaps, "swap_to_gptq_fp": swaps,
              "token_weights": weights_report,
              "median_of_compare": {key: [statistics.median(weights_report[str(s)][layer][key] for s in others)
                                          for layer in layers] for key in ("max_over_median", "ess_share",
                                                                           "top1pct_share")} if others else None,
              "seconds": round(time.perf_counter() - started, 1)}
    text = json.dumps(report, indent=2)
    if output is not None:
        output.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
