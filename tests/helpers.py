"""Small builders shared by tests: a tiny random Llama saved with a word-level tokenizer, and text for it."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = [f"w{i}" for i in range(60)]


def make_tokenizer():
    """A word-level tokenizer over WORDS (ids 2..61; <unk> 0, <eos> 1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<eos>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def save_tiny_llama(root: Path, hidden: int = 32, layers: int = 2, max_positions: int = 64, seed: int = 0,
                    **config) -> Path:
    """A tiny random Llama (hidden 32, 2 layers) with its tokenizer, saved as a model directory."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                      max_position_embeddings=max_positions, **config)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root)
    make_tokenizer().save_pretrained(root)
    return root


def write_text(path: Path, words: int = 2000, seed: int = 0) -> Path:
    """Random text over the tokenizer's vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(WORDS), (words,), generator=generator)
    path.write_text(" ".join(WORDS[i] for i in picks))
    return path
