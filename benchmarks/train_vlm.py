"""Train the tiny LLaVA of benchmarks/vlm_task.py on the shapes task (seeded, a few minutes on CPU).

    python benchmarks/train_vlm.py --out /tmp/quantkit-vlm/model

Writes the model and processor (save_pretrained) and train_report.json (steps, seconds, held-out
accuracy) to --out. Same seed and settings: same model (on the same torch build and thread count).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vlm_task import accuracy, encode, make_examples, make_model, make_processor  # noqa: E402

EVAL_SEED = 2_000_000  # held-out examples: a seed range the training batches never use


def train(out: Path, steps: int, batch_size: int, lr: float, seed: int, hidden: int, layers: int, threads: int) -> dict:
    """Train and save; return the report."""
    torch.set_num_threads(threads)
    processor = make_processor()
    model = make_model(processor.tokenizer, seed=seed, hidden=hidden, layers=layers)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    heldout = make_examples(256, EVAL_SEED)
    started = time.perf_counter()
    log = []
    for step in range(steps):
        batch = encode(processor, make_examples(batch_size, seed * 1_000_003 + step, captions=0.15))
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0 or step + 1 == steps:
            acc = accuracy(model, processor, heldout[:128])
            model.train()
            entry = {"step": step + 1, "loss": round(loss.item(), 4), "seconds": round(time.perf_counter() - started, 1), **acc}
            log.append(entry)
            print(json.dumps(entry), flush=True)
    model.eval()
    final = accuracy(model, processor, heldout)
    report = {
        "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "hidden": hidden, "layers": layers,
        "threads": threads, "seconds": round(time.perf_counter() - started, 1), "heldout": final, "log": log,
    }
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "train_report.json").write_text(json.dumps(report, indent=2))
    return report


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("/tmp/quantkit-vlm/model"), show_default=True)
@click.option("--steps", default=500, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--lr", default=5e-4, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--hidden", default=128, show_default=True)
@click.option("--layers", default=4, show_default=True)
@click.option("--threads", default=1, show_default=True, help="torch threads (1 is fastest on a busy 2-core box)")
def main(out: Path, steps: int, batch_size: int, lr: float, seed: int, hidden: int, layers: int, threads: int) -> None:
    """Train the shapes-task VLM and save it to --out."""
    report = train(out, steps, batch_size, lr, seed, hidden, layers, threads)
    print(json.dumps({k: v for k, v in report.items() if k != "log"}))


if __name__ == "__main__":
    main()
