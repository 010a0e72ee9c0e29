"""Smoothing (SmoothQuant-style) on tensors: per-input-channel scales, their folds, and the alpha search.

A linear y = x W^T computes the same with x / s and W * s (columns scaled): activation outliers move
into the weights. s_j = max|x_j|^a / max|w_j|^(1-a), the max over tokens and over every output row of
every linear reading x. The division by s is folded into whatever produces x: a norm's weight (and
bias) or the output rows (and bias) of a linear whose outputs are x. Which folds a model allows is
its adapter's business (quantkit.models); this module only does the arithmetic.

The search picks a on a grid minimising the fold's output error with the weights rounded (per-channel
RTN, a cheap proxy for the solver) and the inputs fake-quantized per token, summed over tokens with
token weights (uniform: SmoothQuant's choice made by error instead of a fixed a; TLQ's importance
weights: the tokens that matter to the loss count more).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from quantkit.errors import QuantkitError
from quantkit.quant.activations import fake_quantize_tokens
from quantkit.quant.rtn import rtn_solve
from quantkit.quant.spec import QuantSpec

# none: no smoothing; uniform: every token weighs 1 in the search; tlq: TLQ's token weights.
SMOOTH_MODES = ("none", "uniform", "tlq")
AUTO = "auto"  # what the CLI and API take by default: see default_smooth
ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(11))
# channels whose statistics are this small get s = 1: their scale would be noise
_TINY = 1e-8


def check_smooth(mode: str) -> str:
    """`mode` if it is a smoothing mode, else QuantkitError."""
    if mode not in SMOOTH_MODES:
        raise QuantkitError(f"--smooth must be one of {', '.join(SMOOTH_MODES)}, got {mode!r}")
    return mode


def default_smooth(act_bits: int | None, token_weights: bool) -> str:
    """The smoothing a run gets when it names none ("auto"): none for weight-only runs; with act_bits,
    TLQ-weighted for a method that weighs tokens and uniform otherwise. Chosen on ref-lm's validation
    windows (benchmarks/results/bench_w8a8_validation.json, 6 draws): uniform smoothing lowers GPTQ's
    gap at W8A8 and W4A8, and for TLQ the TLQ-weighted search ties the uniform one at W8A8 and beats
    it at W4A8."""
    if act_bits is None:
        return "none"
    return "tlq" if token_weights else "uniform"


def resolve_smooth(mode: str, act_bits: int | None, token_weights: bool) -> str:
    """`mode`, with "auto" replaced by default_smooth's choice."""
    return default_smooth(act_bits, token_weights) if mode == AUTO else check_smooth(mode)


def weight_absmax(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """max |w| per input column over every output row of every given [out, in] weight."""
    return torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)


def smoothing_scales(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|x|^alpha / max|w|^(1 - alpha) per input channel (1 where either statistic is ~0)."""
    act, wmax = act_absmax.double(), w_absmax.double()
    usable = (act > _TINY) & (wmax > _TINY)
    scales = act.clamp_min(_TINY).pow(alpha) / wmax.clamp_min(_TINY).pow(1 - alpha)
    return torch.where(usable, scales, torch.ones_like(scales)).float()


def scale_columns(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W * s: each input column j multiplied by s_j."""
    return weight * scales.to(weight.device, weight.dtype).unsqueeze(0)


def divide_rows(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W / s along the output rows (a linear's [out, in] weight, or a norm's [out] weight or bias)."""
    s = scales.to(weight.device, weight.dtype)
    return weight / (s.unsqueeze(1) if weight.dim() == 2 else s)


def rounded_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The weight after per-channel symmetric round-to-nearest at `bits` (the search's solver proxy)."""
    spec = QuantSpec(bits=bits, group_size=-1, sym=True, act_order=False, static_groups=False)
    return rtn_solve(weight.float(), None, spec).dequantize()


def fold_error(inputs: torch.Tensor, weights: Sequence[torch.Tensor], scales: torch.Tensor, weight_bits: int,
               act_bits: int | None, token_weights: torch.Tensor | None = None) -> float:
    """sum_t w_t sum_l ||Q_a(x_t / s) Q_w(W_l s)^T - x_t W_l^T||^2 / sum_t w_t: the fold's output error
    with scales s, over tokens `inputs` [N, in] (token_weights [N], None for all ones)."""
    x = inputs.float()
    s = scales.float().to(x.device)
    xs = x / s
    if act_bits is not None:
        xs = fake_quantize_tokens(xs, act_bits)
    w_t = None if token_weights is None else token_weights.float().to(x.device).reshape(-1)
    total = 0.0
    for weight in weights:
        w = weight.float().to(x.device)
        reference = x @ w.T
        approx = xs @ rounded_weight(scale_columns(w, s), weight_bits).T
        per_token = (approx - reference).pow(2).sum(dim=1)
        total += float(per_token.sum() if w_t is None else (per_token * w_t).sum())
    norm = float(inputs.shape[0] if w_t is None else w_t.sum())
    return total / max(norm, 1e-30)


def search_alpha(inputs: torch.Tensor, act_absmax: torch.Tensor, weights: Sequence[torch.Tensor], weight_bits: int,
                 act_bits: int | None, token_weights: torch.Tensor | None = None,
                 grid: Sequence[float] = ALPHA_GRID) -> tuple[float, torch.Tensor, dict[float, float]]:
    """The grid alpha with the least fold_error (the first on ties), its scales, and every alpha's error."""
    w_absmax = weight_absmax(weights)
    errors: dict[float, float] = {}
    best, best_scales = None, None
    for alpha in grid:
        scales = smoothing_scales(act_absmax, w_absmax, alpha)
        errors[alpha] = fold_error(inputs, weights, scales, weight_bits, act_bits, token_weights)
        if best is None or errors[alpha] < errors[best]:
            best, best_scales = alpha, scales
    return best, best_scales, errors
