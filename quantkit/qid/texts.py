"""A QiD grid's token streams: the eval and calibration text tokenized once per tokenizer, and checked to hold
what the grid reads before any cell runs."""

from __future__ import annotations

import hashlib
from typing import Any

from quantkit.errors import QuantkitError

_TOKEN_CACHE: dict[tuple, object] = {}


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's full definition (checkpoints of one run share it)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else f"{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}"
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def cached_ids(source: str, part: str, tokenizer):
    """The eos-joined token stream of a source's part, tokenized once per (source, part, tokenizer)."""
    from quantkit.data import resolve_texts, tokenize_documents

    key = (source, part, tokenizer_fingerprint(tokenizer))
    if key not in _TOKEN_CACHE:
        _TOKEN_CACHE[key] = tokenize_documents(resolve_texts(source, part=part), tokenizer)
    return _TOKEN_CACHE[key]


def load_tokenizer(name: str, revision: str | None, spec: str):
    """The tokenizer of checkpoint `spec` (`name` at `revision`), or one QuantkitError."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, revision=revision)
    except (OSError, ValueError) as err:
        raise QuantkitError(f"cannot load a tokenizer for {spec}: {str(err).splitlines()[0]}") from err


def check_text_amounts(tokenizer, spec: str, m: Any, calibrates: bool = True) -> None:
    """Under checkpoint `spec`'s tokenizer, the calibration text of the grid settings `m` (a Measurement) holds
    --nsamples x --calib-seqlen tokens where a cell `calibrates`, and the eval text one --eval-seqlen window:
    too little text would fail every cell into the CSV instead."""
    needs = [(m.calib, m.calib_part, m.nsamples * m.calib_seqlen, f"--nsamples {m.nsamples} x --calib-seqlen "
              f"{m.calib_seqlen}", "--nsamples/--calib-seqlen")] if calibrates else []
    needs.append((m.eval_text, m.eval_part, m.eval_seqlen, f"one --eval-seqlen {m.eval_seqlen} window", "--eval-seqlen"))
    for source, part, need, what, lower in needs:
        found = cached_ids(source, part, tokenizer).numel()
        if found < need:
            raise QuantkitError(f"too little text: the {part} part of {source} holds {found} tokens of {spec}'s "
                                f"tokenizer, and {what} needs {need}; give more text or lower {lower}")
