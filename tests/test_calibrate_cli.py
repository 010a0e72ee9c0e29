"""`quantkit calibrate` end to end: bad input (exit 2, one line, nothing written), recipes, image-text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import make_tokenizer, save_vlm, tiny_model, write_image_dataset, write_text
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from quantkit.cli import main


def save_tiny_llama(root: Path, hidden: int = 64) -> Path:
    """A tiny random Llama with a tokenizer, saved as a model directory."""
    tiny_model("llama", seed=0, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=64).save_pretrained(root)
    make_tokenizer().save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("calib")
    return {"model": save_tiny_llama(root / "model"), "text": write_text(root / "text.txt", 4000), "root": root}


def run(args: list[str]):
    return CliRunner().invoke(main, args)


def assert_clean_failure(result, out: Path, fragment: str) -> None:
    """Exit 2, one `error:` line naming the problem, and nothing at the output path or beside it."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert fragment in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def base(tiny: dict, out: Path, *extra: str) -> list[str]:
    return ["calibrate", str(tiny["model"]), "--calib", str(tiny["text"]), "--nsamples", "4", "--seqlen", "16",
            "--group-size", "32", "-o", str(out), *extra]


def test_fp_target_with_rtn_is_refused(tiny, tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run(base(tiny, out, "--method", "rtn", "--fp-target")), out, "--fp-target")


@pytest.mark.parametrize("extra, fragment", [
    (("--quantize-lm-head", "--bits", "3", "--format", "gptq_v2"), "compressed-tensors or fake"),
    (("--quantize-vision", "--bits", "4", "--low-memory"), "no vision side to quantize"),
    (("--quantize-vision", "--bits", "4"), "no vision side to quantize"),
])
def test_quantize_lm_head_and_vision_refusals(tiny, tmp_path, extra, fragment):
    out = tmp_path / "out"
    assert_clean_failure(run(base(tiny, out, *extra)), out, fragment)


def test_quantize_lm_head_exports_a_loadable_quantized_head(tiny, tmp_path):
    """compressed-tensors with a quantized lm_head loads in transformers and gives the logits of the
    same run's fake (dequantized) export, whose head holds at most 16 values per 32-column group."""

    runs = {}
    for fmt in ("compressed-tensors", "fake"):
        out = tmp_path / fmt
        result = run(base(tiny, out, "--bits", "4", "--quantize-lm-head", "--format", fmt, "--json"))
        assert result.exit_code == 0, result.output
        runs[fmt] = AutoModelForCausalLM.from_pretrained(out)
    qc = json.loads((tmp_path / "compressed-tensors" / "config.json").read_text())["quantization_config"]
    assert "lm_head" not in qc["ignore"]
    fp = AutoModelForCausalLM.from_pretrained(tiny["model"])
    head = runs["fake"].lm_head.weight.detach()
    assert not torch.equal(head, fp.lm_head.weight)
    assert all(len(torch.unique(row)) <= 16 for row in head.reshape(-1, 32))
    ids = torch.randint(0, 60, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, ref = runs["compressed-tensors"](ids).logits, runs["fake"](ids).logits
    assert (got - ref).abs().max() <= 1e-3 * ref.abs().max()
    out = tmp_path / "gptq"  # re-exporting it to GPTQ, which cannot describe the head, is refused
    assert_clean_failure(run(["export", str(tmp_path / "compressed-tensors"), "--format", "gptq_v2", "-o", str(out)]),
                         out, "lm_head is outside it")


def test_missing_model_path(tiny, tmp_path):
    out = tmp_path / "out"
    args = base(tiny, out)
    args[1] = str(tmp_path / "no-such-model")
    assert_clean_failure(run(args), out, "no-such-model")


def test_unsupported_architecture(tiny, tmp_path):
    model_dir = tmp_path / "bert"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    out = tmp_path / "out"
    args = base(tiny, out)
    args[1] = str(model_dir)
    result = run(args)
    assert_clean_failure(result, out, "unsupported architecture 'bert'")
    assert "encoder stack" in result.output  # what was found instead of decoder layers


def test_bits_not_supported(tiny, tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run(base(tiny, out, "--bits", "5")), out, "--bits must be one of 2, 3, 4, 8, got 5")


def test_group_size_not_dividing_width(tiny, tmp_path):
    out = tmp_path / "out"
    args = base(tiny, out)
    args[args.index("--group-size") + 1] = "48"
    assert_clean_failure(run(args), out, "does not divide")


def test_empty_calibration_file(tiny, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "out"
    args = base(tiny, out)
    args[args.index("--calib") + 1] = str(empty)
    assert_clean_failure(run(args), out, "empty")


def test_too_short_calibration_text_says_how_much(tiny, tmp_path):
    short = write_text(tmp_path / "short.txt", 30)
    out = tmp_path / "out"
    args = base(tiny, out)
    args[args.index("--calib") + 1] = str(short)
    result = run(args)
    assert_clean_failure(result, out, "found")
    assert "64" in result.output  # 4 x 16 tokens needed


def test_existing_output_without_overwrite(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run(base(tiny, out))
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_nan_weight(tiny, tmp_path):
    broken = save_tiny_llama(tmp_path / "nan")
    tensors = load_file(broken / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.weight"
    tensors[key][3, 5] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    args = base(tiny, out)
    args[1] = str(broken)
    assert_clean_failure(run(args), out, "NaN")


def test_recipe_mixes_sources_and_matches_direct_samples(tiny, tmp_path):
    from quantkit.data.recipes import recipe_samples
    from quantkit.engine import calibrate_model
    from quantkit.models import load_model
    from quantkit.quant.spec import QuantSpec

    write_text(tmp_path / "other.txt", 3000, seed=1)
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(
        f"kind: text\nsources:\n  - path: {tiny['text']}\n    weight: 0.75\n  - path: other.txt\n    weight: 0.25\n"
    )
    out = tmp_path / "out"
    args = base(tiny, out, "--method", "gptq", "--format", "fake")
    args[args.index("--calib") + 1] = str(recipe)
    result = run(args)
    assert result.exit_code == 0, result.output
    # Reference: the same recipe drawn directly and calibrated in memory gives the same weights.
    samples = recipe_samples(recipe, make_tokenizer(), nsamples=4, seqlen=16, seed=0)
    assert len(samples) == 4
    model = load_model(str(tiny["model"]))
    calibrate_model(model, samples, QuantSpec(bits=4, group_size=32), method="gptq", progress=False)
    import quantkit

    loaded = quantkit.load_quantized(out)
    reference = dict(model.named_parameters())
    for name, param in loaded.named_parameters():
        assert torch.equal(param.float(), reference[name].float()), name


def test_image_text_jsonl_calibrates_a_vlm_language_model_only(tmp_path):
    pytest.importorskip("PIL")
    import quantkit

    model_dir = tmp_path / "vlm"
    model, processor = save_vlm("qwen2_vl", model_dir)
    data = write_image_dataset(tmp_path / "data", n=4)
    out = tmp_path / "out"
    result = run(["calibrate", str(model_dir), "--calib", data, "--nsamples", "3", "--method", "gptq", "--bits", "4",
                  "--group-size", "16", "--format", "gptq_v2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "quantkit_report.json").read_text())
    assert report["nsamples"] == 3
    loaded = quantkit.load_quantized(out)
    original = dict(model.named_parameters())
    changed = {n for n, p in loaded.named_parameters() if not torch.equal(p.float(), original[n].float())}
    assert changed, "nothing was quantized"
    assert all(".language_model.layers." in n for n in changed), sorted(changed)[:5]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_quantize_vision_exports_a_loadable_quantized_tower(tmp_path, family):
    """compressed-tensors with the vision tower and projector quantized loads in transformers and gives
    the logits of the same run's fake (dequantized) export; the language model's inputs changed."""
    pytest.importorskip("PIL")
    from transformers import AutoModelForImageTextToText

    from quantkit.data.images import image_text_samples
    from quantkit.engine.capture import model_inputs

    model_dir = tmp_path / "vlm"
    model, processor = save_vlm(family, model_dir)
    data = write_image_dataset(tmp_path / "data", n=4)
    loaded = {}
    for fmt in ("compressed-tensors", "fake"):
        out = tmp_path / fmt
        result = run(["calibrate", str(model_dir), "--calib", data, "--nsamples", "3", "--method", "tlq", "--bits", "4",
                      "--group-size", "16", "--format", fmt, "--quantize-vision", "-o", str(out)])
        assert result.exit_code == 0, result.output
        loaded[fmt] = AutoModelForImageTextToText.from_pretrained(out).eval()
    ignore = json.loads((tmp_path / "compressed-tensors" / "config.json").read_text())["quantization_config"]["ignore"]
    assert not [n for n in ignore if "vision_tower.encoder" in n or "visual.blocks" in n or "projector" in n]
    fp = dict(model.named_parameters())
    changed = {n for n, p in loaded["fake"].named_parameters() if not torch.equal(p, fp[n])}
    assert any("vision_tower" in n or "visual" in n for n in changed)
    assert any("multi_modal_projector" in n or "merger" in n for n in changed)
    sample = model_inputs(image_text_samples(data, processor, nsamples=1, seed=5)[0])
    with torch.no_grad():
        got, ref = loaded["compressed-tensors"](**sample).logits, loaded["fake"](**sample).logits
    assert (got - ref).abs().max() <= 1e-3 * ref.abs().max()


@pytest.mark.parametrize("method, flag, expected", [("tlq", None, True), ("tlq", "--no-fp-target", False),
                                                    ("gptq", None, False), ("gptq", "--fp-target", True),
                                                    (None, None, True)])
def test_fp_target_defaults_on_for_tlq_and_the_default(tiny, tmp_path, method, flag, expected):
    out = tmp_path / "out"
    result = run(base(tiny, out, *(["--method", method] if method else []), *([flag] if flag else [])))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "quantkit_report.json").read_text())
    assert report["fp_target"] is expected
    assert report["method"] == (method or "tlq")  # the default method (TLQ + FP target), as quantize's
