"""Fault injection: bad models, devices, outputs, options, full and read-only disks, signals.

Every case asserts exit code 2 (130/143 for signals), exactly one `error:` line on stderr, the
model directory byte-identical afterwards and nothing new anywhere under the test's folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import (
    FailAt,
    assert_fault,
    cli_command,
    one_error_line,
    replaced,
    run_cli,
    save_tiny_llama,
    tree,
    unchanged,
    with_hooks,
    write_text,
)
from safetensors.torch import load_file, save_file

BASE = ["--nsamples", "2", "--seqlen", "16", "--group-size", "32", "--json"]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One tiny model, its text and one quantkit export of it, shared read-only by the tests."""
    root = tmp_path_factory.mktemp("faults")
    model = save_tiny_llama(root / "model")
    text = write_text(root / "text.txt")
    export = root / "export"
    result = run_cli("calibrate", model, "--calib", text, *BASE, "--method", "rtn", "-o", export)
    assert result.exit_code == 0, result.output
    return {"model": model, "text": text, "export": export}


def calibrate(work: Path, *extra) -> list:
    """`quantkit calibrate` of the work copy (GPTQ: the faults are the method's business nowhere)."""
    base = ["--calib", work / "text.txt", "--method", "gptq", *BASE]
    return ["calibrate", work / "model", *replaced(base, extra), *extra]  # an option given twice is refused


def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A small tmpfs mounted at path while the fixture lasts, or skip with the reason."""
    path.mkdir(exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        # lazily: a child the test started may still hold a file there, and a plain umount then failed quietly,
        # leaving the mount under /tmp/pytest-of-root
        proc = subprocess.run(["umount", "-l", str(path)], capture_output=True, text=True)
        if proc.returncode != 0 or os.path.ismount(path):
            pytest.fail(f"cannot unmount the tmpfs at {path}: {proc.stderr.strip() or 'still mounted'}")


@pytest.fixture
def small_disk(work: Path) -> Iterator[Path]:
    """A 12 KiB tmpfs at work/disk: room for a probe and a few files, not for a checkpoint."""
    yield from tmpfs(work / "disk", "size=12k")


@pytest.fixture
def readonly_disk(work: Path) -> Iterator[Path]:
    """A read-only tmpfs at work/ro."""
    yield from tmpfs(work / "ro", "size=64k,ro")


# ---------------------------------------------------------------- model files


def drop_tensor(model: Path, key: str) -> None:
    tensors = load_file(model / "model.safetensors")
    del tensors[key]
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})


def edit_config(model: Path, **changes) -> None:
    path = model / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_missing_tensor_is_refused_not_randomly_initialised(work: Path, no_model_load) -> None:
    drop_tensor(work / "model", "model.layers.1.mlp.up_proj.weight")
    line = assert_fault(work, calibrate(work, "-o", "out"), "model.layers.1.mlp.up_proj.weight")
    assert "not in the checkpoint" in line


@pytest.mark.parametrize("layers, fragment", [(3, "names 3 decoder layers but the checkpoint holds 2"),
                                               (1, "names 1 decoder layers but the checkpoint holds 2")])
def test_config_layer_count_must_match_the_weights(work: Path, no_model_load, layers: int, fragment: str) -> None:
    edit_config(work / "model", num_hidden_layers=layers)
    assert_fault(work, calibrate(work, "-o", "out"), fragment)


def test_config_shapes_must_match_the_weights(work: Path, no_model_load) -> None:
    edit_config(work / "model", intermediate_size=48)
    assert_fault(work, calibrate(work, "-o", "out"), "config.json does not match the weights")


def test_config_that_builds_no_model(work: Path, no_model_load) -> None:
    edit_config(work / "model", num_attention_heads=5)  # 32 is not divisible by 5
    assert_fault(work, calibrate(work, "-o", "out"), "error:")


def test_unparsable_config(work: Path, no_model_load) -> None:
    (work / "model" / "config.json").write_text("{not json")
    assert_fault(work, calibrate(work, "-o", "out"), "cannot read the config")


def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "zero-byte": b"", "bad-header": b"\xff" * 8 + data[8:],
                      "one-byte-short": data[:-1]}[how])


@pytest.mark.parametrize("how", ["truncated", "zero-byte", "bad-header", "one-byte-short"])
def test_corrupt_safetensors_calibrate(work: Path, no_model_load, how: str) -> None:
    corrupt(work / "model" / "model.safetensors", how)
    assert_fault(work, calibrate(work, "-o", "out"), "truncated or corrupt")


@pytest.mark.parametrize("how", ["truncated", "zero-byte"])
def test_corrupt_safetensors_eval_and_demo(work: Path, no_model_load, how: str) -> None:
    corrupt(work / "model" / "model.safetensors", how)
    assert_fault(work, ["eval", work / "model", "--data", work / "text.txt", "--seqlen", "16"], "truncated or corrupt")
    assert_fault(work, ["demo", "--model", work / "model", "--data", work / "text.txt", "--seqlen", "16", "-o", "d"],
                 "truncated or corrupt")


def test_corrupt_export_eval(work: Path, made: dict) -> None:
    export = work / "export"
    shutil.copytree(made["export"], export)
    corrupt(export / "model.safetensors", "truncated")
    assert_fault(work, ["eval", export, "--data", work / "text.txt", "--seqlen", "16"], "truncated or corrupt")


def shard(model: Path) -> None:
    """Split model.safetensors into two shards with an index, as transformers saves big models."""
    tensors = load_file(model / "model.safetensors")
    keys = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for fname, names in halves.items():
        save_file({k: tensors[k] for k in names}, model / fname, metadata={"format": "pt"})
    (model / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: f for f, names in halves.items() for k in names}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))


def test_sharded_checkpoint_is_checked_shard_by_shard(work: Path) -> None:
    shard(work / "model")
    result = run_cli(*calibrate(work, "--method", "rtn", "-o", "ok"))
    assert result.exit_code == 0, result.output
    shutil.rmtree(work / "ok")
    (work / "model" / "model-00002-of-00002.safetensors").unlink()
    assert_fault(work, calibrate(work, "-o", "out"), "is missing")


def test_missing_tokenizer(work: Path, no_model_load) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (work / "model" / name).unlink(missing_ok=True)
    assert_fault(work, calibrate(work, "-o", "out"), "tokenizer")
    assert_fault(work, ["eval", work / "model", "--data", work / "text.txt", "--seqlen", "16"], "tokenizer")


def test_tokenizer_larger_than_the_embedding(work: Path, no_model_load) -> None:
    tensors = load_file(work / "model" / "model.safetensors")
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[key] = tensors[key][:40].contiguous()
    save_file(tensors, work / "model" / "model.safetensors", metadata={"format": "pt"})
    edit_config(work / "model", vocab_size=40)
    assert_fault(work, calibrate(work, "-o", "out"), "embedding holds 40")


def test_missing_model_and_unreachable_or_unknown_hub_id(work: Path) -> None:
    assert_fault(work, ["calibrate", work / "nope", "--calib", work / "text.txt", "-o", "out"], "not found")
    started = time.perf_counter()
    assert_fault(work, ["eval", "quantkit-no-such-org/no-such-model-3141", "--data", work / "text.txt"], "not found")
    assert time.perf_counter() - started < 20  # no half-minute of retries


# ---------------------------------------------------------------- devices


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("device, fragment", [("cuda", "CUDA is not available"), ("cuda:5", "CUDA is not available"),
                                              ("foo", "unknown device 'foo'")])
def test_unusable_device(work: Path, no_model_load, device: str, fragment: str) -> None:
    assert_fault(work, calibrate(work, "--device", device, "-o", "out"), fragment)
    assert_fault(work, ["importance", work / "model", "--calib", work / "text.txt", "--device", device, "-o", "set"],
                 fragment)


# ---------------------------------------------------------------- outputs


def test_output_onto_the_source_is_refused(work: Path, no_model_load) -> None:
    assert_fault(work, calibrate(work, "-o", work / "model", "--overwrite"), "is the input")
    assert_fault(work, calibrate(work, "-o", work / "model" / "q"), "inside the input")
    assert_fault(work, calibrate(work, "-o", work / "text.txt", "--overwrite"), "is a file")
    # the source inside the output: replacing the output would delete it
    assert_fault(work / "model", ["calibrate", "model", "--calib", "text.txt", *BASE, "-o", "..", "--overwrite"],
                 "current directory")


def test_output_holding_the_source(work: Path, no_model_load) -> None:
    nested = work / "outer"
    nested.mkdir()
    shutil.move(work / "model", nested / "model")
    assert_fault(work, ["calibrate", nested / "model", "--calib", "text.txt", *BASE, "-o", nested, "--overwrite"],
                 "holds the input")


def test_output_dot_is_refused(work: Path, no_model_load) -> None:
    assert_fault(work, calibrate(work, "-o", ".", "--overwrite"), "current directory")


def test_output_file_with_overwrite_is_refused(work: Path, no_model_load) -> None:
    (work / "afile").write_text("keep me")
    assert_fault(work, calibrate(work, "-o", "afile", "--overwrite"), "is a file")


def test_export_onto_its_input_is_refused(work: Path, made: dict) -> None:
    shutil.copytree(made["export"], work / "export")
    assert_fault(work, ["export", work / "export", "--format", "fake", "-o", work / "export", "--overwrite"],
                 "input")
    assert_fault(work, ["export", work / "export", "--format", "fake", "-o", work / "export" / "sub"], "inside the input")


def test_read_only_output_is_found_before_calibrating(work: Path, readonly_disk: Path, no_model_load) -> None:
    assert_fault(work, calibrate(work, "-o", readonly_disk / "out"), "Read-only file system")


def test_full_disk_is_found_before_calibrating(work: Path, small_disk: Path, no_model_load) -> None:
    assert_fault(work, calibrate(work, "-o", small_disk / "a" / "out"), "not enough space")


@pytest.mark.parametrize("mode", ["plain", "low-memory"])
def test_disk_full_while_writing(work: Path, small_disk: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """The estimate passes (forced to 0) but the disk fills while writing: one line, nothing left, no new parents."""
    import quantkit.calibrate.preflight

    monkeypatch.setattr(quantkit.calibrate.preflight, "export_bytes", lambda files, bits, fmt: 0)
    extra = ["--low-memory"] if mode == "low-memory" else []
    assert_fault(work, calibrate(work, "-o", small_disk / "a" / "b" / "out", *extra), "disk is full")
    assert not any(small_disk.iterdir())


def test_export_disk_full(work: Path, made: dict, small_disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import quantkit.export.cli

    shutil.copytree(made["export"], work / "export")
    assert_fault(work, ["export", work / "export", "--format", "fake", "-o", small_disk / "x" / "out"], "not enough space")
    monkeypatch.setattr(quantkit.export.cli, "export_size", lambda in_dir, fmt: 0)
    assert_fault(work, ["export", work / "export", "--format", "fake", "-o", small_disk / "x" / "out"], "disk is full")
    assert not any(small_disk.iterdir())


def fill(disk: Path) -> None:
    """Fill a tmpfs to its last byte."""
    with contextlib.suppress(OSError), open(disk / "filler", "wb") as f:
        while True:
            f.write(b"\0" * 1024)
            f.flush()


@pytest.fixture
def tiny_disk(work: Path) -> Iterator[Path]:
    """A 4 KiB tmpfs at work/tiny: room for empty files (the up-front checks pass) and little else."""
    yield from tmpfs(work / "tiny", "size=4k")


@pytest.mark.parametrize("case", ["importance -o", "eval -o", "--offload-dir"])
def test_a_write_the_disk_stops_is_one_line_naming_the_output(work: Path, tiny_disk: Path, case: str) -> None:
    """Round 10: a disk filling while results were written gave "No space left on device (...) (--debug shows the
    traceback)" without the path (importance, eval -o, qid fit -o), or torch.save's "RuntimeError: [enforce fail at
    inline_container.cc] unexpected pos" for --offload-dir. Now one line naming what could not be written."""
    if case == "eval -o":
        fill(tiny_disk)
    target = {"importance -o": tiny_disk / "s", "eval -o": tiny_disk / "r.json", "--offload-dir": tiny_disk}[case]
    args = {"importance -o": ["importance", work / "model", "--calib", "text.txt", "--nsamples", "2", "--seqlen", "16",
                              "--json", "-o", target],
            "eval -o": ["eval", work / "model", "--data", "text.txt", "--seqlen", "16", "--json", "-o", target],
            "--offload-dir": calibrate(work, "--low-memory", "--offload-dir", target, "-o", work / "out")}[case]
    line = assert_fault(work, args, "cannot write ")
    assert "--debug" not in line and ("disk is full" in line or "stopped short" in line), line
    assert str(target) in line, line


def test_a_file_size_limit_is_one_line_naming_the_output(work: Path) -> None:
    """Round 10: under `ulimit -f` the export's write failed as "SafetensorError: Error while serializing: I/O error:
    File too large (os error 27) (--debug shows the traceback)". Now one line naming the output; nothing left."""
    import resource

    with unchanged(work):
        proc = subprocess.run(cli_command(*calibrate(work, "--method", "rtn", "-o", work / "out")), capture_output=True,
                              text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000)))
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and f"cannot write {work / 'out'}: a file would grow past" in line, line
    assert "ulimit -f" in line and "--debug" not in line, line


def test_odd_output_paths_are_one_line(work: Path) -> None:
    """Round 10: -o a symlink to itself gave "RuntimeError: Symlink loop from ..." and -o a path of 40 nested
    100-character folders "SafetensorError: ... File name too long (os error 36)", each with --debug's hint."""
    (work / "loop").symlink_to(work / "loop")
    result = run_cli(*calibrate(work, "--method", "rtn", "-o", work / "loop"))
    line = one_error_line(result.stderr)
    assert result.exit_code == 2 and line.startswith(f"error: -o {work / 'loop'} is a symlink loop"), line
    (work / "loop").unlink()
    deep = work.joinpath(*["d" * 100] * 40)
    line = assert_fault(work, calibrate(work, "--method", "rtn", "-o", deep), "too long for the file system")
    assert "--debug" not in line, line


def test_a_result_file_onto_a_named_pipe_is_refused(work: Path) -> None:
    """Round 10: `eval -o FIFO` exited 0 having replaced the user's named pipe with a JSON file (the reader waiting on
    the pipe got nothing). Now refused before the work; the pipe stays."""
    os.mkfifo(work / "fifo")  # (helpers.unchanged would read it, and wait for a writer)
    result = run_cli("eval", work / "model", "--data", "text.txt", "--seqlen", "16", "-o", work / "fifo")
    line = one_error_line(result.stderr)
    assert result.exit_code == 2 and "is a named pipe, no regular file or folder" in line, line
    assert stat.S_ISFIFO(os.stat(work / "fifo").st_mode) and sorted(os.listdir(work)) == ["fifo", "model", "text.txt"]


def test_a_data_file_whose_name_is_not_utf8_is_named_back(work: Path) -> None:
    """Round 10: eval of a file whose name holds the byte 0xff scored it, then failed printing its name
    ("UnicodeEncodeError: ... surrogates not allowed"). Now the name is written back as its bytes; the loss is that
    of the same text under a plain name."""
    odd = os.fsdecode(os.fsencode(work / "t") + b"\xff.txt")
    shutil.copy(work / "text.txt", odd)
    plain = run_cli("eval", work / "model", "--data", work / "text.txt", "--seqlen", "16", "--json")
    result = run_cli("eval", work / "model", "--data", odd, "--seqlen", "16")
    assert result.exit_code == 0, result.output
    assert f"loss {json.loads(plain.stdout)['loss']:.4f} nats" in result.stdout
    assert os.fsencode(work / "t") + b"\xff.txt" in result.stdout_bytes


def test_offload_dir_is_a_file(work: Path, no_model_load) -> None:
    (work / "afile").write_text("x")
    assert_fault(work, calibrate(work, "--low-memory", "--offload-dir", "afile", "-o", "out"), "is a file")
    assert_fault(work, ["importance", work / "model", "--calib", "text.txt", "--offload-dir", "afile", "-o", "set"],
                 "is a file")


def test_offload_dir_is_scratch(work: Path) -> None:
    """A missing --offload-dir is created for the run and removed after it; an existing one keeps just its files."""
    result = run_cli("importance", work / "model", "--calib", "text.txt", "--nsamples", "2", "--seqlen", "16",
                 "--offload-dir", "scratch/deep", "-o", "set", "--json")
    assert result.exit_code == 0, result.output
    assert not (work / "scratch").exists()
    (work / "mine").mkdir()
    (work / "mine" / "keep.txt").write_text("x")
    result = run_cli(*calibrate(work, "--low-memory", "--offload-dir", "mine", "-o", "out"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (work / "mine").iterdir()) == ["keep.txt"]
    assert not (work / "out.partial").exists()


def test_outputs_are_readable_as_the_umask_allows(work: Path) -> None:
    old = os.umask(0o022)
    try:
        result = run_cli(*calibrate(work, "--method", "rtn", "-o", "out"))
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((work / "out").stat().st_mode) == 0o755
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in (work / "out").iterdir())


def test_replacing_an_output_leaves_no_old_copy(work: Path) -> None:
    from quantkit.fsutil import atomic_dir

    (work / "target").write_text("a file in the way")
    with atomic_dir(work / "target", overwrite=True) as tmp:
        (tmp / "x").write_text("new")
    assert (work / "target" / "x").read_text() == "new"
    assert sorted(p.name for p in work.iterdir()) == ["model", "target", "text.txt"]


# ---------------------------------------------------------------- options and data


@pytest.mark.parametrize("extra, fragment", [
    (["--seqlen", "128"], "exceeds the model's max_position_embeddings (64)"),
    (["--dynamic-groups", "--format", "compressed-tensors"], "compressed-tensors cannot store"),
    (["--static-groups", "--no-act-order"], "--static-groups"),
    (["--calib", "missing.txt"], "not found"),
    (["--calib", "hf:quantkit-no-such-org/no-such-dataset-3141"], "not found"),
])
def test_conflicting_options_before_calibrating(work: Path, no_model_load, extra: list, fragment: str) -> None:
    assert_fault(work, calibrate(work, "-o", "out", *extra), fragment)


@pytest.mark.parametrize("extra, fragment", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--seqlen", "100"], "max_position_embeddings (64)"),
    (["--stride", "0"], "--stride"),
])
def test_eval_options(work: Path, no_model_load, extra: list, fragment: str) -> None:
    assert_fault(work, ["eval", work / "model", "--data", "text.txt", *extra], fragment)


def test_qid_fit_with_no_positive_qid(work: Path) -> None:
    header = "model,method,bits,group_size,N,D,loss_fp,loss_q,qid,eval_text\n"
    rows = [f"m{i},gptq,4,128,{10**6 * (i + 1)},{10**9 * (i + 1)},3.0,2.9,-0.1,e\n" for i in range(4)]
    (work / "q.csv").write_text(header + "".join(rows))
    assert_fault(work, ["qid", "fit", work / "q.csv"], "QiD > 0")


def test_qid_measure_missing_checkpoint(work: Path) -> None:
    assert_fault(work, ["qid", "measure", "/nonexistent/ckpt", "--eval", "text.txt", "-o", "q.csv"], "not found")


def test_debug_shows_the_traceback(work: Path) -> None:
    from quantkit.errors import QuantkitError

    result = run_cli("--debug", *calibrate(work, "--device", "foo", "-o", "out"))
    assert result.exit_code != 2 and isinstance(result.exception, QuantkitError)


# ---------------------------------------------------------------- ranks and signals


def test_failing_rank_leaves_no_temp_files(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scratch = work / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with_hooks(monkeypatch, on_layer=FailAt(1, 0))
    line = assert_fault(work, calibrate(work, "--nproc", "2", "-o", "out"), "rank 1")
    assert "nothing was exported" in line


def test_low_memory_failure_keeps_only_finished_layers(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that fails after a finished layer keeps OUT.partial for --resume and says so; one that fails
    before any finished layer leaves nothing."""
    with_hooks(monkeypatch, on_layer=FailAt(0, 0))
    assert_fault(work, calibrate(work, "--low-memory", "-o", "out"), "injected")
    with_hooks(monkeypatch, on_layer=FailAt(0, 1))  # the later keyword wins
    result = run_cli(*calibrate(work, "--low-memory", "-o", "out"))
    line = one_error_line(result.stderr)
    assert result.exit_code == 2 and "keeps 1 of 2 finished layers; rerun with --resume" in line, line
    assert sorted(p.name for p in work.iterdir()) == ["model", "out.partial", "text.txt"]


def start(args: list, hooks: str | None = None, prelude: str = "") -> tuple[subprocess.Popen, list[bytes]]:
    """The CLI in a subprocess (with `hooks` and `prelude`, see helpers.cli_command), with its stderr collected by a
    thread."""
    proc = subprocess.Popen(cli_command(*args, hooks=hooks, prelude=prelude), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    chunks: list[bytes] = []

    def pump() -> None:
        while data := os.read(proc.stderr.fileno(), 4096):
            chunks.append(data)

    threading.Thread(target=pump, name=f"stderr of {proc.pid}", daemon=True).start()
    return proc, chunks


def all_of_stderr(proc: subprocess.Popen, chunks: list[bytes]) -> str:
    """What `start`'s process and its children wrote to stderr, once the last of them has closed it."""
    wait_until(lambda: not any(t.name == f"stderr of {proc.pid}" for t in threading.enumerate()))
    return b"".join(chunks).decode()


def wait_until(condition, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_removes_everything(work: Path, sig: signal.Signals) -> None:
    args = ["calibrate", work / "model", "--calib", work / "text.txt", "--nsamples", "2", "--seqlen", "16",
            "--group-size", "32", "-o", work / "out"]
    with unchanged(work):
        proc, chunks = start(args, "Hooks(on_layer=Delay(30))")
        wait_until(lambda: b"calibrate" in b"".join(chunks))  # the progress bar: inside the layer loop
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 128 + sig
    errors = [line for line in b"".join(chunks).decode().splitlines() if line.startswith("error:")]
    assert errors == [f"error: interrupted ({sig.name}); nothing was written"], b"".join(chunks).decode()[-2000:]


# A SIGINT as Python exits, then a lazy import there: torch._dynamo's atexit report imports tabulate, which imports
# wcwidth; a signal landing in such an import is the traceback the fault battery saw.
SIGINT_AT_EXIT = """
import atexit, os, signal
def signal_at_exit():
    os.kill(os.getpid(), signal.SIGINT)
    import xml.dom.minidom  # noqa: F401
atexit.register(signal_at_exit)
"""


@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM, None], ids=["SIGINT", "SIGTERM", "finished"])
def test_a_second_signal_while_the_cli_exits_is_held(work: Path, first: signal.Signals | None) -> None:
    """Fault battery round 7 'two SIGINTs in a row' (2/2 under load): the second SIGINT of an interrupted --low-memory
    run escaped as a traceback ending in KeyboardInterrupt inside `import wcwidth`. The CLI put Python's handlers back
    once the command had unwound, and Python then ran torch's atexit report (which imports tabulate -> wcwidth)
    with a SIGINT raising KeyboardInterrupt where nothing turns it into a line. Now the process's command line
    holds SIGINT and SIGTERM from the first one (or from the command's end) until it has exited: the one line,
    128 + the first signal, OUT.partial kept; a signal after a finished run changes nothing (exit 0)."""
    hooks = f"Hooks(on_layer=SignalAt(1, {int(first)}))" if first else None
    proc, chunks = start(calibrate(work, "--low-memory", "-o", work / "out"), hooks, prelude=SIGINT_AT_EXIT)
    code = proc.wait(timeout=120)
    stderr = all_of_stderr(proc, chunks)
    if first is None:
        assert code == 0 and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-2000:]
        assert (work / "out" / "model.safetensors").is_file() and not (work / "out.partial").exists()
        return
    line = one_error_line(stderr)
    assert code == 128 + first, stderr[-2000:]
    assert line == (f"error: interrupted ({first.name}); {work / 'out.partial'} keeps 1 of 2 finished layers; "
                    "rerun with --resume to continue"), line
    assert (work / "out.partial" / "state.json").is_file() and not (work / "out").exists()


def test_a_storm_of_sigints_from_the_first_to_the_exit_leaves_one_line(work: Path) -> None:
    """The same with real signals (the idea of helper top's reproduction, which failed 3/3 on the old code with exit
    -2): SIGINT every 3 ms from the first finished layer of a --low-memory run until the process is gone."""
    proc, chunks = start(calibrate(work, "--low-memory", "-o", work / "out"), "Hooks(on_layer=Delay(2))")
    def one_layer_done() -> bool:
        try:
            return json.loads((work / "out.partial" / "state.json").read_text())["layers_done"] >= 1
        except (OSError, ValueError, KeyError):
            return False

    wait_until(one_layer_done)
    sent = 0
    while proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
            sent += 1
        time.sleep(0.003)
    stderr = all_of_stderr(proc, chunks)
    assert proc.returncode == 130 and sent > 1, (proc.returncode, sent, stderr[-2000:])
    assert "interrupted (SIGINT)" in one_error_line(stderr) and "keeps 1 of 2 finished layers" in stderr


def test_a_second_run_on_a_work_area_in_use_is_refused(work: Path) -> None:
    """Fault battery round 10 'two --resume runs of one work area' (a retry script started twice): both ran on one
    OUT.partial, one exited 0 with OUT.partial left beside its export, or one said the (finished) work area was
    damaged. A low-memory run now holds its work area (an flock the kernel drops with the process): the second is
    refused in one line naming the first, which finishes as if alone."""
    args = calibrate(work, "--low-memory", "--resume", "-o", work / "out")
    run_cli("calibrate", "--help")  # the second run's imports done before the first one starts
    proc, chunks = start(args, "Hooks(on_layer=Delay(6))")
    wait_until(lambda: (work / "out.partial" / "state.json").is_file())
    for second in (args, calibrate(work, "--low-memory", "-o", work / "out")):
        result = run_cli(*second)
        assert result.exit_code == 2, result.output
        assert one_error_line(result.stderr) == (f"error: {work / 'out.partial'} is in use by another quantkit run "
                                                 f"(pid {proc.pid}); wait for it to end, or write to another output")
        assert proc.poll() is None  # refused while the first one ran
    assert proc.wait(timeout=120) == 0, all_of_stderr(proc, chunks)[-2000:]
    assert sorted(p.name for p in work.iterdir()) == ["model", "out", "text.txt"]
    result = run_cli(*args, "--overwrite")  # the lock went with its run
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("sig, extra", [(signal.SIGTERM, []), (signal.SIGINT, ["--low-memory"])])
def test_signal_to_two_ranks_ends_them_as_one_process(work: Path, sig: signal.Signals, extra: list) -> None:
    """An interrupted --nproc 2 run killed its ranks: the error line was glued to rank 0's unfinished progress bar
    and the resource tracker then reported the killed ranks' semaphores as leaked (3 more lines). Now each rank
    unwinds: the bar's line ends, the error is a line of its own and the last one, and no rank outlives the run."""
    args = [a for a in calibrate(work, "--nproc", "2", *extra, "-o", work / "out") if a != "--json"]  # a bar
    with unchanged(work):  # no layer finished: nothing is kept
        proc, chunks = start(args, "Hooks(on_layer=Delay(30))")
        wait_until(lambda: b"calibrate gptq" in b"".join(chunks))  # rank 0's progress bar
        proc.send_signal(sig)
        assert proc.wait(timeout=90) == 128 + sig
        stderr = all_of_stderr(proc, chunks)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1] == f"error: interrupted ({sig.name}); nothing was written", stderr[-2000:]
    assert sum("error:" in line for line in lines) == 1 and "leaked" not in stderr, stderr[-2000:]


def test_torchrun_variables_without_peers(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """RANK/WORLD_SIZE/MASTER_ADDR left in a shell with no other rank: a generic DistStoreError line; now one line
    naming the variables and what to do."""
    for key, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29581").items():
        monkeypatch.setenv(key, value)
    line = assert_fault(work, calibrate(work, "--method", "rtn", "--dist-timeout", "3", "-o", work / "out"),
                        "makes this rank 0 of 2 (RANK=0, WORLD_SIZE=2, MASTER_ADDR=127.0.0.1, MASTER_PORT=29581)")
    assert "unset those variables" in line and "--debug" not in line


def test_stdout_closed_by_its_reader_ends_quietly() -> None:
    """`quantkit ... --json | (exec 0<&-)`: a generic 'error: Broken pipe' line; now no line, SIGPIPE's status."""
    proc = subprocess.Popen(cli_command("qid", "predict", "--params", "7e9", "--bits", "3", "--tokens", "1e12", "--json"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # long before the CLI has imported what it needs and prints
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGPIPE and stderr == b"", stderr


def test_sigterm_low_memory_keeps_finished_layers_for_resume(work: Path) -> None:
    args = [*calibrate(work, "--low-memory", "-o", work / "out")]
    before = tree(work / "model")
    proc, chunks = start(args, "Hooks(on_layer=Delay(2))")
    state = work / "out.partial" / "state.json"

    def one_layer_done() -> bool:
        try:
            return json.loads(state.read_text())["layers_done"] >= 1
        except (OSError, ValueError, KeyError):
            return False

    wait_until(one_layer_done)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    stderr = b"".join(chunks).decode()
    line = one_error_line(stderr)
    assert "interrupted (SIGTERM)" in line and "1 of 2 finished layers" in line and "--resume" in line, line
    assert not (work / "out").exists()
    result = run_cli(*calibrate(work, "--low-memory", "--resume", "-o", work / "out"))
    assert result.exit_code == 0, result.output
    assert not (work / "out.partial").exists() and (work / "out" / "model.safetensors").is_file()
    assert tree(work / "model") == before


def default_low_memory(work: Path, *extra) -> list:
    """`quantkit calibrate --low-memory` of the work copy with no --method: the default, TLQ, its gradient pass
    reading one layer at a time from the files."""
    return ["calibrate", work / "model", "--calib", work / "text.txt", *BASE, "--low-memory", *extra]


def test_a_refused_low_memory_resume_says_one_line_before_the_gradient_pass(work: Path, monkeypatch) -> None:
    """Fault battery round 10 '--resume with --method the default': a refused --resume says its one error line.
    The default (TLQ) runs its gradient pass before the layers under --low-memory too: a --resume that the work
    area refuses is refused before that pass, which would cost minutes to hours for nothing."""
    with_hooks(monkeypatch, on_layer=FailAt(0, 1))
    result = run_cli(*calibrate(work, "--low-memory", "-o", "out"))  # a gptq run without the FP target stopped
    assert result.exit_code == 2 and (work / "out.partial" / "state.json").is_file(), result.output
    with_hooks(monkeypatch)
    from quantkit.importance import weights

    def no_pass(*args, **kwargs):
        raise AssertionError("the gradient pass ran before the refusal")

    with monkeypatch.context() as patched:
        patched.setattr(weights, "importance_scores", no_pass)
        result = run_cli(*default_low_memory(work, "--resume", "-o", "out"))
    assert result.exit_code == 2, result.output
    assert one_error_line(result.stderr).startswith("error: cannot resume from out.partial: it was made with "
                                                   "other settings"), result.stderr
    shutil.rmtree(work / "out.partial")
    result = run_cli(*default_low_memory(work, "-o", "out"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["method"] == "tlq"


def test_an_interrupted_default_low_memory_run_says_one_line(work: Path) -> None:
    """Fault battery round 10 'SIGINT of the default method's --low-memory run after its first layer': the
    interrupted line alone, OUT.partial kept for --resume (no notice of another method before it)."""
    proc, chunks = start(default_low_memory(work, "-o", work / "out"), f"Hooks(on_layer=SignalAt(1, {int(signal.SIGINT)}))")
    assert proc.wait(timeout=120) == 130
    line = one_error_line(all_of_stderr(proc, chunks))
    assert line == (f"error: interrupted (SIGINT); {work / 'out.partial'} keeps 1 of 2 finished layers; "
                    "rerun with --resume to continue"), line


def qid_rows(path: Path) -> Path:
    """A QiD table of 3 sizes x 3 token counts at 3 bits (QiD positive: the figures have points to draw)."""
    rows = [f"m{i},gptq,3,128,{10**6 * (i + 1)},{10**9 * (j + 1)},3.0,{3.0 + 0.01 * (i + j + 1)},{0.01 * (i + j + 1)},e\n"
            for i in range(3) for j in range(3)]
    path.write_text("model,method,bits,group_size,N,D,loss_fp,loss_q,qid,eval_text\n" + "".join(rows))
    return path


def test_qid_plot_on_a_full_disk_leaves_nothing(work: Path, small_disk: Path) -> None:
    """Fault battery round 10 'plot -o on a full disk': the disk filled after the first figures and the new folder
    stayed with them. Now the figures are drawn into a hidden folder and renamed in once all are drawn: one line
    naming -o, no folder; on room enough the same command writes all six figures and nothing else."""
    table = qid_rows(work / "q.csv")
    line = assert_fault(work, ["qid", "plot", table, "-o", small_disk / "p"], f"cannot write {small_disk / 'p'}: ")
    assert "disk is full" in line, line
    assert not any(small_disk.iterdir())
    result = run_cli("qid", "plot", table, "-o", work / "p")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (work / "p").iterdir()) == sorted(f"qid_vs_{f}_gptq.{e}" for f in "DNP"
                                                                   for e in ("png", "svg"))
    # fault battery round 12 'plot --format png,png': the second rename of each figure found it gone (a traceback)
    result = run_cli("qid", "plot", table, "--format", "png,png", "-o", work / "twice")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (work / "twice").iterdir()) == [f"qid_vs_{f}_gptq.png" for f in "DNP"]


def test_plan_checks_the_output_disk_as_calibrate_does(work: Path, small_disk: Path) -> None:
    """Fault battery round 10 'plan -o on a full disk': the plan said the run fits (exit 0), and calibrate with the
    same options then refused the output. Now the plan refuses it in calibrate's words when less is free there than
    the plan's own disk total; a -o with room plans as before."""
    args = ["plan", work / "model", "--calib", "text.txt", "--method", "rtn", "--nsamples", "2", "--seqlen", "16",
            "--group-size", "32", "--json"]
    result = run_cli(*args, "-o", work / "out")
    assert result.exit_code == 0, result.output
    need = json.loads(result.stdout)["disk_bytes"]["total"]
    free = shutil.disk_usage(small_disk).free
    assert need > free  # the tiny model's export needs more than the 12 KiB disk holds
    line = assert_fault(work, [*args, "-o", small_disk / "out"], f"not enough space for output {small_disk / 'out'}")
    assert f"{free // 1024} KiB free in {small_disk}" in line, line
    said = f"error: not enough space for output {small_disk / 'out'}: about "
    assert line.startswith(said), line
    assert_fault(work, calibrate(work, "--method", "rtn", "-o", small_disk / "out"), said)


@pytest.mark.parametrize("second, fragment", [
    ("cpu", "the second, 'cpu' (str), reads as a device: the model loads on the CPU; move it with model.to(device)"),
    (torch.device("cuda", 0), "reads as a device"),
    ("bfloat16", "the second, 'bfloat16' (str), reads as a dtype: give it by name, dtype='bfloat16'"),
    (torch.float16, "reads as a dtype: give it by name, dtype=torch.float16"),
    (torch.zeros(3), "is no argument of it: it takes path and dtype= (by name)"),
])
def test_load_quantized_refuses_a_second_positional(made: dict, second: object, fragment: str) -> None:
    """Fault battery round 10 "load_quantized(ct, 'cpu')": a TypeError ("takes 1 positional argument but 2 were
    given"). The function loads on the CPU and takes its dtype by name, so a second positional (a device or a dtype,
    as other loaders take there) is one QuantkitError naming it and what to do; nothing is loaded."""
    import quantkit
    from quantkit.errors import QuantkitError

    with pytest.raises(QuantkitError) as caught:
        quantkit.load_quantized(made["export"], second)
    message = str(caught.value)
    assert message.startswith("load_quantized() takes one positional argument, path; ") and "\n" not in message
    assert fragment in message, message
    model = quantkit.load_quantized(made["export"], dtype="bfloat16")  # the spelling it points to loads
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16


def test_demo_on_a_full_disk_is_one_line_before_any_work(work: Path, small_disk: Path) -> None:
    """Fault battery round 10 'demo -o on a full disk': the demo printed its '[demo] evaluating ...' progress lines,
    then the disk-full error (three lines). Now the output's room for the demo's exports (one per method and bit
    width, sized as calibrate sizes one) is checked before any work: the one line, nothing written."""
    args = ["demo", "--model", work / "model", "--data", "text.txt", "--nsamples", "2", "--seqlen", "16", "--format",
            "compressed-tensors", "--threads", "1"]
    line = assert_fault(work, [*args, "-o", small_disk / "d"], f"not enough space for output {small_disk / 'd'}: about")
    assert f"{shutil.disk_usage(small_disk).free // 1024} KiB free" in line, line
    result = run_cli(*args, "--json", "-o", work / "d")  # with room: four exports, each more than the disk holds
    assert result.exit_code == 0, result.output
    exports = [work / "d" / row["path"] for row in json.loads(result.stdout)["rows"] if row["method"] != "fp"]
    assert len(exports) == 4 and all(sum(f.stat().st_size for f in e.iterdir()) > 12 * 1024 for e in exports)


# A SIGINT as transformers finishes a load, before it drops the checkpoint's keys it ignores (a rotary inv_freq).
SIGINT_IN_THE_LOAD = """
import os, signal
from transformers import modeling_utils
real_initialize = modeling_utils.PreTrainedModel._initialize_missing_keys
def initialize_then_signal(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    return real_initialize(self, *args, **kwargs)
modeling_utils.PreTrainedModel._initialize_missing_keys = initialize_then_signal
"""


@pytest.mark.parametrize("command", ["calibrate", "eval"])
def test_sigint_while_transformers_loads_is_one_line(work: Path, command: str) -> None:
    """SIGINT while transformers loaded a model whose checkpoint holds a key it ignores: transformers' LOAD REPORT
    (a table of the half-loaded model's 'UNEXPECTED' keys, written in a `finally`) came before the interrupted line.
    Now transformers' warnings of a load are held until it finishes and dropped where it is stopped."""
    tensors = load_file(work / "model" / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(tensors, work / "model" / "model.safetensors", metadata={"format": "pt"})
    args = (calibrate(work, "--method", "rtn", "-o", work / "out") if command == "calibrate" else
            ["eval", work / "model", "--data", work / "text.txt", "--seqlen", "16", "-o", work / "r.json"])
    with unchanged(work):
        proc, chunks = start(args, prelude=SIGINT_IN_THE_LOAD)
        assert proc.wait(timeout=120) == 130
        stderr = all_of_stderr(proc, chunks)
    assert one_error_line(stderr) == "error: interrupted (SIGINT); nothing was written", stderr


def test_qid_measure_into_a_new_folder_holds_the_table(work: Path) -> None:
    """Two `qid measure` runs into one CSV in a folder not yet made: the lock on the CSV was taken only where its
    folder existed, so both measured every cell and wrote it (a table counted twice skews the fit). Now the folders
    are made before the lock: while one run holds new/c.csv the second is refused in one line; the holder's folders,
    empty at its end, go with it."""
    from quantkit.qid.table import locked_table

    table = work / "new" / "deeper" / "c.csv"
    args = ["qid", "measure", work / "model", "--eval", "text.txt", "--eval-tokens", "64", "--eval-seqlen", "16",
            "--nsamples", "2", "--calib-seqlen", "16", "--group-size", "32", "--tokens", "1e9", "--bits", "4",
            "--methods", "rtn", "-o", table]
    with locked_table(table):
        assert_fault(work, args, f"{table} is being written by another quantkit qid measure")
    assert not (work / "new").exists()
    result = run_cli(*args)  # alone, it measures the cell
    assert result.exit_code == 0, result.output
    import csv

    rows = list(csv.DictReader(table.read_text().splitlines()))
    assert [(r["method"], r["bits"], r["model"]) for r in rows] == [("rtn", "4", str(work / "model"))], rows


def test_a_kept_work_area_holds_no_lock_file(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed or interrupted --low-memory run kept OUT.partial with the `.lock` file of its work-area lock in it
    (nothing a user or --resume needs). Now the run removes it as it ends: the work area holds the state, the finished
    layer and the next layer's inputs; --resume still finishes the export."""
    with_hooks(monkeypatch, on_layer=FailAt(0, 1))
    result = run_cli(*calibrate(work, "--low-memory", "-o", "out"))
    assert result.exit_code == 2 and "keeps 1 of 2 finished layers" in one_error_line(result.stderr), result.output
    assert sorted(os.listdir(work / "out.partial")) == ["hidden_00001_rank0.safetensors", "layer_00000.safetensors",
                                                        "state.json"]
    with_hooks(monkeypatch)
    result = run_cli(*calibrate(work, "--low-memory", "--resume", "-o", "out"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in work.iterdir()) == ["model", "out", "text.txt"]


def test_a_lock_file_removed_by_its_ending_holder_is_not_taken(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Removing the lock file as a run ends lets a run that opened it just before get the flock of a file no longer
    there, while a third run makes and locks a new one: two runs on one work area. The second must notice and take
    the file now there, and then hold it against the third."""
    import fcntl

    from quantkit.engine import streaming
    from quantkit.errors import QuantkitError

    area = work / "out.partial"
    first = streaming.locked_work_area(area)
    first.__enter__()
    real_flock, calls = fcntl.flock, []

    def first_ends_meanwhile(fd: int, operation: int) -> None:
        calls.append(fd)
        if len(calls) == 1:  # the second run has opened the first one's file: the first ends before the flock
            first.__exit__(None, None, None)
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", first_ends_meanwhile)
    with streaming.locked_work_area(area):
        assert calls and (area / ".lock").is_file()  # the first run ended inside the second one's flock
        monkeypatch.setattr(fcntl, "flock", real_flock)
        with pytest.raises(QuantkitError, match=f"{area} is in use by another quantkit run \\(pid {os.getpid()}\\)"):
            with streaming.locked_work_area(area):
                pass
    assert sorted(os.listdir(area)) == []


def test_the_tmpfs_fixture_unmounts_a_busy_disk(tmp_path: Path) -> None:
    """The tmpfs fixture's `umount` failed quietly ("target is busy") where a file on the disk was still open, and
    left a 4 KiB tmpfs mounted under /tmp/pytest-of-root. Now it unmounts lazily, and fails the test where it cannot."""
    disk = tmpfs(tmp_path / "busy", "size=4k")
    path = next(disk)
    held = open(path / "held", "w")  # noqa: SIM115 - open across the fixture's end, as a child still writing there
    try:
        assert os.path.ismount(path)
        with pytest.raises(StopIteration):
            next(disk)
        assert not os.path.ismount(path)
    finally:
        held.close()


# ---------------------------------------------------------------- round 11


@pytest.mark.parametrize("args, said", [
    (["-o", "o\x00ut"], "error: -o 'o\\x00ut' holds a NUL byte"),
    (["--output=o\x00ut"], "error: the argument '--output=o\\x00ut' holds a NUL byte"),
])
def test_a_nul_byte_in_an_argument_is_one_line(work: Path, args: list, said: str) -> None:
    """Fault battery round 11 '-o a name with a NUL byte' (in-process: no real command line holds one): "error:
    ValueError: embedded null byte (--debug shows the traceback)" once the work had begun. Now refused before it."""
    line = assert_fault(work, [*calibrate(work, "--method", "rtn"), *args], said)
    assert line.endswith("which no file name or value can hold; give it without"), line


def test_a_csv_field_over_the_parser_limit_is_one_line(work: Path) -> None:
    """Fault battery round 11 'a 1 MB model name' (qid fit of a table whose model cell is 1 MB): "error: Error: field
    larger than field limit (131072) (--debug shows the traceback)". Now one line naming the file and the row."""
    table = qid_rows(work / "q.csv")
    lines = table.read_text().splitlines(keepends=True)
    lines[2] = "m" * 1_000_000 + lines[2][2:]
    table.write_text("".join(lines))
    line = assert_fault(work, ["qid", "fit", table], f"{table} line 3 cannot be read as CSV (field larger than field "
                                                     "limit (131072)); fix or delete that row")
    assert "--debug" not in line, line


def test_empty_devices_and_memory_are_refused(work: Path, no_model_load) -> None:
    """Fault battery round 11 "--devices ''" and "plan --host-mem ''": read as not given (exit 0); --gpu-mem '' was
    refused. Now each is refused as the malformed value it is."""
    assert_fault(work, calibrate(work, "--method", "rtn", "--devices", "", "-o", "out"),
                 "--devices must be comma-separated GPU ids such as 0,1,2, got ''")
    for flag in ("--host-mem", "--gpu-mem"):
        assert_fault(work, ["plan", work / "model", "--calib", "text.txt", "--method", "rtn", flag, ""],
                     "cannot read '' as an amount of memory")


def test_a_null_state_is_a_damaged_work_area(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault battery round 11 "state.json made 'null'": --resume started over without a word (JSON null read as no
    state), where every other damaged state.json is refused. Now refused alike (the area, holding nothing to resume,
    goes as theirs do), and no export is written."""
    with_hooks(monkeypatch, on_layer=FailAt(0, 1))
    run_cli(*calibrate(work, "--low-memory", "-o", "out"))
    (work / "out.partial" / "state.json").write_text("null")
    with_hooks(monkeypatch)
    result = run_cli(*calibrate(work, "--low-memory", "--resume", "-o", "out"))
    assert result.exit_code == 2, result.output
    assert one_error_line(result.stderr) == ("error: cannot resume from out.partial: state.json holds no run's state; "
                                             "the work area is damaged: drop --resume to start over (it is replaced)")
    assert not (work / "out").exists()


def test_a_quantkit_fake_export_is_not_quantized_again(work: Path) -> None:
    """Fault battery round 11 'model is the fake export': a --format fake export (dense weights, no
    quantization_config) was quantized again, exit 0, where the packed exports are refused. Now its quantkit.json
    refuses it alike, in calibrate and in plan."""
    result = run_cli(*calibrate(work, "--method", "rtn", "--format", "fake", "-o", work / "fake"))
    assert result.exit_code == 0, result.output
    said = f"{work / 'fake'} is a quantkit export (it holds quantkit.json): its weights are already rounded"
    assert_fault(work, ["calibrate", work / "fake", "--calib", "text.txt", *BASE, "--method", "rtn", "-o", "out"], said)
    assert_fault(work, ["plan", work / "fake", "--calib", "text.txt", "--method", "rtn"], said)


def test_an_image_record_among_text_records_is_refused(work: Path, no_model_load) -> None:
    """Fault battery round 11 'JSONL mixing text and image records': a text model calibrated on a .jsonl of text
    records with one {"image", "text"} record read that record's text and dropped its image, exit 0 (image records
    alone are refused for a text model). Now the record is named."""
    words = (work / "text.txt").read_text().split()
    records = [json.dumps({"text": " ".join(words[i:i + 40])}) for i in range(0, 2000, 40)]
    (work / "mixed.jsonl").write_text("\n".join([*records, json.dumps({"image": "x.png", "text": "w1"})]) + "\n")
    assert_fault(work, calibrate(work, "--calib", "mixed.jsonl", "-o", "out"),
                 f"mixed.jsonl:{len(records) + 1}: an image-text record among text records")


@pytest.mark.parametrize("arch", ["LlamaForSequenceClassification", "LlamaModel", "BertForMaskedLM"])
def test_a_config_naming_a_class_of_another_task_is_refused(work: Path, no_model_load, arch: str) -> None:
    """Fault battery round 11 'config architectures LlamaForSequenceClassification', and beside it a bare LlamaModel
    (no head at all): loaded as a causal LM, quantized and exported (exit 0), and then the export did not load
    ("tensor lm_head.weight does not belong to a LlamaForSequenceClassification model"). Now refused before any work."""
    edit_config(work / "model", architectures=[arch])
    said = f"config.json's architectures names {arch}, which transformers builds for another task than generating text"
    assert_fault(work, calibrate(work, "--method", "rtn", "-o", "out"), said)
    assert_fault(work, ["plan", work / "model", "--method", "rtn"], said)


@pytest.mark.parametrize("edit, said", [
    ({"n_blocks": 3}, "n_blocks is 3, and the export's config.json builds 2 decoder layers"),
    ({"n_blocks": True}, "n_blocks is True, and the export's config.json builds 2 decoder layers"),
    ({"dtype": "int8"}, "dtype is 'int8', not one of float32, float16, bfloat16"),
])
def test_an_edited_layout_in_quantkit_json_is_refused(work: Path, made: dict, edit: dict, said: str) -> None:
    """Fault battery round 12 'n_blocks 3 (2 stored) -> gptq' and "dtype 'int8' -> gptq": a re-export of an export
    whose quantkit.json was edited exited 0, carrying n_blocks 3 into the new export's manifest and config, or ignoring
    the dtype. Now the reader refuses the edited field in one line; the unedited export re-exports."""
    shutil.copytree(made["export"], work / "export")
    manifest = work / "export" / "quantkit.json"
    original = manifest.read_text()
    manifest.write_text(json.dumps(json.loads(original) | edit))
    line = assert_fault(work, ["export", work / "export", "--format", "fake", "-o", work / "out"], said)
    assert line.endswith("the export is damaged or was edited, export it again"), line
    manifest.write_text(original)
    result = run_cli("export", work / "export", "--format", "fake", "-o", work / "out")
    assert result.exit_code == 0, result.output
