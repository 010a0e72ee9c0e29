"""Shared test setup: slow runs are opt-in, and ../shared is optional."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
REF_LM = SHARED / "models" / "ref-lm"
TEXT_DIR = SHARED / "data" / "text"

# Tests run tiny tensors, where a second thread costs more in synchronisation than it gains.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not torch.cuda.is_available():
        no_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none here); benchmarks/device_check.sh runs these on one")
        for item in items:
            if item.get_closest_marker("cuda") is not None:
                item.add_marker(no_gpu)
    if os.environ.get("QUANTKIT_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="benchmark-sized; set QUANTKIT_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic_threads() -> None:
    torch.manual_seed(0)


@pytest.fixture
def ref_lm() -> Path:
    """The shared reference LM, or a skip where ../shared is absent (a user's fresh clone)."""
    if not (REF_LM / "config.json").is_file():
        pytest.skip(f"reference model not found at {REF_LM} (../shared is absent outside the dev machine)")
    return REF_LM


@pytest.fixture
def text_dir() -> Path:
    """The shared corpora, or a skip where ../shared is absent."""
    if not TEXT_DIR.is_dir():
        pytest.skip(f"shared corpora not found at {TEXT_DIR} (../shared is absent outside the dev machine)")
    return TEXT_DIR


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the model is loaded: the check under test must come before it."""
    import quantkit.calibrate.cli
    import quantkit.eval.cli
    import quantkit.importance.cli
    import quantkit.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the faulty input was checked")

    # Modules that imported the function at their top hold their own reference: patch each of them.
    original = quantkit.models.load_model
    for name, module in list(sys.modules.items()):
        if name.startswith("quantkit") and getattr(module, "load_model", None) is original:
            monkeypatch.setattr(module, "load_model", refuse)


@pytest.fixture
def immutable():
    """chattr +i on files or folders (no one, root included, may then replace them or create in them); cleared after
    the test. Skips where chattr or the file system does not allow it."""
    frozen: list[Path] = []

    def freeze(path: Path) -> Path:
        done = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"chattr +i is not available here: {done.stderr.decode().strip()[:80]}")
        frozen.append(path)
        return path

    yield freeze
    for path in frozen:
        subprocess.run(["chattr", "-i", str(path)], check=False)


@pytest.fixture
def work(tmp_path: Path, made: dict, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with a private copy of the test module's `made` model (safe to corrupt) and text, the cwd set
    to it (for modules whose `made` fixture holds "model" and "text": test_faults, test_faults_input)."""
    shutil.copytree(made["model"], tmp_path / "model")
    shutil.copy(made["text"], tmp_path / "text.txt")
    monkeypatch.chdir(tmp_path)
    return tmp_path
