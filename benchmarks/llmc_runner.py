"""Run llm-compressor's GPTQModifier on token windows given by bench_quality.py.

Runs inside llm-compressor's own venv (it pins its own transformers), so it imports nothing
from quantkit; it shares only benchmarks/common.py (torch-only) for the loss.
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
from common import window_losses, windows_kl  # noqa: E402


def causal_eager_attention(model: torch.nn.Module) -> None:
    """Make the eager attention of `model`'s family causal when it is given no mask.

    llm-compressor 0.14.0.1 (transformers 5.17) runs a Qwen3-MoE's decoder layers in its sequential pipeline with
    eager attention and attention_mask=None for unpadded windows, so its calibration statistics came from
    bidirectional attention (measured: layer 0's o_proj inputs equal the model's output with an all-zero mask to
    3e-7 and differ from the causal forward by 17-20%; a Llama's are causal). Supplying the causal mask restores the
    model's own attention (o_proj inputs equal the causal forward to 1e-7); evaluation (sdpa) never reaches this.
    """
    import importlib

    family = importlib.import_module(type(model).__module__)
    eager = getattr(family, "eager_attention_forward", None)
    if eager is None or getattr(eager, "causal_guard", False):
        return

    def guarded(module, query, key, value, attention_mask, *args, **kwargs):
        if attention_mask is None and query.shape[-2] == key.shape[-2] > 1 and query.device.type != "meta":
            upper = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).triu(1)
            attention_mask = torch.zeros(upper.shape, dtype=query.dtype, device=query.device).masked_fill(
                upper, torch.finfo(query.dtype).min)[None, None]
        return eager(module, query, key, value, attention_mask, *args, **kwargs)

    guarded.causal_guard = True
    family.eager_attention_forward = guarded


def main() -> None:
    """Quantize with llm-compressor at each requested setting and print one JSON object."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--windows", required=True, help="safetensors with calib [N, L] and eval [M, L]")
    parser.add_argument("--settings", required=True, help='JSON list of {"bits", "group_size", "sym"}')
    parser.add_argument("--kl", action="store_true", help="also KL(FP || quantized) per token on each eval_<name> part")
    parser.add_argument("--save", default=None,
                        help="folder: write each setting's quantized weights (the model's state dict after oneshot, "
                             "as evaluated) to setting<i>.safetensors there")
    args = parser.parse_args()

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(torch.get_num_threads())
    windows = load_file(args.windows)
    calib, evaluation = windows["calib"], windows["eval"]
    dataset = Dataset.from_dict(
        {"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()}
    )
    parts_windows = {key[5:]: windows[key] for key in windows if key.startswith("eval_")}
    reference = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval() if args.kl else None
    results = []
    for setting in json.loads(args.settings):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        causal_eager_attention(model)
        scheme = QuantizationScheme(
            targets=["Linear"],
            weights=QuantizationArgs(
                num_bits=setting["bits"], type="int", symmetric=setting["sym"],
                strategy="group", group_size=setting["group_size"], actorder="static",
            ),
        )
        # a mixture of experts' routers stay in full precision (as quantkit keeps them): setting["ignore"]
        recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head", *setting.get("ignore", [])],
                              block_size=128, dampening_frac=0.01)
        started = time.perf_counter()
        # mixture of experts: llm-compressor's default sends every token to every expert while calibrating
        moe = {"moe_calibrate_all_experts": setting["all_experts"]} if "all_experts" in setting else {}
        oneshot(
            model=model, dataset=dataset, recipe=recipe, num_calibration_samples=calib.shape[0],
            max_seq_length=calib.shape[1], shuffle_calibration_samples=False, **moe,
        )
        seconds = time.perf_counter() - started
        if args.save:
            from safetensors.torch import save_file

            state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if v.is_floating_point()}
            save_file(state, str(Path(args.save) / f"setting{len(results)}.safetensors"))
        per_window = window_losses(model.eval(), evaluation)
        # further evaluation sets (one per held-out corpus): windows "eval_<name>"
        parts = {name: float(window_losses(model, w).mean()) for name, w in parts_windows.items()}
        kl = {}
        if reference is not None and parts_windows:
            part_kl = {name: windows_kl(model, reference, w) for name, w in parts_windows.items()}
            tokens = {name: w[:, 1:].numel() for name, w in parts_windows.items()}
            kl = {"part_kl": part_kl, "kl": sum(part_kl[n] * tokens[n] for n in tokens) / sum(tokens.values())}
        results.append(dict(setting, loss=float(per_window.mean()), window_losses=per_window.tolist(), seconds=seconds,
                            **({"part_losses": parts} if parts else {}), **kl))
    import llmcompressor
    import transformers

    print("LLMC_RESULT " + json.dumps({"results": results, "llmcompressor": llmcompressor.__version__, "transformers": transformers.__version__}))


if __name__ == "__main__":
    main()
