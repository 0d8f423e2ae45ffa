"""Error-compensated rounding (GPTQ, Frantar et al., ICLR 2023) on the grid AWQ leaves.

Nearest rounding quantizes every weight on its own. Compensated rounding walks a
linear's input columns in order and, after rounding column ``j``, moves the rest of
each row so that the layer's output on the calibration inputs changes least: the
rounding error, weighted by the inverse of the inputs' second moments ``H = X^T X``,
goes to the columns not yet rounded. The grid does not move: each group's scale and
zero point are those the reference quantizer takes from the (scaled, clipped) weights
before compensation, so the output is an ordinary AutoAWQ checkpoint.

The result is returned as weights *on* that grid, so that everything downstream (the
block's held-out judge, the end-to-end guard, packing) quantizes them with the one
reference quantizer and gets back the integers chosen here. That holds when each
group's result uses both ends of its grid: the weights that set the group's range
(its largest and smallest, or its largest magnitude when symmetric) receive no
compensation and sit at the grid's ends, so re-deriving the grid from the result
gives the same grid. The smallest weight always rounds to the lowest level; the
largest may round one level short of the top (the zero point is rounded and the
scale stored in fp16), and is then placed on the top level instead, an error of at
most one step that compensation spreads like any other. (A group whose zero point is
clamped, all of one sign, may re-derive another grid; it is then quantized as the
reference quantizer sees it, which is what gets judged and written.)

The walk is greedy: each column is rounded once, knowing only the columns before it.
``refine_passes`` then revisits the result by coordinate descent on the same objective
(QuantEase, Behdin et al., 2023): each column in turn moves to the grid level nearest its
least-squares optimum with every other column fixed, which never raises the objective.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch

from awq_plugin.numerics.dense import copy_transposed
from awq_plugin.numerics.quant_ref import compute_scales_zeros, resolve_group_size

#: Added to the Hessian's diagonal, as a share of its mean (GPTQ's "percdamp").
DAMPING = 0.01
#: Columns updated together before the lazy update of the rest (GPTQ's block size).
COLUMN_BLOCK = 128
#: Columns within a block whose corrections reach the rest of the block together.
SUB_BLOCK = 16


def _range_setters(w: torch.Tensor, group_size: int, zero_point: bool) -> torch.Tensor:
    """``[N, K]`` bool: per row and group, the weights that set the quantized range."""
    n, k = w.shape
    grouped = w.reshape(n, k // group_size, group_size)  # (N, K/G, G)
    mask = torch.zeros_like(grouped, dtype=torch.bool)
    if zero_point:
        mask.scatter_(-1, grouped.argmax(dim=-1, keepdim=True), True)
        mask.scatter_(-1, grouped.argmin(dim=-1, keepdim=True), True)
    else:
        mask.scatter_(-1, grouped.abs().argmax(dim=-1, keepdim=True), True)
    return mask.reshape(n, k)


def _invert_lower_(lower: torch.Tensor, leaf: int = 512) -> None:
    """Invert a lower-triangular matrix in place, by halves: ``[[A, 0], [B, C]]^-1`` is
    ``[[A^-1, 0], [-C^-1 B A^-1, C^-1]]``, so most of the work is two dense matmuls per level
    (a third faster here than one triangular solve against the identity), and the only
    scratch is one product the size of ``B``. Triangular solves for the corner would do half
    the multiplications, but ``torch.linalg.solve_triangular`` copies its strided triangle
    first: two scratch matrices the size of ``B`` instead of one (measured at width 6144),
    a quarter of ``[K, K]`` more at the compensation's peak, so the products stay."""
    n = lower.shape[0]
    if n <= leaf:
        eye = torch.eye(n, dtype=lower.dtype, device=lower.device)
        lower.copy_(torch.linalg.solve_triangular(lower, eye, upper=False))
        return
    h = n // 2
    a, b, c = lower[:h, :h], lower[h:, :h], lower[h:, h:]
    _invert_lower_(a, leaf)
    _invert_lower_(c, leaf)
    b.copy_(c @ b)
    b.copy_(b @ a)
    b.neg_()


class NotPositiveDefinite(ValueError):
    """The damped ``X^T X`` has no Cholesky factor (raised where no retry is possible)."""


def _reversed_inverse_factor(
    hessian: torch.Tensor,
    damping: float,
    input_scale: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
    consume: bool = False,
) -> torch.Tensor:
    """``M`` with ``U = J M J``: ``U`` the upper Cholesky factor of
    ``(H + damping * mean(diag H) * I)^-1`` (``U^T U``), ``J`` the order-reversing
    permutation; fp32 ``[K, K]``, lower triangular. :func:`_factor_rows` reads ``U``'s rows.

    ``M`` is ``L^-1`` with ``L`` the lower Cholesky factor of ``J H J``: one factorisation and
    one triangular inverse, where factoring, inverting and factoring the inverse again cost
    twice as much (a 14336-wide ``H``: 14 s against 24 s). Both run in place on one copy of
    ``H``: one ``[K, K]`` matrix (822 MB for a 14336-wide input) plus a quarter of one as
    scratch. Inputs that never fired (a zero diagonal) get a unit diagonal: their columns are
    then rounded to nearest and receive no correction.

    ``order`` (a permutation of ``K``): the factor of ``H`` with rows and columns taken in that
    order (``H[order][:, order]``), for a walk over the columns in that order; the copy is made
    permuted, the columns a slab of rows at a time, so the bound stays one ``[K, K]`` matrix
    plus a slab.

    ``consume``: ``hessian`` (fp32, contiguous) is not needed afterwards, and the factor is
    computed in it, reordered in place: no ``[K, K]`` copy at all. A failed factorisation has
    then destroyed it, so instead of retrying with more damping this raises
    :class:`NotPositiveDefinite`.
    """
    reverse = torch.arange(hessian.shape[0] - 1, -1, -1, device=hessian.device)
    walk_reversed = reverse if order is None else order.to(hessian.device).flip(0)
    scale = 1.0
    for _ in range(1 if consume else 4):  # a near-singular H (few tokens, duplicate inputs) gets more damping
        if consume:
            h = _permute_square_(hessian.detach(), walk_reversed)  # J P H P^T J, in place
        elif order is None:
            h = hessian.detach().float().flip(0, 1)  # J H J, the one copy
        else:
            h = _permuted_copy(hessian.detach(), walk_reversed)  # J P H P^T J, the one copy
        if input_scale is not None:  # the inputs divided by input_scale: H / (s s^T)
            inv = (1.0 / input_scale.to(h))[walk_reversed]
            h.mul_(inv[:, None]).mul_(inv[None, :])
        diag = h.diagonal()
        diag[diag == 0] = 1.0
        damp = scale * damping * diag.mean()
        diag.add_(damp)
        # The upper factor of the (symmetric) transpose, written over it: LAPACK's column-major
        # view of ``h``, so no copy is made; ``h`` then holds L in its lower triangle.
        info = torch.empty((), dtype=torch.int32, device=h.device)
        torch.linalg.cholesky_ex(h.mT, upper=True, out=(h.mT, info))
        if int(info) == 0:
            h.tril_()
            _invert_lower_(h)
            return h
        del h
        scale *= 10.0
    message = f"the inputs' second-moment matrix is not positive definite even with damping {damp:g}"
    raise NotPositiveDefinite(message)


def _permute_columns_(matrix: torch.Tensor, order: torch.Tensor, slab: int = 512) -> torch.Tensor:
    """In place, ``matrix[:, order]``, a slab of rows at a time (one ``[slab, K]`` scratch)."""
    index = order.to(matrix.device)
    for start in range(0, matrix.shape[0], slab):
        rows = matrix[start : start + slab]
        rows.copy_(rows.index_select(1, index))
    return matrix


def _permuted_copy(matrix: torch.Tensor, order: torch.Tensor, slab: int = 512) -> torch.Tensor:
    """fp32 ``matrix[order][:, order]`` for a square ``matrix``: the rows gathered into one new
    matrix, then its columns permuted in place (no second ``[K, K]``)."""
    out = matrix.index_select(0, order.to(matrix.device)).float()
    return _permute_columns_(out, order, slab)


def _permute_square_(matrix: torch.Tensor, order: torch.Tensor, slab: int = 512) -> torch.Tensor:
    """In place, fp32 contiguous square ``matrix`` becomes ``matrix[order][:, order]``."""
    if matrix.dtype != torch.float32 or not matrix.is_contiguous():
        raise ValueError(f"an in-place reorder needs a contiguous float32 matrix, got {matrix.dtype}")
    return _permute_columns_(permute_rows_(matrix, order), order, slab)


def permute_rows_(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """In place, ``t[i] = t_before[order[i]]`` for every row ``i`` (``order`` a permutation of
    ``t.shape[0]``), one row of scratch at a time: the rows move along the permutation's cycles.
    Returns ``t``."""
    perm = order.tolist()
    if sorted(perm) != list(range(t.shape[0])):
        raise ValueError(f"order is not a permutation of {t.shape[0]} rows")
    done = [False] * len(perm)
    for first in range(len(perm)):
        if done[first] or perm[first] == first:
            done[first] = True
            continue
        held = t[first].clone()
        i = first
        while True:
            done[i] = True
            source = perm[i]
            if source == first:
                t[i].copy_(held)
                break
            t[i].copy_(t[source])
            i = source
    return t


def activation_order(hessian: torch.Tensor, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """GPTQ's act-order: the input columns by decreasing second moment (the diagonal of ``X^T X``,
    of the scaled inputs with ``input_scale``), ties in index order. Columns that carry most of
    the input's energy are rounded first, while the most columns are left to absorb their
    error. The groups stay where they are (static groups): the order changes only the walk."""
    diag = hessian.diagonal().float()
    if input_scale is not None:
        diag = diag / input_scale.to(diag).square()
    return torch.sort(diag, descending=True, stable=True).indices


def _factor_rows(m: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows ``start:end`` of ``U = J M J`` from column ``start`` on (``U`` is zero before it),
    ``[end - start, K - start]``: a small copy of ``M``'s block, reversed."""
    k = m.shape[0]
    return m[k - end : k - start, : k - start].flip(0, 1)


def _largest_to_the_top_level(
    wt: torch.Tensor,
    setters_t: torch.Tensor,
    scales_t: torch.Tensor,
    zeros_t: torch.Tensor,
    group_size: int,
    q_max: int,
) -> None:
    """In place on transposed weights ``wt`` ``[K, N]`` (a view is fine): each group's largest
    weight onto the top level of its grid where nearest rounding would put it one short (groups
    with a clamped zero point keep theirs). ``setters_t``, ``scales_t``, ``zeros_t``: ``[K, N]``
    and ``[K/G, N]``."""
    k, n = wt.shape
    grouped = wt.view(k // group_size, group_size, n)  # (K/G, G, N), wt's storage
    s, z = scales_t[:, None, :], zeros_t[:, None, :]  # (K/G, 1, N)
    # in place on one fp32 temporary and one bool mask (the weight of an 8B down_proj is 235 MB)
    level = torch.div(grouped, s).round_().add_(z).clamp_(0, q_max)
    largest = level == q_max - 1
    del level
    largest &= setters_t.view_as(grouped)
    largest &= grouped > 0
    largest &= (z > 0) & (z < q_max)
    grouped[largest] = ((q_max - z) * s).expand_as(grouped)[largest]


def _asymmetric_shift(
    wt: torch.Tensor,
    cross: torch.Tensor,
    input_scale: torch.Tensor | None,
    m: torch.Tensor,
    order: torch.Tensor | None,
) -> torch.Tensor:
    """``(W cross H^-1)^T`` in walk order, ``[K, N]``: the move from the transposed weights
    ``wt`` (walk order) to the least-squares fit of the full-precision model's outputs
    (:func:`compensated_rounding_shared`'s ``cross``). ``H^-1`` is the damped inverse ``U^T U``
    whose reversed factor is ``m`` (``U = J m J``); with ``input_scale`` the inputs were divided by
    it, and so are both sides of ``cross``."""
    back = None if order is None else torch.argsort(order.to(wt.device))
    w_index = wt if back is None else wt.index_select(0, back)  # (K, N), input-column order
    cross = cross.float()
    if input_scale is not None:  # (X_ref - X)^T X of the scaled inputs: cross / (s s^T)
        inv = 1.0 / input_scale.to(cross)
        rhs = cross.t() @ (w_index * inv[:, None]) * inv[:, None]  # cross_s^T W_s^T
    else:
        rhs = cross.t() @ w_index
    del w_index
    if order is not None:
        rhs = rhs.index_select(0, order.to(wt.device))
    # H^-1 rhs = U^T (U rhs), with U = J m J (J reverses the rows)
    u_rhs = (m @ rhs.flip(0)).flip(0)
    return (m.t() @ u_rhs.flip(0)).flip(0)


def compensated_rounding(
    weight: torch.Tensor, hessian: torch.Tensor, *args: Any, **kwargs: Any
) -> torch.Tensor:
    """:func:`compensated_rounding_shared` of one linear ``weight`` ``[N, K]``: its weights on
    the grid, a transposed view of the working copy (copy it where it is needed)."""
    (rounded,) = compensated_rounding_shared([weight], hessian, *args, **kwargs)
    return rounded


@torch.no_grad()
def compensated_rounding_shared(
    weights: Sequence[torch.Tensor],
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    zero_point: bool = True,
    damping: float = DAMPING,
    column_block: int = COLUMN_BLOCK,
    input_scale: torch.Tensor | None = None,
    act_order: bool = False,
    consume_hessian: bool = False,
    cross: torch.Tensor | None = None,
    refine_passes: int = 0,
) -> list[torch.Tensor]:
    """Round each of ``weights`` (``[N_i, K]``, linears that read one input: q/k/v, gate/up) to
    its group grid with GPTQ's error compensation.

    ``hessian`` ``[K, K]`` is ``X^T X`` of the linears' calibration inputs (any positive
    multiple: only its shape matters); with ``input_scale`` ``[K]``, of inputs that have since
    been divided by it (an AWQ scale fold), applied to the working copy. Returns per weight
    fp32 weights on the grid that :func:`~awq_plugin.numerics.quant_ref.compute_scales_zeros`
    takes from it (views of one working buffer). Compensation treats each output row on its
    own, so the linears' rows stacked give each one's result, with one factorisation and one
    column loop instead of one per linear. ``act_order``: walk the columns in
    :func:`activation_order` instead of index order; each column keeps its own group's grid.
    ``consume_hessian``: ``hessian`` is not needed afterwards and its storage holds the factor
    (one ``[K, K]`` less at the peak; see :func:`_reversed_inverse_factor`, which then raises
    :class:`NotPositiveDefinite` instead of retrying, before any weight is touched).

    ``cross`` ``[K, K]``: ``(X_ref - X)^T X``, with ``X_ref`` the inputs the full-precision model
    gives these linears on the same tokens (GPTAQ's asymmetric calibration): the walk then
    approaches ``X_ref W^T`` instead of ``X W^T``. On a fixed input ``X`` that is the same as
    walking the least-squares weights ``W' = W + W cross H^-1`` (the part of the target outside
    ``X``'s span cannot be reached by any weights), so the weights are moved there first, with
    the damped inverse the walk itself uses; the range-setting weights keep their places.

    ``refine_passes``: passes of :func:`_refine_` over the walk's result. They need the damped
    ``X^T X`` itself, in walk order, beside the factor: one more ``[K, K]`` matrix (a consumed
    ``hessian`` then saves nothing) and one ``[K, N]``.
    """
    k = weights[0].shape[1]
    g = resolve_group_size(group_size, k)
    for weight in weights:
        if weight.shape[1] != k or hessian.shape != (k, k):
            raise ValueError(
                f"hessian has shape {tuple(hessian.shape)}; expected ({k}, {k}) for weight {tuple(weight.shape)}"
            )
    device = weights[0].device
    # The factor first, while no copy of the weights is held: its [K, K] matrix is the largest.
    scale = None if input_scale is None else input_scale.to(device)
    order = activation_order(hessian, scale) if act_order else None
    consume = consume_hessian and hessian.device == device and hessian.dtype == torch.float32
    consume = consume and hessian.is_contiguous()
    # refining needs the damped X^T X in walk order after the walk: made first, the original can go
    walk_hessian = _walk_order_hessian(hessian.to(device), damping, scale, order) if refine_passes else None
    m = _reversed_inverse_factor(hessian.to(device), damping, scale, order, consume)  # (K, K): U = J m J
    q_max = 2**bits - 1
    # Symmetric grids span -(2^(b-1) - 1) .. 2^(b-1) - 1 steps from the largest magnitude; the
    # extra level below (-2^(b-1)) is never reached by nearest rounding, and a weight moved there
    # would re-derive a wider grid.
    q_min = 0 if zero_point else 1
    # Walked transposed: weight column j is the contiguous row j of ``wt`` (a strided column of a
    # wide matrix touches one cache line per element, for every one of the ~16 ops per column).
    sizes = [weight.shape[0] for weight in weights]
    n = sum(sizes)
    wt = torch.empty(k, n, dtype=torch.float32, device=device)  # (K, N), rounded row by row in place
    pinned = torch.empty(k, n, dtype=torch.bool, device=device)  # these receive no compensation
    scales_t = torch.empty(k // g, n, dtype=torch.float32, device=device)
    zeros_t = torch.empty_like(scales_t)
    offset = 0
    for weight, size in zip(weights, sizes):
        columns = slice(offset, offset + size)
        w = weight.detach().float()  # (N_i, K); a copy only if the weight is not float32
        scales, zeros = compute_scales_zeros(w, bits, g, zero_point)  # (N_i, K/G) each
        scales_t[:, columns], zeros_t[:, columns] = scales.t(), zeros.t()
        copy_transposed(pinned[:, columns], _range_setters(w, g, zero_point))  # they set the ranges
        copy_transposed(wt[:, columns], w)
        del w, scales, zeros
        if zero_point:
            _largest_to_the_top_level(
                wt[:, columns], pinned[:, columns], scales_t[:, columns], zeros_t[:, columns], g, q_max
            )
        offset += size
    if order is not None:  # walk position i holds input column order[i]
        permute_rows_(wt, order)
        permute_rows_(pinned, order)
        group_of = (order // g).tolist()
    else:
        group_of = [j // g for j in range(k)]
    pinned_values = wt[pinned]
    if cross is not None:
        wt.add_(_asymmetric_shift(wt, cross.to(device), scale, m, order))
    residual = wt.clone() if refine_passes else None  # the walk's target, less its result below
    for start in range(0, k, column_block):
        end = min(start + column_block, k)
        u = _factor_rows(m, start, end)  # (B, K - start): U[start:end, start:]
        rows = wt[start:end]  # (B, N) view
        keep = pinned[start:end]
        # The lazy updates below reach the pinned weights too (no mask over the whole rest of the
        # matrix at every block); they get their own values back before their block is walked.
        n_pinned = int(keep.sum())
        rows[keep] = pinned_values[:n_pinned]
        pinned_values = pinned_values[n_pinned:]
        # Within the block too: each row's pinned weights are put back just before it is rounded.
        held = rows.clone()
        diagonal = u.diagonal().tolist()
        width = end - start
        errors = torch.empty(width, n, dtype=wt.dtype, device=wt.device)
        # Within the block, a second level of the same lazy update: each column's correction
        # reaches the rest of its sub-block at once (a rank-1 update of a few rows that stay in
        # cache) and the rest of the block once per sub-block (one matmul), instead of every
        # column sweeping the block's remaining rows (tens of MB for stacked gate/up rows).
        for sub in range(0, width, SUB_BLOCK):
            sub_end = min(sub + SUB_BLOCK, width)
            for i in range(sub, sub_end):
                s, z = scales_t[group_of[start + i]], zeros_t[group_of[start + i]]  # (N,)
                row = rows[i]
                torch.where(keep[i], held[i], row, out=row)
                on_grid = (torch.round(row / s) + z).clamp_(q_min, q_max).sub_(z).mul_(s)
                error = errors[i]
                torch.sub(row, on_grid, out=error).div_(diagonal[i])  # (N,)
                row.copy_(on_grid)
                if i + 1 < sub_end:
                    rows[i + 1 : sub_end].addr_(u[i, i + 1 : sub_end], error, alpha=-1.0)
            if sub_end < width:
                rows[sub_end:].addmm_(u[sub:sub_end, sub_end:width].t(), errors[sub:sub_end], alpha=-1.0)
        if end < k:
            wt[end:].addmm_(u[:, end - start :].t(), errors, alpha=-1.0)
    del m
    if walk_hessian is not None:
        residual.sub_(wt)
        _refine_(wt, residual, walk_hessian, pinned, scales_t, zeros_t, group_of, q_min, q_max, refine_passes)
        del residual, walk_hessian
    if order is not None:
        permute_rows_(wt, torch.argsort(order))
    rounded = wt.t()
    return [rounded[offset - size : offset] for offset, size in zip(itertools.accumulate(sizes), sizes)]


def _walk_order_hessian(
    hessian: torch.Tensor, damping: float, input_scale: torch.Tensor | None, order: torch.Tensor | None
) -> torch.Tensor:
    """The walk's objective as :func:`_reversed_inverse_factor` first damps it: fp32 ``H`` of the
    scaled inputs, rows and columns in walk order, unit diagonal where an input never fired,
    plus ``damping`` times its mean diagonal. A new ``[K, K]`` matrix."""
    h = hessian.detach().float().clone() if order is None else _permuted_copy(hessian.detach(), order)
    if input_scale is not None:  # the inputs divided by input_scale: H / (s s^T)
        inv = 1.0 / input_scale.to(h)
        if order is not None:
            inv = inv[order.to(h.device)]
        h.mul_(inv[:, None]).mul_(inv[None, :])
    diag = h.diagonal()
    diag[diag == 0] = 1.0
    diag.add_(damping * diag.mean())
    return h


@torch.no_grad()
def _refine_(
    wt: torch.Tensor,
    residual: torch.Tensor,
    h: torch.Tensor,
    pinned: torch.Tensor,
    scales_t: torch.Tensor,
    zeros_t: torch.Tensor,
    group_of: Sequence[int],
    q_min: int,
    q_max: int,
    passes: int,
    column_block: int = COLUMN_BLOCK,
    slab: int = 4096,
) -> None:
    """Coordinate descent on rounded transposed weights ``wt`` ``[K, N]`` (walk order), in place,
    on ``tr(R^T H R)`` with ``R`` = target - ``wt`` (``residual``, consumed) and ``h`` the damped
    ``X^T X`` in walk order. Column ``j``'s optimum with the others fixed is ``wt[j] + G[j] /
    H[j, j]`` (``G = H R``); the nearest level to it on the column's own grid is the best level
    there, so no move raises the objective. Every output row descends on its own; the rows of one
    column move together. Range-setting weights (``pinned``) stay. ``G`` is kept current as the
    walk does its updates: within a sub-block column by column, within a block per sub-block,
    across blocks per block, so most of the work is matmuls; the last pass skips the updates of
    columns it has already passed (the rest still need them)."""
    k, n = wt.shape
    # G = H R, a slab of columns at a time, written over R: no second [K, N] matrix
    for first in range(0, n, slab):
        part = residual[:, first : first + slab]
        part.copy_(h @ part)
    grad = residual
    diagonal = h.diagonal().tolist()
    for sweep in range(passes):
        last = sweep == passes - 1
        for start in range(0, k, column_block):
            end = min(start + column_block, k)
            width = end - start
            rows, g, keep = wt[start:end], grad[start:end], pinned[start:end]
            h_block = h[start:end, start:end]
            moves = torch.empty(width, n, dtype=wt.dtype, device=wt.device)
            for sub in range(0, width, SUB_BLOCK):
                sub_end = min(sub + SUB_BLOCK, width)
                for i in range(sub, sub_end):
                    s, z = scales_t[group_of[start + i]], zeros_t[group_of[start + i]]  # (N,)
                    row = rows[i]
                    best = torch.div(g[i], diagonal[start + i]).add_(row).div_(s).round_()
                    best.add_(z).clamp_(q_min, q_max).sub_(z).mul_(s)
                    move = moves[i]
                    torch.sub(best, row, out=move).masked_fill_(keep[i], 0.0)
                    row.add_(move)
                    first_row = sub if not last else i + 1
                    if first_row < sub_end:
                        g[first_row:sub_end].addr_(h_block[i, first_row:sub_end], move, alpha=-1.0)
                if sub and not last:  # the block's earlier sub-blocks
                    g[:sub].addmm_(h_block[sub:sub_end, :sub].t(), moves[sub:sub_end], alpha=-1.0)
                if sub_end < width:
                    g[sub_end:].addmm_(h_block[sub:sub_end, sub_end:].t(), moves[sub:sub_end], alpha=-1.0)
            if start and not last:
                grad[:start].addmm_(h[start:end, :start].t(), moves, alpha=-1.0)
            if end < k:
                grad[end:].addmm_(h[start:end, end:].t(), moves, alpha=-1.0)
