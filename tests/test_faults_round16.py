"""The fault battery's sixteenth round (benchmarks/fault_round16.py): `quantkit plan` and `calibrate --dry-run`
promised runs that calibrate then refused (GPT-2's Conv1D in the default format, a group size the attention output
projection's width does not take), and a Falcon (NanoChat too) exported to compressed-tensors that transformers cannot
load. Each
is refused before any work as tests/test_faults.py asserts (exit code 2, one `error:` line, nothing left behind),
and plan, --dry-run and the run refuse it in the same line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import (
    assert_fault,
    make_tokenizer,
    run_cli,
    save_tiny_causal_lm,
    save_tiny_llama,
    tiny_model,
    write_text,
)

GPTQ = ["--method", "gptq", "--nsamples", "2", "--seqlen", "16"]
RTN = ["--method", "rtn", "--nsamples", "2", "--seqlen", "16", "--group-size", "16"]
FALCON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2, vocab_size=64,
              new_decoder_architecture=True, bos_token_id=1, eos_token_id=1)


def _save(root: Path, model_type: str, **fields) -> Path:
    tiny_model(model_type, 0, **fields).save_pretrained(root)
    make_tokenizer().save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tiny GPT-2, Llama with 4-wide heads (o_proj reads 16 columns), NanoChat, Falcon and its fake export,
    read-only."""
    root = tmp_path_factory.mktemp("round16")
    text = write_text(root / "text.txt")
    falcon = _save(root / "falcon", "falcon", **FALCON)
    result = run_cli("calibrate", falcon, "--calib", text, *RTN, "--format", "fake", "-o", root / "falcon-fake")
    assert result.exit_code == 0, result.output
    return {"text": text, "falcon": falcon, "falcon-fake": root / "falcon-fake",
            "gpt2": _save(root / "gpt2", "gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=64,
                          bos_token_id=1, eos_token_id=1),
            "narrow": save_tiny_llama(root / "narrow", head_dim=4), "nanochat": save_tiny_causal_lm(root, "nanochat")}


REFUSED = [
    # compressed-tensors' loaders quantize nn.Linear only
    ("gpt2", ["--group-size", "32"], "transformer.h.0.attn.c_attn is a GPT-2-style Conv1D"),
    # 4 heads of 4: o_proj reads 16 columns, which group 32 does not divide
    ("narrow", ["--group-size", "32"], "group size 32 does not divide the input width 16 of "
                                       "model.layers.0.self_attn.o_proj"),
    # transformers' init reads each FalconLinear's weight, and NanoChat's attention init its o_proj's
    ("falcon", ["--group-size", "16"], "transformers cannot load a falcon model from compressed-tensors"),
    ("nanochat", ["--group-size", "16"], "transformers cannot load a nanochat model from compressed-tensors"),
]


@pytest.mark.parametrize(("model", "options", "fragment"), REFUSED, ids=[r[0] for r in REFUSED])
def test_plan_and_dry_run_refuse_what_the_run_refuses(made: dict, tmp_path: Path, model: str, options: list,
                                                      fragment: str) -> None:
    """plan (GPT-2, the narrow o_proj) and calibrate --dry-run (the narrow o_proj) exited 0 with a plan of a run
    calibrate then refused; the Falcon run itself exited 0. All three now refuse it, in calibrate's very line."""
    common = [made[model], "--calib", made["text"], *GPTQ, *options]
    run = assert_fault(tmp_path, ["calibrate", *common, "-o", tmp_path / "out"], fragment)
    assert assert_fault(tmp_path, ["calibrate", *common, "-o", tmp_path / "out", "--dry-run"], fragment) == run
    assert assert_fault(tmp_path, ["plan", *common], fragment) == run


def test_the_narrow_o_proj_is_what_transformers_builds(made: dict) -> None:
    """The reference of the group refusal: transformers' own Llama with head_dim 4 reads 16 columns in o_proj."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(made["narrow"])
    assert model.model.layers[0].self_attn.o_proj.in_features == 16 and 16 % 32


@pytest.mark.parametrize(("model", "attribute"), [("falcon", "FalconLinear"), ("nanochat", "Linear")])
def test_refused_family_in_compressed_tensors_does_not_load_in_transformers(made: dict, tmp_path: Path, monkeypatch,
                                                                             model: str, attribute: str) -> None:
    """The reference of the refusal: the export calibrate wrote before (the check switched off) is one transformers'
    from_pretrained fails on (the family's init reads a weight compressed-tensors replaced by packed tensors)."""
    from transformers import AutoModelForCausalLM

    from quantkit.export.formats.compressed_tensors import CompressedTensorsFormat

    monkeypatch.setattr(CompressedTensorsFormat, "check_family", lambda self, model, bits: None)
    result = run_cli("calibrate", made[model], "--calib", made["text"], *RTN, "-o", tmp_path / "ct")
    assert result.exit_code == 0, result.output
    with pytest.raises(AttributeError, match=f"'{attribute}' object has no attribute 'weight'"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ct")


def test_the_fake_export_named_first_loads_in_transformers(made: dict) -> None:
    """The remedy's first format (fake: dense weights) loads the Falcon in plain transformers and computes what
    quantkit.load_quantized does."""
    import torch
    from transformers import AutoModelForCausalLM

    import quantkit

    fake = AutoModelForCausalLM.from_pretrained(made["falcon-fake"])
    ids = torch.tensor([[1, 5, 9, 13, 20, 30]])
    with torch.no_grad():
        torch.testing.assert_close(fake(ids).logits, quantkit.load_quantized(str(made["falcon-fake"]))(ids).logits)


def test_export_refuses_falcon_to_compressed_tensors(made: dict, tmp_path: Path) -> None:
    """`quantkit export` of a Falcon's fake export to compressed-tensors wrote the export transformers cannot load
    and exited 0; it is refused like calibrate's, nothing written."""
    line = assert_fault(tmp_path, ["export", made["falcon-fake"], "--format", "compressed-tensors", "-o",
                                   tmp_path / "ct"], "transformers cannot load a falcon model")
    assert "pass --format fake" in line, line


@pytest.mark.parametrize("options", [["--bits", "8", "--act-bits", "8", "--group-size", "-1"]], ids=["w8a8"])
def test_falcon_exports_that_keep_dense_weights_at_load_are_taken(made: dict, tmp_path: Path, options: list) -> None:
    """No refusal where the weights transformers' Falcon init reads are there at load: W8A8 keeps each int8 `weight`,
    and loads in transformers with quantkit.load_quantized's logits (within its per-token 8-bit input rounding, which
    transformers applies and load_quantized does not). An asymmetric export is refused as a symmetric one is: it
    loads dequantized on transformers 5.25, but 5.21 runs Falcon's init before it decompresses, and fails."""
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    import quantkit

    result = run_cli("calibrate", made["falcon"], "--calib", made["text"], *RTN[:-2], *options, "-o", tmp_path / "ct")
    assert result.exit_code == 0, result.output
    loading = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if "--asym" in options else {}
    assert ("dequantize=True" in result.output) == bool(loading), result.output
    ids = torch.tensor([[1, 5, 9, 13, 20, 30]])
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", **loading)(ids).logits
        ours = quantkit.load_quantized(str(tmp_path / "ct"))(ids).logits
    assert (theirs - ours).abs().max() <= (1e-3 if loading else 2e-2) * ours.abs().max()
