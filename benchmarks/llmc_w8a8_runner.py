"""Run llm-compressor's SmoothQuantModifier + GPTQModifier (W8A8 / W4A8, int8 dynamic per-token inputs) on
token windows given by bench_w8a8.py, in llm-compressor's own venv; prints one LLMC_RESULT JSON line.

The loss is measured on the model as oneshot leaves it: compressed-tensors' fake-quantization with the
input activations quantized per token at every quantized linear.
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
from common import mean_cross_entropy  # noqa: E402


def main() -> None:
    """Quantize with llm-compressor at each requested weight width and print one JSON object."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--windows", required=True, help="safetensors with calib [N, L] and eval [M, L]")
    parser.add_argument("--bits", required=True, help="JSON list of weight bit widths, e.g. [8, 4]")
    parser.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant's smoothing_strength")
    args = parser.parse_args()

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
    from transformers import AutoModelForCausalLM

    windows = load_file(args.windows)
    calib, evaluation = windows["calib"], windows["eval"]
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    results = []
    for bits in json.loads(args.bits):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        scheme = QuantizationScheme(
            targets=["Linear"],
            weights=QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="channel", actorder="static"),
            input_activations=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True),
        )
        recipe = [
            SmoothQuantModifier(smoothing_strength=args.alpha),
            GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], block_size=128, dampening_frac=0.01),
        ]
        started = time.perf_counter()
        oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=calib.shape[0],
                max_seq_length=calib.shape[1], shuffle_calibration_samples=False)
        seconds = time.perf_counter() - started
        loss = mean_cross_entropy(model.eval(), evaluation)
        results.append({"bits": bits, "act_bits": 8, "alpha": args.alpha, "loss": loss, "seconds": seconds})
    import llmcompressor
    import transformers

    print("LLMC_RESULT " + json.dumps({"results": results, "llmcompressor": llmcompressor.__version__,
                                       "transformers": transformers.__version__}))


if __name__ == "__main__":
    main()
