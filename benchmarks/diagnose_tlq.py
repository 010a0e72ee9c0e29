"""Issue #24, diagnosis: how TLQ's token weights distribute over corpora, token loss and position, per layer.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/diagnose_tlq.py --model ../shared/models/ref-lm/steps/step500 --seeds 0 1 \
        -o benchmarks/results/diagnose_tlq_step500.json
    ... --loss fisher -o benchmarks/results/diagnose_tlq_step500_fisher.json   # labels drawn from the model

For each calibration draw (128 x 256 windows from the train part of the four corpora, as the benchmarks
draw them) it computes the layer-output gradient scores s = ||dL/dy||^2 and TLQ's weights (lam 0.1, per
sample), the FP model's per-token loss, and every linear input's squared norm, and reports per layer:
- per corpus: share of the tokens, of the weight (sum w), and of each linear group's Hessian trace
  (sum_t w_t ||x_t||^2 against the uniform sum_t ||x_t||^2): the weight a corpus gains or loses in H;
- how the weight follows the token's own loss (the loss of predicting the next token at that position:
  high-loss tokens carry large CE gradients): Spearman correlation, the weight share of the 10% of
  tokens with the highest loss, and per corpus its mean token loss;
- how it follows position (share of the weight on the first 4 positions of each window);
- per corpus, the effective sample size of the weights.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REF_LM, TEXT_DIR, calibration_sources, corpus_offsets, emit, mean_se  # noqa: E402

GROUPS = {"qkv": "self_attn.q_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_proj", "down": "mlp.down_proj"}


def _rank(x: torch.Tensor) -> torch.Tensor:
    order = x.argsort()
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(x.numel(), dtype=torch.float64)
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors."""
    ra, rb = _rank(a), _rank(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@torch.no_grad()
def fp_statistics(model, samples: list[dict]) -> tuple[list[torch.Tensor], dict]:
    """Per sample the FP token loss [T] (position t predicts t + 1; the last position gets 0), and per layer
    and linear group the squared norm of the linear's input per token: {(layer, group): [samples] -> [T]}."""
    from quantkit.models import adapter_for, get_module

    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    norms: dict = {(i, g): [] for i in range(len(layers)) for g in GROUPS}
    handles = []
    for i, layer in enumerate(layers):
        for group, name in GROUPS.items():
            def hook(module, args, key=(i, group)):
                norms[key].append(args[0].detach().float().pow(2).sum(-1).reshape(-1))
            handles.append(get_module(layer, name).register_forward_pre_hook(hook))
    losses = []
    try:
        for sample in samples:
            ids = sample["input_ids"]
            logits = model(input_ids=ids).logits[0, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            losses.append(torch.cat([loss, torch.zeros(1)]))
    finally:
        for handle in handles:
            handle.remove()
    return losses, norms


def diagnose_draw(model_dir: str, seed: int, nsamples: int, seqlen: int, lam: float, loss_kind: str = "ce") -> dict:
    """Per layer: corpus shares of tokens, weight and Hessian trace; weight against token loss and position."""
    from transformers import AutoTokenizer

    from quantkit.data import calibration_samples
    from quantkit.importance import TokenImportance, importance_scores
    from quantkit.models import load_model

    torch.set_num_threads(1)
    model = load_model(model_dir, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = calibration_samples(str(TEXT_DIR), tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed, part="train")
    offsets = corpus_offsets(tokenizer)
    names = list(offsets)
    source = torch.cat(calibration_sources(tokenizer, samples, offsets, seed, seqlen, nsamples))
    losses, norms = fp_statistics(model, samples)
    loss = torch.cat(losses).double()
    scored = torch.ones(nsamples, seqlen, dtype=torch.bool)
    scored[:, -1] = False  # the last position predicts nothing inside its window
    scored = scored.reshape(-1)
    position = torch.arange(seqlen).repeat(nsamples)
    found = importance_scores(model, samples, progress=False, loss=loss_kind, seed=seed)
    weights = TokenImportance(found.layer, samples, lam=lam)
    out = {"seed": seed, "corpora": names,
           "token_share": {n: round(float((source == k).double().mean()), 4) for k, n in enumerate(names)},
           "mean_token_loss": {n: round(float(loss[scored & (source == k)].mean()), 4) for k, n in enumerate(names)},
           "layers": []}
    high = loss >= torch.quantile(loss[scored].float(), 0.9).double()
    for layer in range(len(weights.weights)):
        w = torch.cat(weights.weights[layer]).double()
        s = torch.cat(found.layer[layer]).double()
        entry = {"layer": layer, "spearman_score_vs_loss": round(spearman(s[scored], loss[scored]), 4),
                 "top10pct_loss_weight_share": round(float(w[high & scored].sum() / w[scored].sum()), 4),
                 "first4_positions_weight_share": round(float(w[position < 4].sum() / w.sum()), 4),
                 "first4_positions_token_share": round(4 / seqlen, 4), "by_corpus": {}}
        for k, n in enumerate(names):
            mine = source == k
            corpus = {"weight_share": round(float(w[mine].sum() / w.sum()), 4),
                      "ess_share": round(float(w[mine].sum() ** 2 / w[mine].pow(2).sum() / mine.sum()), 4),
                      "mean_score_over_all": round(float(s[mine].mean() / s.mean()), 4),
                      "spearman_score_vs_loss": round(spearman(s[mine & scored], loss[mine & scored]), 4)}
            for group in GROUPS:
                energy = torch.cat(norms[(layer, group)]).double()
                uniform = float(energy[mine].sum() / energy.sum())
                weighted = float((w * energy)[mine].sum() / (w * energy).sum())
                corpus[f"{group}_trace_share"] = [round(uniform, 4), round(weighted, 4)]
            entry["by_corpus"][n] = corpus
        out["layers"].append(entry)
    return out


def main() -> None:
    """Diagnose each draw and summarise over draws."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REF_LM))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--lam", type=float, default=0.1)
    parser.add_argument("--loss", default="ce", choices=["ce", "fisher"], help="the importance's labels: the data's, "
                        "or drawn from the model (Fisher)")
    parser.add_argument("-o", "--output")
    args = parser.parse_args()
    draws = [diagnose_draw(args.model, seed, args.nsamples, args.seqlen, args.lam, args.loss) for seed in args.seeds]
    summary = []
    for layer in range(len(draws[0]["layers"])):
        rows = [d["layers"][layer] for d in draws]
        entry = {"layer": layer}
        for key in ("spearman_score_vs_loss", "top10pct_loss_weight_share", "first4_positions_weight_share"):
            mean, se = mean_se([r[key] for r in rows])
            entry[key] = [round(mean, 4), round(se, 4)]
        entry["by_corpus"] = {}
        for name in draws[0]["corpora"]:
            cells = [r["by_corpus"][name] for r in rows]
            corpus = {key: round(sum(c[key] for c in cells) / len(cells), 4)
                      for key in ("weight_share", "ess_share", "mean_score_over_all", "spearman_score_vs_loss")}
            for group in GROUPS:
                pairs = [c[f"{group}_trace_share"] for c in cells]
                corpus[f"{group}_trace_share_uniform_weighted"] = [round(sum(p[i] for p in pairs) / len(pairs), 4) for i in (0, 1)]
            entry["by_corpus"][name] = corpus
        summary.append(entry)
    result = {"model": args.model, "seeds": args.seeds, "nsamples": args.nsamples, "seqlen": args.seqlen, "lam": args.lam,
              "loss": args.loss,
              "token_share": draws[0]["token_share"],
              "mean_token_loss": {n: round(sum(d["mean_token_loss"][n] for d in draws) / len(draws), 4)
                                  for n in draws[0]["corpora"]},
              "summary": summary, "draws": draws}
    emit(result, args.output)


if __name__ == "__main__":
    main()
