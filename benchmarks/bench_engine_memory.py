"""Peak memory of the layer-wise engine: a 24-layer vs a 6-layer random Llama of width 512.

Each size runs in a fresh subprocess (peak RSS is per process). The figure of merit is the
peak RSS minus the model's own bytes; the target is 24 layers <= 1.5x 6 layers. Prints JSON.

    python benchmarks/bench_engine_memory.py [--layers 6,24] [--nsamples 8] [--seqlen 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def child(layers: int, width: int, nsamples: int, seqlen: int, method: str) -> dict:
    """Build, calibrate and measure one model in this process."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from quantkit.engine import calibrate_model
    from quantkit.memory import peak_rss_mb
    from quantkit.quant import QuantSpec

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=width, intermediate_size=width * 11 // 4 // 128 * 128,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=seqlen)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.config.use_cache = False
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    samples = [{"input_ids": torch.randint(0, 1024, (1, seqlen))} for _ in range(nsamples)]
    loaded_mb = peak_rss_mb()
    started = time.perf_counter()
    cal = calibrate_model(model, samples, QuantSpec(bits=4, group_size=128), method=method, progress=False)
    results_mb = sum(t.numel() * t.element_size() for r in cal.results.values()
                     for t in (r.qweight, r.scales, r.zeros, r.g_idx)) / 2**20
    peak = peak_rss_mb()
    return {"layers": layers, "width": width, "model_mb": round(model_mb, 1), "results_mb": round(results_mb, 1),
            "peak_rss_mb": round(peak, 1), "rss_after_load_mb": round(loaded_mb, 1),
            "peak_minus_model_mb": round(peak - model_mb, 1), "peak_minus_loaded_mb": round(peak - loaded_mb, 1),
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    """Run every size in its own subprocess and print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="6,24")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--method", default="gptq")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.width, args.nsamples, args.seqlen, args.method)))
        return
    runs = []
    for layers in [int(x) for x in args.layers.split(",")]:
        cmd = [sys.executable, __file__, "--child", str(layers), "--width", str(args.width),
               "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--method", args.method]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    small, large = runs[0], runs[-1]
    ratio = large["peak_minus_model_mb"] / small["peak_minus_model_mb"]
    print(json.dumps({"runs": runs, "ratio_peak_minus_model": round(ratio, 3), "target": 1.5,
                      "ratio_peak_minus_loaded": round(large["peak_minus_loaded_mb"] / small["peak_minus_loaded_mb"], 3),
                      "pass": ratio <= 1.5}, indent=1))


if __name__ == "__main__":
    main()
