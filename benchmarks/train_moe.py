"""Train the small mixture-of-experts LM of benchmarks/bench_moe.py (outside the repository).

A Qwen3-MoE-architecture model on the train part of ../shared/data/text (the first 90% of each corpus),
with ref-lm's tokenizer: 4 layers, hidden 128, 8 experts of width 128 per layer, 2 routed per token,
router load-balancing loss 0.01; 800 steps of 16 x 256 tokens (3.3 M tokens), AdamW, cosine schedule,
one thread (about 14 CPU minutes).

    python benchmarks/train_moe.py [--out /work/bench-models/moe-lm] [--steps 800] [--seed 0]
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoTokenizer

from quantkit.data import resolve_texts
from quantkit.train import train_causal_lm

CORPORA = ["tinyshakespeare.txt", "war_and_peace.txt", "wikitext2_test.txt", "wikitext2_valid.txt"]
MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, norm_topk_prob=True,
           router_aux_loss_coef=0.01, head_dim=32, decoder_sparse_step=1, mlp_only_layers=[])


def main() -> None:
    """Train and save the model; the path is printed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/work/bench-models/moe-lm")
    parser.add_argument("--data", default="/work/shared/data/text")
    parser.add_argument("--tokenizer", default="/work/shared/models/ref-lm")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0, help="another seed gives a second model of the same recipe")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    texts = resolve_texts(args.data, part="train")
    out = train_causal_lm(texts, args.out, tokenizer=tokenizer, hidden_size=128, num_layers=4, num_heads=4,
                          intermediate_size=384, seqlen=256, batch_size=16, steps=args.steps, lr=3e-3, seed=args.seed,
                          corpora=CORPORA, heldout="last 10% of each corpus", save_steps=(args.steps // 2,),
                          model_type="qwen3_moe", config_extra=MOE, progress=False)
    print(out)


if __name__ == "__main__":
    main()
