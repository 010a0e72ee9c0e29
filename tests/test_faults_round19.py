"""The fault battery's nineteenth round (benchmarks/fault_round19.py): architecture configs at their edges.
`plan` planned a config.json with rope_theta -1 (exit 0) that calibrate, --dry-run and eval refuse in one line; a
Mistral config with sliding_window <= 0 (no layer_types, no use_sliding_window: its window applies wherever one
is set) was calibrated and scored though transformers' own forward of it fails. Each refusal is as
tests/test_faults.py asserts (exit code 2, one `error:` line, nothing left behind).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_fault, make_tokenizer, run_cli, save_tiny_llama, tiny_model, write_text

RTN = ["--method", "rtn", "--nsamples", "2", "--seqlen", "16", "--group-size", "16"]


def _edit_config(folder: Path, **fields) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_plan_refuses_a_rope_theta_calibrate_refuses(tmp_path: Path) -> None:
    model = save_tiny_llama(tmp_path / "m")
    _edit_config(model, rope_parameters={"rope_type": "default", "rope_theta": -1.0})
    text = write_text(tmp_path / "t.txt")
    fragment = "config field rope_parameters.rope_theta is -1.0"
    # the reference: calibrate --dry-run's own refusal of the same folder
    assert_fault(tmp_path, ["calibrate", model, "--calib", text, *RTN, "--dry-run", "-o", tmp_path / "out"], fragment)
    assert_fault(tmp_path, ["plan", model, "--calib", text, *RTN, "--json"], fragment)


def _mistral(root: Path, window: int) -> Path:
    folder = root / "mistral"
    tiny_model("mistral", 0, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
               sliding_window=window).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("window", [-4, 0])
def test_a_mistral_sliding_window_of_no_token_is_refused(tmp_path: Path, window: int) -> None:
    """transformers' own forward of this config fails (the reference); calibrate and eval took it (exit 0)."""
    model = _mistral(tmp_path, window)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(model)
    with pytest.raises(Exception):  # noqa: B017, PT011 - whatever transformers raises: its forward does not run
        loaded(torch.arange(2, 18).unsqueeze(0))
    text = write_text(tmp_path / "t.txt")
    fragment = f"config field sliding_window is {window}"
    assert_fault(tmp_path, ["calibrate", model, "--calib", text, *RTN, "-o", tmp_path / "out"], fragment)
    assert_fault(tmp_path, ["eval", model, "--data", text, "--seqlen", "16"], fragment)


def test_a_mistral_sliding_window_is_still_taken(tmp_path: Path) -> None:
    """No refusal of a positive window (4 under 16-token windows): the export is written."""
    from safetensors.torch import load_file

    model = _mistral(tmp_path, 4)
    text = write_text(tmp_path / "t.txt")

    result = run_cli("calibrate", model, "--calib", text, *RTN, "--format", "fake", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "model.layers.0.mlp.down_proj.weight" in load_file(tmp_path / "out" / "model.safetensors")

