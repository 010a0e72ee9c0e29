"""Round 19 of the fault battery (issue #22): architecture configs at their edges, run by fault_battery.py --rounds 19.

Every model here is built tiny from transformers' own config class of its type (tests/helpers.tiny_config, which is
AutoConfig.for_model with tiny widths) with one field or two moved to an edge: head_dim that is not hidden/heads,
one KV head or as many as heads, KV heads that do not divide the heads, sliding windows shorter than a sequence and
per-layer attention-type lists (right, too long, unknown kinds), rope_parameters of every kind and partial rotary,
qk-norm families, tied and untied heads, vocabularies that are no multiple of 8 or smaller than the tokenizer,
hidden and intermediate widths a group size does not divide, one layer, biases on attention and MLP; mixtures of
experts with expert widths a group does not divide, norm_topk_prob either way, dense-first and dense-only layer
lists, latent attention with odd head splits, interleaved MoE layers; VLM configs whose image token id is out of the
vocabulary or names another token, and processor files missing or contradicting the vision tower. Each goes
through calibrate (RTN, GPTQ, the default), plan (equal to calibrate --dry-run), export formats with group sizes
and --asym, eval and load_quantized / the model card's load line.

References, computed here apart from quantkit's code: RTN's codes by hand (the grid docs/formats.md states: per
group of input columns, symmetric scale 2 max|w| / (2^bits - 1) rounded to fp16 and codes around 2^(bits-1), or
asymmetric over [min(w, 0), max(w, 0)]), so every quantized linear of an RTN export must equal that weight by hand;
plain transformers loading the export (as the model card says) giving load_quantized's logits; an eval loss equal to
a strided plain-transformers loss; an export of an export holding the same weights. A width the group size does not
divide must be refused in one line by calibrate, plan and --dry-run alike (quantkit groups whole columns).
Each case says what a right program does: refuse (one line, exit 2 / one QuantkitError, nothing left behind),
"maybe" (a refusal or a checked success), or "valid" (must be taken, and its result checked).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from fault_battery import (
    DEFAULT10,
    GPTQ,
    RTN,
    Cases,
    _maybe,
    faithful,
    plan_equals_dry_run,
    quantize,
    run_cli,
    valid,
    vlm_faithful,
)
from fault_round18 import _cache_root, _weights_of, built, card_loads, chain, eval_like_plain, tri
from fault_round18b import plain_like

# ---------------------------------------------------------------- the tiny models, built once per config


def _save_arch(model_type: str, **fields) -> Callable[[Path], None]:
    """A tiny model of model_type (helpers.tiny_config with `fields` on top) saved with a tokenizer its own
    tokenizer class reads (the word one, or a byte-level one where the type's class rebuilds byte-level BPE)."""
    def make(path: Path) -> None:
        from helpers import random_model, save_tokenizer, tiny_config, write_text

        text = _cache_root() / "words19.txt"
        if not text.exists():
            write_text(text)
        random_model(tiny_config(model_type, **fields), 0).eval().save_pretrained(path)
        save_tokenizer(path, text)
    return make


def _edit_config(rel: str, **fields) -> Callable[[Path], None]:
    """config.json of the case's copy of `rel` with `fields` set (None: removed): a config the weights still fit
    but that says something else, for inputs transformers would not build."""
    def setup(w: Path) -> None:
        path = w / rel / "config.json"
        config = json.loads(path.read_text())
        for key, value in fields.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            elif value is None:
                config.pop(key, None)
            else:
                config[key] = value
        path.write_text(json.dumps(config))
    return setup


_NAMES: dict[tuple, str] = {}


def arch(model_type: str, **fields) -> tuple[str, Callable[[Path], None]]:
    """(folder name, setup) of the tiny model_type with fields (one folder per distinct config)."""
    key = (model_type, json.dumps(fields, sort_keys=True))
    if key not in _NAMES:
        _NAMES[key] = f"a19_{model_type}_{len(_NAMES)}"
    rel = _NAMES[key]
    return rel, built(rel, _save_arch(model_type, **fields))


# ---------------------------------------------------------------- references


def _group_rtn(weight: torch.Tensor, group: int, bits: int, sym: bool) -> torch.Tensor:
    """Weight [out, in] rounded to nearest on the grid of docs/formats.md, group by group of input columns."""
    w = weight.float()
    cols = w.shape[1]
    size = cols if group == -1 else group
    maxq = 2**bits - 1
    out = torch.empty_like(w)
    for start in range(0, cols, size):
        g = w[:, start:start + size]
        lo = torch.clamp(g.min(dim=1, keepdim=True).values, max=0.0)
        hi = torch.clamp(g.max(dim=1, keepdim=True).values, min=0.0)
        flat = (lo == 0) & (hi == 0)
        lo, hi = torch.where(flat, -1.0, lo), torch.where(flat, 1.0, hi)
        if sym:
            scale = (2 * torch.maximum(-lo, hi) / maxq).clamp(min=2.0**-24).half().float()
            zero = torch.full_like(scale, float(2 ** (bits - 1)))
        else:
            scale = ((hi - lo) / maxq).clamp(min=2.0**-24).half().float()
            zero = torch.clamp(torch.round(-lo / scale), 0, maxq)
        codes = torch.clamp(torch.round(g / scale) + zero, 0, maxq)
        out[:, start:start + size] = (codes - zero) * scale
    return out


LAYER_LINEAR = re.compile(r"\.layers\.\d+\..*\.weight$")


def rtn_exact(model: str, rel: str = "out", group: int = 32, bits: int = 4, sym: bool = True,
              head: bool = False, must_take: bool = True):
    """A check: every 2-D weight of the decoder layers (and lm_head with head) in load_quantized(rel) equals the
    model's weight rounded to nearest by hand (_group_rtn), every other tensor the model's own, and the model
    card's load line (plain transformers) gives load_quantized's logits."""
    def check(w: Path, result) -> str | None:
        from transformers import AutoModelForCausalLM

        import quantkit

        if not (w / rel).is_dir():
            return f"exit 0 but no {rel}/"
        got = quantkit.load_quantized(w / rel)
        fp = AutoModelForCausalLM.from_pretrained(w / model).state_dict()
        a = got.state_dict()
        if a.keys() != fp.keys():
            return f"other tensors than the model's: {sorted(set(a) ^ set(fp))[:3]}"
        checked = 0
        for k, x in a.items():
            y = fp[k]
            quantized = y.dim() == 2 and (LAYER_LINEAR.search(k) and "norm" not in k or head and k == "lm_head.weight")
            if quantized:
                expect = _group_rtn(y, group, bits, sym)
                diff = (x.float() - expect).abs().max().item()
                if diff > 1e-6:
                    return f"{k} differs by {diff:.3g} from its weight rounded to nearest by hand"
                checked += 1
            elif not torch.equal(x.float(), y.float()):
                return f"{k} changed though it is no quantized linear"
        return card_loads(rel)(w, result) if checked else "no linear checked"
    check.valid = must_take
    return check


def _cal(rel: str, *extra, method=RTN, out: str = "out"):
    return lambda w: run_cli("calibrate", w / rel, "--calib", w / "text.txt", *method, *extra, "-o", w / out)


def _plan(rel: str, *extra, method=RTN):
    return lambda w: run_cli("plan", w / rel, "--calib", w / "text.txt", *method, *extra, "--json")


def _dry(rel: str, *extra, method=RTN):
    return lambda w: run_cli("calibrate", w / rel, "--calib", w / "text.txt", *method, *extra, "--dry-run", "--json",
                             "-o", w / "out")


def _export(src: str, fmt: str, *extra, out: str = "out"):
    return lambda w: run_cli("export", w / src, "--format", fmt, *extra, "-o", w / out)


def _made(rel: str, *extra, method=RTN, out: str = "q"):
    """A setup: calibrate rel into `out` (must succeed)."""
    def setup(w: Path) -> None:
        done = run_cli("calibrate", w / rel, "--calib", w / "text.txt", *method, *extra, "-o", w / out)
        assert done.exit_code == 0, done.output[-300:]
    return setup


def _g(n: int) -> list[str]:
    return ["--group-size", str(n)]


# ---------------------------------------------------------------- A. attention and MLP geometry of dense families

DENSE = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "olmo2", "granite", "cohere", "starcoder2",
         "exaone4", "smollm3", "glm", "phi3", "stablelm", "olmo3"]

# (label, fields): configs a right run takes at group 32 (every input width a multiple of 32)
TAKEN = [
    ("one KV head (multi-query)", dict(num_key_value_heads=1)),
    ("as many KV heads as heads (no grouping)", dict(num_key_value_heads=4)),
    ("head_dim 24 (heads x head_dim 96 above hidden 64)", dict(head_dim=24)),
    ("head_dim 8 (heads x head_dim 32 below hidden 64)", dict(head_dim=8)),
    ("intermediate 96 (three groups)", dict(intermediate_size=96)),
    ("a vocabulary of 113 (prime, no multiple of 8)", dict(vocab_size=113)),
    ("one decoder layer", dict(num_hidden_layers=1)),
    ("8 heads of 8 over 1 KV head", dict(num_attention_heads=8, num_key_value_heads=1, head_dim=8)),
]

# the other command each (family, config) also goes through, in turn
def _second(rel: str, i: int):
    """(label, run, setup, check) of the i-th second command on rel."""
    options = [
        ("GPTQ: a quantized copy plain transformers loads with load_quantized's logits", _cal(rel, method=GPTQ), None,
         plain_like(model=rel, quantized=None)),
        ("plan --json equals calibrate --dry-run --json", _plan(rel), None, valid(plan_equals_dry_run(rel, *RTN))),
        ("RTN --asym --group-size 16: each linear rounded by hand, loaded by plain transformers",
         _cal(rel, "--asym", *_g(16)), None, rtn_exact(rel, group=16, sym=False)),
        ("the RTN export re-exported as fake: the same weights", _export("q", "fake"), _made(rel),
         _weights_of("out", "q")),
        ("RTN --group-size -1 (per channel): each linear rounded by hand", _cal(rel, *_g(-1)), None,
         rtn_exact(rel, group=-1)),
        ("the default method: a quantized copy plain transformers loads", _cal(rel, method=DEFAULT10), None,
         plain_like(model=rel, quantized=None)),
        ("RTN --bits 8: each linear rounded by hand", _cal(rel, "--bits", "8"), None, rtn_exact(rel, bits=8)),
        ("eval --json --seqlen 24: plain transformers' strided loss", lambda w: run_cli(
            "eval", w / rel, "--data", w / "text.txt", "--json", "--seqlen", "24", "--max-tokens", "96"), None,
         eval_like_plain(rel, "text.txt", 24, max_tokens=96, part="heldout")),
    ]
    return options[i % len(options)]


def _geometry_cases(out: Cases) -> None:
    from helpers import config_of

    add = out.add
    turn = 0
    for f, family in enumerate(DENSE):
        has_head_dim = "head_dim" in config_of(family).to_dict()
        for label, fields in TAKEN[f % 3::3]:
            if "head_dim" in fields and not has_head_dim:  # a field the family's attention does not read
                continue
            rel, setup = arch(family, **fields)
            add("arch19", f"{family}: {label}: RTN, each linear rounded by hand, the card's load",
                _cal(rel), setup, rtn_exact(rel))
            what, run, extra, check = _second(rel, turn)
            turn += 1
            add("arch19", f"{family}: {label}: {what}", run, chain(setup, extra), check)


# (label, fields, a group size dividing every width): widths group 32 does not divide
UNDIVIDED = [
    ("hidden 48 (every linear reads 48 columns)", dict(hidden_size=48, head_dim=12, intermediate_size=96), 16),
    ("head_dim 12 (o_proj reads 48 columns)", dict(head_dim=12), 16),
    ("intermediate 100 (down_proj reads 100 columns)", dict(intermediate_size=100), 4),
    ("intermediate 80 (down_proj reads 80 columns)", dict(intermediate_size=80), 16),
    ("3 heads of 16 (o_proj reads 48 columns)", dict(num_attention_heads=3, num_key_value_heads=1, head_dim=16), 16),
]


def _undivided_cases(out: Cases) -> None:
    from helpers import config_of

    add = out.add
    for i, family in enumerate(["llama", "qwen3", "gemma2", "phi3", "starcoder2", "olmo2", "mistral", "cohere"]):
        has_head_dim = "head_dim" in config_of(family).to_dict()
        for label, fields, group in UNDIVIDED[i % 5:i % 5 + 2]:
            if "head_dim" in fields and "hidden_size" not in fields and not has_head_dim:
                continue  # a field the family's attention does not read
            rel, setup = arch(family, **fields)
            for cmd, run in [("calibrate RTN", _cal(rel)), ("plan", _plan(rel)), ("calibrate --dry-run", _dry(rel)),
                             ("calibrate GPTQ", _cal(rel, method=GPTQ))]:
                add("undivided19", f"{family}: {label}, group 32: {cmd} refuses", run, setup)
            add("undivided19", f"{family}: {label}, group {group}: RTN rounded by hand",
                _cal(rel, *_g(group)), setup, rtn_exact(rel, group=group))


# ---------------------------------------------------------------- B. positions, windows, norms, heads

# (family, label, fields, eval seqlen): configs a right run takes; their eval must be plain transformers' loss
POSITIONS = [
    ("llama", "rope linear factor 2", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})),
    ("llama", "rope dynamic factor 2", dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})),
    ("llama", "rope yarn factor 4 over 32 positions", dict(rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4, "original_max_position_embeddings": 32})),
    ("llama", "rope llama3 factor 8", dict(rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})),
    ("qwen3", "rope linear factor 4 with qk-norm", dict(rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                                         "rope_theta": 1e4})),
    ("phi3", "partial rotary 0.5", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                         "partial_rotary_factor": 0.5})),
    ("stablelm", "partial rotary 0.25 (its default)", {}),
    ("glm", "partial rotary 0.5 (its default) with attention biases", {}),
    ("llama", "rope_theta 1.0", dict(rope_parameters={"rope_type": "default", "rope_theta": 1.0})),
    ("llama", "rope_theta 1e9", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e9})),
    ("mistral", "sliding window 4 under 24-token windows", dict(sliding_window=4)),
    ("qwen2", "sliding window 4 on layer 1 only (max_window_layers 1)", dict(
        use_sliding_window=True, sliding_window=4, max_window_layers=1,
        layer_types=["full_attention", "sliding_attention"])),
    ("starcoder2", "sliding window 4", dict(sliding_window=4)),
    ("gemma2", "sliding window 4, softcaps 5 and 3", dict(sliding_window=4, attn_logit_softcapping=5.0,
                                                           final_logit_softcapping=3.0)),
    ("gemma2", "layer types full then sliding (reversed)", dict(sliding_window=4,
                                                                 layer_types=["full_attention", "sliding_attention"])),
    ("gemma3_text", "every layer sliding (window 4)", dict(sliding_window=4,
                                                           layer_types=["sliding_attention", "sliding_attention"])),
    ("gemma3_text", "every layer full attention", dict(layer_types=["full_attention", "full_attention"])),
    ("olmo3", "sliding window 4 then full", dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])),
    ("exaone4", "sliding window 4 on both layers", dict(sliding_window=4,
                                                        layer_types=["sliding_attention", "sliding_attention"])),
    ("llama", "attention and MLP biases", dict(attention_bias=True, mlp_bias=True)),
    ("olmo2", "qk-norm (its default) and 1 KV head", dict(num_key_value_heads=1)),
    ("cohere", "qk-norm on (use_qk_norm)", dict(use_qk_norm=True)),
    ("llama", "max_position_embeddings 16 (the calibration length)", dict(max_position_embeddings=16)),
]


def _position_cases(out: Cases) -> None:
    add = out.add
    for family, label, fields in POSITIONS:
        rel, setup = arch(family, **fields)
        seqlen = 16 if fields.get("max_position_embeddings") == 16 else 24
        add("positions19", f"{family}: {label}: RTN, each linear rounded by hand, the card's load", _cal(rel), setup,
            rtn_exact(rel))
        add("positions19", f"{family}: {label}: eval --json = plain transformers' strided loss",
            lambda w, r=rel, s=seqlen: run_cli("eval", w / r, "--data", w / "text.txt", "--json", "--seqlen", str(s),
                                              "--max-tokens", "96"), setup,
            eval_like_plain(rel, "text.txt", seqlen, max_tokens=96, part="heldout"))
        add("positions19", f"{family}: {label}: eval of its fake RTN export = plain transformers' loss of it",
            lambda w, s=seqlen: run_cli("eval", w / "q", "--data", w / "text.txt", "--json", "--seqlen", str(s),
                                        "--max-tokens", "96"),
            chain(setup, _made(rel, "--format", "fake")), eval_like_plain("q", "text.txt", seqlen, max_tokens=96, part="heldout"))


# ---------------------------------------------------------------- C. heads, vocabularies, configs no run can take


def _head_cases(out: Cases) -> None:
    add = out.add
    for family, label, fields, kind in [
        ("llama", "untied", {}, "valid"),
        ("llama", "tied (tie_word_embeddings true)", dict(tie_word_embeddings=True), "maybe"),
        ("gemma2", "tied (its default)", {}, "maybe"),
        ("qwen3", "untied, vocabulary 113", dict(vocab_size=113), "valid"),
        ("cohere", "tied (its default), logit_scale 0.5", dict(logit_scale=0.5), "maybe"),
        ("granite", "untied, logits_scaling 4", dict(logits_scaling=4.0), "valid"),
    ]:
        rel, setup = arch(family, **fields)
        add("heads19", f"{family}: {label}: --quantize-lm-head, lm_head rounded by hand with the linears",
            _cal(rel, "--quantize-lm-head"), setup, tri(kind, rtn_exact(rel, head=True)))
        add("heads19", f"{family}: {label}: the card's load line gives load_quantized's logits",
            _cal(rel), setup, card_loads())
    for family in ("llama", "qwen3", "phi3"):
        rel, setup = arch(family, vocab_size=40)
        add("heads19", f"{family}: a vocabulary of 40 under a larger tokenizer: calibrate refuses", _cal(rel), setup)
        add("heads19", f"{family}: a vocabulary of 40 under a larger tokenizer: eval refuses",
            lambda w, r=rel: run_cli("eval", w / r, "--data", w / "text.txt", "--seqlen", "16"), setup)
    rel, setup = arch("llama", vocab_size=40)
    add("heads19", "llama: a vocabulary of 40 under a larger tokenizer: quantize() refuses",
        lambda w: quantize(w, model=str(w / rel)), setup, api=True)


# (family, label, config.json fields): configs the saved weights cannot run under
BROKEN = [
    ("llama", "3 KV heads for 4 heads", "build", dict(num_key_value_heads=3)),
    ("qwen3", "3 KV heads for 4 heads", "build", dict(num_key_value_heads=3)),
    ("llama", "num_key_value_heads 0", "edit", dict(num_key_value_heads=0)),
    ("llama", "head_dim 8 over weights made for 16", "edit", dict(head_dim=8)),
    ("qwen3", "head_dim 32 over weights made for 16", "edit", dict(head_dim=32)),
    ("llama", "rope_type 'bogus'", "edit", dict(rope_parameters={"rope_type": "bogus", "rope_theta": 1e4})),
    ("llama", "rope_type linear without its factor", "edit", dict(rope_parameters={"rope_type": "linear",
                                                                                    "rope_theta": 1e4})),
    ("llama", "rope_theta -1", "edit", dict(rope_parameters={"rope_type": "default", "rope_theta": -1.0})),
    ("gemma2", "three layer types for two layers", "edit", dict(layer_types=["sliding_attention", "full_attention",
                                                                             "full_attention"])),
    ("gemma3_text", "one layer type for two layers", "edit", dict(layer_types=["full_attention"])),
    ("gemma2", "a layer type 'bogus_attention'", "edit", dict(layer_types=["bogus_attention", "full_attention"])),
    ("olmo3", "layer_types a string", "edit", dict(layer_types="full_attention")),
    ("mistral", "sliding_window -4", "edit", dict(sliding_window=-4)),
    ("llama", "num_hidden_layers 3 over two layers' weights", "edit", dict(num_hidden_layers=3)),
    ("llama", "num_hidden_layers 0", "edit", dict(num_hidden_layers=0)),
    ("qwen3", "hidden_size 48 over weights made for 64", "edit", dict(hidden_size=48)),
    ("phi3", "partial_rotary_factor 1.5", "edit", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                                        "partial_rotary_factor": 1.5})),
    ("llama", "hidden_act 'bogus'", "edit", dict(hidden_act="bogus")),
    ("llama", "vocab_size 200 over a 120-row embedding", "edit", dict(vocab_size=200)),
    ("llama", "num_attention_heads 5 (hidden 64)", "edit", dict(num_attention_heads=5)),
]


def _broken_cases(out: Cases) -> None:
    add = out.add
    for family, label, how, fields in BROKEN:
        if how == "build":
            rel, setup = arch(family, **fields)
        else:
            rel, made = arch(family)
            rel2 = f"{rel}_edit"

            def setup(w: Path, m=made, r=rel, r2=rel2, f=fields) -> None:
                import shutil

                m(w)
                shutil.copytree(w / r, w / r2)
                _edit_config(r2, **f)(w)
            rel = rel2
        add("broken19", f"{family}: {label}: calibrate refuses", _cal(rel), setup)
        add("broken19", f"{family}: {label}: eval refuses",
            lambda w, r=rel: run_cli("eval", w / r, "--data", w / "text.txt", "--seqlen", "16"), setup)
        # plan reads config.json and headers only: a refusal, or a plan equal to the dry run's
        add("broken19", f"{family}: {label}: plan refuses or equals the dry run", _plan(rel), setup,
            _maybe(plan_equals_dry_run(rel, *RTN)))


# ---------------------------------------------------------------- D. mixtures of experts at their edges


def moe(model_type: str, **fields) -> tuple[str, Callable[[Path], None]]:
    """(folder, setup) of a tiny MoE of model_type as helpers.MOE_FIELDS builds one, fields on top."""
    from helpers import MOE_FIELDS

    base = dict(intermediate_size=32, vocab_size=64, max_position_embeddings=64) | MOE_FIELDS.get(model_type, {})
    return arch(model_type, **(base | fields))


def _mg(family: str, group: int = 32) -> list[str]:
    """DeepSeek-V3's kv_b_proj reads kv_lora_rank (16) columns: group 16 at most there."""
    return _g(min(group, 16) if family == "deepseek_v3" else group)


def _moe_cases(out: Cases) -> None:
    add = out.add
    expert_width = {"mixtral": "intermediate_size", "qwen2_moe": "moe_intermediate_size",
                    "qwen3_moe": "moe_intermediate_size", "olmoe": "intermediate_size",
                    "deepseek_v3": "moe_intermediate_size", "gpt_oss": "intermediate_size"}
    for family, key in expert_width.items():
        rel, setup = moe(family, **{key: 24})
        for cmd, run in [("calibrate RTN", _cal(rel, *_mg(family))), ("plan", _plan(rel, *_mg(family))),
                         ("calibrate --dry-run", _dry(rel, *_mg(family)))]:
            add("moe19", f"{family}: experts 24 wide ({key}), group {_mg(family)[1]}: {cmd} refuses", run, setup)
        add("moe19", f"{family}: experts 24 wide ({key}), group 8: a quantized copy plain transformers loads",
            _cal(rel, *_g(8)), setup, plain_like(model=rel, quantized="expert"))
    # (family, label, fields, kind, quantized): configs a right run takes (or, kind maybe, may refuse in one line)
    for i, (family, label, fields, kind, quantized) in enumerate([
        ("qwen3_moe", "norm_topk_prob false", dict(norm_topk_prob=False), "valid", "expert"),
        ("qwen3_moe", "norm_topk_prob true", dict(norm_topk_prob=True), "valid", "expert"),
        ("olmoe", "norm_topk_prob true", dict(norm_topk_prob=True), "valid", "expert"),
        ("qwen2_moe", "norm_topk_prob true", dict(norm_topk_prob=True), "valid", "expert"),
        ("deepseek_v3", "first_k_dense_replace 0 (every layer MoE)", dict(first_k_dense_replace=0), "valid", "expert"),
        ("deepseek_v3", "first_k_dense_replace 2 (no MoE layer at all)", dict(first_k_dense_replace=2), "maybe",
         "mlp"),
        ("deepseek_v3", "q_lora_rank null (a plain q_proj)", dict(q_lora_rank=None), "valid", "expert"),
        ("deepseek_v3", "qk_rope_head_dim 4, qk_nope_head_dim 12", dict(qk_rope_head_dim=4, qk_nope_head_dim=12,
                                                                         head_dim=4),
         "valid", "expert"),
        ("deepseek_v3", "v_head_dim 8", dict(v_head_dim=8), "valid", "expert"),
        ("deepseek_v3", "two shared experts", dict(n_shared_experts=2), "valid", "shared_experts"),
        ("qwen3_moe", "mlp_only_layers [0, 1] (no MoE layer)", dict(mlp_only_layers=[0, 1]), "maybe", "mlp"),
        ("qwen3_moe", "decoder_sparse_step 3 (no MoE layer in two)", dict(decoder_sparse_step=3), "maybe", "mlp"),
        ("qwen2_moe", "mlp_only_layers [0] (dense then MoE)", dict(mlp_only_layers=[0]), "valid", "expert"),
        ("llama4_text", "interleave_moe_layer_step 2 (dense then MoE)", dict(interleave_moe_layer_step=2), "valid",
         "expert"),
        ("llama4_text", "attention_chunk_size 4", dict(attention_chunk_size=4), "valid", "expert"),
        ("mixtral", "8 experts, top 1", dict(num_local_experts=8, num_experts_per_tok=1), "valid", "expert"),
        ("mixtral", "one KV head, head_dim 24", dict(num_key_value_heads=1, head_dim=24), "valid", "expert"),
        ("gpt_oss", "every layer full attention", dict(layer_types=["full_attention", "full_attention"]), "valid",
         "expert"),
        ("gpt_oss", "sliding window 4 on layer 0", dict(sliding_window=4,
                                                        layer_types=["sliding_attention", "full_attention"]),
         "valid", "expert"),
        ("olmoe", "one KV head", dict(num_key_value_heads=1), "valid", "expert"),
        ("qwen2_moe", "a shared expert 96 wide", dict(shared_expert_intermediate_size=96), "valid", "shared_expert."),
    ]):
        rel, setup = moe(family, **fields)
        add("moe19", f"{family}: {label}: RTN, a quantized copy plain transformers loads",
            _cal(rel, *_mg(family)), setup, tri(kind, plain_like(model=rel, quantized=quantized)))
        if i % 2:  # GPTQ on every other config: the round's time
            add("moe19", f"{family}: {label}: GPTQ, a quantized copy plain transformers loads",
                _cal(rel, *_mg(family), method=GPTQ), setup, tri(kind, plain_like(model=rel, quantized=quantized)))
        add("moe19", f"{family}: {label}: eval --json = plain transformers' strided loss",
            lambda w, r=rel: run_cli("eval", w / r, "--data", w / "text.txt", "--json", "--seqlen", "24",
                                     "--max-tokens", "72"), setup, eval_like_plain(rel, "text.txt", 24, max_tokens=72, part="heldout"))
    for family in ("qwen3_moe", "deepseek_v3", "gpt_oss"):
        rel, setup = moe(family)
        add("moe19", f"{family}: --asym --group-size 16 into gptq format: a quantized copy",
            _cal(rel, "--asym", *_g(16), "--format", "gptq"), setup, _maybe(faithful(rel, quantized="expert")))
        add("moe19", f"{family}: plan --json equals calibrate --dry-run --json (GPTQ)",
            _plan(rel, *_mg(family), method=GPTQ), setup, valid(plan_equals_dry_run(rel, *GPTQ, *_mg(family))))
        add("moe19", f"{family}: an RTN export re-exported as fake: the same weights", _export("q", "fake"),
            chain(setup, _made(rel, *_mg(family))), _weights_of("out", "q"))


# ---------------------------------------------------------------- E. VLM configs and processors at their edges

VLM_RUN = ["--method", "rtn", "--nsamples", "2", "--seqlen", "256", "--group-size", "32"]


def _vcal(model: str = "vlm", *extra):
    return lambda w: run_cli("calibrate", w / model, "--calib", w / "vl" / "data.jsonl", *VLM_RUN, *extra, "-o",
                             w / "out")


def _file_edit(rel: str, **fields) -> Callable[[Path], None]:
    """The JSON file rel (a processor or config file of a folder) with fields set (None: removed)."""
    def setup(w: Path) -> None:
        path = w / rel
        doc = json.loads(path.read_text())
        for key, value in fields.items():
            if isinstance(value, dict) and isinstance(doc.get(key), dict):
                doc[key] = {**doc[key], **value}
            elif value is None:
                doc.pop(key, None)
            else:
                doc[key] = value
        path.write_text(json.dumps(doc))
    return setup


def _token_id(w: Path, folder: str, token: str) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(w / folder).convert_tokens_to_ids(token)


def _vlm_cases(out: Cases) -> None:
    add = out.add
    from fault_round18 import _save_vlm

    llava = built("vlm19_llava", _save_vlm("llava"))
    for label, setup, kind in [
        ("image_token_id 9999 (past the vocabulary)", _file_edit("vlm/config.json", image_token_id=9999), "bad"),
        ("image_token_id -1", _file_edit("vlm/config.json", image_token_id=-1), "bad"),
        ("image_token_id the id of the word 'red'",
         lambda w: _file_edit("vlm/config.json", image_token_id=_token_id(w, "vlm", "red"))(w), "bad"),
        ("vision_start_token_id 9999", _file_edit("vlm/config.json", vision_start_token_id=9999), "maybe"),
        ("the image processor's patch_size 7 (the tower's 14)",
         _file_edit("vlm/processor_config.json", image_processor={"patch_size": 7}), "bad"),
        ("the image processor's merge_size 1 (the tower merges 2)",
         _file_edit("vlm/processor_config.json", image_processor={"merge_size": 1}), "bad"),
        ("the image processor's temporal_patch_size 1 (the tower's 2)",
         _file_edit("vlm/processor_config.json", image_processor={"temporal_patch_size": 1}), "bad"),
        ("the image processor's max_pixels 28 x 28 (4 patches: one merged token)",
         _file_edit("vlm/processor_config.json", image_processor={
             "size": {"shortest_edge": 784, "longest_edge": 784}}), "maybe"),
        ("text_config vocab_size 20 under the tokenizer's ids", _file_edit("vlm/config.json",
                                                                          text_config={"vocab_size": 20}), "bad"),
        ("vision_config spatial_merge_size 4 over a tower made for 2",
         _file_edit("vlm/config.json", vision_config={"spatial_merge_size": 4}), "bad"),
        ("mrope_section [4, 2, 2] (sums past head_dim/2)",
         _file_edit("vlm/config.json", text_config={"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                                        "mrope_section": [4, 2, 2]}}), "bad"),
    ]:
        add("vlm19", f"qwen2_vl: {label}: calibrate on image-text records", _vcal(), setup,
            tri(kind, vlm_faithful("vlm")))
    for label, setup, kind in [
        ("image_token_id 9999", _file_edit("vlm19_llava/config.json", image_token_id=9999), "bad"),
        ("vision_feature_layer -3 (the embeddings of a 2-layer tower)",
         _file_edit("vlm19_llava/config.json", vision_feature_layer=-3), "maybe"),
        ("vision_feature_layer 0 (transformers' own forward fails on it)", _file_edit("vlm19_llava/config.json", vision_feature_layer=0),
         "bad"),
        ("vision_feature_select_strategy full (one more token per image than the processor gives)",
         _file_edit("vlm19_llava/config.json", vision_feature_select_strategy="full"), "bad"),
        ("the processor's patch_size 7", _file_edit("vlm19_llava/processor_config.json", patch_size=7), "bad"),
        ("image_seq_length 99 in the config", _file_edit("vlm19_llava/config.json", image_seq_length=99), "maybe"),
    ]:
        add("vlm19", f"llava: {label}: calibrate on image-text records", _vcal("vlm19_llava"),
            chain(llava, setup), tri(kind, vlm_faithful("vlm19_llava")))
    add("vlm19", "qwen2_vl: --quantize-vision --group-size 16 --asym: the tower quantized too",
        _vcal("vlm", "--quantize-vision", *_g(16), "--asym"), None, valid(vlm_faithful("vlm", must="visual")))
    add("vlm19", "llava: --quantize-vision: the tower quantized too", _vcal("vlm19_llava", "--quantize-vision"),
        llava, valid(vlm_faithful("vlm19_llava", must="vision_tower")))
    add("vlm19", "qwen2_vl: plan --json equals calibrate --dry-run --json",
        lambda w: run_cli("plan", w / "vlm", "--calib", w / "vl" / "data.jsonl", *VLM_RUN, "--json"), None,
        valid(plan_equals_dry_run("vlm", *VLM_RUN)))


def nineteenth_round() -> list:
    """Round 19's cases."""
    out = Cases()
    for part in (_geometry_cases, _undivided_cases, _position_cases, _head_cases, _broken_cases, _moe_cases,
                 _vlm_cases):
        part(out)
    return out
