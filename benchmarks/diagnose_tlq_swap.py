"""Issue #24, diagnosis: where TLQ's per-corpus gap against GPTQ + FP target arises, by swapping linears.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/diagnose_tlq_swap.py --model step250 --seeds 0 1 --setting W2 \
        --variant os_u128_si0.1 --corpus tinyshakespeare.txt -o benchmarks/results/diagnose_tlq_swap_step250.json
    ... --no-swap    # without the swaps: a third of the time

Per calibration draw (bench_domains.py's draw: 128 x 128 train-part windows of the four corpora) it quantizes the
model with GPTQ + FP target and with the TLQ variant exactly as bench_domains.py does, and on every held-out window:
- --corpus's CE gap to FP (equal to bench_domains.py's rows) and its KL(FP || quantized): the damage without
  the label noise of a loss difference (an under-trained model can lose less CE after quantizing by chance);
- per layer, and per kind of linear (q_proj, ..., down_proj of every layer): the CE gap on --corpus of the GPTQ + FP
  model with those linears' weights taken from the TLQ model, minus the GPTQ + FP model's (their share of TLQ's
  difference there);
- the draw itself: each corpus's share of the calibration windows, and per linear each corpus's share of the trace
  of the output-side factor G = sum_t g_t g_t^T (g_t: the CE gradient at the linear's output, whole-model autograd,
  independent of quantkit's pass), the share of tr G carried by the top 1% of tokens, G's effective rank per block
  (tr(G)^2 / ||G||_F^2, averaged over blocks) and the Frobenius cosine between G and --corpus's own part of it.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_domains import (  # noqa: E402
    GRADIENT_KEYS,
    SETTINGS,
    VARIANTS,
    calibrate_variant,
    gradient_pass,
    group_size,
    resolve_model,
)
from common import (  # noqa: E402
    SHARED,
    calibration_sources,
    corpus_offsets,
    emit,
    heldout_corpus_windows,
    window_losses,
    windows_kl,
)


def linear_names(model) -> list[str]:
    """The decoder layers' linears, by module name."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


def factor_statistics(model, samples: list[dict], names: list[str], corpus: int, block: int = 128) -> dict:
    """Per linear: each corpus's share of tr G, the top 1% tokens' share, G's effective rank per block, and the
    cosine between G and the part of G from corpus `corpus` (whole-model autograd, CE summed over tokens)."""
    modules = dict(model.named_modules())
    factor: dict[str, torch.Tensor] = {}
    part: dict[str, torch.Tensor] = {}
    norms: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    current = {}

    def add(name: str, grad: torch.Tensor) -> None:
        g = grad.detach()[0].double()  # [T, out]
        width = math.gcd(block, g.shape[1])
        blocks = g.reshape(g.shape[0], -1, width)
        mine = blocks[current["source"] == corpus]
        factor[name] = factor.get(name, 0) + torch.einsum("tnb,tnc->nbc", blocks, blocks)
        part[name] = part.get(name, 0) + torch.einsum("tnb,tnc->nbc", mine, mine)
        norms[name].append(g.square().sum(1))

    def hook(name):
        def forward(module, args, output):
            output.register_hook(lambda g: add(name, g))
        return forward

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    sources = []
    try:
        for sample in samples:
            ids = sample["input_ids"]
            current["source"] = sample["source_ids"][0]
            sources.append(current["source"])
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=ids).logits[0, :-1]
            torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    source = torch.cat(sources)
    out = {}
    for name in names:
        each = torch.cat(norms[name])
        top = each.topk(max(1, each.numel() // 100)).values.sum()
        trace = torch.diagonal(factor[name], dim1=1, dim2=2).sum(-1)
        out[name] = {
            "trace_share": {int(k): round(float(each[source == k].sum() / each.sum()), 4)
                            for k in source.unique().tolist() if k >= 0},
            "top1pct_token_trace_share": round(float(top / each.sum()), 4),
            "effective_rank_per_block": round(float((trace.square() / factor[name].square().sum((1, 2))).mean()), 2),
            "block": factor[name].shape[1],
            "cosine_with_corpus_part": round(float((factor[name] * part[name]).sum()
                                                   / (factor[name].norm() * part[name].norm())), 4),
        }
    return out


def diagnose_draw(model_name: str, seed: int, setting: str, variant: str, corpus: str, nsamples: int, seqlen: int,
                  swap: bool = True) -> dict:
    """One draw: --corpus's CE gaps and KLs of both models, the per-layer and per-kind swaps, the draw's factors."""
    from transformers import AutoTokenizer

    from quantkit.data import calibration_samples
    from quantkit.models import load_model
    from quantkit.quant.spec import QuantSpec

    torch.set_num_threads(1)
    model_dir = resolve_model(model_name)
    model = load_model(model_dir, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = calibration_samples(str(SHARED / "data" / "text"), tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed,
                                  part="train")
    offsets = corpus_offsets(tokenizer)
    corpora = list(offsets)
    for sample, ids in zip(samples, calibration_sources(tokenizer, samples, offsets, seed, seqlen, nsamples)):
        sample["source_ids"] = ids.unsqueeze(0)
    windows = heldout_corpus_windows(tokenizer, seqlen, None)[corpus]  # every window; the other corpora's gaps are
    # bench_domains.py's rows of the same draw (deterministic), so only `corpus` is scored here
    fp = window_losses(model, windows)
    bits, choices = SETTINGS[setting]
    spec = QuantSpec(bits=bits, group_size=group_size(model, choices), sym=True)
    options = VARIANTS[variant]["importance"]
    key = tuple(options[k] for k in GRADIENT_KEYS)
    scores = {key: gradient_pass(model, samples, key, seed=seed)}
    base, _, _ = calibrate_variant(model, samples, spec, VARIANTS["gptq_fp"], {}, seed)
    tlq, _, _ = calibrate_variant(model, samples, spec, VARIANTS[variant], scores, seed)
    gb, gt = window_losses(base, windows) - fp, window_losses(tlq, windows) - fp
    diff = gt - gb
    out = {"seed": seed, "corpora": corpora,
           "calibration_window_share": {n: round(sum(int(s["source_ids"][0, seqlen // 2]) == k for s in samples)
                                                 / nsamples, 4) for k, n in enumerate(corpora)},
           "fp_loss": float(fp.mean()), "gap_gptq_fp": float(gb.mean()), "gap_tlq": float(gt.mean()),
           "diff": float(diff.mean()), "diff_se_over_windows": float(diff.std() / math.sqrt(diff.numel())),
           "kl_gptq_fp": windows_kl(base, model, windows), "kl_tlq": windows_kl(tlq, model, windows)}
    names = linear_names(model)
    base_modules, tlq_modules = dict(base.named_modules()), dict(tlq.named_modules())

    def swapped(mine: list[str]) -> float:
        """The GPTQ + FP model's gap with the linears `mine` from the TLQ model, minus its own."""
        kept = {n: base_modules[n].weight.data.clone() for n in mine}
        for n in mine:
            base_modules[n].weight.data.copy_(tlq_modules[n].weight.data)
        value = float((window_losses(base, windows) - fp).mean() - gb.mean())
        for n in mine:
            base_modules[n].weight.data.copy_(kept[n])
        return value

    layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in names})
    if not swap:  # 13 more scorings of the corpus: the swaps take twice the rest of a draw
        layers, names = [], []
    out["swap_layer"] = {layer: swapped([n for n in names if f".layers.{layer}." in n]) for layer in layers}
    kinds = list(dict.fromkeys(n.rsplit(".", 1)[1] for n in names))
    out["swap_kind"] = {kind: swapped([n for n in names if n.endswith(f".{kind}")]) for kind in kinds}
    stats = factor_statistics(model, samples, linear_names(model), corpora.index(corpus))
    out["factors"] = {n: {**s, "trace_share": {corpora[k]: v for k, v in s["trace_share"].items()}}
                      for n, s in stats.items()}
    return out


def main() -> None:
    """Diagnose each draw."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="step250")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--setting", default="W2", choices=list(SETTINGS))
    parser.add_argument("--variant", default="os_u128_si0.1", choices=list(VARIANTS))
    parser.add_argument("--corpus", default="tinyshakespeare.txt")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--no-swap", action="store_true", help="leave the swaps out (a third of the time)")
    parser.add_argument("-o", "--output")
    args = parser.parse_args()
    draws = []
    for seed in args.seeds:
        draws.append(diagnose_draw(args.model, seed, args.setting, args.variant, args.corpus, args.nsamples,
                                   args.seqlen, not args.no_swap))
        print(f"seed {seed} done", file=sys.stderr, flush=True)
        emit({"model": args.model, "setting": args.setting, "variant": args.variant, "corpus": args.corpus,
              "draws": draws}, args.output)


if __name__ == "__main__":
    main()
