"""The fault battery's seventeenth round (benchmarks/fault_round17.py), last session's leftovers (issue #22):
`eval` of a bitsandbytes nf4 checkpoint was refused as an "unsupported architecture 'llama'" although llama is
supported: bitsandbytes' own 4-bit forward fails on this machine's CPU path (its avx512bf16 repacking cannot take a
layer narrower than the block size), and transformers' own forward without gradients fails the same. The refusal
now says that the checkpoint's own forward fails, and in which package. And `calibrate` of a bitsandbytes
checkpoint printed bitsandbytes' import-time advice (an optional CPU kernel it could not fetch from the hub) before
its one error line.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import assert_fault, cli_command, run_cli, save_tiny_llama, write_text

EV = ["--seqlen", "16", "--max-tokens", "96"]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _bnb_checkpoint(root: Path, kind: str) -> tuple[Path, Path]:
    """(a bitsandbytes `kind` ("nf4" or "int8") checkpoint as transformers serializes one, the same model with its
    linears dequantized to float32): the tensors bitsandbytes' own functions make."""
    import bitsandbytes.functional as F
    from safetensors.torch import load_file, save_file

    folder, deq_folder = save_tiny_llama(root / "m"), save_tiny_llama(root / "deq")
    state = load_file(folder / "model.safetensors")
    deq = dict(state)
    for key in [k for k in state if k.endswith(".weight") and any(f".{n}." in k for n in LINEARS)]:
        weight = state.pop(key)
        if kind == "nf4":
            codes, quant_state = F.quantize_4bit(weight, quant_type="nf4", blocksize=64)
            deq[key] = F.dequantize_4bit(codes, quant_state).float()
            state[key] = codes
            state.update({f"{key}.{name}": value for name, value in quant_state.as_dict(packed=True).items()})
        else:  # LLM.int8: int8 rows and their absolute maxima (SCB)
            scb = weight.abs().amax(dim=1).clamp_min(1e-8)
            state[key] = torch.round(weight / scb[:, None] * 127).to(torch.int8)
            state[key[: -len("weight")] + "SCB"] = scb
            deq[key] = state[key].float() * scb[:, None] / 127
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    save_file({k: v.contiguous() for k, v in deq.items()}, deq_folder / "model.safetensors", metadata={"format": "pt"})
    fields = ({"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
               "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32", "bnb_4bit_use_double_quant": False}
              if kind == "nf4" else {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": fields}))
    return folder, deq_folder


def _loss(output: str) -> float:
    return float(output.split("loss ", 1)[1].split()[0])


def _own_loss(model, folder: Path, text: Path) -> float:
    """Mean next-token cross-entropy of `model` on the text's first 96 tokens in six windows of 16 (each window's
    first token has no context and is not scored): what `eval --part all --seqlen 16 --max-tokens 96` scores."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(text.read_text(), add_special_tokens=False)["input_ids"][:96]
    windows = torch.tensor(ids).reshape(6, 16)
    with torch.no_grad():
        logits = model(input_ids=windows).logits.float()
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_eval_of_a_bitsandbytes_checkpoint_scores_it_or_says_why_it_cannot_run(tmp_path: Path, kind: str) -> None:
    from transformers import AutoModelForCausalLM

    folder, deq_folder = _bnb_checkpoint(tmp_path, kind)
    model = AutoModelForCausalLM.from_pretrained(folder)
    reference: Exception | None = None
    try:  # the reference: transformers' own forward of the checkpoint, without gradients as an evaluation runs
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    except Exception as err:  # noqa: BLE001 - whatever bitsandbytes raises on this machine
        reference = err
    text = write_text(tmp_path / "t.txt")
    if reference is not None:
        line = assert_fault(tmp_path, ["eval", folder, "--data", text, *EV],
                            "is a bitsandbytes checkpoint that transformers loads but cannot run here")
        assert str(reference).splitlines()[0] in line and "unsupported architecture" not in line, line
    else:  # it runs here: scored as transformers' own forward of the checkpoint scores the same 96 tokens
        result = run_cli("eval", folder, "--data", text, "--part", "all", *EV)
        assert result.exit_code == 0, result.output
        assert abs(_loss(result.output) - _own_loss(model, folder, text)) < 1e-3, result.output


def test_calibrate_of_a_bitsandbytes_checkpoint_prints_only_its_refusal(tmp_path: Path) -> None:
    """A fresh process (bitsandbytes not yet imported): stderr holds the refusal and nothing bitsandbytes logged."""
    folder, _ = _bnb_checkpoint(tmp_path, "int8")
    text = write_text(tmp_path / "t.txt")
    done = subprocess.run(cli_command("calibrate", folder, "--calib", text, "--method", "rtn", "--nsamples", "2",
                                      "--seqlen", "16", "-o", tmp_path / "out"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and done.stderr.startswith("error: "), done.stderr
    assert "is already quantized" in done.stderr and not (tmp_path / "out").exists(), done.stderr
