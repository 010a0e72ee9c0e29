"""Export + load time and file size per format, against the ideal packed size.

Usage: python benchmarks/bench_export.py [--skip-wide] [--bits 4] [--group-size 64]
Prints one JSON object. Models: the shared ref LM (if ../shared exists) and a random
width-2048, 2-layer Llama in fp16. Quantization: quantkit's RTN (codes are what matter).
ideal_bytes = bits/8 * quantized params + per group (2-byte fp16 scale + bits/8 zero)
              + FP params * their dtype size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

import quantkit
from quantkit.export import FORMATS, save_quantized
from quantkit.quant import QuantSpec, method_for

REF_LM = Path(__file__).resolve().parents[2] / "shared" / "models" / "ref-lm"


def quantize(model: torch.nn.Module, spec: QuantSpec) -> tuple[dict, float]:
    """RTN every decoder-layer linear in place; return results and seconds spent."""
    t0 = time.perf_counter()
    rtn = method_for("rtn").solve
    results = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            r = rtn(mod.weight.data, None, spec, name)
            results[name] = r
            mod.weight.data = r.dequantize().to(mod.weight.dtype)
    return results, time.perf_counter() - t0


def ideal_bytes(model: torch.nn.Module, results: dict, bits: int) -> int:
    """bits/8 per code, fp16 scale + bits/8 zero per group, FP params at their own width."""
    q = sum(r.qweight.numel() for r in results.values())
    groups = sum(r.scales.numel() for r in results.values())
    qkeys = {f"{n}.weight" for n in results}
    seen, fp = set(), 0
    for k, t in model.state_dict().items():
        ptr = t.untyped_storage().data_ptr()
        if k in qkeys or ptr in seen:
            continue
        seen.add(ptr)
        fp += t.numel() * t.element_size()
    return int(q * bits / 8 + groups * (2 + bits / 8) + fp)


def bench_model(label: str, model: torch.nn.Module, spec: QuantSpec, workdir: Path) -> dict:
    results, t_quant = quantize(model, spec)
    ideal = ideal_bytes(model, results, spec.bits)
    row: dict = {"model": label, "quantized_params": sum(r.qweight.numel() for r in results.values()),
                 "quantize_s": round(t_quant, 2), "ideal_bytes": ideal, "formats": {}}
    for fmt in FORMATS:
        out = workdir / f"{label}-{fmt}"
        t0 = time.perf_counter()
        save_quantized(model, results, out, fmt=fmt)
        t_export = time.perf_counter() - t0
        t0 = time.perf_counter()
        back = quantkit.load_quantized(out)
        t_load = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
        row["formats"][fmt] = {
            "export_s": round(t_export, 2), "load_s": round(t_load, 2), "bytes": size,
            "ratio_to_ideal": round(size / ideal, 4), "weights_identical": same,
        }
        del back
        shutil.rmtree(out)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--skip-wide", action="store_true")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, LlamaConfig

    spec = QuantSpec(bits=args.bits, group_size=args.group_size, sym=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        work = Path(tmp)
        if (REF_LM / "config.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(REF_LM).eval()
            rows.append(bench_model("ref-lm", model, spec, work))
        if not args.skip_wide:
            torch.manual_seed(0)
            cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=2,
                              num_attention_heads=16, num_key_value_heads=16, vocab_size=8192)
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).eval()
            rows.append(bench_model("llama-w2048-l2-fp16", model, spec, work))
    print(json.dumps({"spec": spec.to_dict(), "torch_threads": torch.get_num_threads(), "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
