"""Per-linear input statistics: H = 2 * sum_t w_t x_t x_t^T / sum_t w_t."""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Accumulates the (token-weighted) Hessian of one linear's reconstruction loss.

    On CPU sums are kept in float64: products of float32 inputs are exact there, so the sum
    barely depends on the order samples arrive in, and sharding samples over ranks (then summing
    the shards) gives the same float32 Hessian as one process. On GPUs float64 runs at a small
    fraction of float32 speed (1/64 on consumer cards), so they sum in float32.
    """

    def __init__(self, in_features: int, device: torch.device | str) -> None:
        dtype = torch.float64 if torch.device(device).type == "cpu" else torch.float32
        self.hessian = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.weight_sum = 0.0
        self.tokens = 0

    def add(self, inputs: torch.Tensor, token_weight: torch.Tensor | None = None) -> None:
        """Add a batch of inputs [..., in]; token_weight has one non-negative value per token."""
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(self.hessian.device, self.hessian.dtype)
        if token_weight is None:
            self.hessian.addmm_(x.T, x)
            self.weight_sum += x.shape[0]
        else:
            w = token_weight.reshape(-1).to(x.device, x.dtype)
            if w.numel() != x.shape[0]:
                raise ValueError(f"token weights have {w.numel()} entries for {x.shape[0]} tokens")
            # sqrt-scaling keeps one matmul: (sqrt(w) x)^T (sqrt(w) x) = sum_t w_t x_t x_t^T
            xw = x * w.sqrt().unsqueeze(1)
            self.hessian.addmm_(xw.T, xw)
            self.weight_sum += float(w.sum())
        self.tokens += x.shape[0]

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
