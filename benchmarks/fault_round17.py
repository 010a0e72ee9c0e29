"""Round 17 of the fault battery (issue #22): a fresh set by another hand, run by fault_battery.py --rounds 17.

Areas and inputs none of rounds 1-16 tried in these forms. (A) model folders in odd but real states: checkpoints
already quantized as other toolkits ship them (AWQ gemm tensors, bitsandbytes nf4/int8 tensors, FP8 compressed-
tensors and DeepSeek-style block FP8 with their scales, quantkit's own GPTQ and W8A8 exports as the model of plan,
importance, qid measure and --low-memory) and configs naming quantizers this machine lacks (HQQ, Quanto, torchao,
MXFP4, AQLM, EETQ) over float weights; pytorch_model.bin sharded, in the legacy serialization, wrapped in a
training checkpoint's dict, with DDP "module." names, as a pickled module, holding NaN or int32, and a model split
across model.safetensors and a .bin; bf16 checkpoints whose values overflow the float16 their config names, float16
under a bfloat16 config, files mixing dtypes; auto_map configs with code beside them that must never run; shard
indexes spelled oddly (./ prefixes, sub-folders, other shard names, a BOM, a wrong total_size); tied embeddings
stored or stated oddly; tokenizers without any special token, with truncation or padding switched on inside
tokenizer.json, a post-processor, a slow-only WordPiece vocab.txt, odd model_max_length and truncation_side, a
chat_template.jinja that raises, and tokenizer files that disagree. (B) the output streams and the process: stdout
a pipe closed at once or after one byte, stdin closed, stderr a full device or closed, `--json` on every refusal
(stdout empty) and every success (one JSON object), tqdm's and the terminal's environment variables, a read-only
HOME under qid plot, a hub id cached in HF_HUB_CACHE offline and hub ids under HF_HUB_OFFLINE for every command.
(C) distributed and memory modes: --nproc 2 with MASTER_PORT taken or odd, torchrun variables of another rank, a
rank killed or stopped mid-run, --offload-dir filling, read-only, a symlink, nested, holding the user's files, shared
by two runs at once, emptied or changed before a --resume.
Each case says what a right program does: refuse (one line, exit 2 / one QuantkitError, nothing left behind),
"maybe" (a refusal or a checked success), or "valid" (must be taken, and its result checked).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from fault_battery import (
    EV,
    GPTQ,
    QUANTKIT_BIN,
    RTN,
    Cases,
    Ran,
    _maybe,
    cal_ref,
    child,
    eval_ok,
    export_ok,
    failing_after_first_layer,
    faithful,
    json_edit,
    last_wins,
    loss_of,
    mount_tmpfs,
    quantize,
    same_as,
    set_ok,
    tree,
    tri,
    valid,
)
from helpers import WORDS, save_tiny_llama
from helpers import run_cli as raw_cli

LOW = [*GPTQ, "--low-memory"]


def _mount(rel: str, size: str = "16k", readonly: bool = False):
    """mount_tmpfs, recorded where the running battery (__main__) unmounts it."""
    import fault_battery

    def setup(w: Path) -> None:
        mount_tmpfs(rel, size, readonly=readonly)(w)
        main = sys.modules.get("__main__")
        if getattr(main, "MOUNTS", None) is not None and main.MOUNTS is not fault_battery.MOUNTS:
            main.MOUNTS.append(fault_battery.MOUNTS.pop())
    return setup


# ---------------------------------------------------------------- model folders: setups

def _copy(src: str = "model", dst: str = "m"):
    def setup(w: Path) -> None:
        shutil.copytree(w / src, w / dst)
    return setup


def _edit_m(edit, rel: str = "m", fresh: bool = True):
    """A setup: m/ (a copy of model/ unless fresh is False) whose model.safetensors is `edit(state)`-ed (the edit
    may write other files itself and return the state to save, or None to drop model.safetensors)."""
    def setup(w: Path) -> None:
        from safetensors.torch import load_file, save_file

        if fresh:
            shutil.copytree(w / "model", w / rel)
        path = w / rel / "model.safetensors"
        state = edit(w, load_file(path))
        if state is None:
            path.unlink()
        else:
            save_file({k: v.contiguous() for k, v in state.items()}, path, metadata={"format": "pt"})
    return setup


def _cfg_m(**fields):
    def edit(d: dict) -> None:
        for k, v in fields.items():
            if v is ...:
                d.pop(k, None)
            else:
                d[k] = v
    return lambda w: json_edit("m/config.json", edit)(w)


def _both(*setups):
    def setup(w: Path) -> None:
        for s in setups:
            s(w)
    return setup


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _linear_keys(state: dict) -> list[str]:
    return [k for k in state if k.endswith(".weight") and any(f".{n}." in k for n in LINEARS)]


def _awq(w: Path, state: dict) -> dict:
    """AWQ gemm layout (qweight [in, out/8] int32, qzeros, scales fp16), the float weights gone."""
    gen = torch.Generator().manual_seed(0)
    for k in _linear_keys(state):
        out_f, in_f = state.pop(k).shape
        base = k[: -len(".weight")]
        state[f"{base}.qweight"] = torch.randint(-2**31, 2**31 - 1, (in_f, out_f // 8), generator=gen, dtype=torch.int32)
        state[f"{base}.qzeros"] = torch.randint(-2**31, 2**31 - 1, (in_f // 32, out_f // 8), generator=gen,
                                                dtype=torch.int32)
        state[f"{base}.scales"] = (torch.rand(in_f // 32, out_f, generator=gen) * 0.01).half()
    json_edit("m/config.json", lambda d: d.update(quantization_config={
        "quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}))(w)
    return state


def _deq_folder(w: Path, deq: dict) -> None:
    """deq/: model/ with these (dequantized) tensors in float32: the reference of a re-quantized checkpoint."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(w / "model", w / "deq")
    full = load_file(w / "deq" / "model.safetensors")
    full.update({k: v.float().contiguous() for k, v in deq.items()})
    save_file(full, w / "deq" / "model.safetensors", metadata={"format": "pt"})


def _bnb4(w: Path, state: dict) -> dict:
    """bitsandbytes nf4 as transformers serializes it (uint8 codes, absmax, quant_map, the packed quant state)."""
    import bitsandbytes.functional as F

    deq = {}
    for k in _linear_keys(state):
        weight = state.pop(k)
        codes, qs = F.quantize_4bit(weight, quant_type="nf4", blocksize=64)
        deq[k] = F.dequantize_4bit(codes, qs)
        state[k] = codes
        for name, value in qs.as_dict(packed=True).items():
            state[f"{k}.{name}"] = value
    _deq_folder(w, deq)
    json_edit("m/config.json", lambda d: d.update(quantization_config={
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_compute_dtype": "float32", "bnb_4bit_use_double_quant": False}))(w)
    return state


def _bnb8(w: Path, state: dict) -> dict:
    """bitsandbytes LLM.int8 as serialized (int8 weight, SCB row scales)."""
    deq = {}
    for k in _linear_keys(state):
        weight = state.pop(k)
        scb = weight.abs().amax(dim=1).clamp_min(1e-8)
        codes = torch.round(weight / scb[:, None] * 127).to(torch.int8)
        deq[k] = codes.float() * scb[:, None] / 127
        state[k], state[k[: -len("weight")] + "SCB"] = codes, scb
    _deq_folder(w, deq)
    json_edit("m/config.json", lambda d: d.update(quantization_config={
        "quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False}))(w)
    return state


def _fp8_ct(w: Path, state: dict) -> dict:
    """compressed-tensors float-quantized FP8 (per-channel weight_scale), as llm-compressor's FP8 scheme writes."""
    deq = {}
    for k in _linear_keys(state):
        weight = state.pop(k)
        scale = (weight.abs().amax(dim=1, keepdim=True) / 448.0).clamp_min(1e-12)
        codes = (weight / scale).to(torch.float8_e4m3fn)
        deq[k] = codes.float() * scale
        state[k], state[k[: -len("weight")] + "weight_scale"] = codes, scale
    _deq_folder(w, deq)
    json_edit("m/config.json", lambda d: d.update(quantization_config={
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "ignore": ["lm_head"], "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
            "input_activations": None, "output_activations": None}}}))(w)
    return state


def _fp8_block(w: Path, state: dict) -> dict:
    """DeepSeek-style block FP8 (quant_method fp8, weight_block_size 16x16, weight_scale_inv per block)."""
    deq = {}
    for k in _linear_keys(state):
        weight = state.pop(k)
        o, i = weight.shape
        blocks = weight.reshape(o // 16, 16, i // 16, 16)
        scale = (blocks.abs().amax(dim=(1, 3)) / 448.0).clamp_min(1e-12)
        codes = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
        deq[k] = (codes.float() * scale[:, None, :, None]).reshape(o, i)
        state[k], state[k + "_scale_inv"] = codes.reshape(o, i), scale
    _deq_folder(w, deq)
    json_edit("m/config.json", lambda d: d.update(quantization_config={
        "quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [16, 16]}))(w)
    return state


def _raw_state(folder: Path) -> dict:
    """Every tensor stored in a model folder (safetensors and .bin files), as stored."""
    from safetensors.torch import load_file

    state = {}
    for p in sorted(folder.rglob("*.safetensors")):
        state.update(load_file(p))
    for p in sorted(folder.rglob("*.bin")):
        state.update(torch.load(p, map_location="cpu", weights_only=True))
    return state


def faithful_file(model: str, rel: str = "out", min_corr: float = 0.9, stored: str | None = None):
    """A check independent of transformers' loading: load_quantized(rel) finite, and each tensor the folder
    `stored` (default: model) holds, read as stored and cast to float32, equal to the export's or correlated with
    it at >= min_corr; some differ (something was quantized)."""
    def check(w: Path, result) -> str | None:
        import quantkit

        bad = export_ok(rel)(w, result)
        if bad:
            return bad
        ours = quantkit.load_quantized(w / rel).state_dict()
        raw = _raw_state(w / (stored or model))
        changed = 0
        for k, v in raw.items():
            if k not in ours:
                return f"{k} of the checkpoint is not in the export"
            x, y = ours[k].float().flatten(), v.float().flatten()
            if x.shape != y.shape:
                return f"{k}: shape {tuple(ours[k].shape)} vs the file's {tuple(v.shape)}"
            if not torch.isfinite(y).all() or torch.equal(x, y):
                continue
            changed += 1
            corr = torch.corrcoef(torch.stack([x, y]))[0, 1].item()
            if not corr >= min_corr:
                return f"{k} is not a copy of the stored tensor (correlation {corr:.3f})"
        return None if changed else "nothing was quantized"
    return check


def _bin(kind: str):
    """A setup: m/ with its weights in pytorch_model.bin of `kind`, model.safetensors gone."""
    def edit(w: Path, state: dict):
        folder = w / "m"
        if kind == "sharded":
            keys = sorted(state)
            half = len(keys) // 2
            names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
            weight_map = {}
            for name, part in zip(names, (keys[:half], keys[half:])):
                torch.save({k: state[k] for k in part}, folder / name)
                weight_map.update({k: name for k in part})
            (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        elif kind == "legacy":
            torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
        elif kind == "wrapped":
            torch.save({"state_dict": state, "epoch": 3, "global_step": 1200}, folder / "pytorch_model.bin")
        elif kind == "ddp":
            torch.save({f"module.{k}": v for k, v in state.items()}, folder / "pytorch_model.bin")
        elif kind == "pickled module":
            from transformers import AutoModelForCausalLM

            torch.save(AutoModelForCausalLM.from_pretrained(w / "model"), folder / "pytorch_model.bin")
        elif kind == "nan":
            state["model.layers.1.mlp.up_proj.weight"][3, 3] = float("nan")
            torch.save(state, folder / "pytorch_model.bin")
        elif kind == "int32":
            state["model.layers.0.self_attn.o_proj.weight"] = (state["model.layers.0.self_attn.o_proj.weight"] * 100
                                                               ).to(torch.int32)
            torch.save(state, folder / "pytorch_model.bin")
        elif kind == "fp16":
            torch.save({k: v.half() for k, v in state.items()}, folder / "pytorch_model.bin")
        elif kind == "split":  # layer 1 in a .bin, the rest in model.safetensors, no index
            torch.save({k: v for k, v in state.items() if ".layers.1." in k}, folder / "pytorch_model.bin")
            return {k: v for k, v in state.items() if ".layers.1." not in k}
        elif kind == "index to a bin":  # a safetensors index whose second shard is named .bin
            from safetensors.torch import save_file

            first = {k: v for k, v in state.items() if ".layers.1." not in k}
            save_file(first, folder / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
            torch.save({k: v for k, v in state.items() if ".layers.1." in k}, folder / "model-00002-of-00002.bin")
            (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
                k: "model-00001-of-00002.safetensors" if k in first else "model-00002-of-00002.bin" for k in state}}))
        return None
    return _edit_m(edit)


def _bf16_big(w: Path, state: dict) -> dict:
    """bf16 tensors with a down_proj value of 1e5 (past float16's 65504), the config saying float16."""
    state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    state["model.layers.0.mlp.down_proj.weight"][0, 0] = 1e5
    json_edit("m/config.json", lambda d: d.update(torch_dtype="float16", dtype="float16"))(w)
    return state


def _to(dtype, cfg: str | None = "keep", mixed: bool = False):
    def edit(w: Path, state: dict) -> dict:
        out = {k: v.to(torch.float16 if mixed and i % 2 else dtype) for i, (k, v) in enumerate(sorted(state.items()))}
        if cfg != "keep":
            json_edit("m/config.json", lambda d: (d.pop("torch_dtype", None), d.pop("dtype", None)) if cfg is None
                      else d.update(torch_dtype=cfg, dtype=cfg))(w)
        return out
    return edit


EVIL = "open(__import__('os').path.join(__import__('os').path.dirname(__file__), '..', 'RAN'), 'w').write('x')\n"


def _auto_map(model_type: str | None):
    """m/ whose config names remote code (auto_map) in files beside it that write RAN when imported; model_type
    kept (llama: transformers has the class) or replaced by one transformers does not know."""
    def setup(w: Path) -> None:
        shutil.copytree(w / "model", w / "m")
        for name in ("configuration_evil.py", "modeling_evil.py"):
            (w / "m" / name).write_text(EVIL)

        def edit(d: dict) -> None:
            d["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                             "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
            if model_type:
                d["model_type"] = model_type
                d["architectures"] = ["EvilForCausalLM"]
        json_edit("m/config.json", edit)(w)
    return setup


def _no_run(w: Path, result) -> str | None:
    return "the folder's own Python ran (RAN written)" if (w / "RAN").exists() else None


def _shards(variant: str):
    """m/ as two shards + index, spelled `variant`."""
    def edit(w: Path, state: dict):
        from safetensors.torch import save_file

        folder = w / "m"
        names = {"plain": ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"),
                 "other names": ("part-a.safetensors", "part-b.safetensors"),
                 "sub-folder": ("shards/a.safetensors", "shards/b.safetensors")}.get(
            variant, ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"))
        first = {k: v for k, v in state.items() if ".layers.1." not in k}
        second = {k: v for k, v in state.items() if ".layers.1." in k}
        for name, part in zip(names, (first, second)):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in part.items()}, folder / name, metadata={"format": "pt"})
        prefix = "./" if variant == "./ prefix" else ""
        doc = {"metadata": {"total_size": 1 if variant == "total_size 1" else
                            sum(v.numel() * v.element_size() for v in state.values())},
               "weight_map": {k: prefix + (names[0] if k in first else names[1]) for k in sorted(state)}}
        if variant == "extra keys":
            doc["format"], doc["metadata"]["producer"] = "pt", "a trainer"
        text = json.dumps(doc, indent=2)
        (folder / "model.safetensors.index.json").write_text(("\ufeff" if variant == "BOM" else "") + text)
        return None
    return _edit_m(edit)


def _tied(w: Path, state: dict, keep: str = "both") -> dict:
    """A tied model: lm_head equal to the embedding, tie_word_embeddings true; keep: which of the two is stored."""
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    if keep == "lm_head":
        state.pop("model.embed_tokens.weight")
    elif keep == "embed":
        state.pop("lm_head.weight")
    json_edit("m/config.json", lambda d: d.update(tie_word_embeddings=True))(w)
    return state


def _embed_kept(w: Path, result) -> str | None:
    """The export's input embedding equals the model's stored one (a tied lm_head's quantization must not reach
    the embedding's rows)."""
    import quantkit

    bad = export_ok()(w, result)
    if bad:
        return bad
    ours = quantkit.load_quantized(w / "out").get_input_embeddings().weight.detach().float()
    raw = _raw_state(w / "m")
    want = raw.get("model.embed_tokens.weight", raw.get("lm_head.weight")).float()
    return None if torch.equal(ours, want) else "the input embedding is not the stored one (quantized with the head?)"


# ---------------------------------------------------------------- tokenizers

def _tokjson(edit):
    """m/ whose tokenizer.json is edited in place."""
    def setup(w: Path) -> None:
        shutil.copytree(w / "model", w / "m")
        json_edit("m/tokenizer.json", edit)(w)
    return setup


def _tokcfg(**fields):
    def setup(w: Path) -> None:
        shutil.copytree(w / "model", w / "m")
        json_edit("m/tokenizer_config.json", lambda d: d.update(fields))(w)
    return setup


def _no_specials(w: Path) -> None:
    """m/ with a tokenizer of the same words and no special token at all (no unk, eos, bos, pad)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(w / "model", w / "m")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (w / "m" / name).unlink(missing_ok=True)
    vocab = {t: i for i, t in enumerate(["u0", "u1", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="u0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(w / "m")


def _bert_slow(w: Path) -> None:
    """m/ with only a slow WordPiece vocab.txt (BertTokenizer, no tokenizer.json) over the same 62 entries."""
    shutil.copytree(w / "model", w / "m")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (w / "m" / name).unlink(missing_ok=True)
    (w / "m" / "vocab.txt").write_text("\n".join(["[UNK]", "[SEP]", *WORDS]) + "\n")
    (w / "m" / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizer", "do_lower_case": True, "unk_token": "[UNK]", "sep_token": "[SEP]",
        "cls_token": "[SEP]", "pad_token": "[UNK]", "mask_token": "[UNK]", "model_max_length": 64}))


def _gpt2_slow_beside(w: Path) -> None:
    """m/ with GPT-2 slow files (vocab.json/merges.txt of another vocabulary) beside its tokenizer.json."""
    shutil.copytree(w / "model", w / "m")
    (w / "m" / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate("abcdefghij")}))
    (w / "m" / "merges.txt").write_text("#version: 0.2\na b\n")


def _chat_jinja(template: str):
    def setup(w: Path) -> None:
        shutil.copytree(w / "model", w / "m")
        (w / "m" / "chat_template.jinja").write_text(template)
        rows = [{"messages": [{"role": "user", "content": " ".join(WORDS[i:i + 8])},
                              {"role": "assistant", "content": " ".join(WORDS[i + 8:i + 16])}]} for i in range(6)]
        (w / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return setup


# ---------------------------------------------------------------- A. the cases

def _m_cal(*extra, model: str = "m", method=RTN):
    return lambda w: raw_cli("calibrate", w / model, "--calib", w / "text.txt", *method, *extra, "-o", w / "out")


def _m_plan(model: str = "m", method=GPTQ):
    return lambda w: raw_cli("plan", w / model, "--calib", w / "text.txt", *method, "--json")


def _m_eval(model: str = "m"):
    return lambda w: raw_cli("eval", w / model, "--data", w / "text.txt", *EV)


def _m_imp(model: str = "m"):
    return lambda w: raw_cli("importance", w / model, "--calib", w / "text.txt", "--nsamples", "2", "--seqlen", "16",
                             "-o", w / "set")


def _m_api(model: str = "m", **kw):
    return lambda w: quantize(w, model=str(w / model), **kw)


def _plan_ok(w: Path, result) -> str | None:
    doc = json.loads(result.stdout)
    return None if isinstance(doc, dict) and doc.get("ranks") else f"no ranks in the plan: {result.stdout[:120]!r}"


def _eval_vs(ref_model: str, tol: float = 1e-4):
    """A check: the eval's loss equals eval of ref_model (the same weights in another form) within tol."""
    def check(w: Path, result) -> str | None:
        bad = eval_ok(w, result)
        if bad:
            return bad
        other = raw_cli("eval", w / ref_model, "--data", w / "text.txt", *EV)
        if other.exit_code != 0:
            return f"the reference eval failed: {other.output[-160:]}"
        a, b = loss_of(result.output), loss_of(other.output)
        return None if abs(a - b) <= tol else f"loss {a} vs {ref_model}'s {b}"
    return check


def _ref_low():
    return same_as(cal_ref("--low-memory", method=GPTQ))


def _model_cases(out: Cases) -> None:
    add = out.add
    # already-quantized checkpoints, as other toolkits ship them
    for label, edit, kind, deq in [
        ("an AWQ gemm checkpoint (qweight/qzeros/scales, autoawq not installed)", _awq, "bad", False),
        ("a bitsandbytes nf4 checkpoint (uint8 codes, absmax, quant_map)", _bnb4, "maybe", True),
        ("a bitsandbytes int8 checkpoint (int8 weight, SCB)", _bnb8, "maybe", True),
        ("an FP8 compressed-tensors checkpoint (float-quantized, per-channel scales)", _fp8_ct, "maybe", True),
        ("a block-FP8 checkpoint (quant_method fp8, weight_scale_inv per 16x16 block)", _fp8_block, "maybe", True),
    ]:
        setup = _edit_m(edit)
        good = faithful("deq") if deq else None
        add("model17", f"calibrate of {label}", _m_cal(), setup, tri(kind, good) if good else None)
        add("model17", f"calibrate --low-memory of {label}", _m_cal(method=LOW), setup,
            tri(kind, good) if good else None)
        add("model17", f"plan of {label}", _m_plan(), setup, tri(kind, _plan_ok) if deq else None)
        add("model17", f"eval of {label}", _m_eval(), setup, tri(kind, _eval_vs("deq", 2e-2)) if deq else None)
        add("model17", f"importance of {label}", _m_imp(), setup, tri(kind, set_ok()) if deq else None)
        add("model17", f"API quantize of {label}", _m_api(), setup, tri(kind, faithful("deq")) if deq else None,
            api=True)
    # quantizers this machine does not have, named over float weights
    for method, extra in [("hqq", {"nbits": 4, "group_size": 32}), ("quanto", {"weights": "int4"}),
                          ("torchao", {"quant_type": "int4_weight_only"}), ("mxfp4", {}), ("aqlm", {}),
                          ("eetq", {"weights": "int8"})]:
        setup = _both(_copy(), _cfg_m(quantization_config={"quant_method": method, **extra}))
        add("model17", f"calibrate of a config naming quant_method {method} (float weights)", _m_cal(), setup)
        add("model17", f"plan of a config naming quant_method {method}", _m_plan(), setup)
        if method in ("hqq", "mxfp4"):  # eval of the float weights it holds is a right answer too
            add("model17", f"eval of a config naming quant_method {method}", _m_eval(), setup,
                _maybe(_eval_vs("model", 1e-4)))
    # quantkit's own exports handed back as the model
    for rel, label in (("gptq", "the GPTQ export"), ("a8", "the W8A8 export")):
        add("model17", f"plan of {label} as the model", _m_plan(model=rel), None)
        add("model17", f"importance of {label} as the model", _m_imp(model=rel), None)
        add("model17", f"calibrate --low-memory of {label} as the model", _m_cal(model=rel, method=LOW), None)
        add("model17", f"API quantize of {label} as the model", _m_api(model=rel), None, api=True)
    add("model17", "qid measure of the GPTQ export as the model", lambda w: raw_cli(
        "qid", "measure", w / "gptq", "--eval", w / "text.txt", "--eval-tokens", "64", "--eval-seqlen", "16",
        "--methods", "rtn", "--bits", "4", "--nsamples", "2", "--calib-seqlen", "16", "--group-size", "32",
        "--tokens", "1e9", "--no-progress", "-o", w / "m.csv"), None)

    # pytorch_model.bin in the forms training code leaves
    for kind, check_cal, check_eval in [
        ("sharded", _maybe(same_as(cal_ref(), must_take=False)), _maybe(_eval_vs("model", 1e-6))),
        ("legacy", _maybe(same_as(cal_ref(), must_take=False)), _maybe(_eval_vs("model", 1e-6))),
        ("fp16", _maybe(faithful_file("m")), None),
        ("wrapped", None, None), ("ddp", None, None), ("pickled module", None, None), ("nan", None, None),
        ("int32", None, None), ("split", None, None), ("index to a bin", _maybe(same_as(cal_ref(), must_take=False)),
                                                       None),
    ]:
        setup = _bin(kind)
        add("bin17", f"calibrate of pytorch_model.bin {kind}", _m_cal(), setup, check_cal)
        if kind not in ("fp16", "int32"):
            add("bin17", f"eval of pytorch_model.bin {kind}", _m_eval(), setup, check_eval)
        if kind in ("sharded", "nan", "split", "wrapped"):
            add("bin17", f"calibrate --low-memory of pytorch_model.bin {kind}", _m_cal(method=LOW), setup,
                _maybe(_ref_low()) if kind == "sharded" else None)
            # plan reads config.json and safetensors headers, never the weights (documented): a NaN or a .bin's
            # wrapping it cannot see is no fault of plan's; the split's layer count it can
            add("bin17", f"plan of pytorch_model.bin {kind}", _m_plan(), setup,
                None if kind == "split" else _maybe(_plan_ok))
        if kind in ("nan", "ddp"):
            add("bin17", f"API quantize of pytorch_model.bin {kind}", _m_api(), setup, None, api=True)

    # dtypes the config names and the tensors hold
    for label, edit, extra, kind in [
        ("bf16 tensors holding 1e5 under a float16 config", _bf16_big, (), "maybe"),
        ("bf16 tensors holding 1e5 under a float16 config, --low-memory", _bf16_big, ("--low-memory",), "maybe"),
        ("bf16 tensors, --dtype float16 with a 1e5 value", lambda w, s: {**_bf16_big(w, s)}, ("--dtype", "float16"),
         "maybe"),
        ("float16 tensors under a bfloat16 config", _to(torch.float16, "bfloat16"), (), "valid"),
        ("tensors alternating bfloat16 and float16 (config bfloat16)", _to(torch.bfloat16, "bfloat16", mixed=True), (),
         "valid"),
        ("bfloat16 tensors, no dtype in the config", _to(torch.bfloat16, None), (), "valid"),
        ("float32 tensors under a float64 config", _to(torch.float32, "float64"), (), "maybe"),
        ("bfloat16 tensors, --low-memory", _to(torch.bfloat16, "bfloat16"), ("--low-memory",), "valid"),
    ]:
        method = GPTQ if "--low-memory" in extra else RTN
        add("dtype17", f"calibrate of {label}", _m_cal(*extra, method=method), _edit_m(edit),
            tri(kind, faithful_file("m")))
    add("dtype17", "config dtype bfloat16 and torch_dtype float16 (float32 tensors)", _m_cal(),
        _both(_copy(), _cfg_m(dtype="bfloat16", torch_dtype="float16")), _maybe(faithful_file("m")))
    add("dtype17", "eval of bf16 tensors holding 1e5 under a float16 config", _m_eval(), _edit_m(_bf16_big),
        _maybe(eval_ok))

    # auto_map: code beside the model must never run
    for mt, kind in ((None, "valid"), ("evil_lm", "bad")):
        label = "auto_map beside a llama config (transformers has the class)" if mt is None else \
            "auto_map with an unknown model_type (remote code only)"
        setup = _auto_map(mt)
        good = (lambda w, r: _no_run(w, r) or same_as(cal_ref())(w, r)) if kind == "valid" else None
        add("code17", f"calibrate: {label}", _m_cal(), setup, tri(kind, good))
        add("code17", f"plan: {label}", _m_plan(), setup, tri(kind, lambda w, r: _no_run(w, r) or _plan_ok(w, r)))
        add("code17", f"eval: {label}", _m_eval(), setup, tri(kind, lambda w, r: _no_run(w, r) or eval_ok(w, r)))
        add("code17", f"importance: {label}", _m_imp(), setup, tri(kind, lambda w, r: _no_run(w, r) or set_ok()(w, r)))
        add("code17", f"API: {label}", _m_api(), setup, tri(kind, lambda w, r: _no_run(w, r) or faithful("model")(w, r)),
            api=True)

    # shard indexes spelled oddly
    for variant, kind in (("./ prefix", "maybe"), ("sub-folder", "maybe"), ("other names", "valid"),
                          ("BOM", "maybe"), ("total_size 1", "valid"), ("extra keys", "valid")):
        setup = _shards(variant)
        add("shard17", f"calibrate of shards, index {variant}", _m_cal(), setup,
            tri(kind, same_as(cal_ref(), must_take=kind == "valid")))
        add("shard17", f"calibrate --low-memory of shards, index {variant}", _m_cal(method=LOW), setup,
            tri(kind, same_as(cal_ref("--low-memory", method=GPTQ), must_take=kind == "valid")))
        add("shard17", f"plan of shards, index {variant}", _m_plan(), setup, tri(kind, _plan_ok))

    # tied embeddings stored or stated oddly
    for label, edit, extra, kind, check in [
        ("tied, both stored equal", lambda w, s: _tied(w, s), (), "valid", faithful_file("m")),
        ("tied, only lm_head stored", lambda w, s: _tied(w, s, "lm_head"), (), "maybe", _embed_kept),
        ("tied, only the embedding stored, --quantize-lm-head", lambda w, s: _tied(w, s, "embed"),
         ("--quantize-lm-head",), "maybe", _embed_kept),
        ("tied, both stored, --quantize-lm-head --low-memory", lambda w, s: _tied(w, s), ("--quantize-lm-head",
                                                                                           "--low-memory"), "maybe",
         _embed_kept),
        ("tied, only the embedding stored, --low-memory", lambda w, s: _tied(w, s, "embed"), ("--low-memory",),
         "valid", _embed_kept),
    ]:
        method = GPTQ if "--low-memory" in extra else RTN
        add("tie17", f"calibrate: {label}", _m_cal(*extra, method=method), _edit_m(edit), tri(kind, check))
    add("tie17", "config tie_word_embeddings 'false' (a string)", _m_cal(),
        _both(_copy(), _cfg_m(tie_word_embeddings="false")), _maybe(same_as(cal_ref(), must_take=False)))


def _tok_cases(out: Cases) -> None:
    add = out.add
    same = lambda: same_as(cal_ref(), must_take=True)  # noqa: E731
    cases = [
        ("no special token at all (no unk, eos, bos, pad)", _no_specials, "valid", faithful("m")),
        ("tokenizer.json with truncation on at 4 tokens", _tokjson(lambda d: d.update(truncation={
            "direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0})), "valid", same()),
        ("tokenizer.json with padding on to 128", _tokjson(lambda d: d.update(padding={
            "strategy": {"Fixed": 128}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
            "pad_type_id": 0, "pad_token": "<unk>"})), "valid", same()),
        ("tokenizer.json post-processor appending <eos>", _tokjson(lambda d: d.update(post_processor={
            "type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}},
                                                     {"SpecialToken": {"id": "<eos>", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}}],
            "special_tokens": {"<eos>": {"id": "<eos>", "ids": [1], "tokens": ["<eos>"]}}})), "maybe",
         faithful("m")),
        ("a slow-only WordPiece vocab.txt (BertTokenizer, no tokenizer.json)", _bert_slow, "valid", faithful("m")),
        ("tokenizer_class LlamaTokenizerFast over a word-level tokenizer.json", _tokcfg(
            tokenizer_class="LlamaTokenizerFast"), "maybe", faithful("m")),
        ("model_max_length 10**30 (transformers' 'no limit')", _tokcfg(model_max_length=int(1e30)), "valid", same()),
        ("model_max_length 0", _tokcfg(model_max_length=0), "maybe", same_as(cal_ref(), must_take=False)),
        ("truncation_side and padding_side left", _tokcfg(truncation_side="left", padding_side="left"), "valid",
         same()),
        ("special_tokens_map eos w5 against tokenizer_config eos <eos>", lambda w: (
            _tokcfg(eos_token="<eos>")(w), (w / "m" / "special_tokens_map.json").write_text(json.dumps(
                {"eos_token": "w5", "unk_token": "<unk>"}))), "maybe", faithful("m")),
        ("added_tokens_decoder naming id 1 <pad> where tokenizer.json has <eos>", _tokcfg(added_tokens_decoder={
            "1": {"content": "<pad>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                  "special": True}}), "maybe", faithful("m")),
        ("GPT-2 slow files of another vocabulary beside tokenizer.json", _gpt2_slow_beside, "maybe",
         same_as(cal_ref(), must_take=False)),
    ]
    for label, setup, kind, check in cases:
        add("tok17", f"calibrate: {label}", _m_cal(), setup, tri(kind, check))
        if kind == "valid" or label.startswith(("model_max_length 0", "tokenizer.json post")):
            # the same ids as the model's own tokenizer where only its settings changed: the same loss
            same_ids = check is not None and getattr(check, "valid", False) and "same" in repr(check)
            add("tok17", f"eval: {label}", _m_eval(), setup, tri(kind if kind == "valid" else "maybe",
                                                                  _eval_vs("model", 1e-6) if same_ids else eval_ok))
    add("tok17", "importance: tokenizer.json with truncation on at 4 tokens", _m_imp(), cases[1][1], valid(set_ok()))
    add("tok17", "importance: no special token at all", _m_imp(), _no_specials, valid(set_ok()))
    for label, template in [("raises on every conversation", "{{ raise_exception('no chat here') }}"),
                            ("does not parse", "{% for m in messages %}{{ m.content }"),
                            ("calls an undefined filter", "{% for m in messages %}{{ m.content | shout }}{% endfor %}")]:
        add("tok17", f"chat records with a chat_template.jinja that {label}", lambda w: raw_cli(
            "calibrate", w / "m", "--calib", w / "chat.jsonl", *RTN, "-o", w / "out"), _chat_jinja(template))
    add("tok17", "importance of chat records with a chat_template.jinja that raises", lambda w: raw_cli(
        "importance", w / "m", "--calib", w / "chat.jsonl", "--nsamples", "2", "--seqlen", "16", "-o", w / "set"),
        _chat_jinja("{{ raise_exception('no chat here') }}"))


# ---------------------------------------------------------------- B. output streams and the process

def _quiet_or(proc_rc: int, stderr: str, out: str = "") -> Ran:
    """A child's outcome read for the classifier: a traceback or more than one line is itself; exit 2 with one
    error line is a refusal; exit 0 or SIGPIPE's 141 without a word is a success (its rc kept in stdout for the
    check)."""
    from fault_battery import PROGRESS_BAR

    lines = [x for x in stderr.splitlines() if x.strip() and not PROGRESS_BAR.match(x)]
    if "Traceback" in stderr or len(lines) > 1:
        return Ran(1, out, stderr)
    if proc_rc == 2 and lines and lines[0].startswith("error: "):
        return Ran(2, out, lines[0] + "\n")
    if proc_rc in (0, 141) and not lines:
        return Ran(0, f"rc={proc_rc}", "")
    return Ran(proc_rc or 1, out, stderr or f"exit {proc_rc} without a word\n")


def _piped(w: Path, args: list, keep_bytes: int = 0) -> Ran:
    """`quantkit ARGS | head -c KEEP`: stdout a pipe whose reader reads keep_bytes, then closes it."""
    proc = subprocess.Popen([QUANTKIT_BIN, *last_wins(args)], cwd=w, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    if keep_bytes:
        proc.stdout.read(keep_bytes)
    proc.stdout.close()
    try:
        err = proc.stderr.read().decode(errors="replace")
        proc.wait(timeout=200)
    except subprocess.TimeoutExpired:
        proc.kill()
        return Ran(124, "", "still running 200 s after its reader left\n")
    return _quiet_or(proc.returncode, err)


def _fd_closed(w: Path, args: list, fd: int, stdin=None) -> Ran:
    """`quantkit ARGS` with file descriptor fd closed before it starts (0 stdin, 2 stderr: then exit 2 is read as a
    refusal whose line could not be written)."""
    done = subprocess.run([QUANTKIT_BIN, *last_wins(args)], cwd=w, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE if fd != 2 else None,
                          stdin=stdin if stdin is not None else subprocess.DEVNULL, preexec_fn=lambda: os.close(fd),
                          timeout=200)
    if fd == 2:
        return Ran(done.returncode, done.stdout.decode(errors="replace"),
                   "error: (stderr closed)\n" if done.returncode == 2 else f"exit {done.returncode}\n")
    return Ran(done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace"))


def _stderr_full(w: Path, args: list) -> Ran:
    """`quantkit ARGS 2>/dev/full`: every write to stderr fails with ENOSPC."""
    with open("/dev/full", "w") as full:
        done = subprocess.run([QUANTKIT_BIN, *last_wins(args)], cwd=w, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=full, stdin=subprocess.DEVNULL, timeout=200)
    return Ran(done.returncode, done.stdout.decode(errors="replace"),
               "error: (stderr full)\n" if done.returncode == 2 else f"exit {done.returncode} (stderr unseen)\n")


def _rc_ok(w: Path, result) -> str | None:
    return None if result.stdout in ("rc=0", "rc=141") else f"ended {result.stdout or result.exit_code}"


def _whole_or_none(rel: str, ref=None):
    """A check of a run whose stdout went away: it ended quietly (0 or 141) and its output is either not there at
    all (nothing else new either) or whole (equal to the reference run's bytes, when given)."""
    def check(w: Path, result) -> str | None:
        bad = _rc_ok(w, result)
        if bad:
            return bad
        base = tree(w.parent / "base")
        extra = sorted(k for k in tree(w) if k not in base and not k.startswith(rel))
        if extra:
            return f"left {extra[:3]}"
        if not (w / rel).exists():
            return None
        if ref is not None:
            return ref(w, result)
        return None if any((w / rel).iterdir()) else f"{rel}/ is empty"
    return check


def _one_json(w: Path, result) -> str | None:
    """stdout is exactly one JSON object (nothing else printed on it)."""
    try:
        doc = json.loads(result.stdout)
    except ValueError:
        return f"stdout is not one JSON object: {result.stdout[:160]!r}"
    return None if isinstance(doc, dict) else f"stdout is JSON but not an object: {type(doc).__name__}"


def _json_refusal(args):
    """In-process `quantkit ARGS` (with --json): a refusal must leave stdout empty or one JSON object; anything
    else on stdout makes the refusal noisy."""
    from fault_battery import run_cli

    def run(w: Path):
        result = run_cli(*args(w))
        if result.exit_code == 2 and result.stdout.strip() and _one_json(w, result):
            return Ran(2, result.stdout, result.stderr + f"stdout on a refusal: {result.stdout.strip()[:120]!r}\n")
        return result
    return run


def _hub_cache(w: Path) -> None:
    """hub/: an HF hub cache holding model/ as acme/tiny (snapshots/<sha>, refs/main) and ct/ as acme/tiny-ct."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    for src, repo in (("model", "tiny"), ("ct", "tiny-ct")):
        root = w / "hub" / f"models--acme--{repo}"
        shutil.copytree(w / src, root / "snapshots" / sha)
        (root / "refs").mkdir()
        (root / "refs" / "main").write_text(sha)


def _figs(w: Path, result) -> str | None:
    made = [p.name for p in (w / "figs").glob("*")] if (w / "figs").is_dir() else []
    return None if made else "no figures in figs/"


def _stream_cases(out: Cases) -> None:
    add = out.add
    ref = same_as(cal_ref())
    cal = lambda *e: lambda w: ["calibrate", w / "model", "--calib", w / "text.txt", *RTN, *e, "-o", w / "out"]  # noqa: E731
    evl = lambda *e: lambda w: ["eval", w / "model", "--data", w / "text.txt", *EV, *e]  # noqa: E731
    plan = lambda *e: lambda w: ["plan", w / "model", "--calib", w / "text.txt", *GPTQ, *e]  # noqa: E731
    imp = lambda *e: lambda w: ["importance", w / "model", "--calib", w / "text.txt", "--nsamples", "2", "--seqlen",  # noqa: E731
                                "16", *e, "-o", w / "set"]
    # stdout a pipe whose reader is gone at once (`| head -c0`) or after one byte (`| head -c1`)
    for name, args, keep, check in [
        ("calibrate | head -c0 (the per-layer lines)", cal(), 0, _whole_or_none("out", ref)),
        ("calibrate --json | head -c1", cal("--json"), 1, _whole_or_none("out", ref)),
        ("export | head -c0", lambda w: ["export", w / "ct", "--format", "fake", "-o", w / "out"], 0,
         _whole_or_none("out")),
        ("importance --json | head -c1", imp("--json"), 1, _whole_or_none("set")),
        ("eval --json | head -c1", evl("--json"), 1, _rc_ok), ("plan | head -c0", plan(), 0, _rc_ok),
        ("qid predict | head -c1", lambda w: ["qid", "predict", "--params", "7e9", "--bits", "3", "--tokens",
                                              "1e12"], 1, _rc_ok),
    ]:
        add("pipe17", name, lambda w, a=args, k=keep: _piped(w, a(w), k), None, valid(check))
    add("pipe17", "a refusal (missing model) | head -c0: one line, exit 2", lambda w: _piped(w, [
        "calibrate", w / "nope", "--calib", w / "text.txt", *RTN, "-o", w / "out"]), None)
    add("pipe17", "plan --json --bits 5 | head -c0: one line, exit 2", lambda w: _piped(
        w, [*plan("--json")(w), "--bits", "5"]), None)
    # stdin closed; stderr closed or a full device
    add("fd17", "calibrate with stdin closed equals the in-process run", lambda w: _fd_closed(w, cal()(w), 0), None,
        valid(ref))
    add("fd17", "--calib /dev/stdin with stdin closed", lambda w: _fd_closed(w, [
        "calibrate", w / "model", "--calib", "/dev/stdin", *GPTQ, "-o", w / "out"], 0), None)
    add("fd17", "GPTQ (progress bars) 2>/dev/full equals the in-process run", lambda w: _stderr_full(w, [
        "calibrate", w / "model", "--calib", w / "text.txt", *GPTQ, "-o", w / "out"]), None,
        valid(same_as(cal_ref(method=GPTQ))))
    add("fd17", "a refusal (--bits 5) 2>/dev/full: exit 2", lambda w: _stderr_full(w, cal("--bits", "5")(w)), None)
    add("fd17", "calibrate with stderr closed equals the in-process run", lambda w: _fd_closed(w, cal()(w), 2), None,
        valid(ref))
    add("fd17", "a refusal (missing data) with stderr closed: exit 2", lambda w: _fd_closed(w, [
        "calibrate", w / "model", "--calib", w / "nope.txt", *GPTQ, "-o", w / "out"], 2), None)

    # --json: a refusal leaves stdout empty (or one object); a success prints exactly one object
    nan_m = _edit_m(lambda w, s: s.update({"model.layers.1.self_attn.v_proj.weight": s[
        "model.layers.1.self_attn.v_proj.weight"].index_fill(1, torch.tensor([0]), float("nan"))}) or s)
    for name, args, setup in [
        ("calibrate --json --bits 5", cal("--json", "--bits", "5"), None),
        ("calibrate --json of a missing model", lambda w: ["calibrate", w / "nope", "--calib", w / "text.txt", *RTN,
                                                           "--json", "-o", w / "out"], None),
        ("calibrate --json of a model with a NaN (refused after loading)", lambda w: [
            "calibrate", w / "m", "--calib", w / "text.txt", *RTN, "--json", "-o", w / "out"], nan_m),
        ("calibrate --json -o an existing export", lambda w: ["calibrate", w / "model", "--calib", w / "text.txt",
                                                              *RTN, "--json", "-o", w / "ct"], None),
        ("calibrate --dry-run --json --group-size 7", cal("--dry-run", "--json", "--group-size", "7"), None),
        ("plan --json --bits 5", plan("--json", "--bits", "5"), None),
        ("plan --json of a missing --calib", lambda w: ["plan", w / "model", "--calib", w / "nope.txt", *GPTQ,
                                                        "--json"], None),
        ("eval --json of a missing --data", lambda w: ["eval", w / "model", "--data", w / "nope.txt", "--json"], None),
        ("eval --json --seqlen 1", lambda w: ["eval", w / "model", "--data", w / "text.txt", "--seqlen", "1",
                                              "--json"], None),
        ("eval --json of a model with a NaN", lambda w: ["eval", w / "m", "--data", w / "text.txt", *EV, "--json"],
         nan_m),
        ("importance --json --lam 2", imp("--json", "--lam", "2"), None),
        ("importance --json of an empty text", lambda w: ["importance", w / "model", "--calib", w / "e.txt",
                                                          "--json", "-o", w / "set"],
         lambda w: (w / "e.txt").write_text("")),
        ("qid fit --json of a table without loss_q", lambda w: ["qid", "fit", w / "b.csv", "--json"],
         lambda w: (w / "b.csv").write_text("model,N,D\nm,1,2\n")),
        ("qid predict --json --bits 0", lambda w: ["qid", "predict", "--params", "7e9", "--bits", "0", "--tokens",
                                                   "1e12", "--json"], None),
        ("demo --json --nsamples 0", lambda w: ["demo", "--nsamples", "0", "--json", "-o", w / "d"], None),
    ]:
        add("json17", name, _json_refusal(args), setup)
    for name, args, check in [
        ("calibrate --json prints one object", cal("--json"), _one_json),
        ("eval --json prints one object", evl("--json"), _one_json),
        ("plan --json prints one object", plan("--json"), _one_json),
        ("calibrate --dry-run --json prints one object", cal("--dry-run", "--json"), _one_json),
        ("importance --json prints one object", imp("--json"), _one_json),
        ("qid fit --json prints one object", lambda w: ["qid", "fit", w / "q.csv", "--json"], _one_json),
        ("qid predict --json prints one object", lambda w: ["qid", "predict", "--params", "7e9", "--bits", "3",
                                                            "--tokens", "1e12", "--json"], _one_json),
    ]:
        add("json17", name, lambda w, a=args: raw_cli(*a(w)), None, valid(check))

    # the terminal's and tqdm's environment (child processes)
    for name, env, kind in [
        ("TQDM_MININTERVAL=abc (tqdm reads TQDM_* into its defaults)", {"TQDM_MININTERVAL": "abc"}, "maybe"),
        ("COLUMNS=abc LINES=-1", {"COLUMNS": "abc", "LINES": "-1"}, "valid"),
        ("FORCE_COLOR=1 with NO_COLOR=1", {"FORCE_COLOR": "1", "NO_COLOR": "1", "CLICOLOR_FORCE": "1"}, "valid"),
    ]:
        add("env17", f"GPTQ (progress bars) with {name} equals the in-process run", lambda w, e=env: child(
            w, "calibrate", w / "model", "--calib", w / "text.txt", *GPTQ, "-o", w / "out", env=e), None,
            tri(kind, same_as(cal_ref(method=GPTQ), must_take=kind == "valid")))
    add("env17", "qid plot with HOME read-only and no MPLCONFIGDIR", lambda w: child(
        w, "qid", "plot", w / "q.csv", "--format", "png", "-o", w / "figs", env={"HOME": str(w / "rohome")},
        unset=("MPLCONFIGDIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")), _mount("rohome", "64k", readonly=True),
        valid(_figs))
    # a hub id: cached (offline, must be found) and not cached (offline: one line)
    hub = {"HF_HUB_OFFLINE": "1"}
    add("hub17", "calibrate acme/tiny from HF_HUB_CACHE, offline, equals the local folder's run", lambda w: child(
        w, "calibrate", "acme/tiny", "--calib", w / "text.txt", *RTN, "-o", w / "out",
        env={**hub, "HF_HUB_CACHE": str(w / "hub")}), _hub_cache, valid(ref))
    add("hub17", "eval acme/tiny-ct from HF_HUB_CACHE, offline, equals eval of ct", lambda w: child(
        w, "eval", "acme/tiny-ct", "--data", w / "text.txt", *EV, env={**hub, "HF_HUB_CACHE": str(w / "hub")}),
        _hub_cache, valid(_eval_vs("ct", 1e-6)))
    add("hub17", "plan acme/tiny from HF_HOME's hub cache, offline", lambda w: child(
        w, "plan", "acme/tiny", "--calib", w / "text.txt", *GPTQ, "--json", env={**hub, "HF_HOME": str(w / "hfh")}),
        lambda w: (_hub_cache(w), (w / "hfh").mkdir(), shutil.move(w / "hub", w / "hfh" / "hub")) and None,
        valid(_plan_ok))
    for name, args in [
        ("eval", lambda w: ["eval", "acme/absent", "--data", w / "text.txt", *EV]),
        ("importance", lambda w: ["importance", "acme/absent", "--calib", w / "text.txt", "-o", w / "set"]),
        ("export", lambda w: ["export", "acme/absent", "--format", "fake", "-o", w / "out"]),
        ("qid measure", lambda w: ["qid", "measure", "acme/absent", "--eval", w / "text.txt", "--tokens", "1e9",
                                   "-o", w / "m.csv"]),
    ]:
        add("hub17", f"{name} of a hub id not in the cache, HF_HUB_OFFLINE=1", lambda w, a=args: child(
            w, *a(w), env={**hub, "HF_HUB_CACHE": str(w / "hub")}), _hub_cache)


# ---------------------------------------------------------------- C. distributed and memory modes

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_taken(w: Path) -> Ran:
    """--nproc 2 with MASTER_PORT naming a port another program listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        return child(w, "calibrate", w / "model", "--calib", w / "text.txt", *GPTQ, "--nproc", "2", "-o", w / "out",
                     env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(s.getsockname()[1])})


def _descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        found += [int(k) for k in kids]
        frontier += [int(k) for k in kids]
    return found


def _ranks(pid: int) -> list[int]:
    out = []
    for p in _descendants(pid):
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmd or b"forkserver" in cmd:
            out.append(p)
    return sorted(out)


def _rank_hit(w: Path, signum: int, *extra) -> Ran:
    """An 8-layer GPTQ run at --nproc 2 in a child; once its progress bar counts a finished layer (mid-run), the last
    rank gets signum. A right run ends within the wait with one error line (exit 2) and leaves no process behind."""
    import re
    import threading

    from fault_battery import _orphans

    args = ["calibrate", w / "deep", "--calib", w / "text.txt", "--method", "gptq", "--nsamples", "8", "--seqlen",
            "64", "--group-size", "32", "--nproc", "2", *extra, "-o", w / "out"]
    proc = subprocess.Popen([QUANTKIT_BIN, *[str(a) for a in args]], cwd=w, stdin=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: list[bytes] = []
    errs: list[bytes] = []
    readers = [threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, b"")), daemon=True),
               threading.Thread(target=lambda: errs.extend(iter(lambda: proc.stderr.read(256), b"")), daemon=True)]
    for r in readers:
        r.start()
    start, hit = time.monotonic(), False
    while proc.poll() is None and time.monotonic() - start < 150:
        ranks = _ranks(proc.pid)
        if len(ranks) >= 2 and re.search(rb"\| [1-6]/8 \[", b"".join(errs)):
            os.kill(ranks[-1], signum)
            hit = True
            break
        time.sleep(0.02)
    if not hit:
        proc.kill()
        raise RuntimeError(f"no two ranks mid-run to hit (exit {proc.poll()})")
    try:
        proc.wait(timeout=90)
        for r in readers:
            r.join(timeout=5)
        stdout, stderr = b"".join(lines), b"".join(errs)
    except subprocess.TimeoutExpired:
        for p in [proc.pid, *_descendants(proc.pid)]:
            with __import__("contextlib").suppress(OSError):
                os.kill(p, signal.SIGKILL)
        proc.wait()
        return Ran(124, "", "still running 90 s after a rank was hit (killed)\n")
    time.sleep(0.5)
    left = _orphans(w)
    for p in left:
        with __import__("contextlib").suppress(OSError):
            os.kill(p, signal.SIGKILL)
    if left:
        return Ran(1, "", f"{len(left)} process(es) still running after the run ended\n" + stderr.decode()[-300:])
    return Ran(proc.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace"))


def _deep(w: Path) -> None:
    save_tiny_llama(w / "deep", hidden=128, layers=8, max_positions=128)


def _two_runs(w: Path) -> Ran:
    """Two --low-memory runs at once sharing one --offload-dir (out and out2)."""
    procs = [subprocess.Popen([QUANTKIT_BIN, "calibrate", str(w / "model"), "--calib", str(w / "text.txt"), *LOW,
                               "--offload-dir", str(w / "off"), "-o", str(w / o)], cwd=w, stdin=subprocess.DEVNULL,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for o in ("out", "out2")]
    ends = [(p.wait(timeout=200), p.stderr.read().decode(errors="replace")) for p in procs]
    return Ran(0, json.dumps(ends), "")


def _both_right(w: Path, result) -> str | None:
    """Each of the two runs gave the reference bytes, or (at most one) was refused in one line leaving nothing."""
    ends = json.loads(result.stdout)
    ref = raw_cli(*cal_ref("--low-memory", method=GPTQ)(w))
    if ref.exit_code != 0:
        return "the reference run failed"
    want = (w / "ref" / "model.safetensors").read_bytes()
    taken = 0
    for (rc, err), rel in zip(ends, ("out", "out2")):
        lines = [x for x in err.splitlines() if x.strip() and "%|" not in x]
        if rc == 0:
            taken += 1
            if not (w / rel / "model.safetensors").is_file() or (w / rel / "model.safetensors").read_bytes() != want:
                return f"{rel} differs from the reference run's"
        elif rc == 2 and len(lines) == 1 and lines[0].startswith("error: "):
            if (w / rel).exists():
                return f"{rel} refused but left"
        else:
            return f"{rel}: exit {rc}: {err[-200:]}"
    return None if taken else "both runs refused"


def _off_clean(rel: str, keep: tuple[str, ...] = ()):
    """The offload folder holds nothing the run left (only `keep`, unchanged)."""
    def check(w: Path, result) -> str | None:
        left = sorted(str(p.relative_to(w / rel)) for p in (w / rel).rglob("*") if p.is_file()) \
            if (w / rel).exists() else []
        extra = [p for p in left if p not in keep]
        if extra:
            return f"the offload folder keeps {extra[:3]}"
        for name in keep:
            if (w / rel / name).read_text() != "mine\n":
                return f"{name} in the offload folder was changed"
        return None
    return check


def _stopped_with_off(then=None):
    """A setup: a --low-memory GPTQ run with --offload-dir off stopped after its first layer (out.partial kept),
    then `then`."""
    def setup(w: Path) -> None:
        with failing_after_first_layer():
            done = raw_cli("calibrate", w / "model", "--calib", w / "text.txt", *LOW, "--offload-dir", w / "off",
                           "-o", w / "out")
        assert done.exit_code == 2 and (w / "out.partial").is_dir(), done.output[-300:]
        if then:
            then(w)
    return setup


def _empty(rel: str):
    def step(w: Path) -> None:
        for p in list((w / rel).iterdir()) if (w / rel).is_dir() else []:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return step


def _dist_cases(out: Cases) -> None:
    from fault_battery import Case

    add = out.add
    gref = same_as(cal_ref(method=GPTQ), must_take=False)
    nproc = lambda env: lambda w: child(w, "calibrate", w / "model", "--calib", w / "text.txt", *GPTQ,  # noqa: E731
                                        "--nproc", "2", "-o", w / "out", env=env)
    add("dist17", "--nproc 2 with MASTER_PORT taken by a listening socket", _port_taken, None, _maybe(gref))
    for name, env in [("MASTER_ADDR '' (empty)", {"MASTER_ADDR": ""}), ("MASTER_PORT 70000", {"MASTER_PORT": "70000"})]:
        add("dist17", f"--nproc 2 with {name}", nproc(env), None, _maybe(gref))
    add("dist17", "torchrun variables of rank 1 of 2, no peer (--dist-timeout 5)", lambda w: child(
        w, "calibrate", w / "model", "--calib", w / "text.txt", *GPTQ, "--dist-timeout", "5", "-o", w / "out",
        env={"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(_free_port())}, timeout=90), None)
    add("dist17", "torchrun variables of a 1-rank job equal the in-process run", lambda w: child(
        w, "calibrate", w / "model", "--calib", w / "text.txt", *GPTQ, "-o", w / "out",
        env={"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(_free_port())}), None, valid(same_as(cal_ref(method=GPTQ))))
    add("dist17", "RANK=abc WORLD_SIZE=2 left set", lambda w: child(
        w, "calibrate", w / "model", "--calib", w / "text.txt", *GPTQ, "-o", w / "out",
        env={"RANK": "abc", "WORLD_SIZE": "2"}, timeout=90), None, _maybe(gref))
    out.append(Case("dist17", "--nproc 2: a rank SIGKILLed mid-run", lambda w: _rank_hit(w, signal.SIGKILL), _deep))
    out.append(Case("dist17", "--nproc 2 --low-memory: a rank SIGKILLed mid-run", lambda w: _rank_hit(
        w, signal.SIGKILL, "--low-memory"), _deep, keeps=("out.partial",)))
    out.append(Case("dist17", "--nproc 2 --dist-timeout 5: a rank SIGSTOPped mid-run", lambda w: _rank_hit(
        w, signal.SIGSTOP, "--dist-timeout", "5"), _deep))

    lowref = same_as(cal_ref("--low-memory", method=GPTQ))
    low = lambda *e: lambda w: raw_cli("calibrate", w / "model", "--calib", w / "text.txt", *LOW, *e,  # noqa: E731
                                       "-o", w / "out")
    add("offload17", "--offload-dir on a read-only disk", low("--offload-dir", "ro"), _mount("ro", "64k", True))
    add("offload17", "--offload-dir a folder on a read-only disk", low("--offload-dir", "ro/off"),
        _mount("ro", "64k", True))
    add("offload17", "--offload-dir on a 24 KB disk that fills mid-run (8 x 64 tokens)", lambda w: raw_cli(
        "calibrate", w / "model", "--calib", w / "text.txt", "--method", "gptq", "--nsamples", "8", "--seqlen", "64",
        "--group-size", "32", "--low-memory", "--offload-dir", w / "small", "-o", w / "out"), _mount("small", "24k"),
        _maybe(same_as(lambda w: ["calibrate", w / "model", "--calib", w / "text.txt", "--method", "gptq",
                                  "--nsamples", "8", "--seqlen", "64", "--group-size", "32", "-o", w / "ref"],
                       must_take=False)))
    add("offload17", "--offload-dir a/b/c (missing parents) equals the in-memory run, nothing kept there",
        low("--offload-dir", "a/b/c"), None, valid(lambda w, r: lowref(w, r) or _off_clean("a")(w, r)))
    add("offload17", "--offload-dir holding the user's file: kept, nothing else left", low("--offload-dir", "mine"),
        lambda w: ((w / "mine").mkdir(), (w / "mine" / "notes.txt").write_text("mine\n")) and None,
        valid(lambda w, r: lowref(w, r) or _off_clean("mine", ("notes.txt",))(w, r)))
    add("offload17", "--offload-dir the current folder (.)", lambda w: raw_cli(
        "calibrate", w / "model", "--calib", w / "text.txt", *LOW, "--offload-dir", ".", "-o", w / "out"), None,
        _maybe(lambda w, r: lowref(w, r) or _nothing_else(w, ("out", "ref"))))
    add("offload17", "two --low-memory runs at once sharing one --offload-dir", _two_runs, None, valid(_both_right))
    add("offload17", "--offload-dir without --low-memory", lambda w: raw_cli(
        "calibrate", w / "model", "--calib", w / "text.txt", *GPTQ, "--offload-dir", w / "off", "-o", w / "out"), None,
        _maybe(lambda w, r: same_as(cal_ref(method=GPTQ))(w, r) or _off_clean("off")(w, r)))
    res = lambda *e: lambda w: raw_cli("calibrate", w / "model", "--calib", w / "text.txt", *LOW, "--resume",  # noqa: E731
                                       *e, "-o", w / "out")
    for name, then, extra, kind in [
        ("the offload folder emptied", _empty("off"), ("--offload-dir", "off"), "maybe"),
        ("the offload folder deleted", lambda w: shutil.rmtree(w / "off", ignore_errors=True), ("--offload-dir", "off"),
         "maybe"),
        ("the offload folder replaced by a file", lambda w: (shutil.rmtree(w / "off", ignore_errors=True),
                                                             (w / "off").write_text("x")), ("--offload-dir", "off"),
         "bad"),
        ("the offload folder's files truncated", lambda w: [p.write_bytes(p.read_bytes()[:7]) for p in
                                                            (w / "off").rglob("*") if p.is_file()],
         ("--offload-dir", "off"), "maybe"),
    ]:
        out.append(Case("offload17", f"--resume after {name}", res(*extra), _stopped_with_off(then),
                        check=tri(kind, lambda w, r: lowref(w, r)), keeps=("out.partial", "off"),
                        valid=False))


def _nothing_else(w: Path, allowed: tuple[str, ...]) -> str | None:
    base = tree(w.parent / "base")
    extra = sorted(k for k in tree(w) if k not in base and not k.startswith(allowed))
    return f"left {extra[:3]}" if extra else None


def seventeenth_round() -> list:
    """Round 17's cases."""
    out = Cases()
    _model_cases(out)
    _tok_cases(out)
    _stream_cases(out)
    _dist_cases(out)
    return out
