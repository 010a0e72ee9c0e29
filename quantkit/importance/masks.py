"""The token masks TLQ's importance works on: real tokens, scored positions, vision tokens, and the masked loss.

A sample is a dict of forward kwargs (``input_ids`` [1, T], optional ``attention_mask``, ``pixel_values``...)
with optional metadata ``loss_mask`` and ``vision_mask`` ([1, T] bool); see quantkit.importance for how
``loss_mask`` marks target tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantkit.data.samples import valid_mask
from quantkit.errors import QuantkitError

__all__ = ["masked_token_loss", "scored_positions", "valid_mask", "vision_tokens"]


def _length(sample: dict) -> int:
    if "input_ids" not in sample:
        raise QuantkitError("calibration sample has no input_ids; token importance needs token ids for its labels")
    return int(sample["input_ids"].shape[-1])


def scored_positions(sample: dict) -> torch.Tensor:
    """[T] bool: positions t whose prediction of token t + 1 counts in the loss (see quantkit.importance)."""
    length = _length(sample)
    valid = valid_mask(sample)
    targets = sample.get("loss_mask")
    targets = torch.ones(length, dtype=torch.bool) if targets is None else targets.reshape(-1).bool().cpu()
    if targets.numel() != length:
        raise QuantkitError(f"loss_mask has {targets.numel()} entries for {length} tokens")
    positions = torch.zeros(length, dtype=torch.bool)
    positions[:-1] = targets[1:] & valid[1:] & valid[:-1]
    return positions


def vision_tokens(sample: dict) -> torch.Tensor:
    """[T] bool: vision tokens of a sample (all False for plain text)."""
    length = _length(sample)
    mask = sample.get("vision_mask")
    if mask is None:
        return torch.zeros(length, dtype=torch.bool)
    return mask.reshape(-1).bool().cpu()


def masked_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [1, T, V] at the scored positions (label = next token)."""
    positions = scored.nonzero().reshape(-1).to(logits.device)
    labels = input_ids.reshape(-1).to(logits.device)[positions + 1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1])[positions].float(), labels)
