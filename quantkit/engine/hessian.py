"""Per-linear input statistics: H = 2 * sum_t w_t x_t x_t^T / sum_t w_t (and the FP-target cross term)."""

from __future__ import annotations

import torch

from quantkit.memory import PAGES_RELEASABLE, release_pages

# Tokens a float32 sum takes before it moves to float64 (GPUs). Measured at width 2048 on bfloat16
# inputs with three 300x outlier channels and a 50x first token, in batches of 2048 tokens: the
# float32 sum's error has a spectral norm of 3% of the default damp (1% of the mean diagonal) at
# 2^17 tokens and 13% at 2^19, growing about linearly past 2^17.
FLOAT32_SUM_TOKENS = 2**18
# Rows converted at a time when a float64 sum becomes the float32 Hessian (no float64 temporary
# the size of the sum: at width 14336 that would be 1.6 GB).
_ROWS = 1024
# Rows of a sample's float32 product X^T X added to a float64 sum at a time (no [in, in] float32 temporary
# beside the sum: 0.8 GB at width 14336).
PRODUCT_ROWS = 1024


class HessianAccumulator:
    """Accumulates the (token-weighted) Hessian of one linear's reconstruction loss.

    On CPU each sample's X^T X is a float32 matmul (2.5x faster than float64) added into a
    float64 sum: a sample's product does not depend on which samples share its batch or rank, and
    the float64 sum barely depends on their order, so sharding samples over ranks gives the same
    float32 Hessian as one process. On GPUs float64 runs at a small fraction of float32 speed
    (1/64 on consumer cards), so each batch is one float32 matmul summed in float32, until the sum
    holds FLOAT32_SUM_TOKENS tokens; from there on it is float64 (each batch's float32 product
    added in), as the rounding of a long float32 sum grows toward the damp. Inputs of any dtype
    (bfloat16, float16 models) are multiplied in float32.

    With `cross`, it also sums C = sum_t w_t x_t x~_t^T, x_t being the FP model's input to the
    same linear on the same token (the FP target, quantkit.quant.gptaq).

    With `groups` > 1 the token weights are [tokens, groups] and each group k of the linear's
    output rows gets its own Hessian sum_t w_{t,k} x_t x_t^T: `hessian` is then [groups, in, in]
    (memory and summing time grow by `groups`).
    """

    def __init__(self, in_features: int, device: torch.device | str, cross: bool = False, groups: int = 1,
                 dtype: torch.dtype | None = None) -> None:
        if dtype is None:  # the sums' starting dtype: by device, as above
            dtype = torch.float64 if torch.device(device).type == "cpu" else torch.float32
        shape = (in_features, in_features) if groups == 1 else (groups, in_features, in_features)
        self.groups = groups
        self.may_widen = dtype != torch.float64  # the same on every rank: ranks agree on widening (reduce)
        self.hessian = torch.zeros(shape, dtype=dtype, device=device)
        self.cross = torch.zeros_like(self.hessian) if cross else None
        self.weight_sums = torch.zeros(groups, dtype=torch.float64)
        self.tokens = 0
        self.taken: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def _rows(self, inputs: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(self.hessian.device, torch.float32)
        return x if scale is None else x * scale

    def _add_products(self, total: torch.Tensor, left: torch.Tensor, right: torch.Tensor, per_sample: int | list[int]) -> None:
        if total.dtype == torch.float32:
            total.addmm_(left.T, right)
            return
        if total.device.type != "cpu":
            total.add_(left.T @ right)
            return
        for a, b in zip(left.split(per_sample), right.split(per_sample)):
            for start in range(0, total.shape[0], PRODUCT_ROWS):
                total[start : start + PRODUCT_ROWS].add_(a[:, start : start + PRODUCT_ROWS].T @ b)

    def _weights(self, token_weight: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
        """[tokens, groups] float32 weights on the accumulator's device, or None for all ones."""
        if token_weight is None:
            return None
        w = token_weight.to(self.hessian.device, torch.float32).reshape(-1, self.groups)
        if w.shape != (tokens, self.groups):
            raise ValueError(
                f"token weights of shape {tuple(token_weight.shape)} do not give {tokens} tokens x {self.groups} groups"
            )
        return w

    def add(self, inputs: torch.Tensor, token_weight: torch.Tensor | None = None, fp_inputs: torch.Tensor | None = None,
            row_samples: torch.Tensor | None = None) -> None:
        """Add a batch of inputs [..., T, in]; token_weight has one non-negative value per token (per
        token and group: [..., T, groups]); fp_inputs (same shape as inputs) are the FP model's inputs
        to the linear, for the cross term. `row_samples` gives the sample of each row of 2-D inputs [rows, in]
        whose rows are not whole samples (an expert's routed tokens): each sample's rows make one product."""
        if (fp_inputs is None) != (self.cross is None):
            raise ValueError("FP inputs are given exactly when the accumulator sums the cross term")
        if fp_inputs is not None and fp_inputs.shape != inputs.shape:
            raise ValueError(f"FP inputs {tuple(fp_inputs.shape)} do not match inputs {tuple(inputs.shape)}")
        tokens = inputs.numel() // inputs.shape[-1]
        if self.tokens + tokens > FLOAT32_SUM_TOKENS:
            self.widen()
        weights = self._weights(token_weight, tokens)
        if weights is None:
            self.weight_sums += tokens
        else:
            self.weight_sums += weights.to(torch.float64).sum(dim=0).cpu()
        self.tokens += tokens
        per_sample: int | list[int] = inputs.shape[-2] if inputs.dim() >= 2 else tokens
        if row_samples is not None:  # the rows sample by sample (stable), so no product mixes samples
            order = torch.argsort(row_samples.to("cpu"), stable=True)
            per_sample = torch.bincount(row_samples.to("cpu")).tolist()
            per_sample = [n for n in per_sample if n]
            inputs = inputs.reshape(-1, inputs.shape[-1])[order.to(inputs.device)]
            fp_inputs = None if fp_inputs is None else fp_inputs.reshape(-1, fp_inputs.shape[-1])[order.to(fp_inputs.device)]
            weights = None if weights is None else weights[order.to(weights.device)]
        for group in range(self.groups):
            # sqrt-scaling keeps one matmul: (sqrt(w) x)^T (sqrt(w) x) = sum_t w_t x_t x_t^T
            scale = None if weights is None else weights[:, group].sqrt().unsqueeze(1)
            hessian = self.hessian if self.groups == 1 else self.hessian[group]
            x = self._rows(inputs, scale)
            self._add_products(hessian, x, x, per_sample)
            if self.cross is not None:
                cross = self.cross if self.groups == 1 else self.cross[group]
                self._add_products(cross, self._rows(fp_inputs, scale), x, per_sample)

    def widen(self) -> None:
        """Sum in float64 from now on (a no-op where the sums already are)."""
        self.hessian = self.hessian.double()
        self.cross = None if self.cross is None else self.cross.double()

    def copy(self) -> HessianAccumulator:
        """An independent accumulator holding the same sums."""
        other = HessianAccumulator.__new__(HessianAccumulator)
        other.groups, other.hessian, other.tokens = self.groups, self.hessian.clone(), self.tokens
        other.may_widen = self.may_widen
        other.weight_sums = self.weight_sums.clone()
        other.cross = None if self.cross is None else self.cross.clone()
        other.taken = None
        return other

    def _scales(self) -> list[float]:
        """Each group's normalisation 2 / sum(w) (1 for a group no token weighed)."""
        return [2.0 / w if w > 0 else 1.0 for w in self.weight_sums.tolist()]

    def _normalised(self, total: torch.Tensor) -> torch.Tensor:
        out = torch.empty(total.shape, dtype=torch.float32, device=total.device)
        for scale, target, source in zip(self._scales(), out.view(-1, *total.shape[-2:]), total.view(-1, *total.shape[-2:])):
            for start in range(0, source.shape[0], _ROWS):
                target[start : start + _ROWS] = source[start : start + _ROWS] * scale
        return out

    def _normalised_in_place(self, total: torch.Tensor) -> torch.Tensor:
        """_normalised(total) written over total's own memory (total is spent): a float32 sum scaled in place; a
        float64 sum on the CPU narrowed row block by row block into the first half of its storage (a block's
        float32 rows land on float64 rows already read), whose second half goes back to the OS. Elsewhere
        (a float64 sum on a GPU) a new float32 tensor, as _normalised."""
        if total.dtype == torch.float32:
            for scale, block in zip(self._scales(), total.view(-1, *total.shape[-2:])):
                block.mul_(scale)
            return total
        if total.device.type != "cpu" or total.dtype != torch.float64 or not PAGES_RELEASABLE or not total.is_contiguous():
            return self._normalised(total)
        n = total.shape[-1]
        source = total.view(-1, n)
        target = total.view(-1).view(torch.float32)[: total.numel()].view(-1, n)
        for group, scale in enumerate(self._scales()):
            for start in range(group * n, (group + 1) * n, _ROWS):
                stop = min(start + _ROWS, (group + 1) * n)
                target[start:stop] = source[start:stop] * scale  # the float64 block is read whole before the write
        release_pages(total.data_ptr() + total.numel() * 4, total.numel() * 4)
        return target.view(total.shape)

    def take_results(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """result() and cross_result(), each made in its sum's own memory, so that a float32 Hessian never sits
        beside its float64 sum (at width 14336 that is 784 MiB on top of 1.6 GB). The sums are spent: a second
        call returns the same tensors (linears that share an accumulator share them)."""
        if self.taken is None:
            hessian = self._normalised_in_place(self.hessian)
            self.hessian = None
            cross = None if self.cross is None else self._normalised_in_place(self.cross)
            self.cross = None
            self.taken = (hessian, cross)
        return self.taken

    def result(self) -> torch.Tensor:
        """The normalised float32 Hessian 2/sum(w) * X^T W X (zeros if nothing was added); [groups, in, in]
        with several groups, each normalised by its own weight total."""
        return self._normalised(self.hessian)

    def cross_result(self) -> torch.Tensor | None:
        """The cross term with the Hessian's normalisation, 2/sum(w) * X_fp^T W X (None without it)."""
        return None if self.cross is None else self._normalised(self.cross)
