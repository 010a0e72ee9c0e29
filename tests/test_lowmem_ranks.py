"""--low-memory with --nproc: every rank streams the layer and holds its shard; the export equals one in-memory rank's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import FailAt, assert_same_files, make_model_dir, make_text, run_calibration

from quantkit.engine.comm import Hooks
from quantkit.errors import QuantkitError
from quantkit.fsutil import work_dir_for
from quantkit.quant import QuantSpec

SPEC = QuantSpec(bits=4, group_size=32)


@pytest.fixture(scope="module")
def model_and_text(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lowranks")
    return make_model_dir(root), make_text(root)


def kwargs(text: Path, **extra) -> dict:
    """GPTQ with the FP target and the head quantized, on 6 windows of 32 tokens."""
    return dict(method="gptq", calib=str(text), nsamples=6, seqlen=32, progress=False, fp_target=True, lm_head=True,
                **extra)


def test_two_ranks_low_memory_equal_one_rank_in_memory(model_and_text, tmp_path: Path) -> None:
    model, text = model_and_text
    run_calibration(str(model), str(tmp_path / "plain"), SPEC, **kwargs(text))
    report = run_calibration(str(model), str(tmp_path / "low"), SPEC, nproc=2, low_memory=True,
                             offload_dir=str(tmp_path / "acts"), **kwargs(text))
    assert report["low_memory"] and report["world_size"] == 2 and report["fp_target"]
    # each rank held its shard only: 6 windows of 32 tokens, hidden 64, fp32, split 3 + 3
    assert report["rank_hidden_states_mb"] == pytest.approx([3 * 32 * 64 * 4 / 2**20] * 2, abs=1e-3)
    owners = {piece[0] for layer in report["layers"] for e in layer["linears"].values() for piece in e["solved_on_ranks"]}
    assert owners == {0, 1}
    assert not work_dir_for(str(tmp_path / "low")).exists() and not (tmp_path / "acts").exists()
    assert_same_files(tmp_path / "plain", tmp_path / "low")


def test_resume_with_two_ranks_is_byte_identical(model_and_text, tmp_path: Path) -> None:
    model, text = model_and_text
    run_calibration(str(model), str(tmp_path / "plain"), SPEC, **kwargs(text))
    out = tmp_path / "out"
    with pytest.raises(QuantkitError, match="rank 1 failed at layer 2"):
        run_calibration(str(model), str(out), SPEC, nproc=2, low_memory=True, hooks=Hooks(on_layer=FailAt(1, 2)),
                        **kwargs(text))
    state = json.loads((work_dir_for(str(out)) / "state.json").read_text())
    assert state["layers_done"] == 2 and state["world_size"] == 2 and not out.exists()
    with pytest.raises(QuantkitError, match="made with 2 rank"):
        run_calibration(str(model), str(out), SPEC, resume=True, **kwargs(text))
    report = run_calibration(str(model), str(out), SPEC, nproc=2, resume=True, **kwargs(text))
    assert report["resumed_from_layer"] == 2 and len(report["layers"]) == 3
    assert not work_dir_for(str(out)).exists()
    assert_same_files(tmp_path / "plain", out)


def test_default_method_from_a_calibration_set_equals_the_in_memory_run(model_and_text, tmp_path: Path) -> None:
    """The default method on text (TLQ: uniform token weights, output-side factors as GPTQ's row metric): a set from
    `quantkit importance` carries the factors, so calibrating from it in memory, with --low-memory on 2 ranks and
    resumed after a failure writes the bytes of the in-memory run on the text itself (one process, and 2 ranks: each
    rank rounds q/k/v alone in the blocks of their one-process joint solve, the gcd of their factors' widths). So
    does --low-memory on 2 ranks from the text: each rank streams the whole gradient pass on every sample from the
    files, as each in-memory rank runs it whole."""
    from quantkit.calibrate.job import DataSpec
    from quantkit.importance import load_calibration_set
    from quantkit.importance.cli import build_calibration_set
    from quantkit.models import load_model

    model, text = model_and_text
    common = dict(method=None, nsamples=6, seqlen=32, progress=False)
    direct = run_calibration(str(model), str(tmp_path / "direct"), SPEC, calib=str(text), **common)
    assert direct["method"] == "tlq" and direct["fp_target"]
    run_calibration(str(model), str(tmp_path / "ranks"), SPEC, calib=str(text), nproc=2, **common)
    assert_same_files(tmp_path / "direct", tmp_path / "ranks")
    run_calibration(str(model), str(tmp_path / "streamed"), SPEC, calib=str(text), nproc=2, low_memory=True, **common)
    assert_same_files(tmp_path / "direct", tmp_path / "streamed")
    build_calibration_set(str(model), DataSpec(source=str(text), nsamples=6, seqlen=32), str(tmp_path / "set"),
                          progress=False)
    _, stored = load_calibration_set(tmp_path / "set", str(model), load_model(str(model), dtype="float32"))
    metrics = stored(1).row_metrics
    assert set(metrics) >= {"self_attn.q_proj", "mlp.down_proj"} and metrics["mlp.down_proj"].shape == (1, 64, 64)  # 64 rows: gcd(128, 64)
    from_set = dict(common, calib_set=str(tmp_path / "set"))
    run_calibration(str(model), str(tmp_path / "set_run"), SPEC, **from_set)
    assert_same_files(tmp_path / "direct", tmp_path / "set_run")
    run_calibration(str(model), str(tmp_path / "low"), SPEC, nproc=2, low_memory=True, **from_set)
    assert_same_files(tmp_path / "direct", tmp_path / "low")
    out = tmp_path / "resumed"
    with pytest.raises(QuantkitError, match="rank 1 failed at layer 1"):
        run_calibration(str(model), str(out), SPEC, nproc=2, low_memory=True, hooks=Hooks(on_layer=FailAt(1, 1)),
                        **from_set)
    report = run_calibration(str(model), str(out), SPEC, nproc=2, resume=True, **from_set)
    assert report["resumed_from_layer"] == 1
    assert_same_files(tmp_path / "direct", out)
