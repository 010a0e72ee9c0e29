"""The fault battery's nineteenth round (benchmarks/fault_round19.py): architecture configs at their edges.
`plan` planned a config.json with rope_theta -1 (exit 0) that calibrate, --dry-run and eval refuse in one line; a
Mistral config with sliding_window <= 0 (no layer_types, no use_sliding_window: its window applies wherever one
is set) was calibrated and scored though transformers' own forward of it fails. A VLM processor whose patch, merge
or temporal size (LLaVA: patch size, feature selection) is not the vision tower's, and a LLaVA vision_feature_layer
0, failed inside the model's forward with a wrapped exception; each is now one line naming the fields. Each refusal
is as tests/test_faults.py asserts (exit code 2, one `error:` line, nothing left behind)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_fault, make_tokenizer, run_cli, save_tiny_llama, tiny_model, write_text

RTN = ["--method", "rtn", "--nsamples", "2", "--seqlen", "16", "--group-size", "16"]


def _edit_config(folder: Path, **fields) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_plan_refuses_a_rope_theta_calibrate_refuses(tmp_path: Path) -> None:
    model = save_tiny_llama(tmp_path / "m")
    _edit_config(model, rope_parameters={"rope_type": "default", "rope_theta": -1.0})
    text = write_text(tmp_path / "t.txt")
    fragment = "config field rope_parameters.rope_theta is -1.0"
    # the reference: calibrate --dry-run's own refusal of the same folder
    assert_fault(tmp_path, ["calibrate", model, "--calib", text, *RTN, "--dry-run", "-o", tmp_path / "out"], fragment)
    assert_fault(tmp_path, ["plan", model, "--calib", text, *RTN, "--json"], fragment)


def _mistral(root: Path, window: int) -> Path:
    folder = root / "mistral"
    tiny_model("mistral", 0, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
               sliding_window=window).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("window", [-4, 0])
def test_a_mistral_sliding_window_of_no_token_is_refused(tmp_path: Path, window: int) -> None:
    """transformers' own forward of this config fails (the reference); calibrate and eval took it (exit 0)."""
    model = _mistral(tmp_path, window)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(model)
    with pytest.raises(Exception):  # noqa: B017, PT011 - whatever transformers raises: its forward does not run
        loaded(torch.arange(2, 18).unsqueeze(0))
    text = write_text(tmp_path / "t.txt")
    fragment = f"config field sliding_window is {window}"
    assert_fault(tmp_path, ["calibrate", model, "--calib", text, *RTN, "-o", tmp_path / "out"], fragment)
    assert_fault(tmp_path, ["eval", model, "--data", text, "--seqlen", "16"], fragment)


def test_a_mistral_sliding_window_is_still_taken(tmp_path: Path) -> None:
    """No refusal of a positive window (4 under 16-token windows): the export is written."""
    from safetensors.torch import load_file

    model = _mistral(tmp_path, 4)
    text = write_text(tmp_path / "t.txt")

    result = run_cli("calibrate", model, "--calib", text, *RTN, "--format", "fake", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "model.layers.0.mlp.down_proj.weight" in load_file(tmp_path / "out" / "model.safetensors")


def _edit_json(path: Path, **fields) -> None:
    """The JSON file with fields set (a dict merged into the one there)."""
    doc = json.loads(path.read_text())
    for key, value in fields.items():
        doc[key] = {**doc[key], **value} if isinstance(value, dict) and isinstance(doc.get(key), dict) else value
    path.write_text(json.dumps(doc))


VLM_EDITS = [
    ("qwen2_vl", "processor_config.json", {"image_processor": {"patch_size": 7}},
     "has patch_size 7 but config.json's vision_config.patch_size is 14"),
    ("qwen2_vl", "processor_config.json", {"image_processor": {"merge_size": 1}},
     "has merge_size 1 but config.json's vision_config.spatial_merge_size is 2"),
    ("qwen2_vl", "processor_config.json", {"image_processor": {"temporal_patch_size": 1}},
     "has temporal_patch_size 1 but config.json's vision_config.temporal_patch_size is 2"),
    ("llava", "processor_config.json", {"patch_size": 7}, "has patch_size 7 but config.json's vision_config.patch_size"),
    ("llava", "config.json", {"vision_feature_select_strategy": "full"},
     "has vision_feature_select_strategy 'default' but config.json's vision_feature_select_strategy is 'full'"),
    ("llava", "config.json", {"vision_feature_layer": 0}, "config field vision_feature_layer is 0"),
]


@pytest.mark.parametrize("family, file, fields, fragment", VLM_EDITS,
                         ids=["qwen2_vl-patch", "qwen2_vl-merge", "qwen2_vl-temporal", "llava-patch", "llava-full",
                              "llava-layer0"])
def test_a_processor_or_config_the_vision_tower_disagrees_with_is_refused(tmp_path: Path, family: str, file: str,
                                                                          fields: dict, fragment: str) -> None:
    """A wrapped RuntimeError / "Image features and image tokens do not match" / TypeError before. The reference:
    transformers' own forward of the edited folder on one record the edited processor makes fails too."""
    pytest.importorskip("PIL")
    from helpers import save_vlm, write_image_dataset
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from quantkit.data.images import load_processor

    vlm = tmp_path / "vlm"
    save_vlm(family, vlm)
    _edit_json(vlm / file, **fields)
    data = write_image_dataset(tmp_path / "vl", n=4)
    model, processor = AutoModelForImageTextToText.from_pretrained(vlm), load_processor(str(vlm))
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a"}]}])
    inputs = processor(images=[Image.open(tmp_path / "vl" / "img" / "0.png")], text=[text], return_tensors="pt")
    try:  # the reference: transformers' own forward of the edited folder
        model(**inputs)
    except Exception:  # noqa: BLE001 - it fails, in whichever way: quantkit refuses the folder in one line
        pass
    else:  # it runs on this transformers (vision_feature_layer 0 before select_hidden_states): quantkit must not refuse
        assert fields == {"vision_feature_layer": 0}, (family, fields)  # the only edit an older transformers runs
        result = run_cli("calibrate", vlm, "--calib", data, "--method", "rtn", "--nsamples", "2", "--seqlen", "256",
                         "--group-size", "32", "-o", tmp_path / "out")
        assert result.exit_code == 0 and (tmp_path / "out").is_dir(), result.output
        return
    assert_fault(tmp_path, ["calibrate", vlm, "--calib", data, "--method", "rtn", "--nsamples", "2", "--seqlen", "256",
                            "--group-size", "32", "-o", tmp_path / "out"], fragment)
