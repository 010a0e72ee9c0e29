"""The fault battery's seventeenth round (benchmarks/fault_round17.py), harden's share: the process environment a
command meets (tqdm settings it cannot read, stderr on a full device) and a config.json whose dtype no export holds.
Each bad input is refused in one `error:` line with exit code 2 and nothing left behind; what cannot be shown (a
progress bar on a full stderr) does not stop the work."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli_command, run_cli, save_tiny_llama, write_text

import quantkit

RTN = ["--method", "rtn", "--nsamples", "2", "--seqlen", "16", "--group-size", "32"]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("round17b")
    return {"root": root, "model": save_tiny_llama(root / "model"), "text": write_text(root / "text.txt")}


def _env(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def test_a_tqdm_setting_tqdm_cannot_read_is_one_line(made: dict, tmp_path: Path) -> None:
    """TQDM_MININTERVAL=abc: tqdm converts its TQDM_* variables as it is imported, and the ValueError came out as
    'could not convert string to float' (--debug shows the traceback); now one line naming the variable."""
    reference = subprocess.run([sys.executable, "-c", "import tqdm.std"], env=_env(TQDM_MININTERVAL="abc"),
                               capture_output=True, text=True)
    assert reference.returncode != 0  # tqdm itself cannot be imported under it
    done = subprocess.run(cli_command("calibrate", made["model"], "--calib", made["text"], *RTN, "-o", tmp_path / "out"),
                          env=_env(TQDM_MININTERVAL="abc"), capture_output=True, text=True)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "TQDM_MININTERVAL='abc'" in lines[0], done.stderr
    assert "--debug" not in lines[0] and not (tmp_path / "out").exists()


def test_a_tqdm_setting_tqdm_cannot_read_is_one_quantkit_error_from_the_api(made: dict, tmp_path: Path) -> None:
    """The same setting through quantkit.quantize (and load_quantized): tqdm's ValueError came from deep inside
    torch's import; now the QuantkitError the CLI prints. A fresh process: this one imported tqdm long ago."""
    reference = subprocess.run([sys.executable, "-c", "import torch"], env=_env(TQDM_MININTERVAL="abc"),
                               capture_output=True, text=True)
    assert reference.returncode != 0 and "ValueError" in reference.stderr  # torch cannot be imported under it
    code = (f"import quantkit\nfor call in (lambda: quantkit.quantize({str(made['model'])!r}, data={str(made['text'])!r}, "
            f"method='rtn', nsamples=2, seqlen=16, output_dir={str(tmp_path / 'out')!r}), "
            "lambda: quantkit.load_quantized('x')):\n"
            "    try:\n        call()\n    except quantkit.QuantkitError as err:\n        print(err)\n")
    done = subprocess.run([sys.executable, "-c", code], env=_env(TQDM_MININTERVAL="abc"), capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and done.stderr == "" and len(lines) == 2, (done.stdout, done.stderr)
    assert all(line.startswith("tqdm cannot read the environment variable TQDM_MININTERVAL='abc'") for line in lines)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stderr", ["/dev/full", "closed"])
def test_stderr_that_takes_nothing_does_not_stop_the_work(made: dict, tmp_path: Path, stderr: str) -> None:
    """2>/dev/full: the first progress line that could not be written stopped a good run (exit 1, nothing exported)
    and turned a refusal's exit code into 1; 2>&- (Python's sys.stderr is None) did the same once stderr was wrapped
    for the first. The run now writes the export an in-process run writes, byte for byte; a refusal still exits 2."""
    if stderr == "/dev/full" and not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    args = ["calibrate", made["model"], "--calib", made["text"], "--method", "gptq", "--nsamples", "2", "--seqlen", "16",
            "--group-size", "32"]
    assert run_cli(*args, "-o", tmp_path / "reference").exit_code == 0
    with contextlib.ExitStack() as stack:
        if stderr == "closed":
            streams = dict(stderr=subprocess.DEVNULL, preexec_fn=lambda: os.close(2))
        else:
            streams = dict(stderr=stack.enter_context(open(stderr, "w")))
        done = subprocess.run(cli_command(*args, "-o", tmp_path / "out"), env=_env(), stdout=subprocess.DEVNULL,
                              **streams)
        refused = subprocess.run(cli_command(*args, "--bits", "5", "-o", tmp_path / "no"), env=_env(),
                                 stdout=subprocess.DEVNULL, **streams)
    assert done.returncode == 0
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == \
        (tmp_path / "reference" / "model.safetensors").read_bytes()
    assert refused.returncode == 2 and not (tmp_path / "no").exists()


def test_a_config_dtype_no_export_holds_is_one_line(made: dict, tmp_path: Path) -> None:
    """config.json saying float64 over float32 tensors: --dtype auto ran the model in float64 and wrote an export whose
    quantkit.json says float64, which load_quantized then refused as damaged (exit 0 before that). plan, --dry-run
    and the run now refuse it in one line naming --dtype; with --dtype float32 it is the float32 model's export."""
    model = tmp_path / "m64"
    shutil.copytree(made["model"], model)
    config = json.loads((model / "config.json").read_text())
    config.pop("torch_dtype", None)
    (model / "config.json").write_text(json.dumps({**config, "dtype": "float64"}))
    lines = set()
    for command in (["plan"], ["calibrate", "--dry-run", "-o", tmp_path / "out"], ["calibrate", "-o", tmp_path / "out"]):
        result = run_cli(command[0], model, "--calib", made["text"], *RTN, *command[1:])
        got = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(got) == 1 and "float64" in got[0] and "--dtype float32" in got[0], got
        lines.add(got[0])
    assert len(lines) == 1 and not (tmp_path / "out").exists()
    assert run_cli("calibrate", model, "--calib", made["text"], *RTN, "--dtype", "float32", "-o", tmp_path / "out").exit_code == 0
    assert run_cli("calibrate", made["model"], "--calib", made["text"], *RTN, "-o", tmp_path / "ref").exit_code == 0
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()
    quantkit.load_quantized(tmp_path / "out")


def test_weights_that_overflow_the_configs_float16_name_the_dtype(made: dict, tmp_path: Path) -> None:
    """bfloat16 weights holding 1e5 under a float16 config: refused as 'infinite ... the model is broken: download the
    weights again' though the stored weights are finite (they overflow float16 as loaded); the line now says so and
    names --dtype, and --dtype bfloat16 takes the folder."""
    import torch
    from safetensors.torch import load_file, save_file

    model = tmp_path / "m"
    shutil.copytree(made["model"], model)
    stored = {k: v.to(torch.bfloat16) for k, v in load_file(model / "model.safetensors").items()}
    key = "model.layers.0.self_attn.o_proj.weight"
    stored[key][0, 0] = 1e5
    save_file(stored, model / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((model / "config.json").read_text())
    config.pop("torch_dtype", None)
    (model / "config.json").write_text(json.dumps({**config, "dtype": "float16"}))
    reread = load_file(model / "model.safetensors")[key]
    assert bool(torch.isfinite(reread).all()) and not bool(torch.isfinite(reread.to(torch.float16)).all())  # reference
    result = run_cli("calibrate", model, "--calib", made["text"], *RTN, "-o", tmp_path / "out")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "--dtype bfloat16" in lines[0] and key in lines[0], lines
    assert not (tmp_path / "out").exists()
    taken = run_cli("calibrate", model, "--calib", made["text"], *RTN, "--dtype", "bfloat16", "-o", tmp_path / "out")
    assert taken.exit_code == 0, taken.output
