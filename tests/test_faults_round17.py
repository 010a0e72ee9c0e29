"""The fault battery's seventeenth round (benchmarks/fault_round17.py), fix16's share: a model folder whose
pytorch_model.bin (no safetensors) stores a weight as int32 was quantized as if the integers were values (transformers
casts them to the parameter's dtype as it loads, so the loaded model cannot tell); it is refused by name as the same
tensor in model.safetensors is. Each refusal is as tests/test_faults.py asserts (exit code 2, one `error:` line,
nothing left behind).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import assert_fault, run_cli, save_tiny_llama, write_text

RTN = ["--method", "rtn", "--nsamples", "2", "--seqlen", "16", "--group-size", "16"]
O_PROJ = "model.layers.0.self_attn.o_proj.weight"


def _bin_model(root: Path, legacy: bool, int32: bool) -> Path:
    """A tiny Llama whose weights are one pytorch_model.bin (zip or legacy serialisation), o_proj int32 if asked."""
    from safetensors.torch import load_file

    folder = save_tiny_llama(root / "m")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    if int32:
        state[O_PROJ] = (state[O_PROJ] * 100).to(torch.int32)
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    return folder


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_an_int32_weight_in_a_bin_is_refused_by_name(tmp_path: Path, legacy: bool) -> None:
    folder = _bin_model(tmp_path, legacy, int32=True)
    assert torch.load(folder / "pytorch_model.bin", weights_only=True)[O_PROJ].dtype == torch.int32  # the reference
    text = write_text(tmp_path / "t.txt")
    line = assert_fault(tmp_path, ["calibrate", folder, "--calib", text, *RTN, "-o", tmp_path / "out"],
                        f"weight {O_PROJ} (decoder layer 0) is stored as int32, not as floats")
    assert "pytorch_model.bin" in line, line


def test_a_float_bin_is_taken(tmp_path: Path) -> None:
    """No refusal of a .bin of float weights: its export holds o_proj quantized from the stored values."""
    folder = _bin_model(tmp_path, legacy=False, int32=False)
    text = write_text(tmp_path / "t.txt")
    result = run_cli("calibrate", folder, "--calib", text, *RTN, "--format", "fake", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    stored = torch.load(folder / "pytorch_model.bin", weights_only=True)[O_PROJ]
    exported = load_file(tmp_path / "out" / "model.safetensors")[O_PROJ].float()
    assert 0 < (exported - stored).abs().max() <= stored.abs().max() / 7  # rounded to 4 bits, not replaced
