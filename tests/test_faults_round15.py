"""The fault battery's fifteenth round (benchmarks/fault_round15.py): a generation_config.json transformers cannot
load, in a model folder or in an export given to `quantkit export` (copied into the new export as it was), and a
model given to the API with PEFT adapters in it. Each is refused before any work as tests/test_faults.py asserts
(exit code 2, one `error:` line, nothing left behind / one QuantkitError); what transformers loads is still taken.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import assert_fault, run_cli, save_tiny_llama, write_text

import quantkit

RTN = ["--method", "rtn", "--nsamples", "2", "--seqlen", "16", "--group-size", "32"]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny Llama, its text and its RTN export (compressed-tensors), shared read-only."""
    root = tmp_path_factory.mktemp("round15")
    model, text = save_tiny_llama(root / "model"), write_text(root / "text.txt")
    result = run_cli("calibrate", model, "--calib", text, *RTN, "-o", root / "ct")
    assert result.exit_code == 0, result.output
    return {"root": root, "model": model, "text": text, "ct": root / "ct"}


def _with_generation(src: Path, dst: Path, fields: dict | None, raw: str | None = None) -> Path:
    shutil.copytree(src, dst)
    path = dst / "generation_config.json"
    path.write_text(raw if raw is not None else json.dumps({**json.loads(path.read_text()), **fields}))
    return dst


def _transformers_loads(folder: Path) -> bool:
    """Whether transformers builds the folder's generation config (what from_pretrained of a model does with it)."""
    from transformers import GenerationConfig

    try:
        GenerationConfig.from_pretrained(str(folder))
    except Exception:  # noqa: BLE001 - any refusal of transformers'
        return False
    return True


BAD = [({"max_new_tokens": -1}, None, "`max_new_tokens` must be greater than 0"),
       ({"cache_implementation": "bogus"}, None, "cache_implementation"),
       (None, "[1, 2]", "holds a JSON list, not an object")]


@pytest.mark.parametrize(("fields", "raw", "fragment"), BAD)
def test_export_refuses_a_generation_config_transformers_cannot_load(made: dict, tmp_path: Path, fields, raw,
                                                                    fragment: str) -> None:
    """export copied the input's generation_config.json as it was and exited 0; from_pretrained of the new export
    then failed. calibrate refused the same file; export now does too, naming it."""
    src = _with_generation(made["ct"], tmp_path / "ct2", fields, raw)
    assert not _transformers_loads(src) or raw is not None
    line = assert_fault(tmp_path, ["export", src, "--format", "fake", "-o", tmp_path / "out"], fragment)
    assert "generation_config.json" in line and "fix or delete it" in line, line


@pytest.mark.parametrize(("fields", "raw", "fragment"), BAD[:2])
def test_calibrate_names_the_generation_config(made: dict, tmp_path: Path, fields, raw, fragment: str) -> None:
    """calibrate refused it only when the weights were loaded, as "cannot load the weights of m2 ...; save or
    download them again": the weights were fine, the generation config was not."""
    src = _with_generation(made["model"], tmp_path / "m2", fields, raw)
    args = ["calibrate", src, "--calib", made["text"], *RTN, "-o", tmp_path / "out"]
    line = assert_fault(tmp_path, args, f"{src / 'generation_config.json'} is no generation config")
    assert fragment in line, line


def test_a_generation_config_transformers_loads_is_exported_as_it_is(made: dict, tmp_path: Path) -> None:
    """Fields real checkpoints carry (do_sample false beside a temperature, as Llama 3 ships) are taken, and the
    new export holds the same file."""
    src = _with_generation(made["ct"], tmp_path / "ct2", {"do_sample": False, "temperature": 0.6, "top_p": 0.9,
                                                         "eos_token_id": [1, 2]})
    assert _transformers_loads(src)
    result = run_cli("export", src, "--format", "fake", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "generation_config.json").read_bytes() == (src / "generation_config.json").read_bytes()


def _peft_model(root: Path, inject: bool):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / "model")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return peft.inject_adapter_in_model(config, model) if inject else peft.get_peft_model(model, config)


@pytest.mark.parametrize("inject", [False, True], ids=["PeftModel", "adapters injected in place"])
def test_a_model_with_peft_adapters_is_refused(made: dict, tmp_path: Path, inject: bool) -> None:
    """quantize(PeftModel) quantized lora_A/lora_B as linears of their own and wrote an export under the names
    base_model.model..., which load_quantized then refused as damaged (per-channel: with group 32 the adapter's
    width 4 stopped it by chance)."""
    model = _peft_model(made["root"], inject)
    with pytest.raises(quantkit.QuantkitError, match=r"model holds PEFT adapters .*merge_and_unload"):
        quantkit.quantize(model, data=str(made["text"]), method="rtn", group_size=-1, nsamples=2, seqlen=16,
                          output_dir=str(tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []


def test_a_merged_lora_model_is_taken(made: dict, tmp_path: Path) -> None:
    """merge_and_unload() gives an ordinary model: quantized, its export holds the merged q_proj (W + BA) in 4 bits,
    nearer it than the base's W."""
    import torch
    from transformers import AutoModelForCausalLM

    merged = _peft_model(made["root"], inject=False).merge_and_unload()
    key = "model.layers.0.self_attn.q_proj.weight"
    want = merged.state_dict()[key].clone()
    quantkit.quantize(merged, data=str(made["text"]), method="rtn", group_size=-1, nsamples=2, seqlen=16,
                      output_dir=str(tmp_path / "out"))
    got = quantkit.load_quantized(tmp_path / "out").state_dict()[key].float()
    base = AutoModelForCausalLM.from_pretrained(made["model"]).state_dict()[key]
    assert not torch.equal(want, base)
    assert (got - want).norm() < (got - base).norm()
