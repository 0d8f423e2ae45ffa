"""The ``cpu`` kernel's AMX path (int8 tiles, ``tdpbssd``) and the choice between it and VNNI.

The choice is a pure function of the row count, the group size and whether the tiles run
here; it is tested with fake inputs on every host. The path itself runs only on CPUs with
AMX-INT8 (``amx_tile``, ``amx_int8``): there it is forced by name and checked against the one
numeric reference on awkward shapes (groups that make tile steps of 64, 32, 16 and 8 input
channels, row counts that are not multiples of 16, tail blocks), and against the VNNI path,
which it must equal bit for bit (same int8 activations, same exact group dots, same fp32
scaling). Elsewhere those tests skip: the CPU lacks the instructions.
"""

import pytest
import torch
from kernel_oracle import Layer, check_against_reference, make_layer, outputs_on_one_and_two_threads, prepare
from test_kernel_paths import AVX512_VNNI, extreme_layer

import awq_plugin.kernels as kernels
from awq_plugin.kernels.cpu import build

AMX = {*AVX512_VNNI, "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"}  # Sapphire Rapids and later

needs_amx = pytest.mark.skipif(
    not kernels.amx_ready(), reason="the AMX path needs a CPU with amx_tile and amx_int8"
)


# ---------------------------------------------------------------------------
# The choice (pure; every host)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "group_size", "ready", "expected"),
    [
        (1, 128, True, "vnni"),  # one row reads the weights at the bandwidth limit
        (kernels.AMX_MIN_ROWS - 1, 128, True, "vnni"),
        (kernels.AMX_MIN_ROWS, 128, True, "amx"),
        (300, 64, True, "amx"),
        (300, 32, True, "amx"),  # tile steps of 32 input channels
        (300, 40, True, "vnni"),  # padded group 40: steps of 8, not measured
        (300, 4096, True, "amx"),  # per-channel, a long group
        (300, 203, True, "vnni"),  # per-channel, padded to 208: steps of 16
        (300, 128, False, "vnni"),  # no tiles here
    ],
)
def test_path_by_rows_and_group(rows: int, group_size: int, ready: bool, expected: str) -> None:
    assert kernels.cpu_path_for(rows, group_size, ready) == expected


def test_auto_backend_names_the_amx_path_on_an_amx_cpu() -> None:
    choice = kernels.cpu_backend_for(frozenset(AMX))
    assert choice.backend == "cpu"
    assert "AMX" in choice.reason and str(kernels.AMX_MIN_ROWS) in choice.reason
    assert "AMX" not in kernels.cpu_backend_for(frozenset(AVX512_VNNI)).reason


def test_amx_is_compiled_only_for_cpus_with_its_tiles() -> None:
    assert {"-mamx-tile", "-mamx-int8"} <= set(build.compile_flags(frozenset(AMX)))
    assert not {"-mamx-tile", "-mamx-int8"} & set(build.compile_flags(frozenset(AVX512_VNNI)))
    # The tiles alone do not make the kernel: its VNNI path is the AMX path's scaffolding.
    assert not build.has_amx_int8(frozenset({"amx_tile", "amx_int8", "avx2"}))
    assert build.has_amx_int8(frozenset(AMX))


def test_amx_here_follows_the_cpu_flags() -> None:
    # Where the flags name the tiles, the kernel must have its AMX path and Linux must grant it.
    assert kernels.amx_ready() is build.has_amx_int8()


def test_forcing_amx_where_it_cannot_run_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = make_layer(256, 32, 128)
    monkeypatch.setattr(kernels, "amx_ready", lambda: False)
    with pytest.raises(ValueError, match="'amx' AWQ kernel needs a CPU with amx_tile, amx_int8"):
        prepare(layer, "amx")
    w = prepare(layer, "cpu")
    with pytest.raises(ValueError, match="cannot run the cpu kernel's AMX path"):
        kernels.cpu_linear(torch.randn(16, 256), w, path="amx")
    with pytest.raises(ValueError, match="unknown cpu kernel path 'tiles'"):
        kernels.cpu_linear(torch.randn(16, 256), w, path="tiles")


def test_the_cpu_backend_asks_the_choice_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = make_layer(256, 40, 64)
    w = prepare(layer, "cpu")
    asked: list[tuple[int, int, bool]] = []

    def spy(rows: int, group_size: int, ready: bool) -> str:
        asked.append((rows, group_size, ready))
        return "vnni"

    monkeypatch.setattr(kernels, "cpu_path_for", spy)
    for m in (1, 9, 40):
        x = torch.randn(m, 256)
        check_against_reference(x, layer, kernels.awq_linear(x, w))
    assert asked == [(m, 64, kernels.amx_ready()) for m in (1, 9, 40)]


# ---------------------------------------------------------------------------
# The path against the oracle and against VNNI (AMX hosts)
# ---------------------------------------------------------------------------


def check_amx(x: torch.Tensor, layer: Layer, bias: torch.Tensor | None = None) -> None:
    w = prepare(layer, "cpu")
    amx = kernels.cpu_linear(x, w, bias, path="amx")
    check_against_reference(x, layer, amx, bias)
    assert torch.equal(amx, kernels.cpu_linear(x, w, bias, path="vnni"))


@needs_amx
@pytest.mark.parametrize("m", [1, 2, 7, 8, 15, 16, 17, 31, 33, 64, 129, 300])
def test_m_sweep(m: int) -> None:
    # K = 7 groups of 64 (tile steps of 64); N = 200: 12.5 tiles, a tail block of one tile.
    layer = make_layer(448, 200, 64, seed=3)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, 448, generator=gen).to(torch.bfloat16)
    bias = torch.randn(200, generator=gen).to(torch.bfloat16)
    check_amx(x, layer, bias)


@needs_amx
@pytest.mark.parametrize(
    ("k", "n", "group_size"),
    [
        (96, 72, 32),  # steps of 32; N = 4.5 tiles
        (640, 136, 128),  # 2 steps of 64 per group; N = 8.5 tiles
        (120, 24, 40),  # padded group 40: steps of 8
        (200, 24, -1),  # per-channel 200, padded to 200: steps of 8
        (203, 40, -1),  # per-channel, K odd, padded to 208: steps of 16
        (4096, 16, -1),  # per-channel, 64 steps in one group
        (1152, 8, 128),  # a single half tile
    ],
)
@pytest.mark.parametrize("m", [5, 16, 48])
def test_shapes_and_groups(k: int, n: int, group_size: int, m: int) -> None:
    layer = make_layer(k, n, group_size, seed=k + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    check_amx(x, layer)


@needs_amx
@pytest.mark.parametrize(("k", "n", "group_size"), [(256, 72, 128), (4096, 40, -1)])
@pytest.mark.parametrize("m", [3, 16, 64])
def test_largest_integer_dots_do_not_overflow(k: int, n: int, group_size: int, m: int) -> None:
    # Activations at +-127 and weights at 0 or 15 with zero points 0, 8, 15: q - z spans
    # [-15, 15] in the B tiles and every group's dot is as large as it gets.
    layer = extreme_layer(k, n, group_size)
    sign = torch.where(torch.arange(m) % 2 == 0, 1.0, -1.0).unsqueeze(1)  # (M, 1)
    check_amx((sign * torch.full((m, k), 3.0)).to(torch.bfloat16), layer)


@needs_amx
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("zero_point", [True, False])
def test_dtypes_zero_point_bias(dtype: torch.dtype, zero_point: bool) -> None:
    layer = make_layer(256, 88, 64, zero_point=zero_point, seed=1)
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(21, 256, generator=gen) * 3).to(dtype)
    check_amx(x, layer, torch.randn(88, generator=gen).to(dtype))


@needs_amx
def test_zero_rows_empty_batch_and_threads() -> None:
    layer = make_layer(448, 200, 64)
    w = prepare(layer, "amx")
    assert w.backend == "amx"
    bias = torch.randn(200)
    zeros = torch.zeros(20, 448)  # amax = 0: the activation scale must not divide by zero
    torch.testing.assert_close(kernels.awq_linear(zeros, w, bias), bias.expand(20, 200), rtol=0, atol=0)
    assert kernels.awq_linear(torch.zeros(0, 448), w).shape == (0, 200)
    x = torch.randn(40, 448, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    one, two = outputs_on_one_and_two_threads(x, w)
    assert torch.equal(one, two)


@needs_amx
def test_env_forces_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = make_layer(256, 40, 64)
    monkeypatch.setenv(kernels.KERNEL_ENV, "amx")
    w = prepare(layer, None)
    assert w.backend == "amx"
    x = torch.randn(1, 256)  # one row: auto would take VNNI, forced stays on the tiles
    check_against_reference(x, layer, kernels.awq_linear(x, w))
