"""Issue #2 quality benchmark: FP, RTN and GPTQ perplexity on the reference LM, side by side
with llm-compressor's GPTQModifier on the same model, calibration windows and settings.

    python benchmarks/bench_quality.py [--llmc-venv DIR] [--no-llmc] [-o bench-out/quality.json]

llm-compressor pins its own transformers, so it runs in a separate venv that this script
creates on first use (pip install torch==2.13.0 llmcompressor==0.14.0.1).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REF_LM, TEXT_DIR, emit, environment, mean_cross_entropy  # noqa: E402

# The reference LM is 192 wide: 128-column groups do not divide it, so "g128" runs as g64.
# GPTQ runs with act-order and static groups on both sides: llm-compressor's default
# (actorder="static"), passed to it explicitly.
SETTINGS = [
    {"name": "W4 g128->g64", "bits": 4, "group_size": 64, "sym": True},
    {"name": "W3 g128->g64", "bits": 3, "group_size": 64, "sym": True},
    {"name": "W2 g64", "bits": 2, "group_size": 64, "sym": False},
]
LLMC_PACKAGES = ["torch==2.13.0", "llmcompressor==0.14.0.1"]


def make_windows(tokenizer, nsamples: int, seqlen: int, eval_windows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration windows from the train part, evaluation windows from the held-out part."""
    from quantkit.data import calibration_samples, load_texts, tokenize_documents

    calib = torch.cat([s["input_ids"] for s in calibration_samples(str(TEXT_DIR), tokenizer, nsamples, seqlen, seed, part="train")])
    heldout = tokenize_documents(load_texts(str(TEXT_DIR), part="heldout"), tokenizer)
    usable = (heldout.numel() // seqlen) * seqlen
    evaluation = heldout[:usable].view(-1, seqlen)
    # Evenly spaced windows keep every corpus represented under a token budget.
    pick = torch.linspace(0, evaluation.shape[0] - 1, min(eval_windows, evaluation.shape[0])).long()
    return calib, evaluation[pick]


def run_quantkit(calib: torch.Tensor, evaluation: torch.Tensor) -> list[dict]:
    """quantkit RTN and GPTQ at every setting: held-out loss and calibration seconds."""
    from quantkit.engine import calibrate_model
    from quantkit.models import load_model
    from quantkit.quant.spec import QuantSpec

    samples = [{"input_ids": row.unsqueeze(0)} for row in calib]
    rows = []
    for setting in SETTINGS:
        for method in ("rtn", "gptq"):
            model = load_model(str(REF_LM), dtype="float32")
            spec = QuantSpec(bits=setting["bits"], group_size=setting["group_size"], sym=setting["sym"],
                             act_order=method == "gptq", static_groups=method == "gptq")
            started = time.perf_counter()
            calibrate_model(model, samples, spec, method=method, progress=False)
            seconds = time.perf_counter() - started
            loss = mean_cross_entropy(model, evaluation)
            rows.append({"tool": "quantkit", "method": method, **setting, "loss": loss, "seconds": seconds})
    return rows


def ensure_llmc_venv(venv: Path) -> Path:
    """Create llm-compressor's venv if it is missing; return its python."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *LLMC_PACKAGES[1:]], check=True)
    return python


def run_llmc(python: Path, calib: torch.Tensor, evaluation: torch.Tensor) -> dict:
    """llm-compressor GPTQModifier at every setting, in its own venv."""
    with tempfile.TemporaryDirectory() as tmp:
        windows = Path(tmp) / "windows.safetensors"
        save_file({"calib": calib.contiguous(), "eval": evaluation.contiguous()}, str(windows))
        settings = json.dumps([{k: s[k] for k in ("name", "bits", "group_size", "sym")} for s in SETTINGS])
        proc = subprocess.run(
            [str(python), str(Path(__file__).with_name("llmc_runner.py")), "--model", str(REF_LM),
             "--windows", str(windows), "--settings", settings],
            capture_output=True, text=True,
        )
    for line in proc.stdout.splitlines():
        if line.startswith("LLMC_RESULT "):
            return json.loads(line[len("LLMC_RESULT "):])
    raise RuntimeError(f"llm-compressor run failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    """Run the benchmark and print JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--llmc-venv", default="bench-out/llmc-venv")
    parser.add_argument("--no-llmc", action="store_true")
    parser.add_argument("-o", "--output")
    args = parser.parse_args()
    if not (REF_LM / "config.json").is_file():
        sys.exit(f"reference model not found at {REF_LM}: this benchmark needs ../shared")
    from transformers import AutoTokenizer

    from quantkit.models import load_model

    tokenizer = AutoTokenizer.from_pretrained(str(REF_LM))
    calib, evaluation = make_windows(tokenizer, args.nsamples, args.seqlen, args.eval_windows, args.seed)
    fp_loss = mean_cross_entropy(load_model(str(REF_LM), dtype="float32"), evaluation)
    rows = run_quantkit(calib, evaluation)
    llmc = None
    if not args.no_llmc:
        llmc = run_llmc(ensure_llmc_venv(Path(args.llmc_venv)), calib, evaluation)
        for entry in llmc["results"]:
            rows.append({"tool": "llm-compressor", "method": "gptq", **entry})
    for row in rows:
        row["ppl"] = math.exp(row["loss"])
        row["ppl_gap"] = row["ppl"] - math.exp(fp_loss)
    comparison = []
    for setting in SETTINGS:
        ours = next(r for r in rows if r["tool"] == "quantkit" and r["method"] == "gptq" and r["name"] == setting["name"])
        theirs = next((r for r in rows if r["tool"] == "llm-compressor" and r["name"] == setting["name"]), None)
        if theirs:
            comparison.append({
                "setting": setting["name"],
                "ppl_ratio_quantkit_over_llmc": ours["ppl"] / theirs["ppl"],
                "time_ratio_quantkit_over_llmc": ours["seconds"] / theirs["seconds"],
                "ppl_target_met": ours["ppl"] <= 1.01 * theirs["ppl"],
                "time_target_met": ours["seconds"] <= 0.7 * theirs["seconds"],
            })
    emit({
        "benchmark": "quality",
        "model": str(REF_LM),
        "calibration": f"{args.nsamples} x {args.seqlen} tokens, train part (first 90%) of {TEXT_DIR}, seed {args.seed}",
        "evaluation": f"{evaluation.shape[0]} x {args.seqlen} held-out tokens (last 10% of each file)",
        "fp": {"loss": fp_loss, "ppl": math.exp(fp_loss)},
        "rows": rows,
        "comparison": comparison,
        "llmcompressor": None if llmc is None else {k: llmc[k] for k in ("llmcompressor", "transformers")},
        "env": environment(),
    }, args.output)


if __name__ == "__main__":
    main()
