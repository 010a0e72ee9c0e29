"""Per-linear input statistics: H = 2 * sum_t w_t x_t x_t^T / sum_t w_t."""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Accumulates the (token-weighted) Hessian of one linear's reconstruction loss.

    On CPU each sample's X^T X is a float32 matmul (2.5x faster than float64) added into a
    float64 sum: a sample's product does not depend on which samples share its batch or rank, and
    the float64 sum barely depends on their order, so sharding samples over ranks gives the same
    float32 Hessian as one process. On GPUs float64 runs at a small fraction of float32 speed
    (1/64 on consumer cards), so they sum in float32 in one matmul.
    """

    def __init__(self, in_features: int, device: torch.device | str) -> None:
        dtype = torch.float64 if torch.device(device).type == "cpu" else torch.float32
        self.hessian = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.weight_sum = 0.0
        self.tokens = 0

    def add(self, inputs: torch.Tensor, token_weight: torch.Tensor | None = None) -> None:
        """Add a batch of inputs [..., T, in]; token_weight has one non-negative value per token."""
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(self.hessian.device, torch.float32)
        if token_weight is not None:
            w = token_weight.reshape(-1).to(x.device, x.dtype)
            if w.numel() != x.shape[0]:
                raise ValueError(f"token weights have {w.numel()} entries for {x.shape[0]} tokens")
            # sqrt-scaling keeps one matmul: (sqrt(w) x)^T (sqrt(w) x) = sum_t w_t x_t x_t^T
            x = x * w.sqrt().unsqueeze(1)
            self.weight_sum += float(w.to(torch.float64).sum())
        else:
            self.weight_sum += x.shape[0]
        self.tokens += x.shape[0]
        if self.hessian.dtype == torch.float32:
            self.hessian.addmm_(x.T, x)
            return
        per_sample = inputs.shape[-2] if inputs.dim() >= 2 else x.shape[0]
        for sample in x.split(per_sample):
            self.hessian.add_(sample.T @ sample)

    def copy(self) -> HessianAccumulator:
        """An independent accumulator holding the same sums."""
        other = HessianAccumulator.__new__(HessianAccumulator)
        other.hessian, other.weight_sum, other.tokens = self.hessian.clone(), self.weight_sum, self.tokens
        return other

    def result(self) -> torch.Tensor:
        """The normalised float32 Hessian 2/sum(w) * X^T W X (zeros if nothing was added)."""
        if self.weight_sum <= 0:
            return self.hessian.float()
        return (self.hessian * (2.0 / self.weight_sum)).float()
