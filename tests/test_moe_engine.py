"""Mixture-of-experts calibration against references built from transformers' own (fused, eager) MoE modules:
each expert's Hessian and FP-target cross term come from the tokens its router sends it, weighted by those
tokens' TLQ weights; every expert on every token for statistics; an expert no token reaches is rounded to
nearest and says so; routers stay in full precision."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import observing, tiny_moe, whole_model_gradients

from quantkit.engine import calibrate_model
from quantkit.errors import QuantkitError
from quantkit.quant.methods import method_for
from quantkit.quant.rtn import rtn_solve
from quantkit.quant.spec import QuantSpec

SPEC = QuantSpec(bits=4, group_size=16)
NSAMPLES, TOKENS = 4, 16


def samples(seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 64, (1, TOKENS), generator=gen)} for _ in range(NSAMPLES)]


def eager(model):
    model.set_experts_implementation("eager")
    return model


def experts_of(model, layer: int):
    return model.model.layers[layer].mlp.experts


def leaves(family: str) -> tuple[str, str, str]:
    return ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")


def put_results(model, results: dict, family: str, names: list[str]) -> None:
    """Write results into a fused transformers model: expert projections into their slices of gate_up_proj
    [E, 2I, H] / down_proj [E, H, I] (gpt-oss: transposed, [E, H, 2I] / [E, I, H]), every other linear into its
    weight."""
    gate, up, down = leaves(family)
    if family == "gpt_oss":  # the same slices of the transposed parameters
        def fill(fused, e, leaf, weight):
            width = fused.down_proj.shape[1]
            target = {gate: fused.gate_up_proj.data[e, :, :width], up: fused.gate_up_proj.data[e, :, width:],
                      down: fused.down_proj.data[e]}[leaf]
            target.copy_(weight.T)
    else:
        def fill(fused, e, leaf, weight):
            width = fused.down_proj.shape[2]
            target = {gate: fused.gate_up_proj.data[e, :width], up: fused.gate_up_proj.data[e, width:],
                      down: fused.down_proj.data[e]}[leaf]
            target.copy_(weight)
    for name in names:
        weight = results[name].dequantize()
        parts = name.split(".")
        if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
            at = parts.index("experts")
            fused = model.get_submodule(".".join(parts[: at + 1]))
            fill(fused, int(parts[at + 1]), parts[at + 2], weight)
        else:
            model.get_submodule(name).weight.data.copy_(weight)


def experts_call(model, layer: int, batch: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts module's input [N, H] and each token's chosen experts [N, k] at `layer`, over every sample."""
    seen = []
    handle = experts_of(model, layer).register_forward_pre_hook(lambda mod, args: seen.append((args[0], args[1])))
    with torch.no_grad():
        for sample in batch:
            model(**sample)
    handle.remove()
    return torch.cat([s[0] for s in seen]).double(), torch.cat([s[1] for s in seen])


def weighted(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """2 / sum(w) * sum_t w_t x_t y_t^T."""
    return (2.0 / w.sum() * (x * w[:, None]).T @ y).float()


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_expert_statistics_come_from_its_routed_tokens(family: str) -> None:
    """TLQ with the FP target, layer by layer: expert e's gate/up Hessian is 2/sum(w) X~_S^T W X~_S over the
    tokens S the (partly quantized) model's router sends it, its cross term pairs them with the FP model's
    inputs on the same tokens; its down sees the quantized gate/up activation on S, paired with the FP one.
    The report counts S; the routers keep their FP weights."""
    fp = eager(tiny_moe(family))
    model, ref = copy.deepcopy(fp), copy.deepcopy(fp)
    batch = samples()
    gen = torch.Generator().manual_seed(5)
    per_layer = {layer: [torch.rand(TOKENS, generator=gen) + 0.1 for _ in batch] for layer in range(2)}
    seen: dict[str, tuple] = {}
    cal = calibrate_model(model, batch, SPEC, method="tlq", progress=False, fp_target=True,
                          token_weights=lambda layer: per_layer[layer],
                          comm=observing(lambda name, h, c: seen.__setitem__(name, (h, c))))
    gate, up, down = leaves(family)
    checked = 0
    for layer in range(2):
        prefix = f"model.layers.{layer}"
        mlp = f"{prefix}.mlp"
        w = torch.cat([x.reshape(-1).double() for x in per_layer[layer]])
        outside = [n for n in cal.results if n.startswith(prefix + ".") and ".experts." not in n]
        attention = [n for n in outside if ".self_attn." in n]
        put_results(ref, cal.results, family, attention)
        x_q, chosen = experts_call(ref, layer, batch)
        x_fp, _ = experts_call(fp, layer, batch)
        fp_experts = experts_of(fp, layer)
        width = fp_experts.down_proj.shape[2]
        for e in range(fp_experts.num_experts):
            routed = torch.where((chosen == e).any(dim=1))[0]
            name = f"{mlp}.experts.{e}"
            assert cal.report["layers"][layer]["linears"][f"mlp.experts.{e}.{gate}"]["routed_tokens"] == routed.numel()
            if routed.numel() == 0:
                continue
            ws, xq, xf = w[routed], x_q[routed], x_fp[routed]
            for leaf in (gate, up):
                h, c = seen[f"{name}.{leaf}"]
                assert torch.allclose(h, weighted(xq, xq, ws), rtol=1e-5, atol=1e-6), (name, leaf)
                assert torch.allclose(c, weighted(xf, xq, ws), rtol=1e-5, atol=1e-6), (name, leaf)
            wg, wu = (cal.results[f"{name}.{leaf}"].dequantize().double() for leaf in (gate, up))
            act_q = F.silu(xq @ wg.T) * (xq @ wu.T)
            fg, fu = fp_experts.gate_up_proj[e, :width].double(), fp_experts.gate_up_proj[e, width:].double()
            act_fp = F.silu(xf @ fg.T) * (xf @ fu.T)
            h, c = seen[f"{name}.{down}"]
            assert torch.allclose(h, weighted(act_q, act_q, ws), rtol=1e-5, atol=1e-6), name
            assert torch.allclose(c, weighted(act_fp, act_q, ws), rtol=1e-5, atol=1e-6), name
            checked += 1
        put_results(ref, cal.results, family, [n for n in cal.results if n.startswith(prefix + ".") and n not in attention])
    assert checked >= 6
    router = "gate"
    for layer in range(2):
        assert f"model.layers.{layer}.mlp.{router}" not in cal.results
        assert torch.equal(model.model.layers[layer].mlp.get_submodule(router).weight, fp.model.layers[layer].mlp.get_submodule(router).weight)
    if family == "qwen2_moe":  # the shared expert's gate scores one value per token: a gate, kept in FP
        assert not [n for n in cal.results if n.endswith("shared_expert_gate")]


def test_all_experts_sees_every_token_and_keeps_the_routed_output() -> None:
    """With expert_tokens "all" every expert's gate/up Hessian is over every token (its weights included), while the
    model passed to the next layer is the routed one: the codes of layer 1's attention equal those of a run
    whose layer 0 holds the same results under plain routing."""
    fp = eager(tiny_moe("qwen3_moe"))
    model = copy.deepcopy(fp)
    batch = samples(1)
    seen: dict[str, torch.Tensor] = {}
    cal = calibrate_model(model, batch, SPEC, method=method_for("gptq").with_expert_tokens("all"), progress=False,
                          comm=observing(lambda name, h, c: seen.__setitem__(name, h)))
    ref = copy.deepcopy(fp)
    put_results(ref, cal.results, "qwen3_moe", [n for n in cal.results if n.startswith("model.layers.0.self_attn.")])
    x_q, _ = experts_call(ref, 0, batch)
    every = torch.ones(x_q.shape[0], dtype=torch.float64)
    for e in range(4):
        assert torch.allclose(seen[f"model.layers.0.mlp.experts.{e}.gate_proj"], weighted(x_q, x_q, every),
                              rtol=1e-5, atol=1e-6)
        entry = cal.report["layers"][0]["linears"][f"mlp.experts.{e}.gate_proj"]
        assert entry["hessian_tokens"] == NSAMPLES * TOKENS and 0 <= entry["routed_tokens"] < NSAMPLES * TOKENS
    # layer 1 was calibrated on the routed output of the quantized layer 0
    put_results(ref, cal.results, "qwen3_moe", [n for n in cal.results if n.startswith("model.layers.0.")])
    put_results(ref, cal.results, "qwen3_moe", [n for n in cal.results if n.startswith("model.layers.1.self_attn.")])
    x_q1, _ = experts_call(ref, 1, batch)
    assert torch.allclose(seen["model.layers.1.mlp.experts.0.gate_proj"], weighted(x_q1, x_q1, every), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("family", "prior"), [("mixtral", 1.0), ("gpt_oss", 1.0), ("mixtral", 0.25)])
def test_mix_expert_tokens_weigh_routed_tokens_plus_an_every_token_prior(family: str, prior: float) -> None:
    """expert_tokens "mix", TLQ with the FP target: every expert runs on every token t of the N calibration tokens,
    weighted w_t * ([t routed to e] + prior * in_features / N) (prior: Method.expert_prior, 1 by default), so its
    gate/up Hessian is 2/sum(v) X~^T diag(v) X~ over all tokens with v those weights (cross term: FP inputs paired the
    same way) and its down's the same over the quantized gate/up activation (in_features: the expert's width). With
    gpt-oss expert 3's router bias far down no token picks it: its projections are still solved from the prior (not
    rounded to nearest). A prior that is no weight > 0 is refused."""
    fp = eager(tiny_moe(family))
    if family == "gpt_oss":
        for layer in fp.model.layers:
            layer.mlp.router.bias.data[3] = -1e4
    model, ref = copy.deepcopy(fp), copy.deepcopy(fp)
    batch = samples(2)
    gen = torch.Generator().manual_seed(7)
    per_layer = {layer: [torch.rand(TOKENS, generator=gen) + 0.1 for _ in batch] for layer in range(2)}
    seen: dict[str, tuple] = {}
    cal = calibrate_model(model, batch, SPEC, method=method_for("tlq").with_expert_tokens("mix", prior),
                          progress=False, fp_target=True, token_weights=lambda layer: per_layer[layer],
                          comm=observing(lambda name, h, c: seen.__setitem__(name, (h, c))))
    assert cal.report["expert_tokens"] == "mix" and cal.report["expert_prior"] == prior
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(QuantkitError, match="expert prior"):
            method_for("gptq").with_expert_tokens("mix", bad)
    gate, up, down = leaves(family)
    total = NSAMPLES * TOKENS
    for layer in range(2):
        prefix = f"model.layers.{layer}"
        w = torch.cat([x.reshape(-1).double() for x in per_layer[layer]])
        attention = [n for n in cal.results if n.startswith(prefix + ".self_attn.")]
        put_results(ref, cal.results, family, attention)
        x_q, chosen = experts_call(ref, layer, batch)
        x_fp, _ = experts_call(fp, layer, batch)
        fp_experts = experts_of(fp, layer)
        hidden = x_q.shape[1]
        for e in range(fp_experts.num_experts):
            routed = (chosen == e).any(dim=1).double()
            name = f"{prefix}.mlp.experts.{e}"
            for leaf in (gate, up):
                h, c = seen[f"{name}.{leaf}"]
                v = w * (routed + prior * hidden / total)
                assert torch.allclose(h, weighted(x_q, x_q, v), rtol=1e-5, atol=1e-6), (name, leaf)
                assert torch.allclose(c, weighted(x_fp, x_q, v), rtol=1e-5, atol=1e-6), (name, leaf)
            if family == "gpt_oss":  # gate_proj / up_proj: halves of gate_up [H, 2I] (interleaved), biased; its own gate fn
                q = torch.cat([cal.results[f"{name}.{leaf}"].dequantize().double().T for leaf in (gate, up)], dim=1)
                bias = fp_experts.gate_up_proj_bias[e].double()
                act_q = fp_experts._apply_gate(x_q @ q + bias)
                act_fp = fp_experts._apply_gate(x_fp @ fp_experts.gate_up_proj[e].double() + bias)
            else:
                wg, wu = (cal.results[f"{name}.{leaf}"].dequantize().double() for leaf in (gate, up))
                width = fp_experts.down_proj.shape[2]
                fg, fu = fp_experts.gate_up_proj[e, :width].double(), fp_experts.gate_up_proj[e, width:].double()
                act_q = F.silu(x_q @ wg.T) * (x_q @ wu.T)
                act_fp = F.silu(x_fp @ fg.T) * (x_fp @ fu.T)
            h, c = seen[f"{name}.{down}"]
            v = w * (routed + prior * act_q.shape[1] / total)
            assert torch.allclose(h, weighted(act_q, act_q, v), rtol=1e-5, atol=1e-6), name
            assert torch.allclose(c, weighted(act_fp, act_q, v), rtol=1e-5, atol=1e-6), name
            entry = cal.report["layers"][layer]["linears"][f"mlp.experts.{e}.{gate}"]
            assert entry["routed_tokens"] == int(routed.sum()) and "solved_by" not in entry
        if family == "gpt_oss":
            assert cal.report["layers"][layer]["linears"][f"mlp.experts.3.{gate}"]["routed_tokens"] == 0
        put_results(ref, cal.results, family, [n for n in cal.results if n.startswith(prefix + ".") and n not in attention])


def test_an_expert_no_token_reaches_is_rounded_to_nearest_and_reported(caplog) -> None:
    """gpt-oss's router bias for expert 3 is set far below the others, so no token picks it: its projections
    are RTN-quantized (codes equal rtn_solve's on the weights transformers' module holds), the report and a
    warning say so; nothing stays FP."""
    model = eager(tiny_moe("gpt_oss"))
    for layer in model.model.layers:
        layer.mlp.router.bias.data[3] = -1e4
    fp = copy.deepcopy(model)
    _, chosen = experts_call(copy.deepcopy(fp), 0, samples())
    assert chosen.numel() and not (chosen == 3).any()
    cal = calibrate_model(model, samples(), SPEC, method="gptq", progress=False)
    for layer in range(2):
        fused = fp.model.layers[layer].mlp.experts
        gate_up = fused.gate_up_proj[3]  # [H, 2I]: gate_proj and up_proj are its halves (llm-compressor's split)
        width = gate_up.shape[1] // 2
        weights = {"gate_proj": gate_up[:, :width].T, "up_proj": gate_up[:, width:].T, "down_proj": fused.down_proj[3].T}
        for leaf, weight in weights.items():
            name = f"model.layers.{layer}.mlp.experts.3.{leaf}"
            entry = cal.report["layers"][layer]["linears"][f"mlp.experts.3.{leaf}"]
            assert entry["solved_by"] == "rtn" and entry["routed_tokens"] == 0 and "output_rel_err" not in entry
            assert torch.equal(cal.results[name].qweight, rtn_solve(weight.float(), None, SPEC).qweight), name
        assert cal.report["layers"][layer]["linears"]["mlp.experts.0.gate_proj"]["routed_tokens"] > 0
    assert "no calibration token reached this expert" in caplog.text


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory) -> dict:
    """Saved tiny MoE models (Qwen2-MoE: per-expert checkpoint tensors and a shared expert; gpt-oss: fused
    checkpoint tensors) with a word tokenizer, and a text to calibrate on."""
    from helpers import make_tokenizer, write_text

    root = tmp_path_factory.mktemp("moe")
    dirs = {}
    for family in ("qwen2_moe", "gpt_oss"):
        tiny_moe(family).save_pretrained(root / family)
        make_tokenizer().save_pretrained(root / family)
        dirs[family] = root / family
    dirs["text"] = write_text(root / "calib.txt")
    return dirs


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_low_memory_is_byte_identical_with_experts(moe_dirs, family: str, tmp_path) -> None:
    """TLQ (its block-wise gradients run through the experts) with the FP target: streaming the layers from the
    checkpoint (per-expert tensors, or fused ones split on load) writes the files of the in-memory run."""
    from helpers import assert_same_files, run_calibration

    from quantkit.calibrate import DataSpec
    from quantkit.importance.cli import build_calibration_set

    weights = tmp_path / "set"
    build_calibration_set(str(moe_dirs[family]), DataSpec(source=str(moe_dirs["text"]), nsamples=4, seqlen=16),
                          str(weights), progress=False)
    kwargs = dict(method="tlq", calib_set=str(weights), progress=False, format="compressed-tensors")
    run_calibration(str(moe_dirs[family]), str(tmp_path / "plain"), SPEC, **kwargs)
    report = run_calibration(str(moe_dirs[family]), str(tmp_path / "low"), SPEC, low_memory=True, **kwargs)
    assert report["low_memory"] and report["layers"][1]["linears"]["mlp.experts.0.down_proj"]["routed_tokens"] >= 0
    assert_same_files(tmp_path / "plain", tmp_path / "low")


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss", "llama4_text"])
def test_blockwise_gradients_match_whole_model_autograd_through_experts(family: str) -> None:
    """TLQ's importance pass recomputes each block from its stored input and back-propagates block by block;
    through the unfused experts its layer-output gradients equal one whole-model autograd pass of transformers'
    own (fused) model."""
    from quantkit.importance import layer_output_gradients
    from quantkit.models.experts import unfuse_experts

    fused = tiny_moe(family)
    model = copy.deepcopy(fused)
    unfuse_experts(model)
    batch = samples(2)[:2]
    _, _, grads = layer_output_gradients(model, batch, keep_gradients=True, progress=False)
    for i, sample in enumerate(batch):
        for layer, ref in enumerate(whole_model_gradients(fused, fused.model.layers, sample)):
            assert ref.abs().sum() > 0
            assert float((grads[layer][i] - ref).norm() / ref.norm()) < 1e-5, (family, i, layer)


def test_two_ranks_are_byte_identical_with_experts(moe_dirs, tmp_path) -> None:
    """GPTQ with the FP target, expert tokens "mix" (every expert on every token, its routed ones weighted up by a
    prior that reads the token count over both ranks): two ranks (each expert's statistics summed over both shards,
    its rows solved where the plan puts them), in memory and streamed, write the files of one."""
    from helpers import assert_same_files, run_calibration

    spec = QuantSpec(bits=4, group_size=16)
    kwargs = dict(method="gptq", fp_target=True, calib=str(moe_dirs["text"]), nsamples=4, seqlen=16, progress=False,
                  expert_tokens="mix")
    run_calibration(str(moe_dirs["qwen2_moe"]), str(tmp_path / "one"), spec, **kwargs)
    report = run_calibration(str(moe_dirs["qwen2_moe"]), str(tmp_path / "two"), spec, nproc=2, **kwargs)
    assert report["world_size"] == 2 and report["expert_tokens"] == "mix"
    counts = [e["routed_tokens"] for n, e in report["layers"][0]["linears"].items() if n.endswith("gate_proj") and ".experts." in n]
    assert sum(counts) == 4 * 16 * 2  # both shards' tokens, two experts each
    assert_same_files(tmp_path / "one", tmp_path / "two")
    run_calibration(str(moe_dirs["qwen2_moe"]), str(tmp_path / "two_low"), spec, nproc=2, low_memory=True, **kwargs)
    assert_same_files(tmp_path / "one", tmp_path / "two_low")


def test_routed_rows_are_summed_sample_by_sample() -> None:
    """An expert's rows from several samples, in routing order, sum to exactly what the samples' own rows give
    added one sample at a time (what another split of the samples over ranks or batches adds): no float32
    product mixes samples."""
    from quantkit.engine.hessian import HessianAccumulator

    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(11, 8, generator=gen)
    fp = torch.randn(11, 8, generator=gen)
    sample = torch.tensor([1, 0, 1, 1, 0, 2, 0, 2, 1, 0, 2])
    weight = torch.rand(11, generator=gen) + 0.1
    mixed = HessianAccumulator(8, "cpu", cross=True)
    mixed.add(rows, weight, fp, sample)
    apart = HessianAccumulator(8, "cpu", cross=True)
    for s in range(3):
        keep = sample == s
        apart.add(rows[keep], weight[keep], fp[keep])
    assert torch.equal(mixed.hessian, apart.hessian) and torch.equal(mixed.cross, apart.cross)
    assert mixed.tokens == 11 and torch.allclose(mixed.weight_sums, apart.weight_sums)


def test_cli_all_experts_counts_routed_tokens_and_reloads_in_transformers(moe_dirs, tmp_path) -> None:
    """`quantkit calibrate --all-experts` on a Qwen2-MoE checkpoint: every expert's Hessian over every calibration
    token, the report's routed tokens per expert equal the routing of the exported model (loaded by plain
    transformers) on the calibration samples, and its logits are quantkit's own reading of the export."""
    import json

    pytest.importorskip("compressed_tensors")
    from helpers import run_cli
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import quantkit
    from quantkit.data import calibration_samples

    out = tmp_path / "out"
    result = run_cli("calibrate", moe_dirs["qwen2_moe"], "--calib", moe_dirs["text"], "--nsamples", 4, "--seqlen", 16,
                     "--method", "gptq", "--bits", 4, "--group-size", 16, "--all-experts", "--format",
                     "compressed-tensors", "-o", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "quantkit_report.json").read_text())
    assert report["expert_tokens"] == "all"
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    batch = calibration_samples(str(moe_dirs["text"]), AutoTokenizer.from_pretrained(moe_dirs["qwen2_moe"]), nsamples=4,
                                seqlen=16, seed=report["seed"], part=report["part"])
    for layer in range(2):
        _, chosen = experts_call(eager(theirs), layer, batch)
        linears = report["layers"][layer]["linears"]
        for e in range(4):
            entry = linears[f"mlp.experts.{e}.gate_proj"]
            assert entry["routed_tokens"] == int((chosen == e).any(dim=1).sum()), (layer, e)
            assert entry["hessian_tokens"] == 4 * 16
    ids = torch.randint(2, 62, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = quantkit.load_quantized(out)(input_ids=ids).logits
        assert (theirs(input_ids=ids).logits - ours).abs().max() <= 1e-3 * ours.abs().max()


def test_vlm_with_experts_reloads_in_transformers_with_its_fp_linears_ignored(tmp_path) -> None:
    """Aria: image-text with fused experts that transformers reads only fused (written dense) and a checkpoint whose
    module names differ from the model's (language_model.*): the compressed-tensors config ignores the FP linears
    (lm_head, vision tower, projector) by the names of the model transformers builds, which then computes the
    logits quantkit reads back."""
    pytest.importorskip("compressed_tensors")
    from helpers import make_tokenizer, random_model, run_calibration, tiny_vlm_config, write_text
    from transformers import AutoModelForImageTextToText

    import quantkit

    model = random_model(tiny_vlm_config("aria"), seed=0)
    model.save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    run_calibration(str(tmp_path / "model"), str(tmp_path / "out"), SPEC, method="rtn",
                    calib=str(write_text(tmp_path / "calib.txt", words=200)), nsamples=2, seqlen=16, progress=False,
                    format="compressed-tensors")
    ids = torch.randint(1, 60, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = quantkit.load_quantized(tmp_path / "out")(input_ids=ids).logits
        theirs = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
        names = {n for n, _ in theirs.named_modules()}
        logits = theirs(input_ids=ids).logits
    ignored = set(__import__("json").loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["ignore"])
    assert "lm_head" in ignored and ignored <= names
    assert (logits - ours).abs().max() <= 1e-3 * ours.abs().max()


def test_more_ranks_than_samples_with_only_routed_experts(tmp_path) -> None:
    """Mixtral's layers hold routed experts only (no linear's output is the MoE block's); with 3 ranks and 2 samples
    one rank holds no sample: it still takes part in every layer, and the files are those of one process."""
    from helpers import assert_same_files, run_calibration, save_tiny_causal_lm, write_text

    model_dir, text = save_tiny_causal_lm(tmp_path, "mixtral"), write_text(tmp_path / "t.txt")
    spec = QuantSpec(bits=4, group_size=32)
    kwargs = dict(method="gptq", calib=str(text), nsamples=2, seqlen=16, progress=False)
    run_calibration(str(model_dir), str(tmp_path / "one"), spec, **kwargs)
    report = run_calibration(str(model_dir), str(tmp_path / "three"), spec, nproc=3, **kwargs)
    assert report["world_size"] == 3
    assert_same_files(tmp_path / "one", tmp_path / "three")
