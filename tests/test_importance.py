"""Token importance: block-wise gradients vs whole-model autograd, weights, edge cases, the saved set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import tiny_model, tiny_vlm, whole_model_gradients

from quantkit.errors import QuantkitError
from quantkit.importance import (
    TokenImportance,
    importance_scores,
    layer_output_gradients,
    load_calibration_set,
    save_calibration_set,
    scored_positions,
    scores_to_weights,
    tlq_token_weights,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"


def tiny_llama(layers: int = 3, vocab: int = 97):
    return tiny_model("llama", seed=0, vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64).eval()


def tiny_qwen2():
    return tiny_model("qwen2", seed=1, vocab_size=89, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64).eval()


def tiny_qwen2_vl():
    return tiny_vlm(
        "qwen2_vl", seed=2,
        text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
                         max_position_embeddings=64, bos_token_id=0, eos_token_id=1),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, in_chans=3, patch_size=2,
                           spatial_merge_size=1, temporal_patch_size=1),
        image_token_id=120, video_token_id=121, vision_start_token_id=122,
    ).eval()


def assert_matches_autograd(model, layers, samples, adapter=None) -> None:
    _, _, grads = layer_output_gradients(model, samples, keep_gradients=True, progress=False, adapter=adapter)
    for i, sample in enumerate(samples):
        reference = whole_model_gradients(model, layers, sample)
        for layer, ref in enumerate(reference):
            assert ref.abs().sum() > 0
            rel = (grads[layer][i] - ref).norm() / ref.norm()
            assert rel < 1e-5, (i, layer, float(rel))


def test_blockwise_gradients_match_whole_model_autograd_llama() -> None:
    model = tiny_llama()
    samples = [{"input_ids": torch.randint(0, 97, (1, 12))} for _ in range(2)]
    samples.append({"input_ids": torch.randint(0, 97, (1, 9)), "loss_mask": torch.tensor([[0, 0, 0, 1, 1, 1, 0, 1, 1]]).bool()})
    assert_matches_autograd(model, model.model.layers, samples)


def test_batched_chunks_match_autograd_and_per_sample_pass(tmp_path) -> None:
    model = tiny_llama()
    generator = torch.Generator().manual_seed(4)
    samples = [{"input_ids": torch.randint(0, 97, (1, 12), generator=generator)} for _ in range(5)]
    samples[1]["loss_mask"] = torch.tensor([[0] * 6 + [1] * 6]).bool()  # masks are metadata: kwargs stay shared
    samples[3]["loss_mask"] = torch.zeros(1, 12, dtype=torch.bool)  # an empty sample inside a chunk
    with pytest.warns(UserWarning, match="empty loss mask"):
        scores, report, grads = layer_output_gradients(model, samples, keep_gradients=True, progress=False, batch_size=2)
    assert report["batch_size"] == 2
    with pytest.warns(UserWarning, match="empty loss mask"):
        single, report1, _ = layer_output_gradients(model, samples, progress=False, batch_size=1, offload_dir=tmp_path)
    assert report1["batch_size"] == 1
    for i, sample in enumerate(samples):
        if i == 3:
            assert all(torch.all(g[i] == 0) for g in grads)
            continue
        for layer, ref in enumerate(whole_model_gradients(model, model.model.layers, sample)):
            assert (grads[layer][i] - ref).norm() / ref.norm() < 1e-5, (i, layer)
            assert torch.allclose(scores[layer][i], single[layer][i], rtol=1e-4, atol=1e-12)
    with pytest.warns(UserWarning, match="empty loss mask"):
        offloaded, _, _ = layer_output_gradients(model, samples, progress=False, batch_size=4, offload_dir=tmp_path)
    for layer_scores, layer_offloaded in zip(scores, offloaded):
        for a, b in zip(layer_scores, layer_offloaded):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-12)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(QuantkitError, match="batch size"):
        layer_output_gradients(model, samples, progress=False, batch_size=0)


def test_head_gradient_in_row_blocks_and_one_layer_model(monkeypatch) -> None:
    # Blocks of 5 rows split samples and the chunk boundary: every block must land on its own rows.
    monkeypatch.setattr("quantkit.importance.backward.HEAD_ROWS", 5)
    generator = torch.Generator().manual_seed(7)
    samples = [{"input_ids": torch.randint(0, 97, (1, 12), generator=generator)} for _ in range(3)]
    samples[2]["loss_mask"] = torch.tensor([[0] * 9 + [1] * 3]).bool()
    for layers in (3, 1):
        model = tiny_llama(layers=layers)
        _, _, grads = layer_output_gradients(model, samples, keep_gradients=True, progress=False, batch_size=2)
        for i, sample in enumerate(samples):
            for layer, ref in enumerate(whole_model_gradients(model, model.model.layers, sample)):
                assert (grads[layer][i] - ref).norm() / ref.norm() < 1e-5, (layers, i, layer)


def test_blockwise_gradients_match_with_padding_and_offload(tmp_path) -> None:
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 10))
    sample = {"input_ids": ids, "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1]])}
    _, _, grads = layer_output_gradients(model, [sample], keep_gradients=True, progress=False, offload_dir=tmp_path)
    reference = whole_model_gradients(model, model.model.layers, sample)
    for layer, ref in enumerate(reference):
        assert (grads[layer][0] - ref).norm() / ref.norm() < 1e-5
    assert list(tmp_path.iterdir()) == []  # offloaded inputs are removed afterwards
    weights = tlq_token_weights(model, [sample], progress=False)
    assert torch.all(weights(0)[0][:2] == 0) and torch.all(weights(0)[0][2:] > 0)


def test_blockwise_gradients_match_whole_model_autograd_qwen2() -> None:
    model = tiny_qwen2()
    samples = [{"input_ids": torch.randint(0, 89, (1, 11))} for _ in range(2)]
    assert_matches_autograd(model, model.model.layers, samples)


def test_blockwise_gradients_match_qwen2_vl_text_and_image() -> None:
    model = tiny_qwen2_vl()
    text = {"input_ids": torch.randint(0, 100, (1, 10))}
    ids = torch.randint(0, 100, (1, 12))
    ids[0, 2] = 122
    ids[0, 3:7] = 120
    types = torch.zeros_like(ids)
    types[0, 3:7] = 1
    image = {
        "input_ids": ids, "pixel_values": torch.randn(4, 12), "image_grid_thw": torch.tensor([[1, 2, 2]]),
        "mm_token_type_ids": types, "loss_mask": torch.tensor([[0] * 8 + [1] * 4]).bool(), "vision_mask": ids == 120,
    }
    layers = model.model.language_model.layers
    assert_matches_autograd(model, layers, [text, image])
    # Vision tokens feed no loss through the last layer: their gradient there is exactly zero.
    scores, _, _ = layer_output_gradients(model, [image], progress=False)
    assert torch.all(scores[-1][0][3:7] == 0)
    weights = TokenImportance(scores, [image], lam=0.1)(1)[0]
    assert torch.allclose(weights[3:7], torch.full((4,), 0.1))


def test_scored_positions_follow_targets_and_padding() -> None:
    sample = {"input_ids": torch.arange(6).unsqueeze(0), "loss_mask": torch.tensor([[0, 0, 1, 1, 0, 1]]).bool()}
    assert scored_positions(sample).tolist() == [False, True, True, False, True, False]
    padded = {"input_ids": torch.arange(5).unsqueeze(0), "attention_mask": torch.tensor([[1, 1, 1, 0, 0]])}
    assert scored_positions(padded).tolist() == [True, True, False, False, False]


def test_weights_formula_power_and_per_modality() -> None:
    scores = torch.tensor([1.0, 3.0, 0.0, 4.0])
    valid = torch.tensor([True, True, True, False])
    w, fell_back = scores_to_weights(scores, valid, lam=0.2)
    mean = (1 + 3 + 0) / 3
    expected = torch.tensor([0.8 * 1 / mean + 0.2, 0.8 * 3 / mean + 0.2, 0.2, 0.0])
    assert torch.allclose(w, expected) and not fell_back
    w2, _ = scores_to_weights(scores, valid, lam=0.0, power=2.0)
    assert torch.allclose(w2[:3], torch.tensor([1.0, 9.0, 0.0]) / (10 / 3))
    vision = torch.tensor([True, False, False, False])
    w3, _ = scores_to_weights(torch.tensor([0.1, 3.0, 1.0, 0.0]), torch.ones(4, dtype=torch.bool), vision, lam=0.0, per_modality=True)
    assert torch.allclose(w3, torch.tensor([1.0, 3.0 / (4 / 3), 1.0 / (4 / 3), 0.0]))


def test_global_normalisation_divides_by_the_set_mean() -> None:
    samples = [{"input_ids": torch.zeros(1, 3, dtype=torch.long)}, {"input_ids": torch.zeros(1, 2, dtype=torch.long)}]
    scores = [[torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 0.0])]]
    glob = TokenImportance(scores, samples, lam=0.2, normalise="global")
    mean = 16.0 / 5
    assert torch.allclose(glob(0)[0], 0.8 * torch.tensor([1.0, 2.0, 3.0]) / mean + 0.2)
    assert torch.allclose(glob(0)[1], 0.8 * torch.tensor([10.0, 0.0]) / mean + 0.2)
    per_sample = TokenImportance(scores, samples, lam=0.2)
    assert torch.allclose(per_sample(0)[1], 0.8 * torch.tensor([2.0, 0.0]) + 0.2)
    assert glob.settings["normalise"] == "global"
    with pytest.raises(QuantkitError, match="normalise"):
        TokenImportance(scores, samples, normalise="batch")


def test_top_fraction_keeps_top_tokens_and_a_seeded_floor() -> None:
    scores = [[torch.arange(1.0, 41.0)]]
    sample = {"input_ids": torch.zeros(1, 40, dtype=torch.long)}
    kept = TokenImportance(scores, [sample], top_fraction=0.25, floor_fraction=0.5, seed=3)(0)[0]
    full = TokenImportance(scores, [sample])(0)[0]
    assert torch.all(kept[30:] == full[30:])  # the top 10 by weight
    floor = kept[:30] > 0
    assert 3 <= int(floor.sum()) <= 27 and torch.equal(kept[:30][floor], full[:30][floor])
    again = TokenImportance(scores, [sample], top_fraction=0.25, floor_fraction=0.5, seed=3)(0)[0]
    assert torch.equal(kept, again)


def test_empty_loss_mask_and_zero_gradients_get_uniform_weights() -> None:
    model = tiny_llama()
    empty = {"input_ids": torch.randint(0, 97, (1, 8)), "loss_mask": torch.zeros(1, 8, dtype=torch.bool)}
    normal = {"input_ids": torch.randint(0, 97, (1, 8))}
    with pytest.warns(UserWarning, match="empty loss mask"):
        weights = tlq_token_weights(model, [empty, normal], progress=False)
    assert weights.report["empty_loss_mask_samples"] == [0]
    for layer in range(3):
        assert torch.equal(weights(layer)[0], torch.ones(8))
        assert not torch.allclose(weights(layer)[1], torch.ones(8))
    with pytest.warns(UserWarning, match="all-zero gradients"):
        zero = TokenImportance([[torch.zeros(8)]], [normal])
    assert zero.report["zero_gradient"] == [[0, 0]] and torch.equal(zero(0)[0], torch.ones(8))


def test_calibration_set_round_trip_and_refusals(tmp_path) -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(97)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))
    model = tiny_llama()
    samples = [{"input_ids": torch.randint(0, 97, (1, 10)), "vision_mask": torch.zeros(1, 10, dtype=torch.bool)} for _ in range(3)]
    importance = tlq_token_weights(model, samples, progress=False)
    out = tmp_path / "set"
    manifest = save_calibration_set(out, samples, importance, model, "tiny", tokenizer)
    assert manifest["num_layers"] == 3 and set(manifest["files"]) == {"samples.safetensors", "weights.safetensors"}
    loaded, weights = load_calibration_set(out, None, model, tokenizer=tokenizer)
    for a, b in zip(samples, loaded):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["vision_mask"], b["vision_mask"])
    for layer in range(3):
        for a, b in zip(importance(layer), weights(layer)):
            assert torch.equal(a, b)
    with pytest.raises(QuantkitError, match="layers"):
        load_calibration_set(out, None, tiny_llama(layers=2), tokenizer=tokenizer)
    with pytest.raises(QuantkitError, match="config"):
        load_calibration_set(out, None, tiny_llama(vocab=98), tokenizer=tokenizer)
    with pytest.raises(QuantkitError, match="made for llama .* not this qwen2"):
        load_calibration_set(out, None, tiny_qwen2(), tokenizer=tokenizer)
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({**vocab, "x": 97}, unk_token="t0")))
    with pytest.raises(QuantkitError, match="different tokenizer"):
        load_calibration_set(out, None, model, tokenizer=other)
    with pytest.raises(QuantkitError, match="not found"):
        load_calibration_set(tmp_path / "missing", None, model)
    with pytest.raises(QuantkitError, match="overwrite"):
        save_calibration_set(out, samples, importance, model, "tiny", tokenizer)
    data = bytearray((out / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (out / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(QuantkitError, match="corrupt"):
        load_calibration_set(out, None, model, tokenizer=tokenizer)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(QuantkitError, match="corrupt"):
        load_calibration_set(out, None, model)


def test_importance_cli_on_reference_lm(tmp_path) -> None:
    ref_lm = SHARED / "models" / "ref-lm"
    text = SHARED / "data" / "text" / "tinyshakespeare.txt"
    if not (ref_lm / "config.json").is_file() or not text.is_file():
        pytest.skip(f"reference model or corpus not found under {SHARED} (../shared is absent outside the dev machine)")
    from quantkit.cli import main
    from quantkit.models import load_model

    out = tmp_path / "set"
    args = ["importance", str(ref_lm), "--calib", str(text), "--nsamples", "3", "--seqlen", "32", "--part", "train",
            "--top-fraction", "0.5", "-o", str(out), "--json", "--offload-dir", str(tmp_path / "off")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout.strip().splitlines()[-1])
    assert manifest["settings"]["top_fraction"] == 0.5 and manifest["tokenizer_hash"]
    model = load_model(str(ref_lm))
    samples, weights = load_calibration_set(out, str(ref_lm), model)
    layer = weights(5)  # text: with its output-side factors (the text default)
    assert len(samples) == 3 and len(layer.output) == 3 and layer.output[0].shape == (32,)
    assert layer.row_metrics["mlp.down_proj"].shape[1:] == (64, 64)  # gcd(128, 192 rows)
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "overwrite" in again.output
    bad = CliRunner().invoke(main, ["importance", str(ref_lm), "--calib", str(text), "--lam", "2", "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "lam" in bad.output


@pytest.mark.parametrize("options, message", [({"lam": 1.5}, "lam"), ({"power": 0}, "power"),
                                              ({"top_fraction": 0}, "top_fraction="), ({"lam_typo": 0.1}, "lam_typo")])
def test_bad_options_fail_before_the_gradient_pass(monkeypatch, options, message) -> None:
    import quantkit.importance.weights as token_weights

    def no_pass(*args, **kwargs):
        raise AssertionError("the gradient pass ran")

    # tlq_token_weights runs the pass through the name importance_scores of its own module
    monkeypatch.setattr(token_weights, "importance_scores", no_pass)
    with pytest.raises((QuantkitError, TypeError), match=message):
        tlq_token_weights(tiny_llama(), [{"input_ids": torch.randint(0, 97, (1, 8))}], progress=False, **options)


def test_clip_bounds_the_normalised_weights() -> None:
    """clip c: normalised scores clamped to [1/c, c] and rescaled to mean 1, then mixed with the floor lam."""
    scores = torch.tensor([0.0, 1.0, 2.0, 100.0])
    valid = torch.ones(4, dtype=torch.bool)
    w, _ = scores_to_weights(scores, valid, lam=0.25, clip=2.0)
    bounded = (scores / scores.mean()).clamp(0.5, 2.0)
    assert torch.allclose(w, 0.75 * bounded / bounded.mean() + 0.25)
    assert float(w.max() / w.min()) <= 4.0 + 1e-6
    with pytest.raises(QuantkitError, match="clip"):
        TokenImportance([[scores]], [{"input_ids": torch.zeros(1, 4, dtype=torch.long)}], clip=0.5)


def test_modality_floor_lifts_the_vision_ratio_to_the_median_over_layers() -> None:
    """Per layer, the vision/text ratio of mean weights below the median of the layers is raised to it (near it,
    after each sample keeps its mean weight); layers at or above the median are unchanged."""
    vision = torch.tensor([[True, True, False, False, False, False]])
    samples = [{"input_ids": torch.zeros(1, 6, dtype=torch.long), "vision_mask": vision}]
    text = torch.tensor([1.0, 2.0, 3.0, 2.0])
    scores = [[torch.cat([torch.tensor([v, v]), text])] for v in (2.0, 1.0, 0.1, 0.0)]  # the last layer: zero
    plain = TokenImportance(scores, samples, lam=0.0)
    floored = TokenImportance(scores, samples, lam=0.0, modality_floor=True)
    ratios = [float(w[0][:2].mean() / w[0][2:].mean()) for w in plain.weights]
    report = floored.report["modality_floor"]
    assert report["median"] == pytest.approx(sorted(ratios)[1] / 2 + sorted(ratios)[2] / 2, rel=1e-4)
    for layer, ratio in enumerate(ratios):
        after = floored.weights[layer][0]
        assert float(after.mean()) == pytest.approx(1.0)  # the sample keeps its mean weight
        if ratio >= report["median"]:
            assert torch.equal(after, plain.weights[layer][0])
        else:
            assert float(after[:2].mean() / after[2:].mean()) == pytest.approx(report["median"], rel=1e-4)
            assert bool((after[:2] > 0).all())  # zero-gradient image tokens are lifted too


def test_kept_graph_and_blockwise_passes_match_autograd_and_each_other(monkeypatch) -> None:
    """The pass that keeps each chunk's graph through every layer and the block-wise one (recompute from stored
    inputs; forced by a zero graph budget): each layer's gradient equals whole-model autograd's, and the two give
    the same scores and output-side factors bit for bit (the same operations on the same inputs)."""
    model = tiny_llama()
    generator = torch.Generator().manual_seed(9)
    samples = [{"input_ids": torch.randint(0, 97, (1, 12), generator=generator)} for _ in range(5)]
    samples[2]["loss_mask"] = torch.tensor([[0] * 7 + [1] * 5]).bool()
    found = {}
    for budget in (1 << 30, 0):
        monkeypatch.setattr("quantkit.importance.gradients.KEPT_GRAPH_BYTES", budget)
        found[budget] = importance_scores(model, samples, progress=False, keep_gradients=True, batch_size=2,
                                          output_side=8)
        assert found[budget].report["kept_graph"] is (budget > 0)
    for i, sample in enumerate(samples):
        for layer, ref in enumerate(whole_model_gradients(model, model.model.layers, sample)):
            for budget in found:
                assert (found[budget].gradients[layer][i] - ref).norm() / ref.norm() < 1e-5, (budget, i, layer)
    kept, blockwise = found[1 << 30], found[0]
    assert all(torch.equal(a, b) for x, y in zip(kept.layer, blockwise.layer) for a, b in zip(x, y))
    for x, y in zip(kept.linear_factors, blockwise.linear_factors):
        assert x.keys() == y.keys() and all(torch.equal(x[name], y[name]) for name in x)


@pytest.mark.parametrize("budget", [1 << 30, 0])
def test_layer_0_runs_once_per_chunk_where_the_graph_is_kept(monkeypatch, budget: int) -> None:
    """The graph budget was checked with a probe of its own: layer 0 ran once more per pass with autograd on. The
    first chunk's own forward measures it now: with the graph kept, layer 0 runs with autograd once per chunk (5
    chunks of one sample); over the budget, once (the first chunk's measure: under layer guidance the block-wise
    pass never differentiates layer 0; its FP forward and the input capture run without autograd)."""
    monkeypatch.setattr("quantkit.importance.gradients.KEPT_GRAPH_BYTES", budget)
    model = tiny_llama()
    generator = torch.Generator().manual_seed(4)
    samples = [{"input_ids": torch.randint(0, 97, (1, 12), generator=generator)} for _ in range(5)]
    calls: list[bool] = []
    handle = model.model.layers[0].register_forward_hook(lambda *args: calls.append(torch.is_grad_enabled()))
    try:
        found = importance_scores(model, samples, progress=False, batch_size=1)
    finally:
        handle.remove()
    assert found.report["kept_graph"] is (budget > 0)
    assert sum(calls) == (5 if budget else 1)
