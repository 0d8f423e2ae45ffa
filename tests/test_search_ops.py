"""The quantizer's fused clip-search steps (kernels/cpu/search_ops.cpp) against PyTorch's.

The candidate's q - w must be PyTorch's bit for bit (the same IEEE steps in one pass); the
per-group error sum may differ in its last bits (another summation order) and must choose the
same clips on the test layers.
"""

from __future__ import annotations

import pytest
import torch

from awq_plugin.algorithm import clip
from awq_plugin.algorithm.clip import search_clip_max, search_clip_range
from awq_plugin.kernels import search_ops
from awq_plugin.numerics.quant_ref import scales_zeros_from_range
from awq_plugin.numerics.search_quant import GroupFakeQuantizer, quantize_grouped_


@pytest.fixture(scope="module")
def ops():
    built = search_ops()
    assert built is not None, "the fused search steps must build wherever the tests run"
    return built


def _torch_delta(piece, hi, lo, scales, zeros, bits):
    clamped = torch.maximum(torch.minimum(piece, hi.unsqueeze(-1)), lo.unsqueeze(-1))
    return quantize_grouped_(clamped, scales, zeros, bits).sub_(piece)


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (7, 13, 33), (112, 9, 128)])
@pytest.mark.parametrize("zero_point", [True, False])
def test_the_fused_delta_is_pytorchs_bit_for_bit(ops, shape, zero_point) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    piece = torch.randn(shape, generator=gen) * 0.05
    piece[..., 0] = 0.0  # exact zeros, and values that land on .5 steps below
    top, bottom = piece.amax(-1), piece.amin(-1)
    shrink = 0.5 + 0.5 * torch.rand(shape[:-1], generator=gen)
    hi, lo = top * shrink, bottom * shrink.flip(-1)
    if not zero_point:
        hi = torch.maximum(hi.abs(), lo.abs())
        lo = -hi
    c_max = torch.maximum(torch.minimum(top, hi), lo)
    c_min = torch.maximum(torch.minimum(bottom, hi), lo)
    scales, zeros = scales_zeros_from_range(c_max, c_min, 4, zero_point, torch.float16)
    scales = scales.float()
    piece.view(-1)[1::5] = (scales.reshape(-1)[0] * 2.5).item()  # ties to even
    expected = _torch_delta(piece, hi, lo, scales, zeros, 4)
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.empty_like(piece, dtype=dtype)
        got = ops.clip_candidate_delta(piece, hi, lo, scales, zeros.float().contiguous(), 15, out)
        assert got.data_ptr() == out.data_ptr()
        assert torch.equal(got, expected.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 15, 16, 40, 128])
def test_the_fused_group_error_is_the_product_summed(ops, dtype, group) -> None:
    gen = torch.Generator().manual_seed(group)
    d = (torch.randn(6, 11, group, generator=gen) * 1e-2).to(dtype)
    cd = (torch.randn(6, 11, group, generator=gen) * 3.0).to(dtype)
    products = cd * d  # rounded to dtype, as PyTorch's element-wise product is
    expected = products.sum(dim=-1, dtype=torch.float32)
    got = ops.clip_candidate_error(cd, d, torch.empty(6, 11))
    # another summation order: within float32's bound for sums of `group` terms of these sizes
    bound = products.abs().sum(dim=-1, dtype=torch.float32) * group * 2.0**-24
    assert bool(((got - expected).abs() <= bound).all())
    assert not torch.equal(got, torch.zeros_like(got))


def test_bad_arguments_are_refused_by_name(ops) -> None:
    piece = torch.zeros(2, 3, 4)
    rows = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="scales must be a contiguous float32"):
        ops.clip_candidate_delta(piece, rows, rows, rows.double(), rows, 15, torch.empty_like(piece))
    with pytest.raises(RuntimeError, match="one value per group"):
        ops.clip_candidate_delta(piece, torch.zeros(5), rows, rows, rows, 15, torch.empty_like(piece))
    with pytest.raises(RuntimeError, match="out must be"):
        ops.clip_candidate_error(piece, piece, torch.empty(2, 3, dtype=torch.float64))


def _layer(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.02
    x = torch.randn(256, k, generator=gen) * (torch.rand(k, generator=gen) + 0.2)
    x[:, :3] *= 20.0  # outlier channels, so the clips differ from one group to the next
    return w, clip.group_gram(x, 32) / 256


@pytest.mark.parametrize("product_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("zero_point", [True, False])
def test_the_clip_search_chooses_the_same_ranges_fused_or_not(monkeypatch, product_dtype, zero_point) -> None:
    """The whole search with the fused steps, and with PyTorch's (as where the build fails)."""
    w, gram = _layer(70, 96, seed=int(zero_point))
    quantize = GroupFakeQuantizer(4, 32, zero_point, torch.float16)
    search = search_clip_range if zero_point else search_clip_max
    fused = search(w, gram, quantize, 20, 0.5, product_dtype)
    monkeypatch.setattr(clip, "_fused_steps", lambda device: None)
    plain = search(w, gram, quantize, 20, 0.5, product_dtype)
    for a, b in zip(fused if zero_point else [fused], plain if zero_point else [plain]):
        assert torch.equal(a, b)
