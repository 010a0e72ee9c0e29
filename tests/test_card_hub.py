"""Every export holds a model card; --push-to-hub / push_to_hub= upload it with huggingface_hub (replaced here:
there is no hub in the tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import save_tiny_llama, write_text

import quantkit
from quantkit.cli import main

ARGS = ["--method", "rtn", "--bits", "4", "--group-size", "16", "--nsamples", "2", "--seqlen", "16"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("card")
    return {"model": save_tiny_llama(root / "model"), "text": write_text(root / "text.txt")}


class FakeHub:
    """huggingface_hub.HfApi as far as push_export uses it: records the calls and the uploaded files."""

    calls: list = []
    fail: bool = False

    def __init__(self, token=None) -> None:
        self.token = token

    def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False):
        FakeHub.calls.append(("create_repo", repo_id, private, exist_ok))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, folder_path, repo_id, repo_type=None, commit_message=None):
        if FakeHub.fail:
            raise ConnectionError("hub unreachable\nsecond line")
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        FakeHub.calls.append(("upload_folder", repo_id, files))


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    FakeHub.calls, FakeHub.fail = [], False
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    return FakeHub


def test_every_export_has_a_model_card(tiny, tmp_path) -> None:
    from huggingface_hub import ModelCard

    out = tmp_path / "ct"
    result = CliRunner().invoke(main, ["calibrate", str(tiny["model"]), "--calib", str(tiny["text"]), *ARGS, "-o", str(out)])
    assert result.exit_code == 0, result.output
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "quantkit" and "quantkit" in data["tags"]
    expected = {"method": "rtn", "bits": 4, "group_size": 16, "format": "compressed-tensors"}
    assert data["quantization"].items() >= expected.items()
    assert data["calibration"]["nsamples"] == 2 and data["calibration"]["data"] == str(tiny["text"])
    assert "base_model" not in data  # a local path is no hub id
    assert "AutoModelForCausalLM.from_pretrained" in card.text and "vllm serve" in card.text
    # a conversion writes the card of its own format
    result = CliRunner().invoke(main, ["export", str(out), "--format", "gptq_v2", "-o", str(tmp_path / "g")])
    assert result.exit_code == 0, result.output
    converted = ModelCard.load(tmp_path / "g" / "README.md")
    assert converted.data.to_dict()["quantization"]["format"] == "gptq_v2" and "gptqmodel" in converted.text


def test_card_names_a_hub_base_model_and_an_evaluation() -> None:
    from quantkit.export.card import is_hub_id, model_card

    manifest = {"format": "fake", "spec": {"bits": 3, "group_size": -1, "sym": False, "act_order": True}}
    report = {"method": "tlq", "model": "org/base-1b", "calib": "hf:wikitext", "nsamples": 8, "seqlen": 64,
              "eval": {"loss": 2.5, "ppl": 12.18, "data": "heldout.txt"}}
    text = model_card(manifest, report)
    assert "base_model: org/base-1b" in text and "loss: 2.5" in text and "per channel" in text
    assert is_hub_id("org/base-1b") and not is_hub_id("./model") and not is_hub_id("a/b/c")


def test_api_push_without_output_dir(tiny, hub) -> None:
    quantized = quantkit.quantize(str(tiny["model"]), data=str(tiny["text"]), method="rtn", group_size=16,
                                  nsamples=2, seqlen=16, progress=False, push_to_hub="me/tiny-w4", private=True)
    assert quantized.hub_url == "https://huggingface.co/me/tiny-w4" and quantized.output_dir is None
    (_, repo, private, exist_ok), (_, uploaded_repo, files) = hub.calls
    assert (repo, private, exist_ok, uploaded_repo) == ("me/tiny-w4", True, True, "me/tiny-w4")
    assert {"README.md", "config.json", "model.safetensors", "quantkit.json", "tokenizer.json"} <= set(files)
    assert b"library_name: quantkit" in files["README.md"]


def test_cli_push_and_its_failures(tiny, hub, tmp_path) -> None:
    base = ["calibrate", str(tiny["model"]), "--calib", str(tiny["text"]), *ARGS]
    result = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "o"), "--push-to-hub", "me/tiny"])
    assert result.exit_code == 0, result.output
    assert "pushed to https://huggingface.co/me/tiny" in result.output and hub.calls[-1][0] == "upload_folder"
    # a bad repo id fails before any work, nothing written
    result = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "bad"), "--push-to-hub", "not a repo"])
    assert result.exit_code == 2 and "is not a hub repo id" in result.output and not (tmp_path / "bad").exists()
    # the hub failing: one line, the local export kept
    hub.fail = True
    result = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "kept"), "--push-to-hub", "me/tiny"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and lines[-1].startswith("error: push to the hub repo me/tiny failed")
    assert "the export stays in" in lines[-1] and (tmp_path / "kept" / "README.md").is_file()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_an_image_text_exports_card_and_load_line_load_it(tmp_path, family: str) -> None:
    """The card and the run's `load:` line named AutoModelForCausalLM for every export, which refuses an image-text
    model's config class (ValueError: Unrecognized configuration class): they name the class transformers maps the
    type to for image-text models, and the card's code, run as written, gives load_quantized's logits."""
    pytest.importorskip("PIL")
    import torch
    from helpers import VLM_WORDS, save_vlm
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    save_vlm(family, tmp_path / "vlm")
    words = torch.randint(0, len(VLM_WORDS), (400,), generator=torch.Generator().manual_seed(0))
    (tmp_path / "t.txt").write_text(" ".join(VLM_WORDS[i] for i in words))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["calibrate", str(tmp_path / "vlm"), "--calib", str(tmp_path / "t.txt"), *ARGS,
                                       "--format", "fake", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert family in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES  # transformers' own map: the reference
    assert result.stdout.strip().splitlines()[-1].startswith("load: AutoModelForImageTextToText.from_pretrained(")
    card = (out / "README.md").read_text()
    code = card[card.index("```python\n", card.index("## Load it")) + 10:].split("```")[0]
    scope: dict = {}
    exec(code.replace('"THIS_REPO_OR_DIR"', repr(str(out))), scope)  # noqa: S102 - the card's code, as written
    ids = torch.randint(13, 40, (1, 8), generator=torch.Generator().manual_seed(1))  # words, no image tokens
    with torch.no_grad():
        ours = quantkit.load_quantized(out)(input_ids=ids).logits
        assert torch.allclose(scope["model"](input_ids=ids).logits, ours, atol=1e-5)  # the same dense weights
