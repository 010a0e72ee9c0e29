"""Tokenize documents into one token stream and draw seeded calibration windows from it."""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence

import torch

from quantkit.data.sources import SourceLike, load_texts, source_units
from quantkit.errors import QuantkitError

DOC_SEPARATOR = "\n\n"
# Sample key of the source of each token ([1, T] long: the unit's index, -1 for a separator between documents
# of different units); calibration windows carry it when their text comes from several files or datasets.
SOURCE_KEY = "source_ids"


def valid_mask(sample: dict) -> torch.Tensor:
    """[T] bool: real (non-padding) tokens of a sample."""
    if "input_ids" not in sample:
        raise QuantkitError("calibration sample has no input_ids; token importance needs token ids for its labels")
    length = int(sample["input_ids"].shape[-1])
    attention = sample.get("attention_mask")
    if attention is None:
        return torch.ones(length, dtype=torch.bool)
    return attention.reshape(-1)[:length].bool().cpu()


def resolve_texts(source_or_texts: SourceLike | Sequence[str], part: str = "all") -> list[str]:
    """A list of documents: read a source (str/Path, or a list of Paths), or take a list of str as the texts.

    A list of texts counts as one unit for `part` (its last 10% of characters is the held-out part).
    """
    if isinstance(source_or_texts, list | tuple) and not source_or_texts:
        raise QuantkitError("no texts given: the list of documents is empty")
    if isinstance(source_or_texts, list | tuple) and all(isinstance(t, str) for t in source_or_texts) and source_or_texts:
        if part != "all":
            from quantkit.data.sources import split_part

            return split_part(source_or_texts, part)
        return list(source_or_texts)
    return load_texts(source_or_texts, part=part)


def resolve_units(source_or_texts: SourceLike | Sequence[str], part: str = "all") -> list[list[str]]:
    """resolve_texts' documents grouped by unit: each file or dataset of a source, or a list of texts as one."""
    if isinstance(source_or_texts, list | tuple) and all(isinstance(t, str) for t in source_or_texts):
        return [resolve_texts(source_or_texts, part=part)]  # one unit (an empty list: resolve_texts says so)
    return [docs for _, docs in source_units(source_or_texts, part)]


def tokenize_documents(texts: Sequence[str], tokenizer) -> torch.Tensor:
    """One LongTensor of token ids: each document tokenized alone, joined by eos (or by "\\n\\n" without one)."""
    return tokenize_units([texts], tokenizer)[0]


def tokenize_units(units: Sequence[Sequence[str]], tokenizer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """tokenize_documents over the documents of every unit in order, and the unit of each token (-1 on the eos
    between two documents); None for the units when the tokenizer has no eos (documents are then joined as text)."""
    docs, owner = [], []
    for index, unit in enumerate(units):
        for text in unit:
            if text:
                docs.append(text)
                owner.append(index)
    if not docs:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        ids = tokenizer(DOC_SEPARATOR.join(docs), add_special_tokens=False, verbose=False)["input_ids"]
        check_readable([ids], tokenizer, docs)
        return torch.tensor(ids, dtype=torch.long), None
    out: list[int] = []
    sources: list[int] = []
    encoded = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
    check_readable(encoded, tokenizer, docs)
    for i, ids in enumerate(encoded):
        if i:
            out.append(int(eos))
            sources.append(-1)
        out.extend(ids)
        sources.extend([owner[i]] * len(ids))
    return torch.tensor(out, dtype=torch.long), torch.tensor(sources, dtype=torch.long)


def check_readable(encoded: Sequence[Sequence[int]], tokenizer, docs: Sequence[str]) -> None:
    """Text the tokenizer reads: some tokens, and at most half of them its unknown token. Text in another script
    or encoding than the vocabulary (or a tokenizer that is not the model's) becomes <unk> after <unk>, and the
    model would be calibrated on one repeated token."""
    tokens = sum(len(ids) for ids in encoded)
    characters = sum(len(d) for d in docs)
    if characters and not tokens:
        raise QuantkitError(f"the tokenizer turns the text's {characters} characters into no tokens: it cannot read "
                            "this text (or is not the model's tokenizer); give text the model reads")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    unknown = sum(1 for ids in encoded for i in ids if i == unk)
    if 2 * unknown > tokens:
        raise QuantkitError(
            f"{unknown} of the text's {tokens} tokens ({unknown / tokens:.0%}) are the tokenizer's unknown token "
            f"{tokenizer.unk_token!r}: the model cannot read this text (another language, script or encoding than "
            "its vocabulary); give text the model reads"
        )


def draw_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int,
                 sources: torch.Tensor | None = None) -> list[dict[str, torch.Tensor]]:
    """`nsamples` windows of `seqlen` tokens at distinct seeded random starts; needs nsamples*seqlen tokens.
    With `sources` (one id per token of `ids`) each window also carries its tokens' ids under SOURCE_KEY."""
    if nsamples <= 0 or seqlen <= 0:
        raise QuantkitError(f"nsamples and seqlen must be positive, got {nsamples} and {seqlen}")
    need = nsamples * seqlen
    found = int(ids.numel())
    if found < need:
        raise QuantkitError(
            f"too little text: found {found} tokens, need {nsamples} x {seqlen} = {need}; "
            "give more text or lower --nsamples/--seqlen"
        )
    # found >= nsamples*seqlen guarantees found - seqlen + 1 >= nsamples distinct starts.
    starts = random.Random(seed).sample(range(found - seqlen + 1), nsamples)
    windows = [{"input_ids": ids[s : s + seqlen].clone().unsqueeze(0)} for s in starts]
    if sources is not None:
        for window, start in zip(windows, starts):
            window[SOURCE_KEY] = sources[start : start + seqlen].clone().unsqueeze(0)
    return windows


def calibration_samples(
    source_or_texts: SourceLike | Sequence[str],
    tokenizer,
    nsamples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    part: str = "all",
) -> list[dict[str, torch.Tensor]]:
    """Seeded calibration windows {"input_ids": LongTensor[1, seqlen]} drawn from a source or a list of texts.

    The documents are tokenized and joined by the tokenizer's eos token (or "\\n\\n"); the stream
    must hold at least nsamples x seqlen tokens (else QuantkitError saying how many were found), and
    nsamples distinct start positions are drawn with random.Random(seed), so windows may overlap
    but never repeat. Same seed, same data, same tokenizer: same samples. When the text comes from several
    units (files, datasets) each window also carries SOURCE_KEY, the unit of each of its tokens (for
    per-source analysis).
    """
    units = resolve_units(source_or_texts, part=part)
    ids, sources = tokenize_units(units, tokenizer)
    return draw_windows(ids, nsamples, seqlen, seed, sources if len(units) > 1 else None)


def text_samples(texts: Sequence[str], tokenizer, nsamples: int = 128, seqlen: int = 512, seed: int = 0,
                 part: str = "all") -> list[dict[str, torch.Tensor]]:
    """Each text one sample {"input_ids": LongTensor[1, T]}: its first `seqlen` tokens (T <= seqlen).

    The convention of llm-compressor's oneshot and GPTQModel's quantize for a list of texts: all of them in order
    when there are at most nsamples, else nsamples drawn with random.Random(seed) (in that order). A text of fewer
    than 2 tokens is skipped (it holds no prediction); one warning says so when fewer samples than nsamples
    remain. The samples must hold at least one seqlen's worth of tokens in all, else QuantkitError.
    """
    if nsamples <= 0 or seqlen <= 1:
        raise QuantkitError(f"nsamples must be positive and seqlen at least 2, got {nsamples} and {seqlen}")
    texts = [t for t in resolve_texts(list(texts), part=part) if t.strip()]
    order = list(range(len(texts)))
    if len(order) > nsamples:
        random.Random(seed).shuffle(order)
    samples: list[dict[str, torch.Tensor]] = []
    skipped = 0
    for index in order:
        ids = tokenizer(texts[index], add_special_tokens=False, verbose=False)["input_ids"][:seqlen]
        check_readable([ids], tokenizer, [texts[index]])
        if len(ids) < 2:
            skipped += 1
            continue
        samples.append({"input_ids": torch.tensor([ids], dtype=torch.long)})
        if len(samples) == nsamples:
            break
    tokens = sum(int(s["input_ids"].numel()) for s in samples)
    if tokens < seqlen:
        raise QuantkitError(f"the texts hold {tokens} tokens in all ({len(samples)} samples of 2 tokens or more), "
                            f"less than one seqlen ({seqlen}): too little to calibrate on; give more or longer texts")
    if len(samples) < nsamples:
        short = f" ({skipped} shorter than 2 tokens skipped)" if skipped else ""
        warnings.warn(f"{len(samples)} calibration samples, fewer than nsamples={nsamples}: each text is one sample"
                      f"{short}; give more texts, or one long text to cut into windows", stacklevel=3)
    return samples
