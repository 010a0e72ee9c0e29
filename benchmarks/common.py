"""Helpers shared by the benchmarks; torch-only so that other tools' venvs can import them too."""

from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
REF_LM = SHARED / "models" / "ref-lm"
TEXT_DIR = SHARED / "data" / "text"


@torch.no_grad()
def mean_cross_entropy(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats) of `model` over token windows [n, L]."""
    total, count = 0.0, 0
    for row in windows:
        ids = row.unsqueeze(0)
        logits = model(input_ids=ids).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return total / count


def environment() -> dict:
    """Versions and machine facts recorded with every benchmark's JSON."""
    import os

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }


def emit(result: dict, path: str | None = None) -> None:
    """Print the benchmark's JSON on stdout (and write it to `path` if given)."""
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (NaN with one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def heldout_windows(tokenizer, seqlen: int, eval_tokens: int) -> torch.Tensor:
    """[count, seqlen] consecutive windows of the corpora's held-out stream."""
    from quantkit.data import resolve_texts, tokenize_documents

    ids = tokenize_documents(resolve_texts(str(TEXT_DIR), part="heldout"), tokenizer)
    count = min(eval_tokens // seqlen, ids.numel() // seqlen)
    return ids[: count * seqlen].reshape(count, seqlen)


def run_llmc_runner(python: str, runner: Path, model_dir: str, calib: torch.Tensor, evaluation: torch.Tensor,
                    args: list[str], parts: dict[str, torch.Tensor] | None = None) -> dict:
    """Run an llm-compressor runner script in its own venv on these calibration/eval windows (and named further
    evaluation windows `parts`, which llmc_runner reports as part_losses); its LLMC_RESULT."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "windows.safetensors"
        extra = {f"eval_{name}": t.clone() for name, t in (parts or {}).items()}
        save_file({"calib": calib.contiguous(), "eval": evaluation.contiguous(), **extra}, str(path))
        done = subprocess.run([python, str(runner), "--model", model_dir, "--windows", str(path), *args],
                              capture_output=True, text=True,
                              env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    line = next((x for x in done.stdout.splitlines() if x.startswith("LLMC_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"llm-compressor failed: {done.stderr[-2000:]}")
    return json.loads(line[len("LLMC_RESULT "):])



def llmc_draws(python: str, runner: str, model_dir: str, seeds: list[int], nsamples: int, seqlen: int,
               eval_tokens: int, settings: list[str], args: list[str]) -> list[dict]:
    """llm-compressor's `runner` (a script beside this one, given `args`) on each seed's calibration draw and the
    held-out windows, in its own venv: one row per (seed, setting), the runner's results in `settings`' order."""
    from transformers import AutoTokenizer

    from quantkit.data import calibration_samples

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    evaluation = heldout_windows(tokenizer, seqlen, eval_tokens)
    out = []
    for seed in seeds:
        samples = calibration_samples(str(TEXT_DIR), tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed, part="train")
        calib = torch.cat([s["input_ids"].reshape(1, -1) for s in samples])
        result = run_llmc_runner(python, Path(__file__).resolve().parent / runner, model_dir, calib, evaluation, args)
        for label, item in zip(settings, result["results"]):
            out.append({"seed": seed, "setting": label, "loss": item["loss"], "seconds": item["seconds"],
                        "llmcompressor": result["llmcompressor"]})
        print(json.dumps(out[-len(settings):]), file=sys.stderr, flush=True)
    return out


def in_processes(run, calls: list[tuple], jobs: int) -> list:
    """[run(*call) for call in calls], `jobs` at once in spawned processes (with jobs 1, here in turn)."""
    if jobs <= 1:
        return [run(*call) for call in calls]
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        return [f.result() for f in [pool.submit(run, *call) for call in calls]]


# ----------------------------------------------------------------------------- per-corpus windows (issue #24)


def corpus_streams(tokenizer, part: str) -> dict[str, torch.Tensor]:
    """Each corpus file's `part` tokenized alone (as quantkit.data.tokenize_documents tokenizes each document)."""
    from quantkit.data import resolve_texts, tokenize_documents

    return {path.name: tokenize_documents(resolve_texts(str(path), part=part), tokenizer)
            for path in sorted(TEXT_DIR.glob("*.txt"))}


def corpus_offsets(tokenizer) -> dict[str, tuple[int, int]]:
    """[start, end) of each corpus inside the joined train stream that calibration windows are drawn from.

    quantkit.data.tokenize_documents joins documents (one per file) with eos, so corpus k starts one
    token after corpus k-1 ends; checked against the joined stream's length.
    """
    from quantkit.data import resolve_texts, tokenize_documents

    streams = corpus_streams(tokenizer, "train")
    joined = tokenize_documents(resolve_texts(str(TEXT_DIR), part="train"), tokenizer).numel()
    out, start = {}, 0
    for name, ids in streams.items():
        out[name] = (start, start + ids.numel())
        start += ids.numel() + 1
    if start - 1 != joined:
        raise RuntimeError(f"corpus offsets ({start - 1} tokens) do not add up to the joined stream ({joined})")
    return out


def heldout_corpus_windows(tokenizer, seqlen: int, count: int | None) -> dict[str, torch.Tensor]:
    """Per corpus, [count, seqlen] consecutive windows from the start of its held-out part (fewer if short; None:
    every whole window it holds)."""
    out = {}
    for name, ids in corpus_streams(tokenizer, "heldout").items():
        n = ids.numel() // seqlen if count is None else min(count, ids.numel() // seqlen)
        out[name] = ids[: n * seqlen].reshape(n, seqlen)
    return out


def validation_corpus_windows(tokenizer, nsamples: int, seqlen: int, seed: int, count: int) -> dict[str, torch.Tensor]:
    """Per corpus, [count, seqlen] train-part windows that overlap neither each other nor any calibration
    window of draw `seed` (redrawn as quantkit.data.draw_windows draws them from the joined train stream)."""
    import bisect
    import random

    from quantkit.data import resolve_texts, tokenize_documents

    ids = tokenize_documents(resolve_texts(str(TEXT_DIR), part="train"), tokenizer)
    taken = sorted(random.Random(seed).sample(range(ids.numel() - seqlen + 1), nsamples))
    out = {}
    for k, (name, (start, end)) in enumerate(corpus_offsets(tokenizer).items()):
        rng = random.Random(20_000 + 97 * seed + k)
        picked: list[int] = []
        for _ in range(1000 * count):
            if len(picked) == count:
                break
            at = rng.randrange(start, end - seqlen + 1)
            j = bisect.bisect_left(taken, at)
            if any(abs(at - taken[i]) < seqlen for i in (j - 1, j) if 0 <= i < len(taken)):
                continue
            bisect.insort(taken, at)
            picked.append(at)
        out[name] = torch.stack([ids[s : s + seqlen] for s in picked])
    return out


def calibration_sources(tokenizer, samples: list[dict], offsets: dict[str, tuple[int, int]], seed: int, seqlen: int,
                        nsamples: int) -> list[torch.Tensor]:
    """Per calibration window of draw `seed`, the corpus index [T] of each of its tokens (-1: the eos between corpora)."""
    import random

    from quantkit.data import resolve_texts, tokenize_documents

    ids = tokenize_documents(resolve_texts(str(TEXT_DIR), part="train"), tokenizer)
    starts = random.Random(seed).sample(range(ids.numel() - seqlen + 1), nsamples)
    label = torch.full((ids.numel(),), -1, dtype=torch.long)
    for k, (start, end) in enumerate(offsets.values()):
        label[start:end] = k
    out = []
    for s, sample in zip(starts, samples):
        if not torch.equal(ids[s : s + seqlen], sample["input_ids"].reshape(-1)):
            raise RuntimeError("calibration windows were not drawn as expected")
        out.append(label[s : s + seqlen].clone())
    return out


@torch.no_grad()
def windows_kl(model: torch.nn.Module, reference: torch.nn.Module, windows: torch.Tensor, batch: int = 16) -> float:
    """Mean KL(reference || model) (nats) of the next-token distributions over every predicted token of the windows
    [n, L]: the damage quantization did, without the label noise of a loss difference."""
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        ids = windows[i : i + batch]
        mine = torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), dim=-1)
        ref = torch.log_softmax(reference(input_ids=ids).logits[:, :-1].double(), dim=-1)
        total += float((ref.exp() * (ref - mine)).sum())
        count += ids[:, 1:].numel()
    return total / count


@torch.no_grad()
def window_losses(model: torch.nn.Module, windows: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of each window [n, L]: a float64 tensor [n]."""
    out = []
    for i in range(0, windows.shape[0], batch):
        ids = windows[i : i + batch]
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        out.append(nll.double().mean(dim=1))
    return torch.cat(out)
