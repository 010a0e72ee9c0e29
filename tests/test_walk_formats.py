"""Every decoder family the tests build x every export format x bits x group sizes, walked through the three answers
quantkit gives about one run: `quantkit plan`, `quantkit calibrate --dry-run` and the run itself (a tiny RTN run). A
right program gives ONE verdict per cell: all three take it, or all three refuse it with the same one line and leave
nothing behind. Every export a run writes then loads as its model card says (the card's own code block, run as a
user would: plain transformers for the formats it names that way) with the logits of quantkit.load_quantized, and
the card never names a load that fails. The grid is walked on a subset chosen by what differs between families
(Conv1D, fused qkv, tied heads, experts, an image-text model, odd widths); QUANTKIT_SLOW=1 walks all of it."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from helpers import (
    MOE_FAMILIES,
    VLM_FAMILIES,
    VLM_WORDS,
    require_type,
    run_cli,
    save_tiny_causal_lm,
    save_vlm,
    write_text,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

import quantkit
from quantkit.export.formats import FORMATS

BITS = (2, 3, 4, 8)
ODD = "odd"  # a group size that does not divide some linear's input width (each family's own: odd_group)
GROUPS = (-1, 32, ODD)
# model type -> what differs (the fast walk's families; the slow walk adds every family test_families builds)
FAST = {
    "llama": "the baseline: q/k/v, o, gate/up/down apart",
    "phi3": "fused qkv_proj and gate_up_proj",
    "gemma2": "tied embeddings, soft-capped logits, sandwich norms",
    "gpt2": "GPT-2's Conv1D (weight stored [in, out]), fused c_attn",
    "falcon": "fused query_key_value in FalconLinear, whose weight transformers' Falcon init reads",
    "nanochat": "weightless norms; transformers' NanoChat init reads o_proj.weight",
    "mixtral": "routed experts (fused 3-D in transformers, one linear per expert in quantkit)",
    "granitemoe": "experts kept fused in its checkpoints, exported dense",
    "deepseek_v3": "latent attention (kv_a_proj 24 rows, kv_b_proj reads 16 columns), routed and shared experts",
    "falcon_h1": "a Mamba-2 in_proj of 148 rows (an output width GPTQ cannot pack) beside attention",
    "qwen2_vl": "an image-text model: the language model quantized, the vision side kept",
}
VLM = set(VLM_FAMILIES)
RTN = ["--method", "rtn", "--nsamples", "2", "--seqlen", "8"]


def _cells(families: list[str], full: bool) -> list:
    """(family, format, bits, group, sym): every cell with `full`; else 4 cells per family and format, rotated so
    that each format meets all 24 (bits, group, symmetry) settings within every 6 families."""
    settings = [(b, g, s) for g in GROUPS for b in BITS for s in (True, False)]
    out = []
    for i, family in enumerate(families):
        for f, fmt in enumerate(FORMATS):
            chosen = settings if full else [settings[(4 * i + k + f) % len(settings)] for k in range(4)]
            out += [pytest.param(family, fmt, b, g, s, id=f"{family}-{fmt}-w{b}-g{g}-{'sym' if s else 'asym'}")
                    for b, g, s in chosen]
    return out


def _slow_families() -> list[str]:
    """Every family test_families, test_experts and test_vlm_families build (test_families' FAMILIES, by name)."""
    spec = importlib.util.spec_from_file_location("_families", Path(__file__).with_name("test_families.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return sorted(set(module.FAMILIES) | set(MOE_FAMILIES) | {"llama"}) + VLM_FAMILIES


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each family's tiny model folder (built on first use) and the calibration text its tokenizer reads."""
    root = tmp_path_factory.mktemp("formats")
    words = torch.randint(0, len(VLM_WORDS), (400,), generator=torch.Generator().manual_seed(0))
    (root / "vlm.txt").write_text(" ".join(VLM_WORDS[i] for i in words))
    return {"root": root, "text": write_text(root / "text.txt"), "vlm.txt": root / "vlm.txt"}


def _model(folders: dict, family: str) -> Path:
    if family not in folders:
        if family in VLM:
            save_vlm(family, folders["root"] / family)
            folders[family] = folders["root"] / family
        else:
            require_type(family)
            folders[family] = save_tiny_causal_lm(folders["root"], family)
    return folders[family]


def odd_group(model_dir: Path) -> int:
    """A group size that does not divide the input width of some linear of the model (read from transformers'
    modules, not quantkit's): the widest input that some other input is no multiple of, else 24."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_dir)
    auto = AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    widths = {m.weight.shape[1] if isinstance(m, torch.nn.Linear) else m.weight.shape[0]
              for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D", "FalconLinear")
              and "lm_head" not in n and "vis" not in n}
    return next((w for w in sorted(widths, reverse=True) if any(x % w for x in widths)), 24)


def _verdict(result) -> tuple[int, str]:
    """(exit code, the error line) of a command: a refusal must be exactly one `error:` line."""
    if result.exit_code == 0:
        return 0, ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (result.exit_code,
                                                                                         result.output[-800:])
    assert "--debug shows the traceback" not in lines[0], lines[0]
    return 2, lines[0]


def _card_code(out: Path) -> tuple[str, list[str]]:
    """The model card's load code block (its placeholder made the export's path) and the packages it says
    transformers needs for the format."""
    card = (out / "README.md").read_text()
    section = card[card.index("## Load it"):]
    code = section[section.index("```python\n") + 10:].split("```")[0]
    extras = section.split("transformers needs `pip install ", 1)[1].split("`")[0].split() if (
        "transformers needs `pip install " in section) else []
    return code.replace('"THIS_REPO_OR_DIR"', repr(str(out))).replace('"DIR"', repr(str(out))), extras


def check_card_load(out: Path, ids: torch.Tensor) -> None:
    """The card's code loads the export with load_quantized's logits. Where the card says transformers needs packages
    this environment lacks (gptqmodel for GPTQ), its line cannot be run here: load_quantized's is."""
    with torch.no_grad():
        ours = quantkit.load_quantized(out)(input_ids=ids).logits
    code, extras = _card_code(out)
    if "from_pretrained" not in code:  # the card says plain transformers cannot load it: neither way does
        check_transformers_refuses(out, ids)
        return
    if any(importlib.util.find_spec(p.replace("-", "_")) is None for p in extras):
        assert "quantkit.load_quantized" in (out / "README.md").read_text()
        return
    scope: dict = {}
    try:
        exec(code, scope)  # noqa: S102 - the card's code block, as a user runs it
    except Exception as err:  # noqa: BLE001 - any failure of the card's own line is the fault checked here
        raise AssertionError(f"the card's load fails: {err!r}\n{code}") from None
    with torch.no_grad():
        theirs = scope["model"](input_ids=ids).logits
    # Both hold the same integer codes, scales and zero points, dequantized in float32 (compressed-tensors as
    # (q - z) * s, quantkit as its solver wrote them): what differs is float32 rounding, measured at most ~1e-6 of
    # the logits' range on these models; a wrong code, group or zero point moves them by far more than 1e-4.
    assert (theirs - ours).abs().max() <= 1e-4 * ours.abs().max(), code


def check_transformers_refuses(out: Path, ids: torch.Tensor) -> None:
    """from_pretrained of the export fails, as it is and decompressed (the card withholds no load that works)."""
    import json

    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        CompressedTensorsConfig,
    )

    image_text = json.loads((out / "config.json").read_text()).get("vision_config") is not None
    auto = AutoModelForImageTextToText if image_text else AutoModelForCausalLM
    for extra in ({}, {"quantization_config": CompressedTensorsConfig(dequantize=True)}):
        with pytest.raises(Exception):  # noqa: B017 - whatever this transformers raises on it
            auto.from_pretrained(out, **extra)(input_ids=ids)


def walk_cell(folders: dict, tmp_path: Path, family: str, fmt: str, bits: int, group: int | str, sym: bool) -> None:
    model = _model(folders, family)
    text = folders["vlm.txt" if family in VLM else "text"]
    group = odd_group(model) if group == ODD else group
    args = [model, "--calib", text, *RTN, "--bits", bits, "--group-size", group, "--format", fmt,
            "--sym" if sym else "--asym"]
    out = tmp_path / "out"
    plan = _verdict(run_cli("plan", *args))
    dry = _verdict(run_cli("calibrate", *args, "--dry-run", "-o", out))
    assert not out.exists(), "--dry-run wrote its output"
    run = _verdict(run_cli("calibrate", *args, "-o", out))
    assert plan == dry == run, {"plan": plan, "--dry-run": dry, "run": run}
    if run[0]:
        assert sorted(p.name for p in tmp_path.iterdir()) == [], "a refused run left files behind"
        return
    high = 40 if family in VLM else 60  # word ids of the tokenizer, below any image token
    ids = torch.randint(2, high, (2, 10), generator=torch.Generator().manual_seed(3))
    check_card_load(out, ids)
    if bits == 4 and group == -1:  # per channel at 4 bits, which every format stores: `quantkit export` to the next
        other = FORMATS[(FORMATS.index(fmt) + 1) % len(FORMATS)]
        again = tmp_path / "again"
        dry = _verdict(run_cli("calibrate", *args[:-2], other, args[-1], "--dry-run", "-o", again))
        exported = _verdict(run_cli("export", out, "--format", other, "-o", again))
        assert exported == dry, {"export": exported, "calibrate --dry-run": dry}  # the run's answer, in its words
        if not exported[0]:
            check_card_load(again, ids)
            shutil.rmtree(again)
        assert not again.exists(), "a refused export left files behind"
    shutil.rmtree(out)


@pytest.mark.parametrize(("family", "fmt", "bits", "group", "sym"), _cells(list(FAST), full=False))
def test_plan_dry_run_and_run_agree_and_the_card_loads(folders: dict, tmp_path: Path, family: str, fmt: str,
                                                       bits: int, group: int | str, sym: bool) -> None:
    walk_cell(folders, tmp_path, family, fmt, bits, group, sym)


@pytest.mark.slow
@pytest.mark.parametrize(("family", "fmt", "bits", "group", "sym"),
                         _cells([f for f in _slow_families() if f in CONFIG_MAPPING_NAMES or f in VLM], full=True))
def test_every_cell_of_every_family(folders: dict, tmp_path: Path, family: str, fmt: str, bits: int,
                                    group: int | str, sym: bool) -> None:
    walk_cell(folders, tmp_path, family, fmt, bits, group, sym)


def test_an_export_into_a_format_refuses_in_the_runs_line(folders: dict, tmp_path: Path) -> None:
    """`quantkit export` of a Falcon-H1 run into gptq_v2 refused in the packer's words ('cannot pack 148 4-bit codes
    into whole int32 words; ...': no linear named, no format that stores it), where calibrate --format gptq_v2 names
    the Mamba in_proj and the formats that do: the same line now, from the same check."""
    model = _model(folders, "falcon_h1")
    args = [model, "--calib", folders["text"], *RTN, "--bits", "4", "--group-size", "-1"]
    assert run_cli("calibrate", *args, "--format", "fake", "-o", tmp_path / "fake").exit_code == 0
    dry = _verdict(run_cli("calibrate", *args, "--format", "gptq_v2", "--dry-run", "-o", tmp_path / "x"))
    assert dry[0] == 2 and "in_proj" in dry[1]
    assert _verdict(run_cli("export", tmp_path / "fake", "--format", "gptq_v2", "-o", tmp_path / "x")) == dry
    assert not (tmp_path / "x").exists()
