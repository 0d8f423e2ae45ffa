"""The searches' fused fake quantization and clip candidates give quant_ref's numbers bit for bit.

Pieces are forced small (a few rows) so that every path crosses piece boundaries, on awkward
row counts (127 / 129) and every grid the project uses (asymmetric and symmetric, 3 / 4 / 8 bits,
group 32 / 64 / per-channel).
"""

from __future__ import annotations

import pytest
import torch

from awq_plugin.algorithm.clip import search_clip_max, search_clip_range
from awq_plugin.calibration.statistics import group_gram
from awq_plugin.numerics import quant_ref, search_quant
from awq_plugin.numerics.search_quant import GroupFakeQuantizer, fake_quantize_scaled


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search_quant, "PIECE_ELEMENTS", 1000)


def _weight(n: int, k: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.exp(torch.randn(1, k, generator=g))  # uneven columns
    w[0, :8] = 0.0  # a constant (zero) group: the minimum step
    w[1, :] = w[1, :].abs() + 0.5  # an all-positive row: its grid's zero clamps
    return w.to(dtype)


@pytest.mark.parametrize("n", [127, 129])
@pytest.mark.parametrize(
    ("bits", "group_size", "zero_point"), [(4, 64, True), (4, 32, False), (3, 64, True), (8, -1, True)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quantize_scaled_is_quant_ref(
    n: int, bits: int, group_size: int, zero_point: bool, dtype
) -> None:
    w = _weight(n, 128, seed=n + bits, dtype=dtype)
    ref = quant_ref.fake_quantize(w, bits, group_size, zero_point)
    assert torch.equal(fake_quantize_scaled(w, bits, group_size, zero_point), ref)
    assert torch.equal(GroupFakeQuantizer(bits, group_size, zero_point)(w), ref)
    s = torch.exp(torch.randn(128, generator=torch.Generator().manual_seed(1)))
    scaled_ref = (
        quant_ref.fake_quantize(w.float() * s[None, :], bits, group_size, zero_point) / s[None, :]
    ).to(torch.bfloat16)
    got = fake_quantize_scaled(w, bits, group_size, zero_point, col_scales=s, out_dtype=torch.bfloat16)
    assert torch.equal(got, scaled_ref)


def _plain(bits: int, group_size: int, zero_point: bool):
    return lambda w: quant_ref.fake_quantize(w, bits, group_size, zero_point)


@pytest.mark.parametrize("gram_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("bits", "zero_point"), [(4, True), (4, False), (3, True)])
def test_fused_clip_searches_equal_the_plain_ones(
    gram_dtype: torch.dtype, bits: int, zero_point: bool
) -> None:
    w = _weight(129, 96, seed=bits)
    x = torch.randn(300, 96, generator=torch.Generator().manual_seed(2)) * 3
    gram = (group_gram(x, 32).double() / 300).to(gram_dtype)
    fused = GroupFakeQuantizer(bits, 32, zero_point)
    lo, hi = search_clip_range(w, gram, fused, n_grid=20, max_shrink=0.5)
    ref_lo, ref_hi = search_clip_range(w, gram, _plain(bits, 32, zero_point), n_grid=20, max_shrink=0.5)
    assert torch.equal(lo, ref_lo) and torch.equal(hi, ref_hi)
    bound = search_clip_max(w, gram, fused, n_grid=10, max_shrink=0.7)
    assert torch.equal(
        bound, search_clip_max(w, gram, _plain(bits, 32, zero_point), n_grid=10, max_shrink=0.7)
    )
