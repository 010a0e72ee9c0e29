"""GPTQ wall time of distributed calibration: 1 vs 2 ranks (gloo, CPU, one torch thread per rank).

Builds a random Llama (default 12 layers, width 1024) with a character tokenizer in a temp dir,
runs a calibration job (quantkit.calibrate.build_job, run_job) with --nproc 1 and 2 in fresh subprocesses, and prints JSON with the
calibration-loop seconds, the whole-command seconds and the peak RSS of every rank, also less the
rank's RSS when calibration started (the model loaded: what activations, Hessians and the current
layer's work add), and the bytes of each rank's hidden states (its shard of the activations).
Target: 2 ranks <= 0.65x the time of 1 rank.

    python benchmarks/bench_distributed.py [--layers 12] [--width 1024] [--nsamples 16] [--seqlen 256]
                                           [--low-memory] [-o benchmarks/results/bench_distributed_lowmem.json]

With --low-memory the ranks run --low-memory (each streams the current layer from the files), and a
single-process in-memory run is added for reference: each rank's peak must stay below its peak.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402


def build(root: Path, layers: int, width: int) -> tuple[Path, Path]:
    """Save a random Llama and a character tokenizer under root; write a calibration text."""
    import torch
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    vocab = {chr(i): i - 32 for i in range(32, 127)}
    vocab["<unk>"] = 95
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    config = LlamaConfig(vocab_size=96, hidden_size=width, intermediate_size=width * 11 // 4 // 128 * 128,
                         num_hidden_layers=layers, num_attention_heads=max(width // 128, 1),
                         max_position_embeddings=2048)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root / "model")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>").save_pretrained(root / "model")
    rng = random.Random(0)
    text = root / "calib.txt"
    text.write_text(" ".join("".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 9))) for _ in range(40000)))
    return root / "model", text


RUN = """
import json, sys, time, torch
torch.set_num_threads(1)
from quantkit.calibrate import build_job, run_job
model, text, out, nproc, nsamples, seqlen, low = sys.argv[1:8]
started = time.perf_counter()
job = build_job(model, text, method="gptq", bits=4, group_size=128, output_dir=out, nsamples=int(nsamples),
                seqlen=int(seqlen), progress=False, nproc=int(nproc), low_memory=low == "1")
report = run_job(job).report
import resource
report["command_seconds"] = round(time.perf_counter() - started, 2)
report["parent_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({k: v for k, v in report.items() if k != "layers"}))
"""


def run_one(model: Path, text: Path, out: Path, nproc: int, nsamples: int, seqlen: int, low: bool = False) -> dict:
    """One calibration in a fresh interpreter; its report (without per-layer entries)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", RUN, str(model), str(text), str(out), str(nproc), str(nsamples), str(seqlen),
           "1" if low else "0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    """Build the model, time 1 and 2 ranks, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--low-memory", action="store_true", help="ranks stream layers; adds an in-memory reference")
    parser.add_argument("-o", "--output", help="also write the JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        root = Path(tmp)
        model, text = build(root, args.layers, args.width)
        runs = {}
        plan = [(n, args.low_memory) for n in [int(x) for x in args.ranks.split(",")]]
        if args.low_memory:
            plan.insert(0, ("in_memory_1", False))
        for n, low in plan:
            rep = run_one(model, text, root / f"out{n}", 1 if n == "in_memory_1" else n, args.nsamples, args.seqlen, low)
            runs[n] = {"low_memory": rep["low_memory"], "calibration_seconds": rep["seconds"], "command_seconds": rep["command_seconds"],
                       "rank_peak_rss_mb": rep.get("rank_peak_rss_mb", [rep["peak_rss_mb"]]),
                       "rank_peak_rss_over_start_mb": rep.get("rank_peak_rss_over_start_mb",
                                                              [rep["peak_rss_over_start_mb"]]),
                       "rank_hidden_states_mb": rep.get("rank_hidden_states_mb", [rep["hidden_states_mb"]])}
    one, two = runs.get(1), runs.get(2)
    out = {"layers": args.layers, "width": args.width, "nsamples": args.nsamples, "seqlen": args.seqlen,
           "low_memory": args.low_memory, "cpu_count": os.cpu_count(), "loadavg_at_end": os.getloadavg(),
           "runs": runs, "time": time.ctime()}
    if one and two:
        out["ratio_2_over_1"] = round(two["calibration_seconds"] / one["calibration_seconds"], 3)
        out["target"] = 0.65
        out["pass"] = out["ratio_2_over_1"] <= 0.65
    if args.low_memory and two:
        reference = runs["in_memory_1"]["rank_peak_rss_mb"][0]
        out["in_memory_peak_rss_mb"] = reference
        out["rank_peaks_below_in_memory"] = all(peak < reference for peak in two["rank_peak_rss_mb"])
    emit(out, args.output)


if __name__ == "__main__":
    main()
