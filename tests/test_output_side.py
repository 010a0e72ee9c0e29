"""TLQ's output-side factor (each linear's block-diagonal E[g g^T] over its output rows, GPTQ's row metric)
against references: whole-model autograd, GPTQ called directly, dense block-diagonal matrices."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import assert_fault, observing, save_tiny_llama, tiny_model, write_text

import quantkit
from quantkit.engine import calibrate_model
from quantkit.importance import tlq_token_weights
from quantkit.quant.spec import QuantSpec


def tiny_llama(layers: int = 2):
    model = tiny_model("llama", seed=0, vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64).eval()
    with torch.no_grad():  # larger weights than the init, so that gradients differ between tokens
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.15)
    return model


def samples_for(count: int = 8, length: int = 24) -> list[dict]:
    """Samples from two sources: the first half of each sample's tokens is source 0, the rest source 1."""
    generator = torch.Generator().manual_seed(5)
    out = []
    for _ in range(count):
        sources = torch.zeros(1, length, dtype=torch.long)
        sources[0, length // 2:] = 1
        out.append({"input_ids": torch.randint(0, 101, (1, length), generator=generator), "source_ids": sources})
    return out


@pytest.mark.parametrize("budget", [1 << 30, 0])
def test_linear_output_factors_match_autograd_and_reach_the_solver(monkeypatch, budget: int) -> None:
    """output_side=b: each linear's block-diagonal sum of g g^T over its output rows (g = dL/dz from whole-model
    autograd) / tokens, each block G then shrunk to (1 - a) G + a (tr G / b) I (a = OUTPUT_SIDE_SHRINK), from the
    pass that keeps each chunk's graph and from the block-wise one (a zero graph budget); the engine solves each
    linear with GPTQ and those blocks as its row metric."""
    from quantkit.importance.weights import OUTPUT_SIDE_SHRINK
    from quantkit.quant.gptaq import fp_target_weight
    from quantkit.quant.gptq import gptq_solve

    monkeypatch.setattr("quantkit.importance.gradients.KEPT_GRAPH_BYTES", budget)
    model = tiny_llama()
    samples = samples_for(3)
    weights = tlq_token_weights(model, samples, lam=0.1, progress=False, output_side=8)
    assert weights.report["kept_graph"] is (budget > 0)
    factors = weights.linear_factors
    names = ["self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"]
    reference = {(layer, name): 0 for layer in range(2) for name in names}
    for sample in samples:
        outputs = {}

        def keep(module, args, output, key=None, outputs=outputs):
            output.retain_grad()
            outputs[key] = output

        hooks = [model.model.layers[layer].get_submodule(name).register_forward_hook(
            lambda m, a, o, key=(layer, name): keep(m, a, o, key)) for layer in range(2) for name in names]
        ids = sample["input_ids"]
        logits = model(input_ids=ids).logits[0]
        for hook in hooks:
            hook.remove()
        torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:]).backward()
        for key, out in outputs.items():
            g = out.grad[0].double()
            blocks = g.reshape(24, -1, 8)
            reference[key] = reference[key] + torch.einsum("tnb,tnc->nbc", blocks, blocks)
    assert 0 < OUTPUT_SIDE_SHRINK < 1 and weights.report["output_shrink"] == OUTPUT_SIDE_SHRINK
    for (layer, name), total in reference.items():
        mean = total / (3 * 24)
        expected = torch.stack([(1 - OUTPUT_SIDE_SHRINK) * block + OUTPUT_SIDE_SHRINK * torch.trace(block) / 8
                                * torch.eye(8, dtype=torch.float64) for block in mean])
        assert torch.allclose(factors[layer][name], expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max())), name
    seen: dict[str, tuple] = {}
    spec = QuantSpec(bits=2, group_size=32)
    result = calibrate_model(copy.deepcopy(model), samples, spec, method="tlq", token_weights=weights, progress=False,
                             comm=observing(lambda name, h, c: seen.setdefault(name, (h.clone(), c.clone())))).results
    hessian, cross = seen["model.layers.1.mlp.down_proj"]
    original = model.model.layers[1].mlp.down_proj.weight.detach()
    expected = gptq_solve(fp_target_weight(original, hessian, cross, spec.damp), hessian, spec,
                          row_metric=factors[1]["mlp.down_proj"])
    assert torch.equal(result["model.layers.1.mlp.down_proj"].qweight, expected.qweight)
    plain = gptq_solve(fp_target_weight(original, hessian, cross, spec.damp), hessian, spec)
    assert not torch.equal(plain.qweight, expected.qweight)  # the factor changed the rounding


@pytest.mark.parametrize("width", [1, 5, 8, 64])
def test_block_gram_is_every_block_s_sum_of_outer_products(width: int) -> None:
    """block_gram (half the product mirrored) against the sum over tokens of g_t g_t^T per block, one outer product
    at a time in float64."""
    from quantkit.importance.backward import block_gram

    g = torch.randn(40, 3, width, generator=torch.Generator().manual_seed(11))
    reference = torch.zeros(3, width, width, dtype=torch.float64)
    for row in g.double():
        for block in range(3):
            reference[block] += torch.outer(row[block], row[block])
    gram = block_gram(g)
    assert gram.dtype == torch.float32
    assert torch.allclose(gram.double(), reference, rtol=1e-5, atol=1e-5)


def test_diagonal_blocks_keep_the_smaller_blocks_of_a_block_diagonal_factor() -> None:
    """Linears solved together whose factors have blocks of 16 and 8 rows join at 8: each 16-block's two 8 x 8
    diagonal blocks, the coupling between them dropped (a dense block-diagonal matrix masked by hand)."""
    from quantkit.engine.solve import diagonal_blocks

    generator = torch.Generator().manual_seed(3)
    factor = torch.randn(3, 16, 16, generator=generator, dtype=torch.float64)
    dense = torch.block_diag(*factor)
    mask = torch.block_diag(*[torch.ones(8, 8, dtype=torch.float64)] * 6)
    assert torch.equal(torch.block_diag(*diagonal_blocks(factor, 8)), dense * mask)
    assert diagonal_blocks(factor, 16) is factor


@pytest.mark.parametrize("command", ["calibrate", "importance"])
def test_a_bad_output_side_is_the_same_line_from_each_command_and_the_api(tmp_path: Path, no_model_load,
                                                                         command: str) -> None:
    """--output-side's bound is one entry of quantkit.bounds: both commands' option type refuses -1 as click parses
    it, in the same line; quantize's check (resolve_importance, which importance goes through too) says it its way."""
    model, text = save_tiny_llama(tmp_path / "model"), write_text(tmp_path / "text.txt")
    said = "--output-side must be at least 0, got -1"
    assert_fault(tmp_path, [command, model, "--calib", text, "--output-side", "-1", "-o", tmp_path / "out"], said)
    for side in (-1, True):
        with pytest.raises(quantkit.QuantkitError, match=r"is the rows per block of the output-side factor") as err:
            quantkit.quantize(str(model), data=str(text), importance={"output_side": side}, progress=False)
        assert str(err.value).endswith(f"got {side!r}")
