"""The AVX-512 VNNI CPU kernel (and the backend switch) against the one numeric reference.

The oracles (the reference with a derived error bound, and an emulation of the
kernel's int8 activations) live in ``kernel_oracle``, shared with the other CPU paths.
"""

import pytest
import torch
from kernel_oracle import Layer, check_against_reference, make_layer, outputs_on_one_and_two_threads, prepare

import awq_plugin.kernels as kernels
from awq_plugin.kernels.cpu import build
from awq_plugin.numerics import quant_ref

pytestmark = pytest.mark.skipif(not build.has_avx512_vnni(), reason="CPU kernel needs AVX-512 VNNI")

# ---------------------------------------------------------------------------
# Correctness
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layer_384x200() -> Layer:
    # K = 3 groups of 128; N = 200 = 12.5 tiles of 16, 3.125 blocks: every tail path.
    return make_layer(384, 200, 128)


@pytest.mark.parametrize("m", [1, 2, 7, 16, 33, 127, 128, 129, 512])
def test_m_sweep(layer_384x200: Layer, m: int) -> None:
    w = prepare(layer_384x200)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, 384, generator=gen).to(torch.bfloat16)
    bias = torch.randn(200, generator=gen).to(torch.bfloat16)
    check_against_reference(x, layer_384x200, kernels.awq_linear(x, w, bias), bias)


@pytest.mark.parametrize(
    ("k", "n", "group_size"),
    [
        (320, 72, 32),  # N = 4.5 tiles
        (448, 104, 64),  # K = 7 groups
        (640, 136, 128),
        (1152, 8, 128),  # a single half tile
        (200, 24, -1),  # per-channel
        (203, 40, -1),  # per-channel, K not a multiple of 8 (padded group)
    ],
)
@pytest.mark.parametrize("m", [1, 33])
def test_shapes_and_groups(k: int, n: int, group_size: int, m: int) -> None:
    layer = make_layer(k, n, group_size, seed=k + n)
    w = prepare(layer)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    check_against_reference(x, layer, kernels.awq_linear(x, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("zero_point", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("m", [1, 5, 129])
def test_dtypes_zero_point_bias(dtype: torch.dtype, zero_point: bool, with_bias: bool, m: int) -> None:
    layer = make_layer(256, 88, 64, zero_point=zero_point, seed=1)
    if not zero_point:
        assert (layer.gq.zeros == 8).all()  # symmetric: the constant zero 8
    w = prepare(layer)
    gen = torch.Generator().manual_seed(m)
    x = (torch.randn(m, 256, generator=gen) * 3).to(dtype)
    bias = torch.randn(88, generator=gen).to(dtype) if with_bias else None
    check_against_reference(x, layer, kernels.awq_linear(x, w, bias), bias)


def test_non_contiguous_and_3d_input(layer_384x200: Layer) -> None:
    w = prepare(layer_384x200)
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(9, 2 * 384, generator=gen, dtype=torch.float16)
    x = wide[:, ::2]  # (9, 384), stride 2 along K
    assert not x.is_contiguous()
    check_against_reference(x, layer_384x200, kernels.awq_linear(x, w))

    xt = torch.randn(384, 6, generator=gen).t()  # (6, 384), transposed
    check_against_reference(xt, layer_384x200, kernels.awq_linear(xt, w))

    x3 = torch.randn(2, 5, 384, generator=gen, dtype=torch.bfloat16)  # (B, T, K)
    y3 = kernels.awq_linear(x3, w)
    assert y3.shape == (2, 5, 200)
    check_against_reference(x3, layer_384x200, y3)


def test_zero_rows_and_empty_batch(layer_384x200: Layer) -> None:
    w = prepare(layer_384x200)
    x = torch.zeros(3, 384)  # amax = 0: the scale must not divide by zero
    bias = torch.randn(200)
    torch.testing.assert_close(kernels.awq_linear(x, w, bias), bias.expand(3, 200), rtol=0, atol=0)
    assert kernels.awq_linear(torch.zeros(0, 384), w).shape == (0, 200)


@pytest.mark.parametrize("m", [5, 16, 33])
def test_one_thread_matches_two(layer_384x200: Layer, m: int) -> None:
    """One thread (vLLM's CPU worker) streams each next block into L2 during the second chunk of
    rows; that is a prefetch only, so the result equals the two-thread split bit for bit."""
    w = prepare(layer_384x200)
    x = torch.randn(m, 384, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
    one, two = outputs_on_one_and_two_threads(x, w)
    assert torch.equal(one, two)
    check_against_reference(x, layer_384x200, one)


def test_generic_loops_match_avx512(layer_384x200: Layer) -> None:
    """The plain-loop path of awq_gemm.cpp (the layout's scalar definition) computes the same sums."""
    ext = build.load_extension()
    w = prepare(layer_384x200)
    x = torch.randn(17, 384, generator=torch.Generator().manual_seed(5))
    args = (x, w.qweight, w.scales, w.qzeros, w.group_size, w.out_features, None)
    fast = ext.awq_gemm_cpu(*args, False)
    portable = ext.awq_gemm_cpu(*args, True)
    # Same integers; only fp32 rounding order (fused vs separate multiply-add) differs.
    torch.testing.assert_close(portable, fast, rtol=1e-5, atol=1e-5)


def test_opcheck_custom_op(layer_384x200: Layer) -> None:
    """Schema, fake implementation and dispatch of torch.ops.awq_plugin.awq_gemm."""
    w = prepare(layer_384x200)
    x = torch.randn(4, 384, dtype=torch.bfloat16)
    bias = torch.randn(200, dtype=torch.bfloat16)
    args = (x, w.qweight, w.qzeros, w.scales, w.group_size, w.out_features, 1, bias)
    torch.library.opcheck(torch.ops.awq_plugin.awq_gemm.default, args)


# ---------------------------------------------------------------------------
# Backend choice
# ---------------------------------------------------------------------------


# The choice itself (a pure function of CPU flags) is tested in test_kernel_paths.py.


def test_available_backends_on_this_machine() -> None:
    assert kernels.available_backends()[:1] == ["cpu"]
    assert "reference" in kernels.available_backends()


def test_env_selects_reference(layer_384x200: Layer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.KERNEL_ENV, "reference")
    w = prepare(layer_384x200, backend=None)
    assert w.backend == "reference"
    gq = layer_384x200.gq
    x = torch.randn(7, 384, dtype=torch.bfloat16)
    bias = torch.randn(200, dtype=torch.bfloat16)
    expected = quant_ref.linear_ref(x, gq.q, gq.scales, gq.zeros, gq.group_size, bias)
    torch.testing.assert_close(kernels.awq_linear(x, w, bias), expected, rtol=0, atol=0)

    monkeypatch.setenv(kernels.KERNEL_ENV, "auto")
    assert prepare(layer_384x200, backend=None).backend == "cpu"


def test_prepare_rejects_mismatched_shapes(layer_384x200: Layer) -> None:
    p = layer_384x200.packed
    with pytest.raises(ValueError, match="shapes do not match"):
        kernels.prepare_awq_weight(p.qweight, p.qzeros, p.scales, 64, backend="cpu")
