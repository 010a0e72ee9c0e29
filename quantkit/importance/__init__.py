"""TLQ token importance and the token-level calibration set.

Conventions (see docs/tlq.md, "TLQ as quantkit defines it"):

- A sample is a dict of forward kwargs (``input_ids`` [1, T], optional ``attention_mask``,
  ``pixel_values``...) with optional metadata ``loss_mask`` and ``vision_mask`` ([1, T] bool).
- ``loss_mask[t]`` marks *target tokens* whose prediction counts (the convention of
  quantkit.data.images: answer/caption tokens): token t is predicted at position t - 1, so
  the scored positions are those t with ``loss_mask[t + 1]``. Default: every token but the
  first is a target. Padding (``attention_mask`` 0) is never a target nor a scoring position.
- Loss of a sample: mean cross-entropy over its scored positions. Raw score of layer l,
  token t: ``s = ||dL/dy_{l,t}||^2`` with y_l the layer's output (residual stream).
- Weight: ``w = (1 - lam) * s**p / mean(s**p) + lam`` on the sample's valid (non-padding)
  tokens, 0 on padding. The mean is taken **per sample** (not over the whole set): each
  sample's weights then average 1 over its valid tokens, so every sample adds the same
  total weight to H, as in plain GPTQ, and the weights only redistribute importance inside
  a sample. A global mean would let samples with few scored tokens (a short answer in a
  long image prompt: large per-token gradients under a mean loss) dominate H.
- Global normalisation (``normalise="global"``): the mean of s**p is taken over the valid
  tokens of all samples of the layer instead of per sample (an option; per sample is default).
- Per-modality: the mean is taken within vision tokens and within text tokens separately
  (MBQ-style balance), so the ~10x smaller vision gradients are not crushed by the mix.
- Top fraction f: per sample and layer, keep the ceil(f * n_valid) tokens of largest weight
  plus a seeded random floor sample (each remaining valid token kept with probability
  ``floor_fraction``), all with their unchanged weights; the rest weigh 0.
- Edge cases: a sample with an empty loss mask has zero gradients everywhere: its tokens get
  uniform weight 1 (``report["empty_loss_mask_samples"]``); a (layer, sample) whose scores
  are all zero (or whose per-modality group is all zero) falls back to uniform weight 1
  within that group (``report["zero_gradient"]`` lists them, with a warning).

Modules: masks (real tokens, scored positions, vision tokens), gradients (the block-wise backward
that gives raw scores), weights (scores -> weights, settings, tlq_token_weights), calibration_set
(the set on disk), identity (which model and tokenizer a set was made on), cli (`quantkit importance`, not
imported here).
"""

from __future__ import annotations

from quantkit.importance.calibration_set import (
    LINEAR_KEY,
    MANIFEST_FILE,
    SAMPLES_FILE,
    SET_FORMAT,
    SET_FORMAT_VERSION,
    WEIGHTS_FILE,
    StoredWeights,
    file_sha256,
    load_calibration_set,
    read_manifest,
    save_calibration_set,
)
from quantkit.importance.gradients import (
    GUIDANCE_CHOICES,
    LOSS_CHOICES,
    ImportanceScores,
    check_guidance,
    importance_scores,
    layer_output_gradients,
)
from quantkit.importance.identity import check_set_matches, config_hash, tokenizer_hash
from quantkit.importance.masks import masked_token_loss, scored_positions, valid_mask, vision_tokens
from quantkit.importance.weights import (
    IMAGE_TLQ_DEFAULTS,
    NORMALISE_CHOICES,
    OUTPUT_SIDE_SHRINK,
    TLQ_DEFAULTS,
    TokenImportance,
    check_settings,
    resolve_importance,
    scores_to_weights,
    select_top_fraction,
    tlq_defaults,
    tlq_token_weights,
)

__all__ = [
    "GUIDANCE_CHOICES",
    "IMAGE_TLQ_DEFAULTS",
    "LINEAR_KEY",
    "LOSS_CHOICES",
    "MANIFEST_FILE",
    "NORMALISE_CHOICES",
    "OUTPUT_SIDE_SHRINK",
    "SAMPLES_FILE",
    "SET_FORMAT",
    "SET_FORMAT_VERSION",
    "TLQ_DEFAULTS",
    "WEIGHTS_FILE",
    "ImportanceScores",
    "StoredWeights",
    "TokenImportance",
    "check_guidance",
    "check_set_matches",
    "check_settings",
    "config_hash",
    "file_sha256",
    "importance_scores",
    "layer_output_gradients",
    "load_calibration_set",
    "masked_token_loss",
    "read_manifest",
    "resolve_importance",
    "save_calibration_set",
    "scored_positions",
    "scores_to_weights",
    "select_top_fraction",
    "tlq_defaults",
    "tlq_token_weights",
    "tokenizer_hash",
    "valid_mask",
    "vision_tokens",
]
