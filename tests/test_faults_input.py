"""Bad content and bad arguments: values with the right shape and the wrong meaning.

Each case asserts what tests/test_faults.py asserts: exit code 2 (one QuantkitError from the Python API), one
`error:` line naming what was wrong, and nothing added, removed or changed under the test's folder.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from helpers import assert_fault

from quantkit.qid.laws import PUBLISHED_LAWS

# ---------------------------------------------------------------- qid


@pytest.mark.parametrize("args, fragment", [
    (["--params", "7e9", "--bits", "3", "--tokens", "1e300"], "--tokens 1e+300 is outside the range of training tokens"),
    (["--params", "7e9", "--bits", "1e9", "--tokens", "1e12"], "--bits 1e+09 is outside the range of weight bits"),
    (["--params", "7e9", "--bits", "0.5", "--tokens", "1e12"], "--bits 0.5 is outside"),
    (["--params", "-5", "--bits", "3", "--tokens", "1e12"], "--params -5 is outside"),
    (["--params", "nan", "--bits", "3", "--tokens", "1e12"], "--params must be a finite number"),
    (["--params", "7e9", "--bits", "3", "--qid", "0"], "--qid 0 is not positive"),
    (["--params", "7e9", "--bits", "3", "--qid", "500"], "--qid 500 is outside the range of QiD"),
])
def test_qid_predict_refuses_implausible_inputs(tmp_path: Path, args: list, fragment: str) -> None:
    assert_fault(tmp_path, ["qid", "predict", *args], fragment)


def test_qid_predict_refuses_an_answer_outside_any_training_run(tmp_path: Path) -> None:
    """In-range inputs whose inverse lies beyond 1e17 tokens: the law's answer (computed here by hand) is refused."""
    law = PUBLISHED_LAWS["ouyang2024-gptq"]
    n, p, q = 1e15, 16.0, 19.0
    by_hand = math.exp((math.log(q) + law.alpha * math.log(n) + law.gamma * math.log(p) - math.log(law.k)) / law.beta)
    assert by_hand > 1e17
    line = assert_fault(tmp_path, ["qid", "predict", "--params", n, "--bits", p, "--qid", q], "gives D = ")
    assert f"{by_hand:.3g}" in line


@pytest.mark.parametrize("extra, fragment", [
    (["--bits", "5"], "--bits 5 is not a width"),
    (["--bits", ","], "--bits is empty"),
    (["--methods", "GPTQ"], "did you mean 'gptq'"),
    (["--methods", ","], "no method given"),
    (["--nsamples", "0"], "--nsamples must be at least 1"),
    (["--eval-seqlen", "1"], "--eval-seqlen must be at least 2"),
    (["--eval-tokens", "0"], "--eval-tokens must be at least 2"),
    (["--group-size", "0"], "--group-size must be positive or -1"),
    (["--threads", "0"], "--threads must be at least 1"),
])
def test_qid_measure_checks_options_before_the_checkpoint(tmp_path: Path, extra: list, fragment: str) -> None:
    """The options are refused first: the checkpoint named does not even exist."""
    assert_fault(tmp_path, ["qid", "measure", tmp_path / "no-such-ckpt", "--eval", "x", "-o", tmp_path / "q.csv",
                            *extra], fragment)


HEADER = "model,method,bits,group_size,N,D,loss_fp,loss_q,qid,eval_text\n"


@pytest.mark.parametrize("row, fragment", [
    ("m9,gptq,4,128,-2000000,2000000000,3.0,3.1,0.1,e", "line 5, column 'N': -2000000 is not a parameter count"),
    ("m9,gptq,4,128,2000000,0,3.0,3.1,0.1,e", "line 5, column 'D': 0 is not a token count"),
    ("m9,gptq,0,128,2000000,2000000000,3.0,3.1,0.1,e", "line 5, column 'bits': 0 is not a bit width"),
    ("m9,gptq,64,128,2000000,2000000000,3.0,3.1,0.1,e", "line 5, column 'bits': 64 is not a bit width"),
    ("m9,gptq,4,0,2000000,2000000000,3.0,3.1,0.1,e", "line 5, column 'group_size': 0"),
    ("m9,gptq,4,128,2000000,2000000000,-3.0,3.1,0.1,e", "line 5, column 'loss_fp'"),
])
def test_qid_fit_stops_at_the_row_that_is_wrong(tmp_path: Path, row: str, fragment: str) -> None:
    good = [f"m{i},gptq,4,128,{10**6 * (i + 1)},{10**9 * (i + 1)},3.0,3.1,0.1,e\n" for i in range(3)]
    (tmp_path / "q.csv").write_text(HEADER + "".join(good) + row + "\n")
    assert_fault(tmp_path, ["qid", "fit", tmp_path / "q.csv", "--bootstrap", "0"], fragment)


@pytest.mark.parametrize("extra, fragment", [
    (["--bits", "5"], "--bits 5 is not a width"),
    (["--bits", "99", "--qid", "0.1"], "--bits 99 is outside"),
    (["--bits", "3", "--qid", "0.1", "--qid-se", "-1"], "--qid-se must be a finite number >= 0"),
    (["--bits", "3", "--data", "x", "--nsamples", "0"], "--nsamples must be at least 1"),
])
def test_qid_training_level_options(tmp_path: Path, extra: list, fragment: str) -> None:
    assert_fault(tmp_path, ["qid", "training-level", tmp_path / "m", "--law", "ouyang2024-gptq", *extra], fragment)
