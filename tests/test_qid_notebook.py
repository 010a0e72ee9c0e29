"""Execute notebooks/qid_scaling_laws.ipynb with nbclient on the committed sweep CSV."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "qid_scaling_laws.ipynb"
SWEEP_CSV = REPO / "benchmarks" / "results" / "qid_sweep.csv"


def test_qid_notebook_executes(tmp_path, monkeypatch):
    """All cells run without error in a kernel on this interpreter; the extrapolation is printed."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    assert SWEEP_CSV.is_file(), "run `python benchmarks/qid_sweep.py` to create the sweep CSV the notebook reads"
    # A kernel spec for exactly this interpreter, so the test never picks up another Python.
    spec_dir = tmp_path / "jupyter" / "kernels" / "quantkit-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "quantkit test", "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="quantkit-test", timeout=120,
                                     resources={"metadata": {"path": str(REPO / "notebooks")}})
    client.execute()
    text = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", []))
    assert "paper's law (GPTQ, Pythia): QiD =" in text and "our fitted law (GPTQ)" in text
    assert "unified law" in text and "leave-last-checkpoint-out" in text
    assert "gptq 2 bits: R^2(log) >= 0.9" in text and "gptq 3 bits: beta CI > 0" in text  # the targets, read off
    assert "beta_rtn - beta_gptq (pooled)" in text  # per-method laws and their paired difference
    assert "law fitted on" in text and "earlier-checkpoint points" in text  # the training-level estimator
