"""The CPU kernel (and the backend switch) against the one numeric reference.

Two oracles:

- ``linear_ref`` on the unquantized activations, with a per-element error bound
  derived from the kernel's arithmetic (see :func:`kernel_error_bound`);
- an emulation of the kernel's int8 activation quantization followed by
  ``linear_ref`` in fp32, which must agree to fp32 rounding: this pins the
  layout, zero points and scales far more tightly than the bound can.
"""

import dataclasses

import pytest
import torch

import awq_plugin.kernels as kernels
from awq_plugin.kernels.cpu import build
from awq_plugin.numerics import pack, quant_ref

pytestmark = pytest.mark.skipif(not build.has_avx512_vnni(), reason="CPU kernel needs AVX-512 VNNI")

U32 = 2.0**-24  # unit roundoff of fp32
UNIT_ROUNDOFF = {torch.float32: U32, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@dataclasses.dataclass
class Layer:
    gq: quant_ref.GroupQuantized
    packed: pack.AwqPacked

    @property
    def w_hat(self) -> torch.Tensor:
        return self.gq.dequantize(torch.float32)  # (N, K)


def make_layer(k: int, n: int, group_size: int, zero_point: bool = True, seed: int = 0) -> Layer:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05  # (N, K)
    gq = quant_ref.quantize(w, 4, group_size, zero_point=zero_point)
    return Layer(gq, pack.pack(gq))


def prepare(layer: Layer, backend: str = "cpu") -> kernels.AwqKernelWeight:
    p = layer.packed
    return kernels.prepare_awq_weight(p.qweight, p.qzeros, p.scales, layer.gq.group_size, backend=backend)


def activation_scales(x2: torch.Tensor, group_size: int) -> torch.Tensor:
    """The kernel's per-(row, group) activation scale: s_a = amax / 127, as [M, K]."""
    m, k = x2.shape
    xg = x2.float().reshape(m, k // group_size, group_size)  # (M, K/G, G)
    s = xg.abs().amax(dim=-1, keepdim=True) / 127.0  # (M, K/G, 1)
    return s.expand_as(xg).reshape(m, k)  # (M, K)


def emulate_int8_activations(x2: torch.Tensor, group_size: int) -> torch.Tensor:
    """x2 after the kernel's activation quantization (round half to even of x * 127/amax)."""
    m, k = x2.shape
    xg = x2.float().reshape(m, k // group_size, group_size)  # (M, K/G, G)
    amax = xg.abs().amax(dim=-1, keepdim=True)
    # An IEEE division as in the kernel (``127.0 / amax`` would multiply by a reciprocal).
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(xg * inv)
    return (q * (amax / 127.0)).reshape(m, k)


def kernel_error_bound(
    x2: torch.Tensor, w_hat: torch.Tensor, group_size: int, y_ref32: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """Per-element bound on |kernel - linear_ref| for x2 [M, K], w_hat [N, K] -> [M, N].

    - int8 activations: |x - s_a * round(x / s_a)| <= s_a / 2 per element, plus
      a few fp32 roundings of x * (127 / amax) (|x| * 2^-21 and s_a * 2^-16
      cover them); the int4 x int8 dot is exact in int32.
    - fp32: the kernel rounds once per group (NG fused adds, a cvt and a
      product) and linear_ref accumulates K products: together at most
      (K + NG + 4) * u32 * sum_k |w_hat| * |x| (the standard dot-product bound).
    - both results are rounded to the output dtype: |rd(a) - rd(b)| <=
      |a - b| (1 + u) + 2 u |a|, with a the fp32 reference.
    """
    k = x2.shape[1]
    ng = k // group_size
    xa = x2.float().abs()  # (M, K)
    wa = w_hat.abs()  # (N, K)
    # Activation quantization: half a step per element, plus fp32 rounding of x * inv.
    per_elem = activation_scales(x2, group_size) * (0.5 + 2.0**-16) + xa * 2.0**-21  # (M, K)
    quant = per_elem @ wa.t()  # (M, N)
    # fp32 accumulation in the kernel and in the reference.
    accum = (k + ng + 4) * U32 * ((xa + per_elem) @ wa.t())  # (M, N)
    u = UNIT_ROUNDOFF[out_dtype]
    e = quant + accum
    return e * (1 + u) + 2 * u * y_ref32.abs() + 1e-30


def check_against_reference(
    x: torch.Tensor, layer: Layer, y: torch.Tensor, bias: torch.Tensor | None = None
) -> None:
    """Assert y (kernel output for x [..., K]) against both oracles."""
    gq = layer.gq
    k = gq.q.shape[1]
    n = gq.q.shape[0]
    assert y.shape == (*x.shape[:-1], n)
    assert y.dtype == x.dtype
    x2 = x.reshape(-1, k)  # (M, K)
    y2 = y.reshape(-1, n).float()  # (M, N)
    y_ref = quant_ref.linear_ref(x2, gq.q, gq.scales, gq.zeros, gq.group_size, bias).float()
    y_ref32 = quant_ref.linear_ref(x2.float(), gq.q, gq.scales, gq.zeros, gq.group_size, bias)
    bound = kernel_error_bound(x2, layer.w_hat, gq.group_size, y_ref32, x.dtype)
    err = (y2 - y_ref).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error exceeds the derived bound by {worst:.3f}x"

    # Tight oracle: the same int8 activations in fp32 linear_ref.
    x_emul = emulate_int8_activations(x2, gq.group_size)
    y_emul = quant_ref.linear_ref(x_emul, gq.q, gq.scales, gq.zeros, gq.group_size, bias)
    u = UNIT_ROUNDOFF[x.dtype]
    wa = layer.w_hat.abs()
    accum = (k + k // gq.group_size + 4) * U32 * (x_emul.abs() @ wa.t())
    tight = accum * (1 + u) + 2 * u * y_emul.abs() + 1e-30
    worst = ((y2 - y_emul).abs() / tight).max().item()
    assert worst <= 1.0, f"kernel disagrees with its int8 emulation by {worst:.3f}x the fp32 bound"


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
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.awq_linear(x, w)
        torch.set_num_threads(2)
        two = kernels.awq_linear(x, w)
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(one, two)
    check_against_reference(x, layer_384x200, one)


def test_portable_path_matches_avx512(layer_384x200: Layer) -> None:
    """The fallback compiled for CPUs without AVX-512 computes the same sums."""
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


@pytest.mark.parametrize(
    ("requested", "env", "device", "cpu_ok", "expected"),
    [
        (None, None, "cpu", True, "cpu"),
        (None, None, "cpu", False, "reference"),
        (None, "auto", "cpu", True, "cpu"),
        (None, "", "cpu", True, "cpu"),
        (None, None, "cuda", False, "triton"),
        (None, "reference", "cpu", True, "reference"),
        (None, " Reference ", "cuda", True, "reference"),
        ("auto", "reference", "cpu", True, "reference"),
        ("cpu", "reference", "cpu", True, "cpu"),  # the explicit argument wins
        ("triton", None, "cpu", True, "triton"),
        (None, None, "mps", True, "reference"),
    ],
)
def test_choose_backend(requested, env, device, cpu_ok, expected) -> None:
    assert kernels.choose_backend(requested, env, device, cpu_ok) == expected


def test_choose_backend_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown AWQ kernel backend"):
        kernels.choose_backend(None, "marlin", "cpu", True)


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
