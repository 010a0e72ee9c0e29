"""Train the extra reference LMs the benchmarks use beside ../shared/models/ref-lm (outside the repository).

Llamas on the train part of ../shared/data/text (the first 90% of each corpus) with ref-lm's tokenizer,
16 x 256-token batches, AdamW, cosine schedule, one thread; a checkpoint at half training in steps/:
- b: hidden 256, MLP 672, 4 layers, 8 heads, seed 1, 650 steps (steps/step325; about 28 CPU minutes);
- c: hidden 128, MLP 384, 4 layers, 4 heads, seed 2, 800 steps (steps/step400; about 25 CPU minutes).
Their widths differ from ref-lm's (192/512): c is the one whose widths take g128.

    python benchmarks/train_refs.py c [--out /work/bench-models/ref-lm-c]
"""

from __future__ import annotations

import argparse

import torch
from train_moe import CORPORA
from transformers import AutoTokenizer

from quantkit.data import resolve_texts
from quantkit.train import train_causal_lm

RECIPES = {
    "b": dict(hidden_size=256, intermediate_size=672, num_layers=4, num_heads=8, seed=1, steps=650),
    "c": dict(hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, seed=2, steps=800),
}


def main() -> None:
    """Train one recipe and save it; the path is printed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", choices=sorted(RECIPES))
    parser.add_argument("--out", help="default: /work/bench-models/ref-lm-RECIPE")
    parser.add_argument("--data", default="/work/shared/data/text")
    parser.add_argument("--tokenizer", default="/work/shared/models/ref-lm")
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = RECIPES[args.recipe]
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    texts = resolve_texts(args.data, part="train")
    out = train_causal_lm(texts, args.out or f"/work/bench-models/ref-lm-{args.recipe}", tokenizer=tokenizer,
                          seqlen=256, batch_size=16, lr=3e-3, corpora=CORPORA, heldout="last 10% of each corpus",
                          save_steps=(recipe["steps"] // 2,), progress=False, **recipe)
    print(out)


if __name__ == "__main__":
    main()
