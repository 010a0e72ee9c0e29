"""Held-out loss and perplexity of a causal LM over sliding windows of a token stream."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from quantkit.data.samples import resolve_texts, tokenize_documents
from quantkit.data.sources import SourceLike
from quantkit.errors import QuantkitError


def window_plan(n_tokens: int, seqlen: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) of each window: targets first_scored..end-1 are scored with context from begin.

    Windows start at 0, stride, 2*stride, ...; each scores only the targets the previous window
    did not reach (never the window's first token, which has no context); the last window ends
    at the stream's end. With stride == seqlen the windows do not overlap.
    """
    plan = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seqlen, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            plan.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return plan


@torch.no_grad()
def loss_on_ids(
    model: torch.nn.Module,
    ids: torch.Tensor,
    seqlen: int = 256,
    stride: int | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    progress: bool = True,
    per_window: bool = False,
) -> dict:
    """Mean next-token cross-entropy (nats) and perplexity of `model` on a 1-D id stream.

    With per_window, also "window_nll" (summed nll of each window's scored targets, in plan order)
    and "window_tokens" (their counts): what a bootstrap over eval windows resamples.
    """
    stride = seqlen if stride is None else stride
    if seqlen < 2:
        raise QuantkitError(f"seqlen must be at least 2, got {seqlen}")
    if not 1 <= stride <= seqlen:
        raise QuantkitError(f"stride must be between 1 and seqlen ({seqlen}), got {stride}")
    n = int(ids.numel())
    if n < 2:
        raise QuantkitError(f"too little text to evaluate: found {n} tokens, need at least 2")
    plan = window_plan(n, seqlen, stride)
    was_training = model.training
    model.eval()
    total = 0.0
    count = 0
    window_nll: list[float] = []
    window_tokens: list[int] = []
    # Batch windows of equal length together (all but possibly the last).
    groups: list[list[tuple[int, int, int]]] = []
    for w in plan:
        if groups and len(groups[-1]) < batch_size and groups[-1][0][1] - groups[-1][0][0] == w[1] - w[0]:
            groups[-1].append(w)
        else:
            groups.append([w])
    bar = tqdm(total=len(plan), desc="eval", unit="win", disable=not progress, leave=False)
    try:
        for group in groups:
            batch = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
            logits = model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            nll = -logp.gather(-1, batch[:, 1:, None]).squeeze(-1)  # nll[:, j] is target j+1
            for row, (b, e, first) in enumerate(group):
                scored = nll[row, first - b - 1 : e - b - 1]
                window_sum = float(scored.double().sum())
                total += window_sum
                count += scored.numel()
                window_nll.append(window_sum)
                window_tokens.append(scored.numel())
            bar.update(len(group))
    finally:
        bar.close()
        model.train(was_training)
    loss = total / count
    out = {"loss": loss, "ppl": math.exp(loss), "tokens": count, "seqlen": seqlen, "stride": stride, "windows": len(plan)}
    if per_window:
        out.update(window_nll=window_nll, window_tokens=window_tokens)
    return out


def evaluate_loss(
    model: torch.nn.Module,
    tokenizer,
    texts_or_source: SourceLike | Sequence[str],
    seqlen: int = 256,
    stride: int | None = None,
    max_tokens: int | None = None,
    part: str = "all",
    device: str | torch.device = "cpu",
    progress: bool = True,
    batch_size: int = 8,
) -> dict:
    """Loss (mean token cross-entropy, nats) and perplexity over sliding windows of the tokenized text.

    Documents are joined by eos as for calibration; `max_tokens` keeps the first tokens of the
    stream. Returns {"loss", "ppl", "tokens" (scored), "seqlen", "stride", "windows"}.
    """
    texts = resolve_texts(texts_or_source, part=part)
    ids = tokenize_documents(texts, tokenizer)
    if max_tokens is not None:
        if max_tokens < 2:
            raise QuantkitError(f"max_tokens must be at least 2, got {max_tokens}")
        ids = ids[:max_tokens]
    return loss_on_ids(model, ids, seqlen=seqlen, stride=stride, device=device, batch_size=batch_size, progress=progress)


def sources_with_a_window(counts: dict[str, int], seqlen: int, what: str) -> list[str]:
    """The sources (label -> token count) that hold one `seqlen` window: each is scored as its own stream, so a
    shorter one gives windows of a handful of tokens, a loss that is noise reading like a result. The others are
    left out with one warning line; where none holds a window, QuantkitError (`what` says where the text is)."""
    short = [label for label, n in counts.items() if n < seqlen]
    if len(short) == len(counts):
        held = (f"{what} holds {max(counts.values())} tokens" if len(counts) == 1 else
                f"in {what}, each of its {len(counts)} sources (scored apart) holds at most {max(counts.values())} tokens")
        raise QuantkitError(f"too little text to evaluate: {held}, fewer than one --seqlen window ({seqlen}); give more "
                            "text, another --part or a smaller --seqlen")
    if short:
        logging.getLogger(__name__).warning(
            "left out %d source(s) holding fewer than one --seqlen window (%d tokens): %s", len(short), seqlen,
            ", ".join(f"{label} ({counts[label]})" for label in short))
    return [label for label in counts if label not in short]


def evaluate_sources(
    model: torch.nn.Module,
    tokenizer,
    sources: dict[str, Sequence[str]],
    seqlen: int = 256,
    stride: int | None = None,
    max_tokens: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    batch_size: int = 8,
) -> dict:
    """Loss and perplexity of each source (label -> documents, e.g. quantkit.data.load_texts_by_source) and
    over all of them.

    Each source is its own token stream (its documents joined by eos), so no window spans two sources,
    and `max_tokens` keeps the first tokens of each source: a short evaluation still reads every source.
    A source shorter than one `seqlen` window is left out with a warning (sources_with_a_window).
    The overall loss is the mean over every scored token of every source. Returns evaluate_loss's keys
    (tokens and windows summed) plus "by_source": {label: {"loss", "ppl", "tokens", "windows"}}.
    """
    if max_tokens is not None and max_tokens < 2:
        raise QuantkitError(f"max_tokens must be at least 2, got {max_tokens}")
    if not sources:
        raise QuantkitError("no sources to evaluate")
    by_source: dict[str, dict] = {}
    total, count, windows = 0.0, 0, 0
    streams = {label: tokenize_documents(list(texts), tokenizer)[:max_tokens] for label, texts in sources.items()}
    for label in sources_with_a_window({label: ids.numel() for label, ids in streams.items()}, seqlen, "the sources"):
        ids = streams[label]
        found = loss_on_ids(model, ids, seqlen=seqlen, stride=stride, device=device, batch_size=batch_size,
                            progress=progress)
        by_source[label] = {key: found[key] for key in ("loss", "ppl", "tokens", "windows")}
        total += found["loss"] * found["tokens"]
        count += found["tokens"]
        windows += found["windows"]
        stride = found["stride"]
    loss = total / count
    return {"loss": loss, "ppl": math.exp(loss), "tokens": count, "seqlen": seqlen, "stride": stride, "windows": windows,
            "by_source": by_source}
