"""QiD sweep on CPU: train small Llama models of 3 sizes, save checkpoints, measure QiD at 2/3/4 bits.

Run from anywhere (paths resolve against the repo root):

    python benchmarks/qid_sweep.py                 # defaults: ../shared/data/text, ~15-20 min on 2 cores
    python benchmarks/qid_sweep.py --quick         # a smoke run (tiny grid) into a scratch CSV

The models train on the first 90% ("train" part) of every text file and QiD is measured on the
last 10% ("heldout"). All sizes share one BPE tokenizer (trained once on the train part), so their
losses are comparable. Checkpoints go to runs/qid_sweep/ (git-ignored); the table to
benchmarks/results/qid_sweep.csv with a sidecar .json recording the command and settings. Both
training (a finished checkpoint directory is kept) and measuring (cells already in the CSV are
skipped) resume after an interruption.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = REPO.parent / "shared" / "data" / "text"
SIZES = ((64, 2, 2), (128, 3, 4), (192, 4, 4))  # (hidden, layers, heads)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the sweep."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default=str(DEFAULT_TEXT), help="text file or directory (train part: first 90%%)")
    ap.add_argument("--runs", default=str(REPO / "runs" / "qid_sweep"), help="where checkpoints go")
    ap.add_argument("--csv", default=str(REPO / "benchmarks" / "results" / "qid_sweep.csv"))
    ap.add_argument("--steps", type=int, default=256, help="training steps per size")
    ap.add_argument("--save-steps", default="32,64,128,256", help="checkpoint steps (comma-separated)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--group-size", type=int, default=32, help="quantization group (divides every hidden width)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=128)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on busy shared cores)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 size... into runs/qid_sweep_quick")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs = str(REPO / "runs" / "qid_sweep_quick")
        args.csv = str(REPO / "runs" / "qid_sweep_quick" / "qid.csv")
        args.steps, args.save_steps, args.eval_tokens, args.nsamples = 8, "4,8", 2048, 4
    return args


def _rel(path: Path) -> str:
    """Path relative to the repo root when inside it (portable CSV rows)."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    """Train the grid, then measure it; write the CSV and its sidecar JSON."""
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO))
    from quantkit.data import load_texts
    from quantkit.qid.measure import Measurement, measure_grid
    from quantkit.train import train_causal_lm, train_tokenizer

    os.chdir(REPO)
    started = time.perf_counter()
    save_steps = [int(s) for s in args.save_steps.split(",")]
    sizes = SIZES[:1] if args.quick else SIZES
    texts = load_texts(args.text, part="train")
    runs = Path(args.runs)
    tokenizer = None
    checkpoints: list[str] = []
    train_seconds = {}
    for hidden, layers, heads in sizes:
        out = runs / f"h{hidden}-l{layers}"
        if not (out / "training.json").is_file():
            if tokenizer is None:
                tokenizer = train_tokenizer(texts, vocab_size=args.vocab)
            t0 = time.perf_counter()
            train_causal_lm(
                texts, out, tokenizer=tokenizer, hidden_size=hidden, num_layers=layers, num_heads=heads,
                seqlen=args.seqlen, batch_size=args.batch, steps=args.steps, lr=args.lr, seed=args.seed,
                save_steps=save_steps, corpora=[args.text], heldout="last 10% of each file", overwrite=True,
            )
            train_seconds[out.name] = round(time.perf_counter() - t0, 1)
        checkpoints += [_rel(out / "steps" / f"step{s}") for s in save_steps if s < args.steps]
        checkpoints.append(_rel(out))  # the final checkpoint (step == --steps)
    settings = Measurement(
        eval_text=_rel(Path(args.text)), eval_tokens=args.eval_tokens, nsamples=args.nsamples,
        calib_seqlen=args.calib_seqlen, group_size=args.group_size, seed=args.seed,
    )
    bits = [int(b) for b in args.bits.split(",")]
    methods = args.methods.split(",")
    stats = measure_grid(checkpoints, bits, methods, args.csv, settings)
    sidecar = Path(args.csv).with_suffix(".json")
    record = {
        "command": "python benchmarks/qid_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items()},
        "sizes": [dict(hidden=h, layers=n, heads=a) for h, n, a in sizes],
        "checkpoints": checkpoints,
        "measure": {**settings.__dict__, "bits": bits, "methods": methods},
        "stats": stats,
        "train_seconds_this_run": train_seconds,
        "total_seconds_this_run": round(time.perf_counter() - started, 1),
        "torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
    }
    sidecar.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
