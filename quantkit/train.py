"""Train a small Llama-architecture causal LM (and a byte-level BPE tokenizer) from text on CPU."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from quantkit.data.samples import tokenize_documents
from quantkit.errors import QuantkitError
from quantkit.fsutil import atomic_dir

EOS_TOKEN = "<|endoftext|>"


def train_tokenizer(texts: Sequence[str], vocab_size: int = 2048):
    """A byte-level BPE tokenizer trained on `texts`, wrapped as a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN)


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, tied ones once; non-embedding parameters: without input embedding and untied lm_head)."""
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    excluded = embed.numel()
    if head is not None and head.weight is not embed:
        excluded += head.weight.numel()
    return total, total - excluded


SCHEDULES = ("cosine", "constant")


def _lr_factor(progress: float, step: int, warmup: int, schedule: str = "cosine") -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _save(model, tokenizer, out: Path, info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(info, indent=1) + "\n")


@dataclass(frozen=True)
class TrainSettings:
    """The model a training run builds and how it is optimised (train_causal_lm's keyword settings)."""

    vocab_size: int = 2048  # of the BPE tokenizer trained when none is given
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int | None = None  # default: about 8/3 of the hidden size, a multiple of 32
    seqlen: int = 128
    batch_size: int = 16
    steps: int = 500
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: int = 20
    schedule: str = "cosine"  # or "constant"
    seed: int = 0

    @property
    def mlp_width(self) -> int:
        """The MLP's intermediate size: the one given, else about 8/3 of the hidden size, a multiple of 32."""
        return self.intermediate_size or 8 * self.hidden_size // 3 // 32 * 32 or self.hidden_size * 2

    @classmethod
    def of(cls, settings: dict) -> TrainSettings:
        """The settings named in `settings`, the defaults for the rest; QuantkitError naming an unknown one."""
        unknown = sorted(set(settings) - {f.name for f in fields(cls)})
        if unknown:
            raise QuantkitError(f"unknown training settings {unknown}; known: {', '.join(f.name for f in fields(cls))}")
        return cls(**settings)


def train_causal_lm(
    texts: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    save_steps: Sequence[int] = (),
    max_seconds: float | None = None,
    corpora: Sequence[str] = (),
    heldout: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    model_type: str = "llama",
    config_extra: dict | None = None,
    **settings,
) -> Path:
    """Train a Llama LM (or another transformers `model_type`, with `config_extra` for its own fields: a
    mixture of experts' expert count and width) with AdamW + warmup/cosine on CPU; save it (safetensors), its tokenizer and training.json.
    `settings` are TrainSettings' fields (model shape, optimisation, seed).

    Batches are random windows of `seqlen` tokens from the eos-joined token stream, drawn from a
    torch.Generator seeded with `seed`; the run is deterministic given the seed and the thread count.
    schedule="constant" keeps the learning rate flat after warmup, so every saved checkpoint is a
    model trained on its token count under the same recipe (no end-of-run annealing in the last).
    With `max_seconds`, the cosine schedule follows max(step/steps, elapsed/max_seconds) and training
    stops when either reaches 1 (then the step count depends on the machine's speed).
    Checkpoints at `save_steps` go to out_dir/steps/stepN. Returns out_dir.
    """
    t = TrainSettings.of(settings)
    vocab_size, hidden_size, num_layers, num_heads = t.vocab_size, t.hidden_size, t.num_layers, t.num_heads
    seqlen, batch_size, steps, lr = t.seqlen, t.batch_size, t.steps, t.lr
    weight_decay, warmup, schedule, seed = t.weight_decay, t.warmup, t.schedule, t.seed
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if steps <= 0 or batch_size <= 0 or seqlen < 2:
        raise QuantkitError(f"steps, batch_size must be positive and seqlen >= 2; got {steps}, {batch_size}, {seqlen}")
    if schedule not in SCHEDULES:
        raise QuantkitError(f"unknown learning-rate schedule {schedule!r}; choose {' or '.join(SCHEDULES)}")
    if hidden_size % num_heads:
        raise QuantkitError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    torch.manual_seed(seed)
    if tokenizer is None:
        tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    ids = tokenize_documents(texts, tokenizer)
    if ids.numel() < seqlen + 1:
        raise QuantkitError(f"too little text to train: found {ids.numel()} tokens, need at least seqlen + 1 = {seqlen + 1}")
    eos = tokenizer.eos_token_id
    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=t.mlp_width,
        max_position_embeddings=max(seqlen, 1024),
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    if model_type == "llama" and not config_extra:
        config = LlamaConfig(**fields)
        model = LlamaForCausalLM(config)
    else:
        extra = dict(config_extra or {})
        aux = "router_aux_loss_coef" in extra
        config = AutoConfig.for_model(model_type, **{**fields, **extra,
                                                     "output_router_logits": aux})
        model = AutoModelForCausalLM.from_config(config)
    model.train()
    params, non_embedding = count_params(model)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(seed)
    save_at = set(int(s) for s in save_steps)
    base_info = {
        "params": params,
        "non_embedding_params": non_embedding,
        "seq": seqlen,
        "batch": batch_size,
        "lr": lr,
        "schedule": schedule,
        "seed": seed,
        "corpora": list(corpora),
        "heldout": heldout,
        "corpus_tokens": int(ids.numel()),
    }
    losses: list[float] = []
    start = time.perf_counter()
    step = 0
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        # With a time budget the step count is unknown: the bar then counts steps without a total.
        bar = tqdm(total=steps if max_seconds is None else None, desc="train", unit="step", disable=not progress)
        while step < steps:
            elapsed = time.perf_counter() - start
            prog = step / steps if max_seconds is None else max(step / steps, elapsed / max_seconds)
            if max_seconds is not None and step > 0 and prog >= 1.0:
                break
            for group in opt.param_groups:
                group["lr"] = lr * _lr_factor(prog, step, warmup, schedule)
            starts = torch.randint(0, ids.numel() - seqlen + 1, (batch_size,), generator=gen)
            batch = torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if step in save_at:
                model.eval()
                _save(model, tokenizer, tmp / "steps" / f"step{step}", {"step": step, "tokens_seen": step * batch_size * seqlen, **base_info, "loss": losses[-1]})
                model.train()
        bar.close()
        model.eval()
        model.config.output_router_logits = False  # inference: the language-model loss only
        tail = losses[-10:]
        info = {
            "step": step,
            "tokens_seen": step * batch_size * seqlen,
            **base_info,
            "loss": sum(tail) / len(tail),
            "first_loss": losses[0],
            "seconds": round(time.perf_counter() - start, 2),
            "threads": torch.get_num_threads(),
        }
        _save(model, tokenizer, tmp, info)
    return Path(out_dir)
