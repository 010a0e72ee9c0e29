"""GPTQ's rounding with an output-side factor G (block-diagonal over rows): feedback across rows as well as columns.

Babai's nearest plane on H (x) G, in the order column by column and row by row within a column (gptq's module doc):
a weight (column o, row r) is rounded from its GPTQ value (every earlier column's update of row r) plus the feedback
of the rows before it in its column and block of G. So it waits on (o - 1, r) and (o, r - 1) only, and every
(o, r) with the same o + r can be rounded at once: a span of m columns (one grid: a group, or GPTQ's block) takes
m + b - 1 steps over b-row blocks instead of m * b. The same arithmetic per weight as the row-by-row loop, summed in
another order (float rounding only; tests/test_quant.py checks the codes against a scalar nearest-plane loop).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch


class RowFeedback:
    """The output-side factor's feedback across rows, from the upper Cholesky factors U of the blocks of G^-1
    ([blocks, b, b]): feed[b - 1 - r, k, c] = U[k, r, c] / U[k, r, r] for c > r (0 elsewhere), so that a row's
    rounding residual times its feed row is what the later rows of its block lose; rows reversed so that a wavefront
    step's rows, read in its columns' order, are one slice. Numpy on the CPU (torch's per-op overhead is about three
    times numpy's at these sizes), torch tensors elsewhere; the same float32 arithmetic either way."""

    def __init__(self, row_upper: torch.Tensor, numpy: bool | None = None) -> None:
        self.blocks, self.width = row_upper.shape[0], row_upper.shape[1]
        diag = torch.diagonal(row_upper, dim1=1, dim2=2)
        feed = (torch.triu(row_upper, diagonal=1) / diag[:, :, None]).permute(1, 0, 2).flip(0).contiguous()
        self.numpy = row_upper.device.type == "cpu" if numpy is None else numpy  # numpy=False: torch's steps
        self.device = row_upper.device
        self.feed = feed.numpy() if self.numpy else feed

    def array(self, tensor: torch.Tensor):
        """A contiguous copy of `tensor` in this feedback's array type."""
        tensor = tensor.contiguous().clone()
        return tensor.numpy() if self.numpy else tensor

    def steps(self, columns: int) -> list:
        """The wavefront over a span of `columns` columns: per step o + r = t, its first column and row-reversed
        index b - 1 - r_max and its (o, b - 1 - r, r) index arrays (o ascending)."""
        return _wavefront(columns, self.width, self.numpy, str(self.device))


@lru_cache(maxsize=64)
def _wavefront(columns: int, width: int, numpy: bool, device: str) -> list:
    steps = []
    for step in range(columns + width - 1):
        o = np.arange(max(0, step - width + 1), min(columns - 1, step) + 1)
        r = step - o
        arrays = (o, width - 1 - r, r) if numpy else tuple(torch.from_numpy(a).to(device) for a in (o, width - 1 - r, r))
        steps.append((int(o[0]), int(o[-1]) + 1, width - 1 - int(r[0]), *arrays))
    return steps


def round_span(block: torch.Tensor, pending: torch.Tensor, block_r: torch.Tensor, span: tuple[int, int],
               grid: tuple[torch.Tensor, torch.Tensor], maxq: int, feedback: RowFeedback) -> tuple[torch.Tensor, ...]:
    """GPTQ's column loop over the columns span = [start, end) of a block (held transposed: [columns, out]; `pending`
    its sums of earlier columns' updates, `block_r` its [width, width] slice of R) with the rows of each column
    rounded with feedback through `feedback`; grid = (scales, zeros) [end - start, out] of those columns.

    Writes D = W - Q into block[start:end] and the span's updates into pending[end:]; returns the span's codes and
    its columns' errors (value - rounded) * R_cc, both [end - start, out], as gptq_solve's loop keeps them."""
    start, end = span
    m, b, blocks = end - start, feedback.width, feedback.blocks
    shape = (m, blocks, b)  # out = k * b + r: [columns, out] viewed as (o, k, r)
    to_array = feedback.array
    weights, scale, zero = (to_array(t.reshape(shape)) for t in (block[start:end], *grid))
    # the sums of earlier updates as (b - 1 - r, k, o): a step's rows and the columns after it are slices
    sums = to_array(pending[start:end].reshape(shape).permute(2, 1, 0).flip(0))
    r_span = block_r[start:end, start:end]
    diag, later = to_array(torch.diagonal(r_span)[:, None]), to_array(torch.triu(r_span, diagonal=1))
    if feedback.numpy:
        fed, codes, values = np.zeros_like(weights), np.empty_like(weights), np.empty_like(weights)

        def to_grid(x, z):  # ufuncs with out=: numpy's wrappers (np.round, np.clip) cost more than the work
            np.rint(x, out=x)
            np.maximum(x, -z, out=x)
            return np.minimum(x, maxq - z, out=x)
    else:
        fed, codes, values = torch.zeros_like(weights), torch.empty_like(weights), torch.empty_like(weights)

        def to_grid(x, z):
            return torch.minimum(torch.maximum(x.round_(), -z), maxq - z)
    feed = feedback.feed
    for o_lo, o_hi, rev_lo, o, rev, r in feedback.steps(m):
        rev_hi = rev_lo + o_hi - o_lo
        w, d, s = weights[o, :, r], diag[o_lo:o_hi], scale[o, :, r]
        value = w + sums[rev, :, o] / d  # GPTQ's value: every earlier column's update of this row
        fed_value = value + fed[o, :, r]  # and the feedback of the rows before it in its column's block
        x = to_grid(fed_value / s, zero[o, :, r])
        codes[o, :, r] = x
        values[o, :, r] = value
        rounded = x * s
        fed[o_lo:o_hi] -= (fed_value - rounded)[:, :, None] * feed[rev_lo:rev_hi]
        sums[rev_lo:rev_hi] += (w - rounded)[:, :, None] * later[o_lo:o_hi, None, :]
    rounded = codes * scale
    residuals = torch.as_tensor(weights - rounded).reshape(m, -1)
    errors = torch.as_tensor((values - rounded) * diag[:, :, None]).reshape(m, -1)
    block[start:end] = residuals
    if end < block.shape[0]:
        pending[end:] += block_r[start:end, end:].T @ residuals
    return torch.as_tensor(codes + zero).reshape(m, -1), errors
