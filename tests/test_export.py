"""Export formats checked against independent references: hand-packed words, a test-only
GPTQ decoder written from the format description, transformers' own compressed-tensors
loader, and dense matmuls of result.dequantize()."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import dynamic_rule, save_tiny_llama, tiny_model

import quantkit
from quantkit.cli import main
from quantkit.errors import QuantkitError
from quantkit.export import read_checkpoint, save_quantized
from quantkit.export.formats import gptq as gptq_fmt
from quantkit.quant.spec import QuantResult, QuantSpec

HIDDEN, INTER, VOCAB = 64, 128, 256


# ---------------------------------------------------------------- helpers (independent of the code under test)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A 2-layer Llama built from a config (no downloads)."""
    return tiny_model("llama", seed=seed, dtype=dtype, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB, tie_word_embeddings=False).eval()


def random_result(
    out_f: int, in_f: int, bits: int, group_size: int, sym: bool, act_order: bool,
    gen: torch.Generator, min_zero: int = 0,
) -> QuantResult:
    """Any valid QuantResult: random codes, fp16-exact scales, random zeros and groups."""
    maxq = (1 << bits) - 1
    n_groups = 1 if group_size == -1 else in_f // group_size
    qweight = torch.randint(0, maxq + 1, (out_f, in_f), generator=gen).to(torch.uint8)
    scales = (0.002 + 0.02 * torch.rand(out_f, n_groups, generator=gen)).half().float()
    if sym:
        zeros = torch.full((out_f, n_groups), 1 << (bits - 1), dtype=torch.uint8)
    else:
        zeros = torch.randint(min_zero, maxq + 1, (out_f, n_groups), generator=gen).to(torch.uint8)
        if min_zero == 0:
            zeros[0, 0] = 0  # make sure the awkward value is there
        zeros[-1, -1] = maxq
    if group_size == -1:
        g_idx = torch.zeros(in_f, dtype=torch.int32)
    elif act_order:
        perm = torch.randperm(in_f, generator=gen)
        g_idx = torch.empty(in_f, dtype=torch.int32)
        g_idx[perm] = (torch.arange(in_f) // group_size).to(torch.int32)
    else:
        g_idx = (torch.arange(in_f) // group_size).to(torch.int32)
    return QuantResult(qweight, scales, zeros, g_idx, bits, group_size, sym, act_order)


def quantize_tiny(model, bits: int, group_size: int, sym: bool, act_order: bool = False,
                  seed: int = 0, min_zero: int = 0) -> dict[str, QuantResult]:
    """Random results for every decoder-layer linear; the model gets their dequantized weights."""
    gen = torch.Generator().manual_seed(seed)
    results = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
            r = random_result(mod.out_features, mod.in_features, bits, group_size, sym, act_order, gen, min_zero)
            results[name] = r
            with torch.no_grad():
                mod.weight.copy_(r.dequantize().to(mod.weight.dtype))
    return results


def ref_unpack(packed: torch.Tensor, bits: int, n: int) -> np.ndarray:
    """Test-only decoder: code k of each column starts at bit k*bits of the column's words
    (word w holds stream bits 32w..32w+31, least significant first)."""
    words = packed.numpy().astype(np.int64) & 0xFFFFFFFF  # reinterpret int32 as uint32
    out = np.zeros((n, words.shape[1]), dtype=np.int64)
    for k in range(n):
        start = k * bits
        w, off = divmod(start, 32)
        v = words[w] >> off
        if off + bits > 32:  # the code straddles into the next word
            v = v | (words[w + 1] << (32 - off))
        out[k] = v & ((1 << bits) - 1)
    return out


def ref_gptq_dequant(t: dict[str, torch.Tensor], bits: int, v1: bool) -> torch.Tensor:
    """weight [out, in] from GPTQ tensors, decoded by hand: qweight packed along in, qzeros along out."""
    scales = t["scales"].float()  # [groups, out]
    n_groups, out_f = scales.shape
    g_idx = t["g_idx"].long()
    in_f = g_idx.numel()
    q = ref_unpack(t["qweight"], bits, in_f)  # [in, out]
    z = ref_unpack(t["qzeros"].t().contiguous(), bits, out_f).T  # [groups, out]
    if v1:
        z = z + 1  # v1 decoders add 1 to the stored value
    w = (torch.from_numpy(q).double() - torch.from_numpy(z).double()[g_idx]) * scales.double()[g_idx]
    return w.t().float()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


# ---------------------------------------------------------------- (a) GPTQ layout


def test_3bit_hand_packed_words() -> None:
    """32 3-bit codes of one column fill exactly 3 words as one little-endian bit stream."""
    codes = [(5 * k + 3) % 8 for k in range(32)]
    bits = []
    for c in codes:
        bits += [(c >> i) & 1 for i in range(3)]  # code k occupies stream bits 3k..3k+2
    words = []
    for w in range(3):
        v = sum(bits[32 * w + j] << j for j in range(32))
        words.append(v - (1 << 32) if v >= 1 << 31 else v)
    # codes 10 and 21 straddle word boundaries: check those bits explicitly too
    assert ((words[0] >> 30) & 3) | ((words[1] & 1) << 2) == codes[10]
    assert ((words[1] >> 31) & 1) | ((words[2] & 3) << 1) == codes[21]
    r = QuantResult(
        qweight=torch.tensor([codes], dtype=torch.uint8).repeat(32, 1),  # out=32 rows, same column content
        scales=torch.ones(32, 1), zeros=torch.full((32, 1), 4, dtype=torch.uint8),
        g_idx=torch.zeros(32, dtype=torch.int32), bits=3, group_size=-1, sym=True,
    )
    enc = gptq_fmt.encode(r, version=2)
    assert enc["qweight"].dtype == torch.int32 and tuple(enc["qweight"].shape) == (3, 32)
    assert enc["qweight"][:, 0].tolist() == words
    # qzeros: 32 output channels of zero 4 packed along the output dim into 3 words of one row
    zbits = []
    for _ in range(32):
        zbits += [(4 >> i) & 1 for i in range(3)]
    zwords = [sum(zbits[32 * w + j] << j for j in range(32)) for w in range(3)]
    zwords = [v - (1 << 32) if v >= 1 << 31 else v for v in zwords]
    assert enc["qzeros"].tolist() == [zwords]


def test_4bit_hand_packed_word() -> None:
    """4-bit: eight codes per word, code j at bits 4j; v1 stores zero-1."""
    codes = [1, 15, 0, 7, 8, 3, 12, 9]
    word = sum(c << (4 * j) for j, c in enumerate(codes))
    word = word - (1 << 32) if word >= 1 << 31 else word
    r = QuantResult(
        qweight=torch.tensor([codes] * 8, dtype=torch.uint8), scales=torch.ones(8, 1),
        zeros=torch.tensor([[1], [2], [3], [4], [5], [6], [7], [15]], dtype=torch.uint8),
        g_idx=torch.zeros(8, dtype=torch.int32), bits=4, group_size=-1, sym=False,
    )
    enc = gptq_fmt.encode(r, version=1)
    assert enc["qweight"][:, 0].tolist() == [word]
    zword = sum((z - 1) << (4 * j) for j, z in enumerate([1, 2, 3, 4, 5, 6, 7, 15]))
    zword = zword - (1 << 32) if zword >= 1 << 31 else zword
    assert enc["qzeros"].tolist() == [[zword]]
    assert enc["scales"].dtype == torch.float16 and tuple(enc["scales"].shape) == (1, 8)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("version", [1, 2])
def test_gptq_decodes_to_dequantize(bits: int, sym: bool, act_order: bool, version: int) -> None:
    gen = torch.Generator().manual_seed(bits * 10 + sym + 2 * act_order)
    min_zero = 1 if version == 1 else 0  # v1 cannot hold zero 0 (tested separately)
    for out_f, in_f, gs in [(96, 128, 32), (64, 64, -1)]:
        r = random_result(out_f, in_f, bits, gs, sym, act_order, gen, min_zero)
        enc = gptq_fmt.encode(r, version)
        assert enc["qweight"].shape == (in_f * bits // 32, out_f) and enc["qweight"].dtype == torch.int32
        n_groups = r.scales.shape[1]
        assert enc["qzeros"].shape == (n_groups, out_f * bits // 32) and enc["qzeros"].dtype == torch.int32
        assert enc["scales"].shape == (n_groups, out_f) and enc["scales"].dtype == torch.float16
        assert enc["g_idx"].dtype == torch.int32 and torch.equal(enc["g_idx"], r.g_idx)
        assert torch.equal(ref_gptq_dequant(enc, bits, v1=version == 1), r.dequantize())


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptq_checkpoint_files(tmp_path: Path, fmt: str) -> None:
    """The written checkpoint decodes by hand to the fake-quantized weights; configs parse in transformers."""
    from safetensors.torch import load_file
    from transformers import GPTQConfig

    model = tiny_llama()
    results = quantize_tiny(model, 3, 32, sym=False, act_order=True, min_zero=1)
    out = save_quantized(model, results, tmp_path / "q", fmt=fmt, spec=QuantSpec(damp=0.05, static_groups=False))
    sd = load_file(str(out / "model.safetensors"))
    for name, r in results.items():
        t = {k: sd[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        assert torch.equal(ref_gptq_dequant(t, 3, v1=fmt == "gptq"), r.dequantize())
        assert f"{name}.weight" not in sd
    assert sd["lm_head.weight"].dtype == torch.float32 and "model.embed_tokens.weight" in sd
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc == json.loads((out / "quantize_config.json").read_text())
    assert qc["quant_method"] == "gptq" and qc["bits"] == 3 and qc["group_size"] == 32
    assert qc["desc_act"] is True and qc["sym"] is False and qc["checkpoint_format"] == fmt
    assert qc["damp_percent"] == 0.05 and qc["lm_head"] is False
    assert qc["modules_in_block_to_quantize"] == [[
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    ]]
    assert GPTQConfig.from_dict(dict(qc)).format == fmt
    manifest = json.loads((out / "quantkit.json").read_text())
    assert manifest["format"] == fmt and sorted(manifest["quantized_modules"]) == sorted(results)
    assert "lm_head" in manifest["fp_linears"]


def test_gptq_dynamic_lists_skipped_linears(tmp_path: Path) -> None:
    model = tiny_llama()
    results = quantize_tiny(model, 4, 32, sym=True)
    del results["model.layers.1.mlp.down_proj"]
    out = save_quantized(model, results, tmp_path / "q", fmt="gptq")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["dynamic"] == {r"-:^model\.layers\.1\.mlp\.down_proj$": {}}
    back = quantkit.load_quantized(out)
    assert torch.equal(back.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)


# ---------------------------------------------------------------- (g) v1 and zero 0


def test_v1_refuses_zero_point_zero(tmp_path: Path) -> None:
    model = tiny_llama()
    results = quantize_tiny(model, 4, 32, sym=False)  # has zero 0 at [0, 0] of every module
    with pytest.raises(QuantkitError, match="gptq_v2"):
        save_quantized(model, results, tmp_path / "v1", fmt="gptq")
    assert not (tmp_path / "v1").exists()
    out = save_quantized(model, results, tmp_path / "v2", fmt="gptq_v2")
    back = read_checkpoint(out)
    for name, r in results.items():
        assert torch.equal(back.results[name].zeros, r.zeros)
    # converting that v2 checkpoint to v1 through the CLI is refused too
    res = CliRunner().invoke(main, ["export", str(out), "--format", "gptq", "-o", str(tmp_path / "v1b")])
    assert res.exit_code == 2 and "gptq_v2" in res.stderr
    assert not (tmp_path / "v1b").exists()


def test_v1_reader_rejects_wrapped_zero() -> None:
    """A v1 qzeros word holding 15 (i.e. -1) decodes to 16 in v1 decoders: refused, not misread."""
    t = {
        "qweight": torch.zeros(1, 8, dtype=torch.int32), "qzeros": torch.full((1, 1), -1, dtype=torch.int32),
        "scales": torch.ones(1, 8, dtype=torch.float16), "g_idx": torch.zeros(8, dtype=torch.int32),
    }
    with pytest.raises(QuantkitError, match="zero point 16"):
        gptq_fmt.decode(t, bits=4, group_size=-1, sym=False, act_order=False, version=1)


# ---------------------------------------------------------------- (b) compressed-tensors through transformers


@pytest.mark.parametrize(("bits", "group_size", "sym"), [(4, 32, True), (8, -1, True), (4, 32, False), (8, 64, False)])
def test_compressed_tensors_loads_in_transformers(tmp_path: Path, bits: int, group_size: int, sym: bool) -> None:
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = tiny_llama(seed=bits)
    results = quantize_tiny(model, bits, group_size, sym=sym)
    out = save_quantized(model, results, tmp_path / "ct", fmt="compressed-tensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["quantization_status"] == "compressed"
    assert qc["ignore"] == ["lm_head"]
    w = qc["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["symmetric"], w["strategy"]) == (bits, sym, "group" if group_size > 0 else "channel")
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = logits(model, ids)
    if sym:
        loaded = AutoModelForCausalLM.from_pretrained(out)
    else:
        # compressed-tensors 0.20.1 builds the compressed module on meta with an *unpacked*
        # zero point, so asym pack-quantized checkpoints (ours and llm-compressor's, whose zero
        # points are packed) only load through transformers' dequantize-on-load path.
        loaded = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    got = logits(loaded, ids)
    assert (got - ref).abs().max() <= 1e-3 * ref.abs().max()


def test_static_act_order_is_declared_in_every_format(tmp_path: Path) -> None:
    """quantkit's default (act-order with static groups: a trivial g_idx) is compressed-tensors'
    actorder "weight" and GPTQ's desc_act with the g_idx written; both load back to the same logits."""
    pytest.importorskip("compressed_tensors")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = tiny_llama(seed=3)
    results = quantize_tiny(model, 4, 32, sym=True)
    for r in results.values():
        r.act_order = True
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    ref = logits(model, ids)
    ct = save_quantized(model, results, tmp_path / "ct", fmt="compressed-tensors")
    weights = json.loads((ct / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert weights["actorder"] == "weight"
    got = logits(AutoModelForCausalLM.from_pretrained(ct), ids)
    assert (got - ref).abs().max() <= 1e-3 * ref.abs().max()
    gptq = save_quantized(model, results, tmp_path / "gptq", fmt="gptq_v2")
    qc = json.loads((gptq / "config.json").read_text())["quantization_config"]
    assert qc["desc_act"] is True
    name = "model.layers.0.mlp.down_proj"
    assert torch.equal(load_file(str(gptq / "model.safetensors"))[f"{name}.g_idx"], torch.arange(INTER, dtype=torch.int32) // 32)
    for fmt, out in (("compressed-tensors", ct), ("gptq_v2", gptq)):
        assert torch.equal(quantkit.load_quantized(out).get_submodule(name).weight.float(), results[name].dequantize()), fmt


def test_compressed_tensors_tensor_layout(tmp_path: Path) -> None:
    """weight_packed is a dense 4-bit stream along in; signed codes are stored offset by 8."""
    from safetensors.torch import load_file

    model = tiny_llama()
    results = quantize_tiny(model, 4, 32, sym=False)
    out = save_quantized(model, results, tmp_path / "ct", fmt="compressed-tensors")
    sd = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    r = results[name]
    packed = sd[f"{name}.weight_packed"]
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (HIDDEN, INTER * 4 // 32)
    assert torch.equal(torch.from_numpy(ref_unpack(packed.t().contiguous(), 4, INTER).T), r.qweight.long())
    zp = sd[f"{name}.weight_zero_point"]
    assert tuple(zp.shape) == (HIDDEN * 4 // 32, INTER // 32)
    assert torch.equal(torch.from_numpy(ref_unpack(zp, 4, HIDDEN)), r.zeros.long())
    assert sd[f"{name}.weight_shape"].tolist() == [HIDDEN, INTER]
    assert sd[f"{name}.weight_scale"].dtype == torch.float32


# ---------------------------------------------------------------- (c) GPTQ through transformers + optimum + gptqmodel


def test_gptq_loads_in_transformers_with_gptqmodel(tmp_path: Path) -> None:
    try:
        import gptqmodel  # noqa: F401
    except ImportError:
        pytest.skip("gptqmodel is not installed (it requires torch 2.14.1 and cannot be installed beside torch 2.13 here)")
    import os

    from transformers import AutoModelForCausalLM

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    model = tiny_llama(dtype=torch.float16)
    results = quantize_tiny(model, 4, 32, sym=True)
    out = save_quantized(model, results, tmp_path / "g", fmt="gptq")
    loaded = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    ref = logits(model.float(), ids)
    got = logits(loaded, ids)
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()


# ---------------------------------------------------------------- (d) load_quantized round trips, (e) sharding


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2", "compressed-tensors", "fake"])
def test_load_quantized_round_trip(tmp_path: Path, fmt: str) -> None:
    model = tiny_llama()
    results = quantize_tiny(model, 4, 32, sym=False, min_zero=1)
    out = save_quantized(model, results, tmp_path / fmt, fmt=fmt)
    back = quantkit.load_quantized(out)
    ref_sd, got_sd = model.state_dict(), back.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], got_sd[k]), k
    ids = torch.randint(0, VOCAB, (1, 10))
    assert torch.equal(logits(model, ids), logits(back, ids))
    ckpt = read_checkpoint(out)
    for name, r in results.items():
        got = ckpt.results[name]
        for field in ("qweight", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(got, field), getattr(r, field)), (name, field)


def test_fake_format_in_fp16_keeps_exact_weights(tmp_path: Path) -> None:
    """fp16 models: dequantized weights that fp16 cannot hold are stored as float32, so codes survive."""
    model = tiny_llama(dtype=torch.float16)
    results = quantize_tiny(model, 8, 32, sym=False)
    out = save_quantized(model, results, tmp_path / "f", fmt="fake")
    ckpt = read_checkpoint(out)
    for name, r in results.items():
        assert torch.equal(ckpt.results[name].qweight, r.qweight)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out)  # the fake format is an ordinary checkpoint
    assert plain.model.layers[0].self_attn.q_proj.weight.shape == (HIDDEN, HIDDEN)


def test_sharded_checkpoint(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    results = quantize_tiny(model, 4, 32, sym=True)
    for fmt in ("gptq", "fake"):
        out = save_quantized(model, results, tmp_path / fmt, fmt=fmt, max_shard_size="40KB")
        index = json.loads((out / "model.safetensors.index.json").read_text())
        shards = sorted({f for f in index["weight_map"].values()})
        assert len(shards) > 2 and not (out / "model.safetensors").exists()
        n = len(shards)
        assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        sizes = [(out / s).stat().st_size for s in shards]
        assert max(sizes) < 40_000 + 70_000  # one tensor may exceed the limit on its own (embeddings)
        assert index["metadata"]["total_size"] > 0
        back = quantkit.load_quantized(out)
        for k, v in model.state_dict().items():
            assert torch.equal(back.state_dict()[k], v), k
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "fake")
    for k, v in model.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v), k


# ---------------------------------------------------------------- CLI conversion and bad input (f)


def test_cli_converts_without_requantizing(tmp_path: Path) -> None:
    model = tiny_llama()
    results = quantize_tiny(model, 4, 32, sym=True)
    src = save_quantized(model, results, tmp_path / "src", fmt="gptq_v2", report={"note": "x"})
    (src / "tokenizer_config.json").write_text("{}")
    runner = CliRunner()
    prev = src
    for i, fmt in enumerate(["compressed-tensors", "gptq", "fake", "gptq_v2"]):
        dst = tmp_path / f"step{i}"
        res = runner.invoke(main, ["export", str(prev), "--format", fmt, "-o", str(dst)])
        assert res.exit_code == 0, res.output
        assert json.loads((dst / "quantkit.json").read_text())["format"] == fmt
        assert (dst / "tokenizer_config.json").is_file() and (dst / "quantkit_report.json").is_file()
        prev = dst
    back = read_checkpoint(prev)
    for name, r in results.items():
        for field in ("qweight", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(back.results[name], field), getattr(r, field))
    # --overwrite replaces; without it an existing output is refused
    res = runner.invoke(main, ["export", str(src), "--format", "fake", "-o", str(prev)])
    assert res.exit_code == 2 and "already exists" in res.stderr
    res = runner.invoke(main, ["export", str(src), "--format", "fake", "-o", str(prev), "--overwrite"])
    assert res.exit_code == 0


def _one_line_error(res, out: Path) -> None:
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 or err.startswith("Usage:"), err
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}.tmp") for p in out.parent.iterdir())


def test_cli_bad_input(tmp_path: Path) -> None:
    model = tiny_llama()
    results = quantize_tiny(model, 3, 32, sym=True)
    src = save_quantized(model, results, tmp_path / "src3", fmt="gptq")
    runner = CliRunner()
    out = tmp_path / "out"

    res = runner.invoke(main, ["export", str(src), "--format", "awq", "-o", str(out)])
    assert res.exit_code == 2 and "awq" in res.stderr and not out.exists()

    res = runner.invoke(main, ["export", str(src), "--format", "gptq", "-o", str(src), "--overwrite"])
    _one_line_error(res, out)
    assert res.stderr.startswith("error: ") and "input" in res.stderr

    plain = tmp_path / "plain"
    model.save_pretrained(plain)
    res = runner.invoke(main, ["export", str(plain), "--format", "gptq", "-o", str(out)])
    _one_line_error(res, out)
    assert "not a quantkit output" in res.stderr

    with pytest.raises(QuantkitError, match="not a quantkit output"):
        quantkit.load_quantized(plain)

    trunc = tmp_path / "trunc"
    save_quantized(model, results, trunc, fmt="gptq_v2")
    st = trunc / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    res = runner.invoke(main, ["export", str(trunc), "--format", "fake", "-o", str(out)])
    _one_line_error(res, out)
    assert "model.safetensors" in res.stderr
    with pytest.raises(QuantkitError, match=r"model\.safetensors"):
        quantkit.load_quantized(trunc)


def test_save_rejects_bad_arguments(tmp_path: Path) -> None:
    model = tiny_llama()
    results = quantize_tiny(model, 4, 32, sym=True)
    with pytest.raises(QuantkitError, match="unknown export format"):
        save_quantized(model, results, tmp_path / "a", fmt="awq")
    bad = dict(results)
    name = next(iter(bad))
    r = bad[name]
    bad[name] = QuantResult(r.qweight, r.scales * (1 + 1e-6), r.zeros, r.g_idx, 4, 32, True)
    with pytest.raises(QuantkitError, match="float16"):
        save_quantized(model, bad, tmp_path / "b", fmt="gptq")
    act = quantize_tiny(tiny_llama(), 4, 32, sym=True, act_order=True)
    with pytest.raises(QuantkitError, match="act-order"):
        save_quantized(model, act, tmp_path / "c", fmt="compressed-tensors")
    with pytest.raises(QuantkitError, match="shard size"):
        save_quantized(model, results, tmp_path / "d", fmt="fake", max_shard_size="lots")
    assert not any(tmp_path.iterdir())


def test_ref_lm_round_trip(tmp_path: Path, ref_lm: Path) -> None:
    """The shared reference LM (tied embeddings): RTN 4-bit, every format loads back to the same weights."""
    from transformers import AutoModelForCausalLM

    from quantkit.quant import QuantSpec, method_for

    model = AutoModelForCausalLM.from_pretrained(ref_lm).eval()
    spec = QuantSpec(bits=4, group_size=64, sym=True)
    results = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers.0."):
            results[name] = method_for("rtn").solve(mod.weight.data, None, spec, name)
            mod.weight.data = results[name].dequantize()
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    ref = logits(model, ids)
    for fmt in ("compressed-tensors", "gptq"):
        out = save_quantized(model, results, tmp_path / fmt, fmt=fmt, source=str(ref_lm))
        assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
        back = quantkit.load_quantized(out)
        assert torch.equal(logits(back, ids), ref)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "compressed-tensors")
    got = logits(loaded, ids)
    assert (got - ref).abs().max() <= 1e-3 * ref.abs().max()
    assert math.isfinite(float(got.sum()))


# ---------------------------------------------------------------- (h) mixed settings per linear

MIXED = {  # linear -> (bits, group_size, sym); unlisted decoder linears: 4 bits, g32, symmetric; None: left FP
    "model.layers.0.mlp.down_proj": (8, -1, True),
    "model.layers.1.self_attn.q_proj": (8, 32, True),
    "model.layers.1.self_attn.k_proj": (8, 32, True),
    "model.layers.1.self_attn.v_proj": (8, 32, True),
    "model.layers.1.mlp.down_proj": None,
}


def mixed_model(tmp_path: Path, extra: dict | None = None, act_order: bool = True):
    """A saved tiny Llama (hidden 64) with RTN results at the MIXED settings (plus `extra` ones); its linears
    hold their results' dequantized weights, the FP one keeps its weight."""
    from transformers import AutoModelForCausalLM

    from quantkit.quant.rtn import rtn_solve
    from quantkit.quant.spec import QuantSpec

    model = AutoModelForCausalLM.from_pretrained(save_tiny_llama(tmp_path / "model", hidden=64)).eval()
    settings = {**MIXED, **(extra or {})}
    results = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
            setting = settings.get(name, (4, 32, True))
            if setting is None:
                continue
            bits, group_size, sym = setting
            r = rtn_solve(mod.weight.data, None, QuantSpec(bits=bits, group_size=group_size, sym=sym), name)
            r.act_order = act_order  # static groups: act-order declared, g_idx trivial
            results[name] = r
            mod.weight.data = r.dequantize()
    return model, results


def assert_same_results(got: dict[str, QuantResult], want: dict[str, QuantResult]) -> None:
    assert sorted(got) == sorted(want)
    for name, r in want.items():
        g = got[name]
        assert (g.bits, g.group_size, g.sym, g.act_order) == (r.bits, r.group_size, r.sym, r.act_order), name
        assert torch.equal(g.dequantize(), r.dequantize()), name


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2", "compressed-tensors", "fake"])
def test_mixed_settings_round_trip(tmp_path: Path, fmt: str) -> None:
    """Each linear comes back with its own setting and codes; load_quantized holds each one's dequantized
    weight and the FP linear's original weight."""
    model, results = mixed_model(tmp_path)
    out = save_quantized(model, results, tmp_path / fmt, fmt=fmt)
    assert_same_results(read_checkpoint(out).results, results)
    back = quantkit.load_quantized(out)
    for name, r in results.items():
        assert torch.equal(back.get_submodule(name).weight.float(), r.dequantize()), name
    fp = "model.layers.1.mlp.down_proj"
    assert torch.equal(back.get_submodule(fp).weight, model.get_submodule(fp).weight)
    manifest = json.loads((out / "quantkit.json").read_text())
    assert manifest["spec"]["bits"] == 4 and manifest["spec"]["group_size"] == 32
    assert sorted(manifest["module_specs"]) == sorted(n for n, s in MIXED.items() if s is not None)
    assert fp in manifest["fp_linears"]
    assert "Mixed settings: 4 of 13 quantized linears" in (out / "README.md").read_text()


def test_mixed_compressed_tensors_loads_in_transformers(tmp_path: Path) -> None:
    """One config group per setting with explicit targets, FP linears ignored; transformers (through
    compressed-tensors) gives the logits of quantkit's fake-quantized model and applies each linear's setting."""
    from transformers import AutoModelForCausalLM

    model, results = mixed_model(tmp_path)
    out = save_quantized(model, results, tmp_path / "ct", fmt="compressed-tensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == ["lm_head", "model.layers.1.mlp.down_proj"]
    groups = {(g["weights"]["num_bits"], g["weights"]["group_size"]): g["targets"] for g in qc["config_groups"].values()}
    assert groups[(8, None)] == ["model.layers.0.mlp.down_proj"]
    assert groups[(8, 32)] == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.q_proj",
                               "model.layers.1.self_attn.v_proj"]
    assert r"re:^model\.layers\.\d+\.self_attn\.o_proj$" in groups[(4, 32)]  # every layer's o_proj is 4-bit
    assert "model.layers.0.self_attn.q_proj" in groups[(4, 32)] and len(groups) == 3
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    ref = logits(model, ids)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    got = logits(loaded, ids)
    assert (got - ref).abs().max() <= 1e-3 * ref.abs().max()
    for name, r in results.items():  # transformers' decompressed weights are each result's own
        assert torch.allclose(loaded.get_submodule(name).weight.float(), r.dequantize(), rtol=1e-3, atol=1e-6), name
    fp = "model.layers.1.mlp.down_proj"
    assert torch.equal(loaded.get_submodule(fp).weight, model.get_submodule(fp).weight)


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_mixed_gptq_dynamic(tmp_path: Path, fmt: str) -> None:
    """The most common setting at the top level; every other linear's in `dynamic` ("+:" overrides) and the
    FP linear as a "-:" entry. Read as vLLM reads it, the config gives each linear its own setting, and its
    tensors decode by hand to its result. (transformers cannot load GPTQ here: gptqmodel is not installed.)"""
    from safetensors.torch import load_file
    from transformers import GPTQConfig

    # a 3-bit override too (asymmetric in v2; v1 cannot store RTN's zero points of 0)
    extra = dict.fromkeys(("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"), (3, 64, fmt == "gptq"))
    model, results = mixed_model(tmp_path, extra, act_order=True)
    out = save_quantized(model, results, tmp_path / fmt, fmt=fmt)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == json.loads((out / "quantize_config.json").read_text())
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (4, 32, True, True)
    assert GPTQConfig.from_dict(dict(qc)).bits == 4
    assert qc["dynamic"][r"-:^model\.layers\.1\.mlp\.down_proj$"] == {}
    eight = {"bits": 8, "group_size": 32, "sym": True, "desc_act": True}
    assert qc["dynamic"][r"+:^model\.layers\.1\.self_attn\.q_proj$"] == eight
    # vLLM looks its fused q/k/v and gate/up modules up by the fused name
    assert dynamic_rule(qc, "model.layers.1.self_attn.qkv_proj") == eight
    assert dynamic_rule(qc, "model.layers.0.self_attn.qkv_proj") is None
    assert dynamic_rule(qc, "model.layers.1.mlp.gate_up_proj")["bits"] == 3
    subs = qc["modules_in_block_to_quantize"][0]
    sd = load_file(str(out / "model.safetensors"))
    for name, mod in model.named_modules():
        if not (isinstance(mod, torch.nn.Linear) and name.startswith(qc["block_name_to_quantize"] + ".")):
            continue
        rule = dynamic_rule(qc, name)
        quantized = rule is not False and any(s in name for s in subs)
        assert quantized == (name in results), name
        if not quantized:
            assert torch.equal(sd[f"{name}.weight"], mod.weight.data), name
            continue
        fields = {"bits": qc["bits"], "group_size": qc["group_size"], "sym": qc["sym"], "desc_act": qc["desc_act"],
                  **(rule or {})}
        r = results[name]
        assert (fields["bits"], fields["group_size"], fields["sym"]) == (r.bits, r.group_size, r.sym), name
        t = {k: sd[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        assert torch.equal(ref_gptq_dequant(t, fields["bits"], v1=fmt == "gptq"), r.dequantize()), name
    assert_same_results(read_checkpoint(out).results, results)


def test_mixed_export_converts_between_formats(tmp_path: Path) -> None:
    """`quantkit export` keeps every linear's setting through compressed-tensors -> gptq_v2 -> fake."""
    model, results = mixed_model(tmp_path)
    prev = save_quantized(model, results, tmp_path / "ct", fmt="compressed-tensors")
    for fmt in ("gptq_v2", "fake"):
        dst = tmp_path / f"to-{fmt}"
        res = CliRunner().invoke(main, ["export", str(prev), "--format", fmt, "-o", str(dst)])
        assert res.exit_code == 0, res.output
        assert_same_results(read_checkpoint(dst).results, results)
        prev = dst


def test_mixed_streamed_writer_matches_in_memory_writer(tmp_path: Path) -> None:
    """The low-memory writer (a layer at a time) writes the same mixed checkpoint byte for byte."""
    from quantkit.export import Checkpoint, Layout, write_checkpoint, write_checkpoint_streamed

    model, results = mixed_model(tmp_path)
    state = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] not in results}
    layer_of = {k: int(k.split(".")[2]) if k.startswith("model.layers.") else -1 for k in state}
    parts = [({k: v for k, v in state.items() if layer_of[k] == i},
              {n: r for n, r in results.items() if int(n.split(".")[2]) == i} if i >= 0 else {}) for i in (-1, 0, 1)]
    config = model.config.to_dict()
    layout = Layout(None, 2, ("lm_head", "model.layers.1.mlp.up_proj"))
    for fmt in ("compressed-tensors", "gptq_v2"):
        ckpt = Checkpoint(config=config, manifest={}, fp_tensors=state, results=results, layout=layout)
        write_checkpoint(ckpt, tmp_path / f"mem-{fmt}", fmt=fmt)
        write_checkpoint_streamed(config, iter(parts), tmp_path / f"stream-{fmt}", fmt=fmt, layout=layout)
        names = sorted(p.name for p in (tmp_path / f"mem-{fmt}").iterdir())
        assert names == sorted(p.name for p in (tmp_path / f"stream-{fmt}").iterdir())
        for name in names:
            assert (tmp_path / f"mem-{fmt}" / name).read_bytes() == (tmp_path / f"stream-{fmt}" / name).read_bytes()


def test_mixed_settings_each_checked_by_the_format(tmp_path: Path) -> None:
    """A 3-bit asymmetric override goes to compressed-tensors as its own config group and reads back exactly;
    GPTQ v1 refuses the zero point 0 an asymmetric grid may hold, naming the linear, with nothing written."""
    model, results = mixed_model(tmp_path, {"model.layers.1.mlp.gate_proj": (3, 64, False)})
    out = save_quantized(model, results, tmp_path / "ct", fmt="compressed-tensors")
    assert_same_results(read_checkpoint(out).results, results)
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert 3 in {g["weights"]["num_bits"] for g in groups.values()}
    zero = results["model.layers.1.mlp.gate_proj"]
    zero.zeros[0, 0] = 0  # a legal asymmetric zero point that v1's zero-1 cannot store
    with pytest.raises(QuantkitError, match=r"model\.layers\.1\.mlp\.gate_proj: asymmetric zero point 0"):
        save_quantized(model, results, tmp_path / "v1", fmt="gptq")
    assert not (tmp_path / "v1").exists()


@pytest.mark.parametrize("fmt", ["gptq_v2", "compressed-tensors"])
def test_split_fused_linears_warn_for_vllm(tmp_path: Path, fmt: str, caplog) -> None:
    """vLLM loads q/k/v as one module: shards at different settings are exported (quantkit reads them back)
    with a warning naming them; shards sharing a setting give none."""
    model, results = mixed_model(tmp_path)
    with caplog.at_level("WARNING", logger="quantkit"):
        save_quantized(model, results, tmp_path / "shared", fmt=fmt)
    assert not [r for r in caplog.records if "vLLM" in r.getMessage()]
    model, results = mixed_model(tmp_path / "split", {"model.layers.0.self_attn.q_proj": (8, 32, True)})
    with caplog.at_level("WARNING", logger="quantkit"):
        out = save_quantized(model, results, tmp_path / "split-out", fmt=fmt)
    warned = [r.getMessage() for r in caplog.records if "vLLM" in r.getMessage()]
    assert len(warned) == 1 and "model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj" in warned[0]
    assert_same_results(read_checkpoint(out).results, results)


def test_a_new_format_is_one_class_and_one_registry_line(tmp_path: Path, monkeypatch) -> None:
    """A Format subclass registered under a new name is written, read back and loaded by the shared writer and
    reader with no other change (here: the codes stored as they are, no quantization_config)."""
    from quantkit.export.formats import REGISTRY, Format

    class RawCodes(Format):
        name = "raw-codes"
        bits = (4, 8)

        def encode(self, name, r, dtype):
            return {f"{name}.{k}": getattr(r, k).contiguous() for k in ("qweight", "scales", "zeros", "g_idx")}, {}

        def decode(self, name, stored, setting):
            t = stored.take(name, ("qweight", "scales", "zeros", "g_idx"))
            return QuantResult(t["qweight"], t["scales"], t["zeros"], t["g_idx"], setting.bits, setting.group_size,
                               setting.sym, setting.act_order)

    monkeypatch.setitem(REGISTRY, "raw-codes", RawCodes())
    model, results = mixed_model(tmp_path)
    out = save_quantized(model, results, tmp_path / "raw", fmt="raw-codes")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert_same_results(read_checkpoint(out).results, results)
    back = quantkit.load_quantized(out)
    ids = torch.randint(0, 64, (1, 10))
    assert torch.equal(logits(back, ids), logits(model, ids))
    with pytest.raises(QuantkitError, match="raw-codes stores 4 and 8-bit weights, got 3-bit"):
        save_quantized(*mixed_model(tmp_path / "w3", {"model.layers.1.mlp.gate_proj": (3, 64, True)}), tmp_path / "r3",
                       fmt="raw-codes")
