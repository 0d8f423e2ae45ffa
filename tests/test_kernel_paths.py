"""The CPU paths for machines without AVX-512 VNNI (``avx2``, ``portable``) and the choice among them.

Every path runs here (this CPU executes AVX2 code; the portable backend is generic C++
compiled for this CPU), against the one numeric reference on awkward shapes: K not a multiple of 64,
N not a multiple of 16, groups 32/64/128/per-channel, M from 1 to 300. The AVX-VNNI
inner product of the ``avx2`` kernel runs only on CPUs with ``avx_vnni``: each inner product
is forced by name and checked where the host executes it, and the choice is tested with fake
flag sets, so no verdict depends on which CPU the suite lands on.
"""

import pytest
import torch
from kernel_oracle import (
    Layer,
    check_against_reference,
    make_layer,
    outputs_on_one_and_two_threads,
    prepare,
)

import awq_plugin.kernels as kernels
from awq_plugin.kernels.cpu import build
from awq_plugin.numerics import pack, quant_ref

PATHS = ("avx2", "portable")


def check(
    backend: str, x: torch.Tensor, layer: Layer, y: torch.Tensor, bias: torch.Tensor | None = None
) -> None:
    # Both paths have the AVX-512 kernel's arithmetic (int8 activations, exact integer
    # group dots), hence its oracles and bound.
    check_against_reference(x, layer, y, bias)


# ---------------------------------------------------------------------------
# Correctness on awkward shapes
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layer_448x200() -> Layer:
    # K = 7 groups of 64 (not a multiple of 128); N = 200 = 12.5 tiles of 16, 3.125 blocks.
    return make_layer(448, 200, 64)


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 16, 33, 64, 127, 129, 300])
def test_m_sweep(backend: str, layer_448x200: Layer, m: int) -> None:
    w = prepare(layer_448x200, backend)
    assert w.backend == backend
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, 448, generator=gen).to(torch.bfloat16)
    bias = torch.randn(200, generator=gen).to(torch.bfloat16)
    check(backend, x, layer_448x200, kernels.awq_linear(x, w, bias), bias)


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize(
    ("k", "n", "group_size"),
    [
        (96, 72, 32),  # K = 96 (not a multiple of 64), N = 4.5 tiles
        (320, 40, 32),  # K = 5 x 64, N = 2.5 tiles
        (192, 104, 64),  # K = 3 groups of 64
        (640, 136, 128),  # K = 5 groups of 128, N = 8.5 tiles
        (1152, 8, 128),  # a single half tile
        (200, 24, -1),  # per-channel, one group of 200 (portable: int16 chunks of 32 k and a tail)
        (203, 40, -1),  # per-channel, K odd (padded group)
        (4096, 16, -1),  # per-channel, a long group
    ],
)
@pytest.mark.parametrize("m", [1, 6, 33])
def test_shapes_and_groups(backend: str, k: int, n: int, group_size: int, m: int) -> None:
    layer = make_layer(k, n, group_size, seed=k + n)
    w = prepare(layer, backend)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    check(backend, x, layer, kernels.awq_linear(x, w))


def extreme_layer(k: int, n: int, group_size: int) -> Layer:
    """Integer weights at the ends of the range: whole channels of q = 15 or q = 0, with
    zero points 0, 8 or 15, so that every group's dot is as large as int4 x int8 allows."""
    g = k if group_size == -1 else group_size
    col = torch.arange(n).unsqueeze(1)  # (N, 1)
    q = torch.where(col % 2 == 0, 15, 0).expand(n, k).to(torch.uint8).contiguous()
    zeros = torch.tensor([0, 15, 8])[torch.arange(n) % 3].unsqueeze(1).expand(n, k // g).to(torch.uint8)
    scales = torch.full((n, k // g), 0.01, dtype=torch.float16)
    gq = quant_ref.GroupQuantized(q=q, scales=scales, zeros=zeros.contiguous(), bits=4, group_size=g)
    return Layer(gq, pack.pack(gq))


@pytest.mark.parametrize("backend", ("cpu", *PATHS))
@pytest.mark.parametrize(("k", "n", "group_size"), [(256, 72, 128), (4096, 40, -1)])
@pytest.mark.parametrize("m", [1, 3, 16, 64])
def test_largest_integer_dots_do_not_overflow(backend: str, k: int, n: int, group_size: int, m: int) -> None:
    # Every activation quantizes to +-127 (a row is constant) and every weight is 0 or 15:
    # the kernels' int16 partial sums (avx2, portable) sit at their worst-case bound, and
    # the group-end corrections at their largest. A wrapped or saturated sum is off by
    # thousands of units, far outside the oracle's bound.
    if backend == "cpu" and not kernels.cpu_kernel_available():
        pytest.skip("the cpu kernel needs AVX-512 VNNI, which this CPU lacks")
    layer = extreme_layer(k, n, group_size)
    w = prepare(layer, backend)
    sign = torch.where(torch.arange(m) % 2 == 0, 1.0, -1.0).unsqueeze(1)  # (M, 1)
    x = (sign * torch.full((m, k), 3.0)).to(torch.bfloat16)
    check(backend, x, layer, kernels.awq_linear(x, w))


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("zero_point", [True, False])
@pytest.mark.parametrize("m", [1, 5, 129])
def test_dtypes_zero_point_bias(backend: str, dtype: torch.dtype, zero_point: bool, m: int) -> None:
    layer = make_layer(256, 88, 64, zero_point=zero_point, seed=1)
    w = prepare(layer, backend)
    gen = torch.Generator().manual_seed(m)
    x = (torch.randn(m, 256, generator=gen) * 3).to(dtype)
    bias = torch.randn(88, generator=gen).to(dtype)
    check(backend, x, layer, kernels.awq_linear(x, w, bias), bias)


@pytest.mark.parametrize("backend", PATHS)
def test_non_contiguous_3d_and_empty_input(backend: str, layer_448x200: Layer) -> None:
    w = prepare(layer_448x200, backend)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 2 * 448, generator=gen, dtype=torch.float16)[:, ::2]  # (9, 448), stride 2
    check(backend, x, layer_448x200, kernels.awq_linear(x, w))
    x3 = torch.randn(2, 5, 448, generator=gen, dtype=torch.bfloat16)  # (B, T, K)
    y3 = kernels.awq_linear(x3, w)
    assert y3.shape == (2, 5, 200)
    check(backend, x3, layer_448x200, y3)
    bias = torch.randn(200)
    zeros = torch.zeros(3, 448)  # amax = 0: the activation scale must not divide by zero
    torch.testing.assert_close(kernels.awq_linear(zeros, w, bias), bias.expand(3, 200), rtol=0, atol=0)
    assert kernels.awq_linear(torch.zeros(0, 448), w).shape == (0, 200)


def test_avx2_one_thread_matches_two(layer_448x200: Layer) -> None:
    """Blocks are handed out dynamically; each output is computed by one thread in a fixed order."""
    w = prepare(layer_448x200, "avx2")
    x = torch.randn(37, 448, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    one, two = outputs_on_one_and_two_threads(x, w)
    assert torch.equal(one, two)


def test_avx2_equals_avx512_kernel_up_to_fp32_order(layer_448x200: Layer) -> None:
    """Same layout, same int8 activations, same integer dots: only the fp32 fold may differ."""
    x = torch.randn(21, 448, generator=torch.Generator().manual_seed(4))
    y2 = kernels.awq_linear(x, prepare(layer_448x200, "avx2"))
    y512 = kernels.awq_linear(x, prepare(layer_448x200, "cpu"))
    torch.testing.assert_close(y2, y512, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", PATHS)
def test_opcheck_custom_op(backend: str, layer_448x200: Layer) -> None:
    """Schema, fake implementation and dispatch of torch.ops.awq_plugin.awq_gemm for the new ids."""
    w = prepare(layer_448x200, backend)
    x = torch.randn(4, 448, dtype=torch.bfloat16)
    bias = torch.randn(200, dtype=torch.bfloat16)
    backend_id = kernels._BACKEND_IDS[backend]
    args = (x, w.qweight, w.qzeros, w.scales, w.group_size, w.out_features, backend_id, bias)
    torch.library.opcheck(torch.ops.awq_plugin.awq_gemm.default, args)


# ---------------------------------------------------------------------------
# The avx2 kernel's two inner products, each forced by name where the host runs it
# ---------------------------------------------------------------------------


def test_avx2_build_uses_no_avx512_flags() -> None:
    """The AVX2 extension is compiled for AVX2 even on an AVX-512 host: what runs here runs there."""
    flags = build.avx2_compile_flags()
    assert "-mavx2" in flags and not any(f.startswith("-mavx512") or f == "-march=native" for f in flags)


def test_avx_vnni_path_is_compiled_on_every_host() -> None:
    # The VEX vpdpbusd is compiled in from a function attribute whatever this CPU has, so a build
    # made on a host without avx_vnni still carries the path for one with it.
    ext = build.load_avx2_extension()
    assert ext.has_avx2() and ext.has_avxvnni_code()
    # Auto follows this host's flag, whichever CPU the suite lands on.
    assert kernels._avx2_vnni_here() is kernels.avx2_uses_avx_vnni(build.cpu_flags())


@pytest.mark.parametrize("inner_product", kernels.AVX2_INNER_PRODUCTS)
@pytest.mark.parametrize(("k", "n", "group_size"), [(448, 200, 64), (203, 40, -1), (256, 72, 128)])
@pytest.mark.parametrize("m", [1, 3, 16, 33, 64])
def test_each_avx2_inner_product_matches_the_oracle(
    inner_product: str, k: int, n: int, group_size: int, m: int
) -> None:
    # Forced by name, not left to auto: on an AVX-VNNI host auto would never check vpmaddubsw,
    # elsewhere it would never check vpdpbusd. Skips only where the CPU lacks the instruction.
    if inner_product not in kernels.avx2_inner_products_for(build.cpu_flags()):
        pytest.skip(f"this CPU cannot execute {inner_product} (needs avx2, and avx_vnni for vpdpbusd)")
    layer = make_layer(k, n, group_size, seed=k + m)
    w = prepare(layer, "avx2")
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    check("avx2", x, layer, kernels.avx2_linear(x, w, bias, inner_product=inner_product), bias)


def test_both_avx2_inner_products_agree_at_their_largest_dots() -> None:
    # Where a host has both, they must give the same integers: constant +-127 activations against
    # q = 15 / 0 channels put vpmaddubsw's int16 pair sums at their saturation edge.
    products = kernels.avx2_inner_products_for(build.cpu_flags())
    if len(products) < 2:
        pytest.skip("this CPU has no avx_vnni: only vpmaddubsw can run")
    layer = extreme_layer(256, 72, 128)
    w = prepare(layer, "avx2")
    x = torch.full((16, 256), 3.0).to(torch.bfloat16)
    ys = [kernels.avx2_linear(x, w, inner_product=p) for p in products]
    torch.testing.assert_close(ys[0], ys[1], rtol=1e-5, atol=1e-5)


def test_forcing_an_inner_product_the_cpu_lacks_is_a_clear_error(
    layer_448x200: Layer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    w = prepare(layer_448x200, "avx2")
    with pytest.raises(ValueError, match="cannot execute the avx2 kernel's 'vpdpbusd'"):
        kernels.avx2_linear(torch.randn(2, 448), w, inner_product="vpdpbusd")
    with pytest.raises(ValueError, match="unknown avx2 inner product 'vnni'"):
        kernels.avx2_linear(torch.randn(2, 448), w, inner_product="vnni")


@pytest.mark.parametrize(
    ("flags", "uses_vnni"),
    [
        ({"avx2", "fma", "f16c", "avx_vnni"}, True),  # Alder Lake, Sapphire Rapids, Zen 5
        ({"avx2", "fma", "f16c"}, False),  # Haswell .. Zen 3
        ({"avx2", "fma", "f16c", "avx512f", "avx512_vnni"}, False),  # AVX-512 VNNI is not AVX-VNNI
    ],
)
def test_avx2_inner_product_follows_the_avx_vnni_flag(flags: set[str], uses_vnni: bool) -> None:
    assert kernels.avx2_uses_avx_vnni(frozenset(flags)) is uses_vnni
    expected = ("vpmaddubsw", "vpdpbusd") if uses_vnni else ("vpmaddubsw",)
    assert kernels.avx2_inner_products_for(frozenset(flags)) == expected


def test_no_avx2_inner_product_without_avx2() -> None:
    assert kernels.avx2_inner_products_for(frozenset({"avx_vnni"})) == ()
    assert kernels.avx2_inner_products_for(frozenset({"fp", "asimd", "asimddp"})) == ()


# ---------------------------------------------------------------------------
# Backend choice: a pure function of the CPU flags
# ---------------------------------------------------------------------------

AVX512_VNNI = {"sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
AVX_VNNI = {"sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni"}  # Alder Lake: no AVX-512
AVX2_ONLY = {"sse4_2", "avx", "avx2", "fma", "f16c"}  # Haswell, Zen 2/3
AVX512_NO_VNNI = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"}  # Skylake-SP
ARM_DOTPROD = {"fp", "asimd", "asimddp", "sve"}  # Graviton 3, Apple M (Linux), Ampere Altra
ARM_PLAIN = {"fp", "asimd"}  # Cortex-A72 (Raspberry Pi 4, Graviton 1)
NONE: set[str] = set()  # no /proc/cpuinfo flags at all (macOS, or an unknown CPU)


@pytest.mark.parametrize(
    ("flags", "expected", "reason_has"),
    [
        (AVX512_VNNI, "cpu", "AVX-512 VNNI"),
        (AVX_VNNI, "avx2", "VEX vpdpbusd"),
        (AVX2_ONLY, "avx2", "vpmaddubsw"),
        (AVX512_NO_VNNI, "avx2", "vpmaddubsw"),
        (ARM_DOTPROD, "portable", "asimddp"),
        (ARM_PLAIN, "portable", "ARM"),
        (NONE, "portable", "without AVX2"),
        ({"avx2"}, "portable", "without AVX2"),  # AVX2 without FMA/F16C: the kernel needs all three
    ],
)
def test_auto_choice_per_cpu(flags: set[str], expected: str, reason_has: str) -> None:
    choice = kernels.choose_backend(None, None, "cpu", frozenset(flags))
    assert choice.backend == expected
    assert reason_has in choice.reason


@pytest.mark.parametrize(
    ("flags", "unavailable", "expected"),
    [
        (AVX512_VNNI, {"cpu"}, "avx2"),  # the AVX-512 build failed: the AVX2 kernel still runs
        (AVX512_VNNI, {"cpu", "avx2"}, "portable"),
        (AVX2_ONLY, {"avx2"}, "portable"),
        (ARM_DOTPROD, {"portable"}, "reference"),
    ],
)
def test_auto_choice_falls_through_unavailable_kernels(
    flags: set[str], unavailable: set[str], expected: str
) -> None:
    assert kernels.choose_backend(None, "auto", "cpu", frozenset(flags), unavailable).backend == expected


@pytest.mark.parametrize(
    ("requested", "env", "device", "expected"),
    [
        (None, "avx2", "cpu", "avx2"),  # forced: the flags do not matter (tests run it on AVX-512)
        (None, " Portable ", "cpu", "portable"),
        (None, "avx512", "cpu", "cpu"),  # alias of the AVX-512 VNNI kernel
        (None, "reference", "cpu", "reference"),
        ("portable", "avx2", "cpu", "portable"),  # the explicit argument wins over the variable
        ("auto", "avx2", "cpu", "avx2"),
        (None, None, "cuda", "triton"),
        (None, "", "cuda", "triton"),
        ("triton", None, "cpu", "triton"),
        (None, None, "mps", "reference"),
    ],
)
def test_forced_choices(requested: str | None, env: str | None, device: str, expected: str) -> None:
    choice = kernels.choose_backend(requested, env, device, frozenset(ARM_PLAIN))
    assert choice.backend == expected
    assert choice.reason


def test_forcing_avx2_where_it_cannot_run_is_a_clear_error(
    layer_448x200: Layer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernels, "avx2_kernel_available", lambda: False)  # e.g. an ARM machine
    with pytest.raises(ValueError, match="'avx2' AWQ kernel needs an x86 CPU with avx2, fma, f16c"):
        prepare(layer_448x200, "avx2")


def test_unknown_backend_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown AWQ kernel backend 'marlin'"):
        kernels.choose_backend(None, "marlin", "cpu", frozenset(AVX2_ONLY))


@pytest.mark.parametrize("backend", PATHS)
def test_env_forces_the_path(backend: str, layer_448x200: Layer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.KERNEL_ENV, backend)
    assert prepare(layer_448x200, None).backend == backend
    monkeypatch.setenv(kernels.KERNEL_ENV, "avx512")
    assert prepare(layer_448x200, None).backend == "cpu"


def test_auto_on_this_machine_is_logged_with_its_reason(caplog: pytest.LogCaptureFixture) -> None:
    kernels.auto_cpu_choice.cache_clear()
    with caplog.at_level("INFO", logger="awq_plugin.kernels"):
        choice = kernels.auto_cpu_choice()
    assert choice == kernels.cpu_backend_for(build.cpu_flags())  # every kernel builds here
    assert f"awq-plugin: CPU kernel '{choice.backend}' ({choice.reason})" in caplog.text
    assert set(kernels.available_backends()) >= {"avx2", "portable", "reference"}
