"""A one-token-per-character tokenizer for tests: token counts equal character counts."""

from __future__ import annotations

CHARS = [chr(i) for i in range(32, 127)] + ["\n"]


def char_tokenizer():
    """One token per character (ids 1..96), eos '<eos>' = 0."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, **{c: i + 1 for i, c in enumerate(CHARS)}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[])), eos_token="<eos>")


def char_ids(text: str) -> list[int]:
    """The char tokenizer's ids, computed without it."""
    return [CHARS.index(c) + 1 for c in text]
