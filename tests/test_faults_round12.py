"""The fault battery's twelfth round (benchmarks/fault_round12.py): calibration and quantization recipes, calibration
set manifests and model configs that went through quietly or as a traceback, each now refused as
tests/test_faults.py asserts: exit code 2, one `error:` line naming what was wrong, nothing changed under the folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import assert_fault, run_cli, save_tiny_llama, write_text

RTN = ["--method", "rtn", "--nsamples", "2", "--seqlen", "16", "--group-size", "32"]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny Llama, its text and a calibration set of it (2 x 16 tokens), shared read-only."""
    root = tmp_path_factory.mktemp("round12")
    model = save_tiny_llama(root / "model")
    text = write_text(root / "text.txt")
    result = run_cli("importance", model, "--calib", text, "--nsamples", "2", "--seqlen", "16", "-o", root / "set")
    assert result.exit_code == 0, result.output
    return {"model": model, "text": text, "set": root / "set"}


@pytest.mark.parametrize("source, fragment", [
    # a YAML boolean is a Python int: read as weight 1
    ("  - path: text.txt\n    weight: true\n", "source 1 weight must be a non-negative number, got True"),
    # fraction is weight's alias: one of the two was dropped without a word
    ("  - path: text.txt\n    weight: 1\n    fraction: 0.2\n", "source 1 gives both 'weight' and 'fraction'"),
])
def test_a_calibration_recipe_source_says_its_weight_once(work: Path, no_model_load, source: str, fragment: str) -> None:
    (work / "r.yaml").write_text("kind: text\nsources:\n" + source)
    assert_fault(work, ["calibrate", work / "model", "--calib", work / "r.yaml", *RTN, "-o", work / "out"], fragment)


def test_a_quantization_recipe_ignoring_an_empty_pattern_is_refused(work: Path, no_model_load) -> None:
    """`ignore: ''` was no ignore at all (exit 0); `targets: ['']` was refused."""
    (work / "q.yaml").write_text("ignore: ''\n")
    assert_fault(work, ["calibrate", work / "model", "--calib", work / "text.txt", *RTN, "--recipe", work / "q.yaml",
                        "-o", work / "out"], "recipe ignore must be a module-name pattern or a non-empty list of them")


def test_a_config_with_two_rope_thetas_is_refused(work: Path, no_model_load) -> None:
    """A top-level rope_theta beside rope_parameters' (which transformers reads alone): an edit of it after
    `quantkit importance` went unseen by the set's config hash, and other loaders read it."""
    config = json.loads((work / "model" / "config.json").read_text())
    assert config["rope_parameters"]["rope_theta"] == 10000.0
    (work / "model" / "config.json").write_text(json.dumps({**config, "rope_theta": 1234.0}))
    assert_fault(work, ["calibrate", work / "model", "--calib", work / "text.txt", *RTN, "-o", work / "out"],
                 "config.json sets rope_theta = 1234.0 and rope_parameters.rope_theta = 10000.0, two places of one "
                 "setting")


@pytest.mark.parametrize("edit, fragment", [
    (lambda d: d.update(files=list(d["files"])), "'files' must map each file name to its sha256, got list"),
    (lambda d: d["settings"].update(lam="x"), "settings.lam 'x' is not what `quantkit importance` writes"),
])
def test_a_calibration_set_manifest_of_wrong_types_is_one_line(work: Path, made: dict, edit, fragment: str) -> None:
    """Each was a traceback: AttributeError ('list' object has no attribute 'items'), TypeError (float - str)."""
    shutil.copytree(made["set"], work / "set")
    manifest = json.loads((work / "set" / "manifest.json").read_text())
    edit(manifest)
    (work / "set" / "manifest.json").write_text(json.dumps(manifest))
    assert_fault(work, ["calibrate", work / "model", "--calib-set", work / "set", "--group-size", "32", "-o",
                        work / "out"], fragment)
