"""llm-compressor's GPTQModifier on a bench_real_size.py model: seconds by phase and peak RSS, no evaluation.

Runs inside llm-compressor's own venv (it pins its own transformers) and imports nothing from quantkit:
only bench_real_size's PhaseClock (standard library) and common.py (torch-only). Settings are
bench_real_size's: W4 g128 symmetric, act-order static, block 128, damp 0.01, lm_head left alone.
Prints one line `LLMC_RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real_size import PhaseClock, reset_peak  # noqa: E402
from llmc_runner import causal_eager_attention  # noqa: E402


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    """Quantize the model with GPTQModifier on the given windows; print its phases and memory."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--windows", required=True, help="safetensors with calib [N, L]")
    args = parser.parse_args()

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import base as gptq_base
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    calib = load_file(args.windows)["calib"]
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    clock = PhaseClock()
    base_mb = rss_mb("VmRSS")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    causal_eager_attention(model)  # llm-compressor 0.14 runs a Qwen3-MoE's layers with no mask (see llmc_runner.py)
    layer_class = type(model.model.layers[0])
    clock.wrap(layer_class, "forward", "capture")
    clock.wrap(gptq_base, "accumulate_hessian", "hessian")

    def record(call_args, kwargs, cpu, wall):
        weights = kwargs["weights"]
        clock.solves.append({"out": int(weights.shape[-2]), "in": int(weights.shape[-1]), "batch": int(weights.shape[0]) if weights.dim() == 3 else 1,
                             "hessian": True, "cpu_s": round(cpu, 4), "wall_s": round(wall, 4)})

    clock.wrap(gptq_base, "quantize_weight", "solve", record)
    loaded_mb = rss_mb("VmRSS")
    reset_peak()
    clock.watch_memory()
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=128, actorder="static"))
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head", "re:.*mlp.gate$"], block_size=128,
                          dampening_frac=0.01)
    started = clock.now()
    with clock.phase("other"):
        oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=calib.shape[0],
                max_seq_length=calib.shape[1], shuffle_calibration_samples=False)
    ended = clock.now()
    layers = model.config.num_hidden_layers
    import llmcompressor
    import transformers

    print("LLMC_RESULT " + json.dumps({
        "tool": "llm-compressor", "layers": layers, "tokens": int(calib.numel()), "per_layer": clock.summary(layers),
        "total_per_layer": {"wall_s": round((ended[0] - started[0]) / layers, 3), "cpu_s": round((ended[1] - started[1]) / layers, 3)},
        "solves": clock.solves, "rss_base_mb": round(base_mb, 1), "rss_loaded_mb": round(loaded_mb, 1),
        "peak_rss_mb": round(rss_mb("VmHWM"), 1), "peak_over_loaded_mb": round(rss_mb("VmHWM") - loaded_mb, 1),
        "sampled_peak_over_loaded_mb_by_phase": clock.peak_by_phase(loaded_mb),
        "llmcompressor": llmcompressor.__version__, "transformers": transformers.__version__,
        "time": time.ctime()}))


if __name__ == "__main__":
    main()
