"""The fault battery's thirteenth round (benchmarks/fault_round13.py): inputs that went through quietly or failed
after the work, each now refused as tests/test_faults.py asserts (exit code 2, one `error:` line naming what was
wrong, nothing changed under the folder), and in the words the sibling command already used for the same input.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import (
    WORDS,
    assert_fault,
    assert_same_files,
    one_error_line,
    run_cli,
    save_tiny_llama,
    unchanged,
    write_text,
)

import quantkit

RTN = ["--method", "rtn", "--nsamples", "2", "--seqlen", "16", "--group-size", "32"]
HUGE = "9" * 25  # past 2**63 - 1: click's int takes it, torch's generators do not


def edit_config(model: Path, **fields) -> None:
    """config.json of `model` with `fields` set (json writes NaN and Infinity, which transformers reads back)."""
    path = model / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny Llama of 64 positions and its text, shared read-only."""
    root = tmp_path_factory.mktemp("round13")
    return {"model": save_tiny_llama(root / "model"), "text": write_text(root / "text.txt")}


def test_a_dataset_row_of_none_is_refused_as_in_a_list(made: dict, tmp_path: Path) -> None:
    """quantize(data=Dataset({'text': [t0, None, t1]})) dropped the None row unseen and calibrated on the rest;
    the same texts as a list were refused. Both now say the same line, naming the row."""
    datasets = pytest.importorskip("datasets")
    texts = [" ".join(WORDS[i:i + 20]) for i in range(3)]
    texts[1] = None
    lines = []
    for data in (texts, datasets.Dataset.from_dict({"text": texts})):
        with unchanged(tmp_path), pytest.raises(quantkit.QuantkitError) as caught:
            quantkit.quantize(str(made["model"]), data=data, method="rtn", nsamples=2, seqlen=16, group_size=32,
                              output_dir=tmp_path / "out", progress=False)
        lines.append(str(caught.value))
    assert lines[0] == lines[1] and "holds NoneType items (record 2)" in lines[0], lines


def test_eval_onto_an_immutable_file_is_refused_before_work(work: Path, no_model_load, immutable) -> None:
    """`eval -o e.json` onto an immutable e.json failed after the evaluation with 'Operation not permitted' naming
    the temporary file beside it."""
    (work / "e.json").write_text("{}")
    immutable(work / "e.json")
    assert_fault(work, ["eval", work / "model", "--data", work / "text.txt", "--seqlen", "16", "-o", work / "e.json"],
                 f"-o {work / 'e.json'} exists and cannot be replaced: it is immutable")


def test_eval_replaces_an_existing_read_only_file(work: Path) -> None:
    """The check reads the immutable flag, not the file's mode: a read-only e.json is replaced as before (its
    folder is writable, which is all a rename needs)."""
    (work / "e.json").write_text("{}")
    (work / "e.json").chmod(0o444)
    result = run_cli("eval", work / "model", "--data", work / "text.txt", "--seqlen", "16", "-o", work / "e.json")
    assert result.exit_code == 0, result.output
    assert "loss" in (work / "e.json").read_text()


@pytest.mark.parametrize("seqlen", [["--seqlen", "100"], []], ids=["seqlen-100", "default-512"])
def test_plan_refuses_a_seqlen_past_the_positions_as_calibrate_does(work: Path, seqlen: list) -> None:
    """plan of the 64-position model with --seqlen 100 (or the default 512) said fits: true; calibrate --dry-run
    refused it. Both now give calibrate's line."""
    args = [work / "model", "--calib", work / "text.txt", "--method", "gptq", "--group-size", "32", "--nsamples", "2",
            *seqlen]
    reference = run_cli("calibrate", *args, "-o", work / "out", "--dry-run")
    assert reference.exit_code == 2, reference.output
    line = assert_fault(work, ["plan", *args], "exceeds the model's max_position_embeddings (64)")
    assert line == one_error_line(reference.stderr)


def test_plan_without_data_keeps_the_default_seqlen(work: Path) -> None:
    """An RTN plan draws no windows: its seqlen is not checked (calibrate does not check it either)."""
    result = run_cli("plan", work / "model", "--method", "rtn", "--group-size", "32")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("extra, fragment", [
    (["--seed", HUGE], "--seed must be at most 9223372036854775807"),
    (["--guidance", "linear", "--row-groups", HUGE], "--row-groups must be at most 2147483647"),
    (["--importance-loss", "fisher", "--fisher-draws", HUGE], "--fisher-draws must be at most 2147483647"),
    (["--power", "nan"], "--power must be a finite number, got nan"),
    (["--output-side", HUGE], f"--output-side must be at most 2147483647, got {HUGE}"),
], ids=["seed", "row-groups", "fisher-draws", "power-nan", "output-side"])
def test_importance_refuses_what_calibrate_refuses(work: Path, no_model_load, extra: list, fragment: str) -> None:
    """importance took a seed past 2**63 - 1 (and wrote a set), 10**25 row groups or Fisher draws (and ran out of
    memory in the gradient pass) and 10**25 output-side rows (a set written); calibrate refused the first three
    before any work. Both commands now refuse each with one line, the same."""
    data = [work / "model", "--calib", work / "text.txt", "--nsamples", "2", "--seqlen", "16"]
    reference = run_cli("calibrate", *data, "--method", "tlq", "--group-size", "32", *extra, "-o", work / "out")
    assert reference.exit_code == 2, reference.output
    line = assert_fault(work, ["importance", *data, *extra, "-o", work / "set"], fragment)
    assert line == one_error_line(reference.stderr)


@pytest.mark.parametrize("flag", ["--top-fraction", "--floor-fraction"])
def test_importance_names_the_flag_of_a_fraction(work: Path, no_model_load, flag: str) -> None:
    """importance --top-fraction nan said 'top fraction must be in (0, 1]', naming no option."""
    extra = ["--top-fraction", "0.5"] if flag == "--floor-fraction" else []
    assert_fault(work, ["importance", work / "model", "--calib", work / "text.txt", "--nsamples", "2", "--seqlen", "16",
                        *extra, flag, "nan", "-o", work / "set"], f"{flag} must be a finite number, got nan")


@pytest.mark.parametrize("counts", [["--nsamples", "0", "--seqlen", "16"], ["--nsamples", "2", "--seqlen", "1"]],
                         ids=["nsamples-0", "seqlen-1"])
def test_importance_refuses_counts_in_calibrate_s_words(work: Path, no_model_load, counts: list) -> None:
    """importance said '--nsamples must be positive and --seqlen at least 2' of either, a check of its own beside
    build_job's, which it now goes through as calibrate does."""
    data = [work / "model", "--calib", work / "text.txt", *counts]
    reference = run_cli("calibrate", *data, "--method", "tlq", "--group-size", "32", "-o", work / "out")
    assert reference.exit_code == 2, reference.output
    line = assert_fault(work, ["importance", *data, "-o", work / "set"], "must be at least")
    assert line == one_error_line(reference.stderr)


@pytest.mark.parametrize("field, value", [("attention_dropout", float("nan")), ("rms_norm_eps", float("inf"))],
                         ids=["nan", "inf"])
def test_a_config_number_that_is_not_finite_is_refused(work: Path, no_model_load, field: str, value: float) -> None:
    """DeepSeek-V3's routed_scaling_factor NaN was a traceback from inside its routing ('atol must be greater than
    or equal to zero, but got -nan'); any non-finite number of a config's own is refused by its field, before the
    model loads. A field with its own rule (a norm epsilon) says that rule."""
    edit_config(work / "model", **{field: value})
    line = assert_fault(work, ["calibrate", work / "model", "--calib", work / "text.txt", *RTN, "-o", work / "out"],
                        f"config field {field} is {value!r}")
    assert ("epsilon" in line) == (field == "rms_norm_eps"), line


def test_an_infinite_bound_in_a_config_list_is_no_fault(work: Path) -> None:
    """Mamba-2's time_step_limit (0.0, inf) is a limit, not a value: a list holding inf still calibrates."""
    edit_config(work / "model", time_step_limit=[0.0, float("inf")])
    result = run_cli("calibrate", work / "model", "--calib", work / "text.txt", *RTN, "-o", work / "out")
    assert result.exit_code == 0, result.output


def test_a_nan_routing_bias_is_refused_as_a_nan_weight_is(tmp_path: Path) -> None:
    """DeepSeek-V3's e_score_correction_bias (a stored buffer, not a parameter) all NaN calibrated and exported;
    a NaN router weight was refused. The buffer is now checked as every stored float tensor is."""
    from helpers import save_tiny_causal_lm
    from safetensors.torch import load_file, save_file

    model = save_tiny_causal_lm(tmp_path, "deepseek_v3", first_k_dense_replace=1)
    stored = load_file(model / "model.safetensors")
    key = next(k for k in stored if k.endswith("e_score_correction_bias"))
    stored[key] = stored[key] * float("nan")
    save_file(stored, model / "model.safetensors", metadata={"format": "pt"})
    write_text(tmp_path / "text.txt")
    # per channel: group 32 does not divide kv_b_proj's 16 columns, which calibrate refuses before it loads a weight
    per_channel = [*RTN[:-2], "--group-size", "-1"]
    assert_fault(tmp_path, ["calibrate", model, "--calib", tmp_path / "text.txt", *per_channel, "-o", tmp_path / "out"],
                 f"weight {key} (decoder layer 1) holds {stored[key].numel()} NaN value(s)")


def test_a_vision_feature_layer_past_the_tower_is_refused(tmp_path: Path, no_model_load) -> None:
    """llava_onevision with vision_feature_layer 99 was 'IndexError: tuple index out of range' from the forward."""
    pytest.importorskip("PIL")
    from helpers import save_vlm, write_image_dataset

    vlm = tmp_path / "vlm"
    model, _ = save_vlm("llava_onevision", vlm)
    layers = model.config.vision_config.num_hidden_layers
    edit_config(vlm, vision_feature_layer=99)
    data = write_image_dataset(tmp_path / "vl", n=4)
    assert_fault(tmp_path, ["calibrate", vlm, "--calib", data, *RTN[:5], "256", *RTN[6:], "-o", tmp_path / "out"],
                 f"config field vision_feature_layer is 99; the vision tower has {layers} layers")


def test_an_image_of_no_pixels_is_refused_by_its_record(tmp_path: Path) -> None:
    """quantize(VLM, data=[..., {'image': a 0x0 PIL image, 'text': ...}]) raised ZeroDivisionError from the
    processor's resize, not a QuantkitError."""
    pytest.importorskip("PIL")
    from helpers import save_vlm
    from PIL import Image

    save_vlm("qwen2_vl", tmp_path / "vlm")
    data = [{"image": Image.new("RGB", (28, 28)), "text": "a square"}, {"image": Image.new("RGB", (0, 0)),
                                                                         "text": "nothing"}]
    with unchanged(tmp_path), pytest.raises(quantkit.QuantkitError) as caught:
        quantkit.quantize(str(tmp_path / "vlm"), data=data, method="rtn", nsamples=2, seqlen=256, group_size=32,
                          output_dir=tmp_path / "out", progress=False)
    assert str(caught.value) == "data record 2: its image is 0x0 pixels, no picture to calibrate on; fix or drop the record"


def test_a_data_file_whose_name_holds_a_line_break_is_read(work: Path) -> None:
    """--calib 'te\\nxt.txt', an existing file, was refused as text given where a path belongs; it is read as the
    file it is, and calibrates as its copy under a plain name does. A name with a line break that names nothing is
    still refused so."""
    (work / "te\nxt.txt").write_bytes((work / "text.txt").read_bytes())
    for name, out in (("text.txt", "a"), ("te\nxt.txt", "b")):
        result = run_cli("calibrate", work / "model", "--calib", work / name, "--method", "gptq", *RTN[2:], "-o",
                         work / out)  # GPTQ: the export depends on the text read
        assert result.exit_code == 0, result.output
    assert_same_files(work / "a", work / "b")
    assert_fault(work, ["calibrate", work / "model", "--calib", work / "gone\nxt.txt", *RTN, "-o", work / "c"],
                 "is no file, directory, glob or hf: dataset")
