"""GPTQ (arXiv 2210.17323): column-by-column quantization with second-order error feedback.

For a linear with weight W [out, in] and Hessian H [in, in] of the loss ||W X - Q X||^2
(H = 2 X X^T, or a token-weighted version), columns are quantized one at a time in
solve order; each column's rounding error is spread over the columns not yet quantized,
using the upper Cholesky factor U of H^-1 (H^-1 = U^T U). Updates inside a block of
spec.block_size columns are applied at once, the rest of the matrix is updated once per
block ("lazy batch" updates).

Computed without H^-1: with R = U^-1 (upper, H = R R^T, one Cholesky of H in reversed order) the errors
are E = (W - Q) R, so each column's value with all earlier updates is W_c + sum_{k<c} (W - Q)_k R_kc / R_cc
("left-looking": the same codes as the usual three factorizations, at a third of their in^3 work).

Output-side curvature (option `row_metric`): with a loss tr((W - Q)^T G (W - Q) H), G [out, out] the
output-side factor (block-diagonal: one [b, b] block per b consecutive rows), the rows are coupled too.
Babai's nearest-plane rounding on the Kronecker factor H (x) G, taken column by column and row by row
within a column, rounds each column's rows in turn with feedback through the upper Cholesky factor of
G^-1 (feedback across rows), and the columns after it receive exactly GPTQ's update from the column's
total rounding residual (feedback across columns): only the rounding inside a column changes. A weight waits only on
the one above it in its column and the one left of it in its row, so a span of columns of one grid is rounded in
wavefront steps (quantkit.quant.rows): m + b - 1 steps for m columns and b-row blocks, not m * b.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from quantkit.errors import QuantkitError
from quantkit.quant.cd import refine_codes
from quantkit.quant.grid import all_finite, check_finite, fit_grid, fit_groups, max_code
from quantkit.quant.rows import RowFeedback, round_span
from quantkit.quant.rtn import group_index
from quantkit.quant.spec import QuantResult, QuantSpec

# Cholesky retries: the relative damp grows tenfold per retry (from at least this value).
_MIN_RETRY_DAMP = 1e-4
_CHOLESKY_RETRIES = 5

logger = logging.getLogger(__name__)


def _inverse_factor(held: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor | None:
    """Upper U with H^-1 = U^T U for the damped H in `held` (taken out of it), computed in `dtype`;
    None where a factorization fails. Each matrix is dropped as soon as the next exists."""
    lower, info = torch.linalg.cholesky_ex(held.pop().to(dtype))
    if int(info) != 0:
        return None
    inverse = torch.cholesky_inverse(lower)
    del lower
    upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    del inverse
    if int(info) != 0 or not all_finite(upper):
        return None
    return upper


def _reversed_factor(held: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor | None:
    """Lower L with J H J = L L^T for the damped, reversed H = J H J in `held` (taken out of it), computed in
    `dtype`; None where it fails. With R = J L J (upper), H = R R^T and R^-1 is the upper Cholesky factor of
    H^-1 that GPTQ's updates use (both factors are unique), so one Cholesky replaces GPTQ's usual three
    (factor, invert, refactor the inverse): a third of their arithmetic, and no [in, in] inverse is formed."""
    lower = held.pop().to(dtype).T  # symmetric: its transpose is the column-major layout LAPACK factors in place
    info = torch.empty((), dtype=torch.int32, device=lower.device)
    torch.linalg.cholesky_ex(lower, out=(lower, info))  # in place: no second [in, in] matrix
    if int(info) != 0 or not all_finite(lower):
        return None
    return lower


def _damped_factor(
    solver_hessian: Callable[[], torch.Tensor], damp: float, name: str,
    factor: Callable[[list[torch.Tensor], torch.dtype], torch.Tensor | None],
) -> tuple[torch.Tensor, float]:
    """factor() of H + damp * mean(diag H) * I as float32, and the damp that worked.

    `solver_hessian()` makes a fresh copy of H for each try, so none is kept beside the factors.
    A factorization that fails in float32 is tried again in float64 at the same damp (real widths
    with few or repeated tokens can be ill-conditioned enough for float32 alone); only if that
    fails too is the damp raised, tenfold per try, with one warning naming the linear.
    """
    first = solver_hessian()
    mean_diag = float(torch.diagonal(first).mean())
    dtypes = dict.fromkeys((first.dtype, torch.float64))
    tried = []
    for _ in range(_CHOLESKY_RETRIES + 1):
        for dtype in dtypes:
            held = [first if first is not None else solver_hessian()]
            first = None
            held[0].diagonal().add_(damp * mean_diag)
            found = factor(held, dtype)
            if found is not None:
                if tried:
                    logger.warning(
                        "%s: the Hessian is not positive definite with damp %g; solved with damp %g "
                        "(few, repeated or degenerate calibration tokens reach it)", _short(name), tried[0], damp,
                    )
                return found.float(), damp
        tried.append(damp)
        damp = max(damp * 10, _MIN_RETRY_DAMP)
    where = f" of {name}" if name else ""
    raise QuantkitError(
        f"the Hessian{where} is not positive definite even with damp {tried} (fraction of its "
        "mean diagonal); check the calibration inputs (too few tokens, or NaN/degenerate activations)"
    )


def _pivot_dead(hessian: torch.Tensor, dead: torch.Tensor, n_dead: int) -> torch.Tensor:
    """`hessian` (modified in place) with the rows and columns of dead inputs zeroed and a unit pivot."""
    if n_dead:
        hessian[dead, :] = 0
        hessian[:, dead] = 0
        hessian[dead, dead] = 1
    return hessian


def _short(name: str) -> str:
    """A solve's name for one line: the first linear of a joint solve ("a + b + c") and how many more."""
    names = name.split(" + ")
    return names[0] + (f" (+{len(names) - 1} sharing its Hessian)" if len(names) > 1 else "") if name else "a linear"


def _r_slice(lower: torch.Tensor, rows_from: int, rows_to: int, cols_from: int, cols_to: int) -> torch.Tensor:
    """R[rows_from:rows_to, cols_from:cols_to] of R = J L J (J the reversal), read from L (a copy)."""
    n = lower.shape[0]
    return lower[n - rows_to : n - rows_from, n - cols_to : n - cols_from].flip((0, 1))


def _columns_as_updated(
    work: torch.Tensor,
    block: torch.Tensor,
    pending: torch.Tensor,
    lower: torch.Tensor,
    block_start: int,
    offset: int,
    end: int,
) -> torch.Tensor:
    """Columns G = [c, end) (c = block_start + offset) as [out, |G|] with every update from the columns before c,
    as right-looking GPTQ holds them: W_G + S_G R_GG^-1, S_G = sum_{k<c} D_k R_kG (from R U = I, U = R^-1).

    Inside the block S_G is in `pending`; after it, it is summed here from D of the columns solved so far
    (`work` left of the block, `block`'s first `offset` rows).
    """
    block_end = block_start + block.shape[0]
    column, inside = block_start + offset, slice(offset, min(end, block_end) - block_start)
    weights, sums = [block[inside].T], [pending[inside].T]
    if end > block_end:
        r = _r_slice(lower, 0, column, block_end, end)
        weights.append(work[:, block_end:end])
        sums.append(work[:, :block_start] @ r[:block_start] + block[:offset].T @ r[block_start:])
    r_group = _r_slice(lower, column, end, column, end)
    update = torch.linalg.solve_triangular(r_group, torch.cat(sums, dim=1), upper=True, left=False)
    return torch.cat(weights, dim=1) + update


def row_factor_upper(row_metric: torch.Tensor, damp: float, name: str = "") -> torch.Tensor:
    """Upper Cholesky factors of the inverses of the damped blocks of G: [blocks, b, b] -> [blocks, b, b]
    (a block that no gradient reached, all zero, gets the identity: its rows round independently).

    All blocks are factored in one batch, at the damp of _damped_factor's first try; a block that fails there
    takes _damped_factor's retries alone."""
    eye = torch.eye(row_metric.shape[1], device=row_metric.device)
    blocks = row_metric.float().clone()
    # float32 of damp * mean diagonal, as _damped_factor adds it
    blocks.diagonal(dim1=1, dim2=2).add_((torch.diagonal(blocks, dim1=1, dim2=2).mean(-1).double() * damp).float()[:, None])
    lower, info = torch.linalg.cholesky_ex(blocks)
    reached = torch.diagonal(row_metric, dim1=1, dim2=2).any(-1)
    factored = reached & (info == 0) & torch.isfinite(lower).flatten(1).all(-1)
    lower = torch.where(factored[:, None, None], lower, eye)  # the identity stands in until the loop below
    upper, info_upper = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    good = factored & (info_upper == 0) & torch.isfinite(upper).flatten(1).all(-1)
    upper = torch.where(reached[:, None, None], upper, eye)
    for index in (reached & ~good).nonzero().flatten().tolist():
        block = row_metric[index]
        upper[index] = _damped_factor(lambda block=block: block.float().clone(), damp, f"{name} output factor",
                                      _inverse_factor)[0]
    return upper


def gptq_solve(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    name: str = "",
    stats: dict | None = None,
    row_metric: torch.Tensor | None = None,
) -> QuantResult:
    """Quantize `weight` [out, in] with GPTQ against `hessian` [in, in].

    row_metric [blocks, b, b] (blocks * b = out): the output-side factor G, block-diagonal over consecutive
    rows; its blocks' rows are rounded with feedback across them (see the module doc).

    If `stats` is a dict it receives: loss (the solver's own estimate of
    tr((W - Q) H_damped (W - Q)^T) / 2, i.e. ||W X - Q X||^2 for H = 2 X X^T, with the
    weight's dead columns zeroed), damp (the relative damp used), dead_columns, seconds.
    """
    started = time.perf_counter()
    if weight.dim() != 2:
        raise QuantkitError(
            f"{name or 'weight'}: expected a 2-D [out, in] weight, got {tuple(weight.shape)}"
        )
    out_features, in_features = weight.shape
    spec.validate(in_features)
    if hessian is None or tuple(hessian.shape) != (in_features, in_features):
        got = None if hessian is None else tuple(hessian.shape)
        raise QuantkitError(
            f"{name or 'weight'}: GPTQ needs a Hessian of shape {(in_features, in_features)}, got {got}; "
            "use method 'rtn' to quantize without calibration data"
        )
    check_finite(weight, "weight", name)
    check_finite(hessian, "Hessian", name)
    feedback = None
    if row_metric is not None:
        if row_metric.dim() != 3 or row_metric.shape[1] != row_metric.shape[2] or \
                row_metric.shape[0] * row_metric.shape[1] != out_features:
            raise QuantkitError(f"{name or 'weight'}: the output factor must be [blocks, b, b] with blocks * b = "
                                f"{out_features} rows, got {tuple(row_metric.shape)}")
        check_finite(row_metric, "output factor", name)
        feedback = RowFeedback(row_factor_upper(row_metric.to(weight.device), spec.damp, name))

    device = weight.device
    work = weight.detach().to(torch.float32).clone()
    # the caller's Hessian (when already float32 on the device) is read here, never written: the
    # solver's own copy is the permuted one below, so only one extra [in, in] matrix is made
    hessian = hessian.detach().to(device=device, dtype=torch.float32)

    # An input that is always zero carries no information: its weight cannot matter, so
    # zero it (it then quantizes exactly) and give the Hessian a unit pivot to stay solvable.
    dead = torch.diagonal(hessian) == 0
    n_dead = int(dead.sum())
    if n_dead:
        work[:, dead] = 0

    # coordinate descent (spec.cd_sweeps) refines the codes on the undamped objective, in column order
    objective = (work.clone(), _pivot_dead(hessian.clone(), dead, n_dead)) if spec.cd_sweeps > 0 else None
    maxq = max_code(spec.bits)
    grouped = spec.group_size != -1
    group_size = spec.group_size if grouped else in_features
    n_groups = in_features // group_size
    static = grouped and spec.static_groups and spec.act_order  # static groups only mean something under act-order

    # Grids fixed before solving: per-channel, or static groups (on the unpermuted weight).
    if not grouped or static:
        scales, zeros = fit_groups(work, spec, name)
    else:
        scales = torch.empty(out_features, n_groups, device=device)
        zeros = torch.empty(out_features, n_groups, device=device)

    if spec.act_order:
        # dead columns sort by their unit pivot
        diagonal = torch.where(dead, torch.ones_like(dead, dtype=hessian.dtype), torch.diagonal(hessian))
        order = torch.sort(diagonal, descending=True, stable=True).indices
        work = work[:, order]
    else:
        order = torch.arange(in_features, device=device)
    # Group (column of scales/zeros) used by each column in solve order.
    if static or not grouped:
        solve_group = group_index(in_features, spec.group_size, device)[order].long()
    else:
        solve_group = torch.arange(in_features, device=device) // group_size

    # A host-side copy: reading a device tensor per column would sync a GPU 10k times.
    solve_group_list = solve_group.tolist()

    def solver_hessian() -> torch.Tensor:
        """A copy of the Hessian in reversed solve order with dead inputs pivoted (`hessian` is never written);
        one gather, so no second [in, in] temporary."""
        reverse = order.flip(0)
        return _pivot_dead(hessian[reverse[:, None], reverse[None, :]], dead[reverse], n_dead)

    lower, used_damp = _damped_factor(solver_hessian, spec.damp, name, _reversed_factor)

    codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=device)
    loss_per_row = torch.zeros(out_features, device=device)
    block_size = max(1, spec.block_size)
    col_scale = col_zero = None
    fixed_scales, fixed_zeros = (scales.T.contiguous(), zeros.T.contiguous()) if not grouped or static else (None, None)
    current_group = -1

    # Left-looking GPTQ on H = R R^T (see _reversed_factor): `work` holds, left of the block, D = W - Q of the
    # columns already solved and, from the block on, the unsolved W. A column's value with every earlier
    # update is v_c = W_c + s_c / R_cc with s_c = sum_{k<c} D_k R_kc: the earlier blocks' part is one matmul
    # per block, the block's own part is fed forward column by column. Blocks are held transposed
    # ([columns, out]) so that each column and each feed-forward update is contiguous.
    for block_start in range(0, in_features, block_size):
        block_end = min(block_start + block_size, in_features)
        width = block_end - block_start
        block = work[:, block_start:block_end].T.contiguous()
        block_r = _r_slice(lower, block_start, block_end, block_start, block_end).contiguous()
        if block_start:
            pending = _r_slice(lower, 0, block_start, block_start, block_end).T @ work[:, :block_start].T
        else:
            pending = torch.zeros_like(block)
        block_errors = torch.empty_like(block)
        block_codes = torch.empty_like(block)

        # The column loop is GPTQ's sequential core: codes stay float here (the same values
        # quantize() would give) and are cast once per block, to keep each step to a few ops.
        offset = 0
        while offset < width:
            column = block_start + offset
            group = solve_group_list[column]
            diagonal = block_r[offset, offset]
            if grouped and not static and column % group_size == 0:
                # Dynamic groups: fit the grid on the group's columns as they stand now.
                current = _columns_as_updated(
                    work, block, pending, lower, block_start, offset, min(column + group_size, in_features)
                )
                col_scale, col_zero = fit_grid(current, spec, name)
                scales[:, group], zeros[:, group] = col_scale, col_zero
                current_group = group
            if feedback is not None:  # a whole span of one grid (a dynamic group, or the block) at once
                end = min(width, offset + group_size - column % group_size) if grouped and not static else width
                if grouped and not static:
                    grid = (col_scale.expand(end - offset, -1), col_zero.expand(end - offset, -1))
                else:
                    span_groups = solve_group[column : block_start + end]
                    grid = (fixed_scales[span_groups], fixed_zeros[span_groups])
                block_codes[offset:end], block_errors[offset:end] = round_span(
                    block, pending, block_r, (offset, end), grid, maxq, feedback)
                offset = end
                continue
            if group != current_group:  # a fixed grid (per channel, static groups): its rows are contiguous
                col_scale, col_zero = fixed_scales[group], fixed_zeros[group]
                current_group = group

            values = block[offset] + pending[offset] / diagonal
            column_codes = torch.clamp(torch.round(values / col_scale) + col_zero, 0, maxq)
            block_codes[offset] = column_codes
            rounded = (column_codes - col_zero) * col_scale
            block_errors[offset] = (values - rounded) * diagonal
            block[offset] -= rounded  # D_c = W_c - Q_c
            if offset + 1 < width:
                pending[offset + 1 :].addr_(block_r[offset, offset + 1 :], block[offset])
            offset += 1

        codes[:, block_start:block_end] = block_codes.T.to(torch.uint8)
        loss_per_row += block_errors.square().sum(dim=0)
        work[:, block_start:block_end] = block.T

    inverse_order = torch.argsort(order)
    qweight = codes[:, inverse_order]
    if static or not grouped:
        g_idx = group_index(in_features, spec.group_size, device)
    else:
        g_idx = solve_group[inverse_order].to(torch.int32)

    result = QuantResult.of(spec, qweight, scales, zeros.to(torch.uint8), g_idx)
    if objective is not None:
        result = refine_codes(*objective, result, spec.cd_sweeps)
    if stats is not None:
        stats.update(
            loss=float(loss_per_row.sum()) / 2,
            damp=used_damp,
            dead_columns=n_dead,
            seconds=time.perf_counter() - started,
        )
    return result
