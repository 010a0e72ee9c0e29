"""Training a small Llama from text (quantkit.train)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from quantkit.errors import QuantkitError
from quantkit.train import train_causal_lm

TEXT = " ".join(
    f"the {a} {n} sees the {b} {m}." for a in ("red", "old", "small") for n in ("cat", "dog", "owl")
    for b in ("big", "green") for m in ("box", "hat", "key")
) + "\n"
KW = dict(vocab_size=300, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seqlen=32, batch_size=4,
          lr=1e-2, warmup=2, progress=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "lm"
    train_causal_lm([TEXT] * 4, out, steps=40, seed=0, save_steps=[10], corpora=["toy.txt"], **KW)
    return out


def window_loss(model, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy of a model on one sequence, from its logits."""
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits, ids[1:]).item()


def test_loss_goes_down_and_checkpoint_reloads(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(run)
    assert len(tok) <= 300 and tok.eos_token == "<|endoftext|>"
    ids = torch.tensor(tok(TEXT[:400], add_special_tokens=False)["input_ids"][:64])
    assert tok.decode(ids.tolist()) and "sees" in tok.decode(ids.tolist())
    trained = AutoModelForCausalLM.from_pretrained(run).eval()
    assert trained.config.model_type == "llama"
    # an untrained model of the same shape predicts at about ln(vocab); training must beat it clearly
    torch.manual_seed(1)
    fresh = LlamaForCausalLM(LlamaConfig.from_pretrained(run)).eval()
    assert window_loss(trained, ids) < window_loss(fresh, ids) - 1.0
    info = json.loads((run / "training.json").read_text())
    assert info["loss"] < info["first_loss"] - 1.0
    # the raw safetensors, loaded into a model built from config.json, give the same logits
    rebuilt = LlamaForCausalLM(LlamaConfig.from_pretrained(run)).eval()
    state = load_file(str(run / "model.safetensors"))
    missing, unexpected = rebuilt.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    rebuilt.tie_weights()
    with torch.no_grad():
        assert torch.equal(rebuilt(input_ids=ids[None]).logits, trained(input_ids=ids[None]).logits)


def test_training_json_counts(run):
    info = json.loads((run / "training.json").read_text())
    state = load_file(str(run / "model.safetensors"))
    params = sum(t.numel() for t in state.values())  # tied lm_head is stored once
    assert "lm_head.weight" not in state or not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    non_embedding = sum(t.numel() for k, t in state.items() if k.startswith(("model.layers.", "model.norm.")))
    # by hand: per layer 4 attention 32x32 + 3 MLP 32x64 + 2 norms of 32; final norm 32
    assert non_embedding == 2 * (4 * 32 * 32 + 3 * 32 * 64 + 2 * 32) + 32
    assert info["params"] == params
    assert info["non_embedding_params"] == non_embedding
    assert info["step"] == 40 and info["tokens_seen"] == 40 * 4 * 32
    assert info["seq"] == 32 and info["batch"] == 4 and info["corpora"] == ["toy.txt"]


def test_intermediate_checkpoint(run):
    step = run / "steps" / "step10"
    info = json.loads((step / "training.json").read_text())
    assert info["step"] == 10 and info["tokens_seen"] == 10 * 4 * 32
    assert (step / "model.safetensors").is_file() and (step / "tokenizer.json").is_file()
    a = load_file(str(step / "model.safetensors"))
    b = load_file(str(run / "model.safetensors"))
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"])


def test_deterministic_given_seed(tmp_path, run):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run)
    a = train_causal_lm([TEXT], tmp_path / "a", tokenizer=tok, steps=5, seed=7, **KW)
    b = train_causal_lm([TEXT], tmp_path / "b", tokenizer=tok, steps=5, seed=7, **KW)
    c = train_causal_lm([TEXT], tmp_path / "c", tokenizer=tok, steps=5, seed=8, **KW)
    sa, sb, sc = (load_file(str(p / "model.safetensors")) for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_bad_inputs(tmp_path, run):
    with pytest.raises(QuantkitError, match="too little text to train: found"):
        train_causal_lm(["a b"], tmp_path / "x", steps=2, **KW)
    with pytest.raises(QuantkitError, match="not divisible"):
        train_causal_lm([TEXT], tmp_path / "y", steps=2, **{**KW, "num_heads": 3})
    with pytest.raises(QuantkitError, match="already exists"):
        train_causal_lm([TEXT], run, steps=2, **KW)


def test_mixture_of_experts_trains_with_its_balancing_loss(tmp_path):
    """A Qwen3-MoE model trains (loss falls clearly), with the router's load-balancing loss while training and
    without it in the saved config, so transformers' loss on the saved model is the language-model loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, router_aux_loss_coef=0.01,
               head_dim=16, decoder_sparse_step=1, mlp_only_layers=[])
    out = train_causal_lm([TEXT] * 4, tmp_path / "moe", steps=30, seed=0, model_type="qwen3_moe", config_extra=moe, **KW)
    trained = AutoModelForCausalLM.from_pretrained(out).eval()
    assert trained.config.model_type == "qwen3_moe" and trained.config.num_experts == 4
    assert trained.config.output_router_logits is False
    info = json.loads((out / "training.json").read_text())
    assert info["loss"] < info["first_loss"] - 1.0
    ids = torch.tensor(AutoTokenizer.from_pretrained(out)(TEXT[:300], add_special_tokens=False)["input_ids"][:48])
    with torch.no_grad():
        loss = trained(input_ids=ids[None], labels=ids[None]).loss
    assert abs(float(loss) - window_loss(trained, ids)) < 1e-5
