"""On a CUDA GPU (marked `cuda`: skipped without one; benchmarks/device_check.sh runs them on one): calibrate on
`cuda` and `cuda:0` with bfloat16 weights, torch.cuda.max_memory_allocated against the planner, --low-memory on
the GPU, the export loaded back on the GPU, and Hessian sums that widen to float64 on the device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_tokenizer, tiny_model, write_text

pytestmark = pytest.mark.cuda


def save_bf16_llama(root: Path, hidden: int = 256, inter: int = 704, layers: int = 2) -> Path:
    tiny_model("llama", seed=0, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
               num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256), vocab_size=64,
               max_position_embeddings=4096).to(torch.bfloat16).save_pretrained(root)
    make_tokenizer().save_pretrained(root)
    return root


def calibrate(model: Path, text: Path, out: Path, *extra: str, nsamples: int = 8, seqlen: int = 64) -> dict:
    """`quantkit calibrate ... --json` in a fresh process (its own CUDA peak); the report."""
    cmd = [sys.executable, "-m", "quantkit.cli", "calibrate", str(model), "--calib", str(text), "--method", "gptq",
           "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--group-size", "64", "-o", str(out), "--json", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def bf16(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cuda")
    return {"model": save_bf16_llama(root / "model"), "text": write_text(root / "text.txt", 20000), "root": root}


def codes(out: Path) -> dict[str, torch.Tensor]:
    from quantkit.export.reader import read_checkpoint

    return {name: r.qweight for name, r in read_checkpoint(out).results.items()}


def test_calibrate_on_cuda_and_cuda0_with_bfloat16_weights(bf16: dict) -> None:
    root = bf16["root"]
    a = calibrate(bf16["model"], bf16["text"], root / "cuda", "--device", "cuda")
    b = calibrate(bf16["model"], bf16["text"], root / "cuda0", "--device", "cuda:0")
    calibrate(bf16["model"], bf16["text"], root / "cpu")
    assert a["device"] == "cuda" and b["device"] == "cuda:0" and a["peak_cuda_mb"] > 0
    ca, cb = codes(root / "cuda"), codes(root / "cuda0")
    assert ca.keys() == cb.keys() == codes(root / "cpu").keys()
    for name in ca:
        assert torch.equal(ca[name], cb[name]), name  # one device, one computation
    # GPU and CPU sum and factor in other orders, and GPTQ's error feedback spreads each rounding flip: the codes
    # differ, the solves' quality does not
    def mean_error(out: Path) -> float:
        report = json.loads((out / "quantkit_report.json").read_text())
        errors = [e["output_rel_err"] for layer in report["layers"] for e in layer["linears"].values()]
        return sum(errors) / len(errors)

    assert 0.8 <= mean_error(root / "cuda") / mean_error(root / "cpu") <= 1.25
    config = json.loads((root / "cuda" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"


def test_low_memory_on_cuda_writes_what_the_in_memory_run_writes(bf16: dict) -> None:
    root = bf16["root"]
    calibrate(bf16["model"], bf16["text"], root / "mem", "--device", "cuda")
    low = calibrate(bf16["model"], bf16["text"], root / "low", "--device", "cuda", "--low-memory")
    assert low["low_memory"]
    mem, streamed = codes(root / "mem"), codes(root / "low")
    for name in mem:
        assert torch.equal(mem[name], streamed[name]), name


def test_export_loads_back_on_cuda(bf16: dict) -> None:
    import quantkit

    out = bf16["root"] / "load"
    calibrate(bf16["model"], bf16["text"], out, "--device", "cuda")
    model = quantkit.load_quantized(str(out))
    ids = torch.randint(0, 64, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        on_cpu = model.float()(ids).logits
        on_gpu = model.to("cuda")(ids.to("cuda")).logits.cpu()
    assert torch.allclose(on_gpu, on_cpu, rtol=1e-3, atol=1e-3 * float(on_cpu.abs().max()))


@pytest.mark.parametrize("low_memory", [False, True], ids=["in-memory", "low-memory"])
def test_planned_device_peak_against_max_memory_allocated(tmp_path: Path, low_memory: bool) -> None:
    """torch.cuda.max_memory_allocated of a whole calibrate run (a fresh process) within 20% of the plan's
    peak_device_bytes, on a model where the Hessians and activations are most of it."""
    from quantkit.calibrate import build_job
    from quantkit.calibrate.budget import plan_job

    model = save_bf16_llama(tmp_path / "model", hidden=2048, inter=5632, layers=2)
    text = write_text(tmp_path / "text.txt", 200_000)
    extra = ["--device", "cuda"] + (["--low-memory"] if low_memory else [])
    report = calibrate(model, text, tmp_path / "out", *extra, nsamples=16, seqlen=512)
    job = build_job(str(model), str(text), method="gptq", nsamples=16, seqlen=512, group_size=64, device="cuda",
                    low_memory=low_memory, output_dir=str(tmp_path / "planned"))
    planned = plan_job(job).ranks[0].peak_device_bytes / 2**20
    print(json.dumps({"low_memory": low_memory, "peak_cuda_mb": report["peak_cuda_mb"], "planned_mb": round(planned, 1)}))
    assert 0.8 <= planned / report["peak_cuda_mb"] <= 1.2


def test_hessian_sums_widen_to_float64_on_the_device(monkeypatch) -> None:
    from quantkit.engine import hessian

    monkeypatch.setattr(hessian, "FLOAT32_SUM_TOKENS", 1024)
    acc = hessian.HessianAccumulator(512, "cuda")
    batches = [torch.randn(1, 512, 512, generator=torch.Generator().manual_seed(i)).bfloat16() for i in range(4)]
    for index, batch in enumerate(batches):
        acc.add(batch.cuda())
        assert acc.hessian.dtype == (torch.float32 if index < 2 else torch.float64)
    x = torch.cat([b.reshape(-1, 512) for b in batches]).double()
    reference = 2 / x.shape[0] * x.T @ x
    assert torch.allclose(acc.result().cpu().double(), reference, rtol=1e-4, atol=1e-5 * float(reference.diagonal().mean()))
