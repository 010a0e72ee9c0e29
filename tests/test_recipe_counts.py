"""A calibration recipe's own nsamples and seqlen (quantkit/data/recipes.py) apply where --nsamples/--seqlen
(nsamples=/seqlen=) are not given: the option given wins, then the recipe's value, then 128 and 512 (issue #22,
fault round 12: `quantkit calibrate --calib r.yaml` always drew 128 x 512, the shipped image recipes' seqlen 1024
never applied). What was drawn is read from the artifacts: the export's codes beside those of a plain file with the
same counts as options, a calibration set's stored samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import assert_fault, assert_same_files, run_cli, save_tiny_llama, write_text

import quantkit
from quantkit.calibrate.job import DataSpec

GPTQ = ["--method", "gptq", "--group-size", "32", "--json"]  # GPTQ's codes depend on every window drawn
RECIPE = "kind: text\nnsamples: 2\nseqlen: 16\nsources:\n  - path: text.txt\n"  # one source: the file's own windows


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny Llama (max_position_embeddings 64), its text and a calibration set of 2 x 16 tokens, shared read-only."""
    root = tmp_path_factory.mktemp("recipe_counts")
    made = {"model": save_tiny_llama(root / "model"), "text": write_text(root / "text.txt"), "set": root / "set"}
    result = run_cli("importance", made["model"], "--calib", made["text"], "--nsamples", "2", "--seqlen", "16", "-o",
                     made["set"])
    assert result.exit_code == 0, result.output
    return made


def _calibrate(work: Path, calib: str, out: str, *options: str) -> dict:
    result = run_cli("calibrate", work / "model", "--calib", work / calib, *GPTQ, *options, "-o", work / out)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("options, counts", [((), ["--nsamples", "2", "--seqlen", "16"]),
                                             (("--seqlen", "8"), ["--nsamples", "2", "--seqlen", "8"]),
                                             (("--nsamples", "3"), ["--nsamples", "3", "--seqlen", "16"])])
def test_calibrate_draws_the_recipe_s_counts_unless_given(work: Path, options: tuple, counts: list) -> None:
    """The recipe run's codes are those of the plain file with the counts as options (each option given wins)."""
    (work / "r.yaml").write_text(RECIPE)
    report = _calibrate(work, "r.yaml", "out", *options)
    _calibrate(work, "text.txt", "ref", *counts)
    assert_same_files(work / "ref", work / "out")
    saved = json.loads((work / "out" / "quantkit_report.json").read_text())
    assert [report["nsamples"], report["seqlen"]] == [saved["nsamples"], saved["seqlen"]] == [int(counts[1]), int(counts[3])]
    card = (work / "out" / "README.md").read_text()
    assert f"Calibration: {counts[1]} samples of {counts[3]} tokens" in card


def test_the_api_draws_the_recipe_s_counts_unless_given(work: Path) -> None:
    (work / "r.yaml").write_text(RECIPE)
    common = dict(method="gptq", group_size=32, progress=False)
    own = quantkit.quantize(str(work / "model"), data=str(work / "r.yaml"), output_dir=work / "own", **common)
    ref = quantkit.quantize(str(work / "model"), data=str(work / "text.txt"), nsamples=2, seqlen=16,
                            output_dir=work / "ref", **common)
    assert_same_files(work / "ref", work / "own")
    assert (own.report["nsamples"], own.report["seqlen"]) == (ref.report["nsamples"], ref.report["seqlen"]) == (2, 16)
    given = quantkit.quantize(str(work / "model"), data=str(work / "r.yaml"), seqlen=8, output_dir=work / "given",
                              **common)
    assert (given.report["nsamples"], given.report["seqlen"]) == (2, 8)


def test_a_calibration_set_stores_the_recipe_s_windows(work: Path) -> None:
    """`quantkit importance --calib r.yaml`: 2 windows of 16 tokens stored, and the manifest says so."""
    from safetensors.torch import load_file

    (work / "r.yaml").write_text(RECIPE)
    result = run_cli("importance", work / "model", "--calib", work / "r.yaml", "-o", work / "set")
    assert result.exit_code == 0, result.output
    ids = [t for name, t in load_file(work / "set" / "samples.safetensors").items() if "input_ids" in name]
    assert len(ids) == 2 and all(t.shape[-1] == 16 for t in ids), {t.shape for t in ids}
    manifest = json.loads((work / "set" / "manifest.json").read_text())
    assert (manifest["nsamples"], manifest["seqlen"]) == (2, 16)


LONG = RECIPE.replace("seqlen: 16", "seqlen: 100")
REFUSAL = "'s seqlen 100 exceeds the model's max_position_embeddings (64); use --seqlen 64 or less, or lower the recipe's seqlen"


@pytest.mark.parametrize("command", [["calibrate", "--method", "rtn", "--group-size", "32", "-o", "out"],
                                     ["importance", "-o", "set"]])
def test_a_recipe_seqlen_past_the_model_is_refused_naming_the_recipe(work: Path, no_model_load, command: list) -> None:
    (work / "r.yaml").write_text(LONG)
    line = assert_fault(work, [command[0], work / "model", "--calib", work / "r.yaml", *command[1:]], REFUSAL)
    assert f"recipe {work / 'r.yaml'}'s seqlen" in line


def test_the_api_refuses_a_recipe_seqlen_past_the_model(work: Path) -> None:
    (work / "r.yaml").write_text(LONG)
    with pytest.raises(quantkit.QuantkitError, match=r"r\.yaml's seqlen 100 exceeds .* \(64\)"):
        quantkit.quantize(str(work / "model"), data=str(work / "r.yaml"), method="rtn", group_size=32, progress=False)
    assert not (work / "out").exists()


def test_a_given_seqlen_within_the_model_overrides_a_recipe_s_longer_one(work: Path) -> None:
    (work / "r.yaml").write_text(LONG)
    report = _calibrate(work, "r.yaml", "out", "--seqlen", "16")
    assert (report["nsamples"], report["seqlen"]) == (2, 16)


@pytest.mark.parametrize("name", ["image-caption", "image-qa"])
def test_the_shipped_image_recipes_draw_their_own_seqlen(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                         name: str) -> None:
    """Their seqlen 1024 applies where --seqlen is not given (it ran at 512)."""
    monkeypatch.setenv("QUANTKIT_IMAGE_DATA", str(tmp_path))
    recipe = Path(__file__).resolve().parents[1] / "calib" / f"{name}.yaml"
    written = yaml.safe_load(recipe.read_text())
    assert (written["nsamples"], written["seqlen"]) == (128, 1024)
    data = DataSpec.drawing(source=str(recipe))
    assert (data.nsamples, data.seqlen, data.recipe_of("seqlen")) == (128, 1024, str(recipe))
    assert (DataSpec.drawing(source=str(recipe), seqlen=256).seqlen, DataSpec.drawing(source=str(recipe)).nsamples) == (256, 128)


def test_plain_data_keeps_the_defaults() -> None:
    data = DataSpec.drawing(source="text.txt")
    assert (data.nsamples, data.seqlen, data.recipe_of("seqlen")) == (128, 512, None)


def test_a_given_nsamples_the_calibration_set_lacks_is_refused(work: Path, made: dict, no_model_load) -> None:
    """--nsamples 128 (the default's value, given) beside a set of 2 samples was taken silently as the set's 2."""
    assert_fault(work, ["calibrate", work / "model", "--calib-set", made["set"], "--nsamples", "128", "--group-size",
                        "32", "-o", work / "out"], "--nsamples 128 does not apply to --calib-set")


@pytest.mark.parametrize("command", [["plan"], ["calibrate", "--dry-run", "-o", "out"]])
def test_a_calibration_set_run_plans_for_the_set_s_samples(work: Path, made: dict, no_model_load, command: list) -> None:
    """A set's samples are its own as a recipe's counts are: without --nsamples/--seqlen the plan was of 128 x 512
    tokens, whatever the set held."""
    manifest = json.loads((made["set"] / "manifest.json").read_text())
    result = run_cli(command[0], work / "model", "--calib-set", made["set"], "--group-size", "32", "--json", *command[1:])
    assert result.exit_code == 0, result.output
    settings = json.loads(result.stdout)["settings"]
    assert (settings["nsamples"], settings["seqlen"]) == (manifest["nsamples"], manifest["max_tokens"]) == (2, 16)
