"""Distributed calibration (gloo, CPU): 1, 2 and 3 ranks agree; a failing rank stops the run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    FailAt,
    cli_command,
    files_and_tensors,
    make_model_dir,
    make_text,
    run_calibration,
)

from quantkit.engine.comm import Hooks
from quantkit.errors import QuantkitError
from quantkit.export import read_checkpoint
from quantkit.quant import QuantSpec

SPEC = QuantSpec(bits=4, group_size=32)


@pytest.fixture(scope="module")
def model_and_text(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dist")
    return make_model_dir(root), make_text(root)


def calibrate(model: Path, text: Path, out: Path, nproc: int, **kw) -> dict:
    """Run the calibrate entry point with GPTQ on 6 windows of 32 tokens."""
    return run_calibration(str(model), str(out), SPEC, method="gptq", calib=str(text), nsamples=6, seqlen=32,
                           progress=False, nproc=nproc, **kw)


@pytest.mark.parametrize("ranks", [(1, 2), pytest.param((1, 2, 3), marks=pytest.mark.slow)])
def test_one_two_three_ranks_agree(model_and_text, tmp_path: Path, ranks: tuple[int, ...]) -> None:
    model, text = model_and_text
    reports = {n: calibrate(model, text, tmp_path / f"out{n}", n) for n in ranks}
    names1, tensors1 = files_and_tensors(tmp_path / "out1")
    ckpt1 = read_checkpoint(tmp_path / "out1")
    for n in ranks[1:]:
        names, tensors = files_and_tensors(tmp_path / f"out{n}")
        assert names == names1
        assert tensors.keys() == tensors1.keys()
        for key, ref in tensors1.items():
            got = tensors[key]
            assert got.shape == ref.shape and got.dtype == ref.dtype, key
            diff = (got.double() - ref.double()).abs().max()
            assert diff <= 1e-5 * max(float(ref.double().abs().max()), 1e-12), key
        ckpt = read_checkpoint(tmp_path / f"out{n}")
        for name, result in ckpt1.results.items():
            deq, ref = ckpt.results[name].dequantize(), result.dequantize()
            assert (deq - ref).abs().max() <= 1e-5 * ref.abs().max(), name
        assert reports[n]["world_size"] == n and len(reports[n]["rank_peak_rss_mb"]) == n
        # each rank holds only its shard of the activations: 6 windows of 32 tokens, hidden 64, fp32
        shards = [len(range(rank, 6, n)) * 32 * 64 * 4 / 2**20 for rank in range(n)]
        assert reports[n]["rank_hidden_states_mb"] == pytest.approx(shards, abs=1e-3)
        owners = {piece[0] for layer in reports[n]["layers"] for e in layer["linears"].values()
                  for piece in e["solved_on_ranks"]}
        assert owners == set(range(n))  # the solves really were spread over the ranks
    assert "world_size" not in reports[1]


def test_fp_target_two_ranks_agree_with_one(model_and_text, tmp_path: Path) -> None:
    """The cross term is reduced like the Hessian, and each rank carries its shard of the FP stream;
    the quantized lm_head's sums are all-reduced too."""
    model, text = model_and_text
    one = calibrate(model, text, tmp_path / "one", 1, fp_target=True, lm_head=True)
    calibrate(model, text, tmp_path / "plain", 1)
    two = calibrate(model, text, tmp_path / "two", 2, fp_target=True, lm_head=True)
    assert one["fp_target"] and two["fp_target"]
    ckpt1, ckpt2 = read_checkpoint(tmp_path / "one"), read_checkpoint(tmp_path / "two")
    plain = read_checkpoint(tmp_path / "plain")
    assert set(ckpt1.results) == set(ckpt2.results) == set(plain.results) | {"lm_head"}
    differs = 0
    for name, result in ckpt1.results.items():
        deq, ref = ckpt2.results[name].dequantize(), result.dequantize()
        assert (deq - ref).abs().max() <= 1e-5 * ref.abs().max(), name
        differs += name in plain.results and not torch.equal(plain.results[name].dequantize(), ref)
    assert differs >= len(plain.results) // 2  # the FP target really moved the codes


def assert_same_export(ref: Path, other: Path) -> None:
    """Same file names, same tensors (bit for bit) in every safetensors file."""
    names1, tensors1 = files_and_tensors(ref)
    names, tensors = files_and_tensors(other)
    assert names == names1 and tensors.keys() == tensors1.keys()
    for key, expected in tensors1.items():
        assert torch.equal(tensors[key], expected), key


@pytest.mark.parametrize("nproc", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_row_split_solves_match_one_rank(model_and_text, tmp_path: Path, monkeypatch, nproc: int) -> None:
    """Every linear cut by output rows over all ranks (Hooks.split_rows): GPTQ rows are independent
    given the Hessian, so the concatenated slices equal the one-rank solve exactly."""
    model, text = model_and_text
    calibrate(model, text, tmp_path / "out1", 1)
    report = calibrate(model, text, tmp_path / "split", nproc, hooks=Hooks(split_rows=True))
    for layer in report["layers"]:
        for name, entry in layer["linears"].items():
            assert [piece[0] for piece in entry["solved_on_ranks"]] == list(range(nproc)), name
    assert_same_export(tmp_path / "out1", tmp_path / "split")


def test_plan_group_cuts_big_linears_by_rows_and_covers_every_row() -> None:
    from torch import nn

    from quantkit.engine.plan import assign_owners, plan_group, plan_makespan

    def linear(out_f: int, in_f: int) -> nn.Linear:
        return nn.Linear(in_f, out_f, bias=False, device="meta")

    groups = [{"q": linear(1024, 1024), "k": linear(1024, 1024), "v": linear(1024, 1024)}, {"o": linear(1024, 1024)},
              {"gate": linear(2816, 1024), "up": linear(2816, 1024)}, {"down": linear(1024, 2816)}]
    for world in (1, 2, 3, 4):
        for group in groups:
            plan = plan_group(group, world)
            assert plan == plan_group(group, world)  # deterministic: every rank computes the same plan
            for name, pieces in plan.items():
                rows = [r for _, start, end in pieces for r in range(start, end)]
                assert rows == list(range(group[name].out_features)), (world, name)  # each row once, in order
                assert len({rank for rank, _, _ in pieces}) == len(pieces)
                assert all(0 <= rank < world for rank, _, _ in pieces)
            owners = assign_owners(group, world)
            whole = {n: [(owners[n], 0, lin.out_features)] for n, lin in group.items()}
            assert plan_makespan(group, plan, world) <= plan_makespan(group, whole, world)
    # A single big linear (down_proj) is cut over both ranks rather than left to one.
    assert len(plan_group(groups[3], 2)["down"]) == 2
    # An output-side factor's blocks of rows are rounded together: cuts fall on its block boundaries (and 32's)
    for world in (2, 3, 5):
        for split_all in (False, True):
            for name, pieces in plan_group(groups[3] | groups[2], world, split_all, {"down": 256, "up": 128}).items():
                unit = {"down": 256, "up": 128}.get(name, 1 if split_all else 32)
                assert all(start % unit == 0 for _, start, _ in pieces), (world, split_all, name, pieces)
                assert pieces[-1][2] == (groups[3] | groups[2])[name].out_features


def test_raising_rank_stops_all_and_exports_nothing(model_and_text, tmp_path: Path, monkeypatch) -> None:
    model, text = model_and_text
    started = time.perf_counter()
    with pytest.raises(QuantkitError, match=r"rank 1 failed at layer 1: RuntimeError: injected failure"):
        calibrate(model, text, tmp_path / "out", 2, hooks=Hooks(on_layer=FailAt(1, 1)))
    assert time.perf_counter() - started < 120
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_killed_rank_via_cli_exits_2_naming_rank_and_layer(model_and_text, tmp_path: Path) -> None:
    model, text = model_and_text
    out = tmp_path / "out"
    cmd = cli_command("calibrate", model, "--calib", text, "--nsamples", "4", "--seqlen", "32", "--group-size", "32",
                      "--nproc", "2", "-o", out, "--json", hooks="Hooks(on_layer=FailAt(1, 1, kill=True))")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rank 1 died (SIGKILL) at layer 1" in errors[0], proc.stderr[-2000:]
    assert not out.exists()


@pytest.mark.slow
def test_torchrun_style_env_ranks_match_single_process(model_and_text, tmp_path: Path) -> None:
    model, text = model_and_text
    calibrate(model, text, tmp_path / "single", 1)
    port = 29000 + os.getpid() % 1000
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "quantkit.cli", "calibrate", str(model), "--calib", str(text), "--nsamples",
               "6", "--seqlen", "32", "--group-size", "32", "-o", str(tmp_path / "env"), "--json"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    _, single = files_and_tensors(tmp_path / "single")
    _, env_run = files_and_tensors(tmp_path / "env")
    assert single.keys() == env_run.keys()
    for key in single:
        assert torch.equal(single[key], env_run[key]), key
