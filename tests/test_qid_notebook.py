"""Execute notebooks/qid_scaling_laws.ipynb with nbclient on the committed sweep CSV."""

from __future__ import annotations

from pathlib import Path

from helpers import execute_notebook

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "qid_scaling_laws.ipynb"
SWEEP_CSV = REPO / "benchmarks" / "results" / "qid_sweep.csv"


def _execute(tmp_path, monkeypatch) -> str:
    """Run the notebook on the committed sweep CSV; return the text it printed."""
    assert SWEEP_CSV.is_file(), "run `python benchmarks/qid_sweep.py` to create the sweep CSV the notebook reads"
    return execute_notebook(NOTEBOOK, tmp_path, monkeypatch, MPLBACKEND="Agg")

def test_qid_notebook_executes(tmp_path, monkeypatch):
    """All cells run without error on the committed CSV; fits, targets, method laws, estimator and projection print."""
    text = _execute(tmp_path, monkeypatch)
    assert "paper's law (GPTQ, Pythia): QiD =" in text and "our fitted law (GPTQ)" in text
    assert "unified law" in text and "leave-last-checkpoint-out" in text
    assert "gptq 2 bits: R^2(log) >= 0.9" in text and "gptq 3 bits: beta CI > 0" in text  # the targets, read off
    assert "beta_rtn - beta_gptq (pooled)" in text  # per-method laws and their paired difference
    assert "law fitted on" in text and "earlier-checkpoint points" in text  # the training-level estimator


def test_qid_notebook_on_a_table_with_standard_errors(tmp_path, monkeypatch):
    """A table shaped like the new sweep's (qid_se, 4 sizes x 2 seeds x 6 checkpoints, rtn/gptq/tlq) generated from a
    known law: the notebook fits it weighted, meets the targets and reads D back within a factor of 2."""
    import math

    import numpy as np

    from quantkit.qid.laws import UnifiedLaw
    from quantkit.qid.table import TableWriter

    rng = np.random.default_rng(0)
    csv = tmp_path / "sweep.csv"
    with TableWriter(csv) as w:
        for method, beta in (("rtn", 0.7), ("gptq", 0.6), ("tlq", 0.55)):
            law = UnifiedLaw(k=0.05, alpha=0.3, beta=beta, gamma=4.0)
            for size, n in enumerate((82_240, 221_664, 639_872, 1_606_912)):
                for seed in (0, 1):
                    for step in (128, 256, 512, 1024, 2048, 4096):
                        for bits in (2, 3, 4):
                            q = law.qid(n, step * 1024, bits) * math.exp(rng.normal(0, 0.05))
                            w.write({"model": f"runs/s{size}-seed{seed}/steps/step{step}", "N": n, "D": step * 1024, "step": step,
                                     "bits": bits, "method": method, "group_size": -1, "loss_fp": 4.0, "loss_q": 4.0 + q, "qid": q,
                                     "eval_tokens": 199_410, "eval_text": "t", "qid_se": 0.05 * q, "eval_windows": 782})
    monkeypatch.setenv("QUANTKIT_QID_CSV", str(csv))
    text = _execute(tmp_path, monkeypatch)
    assert "qid_se from a paired bootstrap" in text and "wls weighted by qid_se" in text
    assert "NOT met" not in text and "met      gptq 3 bits: beta CI > 0" in text
    assert "within a factor of 2: 16 of 16 held-out points" in text
    assert "beta_tlq - beta_gptq (pooled): -0.05" in text
