"""--resume: a low-memory run SIGKILLed mid-way continues and ends byte-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import FailAt, cli_command, make_model_dir, make_text, run_calibration

from quantkit.engine.comm import Hooks
from quantkit.errors import QuantkitError
from quantkit.fsutil import work_dir_for
from quantkit.quant import QuantSpec

FAIL_AT_2 = Hooks(on_layer=FailAt(0, 2))


def cli(model: Path, text: Path, out: Path, *extra: str, hooks: str | None = None) -> list[str]:
    """The calibrate command line for a low-memory GPTQ run of 4 windows of 32 tokens."""
    return cli_command("calibrate", model, "--calib", text, "--nsamples", "4", "--seqlen", "32", "--group-size", "32",
                       "--low-memory", "-o", out, "--json", *extra, hooks=hooks)


def _interrupted_run(root: Path, spec: QuantSpec, *, full: bool = False, **options) -> tuple[Path, Path, Path, dict]:
    """A 3-layer low-memory GPTQ run of 4 x 32 tokens into root/out, stopped after 2 layers (and, with `full`, the
    same run uninterrupted into root/full first). Returns the model folder, its text, the output and the options."""
    import torch

    torch.set_num_threads(1)
    model, text = make_model_dir(root, layers=3), make_text(root)
    kw = dict(method="gptq", calib=str(text), nsamples=4, seqlen=32, progress=False, low_memory=True, **options)
    if full:
        run_calibration(str(model), str(root / "full"), spec, **kw)
    out = root / "out"
    with pytest.raises(RuntimeError, match="injected"):
        run_calibration(str(model), str(out), spec, hooks=FAIL_AT_2, **kw)
    return model, text, out, kw


def _assert_same_exports(full: Path, out: Path) -> None:
    """The two exports hold the same safetensors files, byte for byte."""
    files = sorted(p.name for p in full.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in out.glob("*.safetensors"))
    for name in files:
        assert (full / name).read_bytes() == (out / name).read_bytes(), name


def test_sigkill_then_resume_is_byte_identical(tmp_path: Path) -> None:
    model, text = make_model_dir(tmp_path, layers=4), make_text(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    full = subprocess.run(cli(model, text, tmp_path / "full"), env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]

    out = tmp_path / "out"
    state = work_dir_for(str(out)) / "state.json"
    proc = subprocess.Popen(cli(model, text, out, hooks="Hooks(on_layer=Delay(1.5))"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    done = 0
    while time.time() < deadline and proc.poll() is None:
        if state.is_file():
            try:
                done = json.loads(state.read_text())["layers_done"]
            except (json.JSONDecodeError, KeyError):
                done = 0
            if done >= 2:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= done < 4 and not out.exists()  # really killed mid-way, nothing exported

    resumed = subprocess.run(cli(model, text, out, "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    report = json.loads((out / "quantkit_report.json").read_text()) if (out / "quantkit_report.json").is_file() else None
    if report is not None:
        assert report["resumed_from_layer"] >= 2
    assert not work_dir_for(str(out)).exists()
    _assert_same_exports(tmp_path / "full", out)


def test_resume_refuses_a_work_area_made_with_other_settings(tmp_path: Path) -> None:
    model, _, out, kw = _interrupted_run(tmp_path, QuantSpec(bits=4, group_size=32))
    assert json.loads((work_dir_for(str(out)) / "state.json").read_text())["layers_done"] == 2
    with pytest.raises(QuantkitError, match="other settings"):
        run_calibration(str(model), str(out), QuantSpec(bits=3, group_size=32), resume=True, **kw)
    report = run_calibration(str(model), str(out), QuantSpec(bits=4, group_size=32), resume=True, **kw)
    assert report["resumed_from_layer"] == 2 and (out / "config.json").is_file()


@pytest.mark.parametrize("bits, lm_head", [(3, False), (4, True)])
def test_fp_target_resume_continues_both_streams(tmp_path: Path, bits: int, lm_head: bool) -> None:
    """Interrupted after 2 of 3 layers and resumed: the same bytes as an uninterrupted FP-target run,
    which needs the FP stream restored beside the quantized one (and, with the head quantized, both
    final streams for its solve)."""
    spec = QuantSpec(bits=bits, group_size=32)
    model, _, out, kw = _interrupted_run(tmp_path, spec, full=True, fp_target=True, lm_head=lm_head)
    report = run_calibration(str(model), str(out), spec, resume=True, **kw)
    assert report["resumed_from_layer"] == 2
    _assert_same_exports(tmp_path / "full", out)


def _put_back(path: Path, data: bytes) -> None:
    """`data` written as a new file in `path`'s place (a restore or a sync), an hour newer than before."""
    copy = path.with_name(path.name + ".copy")
    copy.write_bytes(data)
    stamp = path.stat().st_mtime_ns + 3600 * 10**9
    os.utime(copy, ns=(stamp, stamp))
    os.replace(copy, path)


def test_resume_over_a_byte_identical_copy_is_taken(tmp_path: Path) -> None:
    """The fingerprint held the files' size and mtime: a copy of the same bytes was "made with other settings".
    A data file with other bytes is refused in one line naming it; once the same bytes are back (new files,
    new mtimes, model and data) the resume is taken and ends with an uninterrupted run's bytes."""
    spec = QuantSpec(bits=4, group_size=32)
    model, text, out, kw = _interrupted_run(tmp_path, spec, full=True)
    original = text.read_bytes()
    _put_back(text, original.replace(b" ", b"  ", 1))
    with pytest.raises(QuantkitError, match=re.escape(f"its data file {text.resolve()} holds other bytes")) as caught:
        run_calibration(str(model), str(out), spec, resume=True, **kw)
    assert "\n" not in str(caught.value) and "drop --resume" in str(caught.value)
    _put_back(text, original)
    weights = next(model.glob("*.safetensors"))
    _put_back(weights, weights.read_bytes())
    report = run_calibration(str(model), str(out), spec, resume=True, **kw)
    assert report["resumed_from_layer"] == 2
    _assert_same_exports(tmp_path / "full", out)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 3-layer low-memory GPTQ run stopped after 2 layers, its work area kept pristine beside it."""
    root = tmp_path_factory.mktemp("interrupted")
    model, _, out, kw = _interrupted_run(root, QuantSpec(bits=4, group_size=32))
    work = work_dir_for(str(out))
    shutil.copytree(work, root / "pristine")
    return {"model": model, "out": out, "work": work, "pristine": root / "pristine", "kw": kw}


def _state(work: Path, **changes) -> None:
    state = json.loads((work / "state.json").read_text())
    for key, value in changes.items():
        if value is None:
            state.pop(key)
        else:
            state[key] = value
    (work / "state.json").write_text(json.dumps(state))


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _link(path: Path, target: Path) -> None:
    path.unlink()
    path.symlink_to(target)


def _int64_hidden(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    save_file({k: v.long() for k, v in load_file(path).items()}, path)


DAMAGES = {
    "state not JSON": (lambda w: (w / "state.json").write_text("{half"), "state.json cannot be read"),
    "state a list": (lambda w: (w / "state.json").write_text("[]"), "state.json holds no run's state"),
    "no fingerprint": (lambda w: _state(w, fingerprint=None), "state.json holds no run's state"),
    "layers_done 7 of 3": (lambda w: _state(w, layers_done=7), "counts 7 finished layers of 3"),
    "layers_done -1": (lambda w: _state(w, layers_done=-1), "counts -1 finished layers"),
    "layers_done '1'": (lambda w: _state(w, layers_done="1"), "counts '1' finished layers"),
    "layer file deleted": (lambda w: (w / "layer_00000.safetensors").unlink(), "layer_00000.safetensors is missing"),
    "hidden file deleted": (lambda w: (w / "hidden_00002_rank0.safetensors").unlink(),
                            "hidden_00002_rank0.safetensors is missing"),
    "hidden file cut short": (lambda w: _cut(w / "hidden_00002_rank0.safetensors"),
                              "hidden_00002_rank0.safetensors is missing or unreadable"),
    "hidden file int64": (lambda w: _int64_hidden(w / "hidden_00002_rank0.safetensors"), "holds torch.int64"),
    "layer file cut short": (lambda w: _cut(w / "layer_00001.safetensors"),
                             "layer_00001.safetensors is missing or unreadable"),
    # a resumed run exported these (exit 0, other bytes than a fresh run): battery round 6
    "layer file a link": (lambda w: _link(w / "layer_00000.safetensors", w.parent / "model" / "model.safetensors"),
                          "layer_00000.safetensors is a link, not a file this run wrote"),
    "layer file another layer's": (lambda w: shutil.copy(w / "layer_00001.safetensors", w / "layer_00000.safetensors"),
                                   "layer_00000.safetensors holds fp.model.layers.1.input_layernorm.weight, which is not layer 0's"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_resume_from_a_damaged_work_area_is_one_line(interrupted: dict, damage: str) -> None:
    """Each was a traceback (JSONDecodeError, KeyError, TypeError, safetensors' errors) or, with the inputs
    rewritten as int64, a resumed run with other codes."""
    work = interrupted["work"]
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(interrupted["pristine"], work)
    edit, fragment = DAMAGES[damage]
    edit(work)
    with pytest.raises(QuantkitError, match=re.escape(fragment)) as caught:
        run_calibration(str(interrupted["model"]), str(interrupted["out"]), QuantSpec(bits=4, group_size=32),
                        resume=True, **interrupted["kw"])
    assert "\n" not in str(caught.value) and not interrupted["out"].exists()


def test_resume_over_edited_weights_is_refused(interrupted: dict) -> None:
    """The fingerprint held the model's path only: layers solved from the old weights joined the new ones."""
    from safetensors.torch import load_file, save_file

    work = interrupted["work"]
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(interrupted["pristine"], work)
    model = interrupted["model"]
    files = sorted(model.glob("*.safetensors"))
    tensors = load_file(files[0])
    key = next(iter(tensors))
    tensors[key] = tensors[key] * 0.5
    save_file(tensors, files[0], metadata={"format": "pt"})
    with pytest.raises(QuantkitError, match=re.escape(f"its model file {files[0].resolve()} holds other bytes")):
        run_calibration(str(model), str(interrupted["out"]), QuantSpec(bits=4, group_size=32), resume=True,
                        **interrupted["kw"])
