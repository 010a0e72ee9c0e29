"""QiD sweep on CPU: train small Llama models (4 sizes x 2 seeds), keep log-spaced checkpoints, measure QiD with SEs.

Run from anywhere (paths resolve against the repo root), on otherwise idle cores:

    OMP_NUM_THREADS=1 python benchmarks/qid_sweep.py --plan          # the points and a time estimate (~1 min)
    OMP_NUM_THREADS=1 python benchmarks/qid_sweep.py --jobs 2        # the sweep (resumable)
    OMP_NUM_THREADS=1 python benchmarks/qid_sweep.py --quick         # a smoke run into runs/qid_sweep_quick

Every (size, seed) is a unit: train one model with a constant learning rate after warmup,
saving checkpoints at log-spaced steps (the same steps for every size, so D takes the same values
across N), then measure every checkpoint x method x bits. Models train on the first 90% ("train"
part) of every text file; QiD is measured on the last 10% ("heldout", --eval-tokens tokens) with
a paired bootstrap over eval windows for its standard error (quantkit.qid.measure). All sizes
share one BPE tokenizer trained once on the train part, so their losses are comparable.

Resuming: a unit's finished training run (its training.json) is kept under --work and not
trained again; each unit appends one CSV row per finished point to --work/parts/UNIT.csv and
skips the points already there. After each unit the parts are merged (in a fixed order) into
--csv, with a sidecar .json holding the command, the settings and the timings.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_TEXT = REPO.parent / "shared" / "data" / "text"
# name: (hidden, layers, heads, intermediate); non-embedding N 82k .. 1.6M (19.5x)
SIZES = {
    "s1": (64, 2, 2, 128),
    "s2": (96, 2, 3, 256),
    "s3": (128, 3, 4, 384),
    "s4": (256, 2, 8, 704),
}
STEPS = "128,256,512,1024,2048,4096"  # checkpoints: 6 log-spaced steps, 32x in D (131k .. 4.2M tokens)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the sweep."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default=str(DEFAULT_TEXT), help="text file or directory (train: first 90%%, eval: last 10%%)")
    ap.add_argument("--work", default=str(REPO / "runs" / "qid_sweep2"), help="checkpoints, tokenizer and per-unit CSV parts")
    ap.add_argument("--csv", default=str(REPO / "benchmarks" / "results" / "qid_sweep.csv"), help="the merged table")
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated names from {', '.join(SIZES)}")
    ap.add_argument("--seeds", default="0,1", help="training seeds (one unit per size and seed)")
    ap.add_argument("--steps", default=STEPS, help="checkpoint steps; the last is the run's length")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--methods", default="rtn,gptq,tlq")
    ap.add_argument("--group-size", type=int, default=-1, help="quantization group; -1 per output channel (see benchmarks/README.md)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=128)
    ap.add_argument("--eval-tokens", type=int, default=201_000, help="eval stream length (scored: about 200k after the windows' first tokens)")
    ap.add_argument("--eval-seqlen", type=int, default=256, help="tokens per eval window (the bootstrap unit)")
    ap.add_argument("--jobs", type=int, default=1, help="units run in parallel, one thread each")
    ap.add_argument("--plan", action="store_true", help="print the points and a time estimate from costs measured now; run nothing")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 size, 1 seed, 2 checkpoints, into runs/qid_sweep_quick")
    args = ap.parse_args(argv)
    if args.quick:
        args.work = str(REPO / "runs" / "qid_sweep_quick")
        args.csv = str(Path(args.work) / "qid.csv")
        args.sizes, args.seeds, args.steps, args.eval_tokens, args.nsamples = "s1", "0", "4,8", 4096, 4
        args.warmup = 2
    return args


def _rel(path: Path) -> str:
    """Path relative to the repo root when inside it (portable CSV rows)."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def units(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(size name, seed) of every training run."""
    unknown = [s for s in args.sizes.split(",") if s not in SIZES]
    if unknown:
        raise SystemExit(f"unknown size(s) {unknown}; choose from {', '.join(SIZES)}")
    return [(s, int(seed)) for s in args.sizes.split(",") for seed in args.seeds.split(",")]


def steps_of(args: argparse.Namespace) -> list[int]:
    """Checkpoint steps, ascending."""
    return sorted(int(s) for s in args.steps.split(","))


def unit_dir(args: argparse.Namespace, size: str, seed: int) -> Path:
    """Where a unit's training run goes."""
    return Path(args.work) / f"{size}-seed{seed}"


def checkpoints_of(args: argparse.Namespace, size: str, seed: int) -> list[str]:
    """The unit's checkpoint directories (repo-relative), in step order; the last is the run itself."""
    out = unit_dir(args, size, seed)
    steps = steps_of(args)
    return [_rel(out / "steps" / f"step{s}") for s in steps[:-1]] + [_rel(out)]


def tokenizer(args: argparse.Namespace):
    """The shared tokenizer, trained once on the train part and kept under --work."""
    from transformers import AutoTokenizer

    path = Path(args.work) / "tokenizer"
    if not (path / "tokenizer.json").is_file():
        from quantkit.data import load_texts
        from quantkit.fsutil import atomic_dir
        from quantkit.train import train_tokenizer

        tok = train_tokenizer(load_texts(args.text, part="train"), vocab_size=args.vocab)
        with atomic_dir(path, overwrite=True) as tmp:
            tok.save_pretrained(tmp)
    return AutoTokenizer.from_pretrained(path)


def settings_of(args: argparse.Namespace):
    """The measurement settings every unit uses."""
    from quantkit.qid.measure import Measurement

    return Measurement(eval_text=_rel(Path(args.text)), eval_tokens=args.eval_tokens, eval_seqlen=args.eval_seqlen,
                       nsamples=args.nsamples, calib_seqlen=args.calib_seqlen, group_size=args.group_size, seed=0)


def run_unit(args: argparse.Namespace, size: str, seed: int) -> dict:
    """Train one (size, seed) unless done, then measure its checkpoints into its CSV part; return timings."""
    import torch

    torch.set_num_threads(1)
    os.chdir(REPO)
    from quantkit.data import load_texts
    from quantkit.qid.measure import measure_grid
    from quantkit.train import train_causal_lm

    hidden, layers, heads, inter = SIZES[size]
    out = unit_dir(args, size, seed)
    timings: dict = {"unit": out.name}
    if not (out / "training.json").is_file():
        t0 = time.perf_counter()
        steps = steps_of(args)
        train_causal_lm(
            load_texts(args.text, part="train"), out, tokenizer=tokenizer(args), hidden_size=hidden, num_layers=layers,
            num_heads=heads, intermediate_size=inter, seqlen=args.seqlen, batch_size=args.batch, steps=steps[-1],
            lr=args.lr, warmup=args.warmup, schedule="constant", seed=seed, save_steps=steps[:-1],
            corpora=[args.text], heldout="last 10% of each file", overwrite=True, progress=False,
        )
        timings["train_seconds"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    part = Path(args.work) / "parts" / f"{out.name}.csv"
    timings["stats"] = measure_grid(checkpoints_of(args, size, seed), [int(b) for b in args.bits.split(",")],
                                    args.methods.split(","), part, settings_of(args), progress=False)
    timings["measure_seconds"] = round(time.perf_counter() - t0, 1)
    return timings


def _run_unit_star(job: tuple) -> dict:
    """Pool entry point."""
    return run_unit(*job)


def merge(args: argparse.Namespace) -> int:
    """Write --csv from the parts, ordered by size, seed, step, method, bits; return the row count."""
    from quantkit.fsutil import atomic_file
    from quantkit.qid.table import COLUMNS, TableWriter, read_table

    order = {name: i for i, name in enumerate(SIZES)}
    rows = []
    for size, seed in units(args):
        part = Path(args.work) / "parts" / f"{unit_dir(args, size, seed).name}.csv"
        if part.is_file():
            table = read_table(part, required=("model",))
            rows += [(order[size], seed, r) for r in table.rows + table.error_rows]
    rows.sort(key=lambda t: (t[0], t[1], t[2].get("D") or 0, str(t[2]["method"]), t[2]["bits"]))
    with atomic_file(args.csv) as tmp:
        with TableWriter(tmp) as writer:
            for _, _, r in rows:
                writer.write({c: r.get(c) for c in COLUMNS})
    return len(rows)


def measure_costs(args: argparse.Namespace) -> dict:
    """CPU seconds per training step, per eval token and per quantization of each size, timed now on random-init models.

    CPU time, not wall time: on shared cores a wall clock measures the neighbours; one thread's CPU
    time is what the work takes on an idle core.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantkit.engine import calibrate_model
    from quantkit.eval.loss import loss_on_ids
    from quantkit.importance import tlq_token_weights
    from quantkit.quant.methods import METHODS
    from quantkit.quant.spec import QuantSpec

    torch.set_num_threads(1)
    costs = {}
    gen = torch.Generator().manual_seed(0)
    for size in dict.fromkeys(s for s, _ in units(args)):
        hidden, layers, heads, inter = SIZES[size]
        config = LlamaConfig(vocab_size=args.vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                             num_key_value_heads=heads, intermediate_size=inter, max_position_embeddings=1024, tie_word_embeddings=True)
        model = LlamaForCausalLM(config)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        times = []
        for i in range(4):
            batch = torch.randint(0, args.vocab, (args.batch, args.seqlen), generator=gen)
            t0 = time.process_time()
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i:
                times.append(time.process_time() - t0)
        model.eval()
        ids = torch.randint(0, args.vocab, (8 * args.eval_seqlen,), generator=gen)
        t0 = time.process_time()
        loss_on_ids(model, ids, seqlen=args.eval_seqlen, progress=False)
        eval_per_token = (time.process_time() - t0) / ids.numel()
        samples = [{"input_ids": torch.randint(0, args.vocab, (1, args.calib_seqlen), generator=gen)} for _ in range(args.nsamples)]
        quant = {}
        for method in args.methods.split(","):
            import copy

            qmodel = copy.deepcopy(model)
            t0 = time.process_time()
            weights = tlq_token_weights(qmodel, samples, progress=False) if METHODS[method].token_weights else None
            calibrate_model(qmodel, samples, QuantSpec(bits=2, group_size=args.group_size), method=method,
                            token_weights=weights, progress=False)
            quant[method] = time.process_time() - t0
        from quantkit.qid.measure import count_parameters

        costs[size] = {"N": count_parameters(model)[1], "train_step_s": sorted(times)[len(times) // 2],
                       "eval_s_per_token": eval_per_token, "quantize_s": quant}
    return costs


def plan(args: argparse.Namespace) -> dict:
    """The points, and the time they take by costs measured now (per unit, and on --jobs cores by longest-first)."""
    costs = measure_costs(args)
    steps = steps_of(args)
    bits = [int(b) for b in args.bits.split(",")]
    methods = args.methods.split(",")
    per_unit = {}
    for size, seed in units(args):
        c = costs[size]
        train = steps[-1] * c["train_step_s"]
        evals = (1 + len(bits) * len(methods)) * args.eval_tokens * c["eval_s_per_token"]
        quant = len(bits) * sum(c["quantize_s"].values())
        per_unit[f"{size}-seed{seed}"] = {"train_s": train, "measure_s": len(steps) * (evals + quant)}
    loads = [0.0] * max(1, args.jobs)
    for _, t in sorted(per_unit.items(), key=lambda kv: -(kv[1]["train_s"] + kv[1]["measure_s"])):
        loads[loads.index(min(loads))] += t["train_s"] + t["measure_s"]
    return {"costs": costs, "units": per_unit, "points": len(per_unit) * len(steps) * len(bits) * len(methods),
            "cpu_seconds": sum(t["train_s"] + t["measure_s"] for t in per_unit.values()), "wall_seconds": max(loads),
            "load_average": os.getloadavg()[0]}


def print_plan(args: argparse.Namespace, p: dict) -> None:
    """The plan as text."""
    steps = steps_of(args)
    tokens = [s * args.batch * args.seqlen for s in steps]
    print(f"checkpoints at steps {steps} = D {tokens[0]:,} .. {tokens[-1]:,} tokens ({tokens[-1] / tokens[0]:.0f}x)")
    ns = [c["N"] for c in p["costs"].values()]
    for size, c in p["costs"].items():
        q = ", ".join(f"{m} {s:.1f}s" for m, s in c["quantize_s"].items())
        print(f"{size} {SIZES[size]} N={c['N']:,}: train step {c['train_step_s'] * 1e3:.0f} ms, "
              f"eval {c['eval_s_per_token'] * 1e6:.1f} us/token, quantize {q}")
    print(f"N spans {max(ns) / min(ns):.1f}x; units: {', '.join(p['units'])}")
    print(f"{p['points']} points ({args.methods} x bits {args.bits}); eval {args.eval_tokens:,} tokens per model")
    for name, t in p["units"].items():
        print(f"  {name}: train {t['train_s'] / 60:.1f} min, measure {t['measure_s'] / 60:.1f} min")
    print(f"total {p['cpu_seconds'] / 60:.0f} CPU-min; about {p['wall_seconds'] / 60:.0f} min wall with --jobs {args.jobs} "
          f"on idle cores (CPU time of one thread, timed now at load average {p['load_average']:.1f})")


def main(argv: list[str] | None = None) -> int:
    """Plan, or train and measure every unit (in parallel with --jobs), merging the table as units finish."""
    args = parse_args(argv)
    os.chdir(REPO)
    if args.plan:
        print_plan(args, plan(args))
        return 0
    started = time.perf_counter()
    tokenizer(args)  # once, before the workers, which then only load it
    todo = units(args)
    order = {name: i for i, name in enumerate(SIZES)}
    todo.sort(key=lambda u: (-order[u[0]], u[1]))  # largest first: the longest units start early
    timings = []
    if args.jobs <= 1:
        for size, seed in todo:
            timings.append(run_unit(args, size, seed))
            merge(args)
    else:
        with multiprocessing.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
            for t in pool.imap_unordered(_run_unit_star, [(args, s, seed) for s, seed in todo]):
                timings.append(t)
                merge(args)
    rows = merge(args)
    import torch

    record = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/qid_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": vars(args),
        "sizes": {s: dict(zip(("hidden", "layers", "heads", "intermediate"), SIZES[s])) for s in args.sizes.split(",")},
        "tokens_per_step": args.batch * args.seqlen,
        "units_this_run": timings, "rows": rows,
        "total_seconds_this_run": round(time.perf_counter() - started, 1),
        "torch": torch.__version__, "python": platform.python_version(), "threads_per_job": 1,
        "load_average_end": os.getloadavg()[0],
    }
    Path(args.csv).with_suffix(".json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(json.dumps({"rows": rows, "minutes": round(record["total_seconds_this_run"] / 60, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
