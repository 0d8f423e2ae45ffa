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
"""

from __future__ import annotations

import torch

from awq_plugin.numerics.quant_ref import compute_scales_zeros, resolve_group_size

#: Added to the Hessian's diagonal, as a share of its mean (GPTQ's "percdamp").
DAMPING = 0.01
#: Columns updated together before the lazy update of the rest (GPTQ's block size).
COLUMN_BLOCK = 128


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


def _inverse_factor(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damping * mean(diag H) * I)^-1``, fp32 ``[K, K]``.

    Inputs that never fired (a zero diagonal) get a unit diagonal: their columns are then
    rounded to nearest and receive no correction.
    """
    h = hessian.detach().float().clone()
    diag = h.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    damp = damping * diag.mean()
    for _ in range(4):  # a near-singular H (few tokens, duplicate inputs) gets more damping
        try:
            factor = torch.linalg.cholesky(h + damp * torch.eye(h.shape[0], dtype=h.dtype, device=h.device))
            return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)
        except torch.linalg.LinAlgError:
            damp = damp * 10.0
    raise ValueError(f"the inputs' second-moment matrix is not positive definite even with damping {damp:g}")


def _largest_to_the_top_level(
    w: torch.Tensor,
    setters: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    q_max: int,
) -> None:
    """In place: each group's largest weight onto the top level of its grid where nearest rounding
    would put it one short (groups with a clamped zero point keep theirs)."""
    s = scales.repeat_interleave(group_size, dim=1)  # (N, K)
    z = zeros.repeat_interleave(group_size, dim=1)
    level = (torch.round(w / s) + z).clamp(0, q_max)
    largest = setters & (w > 0) & (z > 0) & (z < q_max) & (level == q_max - 1)
    w[largest] = ((q_max - z) * s)[largest]


@torch.no_grad()
def compensated_rounding(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    zero_point: bool = True,
    damping: float = DAMPING,
    column_block: int = COLUMN_BLOCK,
) -> torch.Tensor:
    """Round ``weight`` ``[N, K]`` to its group grid with GPTQ's error compensation.

    ``hessian`` ``[K, K]`` is ``X^T X`` of the linear's calibration inputs (any positive
    multiple: only its shape matters). Returns fp32 weights on the grid that
    :func:`~awq_plugin.numerics.quant_ref.compute_scales_zeros` takes from ``weight``.
    """
    w = weight.detach().float().clone()  # (N, K), rounded column by column in place
    n, k = w.shape
    g = resolve_group_size(group_size, k)
    if hessian.shape != (k, k):
        raise ValueError(
            f"hessian has shape {tuple(hessian.shape)}; expected ({k}, {k}) for weight {tuple(w.shape)}"
        )
    scales, zeros = compute_scales_zeros(w, bits, g, zero_point)  # (N, K/G) each
    scales = scales.float().to(w.device)
    zeros = zeros.float().to(w.device)
    q_max = 2**bits - 1
    # Symmetric grids span -(2^(b-1) - 1) .. 2^(b-1) - 1 steps from the largest magnitude; the
    # extra level below (-2^(b-1)) is never reached by nearest rounding, and a weight moved there
    # would re-derive a wider grid.
    q_min = 0 if zero_point else 1
    setters = _range_setters(w, g, zero_point)  # (N, K): the weights that set their group's range
    if zero_point:
        _largest_to_the_top_level(w, setters, scales, zeros, g, q_max)
    free = (~setters).float()
    u = _inverse_factor(hessian.to(w.device), damping)  # (K, K) upper
    for start in range(0, k, column_block):
        end = min(start + column_block, k)
        errors = torch.empty(n, end - start, dtype=w.dtype, device=w.device)
        for j in range(start, end):
            s, z = scales[:, j // g], zeros[:, j // g]  # (N,)
            column = w[:, j]
            on_grid = (torch.round(column / s) + z).clamp_(q_min, q_max).sub_(z).mul_(s)
            error = (column - on_grid) / u[j, j]  # (N,)
            w[:, j] = on_grid
            if j + 1 < end:
                w[:, j + 1 : end] -= error[:, None] * u[j, j + 1 : end][None, :] * free[:, j + 1 : end]
            errors[:, j - start] = error
        if end < k:
            w[:, end:] -= (errors @ u[start:end, end:]) * free[:, end:]
    return w
