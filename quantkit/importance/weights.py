"""TLQ's token weights: the rule that turns raw scores into weights (lam floor, power, per-sample or
global normalisation, per-modality groups, top fraction), its settings and defaults, and
tlq_token_weights, which runs the gradient pass and applies the rule."""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from quantkit.engine.weights import LayerWeights
from quantkit.errors import MOST_COUNT, QuantkitError
from quantkit.importance.gradients import check_guidance, importance_scores
from quantkit.importance.layers import HeldLayers
from quantkit.importance.masks import scored_positions, valid_mask, vision_tokens

# Token-weight normalisation: per sample (default) or over the whole set, per layer.
NORMALISE_CHOICES = ("sample", "global")
# TLQ's gradient-pass defaults on text, chosen on validation windows per corpus (benchmarks/README.md "Round 6";
# the block size in "Round 9"): uniform token weights (lam 1: the Hessians are GPTQ's) and each linear's output-side
# factor in blocks of 128 rows (gcd(128, rows) where 128 does not divide them; GPTQ's row metric). On image-text the token weights (lam 0.1) are the default and no output-side factor
# (benchmarks/bench_tlq.py --validation, "TLQ guidance"): IMAGE_TLQ_DEFAULTS.
TLQ_DEFAULTS = {"guidance": "layer", "row_groups": 1, "loss": "ce", "draws": 1, "lam": 1.0, "power": 1.0,
                "output_side": 128}
IMAGE_TLQ_DEFAULTS = TLQ_DEFAULTS | {"lam": 0.1, "output_side": None}
# Each output-side factor block G [b, b] is shrunk toward the scaled identity, (1 - a) G + a (tr G / b) I: G is estimated
# from the calibration tokens' gradients (16k tokens at the defaults, correlated within a window, for 128-row blocks),
# and its smallest eigenvalues, the noisiest, steer the row feedback most. a = 0.1 had the best worst corpus and mean of
# 0, 0.1, 0.3 (and 0.1, 0.3 toward the diagonal) on validation windows (benchmarks/README.md "Round 10").
OUTPUT_SIDE_SHRINK = 0.1


def tlq_defaults(images: bool) -> dict:
    """TLQ's gradient-pass defaults for calibration data with images (image-text) or without (text)."""
    return dict(IMAGE_TLQ_DEFAULTS if images else TLQ_DEFAULTS)


def resolve_importance(given: dict | None, images: bool) -> dict:
    """The gradient pass's settings: the data kind's defaults, overridden by the options given (None: not given;
    output_side 0: no output-side factor)."""
    given = {k: v for k, v in (given or {}).items() if v is not None}
    settings = tlq_defaults(images) | given
    side = settings["output_side"]  # the one check of --output-side (output_side=): calibrate's, quantize's, importance's
    if side is not None and (isinstance(side, bool) or not isinstance(side, int) or not 0 <= side <= MOST_COUNT):
        most = f" (the most is {MOST_COUNT})" if isinstance(side, int) and side > MOST_COUNT else ""
        raise QuantkitError(f"--output-side (importance={{'output_side': ...}}) is the rows per block of the "
                            f"output-side factor: 0 (none) or a positive whole number, got {side!r}{most}")
    if settings["row_groups"] > 1 and side:
        if "output_side" in given:
            raise QuantkitError("--row-groups solves each group of a linear's rows with its own Hessian, and "
                                "--output-side couples rows across those groups; give one of them")
        side = None  # row groups replace the output-side factor as the text default's use of rows
    settings["output_side"] = side or None  # 0: none
    return settings


def scores_to_weights(
    scores: torch.Tensor,
    valid: torch.Tensor,
    vision: torch.Tensor | None = None,
    *,
    lam: float = 0.1,
    power: float = 1.0,
    per_modality: bool = False,
    group_means: Sequence[float] | None = None,
    clip: float | None = None,
) -> tuple[torch.Tensor, bool]:
    """Token weights [T] from raw scores [T]; also whether some group fell back to uniform.

    group_means: the mean of s**p to divide by, per group ([valid] or [vision, text] with
    per_modality), e.g. taken over the whole set (global normalisation); default: this sample's.
    A group whose own scores are all zero still falls back to uniform weight 1.
    clip bounds the normalised scores to [1/clip, clip] (then rescales them to mean 1 in their group),
    before the floor lam is mixed in: no token weighs more than clip^2 times another (RSQ's bounded weights).
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
            if clip is not None:
                bounded = normalised[group].clamp(1.0 / clip, clip)
                normalised[group] = bounded / bounded.mean()
        else:
            normalised[group] = 1.0
            fell_back = True
    weights = (1.0 - lam) * normalised + lam
    return torch.where(valid, weights, torch.zeros_like(weights)), fell_back


def floor_modality_ratio(weights: list[list[torch.Tensor]], valid: list[torch.Tensor], vision: list[torch.Tensor]
                         ) -> dict:
    """Floor each layer's vision/text weight ratio at its median over layers (MBQ), in place.

    The ratio of a layer is the mean weight of its vision tokens over that of its text tokens (all samples).
    In a layer below the median, every vision token's weight is raised by the same amount so that the ratio
    reaches the median (an addition, so that tokens whose gradient is exactly zero, as the image tokens of
    the last layer, are raised too); each sample's weights are then rescaled to their former mean. Returns
    the ratios before and after, per layer (None for layers without vision or text tokens).
    """
    def ratio(layer: list[torch.Tensor]) -> tuple[float, float] | None:
        v = [w[m & x] for w, m, x in zip(layer, valid, vision)]
        t = [w[m & ~x] for w, m, x in zip(layer, valid, vision)]
        nv, nt = sum(int(a.numel()) for a in v), sum(int(a.numel()) for a in t)
        if not nv or not nt:
            return None
        text = float(sum(float(a.sum()) for a in t)) / nt
        return (float(sum(float(a.sum()) for a in v)) / nv / text if text > 0 else None), text

    found = [ratio(layer) for layer in weights]
    present = sorted(r[0] for r in found if r is not None and r[0] is not None)
    before = [None if r is None else r[0] for r in found]
    if not present:
        return {"ratio_before": before, "ratio_after": before, "median": None}
    median = statistics.median(present)
    for row, r in zip(weights, found):
        if r is None or r[0] is None or r[0] >= median:
            continue
        lift = (median - r[0]) * r[1]
        for index, (w, m, x) in enumerate(zip(row, valid, vision)):
            mean = float(w[m].mean()) if bool(m.any()) else 0.0
            raised = torch.where(m & x, w + lift, w)
            row[index] = raised * (mean / float(raised[m].mean())) if mean > 0 else raised
    after = [None if r is None else r[0] for r in (ratio(layer) for layer in weights)]
    return {"ratio_before": [None if r is None else round(r, 4) for r in before],
            "ratio_after": [None if r is None else round(r, 4) for r in after], "median": round(median, 4)}


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
        linear_factors: list[dict[str, torch.Tensor]] | None = None,
        clip: float | None = None,
        modality_floor: bool = False,
    ) -> None:
        check_settings(lam, power, top_fraction, floor_fraction, normalise)
        if clip is not None and not clip >= 1.0:
            raise QuantkitError(f"weight clip must be at least 1 (weights bounded to [1/clip, clip]), got {clip}")
        self.scores = scores
        self.linear_scores = linear_scores
        self.linear_factors = linear_factors  # [layers]{linear: [blocks, b, b]}: GPTQ's row metrics
        self.settings = {
            "lam": lam, "power": power, "per_modality": per_modality, "normalise": normalise,
            "top_fraction": top_fraction, "floor_fraction": floor_fraction, "seed": seed,
            "clip": clip, "modality_floor": modality_floor,
        }
        self.floor = lam
        self.valid = [valid_mask(s) for s in samples]
        self.scored = [scored_positions(s) for s in samples]
        self.vision = [vision_tokens(s) for s in samples]
        self.report = dict(report or {})
        zero_groups: list[list[int]] = []
        self.weights = [self._weigh(layer, layer_scores, zero_groups) for layer, layer_scores in enumerate(scores)]
        if modality_floor:
            self.report["modality_floor"] = floor_modality_ratio(self.weights, self.valid, self.vision)
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
        # every weight 1 (lam 1 on unpadded samples, by scores_to_weights' mix): the engine sums plain Hessians (the
        # same sums, less work). Read off the weights made, not restated from the settings that make them.
        self.uniform = self.linear_weights is None and all(bool((w == 1).all()) for row in self.weights for w in row)
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
                per_modality=settings["per_modality"], group_means=means, clip=settings["clip"],
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
        """One weight tensor [T] per sample for decoder layer `layer` (LayerWeights with per-linear weights or
        output-side factors)."""
        metrics = dict(self.linear_factors[layer]) if self.linear_factors is not None else {}
        if self.linear_weights is None and not metrics:
            return self.weights[layer]
        linears = self.linear_weights[layer] if self.linear_weights is not None else {}
        return LayerWeights(self.weights[layer], linears, dict(self.linear_groups), self.floor, metrics, self.uniform)

    def stacked(self, which: str = "weights") -> torch.Tensor:
        """[layers, samples, Tmax] float32 of weights or scores, zero-padded past each sample's length."""
        rows = self.weights if which == "weights" else self.scores
        tmax = max(t.numel() for t in rows[0])
        out = torch.zeros(len(rows), len(rows[0]), tmax)
        for layer, row in enumerate(rows):
            for index, value in enumerate(row):
                out[layer, index, : value.numel()] = value.float()
        return out


def check_settings(
    lam: float, power: float, top_fraction: float | None, floor_fraction: float, normalise: str = "sample"
) -> None:
    """Raise QuantkitError on importance settings out of range."""
    if normalise not in NORMALISE_CHOICES:
        raise QuantkitError(f"normalise must be one of {NORMALISE_CHOICES}, got {normalise!r}")
    if not 0.0 <= lam <= 1.0:
        raise QuantkitError(f"--lam (lam=) must be in [0, 1], got {lam}")
    if not (power > 0 and math.isfinite(power)):
        raise QuantkitError(f"--power (power=) must be a positive finite number, got {power}")
    if top_fraction is not None and not 0.0 < top_fraction <= 1.0:
        raise QuantkitError(f"--top-fraction (top_fraction=) must be in (0, 1], got {top_fraction}")
    if not 0.0 <= floor_fraction <= 1.0:
        raise QuantkitError(f"--floor-fraction (floor_fraction=) must be in [0, 1], got {floor_fraction}")


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
    output_side: int | None = None,
    layers_from: HeldLayers | None = None,
    **options,
) -> TokenImportance:
    """TLQ token weights of `samples` under the FP `model`: a callable layer -> list of [T] tensors
    (LayerWeights with guidance "linear").

    guidance, row_groups, loss and draws choose the gradients (importance_scores), output_side=b also sums each
    linear's block-diagonal output-side factor (GPTQ's feedback across rows; shrunk by OUTPUT_SIDE_SHRINK); `options` are
    TokenImportance's (lam, power, per_modality, top_fraction, floor_fraction, seed, normalise).
    All are checked before the gradient pass. `layers_from` (importance.layers.FileLayers) reads the decoder layers
    of a streamed skeleton from its files, one at a time.
    """
    TokenImportance([], [], **options)
    check_guidance(guidance, row_groups, loss, draws)
    found = importance_scores(
        model, samples, device=device, offload_dir=offload_dir, progress=progress, batch_size=batch_size,
        guidance=guidance, row_groups=row_groups, loss=loss, draws=draws, seed=int(options.get("seed", 0)),
        output_side=output_side, layers_from=layers_from,
    )
    factors = found.linear_factors and [{name: shrink_factor(blocks, OUTPUT_SIDE_SHRINK) for name, blocks in row.items()}
                                        for row in found.linear_factors]
    report = found.report | ({"output_shrink": OUTPUT_SIDE_SHRINK} if factors else {})
    return TokenImportance(found.layer, samples, report=report, linear_scores=found.linear, linear_factors=factors,
                           **options)


def shrink_factor(blocks: torch.Tensor, fraction: float) -> torch.Tensor:
    """Output-side factor blocks [n, b, b] shrunk by `fraction` toward each block's mean diagonal times the identity."""
    out = blocks * (1 - fraction)
    out.diagonal(dim1=1, dim2=2).add_(fraction * blocks.diagonal(dim1=1, dim2=2).mean(-1, keepdim=True))
    return out


def check_manifest_fields(manifest: dict, path: object) -> dict:
    """`manifest` when the fields a calibration set is read by have their types: "files" a mapping of file name to
    sha256, "settings" a mapping whose lam (the weights' floor) is a number (an edited manifest failed later as an
    AttributeError or a TypeError); else one QuantkitError naming the field."""
    files, settings = manifest.get("files", {}), manifest.get("settings", {})
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise QuantkitError(f"{path}: 'files' must map each file name to its sha256, got {type(files).__name__} "
                            f"{str(files)[:60]}; remake the set with `quantkit importance`")
    lam = settings.get("lam") if isinstance(settings, dict) else None
    if not isinstance(settings, dict) or isinstance(lam, bool) or not isinstance(lam, (int, float, type(None))) \
            or (lam is not None and not math.isfinite(lam)):
        what = f"settings.lam {lam!r}" if isinstance(settings, dict) else f"settings {str(settings)[:60]}"
        raise QuantkitError(f"{path}: {what} is not what `quantkit importance` writes (a mapping with a number lam); "
                            "remake the set with `quantkit importance`")
    return manifest
