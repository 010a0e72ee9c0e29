"""Smoothing: every fold an adapter declares leaves the FP model's logits unchanged, illegal folds are
skipped, and the searched alpha is the argmin of an independently computed token-weighted error."""

from __future__ import annotations

import pytest
import torch
from helpers import VLM_FAMILIES, build_vlm, config_of, tiny_model

from quantkit.engine.capture import capture_layer_inputs
from quantkit.engine.smoothing import apply_fold, legal_folds, smooth_layer
from quantkit.models import adapter_for, get_module
from quantkit.quant.smooth import ALPHA_GRID, search_alpha
from quantkit.quant.spec import QuantSpec

# The text families whose adapters declare smoothing folds, with their own config fields.
COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
FIELDS = {
    "llama": lambda kv: dict(intermediate_size=64, num_key_value_heads=kv),
    "qwen2": lambda kv: dict(intermediate_size=64, num_key_value_heads=kv),
    "gpt_neox": lambda kv: dict(intermediate_size=64),
    "opt": lambda kv: dict(ffn_dim=64, word_embed_proj_dim=32),
}


def fields_of(family: str, kv_heads: int = 4) -> dict:
    return {**COMMON, **FIELDS[family](kv_heads)}


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Random norm weights and biases (so each fold has something to scale), in float64."""
    model = model.double().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.rand_like(param) + 0.5)
            elif name.endswith("bias"):
                param.copy_(torch.randn_like(param))
    return model


def tiny(family: str, kv_heads: int = 4, seed: int = 0) -> torch.nn.Module:
    """A float64 two-layer model of a text family with random norm weights and biases."""
    return randomise(tiny_model(family, seed=seed, **fields_of(family, kv_heads)))


# every fold of every text family's adapter
TEXT_FOLDS = [(family, index) for family in FIELDS
              for index in range(len(adapter_for(config_of(family, **fields_of(family))).smooth_folds))]


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def assert_fold_keeps_the_logits(model: torch.nn.Module, fold_index: int, ids: torch.Tensor) -> None:
    """Fold random scales through fold `fold_index` of every decoder layer: the weights change, the logits do not."""
    before = logits(model, ids)
    adapter = adapter_for(model)
    fold = adapter.smooth_folds[fold_index]
    for layer in adapter.decoder_layers(model):
        assert fold in legal_folds(layer, adapter)[0]
        reader = get_module(layer, fold.linears[0])
        old = reader.weight.detach().clone()
        scales = torch.exp(torch.randn(reader.in_features, dtype=torch.float64))
        apply_fold(layer, fold, scales)
        assert not torch.allclose(reader.weight, old)  # the fold did change the weights
    assert rel_err(logits(model, ids), before) < 1e-5


@pytest.mark.parametrize("family, fold_index", TEXT_FOLDS)
def test_each_fold_keeps_the_fp_logits(family: str, fold_index: int) -> None:
    assert_fold_keeps_the_logits(tiny(family), fold_index, torch.randint(0, 64, (2, 12)))


# Gemma 3 declares no folds: its norms scale by 1 + weight, which a fold into the norm weight would not keep
@pytest.mark.parametrize("family", [f for f in VLM_FAMILIES if f != "gemma3"])
def test_each_vlm_fold_keeps_the_fp_logits(family: str) -> None:
    """A VLM's folds, on its language model's layers (text-only inputs)."""
    pytest.importorskip("PIL")
    model, processor = build_vlm(family)
    model = randomise(model)
    ids = torch.tensor([processor.tokenizer("what colour is the square ?")["input_ids"] * 2])
    adapter = adapter_for(model)
    legal, _ = legal_folds(adapter.decoder_layers(model)[0], adapter)  # grouped k/v heads rule the v fold out
    assert legal
    for index, fold in enumerate(adapter.smooth_folds):
        if fold in legal:
            assert_fold_keeps_the_logits(model, index, ids)


def test_grouped_kv_heads_skip_the_v_fold() -> None:
    model = tiny("llama", kv_heads=2)
    adapter = adapter_for(model)
    layer = adapter.decoder_layers(model)[0]
    legal, skipped = legal_folds(layer, adapter)
    assert [f.source for f in legal] == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]
    assert len(skipped) == 1 and "self_attn.v_proj" in skipped[0]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_searched_smoothing_keeps_the_fp_logits(family: str) -> None:
    model = tiny(family)
    ids = torch.randint(0, 64, (2, 12))
    before = logits(model, ids)
    adapter = adapter_for(model)
    inputs = capture_layer_inputs(model, adapter, [{"input_ids": ids}])
    report = smooth_layer(adapter.decoder_layers(model)[0], adapter, inputs, QuantSpec(bits=4, group_size=-1, act_bits=8))
    assert set(report["folds"]) == {f.source for f in adapter.smooth_folds}
    assert rel_err(logits(model, ids), before) < 1e-5


def reference_error(x: torch.Tensor, weights: list[torch.Tensor], token_w: torch.Tensor, alpha: float,
                    wbits: int, abits: int) -> float:
    """The fold error written out from its definition, with its own rounding code."""
    act = x.abs().amax(dim=0).double()
    wmax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0).double()
    s = (act ** alpha / wmax ** (1 - alpha)).float()
    xs = x / s
    qa = 2 ** (abits - 1) - 1
    a_scale = xs.abs().amax(dim=1, keepdim=True) / qa
    xq = torch.clamp(torch.round(xs / a_scale), -qa - 1, qa) * a_scale
    total = 0.0
    for w in weights:
        ws = w * s
        maxq = 2**wbits - 1
        w_scale = (2 * ws.abs().amax(dim=1, keepdim=True) / maxq).half().float()
        mid = 2 ** (wbits - 1)
        wq = (torch.clamp(torch.round(ws / w_scale) + mid, 0, maxq) - mid) * w_scale
        diff = xq @ wq.T - x @ w.T
        total += float((diff.pow(2).sum(dim=1) * token_w).sum())
    return total / float(token_w.sum())


@pytest.mark.parametrize("wbits, abits", [(8, 8), (4, 8), (4, 4)])
def test_searched_alpha_is_the_weighted_error_argmin(wbits: int, abits: int) -> None:
    torch.manual_seed(1)
    x = torch.randn(256, 32)
    x[:, 3] *= 40  # outlier channels, as in LLM activations
    x[:, 17] *= 15
    weights = [torch.randn(24, 32) * 0.1, torch.randn(16, 32) * 0.05]
    token_w = torch.rand(256) ** 3
    alpha, _, errors = search_alpha(x, x.abs().amax(dim=0), weights, wbits, abits, token_w)
    reference = {a: reference_error(x, weights, token_w, a, wbits, abits) for a in ALPHA_GRID}
    assert alpha == min(reference, key=reference.get)
    for a in ALPHA_GRID:
        assert errors[a] == pytest.approx(reference[a], rel=1e-4)
    # token weights change the answer: the uniform search is its own problem
    uniform = {a: reference_error(x, weights, torch.ones(256), a, wbits, abits) for a in ALPHA_GRID}
    assert search_alpha(x, x.abs().amax(dim=0), weights, wbits, abits)[0] == min(uniform, key=uniform.get)
