"""Packing in the AutoAWQ GEMM layout and the reference quantizer, against hand-made oracles."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from awq_plugin.errors import ConfigError
from awq_plugin.numerics import pack, quant_ref


def test_nibble_order_matches_the_written_out_layout() -> None:
    # Channels 0..7 hold the values 1..8; AWQ puts channel AWQ_PACK_ORDER[i] in nibble i,
    # so the nibbles read (low to high) 1,3,5,7,2,4,6,8.
    values = torch.arange(1, 9, dtype=torch.uint8).reshape(1, 8)
    packed = pack.pack_int4_columns(values)
    expected = sum(v << (4 * i) for i, v in enumerate([1, 3, 5, 7, 2, 4, 6, 8]))
    assert packed.dtype == torch.int32
    assert packed.item() & 0xFFFFFFFF == expected


def test_high_nibble_sets_the_sign_bit() -> None:
    values = torch.zeros(1, 8, dtype=torch.uint8)
    values[0, 7] = 15  # channel 7 lives in nibble 7, bits 28..31
    assert pack.pack_int4_columns(values).item() == -(2**31) + (7 << 28)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 9),
    groups=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_then_unpack_is_identity(rows: int, groups: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 16, (rows, groups * 8), generator=g, dtype=torch.uint8)
    assert torch.equal(pack.unpack_int4_columns(pack.pack_int4_columns(values)), values)


@settings(max_examples=40, deadline=None)
@given(
    n8=st.integers(1, 6),
    n_groups=st.integers(1, 5),
    group_size=st.sampled_from([32, 64, 128]),
    zero_point=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_quantize_pack_roundtrip_and_half_step_error(
    n8: int, n_groups: int, group_size: int, zero_point: bool, seed: int
) -> None:
    n, k = 8 * n8, n_groups * group_size
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    gq = quant_ref.quantize(w, 4, group_size, zero_point)
    unpacked = pack.unpack(pack.pack(gq))
    assert torch.equal(unpacked.q, gq.q)
    assert torch.equal(unpacked.zeros, gq.zeros)
    assert torch.equal(unpacked.scales, gq.scales)
    w_hat = unpacked.dequantize()
    assert torch.equal(w_hat, quant_ref.fake_quantize(w, 4, group_size, zero_point))
    # A weight inside its group's representable range is within half a step of its code. Rounding
    # the zero point to an integer can shift the range by up to half a step, leaving a group's
    # extreme weights just outside: they are clamped, so their error stays below one step.
    step = gq.scales.float().repeat_interleave(group_size, dim=1)  # (N, K)
    lo = (0 - gq.zeros.float()).repeat_interleave(group_size, dim=1) * step
    hi = (15 - gq.zeros.float()).repeat_interleave(group_size, dim=1) * step
    inside = (w >= lo) & (w <= hi)
    err = (w_hat - w).abs()
    assert (err[inside] <= step[inside] / 2 * (1 + 1e-5) + 1e-7).all()
    assert (err <= step * (1 + 1e-5)).all()


def test_per_channel_group_is_whole_row() -> None:
    w = torch.randn(16, 96)
    gq = quant_ref.quantize(w, 4, -1)
    assert gq.scales.shape == (16, 1) and gq.group_size == 96
    assert pack.pack(gq).group_size == 96


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_non_4bit_fake_quantizes_but_refuses_to_pack(bits: int) -> None:
    w = torch.randn(8, 64)
    gq = quant_ref.quantize(w, bits, 32)
    assert int(gq.q.max()) <= 2**bits - 1
    with pytest.raises(ValueError, match=f"bits={bits} cannot be packed"):
        pack.pack(gq)
    with pytest.raises(ConfigError, match="'bits' = 3"):
        from awq_plugin.config import AwqQuantConfig

        AwqQuantConfig(bits=3, group_size=64).check_packable()


def test_group_size_must_divide_k() -> None:
    with pytest.raises(ValueError, match="group_size=64 does not divide in_features=96"):
        quant_ref.quantize(torch.randn(8, 96), 4, 64)


def test_nan_weights_are_refused() -> None:
    w = torch.randn(8, 64)
    w[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quant_ref.quantize(w, 4, 32)


def test_symmetric_uses_constant_zero_eight() -> None:
    gq = quant_ref.quantize(torch.randn(8, 64), 4, 32, zero_point=False)
    assert torch.all(gq.zeros == 8)


def test_linear_ref_matches_dense_matmul_on_dequantized_weight() -> None:
    w = torch.randn(24, 128)
    gq = quant_ref.quantize(w, 4, 64)
    x = torch.randn(5, 128)
    bias = torch.randn(24)
    y = quant_ref.linear_ref(x, gq.q, gq.scales, gq.zeros, 64, bias)
    torch.testing.assert_close(y, x @ gq.dequantize().t() + bias, rtol=1e-5, atol=1e-5)
