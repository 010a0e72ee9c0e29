"""Per-linear input statistics: H = 2 * sum_t w_t x_t x_t^T / sum_t w_t (and the FP-target cross term)."""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Accumulates the (token-weighted) Hessian of one linear's reconstruction loss.

    On CPU each sample's X^T X is a float32 matmul (2.5x faster than float64) added into a
    float64 sum: a sample's product does not depend on which samples share its batch or rank, and
    the float64 sum barely depends on their order, so sharding samples over ranks gives the same
    float32 Hessian as one process. On GPUs float64 runs at a small fraction of float32 speed
    (1/64 on consumer cards), so they sum in float32 in one matmul.

    With `cross`, it also sums C = sum_t w_t x_t x~_t^T, x_t being the FP model's input to the
    same linear on the same token (the FP target, quantkit.quant.gptaq).
    """

    def __init__(self, in_features: int, device: torch.device | str, cross: bool = False) -> None:
        dtype = torch.float64 if torch.device(device).type == "cpu" else torch.float32
        self.hessian = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.cross = torch.zeros_like(self.hessian) if cross else None
        self.weight_sum = 0.0
        self.tokens = 0

    def _rows(self, inputs: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(self.hessian.device, torch.float32)
        return x if scale is None else x * scale

    def _add_products(self, total: torch.Tensor, left: torch.Tensor, right: torch.Tensor, per_sample: int) -> None:
        if total.dtype == torch.float32:
            total.addmm_(left.T, right)
            return
        for a, b in zip(left.split(per_sample), right.split(per_sample)):
            total.add_(a.T @ b)

    def add(self, inputs: torch.Tensor, token_weight: torch.Tensor | None = None, fp_inputs: torch.Tensor | None = None) -> None:
        """Add a batch of inputs [..., T, in]; token_weight has one non-negative value per token;
        fp_inputs (same shape) are the FP model's inputs to the linear, for the cross term."""
        if (fp_inputs is None) != (self.cross is None):
            raise ValueError("FP inputs are given exactly when the accumulator sums the cross term")
        tokens = inputs.numel() // inputs.shape[-1]
        scale = None
        if token_weight is not None:
            w = token_weight.reshape(-1).to(self.hessian.device, torch.float32)
            if w.numel() != tokens:
                raise ValueError(f"token weights have {w.numel()} entries for {tokens} tokens")
            # sqrt-scaling keeps one matmul: (sqrt(w) x)^T (sqrt(w) x) = sum_t w_t x_t x_t^T
            scale = w.sqrt().unsqueeze(1)
            self.weight_sum += float(w.to(torch.float64).sum())
        else:
            self.weight_sum += tokens
        self.tokens += tokens
        x = self._rows(inputs, scale)
        per_sample = inputs.shape[-2] if inputs.dim() >= 2 else tokens
        self._add_products(self.hessian, x, x, per_sample)
        if self.cross is not None:
            if fp_inputs.shape != inputs.shape:
                raise ValueError(f"FP inputs {tuple(fp_inputs.shape)} do not match inputs {tuple(inputs.shape)}")
            self._add_products(self.cross, self._rows(fp_inputs, scale), x, per_sample)

    def copy(self) -> HessianAccumulator:
        """An independent accumulator holding the same sums."""
        other = HessianAccumulator.__new__(HessianAccumulator)
        other.hessian, other.weight_sum, other.tokens = self.hessian.clone(), self.weight_sum, self.tokens
        other.cross = None if self.cross is None else self.cross.clone()
        return other

    def _normalised(self, total: torch.Tensor) -> torch.Tensor:
        if self.weight_sum <= 0:
            return total.float()
        return (total * (2.0 / self.weight_sum)).float()

    def result(self) -> torch.Tensor:
        """The normalised float32 Hessian 2/sum(w) * X^T W X (zeros if nothing was added)."""
        return self._normalised(self.hessian)

    def cross_result(self) -> torch.Tensor | None:
        """The cross term with the Hessian's normalisation, 2/sum(w) * X_fp^T W X (None without it)."""
        return None if self.cross is None else self._normalised(self.cross)
