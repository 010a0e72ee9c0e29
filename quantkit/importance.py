"""TLQ token importance and the token-level calibration set.

Conventions (see the README, "TLQ as quantkit defines it"):

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

Memory: the forward pass stores every layer's FP input for each sample (in RAM, or in one
safetensors file per layer under an offload directory), then the backward runs block by
block from the top, recomputing each layer from its stored input; only one decoder layer
(plus final norm and lm_head for the top) and one chunk's activations are live at a time.
Samples that share their layer kwargs (plain text of one length) run in chunks of
``batch_size`` along the batch dimension (checked once against per-sample outputs; else one
sample at a time). The top block runs the last decoder layer with autograd, so that layer is
not run twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from quantkit.engine.capture import LayerInputs, capture_layer_inputs, run_layer
from quantkit.engine.weights import LayerWeights, row_ranges
from quantkit.errors import QuantkitError
from quantkit.fsutil import atomic_dir
from quantkit.models import adapter_for, get_module
from quantkit.models.base import Adapter, layer_output

SET_FORMAT = "quantkit.tlq-calibration-set"
SET_FORMAT_VERSION = 1
# weights.safetensors key prefix of per-linear weights: f"linear.{layer}.{name}" -> [samples, Tmax, groups]
LINEAR_KEY = "linear"
SAMPLES_FILE = "samples.safetensors"
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
# Token-weight normalisation: per sample (default) or over the whole set, per layer.
NORMALISE_CHOICES = ("sample", "global")
# Config keys that do not change the model's function (bookkeeping, dtype, runtime flags).
_CONFIG_HASH_IGNORED = {
    "_name_or_path", "_commit_hash", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "_attn_implementation", "_attn_implementation_autoset", "output_attentions", "output_hidden_states",
    "return_dict", "architectures",
}


# ----------------------------------------------------------------------------- masks


def _length(sample: dict) -> int:
    if "input_ids" not in sample:
        raise QuantkitError("calibration sample has no input_ids; token importance needs token ids for its labels")
    return int(sample["input_ids"].shape[-1])


def valid_mask(sample: dict) -> torch.Tensor:
    """[T] bool: real (non-padding) tokens of a sample."""
    length = _length(sample)
    attention = sample.get("attention_mask")
    if attention is None:
        return torch.ones(length, dtype=torch.bool)
    return attention.reshape(-1)[:length].bool().cpu()


def scored_positions(sample: dict) -> torch.Tensor:
    """[T] bool: positions t whose prediction of token t + 1 counts in the loss (see module doc)."""
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


# ----------------------------------------------------------------------------- weights


def scores_to_weights(
    scores: torch.Tensor,
    valid: torch.Tensor,
    vision: torch.Tensor | None = None,
    *,
    lam: float = 0.1,
    power: float = 1.0,
    per_modality: bool = False,
    group_means: Sequence[float] | None = None,
) -> tuple[torch.Tensor, bool]:
    """Token weights [T] from raw scores [T]; also whether some group fell back to uniform.

    group_means: the mean of s**p to divide by, per group ([valid] or [vision, text] with
    per_modality), e.g. taken over the whole set (global normalisation); default: this sample's.
    A group whose own scores are all zero still falls back to uniform weight 1.
    """
    scores = scores.float().clamp_min(0)
    scaled = scores.pow(power) if power != 1.0 else scores
    normalised = torch.zeros_like(scaled)
    vision = torch.zeros_like(valid) if vision is None else vision
    groups = [valid & vision, valid & ~vision] if per_modality else [valid]
    fell_back = False
    for position, group in enumerate(groups):
        if not bool(group.any()):
            continue
        mean = scaled[group].mean()
        if float(mean) > 0 and math.isfinite(float(mean)):
            if group_means is not None and group_means[position] > 0:
                mean = torch.tensor(float(group_means[position]))
            normalised[group] = scaled[group] / mean
        else:
            normalised[group] = 1.0
            fell_back = True
    weights = (1.0 - lam) * normalised + lam
    return torch.where(valid, weights, torch.zeros_like(weights)), fell_back


def select_top_fraction(
    weights: torch.Tensor, valid: torch.Tensor, fraction: float, floor_fraction: float, generator: torch.Generator
) -> torch.Tensor:
    """Zero all but the top `fraction` of valid tokens by weight and a random `floor_fraction` of the rest."""
    count = int(valid.sum())
    if count == 0:
        return weights
    keep_top = max(1, math.ceil(fraction * count))
    order = torch.argsort(torch.where(valid, weights, torch.full_like(weights, -1.0)), descending=True, stable=True)
    keep = torch.zeros_like(valid)
    keep[order[:keep_top]] = True
    rest = valid & ~keep
    keep |= rest & (torch.rand(weights.shape, generator=generator) < floor_fraction)
    return torch.where(keep, weights, torch.zeros_like(weights))


class TokenImportance:
    """Per-layer token scores and weights; calling it with a layer index gives the engine's weights.

    With per-linear scores (guidance "linear") each linear gets weights of its own, made from its
    scores by the same rule ([T, g] scores: per output-row group), and a call returns LayerWeights.
    """

    def __init__(
        self,
        scores: list[list[torch.Tensor]],
        samples: Sequence[dict],
        *,
        lam: float = 0.1,
        power: float = 1.0,
        per_modality: bool = False,
        top_fraction: float | None = None,
        floor_fraction: float = 0.1,
        seed: int = 0,
        report: dict | None = None,
        normalise: str = "sample",
        linear_scores: list[dict[str, list[torch.Tensor]]] | None = None,
    ) -> None:
        check_settings(lam, power, top_fraction, floor_fraction, normalise)
        self.scores = scores
        self.linear_scores = linear_scores
        self.settings = {
            "lam": lam, "power": power, "per_modality": per_modality, "normalise": normalise,
            "top_fraction": top_fraction, "floor_fraction": floor_fraction, "seed": seed,
        }
        self.floor = lam
        self.valid = [valid_mask(s) for s in samples]
        self.scored = [scored_positions(s) for s in samples]
        self.vision = [vision_tokens(s) for s in samples]
        self.report = dict(report or {})
        zero_groups: list[list[int]] = []
        self.weights = [self._weigh(layer, layer_scores, zero_groups) for layer, layer_scores in enumerate(scores)]
        self.linear_weights: list[dict[str, list[torch.Tensor]]] | None = None
        self.linear_groups: dict[str, int] = {}
        if linear_scores is not None:
            self.linear_weights = []
            for layer, by_linear in enumerate(linear_scores):
                row = {}
                for name, per_sample in by_linear.items():
                    groups = 1 if per_sample[0].dim() == 1 else per_sample[0].shape[1]
                    self.linear_groups[name] = groups
                    columns = [self._weigh(layer, [score[:, k] if groups > 1 else score for score in per_sample], [])
                               for k in range(groups)]
                    row[name] = [torch.stack(parts, dim=1) if groups > 1 else parts[0] for parts in zip(*columns)]
                self.linear_weights.append(row)
        empty = set(self.report.get("empty_loss_mask_samples", []))
        self.report["zero_gradient"] = [pair for pair in zero_groups if pair[1] not in empty]
        if self.report["zero_gradient"]:
            warnings.warn(
                f"{len(self.report['zero_gradient'])} (layer, sample) token groups had all-zero gradients; "
                "they got uniform weights",
                stacklevel=2,
            )

    def _weigh(self, layer: int, layer_scores: list[torch.Tensor], zero_groups: list[list[int]]) -> list[torch.Tensor]:
        """Weights [T] per sample from one layer's (or linear's) raw scores [T] per sample."""
        settings = self.settings
        means = None
        if settings["normalise"] == "global":
            means = self._global_means(layer_scores, settings["power"], settings["per_modality"])
        row = []
        for index, score in enumerate(layer_scores):
            weight, fell_back = scores_to_weights(
                score, self.valid[index], self.vision[index], lam=settings["lam"], power=settings["power"],
                per_modality=settings["per_modality"], group_means=means,
            )
            if fell_back:
                zero_groups.append([layer, index])
            if settings["top_fraction"] is not None:
                generator = torch.Generator().manual_seed(settings["seed"] * 1_000_003 + layer * 65_537 + index)
                weight = select_top_fraction(
                    weight, self.valid[index], settings["top_fraction"], settings["floor_fraction"], generator
                )
            row.append(weight)
        return row

    def _global_means(self, layer_scores: list[torch.Tensor], power: float, per_modality: bool) -> list[float]:
        """Mean of s**p over the valid tokens of all samples (per modality group): global normalisation."""
        scaled = [score.float().clamp_min(0).pow(power) for score in layer_scores]
        masks = [
            [valid & vision, valid & ~vision] if per_modality else [valid]
            for valid, vision in zip(self.valid, self.vision)
        ]
        means = []
        for position in range(2 if per_modality else 1):
            total = sum(float(s[m[position]].sum()) for s, m in zip(scaled, masks))
            count = sum(int(m[position].sum()) for m in masks)
            means.append(total / count if count else 0.0)
        return means

    @property
    def num_layers(self) -> int:
        """Number of decoder layers the weights cover."""
        return len(self.weights)

    def __call__(self, layer: int) -> list[torch.Tensor] | LayerWeights:
        """One weight tensor [T] per sample for decoder layer `layer` (LayerWeights with per-linear weights)."""
        if self.linear_weights is None:
            return self.weights[layer]
        return LayerWeights(self.weights[layer], self.linear_weights[layer], dict(self.linear_groups), self.floor)

    def stacked(self, which: str = "weights") -> torch.Tensor:
        """[layers, samples, Tmax] float32 of weights or scores, zero-padded past each sample's length."""
        rows = self.weights if which == "weights" else self.scores
        tmax = max(t.numel() for t in rows[0])
        out = torch.zeros(len(rows), len(rows[0]), tmax)
        for layer, row in enumerate(rows):
            for index, value in enumerate(row):
                out[layer, index, : value.numel()] = value.float()
        return out


GUIDANCE_CHOICES = ("layer", "linear")
LOSS_CHOICES = ("ce", "fisher")
# TLQ's defaults, chosen on validation windows (benchmarks/bench_tlq.py --validation).
TLQ_DEFAULTS = {"guidance": "layer", "row_groups": 1, "loss": "ce", "draws": 1, "lam": 0.1, "power": 1.0}


def check_guidance(guidance: str, row_groups: int, loss: str, draws: int) -> None:
    """Raise QuantkitError on gradient-guidance settings out of range."""
    if guidance not in GUIDANCE_CHOICES:
        raise QuantkitError(f"guidance must be one of {GUIDANCE_CHOICES}, got {guidance!r}")
    if loss not in LOSS_CHOICES:
        raise QuantkitError(f"importance loss must be one of {LOSS_CHOICES}, got {loss!r}")
    if row_groups < 1:
        raise QuantkitError(f"row groups must be at least 1, got {row_groups}")
    if row_groups > 1 and guidance != "linear":
        raise QuantkitError("output-row groups need per-linear guidance (--guidance linear)")
    if draws < 1:
        raise QuantkitError(f"Fisher draws must be at least 1, got {draws}")


def check_settings(
    lam: float, power: float, top_fraction: float | None, floor_fraction: float, normalise: str = "sample"
) -> None:
    """Raise QuantkitError on importance settings out of range."""
    if normalise not in NORMALISE_CHOICES:
        raise QuantkitError(f"normalise must be one of {NORMALISE_CHOICES}, got {normalise!r}")
    if not 0.0 <= lam <= 1.0:
        raise QuantkitError(f"lam must be in [0, 1], got {lam}")
    if not power > 0:
        raise QuantkitError(f"power must be positive, got {power}")
    if top_fraction is not None and not 0.0 < top_fraction <= 1.0:
        raise QuantkitError(f"top fraction must be in (0, 1], got {top_fraction}")
    if not 0.0 <= floor_fraction <= 1.0:
        raise QuantkitError(f"floor fraction must be in [0, 1], got {floor_fraction}")


# ----------------------------------------------------------------------------- gradients


class _StoredInputs:
    """Every layer's FP input per sample: in RAM, or one safetensors file per layer on disk."""

    def __init__(self, offload_dir: str | Path | None) -> None:
        self.memory: dict[int, list[torch.Tensor]] = {}
        self.root: Path | None = None
        if offload_dir is not None:
            Path(offload_dir).mkdir(parents=True, exist_ok=True)
            self.root = Path(tempfile.mkdtemp(prefix="tlq-inputs-", dir=offload_dir))

    def put(self, layer: int, hidden: list[torch.Tensor]) -> None:
        if self.root is None:
            self.memory[layer] = [h.detach() for h in hidden]
            return
        from safetensors.torch import save_file

        # clone: batched outputs are views of one chunk tensor, and safetensors refuses shared storage
        save_file({str(i): h.detach().cpu().clone() for i, h in enumerate(hidden)}, self.root / f"layer{layer}.safetensors")

    @contextlib.contextmanager
    def reader(self, layer: int) -> Iterator:
        if self.root is None:
            hidden = self.memory.pop(layer)
            yield lambda i: hidden[i]
            return
        from safetensors import safe_open

        with safe_open(self.root / f"layer{layer}.safetensors", framework="pt") as handle:
            yield lambda i: handle.get_tensor(str(i))

    def close(self) -> None:
        self.memory.clear()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Turn off parameter gradients (only input gradients are wanted) and dropout."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    training = module.training
    for p, _ in flags:
        p.requires_grad_(False)
    module.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        module.train(training)


def _chunks(indices: Sequence[int], size: int) -> list[list[int]]:
    indices = list(indices)
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def _run_chunk(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One decoder layer on a batch [B, T, d] of samples that share `kwargs` (batch-1 tensors broadcast)."""
    return layer_output(layer(hidden, **kwargs))


# Rows of the lm_head + cross-entropy gradient computed at once: a [rows, vocab] block of logits
# and its softmax stay in cache (a whole chunk's logits, [B * T, V], do not, which costs ~2x).
_HEAD_ROWS = 512


def _head_gradient(
    head: nn.Module, hidden: torch.Tensor, input_ids: list[torch.Tensor], scored: list[torch.Tensor],
    samplers: list[list[torch.Generator]] | None = None,
) -> torch.Tensor:
    """d/d(hidden) of the sum over a chunk's samples of each one's mean cross-entropy at its scored
    positions: [draws, B, T, d].

    hidden [B, T, d] is the final norm's output. Only scored rows go through lm_head, in blocks
    of _HEAD_ROWS, and the cross-entropy gradient is formed directly, w * (softmax - onehot),
    instead of by autograd through log_softmax (which keeps [B * T, V] logits, their log-softmax
    and its gradient). Each sample's gradient is that of its own mean loss.

    Labels are the data's next tokens, or with `samplers` (one generator per sample and draw) drawn
    from the model's own softmax: the gradient of the Fisher of the KL to the FP model, which does
    not single out the calibration text's hardest tokens. Each draw gives one gradient.
    """
    rows, labels, weights, uniforms = [], [], [], []
    length = hidden.shape[1]
    draws = 1 if samplers is None else len(samplers[0])
    for j, (ids, mask) in enumerate(zip(input_ids, scored)):
        positions = mask.nonzero().reshape(-1)
        rows.append(positions + j * length)
        labels.append(ids.reshape(-1).cpu()[positions + 1])
        weights.append(torch.full((positions.numel(),), 1.0 / max(1, positions.numel())))
        if samplers is not None:
            # one uniform per (draw, position), drawn per sample: labels do not depend on chunking
            uniforms.append(torch.stack([torch.rand(positions.numel(), generator=g, dtype=torch.float64) for g in samplers[j]]))
    device = hidden.device
    row, label, weight = (torch.cat(t).to(device) for t in (rows, labels, weights))
    uniform = torch.cat(uniforms, dim=1).to(device) if samplers is not None else None
    flat = hidden.detach().reshape(-1, hidden.shape[-1])
    grad = torch.zeros((draws, *flat.shape), dtype=flat.dtype, device=device)
    for start in range(0, row.numel(), _HEAD_ROWS):
        block = row[start : start + _HEAD_ROWS]
        end = start + block.numel()
        x = flat.index_select(0, block).requires_grad_(True)
        with torch.enable_grad():
            logits = head(x)
        with torch.no_grad():
            probs = torch.softmax(logits.float(), dim=-1)
            cumulative = None if uniform is None else probs.double().cumsum(dim=-1)  # shared by every draw
        for draw in range(draws):
            with torch.no_grad():
                if uniform is None:
                    target = label[start:end]
                else:
                    wanted = (uniform[draw, start:end] * cumulative[:, -1]).unsqueeze(1)
                    target = torch.searchsorted(cumulative, wanted).reshape(-1).clamp_max(probs.shape[-1] - 1)
                upstream = probs.clone()
                upstream[torch.arange(block.numel(), device=device), target] -= 1.0
                upstream.mul_(weight[start:end, None])
            (found,) = torch.autograd.grad(logits, x, grad_outputs=upstream.to(logits.dtype), retain_graph=draw + 1 < draws)
            grad[draw].index_copy_(0, block, found)
    return grad.reshape(draws, *hidden.shape)


def _batching_works(layer: nn.Module, inputs: LayerInputs, chunk: list[int]) -> bool:
    """Whether the shared layer kwargs broadcast over a batch: batched output == per-sample output."""
    if len(inputs.kwargs) != 1 or len(chunk) < 2:
        return False
    first, last = chunk[0], chunk[-1]
    try:
        batched = _run_chunk(layer, torch.cat([inputs.hidden[first], inputs.hidden[last]]), inputs.kwargs[0])
        alone = [run_layer(layer, inputs, first), run_layer(layer, inputs, last)]
    except (RuntimeError, ValueError, IndexError, TypeError):
        return False
    if batched.shape[0] != 2:
        return False
    scale = max(float(a.abs().max()) for a in alone) or 1.0
    return all(
        a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale))
        for a, b in zip(alone, batched.split(1))
    )


@dataclass
class ImportanceScores:
    """Raw scores of one gradient pass: per layer output, and per linear with linear guidance."""

    layer: list[list[torch.Tensor]]  # [layers][samples] -> [T]: ||dL/dy_{l,t}||^2
    linear: list[dict[str, list[torch.Tensor]]] | None  # [layers]{linear: [samples] -> [T] or [T, g]}
    report: dict
    gradients: list[list[torch.Tensor]] | None = None  # [layers][samples] -> [T, d] (keep_gradients)


def _row_group_squares(grad: torch.Tensor, groups: int) -> torch.Tensor:
    """Squared gradient summed over each output-row group (row_groups): [..., out] -> [..., groups]."""
    squares = grad.float().square()
    if groups == 1:
        return squares.sum(-1, keepdim=True)
    return torch.stack([squares[..., low:high].sum(-1) for low, high in row_ranges(grad.shape[-1], groups)], dim=-1)


@contextlib.contextmanager
def _linear_output_hooks(layer: nn.Module, names: Sequence[str], groups: int, found: dict[str, list[torch.Tensor]]):
    """While active, every backward through `layer` appends [B, T, groups] squared output gradients of
    each linear in `names` to found[name] (one entry per backward: per draw)."""
    handles = []
    for name in names:
        def forward_hook(module: nn.Module, args: tuple, output: torch.Tensor, name: str = name) -> None:
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(lambda grad, name=name: found[name].append(_row_group_squares(grad.detach(), groups)))
        handles.append(get_module(layer, name).register_forward_hook(forward_hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def importance_scores(
    model: nn.Module,
    samples: Sequence[dict],
    *,
    device: torch.device | str = "cpu",
    offload_dir: str | Path | None = None,
    progress: bool = True,
    keep_gradients: bool = False,
    adapter: Adapter | None = None,
    batch_size: int = 16,
    guidance: str = "layer",
    row_groups: int = 1,
    loss: str = "ce",
    draws: int = 1,
    seed: int = 0,
) -> ImportanceScores:
    """Raw scores ||dL/dy_{l,t}||^2 [layers][samples] -> [T] via a block-wise backward, and with
    guidance "linear" each linear's ||dL/dz_{j,t}||^2 at its own output z (per output-row group).

    Samples that share their layer kwargs (plain text of one length) run `batch_size` at a
    time, concatenated along the batch dimension, in the forward and in each block's
    backward; a probe on layer 0 checks that the shared kwargs broadcast over the batch
    (batched output == per-sample output) and falls back to one sample at a time otherwise.
    Peak memory: one block plus one chunk's activations (and the stored layer inputs).

    loss "ce" differentiates the cross-entropy on the data's next tokens; "fisher" draws `draws`
    labels per position from the FP model's own softmax (seeded by `seed`, per sample and draw) and
    averages the squared gradients over the draws: the empirical Fisher of the KL to the FP model.
    Each block's forward is recomputed once and differentiated once per draw. Linear guidance reads
    the linears' output gradients with hooks in the same backward (layer 0, whose output gradient
    alone needs no recompute, is then recomputed too).
    """
    adapter = adapter or adapter_for(model)
    if not samples:
        raise QuantkitError("no calibration samples for token importance")
    if batch_size < 1:
        raise QuantkitError(f"importance batch size must be at least 1, got {batch_size}")
    check_guidance(guidance, row_groups, loss, draws)
    started = time.perf_counter()
    layers = adapter.decoder_layers(model)
    num_layers = len(layers)
    per_linear = guidance == "linear"
    linear_names = adapter.linear_names()
    draws = draws if loss == "fisher" else 1
    scored = [scored_positions(s) for s in samples]
    empty = {i for i, m in enumerate(scored) if not bool(m.any())}
    stored = _StoredInputs(offload_dir)
    scores: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
    linear_scores: list[dict[str, list]] | None = (
        [{name: [None] * len(samples) for name in linear_names} for _ in range(num_layers)] if per_linear else None
    )
    gradients: list[list[torch.Tensor]] | None = [[] for _ in range(num_layers)] if keep_gradients else None
    bar = tqdm(total=2 * num_layers, desc="importance", disable=not progress)
    batched = False
    live = [i for i in range(len(samples)) if i not in empty]
    # grads[i]: [draws, T, d], the gradient at the current layer's output for each draw
    grads: list[torch.Tensor | None] = [None] * len(samples)
    samplers = None
    if loss == "fisher":
        samplers = [
            [torch.Generator().manual_seed(seed * 1_000_003 + index * 1_009 + draw) for draw in range(draws)]
            for index in range(len(samples))
        ]

    def record(index: int) -> None:
        for grad in grads:
            scores[index].append(grad.float().pow(2).sum(-1).mean(0).reshape(-1).cpu())
            if gradients is not None:
                gradients[index].append(grad[0].reshape(grad.shape[-2], grad.shape[-1]).float().cpu())

    def hooks_on(layer: nn.Module, found: dict[str, list[torch.Tensor]]):
        return _linear_output_hooks(layer, linear_names, row_groups, found) if per_linear else contextlib.nullcontext()

    def record_linears(index: int, chunk: list[int], found: dict[str, list[torch.Tensor]]) -> None:
        for name, per_draw in found.items():
            if not per_draw:  # an unused linear: no gradient reached it
                raise QuantkitError(f"linear {name} of layer {index} received no gradient; use layer guidance")
            mean = torch.stack(per_draw).mean(0)  # [B, T, groups], averaged over draws
            for j, i in enumerate(chunk):
                value = mean[j].cpu()
                linear_scores[index][name][i] = value[:, 0] if row_groups == 1 else value
            per_draw.clear()

    def backward_block(index: int, layer: nn.Module, read, want_input: bool) -> None:
        """Recompute layer `index` from its stored input and push every draw's gradient below it."""
        found = {name: [] for name in linear_names}
        for chunk in _chunks(live, size):
            x = torch.cat([read(i) for i in chunk]).to(device).requires_grad_(True)
            below = []
            with hooks_on(layer, found), torch.enable_grad():
                y = _run_chunk(layer, x, inputs.kwargs_for(chunk[0]))
                for draw in range(draws):
                    upstream = torch.cat([grads[i][draw : draw + 1] for i in chunk])
                    (grad,) = torch.autograd.grad(y, x, grad_outputs=upstream, retain_graph=draw + 1 < draws)
                    below.append(grad)
            del y
            if per_linear:
                record_linears(index, chunk, found)
            if want_input:
                stacked = torch.stack(below, dim=1)  # [B, draws, T, d]
                for j, i in enumerate(chunk):
                    grads[i] = stacked[j]

    try:
        with _frozen(model):
            with torch.no_grad():
                inputs = capture_layer_inputs(model, adapter, samples, device)
                if batch_size > 1:
                    probe = layers[0].to(device)
                    batched = _batching_works(probe, inputs, list(range(min(batch_size, len(samples)))))
                    layers[0] = probe.to("cpu") if str(device) != "cpu" else probe
                # FP forward up to the last layer's input, storing each layer's input on the way.
                for index in range(num_layers - 1):
                    layer = layers[index].to(device)
                    if index > 0 or per_linear:  # layer 0's input is differentiated only for its linears
                        stored.put(index, inputs.hidden)
                    if batched:
                        outputs: list[torch.Tensor] = []
                        for chunk in _chunks(range(len(samples)), batch_size):
                            hidden = torch.cat([inputs.hidden[i] for i in chunk])
                            outputs.extend(_run_chunk(layer, hidden, inputs.kwargs[0]).split(1))
                        inputs.hidden = outputs
                    else:
                        inputs.hidden = [run_layer(layer, inputs, i) for i in range(len(samples))]
                    layers[index] = layer.to("cpu") if str(device) != "cpu" else layer
                    bar.update(1)
            size = batch_size if batched else 1
            # Top block: last decoder layer + final norm + lm_head + loss, with autograd, one chunk
            # at a time: gives dL/dy at the last layer's output and, through it, at its input (the
            # output of the layer below), without a separate no-grad forward of the last layer.
            # The chunk's loss is the sum of its samples' mean losses: each sample gets its own gradient.
            last = num_layers - 1
            norm = get_module(model, adapter.final_norm)
            head = get_module(model, adapter.lm_head)
            below: list[torch.Tensor | None] = [None] * len(samples)
            for i in empty:
                zeros = torch.zeros((draws, *inputs.hidden[i].shape[1:]), dtype=inputs.hidden[i].dtype)
                grads[i] = below[i] = zeros
                if per_linear:
                    shape = (zeros.shape[1],) if row_groups == 1 else (zeros.shape[1], row_groups)
                    for index in range(num_layers):
                        for name in linear_names:
                            linear_scores[index][name][i] = torch.zeros(shape)
            layer = layers[last].to(device)
            found = {name: [] for name in linear_names}
            for chunk in _chunks(live, size):
                x = torch.cat([inputs.hidden[i] for i in chunk]).detach().to(device)
                with hooks_on(layer, found):
                    with torch.enable_grad():
                        if last > 0 or per_linear:
                            x.requires_grad_(True)
                        y = _run_chunk(layer, x, inputs.kwargs_for(chunk[0]))
                        if not y.requires_grad:  # one-layer model: nothing below y needs a gradient
                            y.requires_grad_(True)
                        normed = norm(y)
                    chunk_samplers = None if samplers is None else [samplers[i] for i in chunk]
                    upstream = _head_gradient(
                        head, normed, [samples[i]["input_ids"] for i in chunk], [scored[i] for i in chunk], chunk_samplers
                    )
                    wanted = [y, x] if last > 0 or per_linear else [y]
                    at_output, at_input = [], []
                    for draw in range(draws):
                        found_draw = torch.autograd.grad(normed, wanted, grad_outputs=upstream[draw], retain_graph=draw + 1 < draws)
                        at_output.append(found_draw[0])
                        if last > 0:
                            at_input.append(found_draw[1])
                del normed, upstream, y
                if per_linear:
                    record_linears(last, chunk, found)
                output_stack = torch.stack(at_output, dim=1)  # [B, draws, T, d]
                input_stack = torch.stack(at_input, dim=1) if at_input else None
                for j, i in enumerate(chunk):
                    grads[i] = output_stack[j]
                    if input_stack is not None:
                        below[i] = input_stack[j]
            layers[last] = layer.to("cpu") if str(device) != "cpu" else layer
            inputs.hidden = []
            record(last)
            bar.update(2)
            if last > 0:
                grads = below
                record(last - 1)
            # Block-wise backward: recompute layer `index` from its stored input, push dL/dy down.
            for index in reversed(range(1, last)):
                layer = layers[index].to(device)
                with stored.reader(index) as read:
                    backward_block(index, layer, read, want_input=True)
                layers[index] = layer.to("cpu") if str(device) != "cpu" else layer
                record(index - 1)
                bar.update(1)
            if per_linear and last > 0:
                layer = layers[0].to(device)
                with stored.reader(0) as read:
                    backward_block(0, layer, read, want_input=False)
                layers[0] = layer.to("cpu") if str(device) != "cpu" else layer
            bar.update(1)
    finally:
        stored.close()
        bar.close()
        if str(device) != "cpu":
            model.to("cpu")
    report = {
        "samples": len(samples),
        "layers": num_layers,
        "scored_tokens": int(sum(int(m.sum()) for m in scored)),
        "empty_loss_mask_samples": sorted(empty),
        "offload": offload_dir is not None,
        "batch_size": batch_size if batched else 1,
        "guidance": guidance,
        "row_groups": row_groups,
        "loss": loss,
        "draws": draws,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if empty:
        warnings.warn(f"{len(empty)} samples have an empty loss mask; their tokens get uniform weights", stacklevel=2)
    return ImportanceScores(scores, linear_scores, report, gradients)


def layer_output_gradients(
    model: nn.Module,
    samples: Sequence[dict],
    *,
    device: torch.device | str = "cpu",
    offload_dir: str | Path | None = None,
    progress: bool = True,
    keep_gradients: bool = False,
    adapter: Adapter | None = None,
    batch_size: int = 16,
) -> tuple[list[list[torch.Tensor]], dict, list[list[torch.Tensor]] | None]:
    """(scores, report, gradients) of importance_scores with the data loss and layer guidance:
    scores ||dL/dy_{l,t}||^2 [layers][samples] -> [T]; gradients [layers][samples] -> [T, d] only
    with keep_gradients (for tests and the walkthrough)."""
    found = importance_scores(
        model, samples, device=device, offload_dir=offload_dir, progress=progress, keep_gradients=keep_gradients,
        adapter=adapter, batch_size=batch_size,
    )
    return found.layer, found.report, found.gradients


def tlq_token_weights(
    model: nn.Module,
    samples: Sequence[dict],
    *,
    device: torch.device | str = "cpu",
    offload_dir: str | Path | None = None,
    progress: bool = True,
    batch_size: int = 16,
    guidance: str = "layer",
    row_groups: int = 1,
    loss: str = "ce",
    draws: int = 1,
    **options,
) -> TokenImportance:
    """TLQ token weights of `samples` under the FP `model`: a callable layer -> list of [T] tensors
    (LayerWeights with guidance "linear").

    guidance, row_groups, loss and draws choose the gradients (importance_scores); `options` are
    TokenImportance's (lam, power, per_modality, top_fraction, floor_fraction, seed, normalise).
    All are checked before the gradient pass.
    """
    TokenImportance([], [], **options)
    check_guidance(guidance, row_groups, loss, draws)
    found = importance_scores(
        model, samples, device=device, offload_dir=offload_dir, progress=progress, batch_size=batch_size,
        guidance=guidance, row_groups=row_groups, loss=loss, draws=draws, seed=int(options.get("seed", 0)),
    )
    return TokenImportance(found.layer, samples, report=found.report, linear_scores=found.linear, **options)


# ----------------------------------------------------------------------------- identity of model/tokenizer


def config_hash(model_or_config) -> str:
    """sha256 of the model config without bookkeeping keys (paths, versions, dtype, runtime flags)."""
    config = getattr(model_or_config, "config", model_or_config)

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in sorted(value.items()) if k not in _CONFIG_HASH_IGNORED}
        return value

    text = json.dumps(clean(config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []))
    text = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _model_identity(model: nn.Module) -> dict:
    config = model.config
    return {
        "model_type": getattr(config, "model_type", None),
        "architectures": list(getattr(config, "architectures", None) or [type(model).__name__]),
        "num_layers": len(adapter_for(model).decoder_layers(model)),
        "config_hash": config_hash(model),
    }


# ----------------------------------------------------------------------------- the set on disk


def save_calibration_set(
    output: str | Path,
    samples: Sequence[dict],
    importance: TokenImportance,
    model: nn.Module,
    model_name: str,
    tokenizer=None,
    *,
    extra: dict | None = None,
    overwrite: bool = False,
) -> dict:
    """Write samples, masks, weights, scores and manifest.json to `output` atomically; return the manifest."""
    from safetensors.torch import save_file

    import quantkit

    tensors: dict[str, torch.Tensor] = {}
    for i, sample in enumerate(samples):
        for key, value in sample.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{i}.{key}"] = value.detach().cpu().contiguous()
    lengths = torch.tensor([m.numel() for m in importance.valid], dtype=torch.long)
    tmax = int(lengths.max())

    def pad(masks: list[torch.Tensor]) -> torch.Tensor:
        out = torch.zeros(len(masks), tmax, dtype=torch.bool)
        for i, m in enumerate(masks):
            out[i, : m.numel()] = m
        return out

    weights = {
        "weights": importance.stacked("weights"),
        "scores": importance.stacked("scores"),
        "lengths": lengths,
        "valid_mask": pad(importance.valid),
        "scored_positions": pad(importance.scored),
        "vision_mask": pad(importance.vision),
    }
    for layer, by_linear in enumerate(importance.linear_weights or []):
        for name, per_sample in by_linear.items():
            groups = importance.linear_groups.get(name, 1)
            padded = torch.zeros(len(per_sample), tmax, groups)
            for index, value in enumerate(per_sample):
                padded[index, : value.shape[0]] = value.float().reshape(value.shape[0], groups)
            weights[f"{LINEAR_KEY}.{layer}.{name}"] = padded
    revision = getattr(model.config, "_commit_hash", None)
    manifest = {
        "format": SET_FORMAT,
        "format_version": SET_FORMAT_VERSION,
        "quantkit_version": quantkit.__version__,
        "model": model_name,
        "revision": revision,
        **_model_identity(model),
        "tokenizer_hash": tokenizer_hash(tokenizer) if tokenizer is not None else None,
        "nsamples": len(samples),
        "max_tokens": tmax,
        "sample_keys": sorted({k for s in samples for k, v in s.items() if isinstance(v, torch.Tensor)}),
        "settings": importance.settings,
        "report": importance.report,
        **(extra or {}),
    }
    with atomic_dir(output, overwrite=overwrite) as tmp:
        save_file(tensors, tmp / SAMPLES_FILE)
        save_file(weights, tmp / WEIGHTS_FILE)
        manifest["files"] = {name: file_sha256(tmp / name) for name in (SAMPLES_FILE, WEIGHTS_FILE)}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(setdir: str | Path) -> dict:
    """The manifest of a calibration set, or a QuantkitError if the directory is missing or not a set."""
    root = Path(setdir)
    if not root.is_dir():
        raise QuantkitError(f"calibration set {root} not found; make one with `quantkit importance MODEL --calib DATA -o {root}`")
    path = root / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise QuantkitError(f"{root} is not a calibration set (no {MANIFEST_FILE}); make one with `quantkit importance`") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise QuantkitError(f"{path} is corrupt ({err}); remake the set with `quantkit importance`") from err
    if not isinstance(manifest, dict) or manifest.get("format") != SET_FORMAT:
        raise QuantkitError(f"{path} is not a quantkit calibration-set manifest")
    if manifest.get("format_version") != SET_FORMAT_VERSION:
        raise QuantkitError(f"calibration set {root} has format version {manifest.get('format_version')}; this quantkit reads {SET_FORMAT_VERSION}")
    return manifest


def _check_files(root: Path, manifest: dict) -> None:
    for name, digest in (manifest.get("files") or {}).items():
        path = root / name
        if not path.is_file():
            raise QuantkitError(f"calibration set {root} is incomplete: {name} is missing; remake it")
        if file_sha256(path) != digest:
            raise QuantkitError(f"calibration set {root} is corrupt: {name} does not match its sha256 in the manifest; remake it")
    for name in (SAMPLES_FILE, WEIGHTS_FILE):
        if name not in (manifest.get("files") or {}):
            raise QuantkitError(f"calibration set {root} is corrupt: manifest lists no hash for {name}")


def check_set_matches(manifest: dict, model: nn.Module, tokenizer=None, where: str = "") -> None:
    """Refuse a set made for another model (architecture, layer count, config) or another tokenizer."""
    found = _model_identity(model)
    if manifest.get("model_type") != found["model_type"] or manifest.get("architectures") != found["architectures"]:
        raise QuantkitError(
            f"calibration set {where} was made for {manifest.get('model_type')} {manifest.get('architectures')}, "
            f"not this {found['model_type']} {found['architectures']}; make a set for this model"
        )
    if manifest.get("num_layers") != found["num_layers"]:
        raise QuantkitError(
            f"calibration set {where} has weights for {manifest.get('num_layers')} layers, the model has {found['num_layers']}; make a set for this model"
        )
    if manifest.get("config_hash") != found["config_hash"]:
        raise QuantkitError(
            f"calibration set {where} was made for another model config ({manifest.get('model')}: config hash differs); make a set for this model"
        )
    if tokenizer is not None and manifest.get("tokenizer_hash") not in (None, tokenizer_hash(tokenizer)):
        raise QuantkitError(f"calibration set {where} was tokenized with a different tokenizer; remake it with this model's tokenizer")


class StoredWeights:
    """token_weights(layer) over a loaded set: each sample's weights cut to its length."""

    def __init__(self, weights: torch.Tensor, lengths: torch.Tensor, manifest: dict,
                 linear: dict[str, torch.Tensor] | None = None) -> None:
        self.weights = weights
        self.lengths = [int(n) for n in lengths]
        self.manifest = manifest
        self.floor = (manifest.get("settings") or {}).get("lam")
        # per-linear weights by layer: {layer: {name: [samples, Tmax, groups]}}
        self.linear: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in (linear or {}).items():
            _, layer, name = key.split(".", 2)
            self.linear.setdefault(int(layer), {})[name] = value

    @property
    def num_layers(self) -> int:
        """Number of decoder layers the weights cover."""
        return int(self.weights.shape[0])

    def __call__(self, layer: int) -> list[torch.Tensor] | LayerWeights:
        """One weight tensor [T] per sample for decoder layer `layer` (LayerWeights with per-linear weights)."""
        output = [self.weights[layer, i, :n] for i, n in enumerate(self.lengths)]
        if layer not in self.linear:
            return output
        linears, groups = {}, {}
        for name, value in self.linear[layer].items():
            groups[name] = int(value.shape[2])
            linears[name] = [value[i, :n, 0] if groups[name] == 1 else value[i, :n] for i, n in enumerate(self.lengths)]
        return LayerWeights(output, linears, groups, self.floor)


def load_calibration_set(setdir: str | Path, model_name: str | None, model: nn.Module, tokenizer=None) -> tuple[list[dict], StoredWeights]:
    """(samples, token_weights) of a set made by `quantkit importance`, after checking it fits `model`.

    The tokenizer check uses `tokenizer`, or the one at `model_name` when that loads.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = Path(setdir)
    manifest = read_manifest(root)
    _check_files(root, manifest)
    if tokenizer is None and model_name is not None and manifest.get("tokenizer_hash"):
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_name)
        except (OSError, ValueError) as err:
            raise QuantkitError(f"cannot load the tokenizer of {model_name} to check calibration set {root}: {str(err).splitlines()[0]}") from err
    check_set_matches(manifest, model, tokenizer, where=str(root))
    try:
        tensors = load_file(root / SAMPLES_FILE)
        weights = load_file(root / WEIGHTS_FILE)
    except (SafetensorError, OSError) as err:
        raise QuantkitError(f"calibration set {root} is corrupt: {err}; remake it") from err
    count = int(manifest["nsamples"])
    samples: list[dict] = [{} for _ in range(count)]
    for name, value in tensors.items():
        index, _, key = name.partition(".")
        samples[int(index)][key] = value
    if any("input_ids" not in s for s in samples) or weights["weights"].shape[:2] != (manifest["num_layers"], count):
        raise QuantkitError(f"calibration set {root} is corrupt: samples or weights do not match the manifest; remake it")
    linear = {key: value for key, value in weights.items() if key.startswith(LINEAR_KEY + ".")}
    return samples, StoredWeights(weights["weights"], weights["lengths"], manifest, linear)
