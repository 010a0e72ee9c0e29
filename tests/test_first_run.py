"""What a first run meets: the API's data conventions, a default export that plain transformers loads, and the
held-out part named where a result is reported."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import pytest
import torch
from helpers import WORDS, make_tokenizer, observing, run_cli, save_tiny_llama, write_text

import quantkit
from quantkit.data.calibration import memory_calibration


def word_ids(text: str) -> list[int]:
    """make_tokenizer's ids, computed without it: <unk> 0, <eos> 1, WORDS from 2."""
    return [WORDS.index(w) + 2 for w in text.split()]


def random_texts(n: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("first")
    return {"model": save_tiny_llama(root / "model"), "text": write_text(root / "text.txt")}


# ---------------------------------------------------------------- a list of texts is a list of samples


def test_fewer_texts_than_nsamples_are_each_one_truncated_sample_with_one_warning() -> None:
    texts = random_texts(5, 40)
    with pytest.warns(UserWarning, match="5 calibration samples, fewer than nsamples=8") as caught:
        samples = memory_calibration(texts, make_tokenizer(), nsamples=8, seqlen=16)
    assert len([w for w in caught if "calibration samples" in str(w.message)]) == 1
    assert [s["input_ids"][0].tolist() for s in samples] == [word_ids(t)[:16] for t in texts]


def test_more_texts_than_nsamples_are_a_seeded_draw_of_whole_texts() -> None:
    texts = random_texts(30, 12, seed=1)
    every = [word_ids(t) for t in texts]
    drawn = {}
    for seed in (0, 0, 1):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # enough texts: no warning
            samples = memory_calibration(texts, make_tokenizer(), nsamples=6, seqlen=16, seed=seed)
        ids = [s["input_ids"][0].tolist() for s in samples]
        assert len(ids) == 6 and all(i in every for i in ids) and len({tuple(i) for i in ids}) == 6
        drawn.setdefault(seed, []).append(ids)
    assert drawn[0][0] == drawn[0][1] and drawn[0][0] != drawn[1][0]


def test_short_and_empty_texts_are_skipped_and_near_empty_data_refused() -> None:
    texts = ["", "w1", "w2 w3 w4", "   ", "w5 w6"]
    with pytest.warns(UserWarning, match=r"2 calibration samples.*\(1 shorter than 2 tokens skipped\)"):
        samples = memory_calibration(texts, make_tokenizer(), nsamples=4, seqlen=4)
    assert [s["input_ids"][0].tolist() for s in samples] == [word_ids("w2 w3 w4"), word_ids("w5 w6")]
    with pytest.raises(quantkit.QuantkitError, match="hold 5 tokens in all .* less than one seqlen"):
        memory_calibration(texts, make_tokenizer(), nsamples=4, seqlen=16)


def test_one_text_is_still_cut_into_windows() -> None:
    text = random_texts(1, 200)[0]
    samples = memory_calibration([text], make_tokenizer(), nsamples=4, seqlen=16, seed=0)
    stream = word_ids(text)
    starts = random.Random(0).sample(range(len(stream) - 16 + 1), 4)
    assert [s["input_ids"][0].tolist() for s in samples] == [stream[b:b + 16] for b in starts]


def test_the_issue_case_32_texts_of_4000_characters_calibrate(tiny: dict) -> None:
    """32 long texts where 128 x 64 tokens are asked: 32 samples of 64 tokens, not 'too little text'."""
    texts = [t[:4000] for t in random_texts(32, 1400, seed=2)]
    with pytest.warns(UserWarning, match="32 calibration samples, fewer than nsamples=128"):
        report = quantkit.quantize(str(tiny["model"]), data=texts, method="rtn", group_size=32, seqlen=64,
                                   progress=False).report
    assert report["nsamples"] == 32 and report["seqlen"] == 64


def test_a_dataset_of_texts_follows_the_same_convention(tiny: dict) -> None:
    datasets = pytest.importorskip("datasets")
    texts = random_texts(3, 30, seed=3)
    with pytest.warns(UserWarning, match="3 calibration samples"):
        samples = memory_calibration(datasets.Dataset.from_dict({"text": texts}), make_tokenizer(), nsamples=8,
                                     seqlen=20)
    assert [s["input_ids"][0].tolist() for s in samples] == [word_ids(t)[:20] for t in texts]


# ---------------------------------------------------------------- the default export: packed, and plain transformers loads it


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_default_export_is_packed_and_loads_in_plain_transformers(tiny: dict, tmp_path: Path, bits: int) -> None:
    """The default export at every width is compressed-tensors pack-quantized, and plain AutoModelForCausalLM (no
    gptqmodel, no optimum) gives the logits of the FP model with each linear set to (q - z) * s of the run's codes."""
    from transformers import AutoModelForCausalLM

    quantized = quantkit.quantize(str(tiny["model"]), data=str(tiny["text"]), method="gptq", bits=bits,
                                  group_size=32, nsamples=2, seqlen=16, output_dir=tmp_path / "out", progress=False)
    assert quantized.report["format"] == "compressed-tensors"
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert {g["weights"]["num_bits"] for g in config["config_groups"].values()} == {bits}
    reference = AutoModelForCausalLM.from_pretrained(tiny["model"]).eval()
    with torch.no_grad():
        for name, r in quantized.results.items():
            groups = r.g_idx.long()
            reference.get_submodule(name).weight.copy_((r.qweight.float() - r.zeros.float()[:, groups])
                                                       * r.scales[:, groups])
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.tensor([word_ids("w1 w7 w3 w30 w12 w5 w44 w2")])
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- what a run reports per linear


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_report_gives_the_error_of_plain_rounding_beside_the_solvers(tiny: dict, method: str) -> None:
    """rtn_output_rel_err is tr(R H R^T) / tr(W H W^T) with R = W - rtn_solve(W) (computed here from the Hessian
    the engine handed out and the FP weight): the error before the solver's work, which GPTQ lowers."""
    from transformers import AutoModelForCausalLM

    from quantkit.data.samples import calibration_samples
    from quantkit.engine import calibrate_model
    from quantkit.quant.rtn import rtn_solve
    from quantkit.quant.spec import QuantSpec

    model = AutoModelForCausalLM.from_pretrained(tiny["model"]).eval()
    fp = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    samples = calibration_samples(str(tiny["text"]), make_tokenizer(), nsamples=4, seqlen=16)
    seen: dict[str, torch.Tensor] = {}
    spec = QuantSpec(bits=3, group_size=32)
    report = calibrate_model(model, samples, spec, method=method, progress=False,
                             comm=observing(lambda name, h, cross: seen.__setitem__(name, h.clone()))).report
    for layer in report["layers"]:
        for short, entry in layer["linears"].items():
            name = f"model.layers.{layer['layer']}.{short}"
            if method == "rtn":  # no activations read, no Hessian: no output error to give
                assert "output_rel_err" not in entry and "rtn_output_rel_err" not in entry
                continue
            weight, hessian = fp[name].float(), seen[name].double()
            rounded = (weight - rtn_solve(weight, None, spec).dequantize()).double()
            by_hand = float(torch.einsum("oi,ij,oj->", rounded, hessian, rounded)
                            / torch.einsum("oi,ij,oj->", weight.double(), hessian, weight.double()))
            assert entry["rtn_output_rel_err"] == pytest.approx(by_hand, rel=1e-4), name
            assert entry["output_rel_err"] < entry["rtn_output_rel_err"], name


# ---------------------------------------------------------------- what a run prints


def test_console_table_and_summary(tiny: dict, tmp_path: Path) -> None:
    """One table line per decoder layer with the means of the report's per-linear errors and its seconds; the
    summary's sizes are the safetensors files' sizes on disk."""
    out = tmp_path / "out"
    result = run_cli("calibrate", tiny["model"], "--calib", tiny["text"], "--method", "gptq", "--nsamples", "4",
                     "--seqlen", "16", "--group-size", "32", "-o", out)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    report = json.loads((out / "quantkit_report.json").read_text())
    assert "output error: rounding -> solved" in lines[0]
    for layer, line in zip(report["layers"], lines[1:3]):
        entries = list(layer["linears"].values())
        rounded = sum(e["rtn_output_rel_err"] for e in entries) / len(entries)
        solved = sum(e["output_rel_err"] for e in entries) / len(entries)
        assert line.split()[:5] == [str(layer["layer"]), str(len(entries)), f"{rounded:.5f}", "->", f"{solved:.5f}"]
    before = sum(p.stat().st_size for p in tiny["model"].glob("*.safetensors"))
    after = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert any(f"({before / after:.1f}x smaller)" in line for line in lines), lines
    assert any(line.startswith("load: AutoModelForCausalLM.from_pretrained(") for line in lines), lines


# ---------------------------------------------------------------- RTN needs no calibration data


@pytest.mark.parametrize("low_memory", [False, True])
def test_rtn_runs_without_calibration_data_and_exports_the_same_bytes(tiny: dict, tmp_path: Path,
                                                                       low_memory: bool) -> None:
    """RTN rounds each weight alone, so `--calib` changes nothing in its export: without it the run is the
    same tensors byte for byte, its report and card say no data was read."""
    from safetensors.torch import load_file

    common = ["--method", "rtn", "--bits", "4", "--group-size", "32", *(["--low-memory"] if low_memory else [])]
    with_data = run_cli("calibrate", tiny["model"], "--calib", tiny["text"], "--nsamples", "2", "--seqlen", "16",
                        *common, "-o", tmp_path / "with", "--json")
    without = run_cli("calibrate", tiny["model"], *common, "-o", tmp_path / "without", "--json")
    assert with_data.exit_code == 0 and without.exit_code == 0, (with_data.output, without.output)
    a, b = load_file(tmp_path / "with" / "model.safetensors"), load_file(tmp_path / "without" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads(without.stdout)
    assert report["nsamples"] == 0 and report["calib"] is None and report["part"] is None
    assert "Calibration: none (round-to-nearest reads no data)." in (tmp_path / "without" / "README.md").read_text()


def test_the_api_quantizes_with_rtn_without_data(tiny: dict) -> None:
    """quantkit.quantize(model, method="rtn") gives the codes of a run with data."""
    common = dict(method="rtn", bits=4, group_size=32, progress=False)
    bare = quantkit.quantize(str(tiny["model"]), **common)
    given = quantkit.quantize(str(tiny["model"]), data=str(tiny["text"]), nsamples=2, seqlen=16, **common)
    assert bare.results.keys() == given.results.keys()
    for name, result in bare.results.items():
        assert torch.equal(result.qweight, given.results[name].qweight) and torch.equal(result.scales, given.results[name].scales)
