"""Importance-weighted GPTQ through the engine: identities against plain GPTQ and dense Hessians; recipes."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from helpers import observing, tiny_model

from quantkit.data.recipes import is_recipe, load_recipe, recipe_samples, split_counts
from quantkit.engine import calibrate_model
from quantkit.errors import QuantkitError
from quantkit.importance import tlq_token_weights
from quantkit.quant.spec import QuantSpec

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def tiny_llama():
    return tiny_model("llama", seed=0, vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64).eval()


def samples_for(count: int = 4, length: int = 24) -> list[dict]:
    generator = torch.Generator().manual_seed(5)
    return [{"input_ids": torch.randint(0, 101, (1, length), generator=generator)} for _ in range(count)]


@pytest.mark.parametrize("fp_target", [False, True])
def test_all_ones_weights_give_plain_gptq_codes(fp_target: bool) -> None:
    model = tiny_llama()
    samples = samples_for()
    ones = tlq_token_weights(model, samples, lam=1.0, progress=False)
    assert all(torch.equal(w, torch.ones(24)) for layer in range(2) for w in ones(layer))
    # with output-side factors the engine is told the weights are uniform and sums plain Hessians (the same bytes as
    # the weighted sums of a calibration set's ones: test_lowmem_ranks.test_default_method_from_a_calibration_set...)
    assert ones.uniform and not tlq_token_weights(model, samples, lam=0.5, progress=False).uniform
    mask = torch.tensor([[1] * 20 + [0] * 4])  # padding weighs 0: not every weight is 1
    padded = [dict(sample, attention_mask=mask) for sample in samples]
    assert not tlq_token_weights(model, padded, lam=1.0, progress=False).uniform
    spec = QuantSpec(bits=3, group_size=32)
    plain = calibrate_model(copy.deepcopy(model), samples, spec, method="gptq", progress=False, fp_target=fp_target)
    weighted = calibrate_model(copy.deepcopy(model), samples, spec, method="tlq", token_weights=ones, progress=False,
                               fp_target=None if fp_target else False)  # TLQ's default is the FP target
    assert plain.results.keys() == weighted.results.keys()
    for name, result in plain.results.items():
        assert torch.equal(result.qweight, weighted.results[name].qweight), name
        assert torch.equal(result.scales, weighted.results[name].scales), name


def test_engine_hessian_equals_dense_weighted_reference() -> None:
    model = tiny_llama()
    samples = samples_for()
    weights = tlq_token_weights(model, samples, lam=0.1, progress=False)
    # Dense reference for layer 0's q_proj: its inputs are FP (nothing below it is quantized).
    inputs: list[torch.Tensor] = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, o: inputs.append(a[0][0].detach()))
    with torch.no_grad():
        for sample in samples:
            model(**sample)
    hook.remove()
    x = torch.cat(inputs).double()
    w = torch.cat(weights(0)).double()
    reference = 2 * torch.einsum("t,ti,tj->ij", w, x, x) / w.sum()
    seen: dict[str, torch.Tensor] = {}
    calibrate_model(copy.deepcopy(model), samples, QuantSpec(bits=4, group_size=32), method="tlq", token_weights=weights,
                    progress=False, comm=observing(lambda name, h, cross: seen.setdefault(name, h.clone())))
    engine = seen["model.layers.0.self_attn.q_proj"].double()
    assert torch.allclose(engine, reference, rtol=1e-5, atol=1e-6 * float(reference.abs().max()))
    unweighted = 2 * x.T @ x / x.shape[0]
    assert not torch.allclose(engine, unweighted, rtol=1e-3)  # the weights do change H


def test_recipe_parsing_and_sample_split(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("alpha " * 400)
    (tmp_path / "b.txt").write_text("beta " * 400)
    recipe_file = tmp_path / "mix.yaml"
    recipe_file.write_text("nsamples: 4\nseqlen: 8\nsources:\n  - path: a.txt\n    weight: 3\n  - path: b.txt\n    fraction: 1\n    part: train\n")
    assert is_recipe(recipe_file) and not is_recipe(tmp_path / "a.txt")
    recipe = load_recipe(recipe_file)
    assert recipe.sources[0].path == str(tmp_path / "a.txt") and recipe.sources[1].part == "train"
    assert split_counts([3, 1], 4) == [3, 1] and split_counts([100, 1], 5) == [4, 1] and sum(split_counts([1, 1, 1], 10)) == 10

    class CharTokenizer:
        eos_token_id = 0

        def __call__(self, texts, **kwargs):
            return {"input_ids": [[ord(c) for c in t] for t in texts]}

    samples = recipe_samples(recipe, CharTokenizer(), seed=1)
    assert len(samples) == 4 and all(s["input_ids"].shape == (1, 8) for s in samples)
    texts = ["".join(chr(i) for i in s["input_ids"][0].tolist() if i) for s in samples]
    assert sum("b" in t for t in texts) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources:\n  - path: a.txt\n    weight: -1\n")
    with pytest.raises(QuantkitError, match="weight"):
        load_recipe(bad)
    with pytest.raises(QuantkitError, match="not found"):
        load_recipe(tmp_path / "none.yaml")


@pytest.mark.parametrize("name", ["text", "image-caption", "image-qa"])
def test_shipped_recipes_parse(name: str, tmp_path, monkeypatch) -> None:
    # The shipped recipes read the user's data through a variable, never a path outside the clone.
    for var in ("QUANTKIT_TEXT_DATA", "QUANTKIT_IMAGE_DATA"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(QuantkitError, match=r"uses \$QUANTKIT_\w+_DATA, which is not set"):
        load_recipe(REPO / "calib" / f"{name}.yaml")
    for var in ("QUANTKIT_TEXT_DATA", "QUANTKIT_IMAGE_DATA"):
        monkeypatch.setenv(var, str(tmp_path))
    recipe = load_recipe(REPO / "calib" / f"{name}.yaml")
    assert recipe.kind == name and recipe.sources and recipe.nsamples > 0
    assert all(Path(s.path).is_relative_to(tmp_path) for s in recipe.sources)


def test_notebook_runs() -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(REPO / "notebooks" / "tlq_walkthrough.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "max relative gradient error" in outputs
    without, with_fp = map(float, re.search(r"without FP target: ([0-9.]+)\s+with: ([0-9.]+)", outputs).groups())
    assert with_fp < without  # the FP target lowers the error it is defined by, on the real pipeline
