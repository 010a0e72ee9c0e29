"""Recipes: targets/ignore patterns and per-module overrides, through the engine, the API and the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import dynamic_rule, make_model_dir, make_text, run_calibration
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import quantkit
from quantkit.calibrate import CalibrationJob
from quantkit.cli import main
from quantkit.engine.comm import Hooks
from quantkit.errors import QuantkitError
from quantkit.fsutil import work_dir_for
from quantkit.quant import QuantSpec, method_for
from quantkit.quant.recipe import Override, Recipe, matches

SPEC = QuantSpec(bits=4, group_size=32)
# The example of the README: layers 0 and 2 (first and last of 3) keep down_proj at 8 bits; layer 1's
# q_proj stays in FP; layer 1's v_proj is round-to-nearest with 16-column groups; every k_proj per-channel.
EXAMPLE_YAML = r"""
targets: [Linear]
ignore:
  - lm_head
  - layers.1.self_attn.q_proj
overrides:
  - targets: ['re:.*layers\.(0|2)\.mlp\.down_proj$']
    bits: 8
  - targets: [k_proj]
    group_size: -1
  - targets: [layers.1.self_attn.v_proj]
    method: rtn
    group_size: 16
"""
EIGHT_BIT = {"model.layers.0.mlp.down_proj", "model.layers.2.mlp.down_proj"}
IGNORED = "model.layers.1.self_attn.q_proj"
RTN = "model.layers.1.self_attn.v_proj"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("recipe")
    torch.set_num_threads(1)
    recipe = root / "recipe.yaml"
    recipe.write_text(EXAMPLE_YAML)
    return {"model": make_model_dir(root), "text": make_text(root), "recipe": recipe, "root": root}


# ---------------------------------------------------------------- matching


def test_pattern_rules() -> None:
    name = "model.layers.12.mlp.down_proj"
    assert matches("down_proj", name) and matches("mlp.down_proj", name) and matches(name, name)
    assert matches("layers.12.mlp.down_proj", name) and not matches("layers.2.mlp.down_proj", name)
    assert not matches("own_proj", name)  # a suffix counts on a dot boundary only
    assert matches(r"re:.*layers\.(0|12)\.mlp\.down_proj$", name)
    assert not matches(r"re:layers\.12", name)  # re.match is anchored at the start, as in compressed-tensors
    assert matches("Linear", name) and matches("Linear", "lm_head")


def test_targets_ignore_and_ordered_overrides() -> None:
    recipe = Recipe(
        targets=["re:.*self_attn", "lm_head"], ignore=["k_proj"],
        overrides=[Override(targets=["re:.*_proj$"], bits=8, act_order=False),
                   Override(targets=["layers.0.self_attn.q_proj"], bits=3, method="rtn")],
    )
    gptq = method_for("gptq")
    assert recipe.settings_for("model.layers.0.mlp.up_proj", SPEC, gptq) is None  # not a target
    assert recipe.settings_for("model.layers.0.self_attn.k_proj", SPEC, gptq) is None  # ignored
    head = recipe.settings_for("lm_head", SPEC, gptq)
    assert head.spec == SPEC and head.method is gptq  # targeted, no override: the run's defaults
    v = recipe.settings_for("model.layers.0.self_attn.v_proj", SPEC, gptq)
    assert (v.spec.bits, v.spec.act_order, v.spec.static_groups, v.method) == (8, False, False, gptq)
    q = recipe.settings_for("model.layers.0.self_attn.q_proj", SPEC, gptq)  # both overrides; the later wins on bits
    assert (q.spec.bits, q.spec.act_order, q.spec.group_size, q.method.name) == (3, False, 32, "rtn")


def test_yaml_schema_round_trip(tiny: dict) -> None:
    recipe = Recipe.from_yaml(tiny["recipe"])
    assert recipe.targets == ("Linear",) and recipe.ignore == ("lm_head", "layers.1.self_attn.q_proj")
    assert [o.to_dict() for o in recipe.overrides] == [
        {"targets": [r"re:.*layers\.(0|2)\.mlp\.down_proj$"], "bits": 8},
        {"targets": ["k_proj"], "group_size": -1},
        {"targets": ["layers.1.self_attn.v_proj"], "group_size": 16, "method": "rtn"},
    ]
    assert Recipe.from_dict(recipe.to_dict()) == recipe


@pytest.mark.parametrize("text, fragment", [
    ("targets: [Linear]\nignores: [lm_head]\n", "unknown key 'ignores'"),
    ("overrides:\n  - targets: [down_proj]\n    bits: 5\n", "bits must be one of"),
    ("overrides:\n  - targets: [down_proj]\n    bits: true\n", "bits must be a int"),
    ("overrides:\n  - targets: [down_proj]\n    bitz: 8\n", "unknown key 'bitz'"),
    ("overrides:\n  - targets: [down_proj]\n", "sets nothing"),
    ("overrides:\n  - bits: 8\n", "has no targets"),
    ("overrides:\n  - targets: [down_proj]\n    method: awq\n", "unknown quantization method"),
    ("ignore: ['re:(unclosed']\n", "bad regular expression"),
    ("- just\n- a list\n", "must be a mapping"),
    ("targets: [a\n", "not valid YAML"),
])
def test_bad_recipe_files_are_one_line_errors(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(QuantkitError, match=None) as err:
        Recipe.from_yaml(path)
    assert fragment in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- the engine


def rtn_by_hand(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Symmetric round-to-nearest codes computed from the grid's definition (GPTQ's convention)."""
    maxq = 2**bits - 1
    rows, cols = weight.shape
    blocks = weight.float().reshape(rows, cols // group, group)
    scale = (2 * blocks.abs().amax(dim=-1, keepdim=True) / maxq).half().float()
    codes = torch.clamp(torch.round(blocks / scale) + 2 ** (bits - 1), 0, maxq)
    return codes.reshape(rows, cols).to(torch.uint8)


def test_example_recipe_in_memory(tiny: dict) -> None:
    fp = AutoModelForCausalLM.from_pretrained(tiny["model"])
    quantized = quantkit.quantize(str(tiny["model"]), data=str(tiny["text"]), method="gptq", bits=4, group_size=32,
                                  nsamples=4, seqlen=32, progress=False, recipe=tiny["recipe"])
    results, model = quantized.results, quantized.model
    # the ignored linear has no codes and keeps its exact FP weights (and so does the unquantized head)
    assert IGNORED not in results and len(results) == 3 * 7 - 1
    for name in (IGNORED, "lm_head"):
        assert torch.equal(model.get_submodule(name).weight, fp.get_submodule(name).weight), name
    for name, result in results.items():
        settings = (result.bits, result.group_size)
        if name in EIGHT_BIT:
            assert settings == (8, 32)
            assert int(result.qweight.max()) - int(result.qweight.min()) > 15  # more levels than 4 bits hold
        elif name == RTN:
            assert settings == (4, 16)
            assert torch.equal(result.qweight, rtn_by_hand(fp.get_submodule(name).weight, 4, 16))
        elif name.endswith("k_proj"):
            assert settings == (4, -1) and result.scales.shape[1] == 1
        else:
            assert settings == (4, 32) and int(result.qweight.max()) <= 15
        # the model holds the codes' dequantized weights
        assert torch.equal(model.get_submodule(name).weight, result.dequantize().to(fp.dtype)), name
    # GPTQ's error compensation differs from rounding: the RTN override really bypassed the GPTQ solve
    gptq_v = results["model.layers.0.self_attn.v_proj"]
    assert not torch.equal(gptq_v.qweight, rtn_by_hand(fp.get_submodule("model.layers.0.self_attn.v_proj").weight, 4, 32))
    # the report lists each module's settings and the recipe
    report = quantized.report
    layers = {entry["layer"]: entry["linears"] for entry in report["layers"]}
    assert layers[0]["mlp.down_proj"]["bits"] == 8 and layers[1]["mlp.down_proj"]["bits"] == 4
    assert layers[1]["self_attn.v_proj"]["method"] == "rtn" and layers[1]["self_attn.v_proj"]["group_size"] == 16
    assert "self_attn.q_proj" not in layers[1] and report["ignored"] == [IGNORED]
    assert report["recipe"] == Recipe.from_yaml(tiny["recipe"]).to_dict()


def test_tlq_run_with_gptq_override_sums_plain_hessians(tiny: dict) -> None:
    """An override to a method that weighs no tokens solves from the unweighted Hessian: with a GPTQ override
    on every linear, a TLQ run with token weights gives GPTQ's codes."""
    from quantkit.engine import calibrate_model
    from quantkit.engine.weights import LayerWeights

    samples = [{"input_ids": torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(i))} for i in range(3)]
    gen = torch.Generator().manual_seed(1)
    weights = {layer: LayerWeights([torch.rand(16, generator=gen) + 0.1 for _ in samples]) for layer in range(3)}
    runs = {}
    for name, recipe in (("tlq", None), ("gptq-override", Recipe(overrides=[Override(targets=["Linear"], method="gptq")]))):
        model = AutoModelForCausalLM.from_pretrained(tiny["model"])
        runs[name] = calibrate_model(model, samples, SPEC, method="tlq", token_weights=lambda layer: weights[layer],
                                     progress=False, fp_target=False, recipe=recipe).results
    plain = calibrate_model(AutoModelForCausalLM.from_pretrained(tiny["model"]), samples, SPEC, method="gptq",
                            progress=False).results
    differs = 0
    for name in plain:
        assert torch.equal(runs["gptq-override"][name].qweight, plain[name].qweight), name
        differs += not torch.equal(runs["tlq"][name].qweight, plain[name].qweight)
    assert differs  # the token weights do change TLQ's codes, so the equality above is not vacuous


# ---------------------------------------------------------------- bad recipes: before any forward


@pytest.mark.parametrize("text, fragment", [
    ("ignore: [bogus_proj]\n", "pattern 'bogus_proj' matches no linear"),
    ("overrides:\n  - targets: [down_proj]\n    group_size: 48\n", "group size 48 does not divide the input width 128"),
    ("overrides:\n  - targets: ['re:.*layers\\.7\\.']\n    bits: 8\n", "matches no linear"),
    ("targets: [lm_head]\n", "matches no linear"),  # the head is no candidate without --quantize-lm-head
    ("overrides:\n  - targets: [down_proj]\n    method: tlq\n", "weighs tokens"),
    ("overrides:\n  - targets: [down_proj]\n    bits: 5\n", "bits"),
    ("surprise: 1\n", "unknown key 'surprise'"),
])
def test_bad_recipe_cli_exit_2_nothing_written(tiny: dict, tmp_path: Path, monkeypatch, text: str, fragment: str) -> None:
    from quantkit.engine import driver

    def no_forward(*args, **kwargs):
        raise AssertionError("a bad recipe must fail before any forward")

    # the engine's first forward (a module-level name of driver alone, so the patch cannot outlive the test)
    monkeypatch.setattr(driver, "first_layer_streams", no_forward)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    out = tmp_path / "out"
    fmt = ["--format", "compressed-tensors"] if "bits: 3" in text else []
    result = CliRunner().invoke(main, ["calibrate", str(tiny["model"]), "--calib", str(tiny["text"]), "--method", "gptq",
                                       "--nsamples", "4", "--seqlen", "32", "--group-size", "32", "--recipe", str(recipe),
                                       "-o", str(out), "--low-memory", *fmt])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], result.output
    assert not out.exists() and not work_dir_for(str(out)).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_missing_recipe_file_is_one_line(tiny: dict, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["calibrate", str(tiny["model"]), "--calib", str(tiny["text"]),
                                       "--recipe", str(tmp_path / "none.yaml"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "recipe" in result.output and "not found" in result.output


def test_mixed_default_format_holds_every_width(tiny: dict, tmp_path: Path) -> None:
    """A 3-bit override in a 4-bit run: the default format (compressed-tensors) declares both widths."""
    recipe = Recipe(overrides=[Override(targets=["up_proj"], bits=3)])
    report = quantkit.quantize(str(tiny["model"]), data=str(tiny["text"]), method="rtn", group_size=32, nsamples=2,
                               seqlen=16, progress=False, recipe=recipe, output_dir=tmp_path / "out").report
    assert report["format"] == "compressed-tensors"
    assert report["layers"][0]["linears"]["mlp.up_proj"]["bits"] == 3
    groups = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert sorted(g["weights"]["num_bits"] for g in groups.values()) == [3, 4]


# ---------------------------------------------------------------- low memory, ranks, resume


def tensors_of(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.mark.parametrize("fmt", ["fake", "compressed-tensors"])
def test_mixed_low_memory_equals_in_memory(tiny: dict, tmp_path: Path, fmt: str) -> None:
    kw = dict(method="gptq", calib=str(tiny["text"]), nsamples=4, seqlen=32, progress=False, format=fmt,
              recipe=str(tiny["recipe"]))
    run_calibration(str(tiny["model"]), str(tmp_path / "plain"), SPEC, **kw)
    report = run_calibration(str(tiny["model"]), str(tmp_path / "low"), SPEC, low_memory=True, **kw)
    assert report["low_memory"] and report["layers"][2]["linears"]["mlp.down_proj"]["bits"] == 8
    plain, low = tensors_of(tmp_path / "plain"), tensors_of(tmp_path / "low")
    assert plain.keys() == low.keys() and plain
    for key in plain:
        assert torch.equal(plain[key], low[key]), key
    fp = AutoModelForCausalLM.from_pretrained(tiny["model"])
    assert torch.equal(low[f"{IGNORED}.weight"], fp.get_submodule(IGNORED).weight)  # FP, not fake-quantized
    for path in (tmp_path / "plain").glob("*.safetensors"):
        assert path.read_bytes() == (tmp_path / "low" / path.name).read_bytes(), path.name


def test_mixed_ranks_equal_one_process(tiny: dict, tmp_path: Path) -> None:
    """Two spawned ranks (in memory and streaming) give the one-process run's tensors under a mixed recipe."""
    kw = dict(method="gptq", calib=str(tiny["text"]), nsamples=4, seqlen=32, progress=False, format="fake",
              recipe=str(tiny["recipe"]))
    run_calibration(str(tiny["model"]), str(tmp_path / "one"), SPEC, **kw)
    report = run_calibration(str(tiny["model"]), str(tmp_path / "two"), SPEC, nproc=2, low_memory=True,
                             hooks=Hooks(split_rows=True), **kw)
    owners = {piece[0] for layer in report["layers"] for e in layer["linears"].values() for piece in e.get("solved_on_ranks", [])}
    assert owners == {0, 1}
    one, two = tensors_of(tmp_path / "one"), tensors_of(tmp_path / "two")
    assert one.keys() == two.keys()
    for key in one:
        assert torch.equal(one[key], two[key]), key


def test_resume_refuses_another_recipe(tiny: dict, tmp_path: Path) -> None:
    from helpers import FailAt

    out = tmp_path / "out"
    kw = dict(method="gptq", calib=str(tiny["text"]), nsamples=4, seqlen=32, progress=False, low_memory=True,
              format="fake")
    with pytest.raises(RuntimeError, match="injected"):
        run_calibration(str(tiny["model"]), str(out), SPEC, hooks=Hooks(on_layer=FailAt(0, 2)), recipe=str(tiny["recipe"]), **kw)
    assert json.loads((work_dir_for(str(out)) / "state.json").read_text())["layers_done"] == 2
    other = Recipe(overrides=[Override(targets=["down_proj"], bits=8)])
    with pytest.raises(QuantkitError, match="other settings"):
        run_calibration(str(tiny["model"]), str(out), SPEC, resume=True, recipe=other, **kw)
    with pytest.raises(QuantkitError, match="other settings"):
        run_calibration(str(tiny["model"]), str(out), SPEC, resume=True, **kw)  # no recipe is another recipe too
    report = run_calibration(str(tiny["model"]), str(out), SPEC, resume=True, recipe=str(tiny["recipe"]), **kw)
    assert report["resumed_from_layer"] == 2 and report["ignored"] == [IGNORED]


def test_job_fingerprint_holds_the_recipe() -> None:
    from quantkit.calibrate import DataSpec, ModelSpec, QuantizationSpec

    def job(recipe):
        return CalibrationJob(model=ModelSpec("m"), data=DataSpec(source="c", nsamples=1, seqlen=2),
                              quantization=QuantizationSpec(weights=SPEC, recipe=recipe))

    a = job(Recipe(ignore=["q_proj"])).fingerprint()
    assert a["recipe"]["ignore"] == ["q_proj"] and a != job(None).fingerprint()


# ---------------------------------------------------------------- exported: transformers and quantkit read it back


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def mixed_run(tiny: dict) -> quantkit.Quantized:
    """The example recipe calibrated once in memory (GPTQ, 4-bit g32 defaults): the fake-quantized model and codes."""
    return quantkit.quantize(str(tiny["model"]), data=str(tiny["text"]), method="gptq", bits=4, group_size=32,
                             nsamples=4, seqlen=32, progress=False, recipe=tiny["recipe"])


def test_mixed_compressed_tensors_loads_in_transformers(tiny: dict, mixed_run, tmp_path: Path) -> None:
    """CLI --recipe -> compressed-tensors: transformers loads it (through compressed-tensors) with the logits of
    quantkit's own fake-quantized model, the 8-bit down_projs in their own config group, the FP q_proj ignored."""
    out = tmp_path / "ct"
    result = CliRunner().invoke(main, ["calibrate", str(tiny["model"]), "--calib", str(tiny["text"]), "--method", "gptq",
                                       "--nsamples", "4", "--seqlen", "32", "--group-size", "32", "--recipe",
                                       str(tiny["recipe"]), "--format", "compressed-tensors", "-o", str(out)])
    assert result.exit_code == 0, result.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert IGNORED in qc["ignore"] and "lm_head" in qc["ignore"]
    fp = AutoModelForCausalLM.from_pretrained(tiny["model"])
    names = [n for n, m in fp.named_modules() if isinstance(m, torch.nn.Linear)]
    eight = [g["targets"] for g in qc["config_groups"].values() if g["weights"]["num_bits"] == 8]
    # compressed-tensors' matching: "re:" re.match-es, anything else is a full module name
    chosen = {n for n in names for t in eight[0] if (re.match(t[3:], n) if t.startswith("re:") else t == n)}
    assert len(eight) == 1 and chosen == EIGHT_BIT
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(5))
    ref = logits(mixed_run.model, ids)  # the API run: the same calibration, in memory
    assert (logits(loaded, ids) - ref).abs().max() <= 1e-3 * ref.abs().max()
    assert torch.equal(loaded.get_submodule(IGNORED).weight, fp.get_submodule(IGNORED).weight)
    for name in (*EIGHT_BIT, RTN):  # each decompressed weight is its own result's
        want = mixed_run.results[name].dequantize()
        assert torch.allclose(loaded.get_submodule(name).weight.float(), want, rtol=1e-3, atol=1e-6), name


def test_mixed_gptq_dynamic_and_quantkit_reload(tiny: dict, mixed_run, tmp_path: Path) -> None:
    """API recipe -> gptq_v2: the base setting at the top level, the 8-bit down_projs, the per-channel k_projs and
    the RTN v_proj as "+:" dynamic rules, the FP q_proj as "-:"; quantkit reloads the run's codes and weights."""
    from quantkit.export import read_checkpoint

    out = tmp_path / "gptq"
    quantkit.quantize(str(tiny["model"]), data=str(tiny["text"]), method="gptq", bits=4, group_size=32, nsamples=4,
                      seqlen=32, progress=False, recipe=Recipe.from_yaml(tiny["recipe"]), output_dir=out,
                      format="gptq_v2")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (4, 32, True, True)
    assert dynamic_rule(qc, IGNORED) is False
    for name in EIGHT_BIT:
        assert dynamic_rule(qc, name)["bits"] == 8, name
    assert dynamic_rule(qc, RTN)["group_size"] == 16
    assert all(dynamic_rule(qc, f"model.layers.{i}.self_attn.k_proj")["group_size"] == -1 for i in range(3))
    assert dynamic_rule(qc, "model.layers.1.mlp.down_proj") is None  # the top-level setting
    stored = read_checkpoint(out).results
    assert sorted(stored) == sorted(mixed_run.results)
    for name, r in mixed_run.results.items():
        assert torch.equal(stored[name].qweight, r.qweight) and stored[name].bits == r.bits, name
    back = quantkit.load_quantized(out)
    for name, module in mixed_run.model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert torch.equal(back.get_submodule(name).weight.float(), module.weight.float()), name


def test_head_override_and_ignore(tiny: dict) -> None:
    """With --quantize-lm-head the head is a candidate: an override gives it 8 bits, ignore leaves it in FP."""
    from quantkit.engine import calibrate_model

    samples = [{"input_ids": torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(i))} for i in range(2)]
    model = AutoModelForCausalLM.from_pretrained(tiny["model"])
    head8 = calibrate_model(model, samples, SPEC, method="gptq", progress=False, lm_head=True,
                            recipe=Recipe(overrides=[Override(targets=["lm_head"], bits=8, method="rtn")]))
    result = head8.results["lm_head"]
    fp = AutoModelForCausalLM.from_pretrained(tiny["model"])
    assert result.bits == 8 and torch.equal(result.qweight, rtn_by_hand(fp.lm_head.weight, 8, 32))
    assert head8.report["lm_head"]["bits"] == 8 and head8.report["lm_head"]["method"] == "rtn"
    assert head8.results["model.layers.0.mlp.up_proj"].bits == 4
    kept = calibrate_model(AutoModelForCausalLM.from_pretrained(tiny["model"]), samples, SPEC, method="gptq",
                           progress=False, lm_head=True, recipe=Recipe(ignore=["lm_head"]))
    assert "lm_head" not in kept.results and kept.report["lm_head"] is None and kept.report["ignored"] == ["lm_head"]
