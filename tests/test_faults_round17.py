"""The fault battery's seventeenth round (benchmarks/fault_round17.py), fix16's share: a model folder whose
pytorch_model.bin (no safetensors) stores a weight as int32 was quantized as if the integers were values (transformers
casts them to the parameter's dtype as it loads, so the loaded model cannot tell); it is refused by name as the same
tensor in model.safetensors is. `eval` of a checkpoint whose quantization_config needs a package this machine lacks
(AWQ: gptqmodel; HQQ: hqq) gave a wrapped ImportError where calibrate refuses in one line: it now names the method and
transformers' own reason; `eval` of an FP8 compressed-tensors checkpoint (which transformers loads) failed in the
finiteness check ("isfinite" not implemented for Float8_e4m3fn): it is scored. A rank started with torchrun's
variables and no peer printed torch's C++ connect retries (a 59-frame stack) before its one error line, and a
--nproc run whose rank died printed torch's 'Terminating process N via signal SIGTERM' (a stopped rank: 30 s more,
then 'Unable to shutdown process'): only the error line now, and a stopped rank is killed after 2 s. Each refusal
is as tests/test_faults.py asserts (exit code 2, one `error:` line, nothing left behind).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_fault,
    cli_command,
    make_model_dir,
    make_text,
    run_cli,
    save_tiny_llama,
    write_text,
)

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


QUANTIZED_CONFIGS = [
    ("awq", "gptqmodel", {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}),
    ("hqq", "hqq", {"quant_method": "hqq", "nbits": 4, "group_size": 32}),
]


@pytest.mark.parametrize(("method", "package", "fields"), QUANTIZED_CONFIGS, ids=[c[0] for c in QUANTIZED_CONFIGS])
def test_eval_of_a_checkpoint_whose_loader_is_not_installed_is_one_line(tmp_path: Path, method: str, package: str,
                                                                         fields: dict) -> None:
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here: transformers can load the {method} checkpoint")
    from transformers import AutoModelForCausalLM

    folder = save_tiny_llama(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": fields}))
    with pytest.raises(ImportError, match=package if method == "awq" else "HQQ"):  # the reference: transformers
        AutoModelForCausalLM.from_pretrained(folder)
    text = write_text(tmp_path / "t.txt")
    line = assert_fault(tmp_path, ["eval", folder, "--data", text, "--seqlen", "16", "--max-tokens", "96"],
                        f"is a {method} checkpoint, which transformers cannot load here")
    assert (package if method == "awq" else "HQQ") in line and "--debug" not in line, line


def test_eval_of_an_fp8_compressed_tensors_checkpoint_scores_its_weights(tmp_path: Path) -> None:
    """FP8 per-channel (compressed-tensors float-quantized, as llm-compressor writes it): eval scores what
    transformers loads, the same loss as the float model holding the dequantized weights (codes * scale)."""
    from safetensors.torch import load_file, save_file

    folder, plain = save_tiny_llama(tmp_path / "fp8"), save_tiny_llama(tmp_path / "plain")
    state = load_file(folder / "model.safetensors")
    dense = dict(state)
    for key in [k for k in state if k.endswith("_proj.weight")]:
        scale = (state[key].abs().amax(dim=1, keepdim=True) / 448.0).clamp_min(1e-12)
        codes = (state[key] / scale).to(torch.float8_e4m3fn)
        state[key], state[key[: -len("weight")] + "weight_scale"], dense[key] = codes, scale, codes.float() * scale
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    save_file(dense, plain / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "ignore": ["lm_head"], "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}}}}
    (folder / "config.json").write_text(json.dumps(config))
    text = write_text(tmp_path / "t.txt")
    losses = []
    for model in (folder, plain):
        result = run_cli("eval", model, "--data", text, "--seqlen", "16", "--max-tokens", "96", "--json")
        assert result.exit_code == 0, result.output
        losses.append(json.loads(result.stdout.strip().splitlines()[-1])["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)


def _stderr_lines(stderr: str) -> list[str]:
    """stderr's lines without the progress bars (redrawn with carriage returns)."""
    return [x for line in stderr.splitlines() for x in line.split("\r") if x.strip() and "%|" not in x]


def test_a_torchrun_rank_without_its_peer_says_one_line(tmp_path: Path) -> None:
    """RANK=1 of 2 and nothing listening at MASTER_ADDR:MASTER_PORT (the reference: a connect to it is refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with socket.socket() as client, pytest.raises(ConnectionRefusedError):
        client.connect(("127.0.0.1", port))
    model, text = save_tiny_llama(tmp_path / "m"), write_text(tmp_path / "t.txt")
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    cmd = cli_command("calibrate", model, "--calib", text, *RTN, "--dist-timeout", "2", "-o", tmp_path / "out")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = _stderr_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: the environment makes this rank 1 of 2"), lines[:5]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_rank_killed_or_stopped_mid_run_says_one_line(tmp_path: Path, how: str) -> None:
    """--nproc 2, rank 1 SIGKILLs (or SIGSTOPs) itself on entering layer 1: one error line naming it, nothing
    else on stderr, nothing exported, and a stopped rank ended within seconds of the others' --dist-timeout."""
    model, text = make_model_dir(tmp_path), make_text(tmp_path)
    # a module of its own: the spawned ranks unpickle the hook by its module's name
    (tmp_path / "hit17.py").write_text("import os, signal\n\nclass Hit:\n    def __call__(self, rank, layer):\n"
                                       f"        if (rank, layer) == (1, 1):\n"
                                       f"            os.kill(os.getpid(), signal.SIG{how.upper()})\n")
    prelude = f"sys.path.insert(0, {str(tmp_path)!r})\nfrom hit17 import Hit"
    cmd = cli_command("calibrate", model, "--calib", text, "--nsamples", "4", "--seqlen", "32", "--group-size", "32",
                      "--nproc", "2", "--dist-timeout", "5", "-o", tmp_path / "out", hooks="Hooks(on_layer=Hit())",
                      prelude=prelude)
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = _stderr_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: calibration rank"), lines[:5]
    assert "SIGKILL" in lines[0] if how == "kill" else "rank 0 failed" in lines[0] or "rank 1" in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
    if how == "stop":
        assert time.monotonic() - started < 120  # torch waited 30 s more on the stopped rank before killing it
