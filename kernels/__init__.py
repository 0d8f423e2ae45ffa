"""AWQ INT4 linear kernels: one op, several implementations, one reference.

The public surface:

- :func:`prepare_awq_weight` takes the AutoAWQ checkpoint tensors of one
  linear layer and repacks them, once, into the layout the chosen backend
  streams best, returning an :class:`AwqKernelWeight`.
- :func:`awq_linear` computes ``y = x @ W_hat.T + bias`` for ``x`` of any
  leading shape and dtype fp32/bf16/fp16; ``y`` has ``x``'s dtype.
- ``torch.ops.awq_plugin.awq_gemm`` is the ``torch.library`` custom op that
  ``awq_linear`` calls, with a fake implementation so that ``torch.compile``
  (which vLLM uses) traces through it.

Backends:

- ``"cpu"`` (alias ``"avx512"``): the C++ AVX-512 VNNI kernel in
  ``kernels/cpu/awq_gemm.cpp``, compiled on first use (see
  ``kernels/cpu/build.py``). Activations are quantized to int8 per (row, group)
  inside the kernel: the result differs from the reference by at most
  ``sum_k |w_hat[n, k]| * s_a[m, k // G] / 2`` plus fp32 rounding, with
  ``s_a = max_{k in group} |x[m, k]| / 127``. On CPUs with AMX-INT8 tiles the
  same kernel multiplies batches of :data:`AMX_MIN_ROWS` rows or more on the
  tiles (``tdpbssd``), with the same layout and the same numbers bit for bit;
  :func:`cpu_path_for` is that choice.
- ``"amx"``: the same kernel on the AMX tiles at every M (tests and benchmarks
  force it by name; it needs a CPU with ``amx_tile`` and ``amx_int8``).
- ``"avx2"``: the C++ AVX2 kernel in ``kernels/cpu/awq_gemm_avx2.cpp`` for x86
  CPUs without AVX-512 VNNI (``vpmaddubsw``/``vpmaddwd``, or the VEX ``vpdpbusd``
  where the CPU has AVX-VNNI), on the same repacked layout and with the same
  int8 activations, hence the same error bound.
- ``"portable"``: the C++ kernel in ``kernels/cpu/awq_gemm_portable.cpp``, for
  ARM and any other CPU: no intrinsics, generic vectors that the compiler lowers
  for this CPU (``-march=native``: NEON, AVX2, AVX-512). Same int8 activations
  and exact integer group dots as the other CPU kernels, hence the same error
  bound; its own layout (:func:`repack_for_portable`).
- ``"reference"``: :func:`awq_plugin.numerics.quant_ref.linear_ref` on unpacked
  integers; exact in fp32. The fallback where nothing else runs.
- ``"triton"``: ``awq_plugin.kernels.triton_awq.awq_gemm_triton`` for CUDA
  tensors, on the checkpoint layout as is.

Choice: an explicit ``backend=`` argument wins; otherwise the environment
variable ``AWQ_PLUGIN_KERNEL`` (``auto|cpu|avx512|amx|avx2|portable|triton|reference``)
decides; ``auto`` (or unset) picks triton for CUDA weights and, on a CPU, the
first of cpu (AVX-512 VNNI), avx2 (AVX2 + FMA + F16C), portable (anything else)
that the CPU flags allow; a C++ kernel that fails to build falls through to
the next. :func:`choose_backend` is that rule as a pure function of the CPU
flags, and returns the reason with the choice (logged once per process).
Importing this module compiles nothing.
"""

import functools
import logging
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass
from types import ModuleType

import torch

from awq_plugin.kernels.cpu.build import AMX_INT8_FLAGS, AVX512_VNNI_FLAGS, has_amx_int8
from awq_plugin.numerics.pack import PACK_FACTOR, unpack_int4_columns
from awq_plugin.numerics.quant_ref import linear_ref, resolve_group_size

__all__ = [
    "BACKENDS",
    "KERNEL_ENV",
    "AwqKernelWeight",
    "BackendChoice",
    "auto_cpu_choice",
    "available_backends",
    "awq_gemm",
    "awq_linear",
    "choose_backend",
    "cpu_kernel_available",
    "cpu_linear",
    "cpu_path_for",
    "kernel_name",
    "prepare_awq_weight",
    "repack_for_cpu",
    "repack_for_portable",
]

KERNEL_ENV = "AWQ_PLUGIN_KERNEL"
BACKENDS = ("cpu", "amx", "avx2", "portable", "triton", "reference")
BACKEND_ALIASES = {"avx512": "cpu"}  # the AVX-512 VNNI kernel kept its first name, "cpu"
CPU_BACKENDS = ("cpu", "amx", "avx2", "portable")  # the kernels that run on CPU tensors
# Integer ids: the custom op takes tensors and ints only.
_BACKEND_IDS = {"reference": 0, "cpu": 1, "triton": 2, "avx2": 3, "portable": 4, "amx": 5}
_CPU_LAYOUT = ("cpu", "amx", "avx2")  # the backends that read repack_for_cpu's layout

# CPU flags (as /proc/cpuinfo names them) each kernel needs (AVX512_VNNI_FLAGS: kernels.cpu.build).
AVX2_FLAGS = ("avx2", "fma", "f16c")
AVX_VNNI_FLAG = "avx_vnni"  # the VEX vpdpbusd (Alder Lake and later, Zen 5), without AVX-512
AVX2_INNER_PRODUCTS = ("vpmaddubsw", "vpdpbusd")  # the avx2 kernel's two int8 dot products
ARM_DOTPROD_FLAG = "asimddp"  # ARMv8.2 SDOT/UDOT

log = logging.getLogger(__name__)

CPU_TILE_N = 16  # output channels per tile: one zmm of int32 accumulators
CPU_BLOCK_TILES = 4  # tiles per streamed block; must match kBlockTiles in awq_gemm.cpp
CPU_K_STEP = 8  # input channels per 64-byte row (two nibbles x 4 bytes per lane)
#: Rows from which the ``cpu`` backend multiplies on the AMX tiles where it can: below, the
#: VNNI path reads the weights at the bandwidth limit and the tiles' fixed costs (decoding a
#: block into tiles, padding the rows to 16) do not pay; measured with ``awq-plugin bench
#: kernels`` on a Xeon with AMX (docs/results.md, "On an AMX Xeon").
AMX_MIN_ROWS = 6
#: The AMX path multiplies 32 or 64 input channels per tile step; a padded group of another
#: size (a multiple of 8 only) would take 8 or 16 per step, which is not measured.
AMX_K_STEPS = (32, 64)


@dataclass(frozen=True)
class AwqKernelWeight:
    """One linear layer's quantized weight, repacked for ``backend``.

    The three tensors mean different things per backend:

    - ``"cpu"``, ``"amx"`` and ``"avx2"``: ``qweight`` uint8 (blocked nibbles), ``scales``
      fp16 and ``qzeros`` uint8 (blocked per group), all 1-D; see ``awq_gemm.cpp``
      (both kernels read this one layout).
    - ``"portable"``: ``qweight`` uint8 (tiles of 64 channels x K, nibbles),
      ``scales`` fp32 and ``qzeros`` uint8 (per tile and group), all 1-D; see
      :func:`repack_for_portable`.
    - ``"reference"``: ``qweight`` uint8 ``[N, K]``, ``qzeros`` uint8
      ``[N, K/G]``, ``scales`` fp16 ``[N, K/G]`` (``quant_ref`` layout).
    - ``"triton"``: the AutoAWQ checkpoint tensors unchanged
      (``[K, N/8]``, ``[K/G, N/8]``, ``[K/G, N]``).
    """

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    backend: str
    in_features: int  # K
    out_features: int  # N
    group_size: int  # G, with per-channel (-1) resolved to K


# ---------------------------------------------------------------------------
# Backend choice
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendChoice:
    """A backend and the reason it was chosen (for the log)."""

    backend: str  # one of BACKENDS
    reason: str


def cpu_backend_for(flags: Collection[str], unavailable: Collection[str] = ()) -> BackendChoice:
    """The fastest CPU kernel these CPU flags run, skipping ``unavailable`` ones (pure; tested).

    AVX-512 VNNI -> ``cpu``; AVX2 with FMA and F16C -> ``avx2`` (its VEX ``vpdpbusd``
    inner product where ``avx_vnni`` is present, see :func:`avx2_uses_avx_vnni`);
    anything else (ARM, with or without dot product, or an old x86) -> ``portable``.
    """
    flags = frozenset(flags)
    if "cpu" not in unavailable and has_amx_int8(flags):
        return BackendChoice(
            "cpu",
            f"CPU has AVX-512 VNNI and AMX-INT8: the AVX-512 kernel (vpdpbusd on zmm), "
            f"on the AMX tiles from {AMX_MIN_ROWS} rows",
        )
    if "cpu" not in unavailable and all(f in flags for f in AVX512_VNNI_FLAGS):
        return BackendChoice("cpu", "CPU has AVX-512 VNNI: the AVX-512 kernel (vpdpbusd on zmm)")
    if "avx2" not in unavailable and all(f in flags for f in AVX2_FLAGS):
        if avx2_uses_avx_vnni(flags):
            return BackendChoice(
                "avx2", "CPU has AVX-VNNI but not AVX-512 VNNI: the AVX2 kernel with VEX vpdpbusd"
            )
        return BackendChoice(
            "avx2", "CPU has AVX2 but no AVX-512 VNNI or AVX-VNNI: the AVX2 kernel (vpmaddubsw)"
        )
    if "portable" not in unavailable:
        if ARM_DOTPROD_FLAG in flags:
            why = "ARM CPU with dot product (asimddp)"
        elif "asimd" in flags:
            why = "ARM CPU without dot product"
        else:
            why = "CPU without AVX2 or AVX-512 VNNI"
        return BackendChoice(
            "portable", f"{why}: the portable kernel (generic C++ vectors, compiled for this CPU)"
        )
    return BackendChoice("reference", "no CPU kernel is available: the pure-PyTorch reference")


def cpu_path_for(rows: int, group_size: int, amx_ready: bool) -> str:
    """Which path of the ``cpu`` kernel multiplies ``rows`` activation rows (pure; tested).

    ``"amx"`` (int8 tiles) where the CPU has them (``amx_ready``: AMX-INT8 compiled in and
    granted by Linux), the batch has at least :data:`AMX_MIN_ROWS` rows and the padded
    group splits into tile steps of :data:`AMX_K_STEPS`; ``"vnni"`` (``vpdpbusd`` on zmm)
    otherwise. Both give the same numbers.
    """
    padded = -(-group_size // CPU_K_STEP) * CPU_K_STEP
    steps_ok = any(padded % step == 0 for step in AMX_K_STEPS)
    return "amx" if amx_ready and rows >= AMX_MIN_ROWS and steps_ok else "vnni"


def avx2_uses_avx_vnni(flags: Collection[str]) -> bool:
    """Whether the ``avx2`` kernel uses the VEX ``vpdpbusd`` of AVX-VNNI on a CPU with these flags."""
    return AVX_VNNI_FLAG in flags


def avx2_inner_products_for(flags: Collection[str]) -> tuple[str, ...]:
    """The ``avx2`` kernel's inner products a CPU with these flags can execute (pure; tested).

    ``vpmaddubsw`` (int16 pair sums, then ``vpmaddwd``) needs AVX2 (+ FMA, F16C, as the
    whole kernel does); the VEX ``vpdpbusd`` also needs ``avx_vnni``. Auto takes the last
    one listed.
    """
    flags = frozenset(flags)
    if not all(f in flags for f in AVX2_FLAGS):
        return ()
    if avx2_uses_avx_vnni(flags):
        return ("vpmaddubsw", "vpdpbusd")
    return ("vpmaddubsw",)


def kernel_name(value: str | None) -> str | None:
    """A kernel name as ``AWQ_PLUGIN_KERNEL`` or a ``backend=`` argument spells it, normalized:
    case and spaces dropped, aliases resolved (``avx512`` -> ``cpu``); ``None`` for auto
    (unset, ``""``, ``"auto"``). The one parser of the name; each caller checks it against the
    kernels it can run."""
    name = (value or "").strip().lower()
    if name in ("", "auto"):
        return None
    return BACKEND_ALIASES.get(name, name)


def _is_auto(value: str | None) -> bool:
    return kernel_name(value) is None


def choose_backend(
    requested: str | None,
    env_value: str | None,
    device_type: str,
    cpu_flags: Collection[str],
    unavailable: Collection[str] = (),
) -> BackendChoice:
    """Pick a backend: a pure function of its inputs (tested directly with fake flag sets).

    ``requested`` (the ``backend=`` argument) wins over ``env_value`` (the
    ``AWQ_PLUGIN_KERNEL`` variable); ``None``, ``""`` and ``"auto"`` defer to
    the next rule. Auto picks ``"triton"`` for CUDA and, on a CPU,
    :func:`cpu_backend_for` of ``cpu_flags`` minus the ``unavailable`` backends
    (those whose extension failed to build); ``"reference"`` elsewhere.
    """
    for source, value in (("backend argument", requested), (KERNEL_ENV, env_value)):
        choice = kernel_name(value)
        if choice is None:
            continue
        if choice not in BACKENDS:
            names = (*BACKENDS, *BACKEND_ALIASES)
            raise ValueError(f"unknown AWQ kernel backend {choice!r}; expected auto or one of {names}")
        return BackendChoice(choice, f"forced by the {source}")
    if device_type == "cuda":
        return BackendChoice("triton", "CUDA tensors: the Triton kernel")
    if device_type == "cpu":
        return cpu_backend_for(cpu_flags, unavailable)
    return BackendChoice("reference", f"no kernel for {device_type!r} tensors: the pure-PyTorch reference")


@functools.cache
def cpu_kernel_available() -> bool:
    """True when the CPU has AVX-512 VNNI and the C++ kernel builds (builds it once)."""
    from awq_plugin.kernels.cpu import build

    if not build.has_avx512_vnni():
        return False
    try:
        return bool(build.load_extension().has_avx512_vnni())
    except Exception as exc:  # a missing compiler must not break inference
        import warnings

        warnings.warn(f"AWQ CPU kernel failed to build, using the reference: {exc}", stacklevel=2)
        return False


@functools.cache
def amx_ready() -> bool:
    """True when the AVX-512 kernel was built with its AMX path and Linux grants the tiles."""
    from awq_plugin.kernels.cpu import build

    if not build.has_amx_int8() or not cpu_kernel_available():
        return False
    return bool(build.load_extension().amx_ready())


@functools.cache
def avx2_kernel_available() -> bool:
    """True when the CPU has AVX2 (+ FMA, F16C) and the AVX2 kernel builds (builds it once)."""
    from awq_plugin.kernels.cpu import build

    if not all(f in build.cpu_flags() for f in AVX2_FLAGS):
        return False
    try:
        ext = build.load_avx2_extension()
    except Exception as exc:  # a missing compiler must not break inference
        import warnings

        warnings.warn(f"AWQ AVX2 kernel failed to build: {exc}", stacklevel=2)
        return False
    return bool(ext.has_avx2()) and (ext.has_avxvnni_code() or not _avx2_vnni_here())


@functools.cache
def _avx2_vnni_here() -> bool:
    from awq_plugin.kernels.cpu import build

    return avx2_uses_avx_vnni(build.cpu_flags())


@functools.cache
def search_ops() -> ModuleType | None:
    """The quantizer's fused CPU search steps (``cpu/search_ops.cpp``), built once; None where
    they do not build (the search then runs the same steps in PyTorch, with a warning)."""
    from awq_plugin.kernels.cpu import build

    log.info("loading the quantizer's fused search steps (compiled on first use, about 30 s)")
    try:
        return build.load_search_extension()
    except Exception as exc:  # a missing compiler costs time, never a result
        import warnings

        warnings.warn(
            f"the quantizer's fused search steps failed to build, using PyTorch's: {exc}", stacklevel=2
        )
        return None


@functools.cache
def portable_kernel_available() -> bool:
    """True when the portable C++ kernel builds here (builds it once)."""
    from awq_plugin.kernels.cpu import build

    try:
        build.load_portable_extension()
    except Exception as exc:  # a missing compiler must not break inference
        import warnings

        warnings.warn(f"AWQ portable kernel failed to build: {exc}", stacklevel=2)
        return False
    return True


def _backend_runs(name: str) -> bool:
    """Whether CPU backend ``name`` runs in this process (builds its extension once)."""
    if name == "cpu":
        return cpu_kernel_available()
    if name == "amx":
        return amx_ready()
    if name == "avx2":
        return avx2_kernel_available()
    if name == "portable":
        return portable_kernel_available()
    return True


@functools.cache
def auto_cpu_choice() -> BackendChoice:
    """What auto picks for CPU tensors in this process: :func:`cpu_backend_for` of this CPU's
    flags, falling through kernels that fail to build. Logged once."""
    from awq_plugin.kernels.cpu import build

    flags = build.cpu_flags()
    unavailable: set[str] = set()
    while True:
        choice = cpu_backend_for(flags, unavailable)
        if choice.backend == "reference" or _backend_runs(choice.backend):
            break
        unavailable.add(choice.backend)
    if unavailable:
        choice = BackendChoice(
            choice.backend, f"{choice.reason} ({', '.join(sorted(unavailable))} unavailable)"
        )
    log.info("awq-plugin: CPU kernel '%s' (%s)", choice.backend, choice.reason)
    return choice


def available_backends() -> list[str]:
    """Backends usable in this process (``"reference"`` always; builds the CPU kernels)."""
    out = [name for name in CPU_BACKENDS if _backend_runs(name)]
    if torch.cuda.is_available():
        out.append("triton")
    out.append("reference")
    return out


def _cpu_extension():
    from awq_plugin.kernels.cpu import build

    return build.load_extension()


def _portable_extension():
    from awq_plugin.kernels.cpu import build

    return build.load_portable_extension()


def _avx2_extension():
    from awq_plugin.kernels.cpu import build

    return build.load_avx2_extension()


# ---------------------------------------------------------------------------
# Weight preparation (once per layer, at load time)
# ---------------------------------------------------------------------------


def repack_for_cpu(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AutoAWQ tensors -> the blocked CPU layout ``(wq uint8, wz uint8, ws fp16)``, all 1-D.

    Tiles of 16 output channels; blocks of ``CPU_BLOCK_TILES`` tiles, each one
    linear stream ``[group][k/8][tile][64 bytes]`` where byte ``4*j + i`` holds
    ``q[n0+j, k0+i]`` (low nibble) and ``q[n0+j, k0+4+i]`` (high nibble).
    N is padded to 16 and each group to a multiple of 8 with zeros.
    """
    k = qweight.shape[0]
    n = qweight.shape[1] * PACK_FACTOR
    g = resolve_group_size(group_size, k)
    ng = k // g
    gp = -(-g // CPU_K_STEP) * CPU_K_STEP
    tiles = -(-n // CPU_TILE_N)
    np_ = tiles * CPU_TILE_N
    k8n = gp // CPU_K_STEP

    q = unpack_int4_columns(qweight.cpu())  # (K, N)
    z = unpack_int4_columns(qzeros.cpu())  # (NG, N)
    qp = torch.zeros(ng, gp, np_, dtype=torch.uint8)
    qp[:, :g, :n] = q.reshape(ng, g, n)
    qp = qp.reshape(ng, k8n, 2, 4, tiles, CPU_TILE_N)  # (NG, k8, half, i, T, j)
    rows = qp[:, :, 0] | (qp[:, :, 1] << 4)  # (NG, k8, i, T, j)
    rows = rows.permute(0, 1, 3, 4, 2).reshape(ng, k8n, tiles, 64)  # byte 4*j + i

    zp = torch.zeros(ng, np_, dtype=torch.uint8)
    zp[:, :n] = z
    sp = torch.zeros(ng, np_, dtype=torch.float16)
    sp[:, :n] = scales.cpu().to(torch.float16)
    zp = zp.reshape(ng, tiles, CPU_TILE_N)
    sp = sp.reshape(ng, tiles, CPU_TILE_N)

    def blocked(t: torch.Tensor) -> torch.Tensor:
        # t: (NG, [k8,] T, inner). Full blocks first, each [g][k8][tile][inner], then the tail.
        nfull = tiles // CPU_BLOCK_TILES
        body = t[..., : nfull * CPU_BLOCK_TILES, :]
        lead = body.shape[:-2]
        body = body.reshape(*lead, nfull, CPU_BLOCK_TILES, t.shape[-1])  # (NG, [k8,] B, bt, inner)
        body = body.movedim(-3, 0)  # (B, NG, [k8,] bt, inner)
        tail = t[..., nfull * CPU_BLOCK_TILES :, :]  # (NG, [k8,] tail, inner)
        return torch.cat([body.reshape(-1), tail.reshape(-1)]).contiguous()

    return blocked(rows), blocked(zp), blocked(sp)


PORTABLE_TILE_N = 64  # output channels per tile of the portable layout (kTileN in awq_gemm_portable.cpp)


def repack_for_portable(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AutoAWQ tensors -> the portable layout ``(wq uint8, wz uint8, ws fp32)``, all 1-D.

    Tiles of 64 output channels, each ``[K][32 bytes]``: byte ``i`` of row ``k``
    holds ``q[n0+i, k]`` (low nibble) and ``q[n0+32+i, k]`` (high nibble). Zeros and
    scales are ``[tile][K/G][64]`` (scales in fp32, exact). N is padded to 64 with
    zero channels.
    """
    k = qweight.shape[0]
    n = qweight.shape[1] * PACK_FACTOR
    g = resolve_group_size(group_size, k)
    ng = k // g
    tiles = -(-n // PORTABLE_TILE_N)
    np_ = tiles * PORTABLE_TILE_N
    half = PORTABLE_TILE_N // 2
    q = torch.zeros(k, np_, dtype=torch.uint8)
    q[:, :n] = unpack_int4_columns(qweight.cpu())  # (K, N')
    q = q.reshape(k, tiles, 2, half)  # (K, T, nibble, i)
    rows = (q[:, :, 0] | (q[:, :, 1] << 4)).permute(1, 0, 2)  # (T, K, 32)
    zp = torch.zeros(ng, np_, dtype=torch.uint8)
    zp[:, :n] = unpack_int4_columns(qzeros.cpu())
    sp = torch.zeros(ng, np_, dtype=torch.float32)
    sp[:, :n] = scales.cpu().float()

    def by_tile(t: torch.Tensor) -> torch.Tensor:  # (NG, N') -> [tile][NG][64], flat
        return t.reshape(ng, tiles, PORTABLE_TILE_N).permute(1, 0, 2).contiguous().reshape(-1)

    return rows.contiguous().reshape(-1), by_tile(zp), by_tile(sp)


def prepare_awq_weight(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    *,
    backend: str | None = None,
) -> AwqKernelWeight:
    """Repack one layer's AutoAWQ tensors for the kernel that will run it.

    qweight: int32 ``[K, N/8]``; qzeros: int32 ``[K/G, N/8]``; scales: fp16
    ``[K/G, N]`` (see ``awq_plugin.numerics.pack``). ``group_size`` may be ``-1``
    (per-channel). ``backend``: ``None``/``"auto"`` or one of :data:`BACKENDS`
    (see :func:`choose_backend`).
    """
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError("qweight and qzeros must be 2-D int32 tensors in the AutoAWQ layout")
    k = qweight.shape[0]
    n = qweight.shape[1] * PACK_FACTOR
    g = resolve_group_size(group_size, k)
    if tuple(scales.shape) != (k // g, n) or tuple(qzeros.shape) != (k // g, n // PACK_FACTOR):
        raise ValueError(
            f"shapes do not match K={k}, N={n}, group_size={g}: qzeros {tuple(qzeros.shape)}, "
            f"scales {tuple(scales.shape)}"
        )
    device_type = qweight.device.type
    env_value = os.environ.get(KERNEL_ENV)
    if device_type == "cpu" and _is_auto(backend) and _is_auto(env_value):
        name = auto_cpu_choice().backend  # this CPU's flags; builds the chosen extension once
    else:  # forced, or not a CPU: the flags do not matter
        name = choose_backend(backend, env_value, device_type, frozenset()).backend
    if name in CPU_BACKENDS and device_type != "cpu":
        raise ValueError(f"the {name!r} AWQ kernel needs CPU tensors")
    if name == "avx2" and not avx2_kernel_available():  # it would die of SIGILL, not raise
        raise ValueError(
            f"the 'avx2' AWQ kernel needs an x86 CPU with {', '.join(AVX2_FLAGS)} and a compiler"
        )
    if name == "amx" and not amx_ready():  # it would die of SIGILL, not raise
        raise ValueError(
            f"the 'amx' AWQ kernel needs a CPU with {', '.join(AMX_INT8_FLAGS)} and a compiler that "
            "emits them"
        )
    if name in _CPU_LAYOUT:
        wq, wz, ws = repack_for_cpu(qweight, qzeros, scales, g)
    elif name == "portable":
        wq, wz, ws = repack_for_portable(qweight, qzeros, scales, g)
    elif name == "reference":
        wq = unpack_int4_columns(qweight).t().contiguous()  # (N, K)
        wz = unpack_int4_columns(qzeros).t().contiguous()  # (N, K/G)
        ws = scales.t().contiguous()  # (N, K/G)
    else:  # triton reads the checkpoint layout as is
        wq, wz, ws = qweight.contiguous(), qzeros.contiguous(), scales.contiguous()
    return AwqKernelWeight(
        qweight=wq, qzeros=wz, scales=ws, backend=name, in_features=k, out_features=n, group_size=g
    )


# ---------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------


# The op is defined with torch.library's low-level API rather than
# ``torch.library.custom_op``: the latter adds ~8 us of Python per call, which
# is a third of a small decode-time GEMM on this CPU; this path adds ~3 us.
_OP_SCHEMA = (
    "awq_gemm(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, int group_size, "
    "int out_features, int backend_id, Tensor? bias=None) -> Tensor"
)


def _op_registered() -> bool:
    try:
        torch.ops.awq_plugin.awq_gemm.default  # noqa: B018 - the lookup is the test
    except (AttributeError, RuntimeError):
        return False
    return True


def _awq_gemm_impl(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    out_features: int,
    backend_id: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager implementation of ``awq_plugin::awq_gemm``: route to the backend's kernel."""
    if backend_id == _BACKEND_IDS["cpu"]:
        amx = cpu_path_for(x.shape[0], group_size, amx_ready()) == "amx"
        return _cpu_extension().awq_gemm_cpu(
            x.contiguous(), qweight, scales, qzeros, group_size, out_features, bias, False, amx
        )
    if backend_id == _BACKEND_IDS["amx"]:
        return _cpu_extension().awq_gemm_cpu(
            x.contiguous(), qweight, scales, qzeros, group_size, out_features, bias, False, True
        )
    if backend_id == _BACKEND_IDS["avx2"]:
        return _avx2_extension().awq_gemm_avx2(
            x.contiguous(), qweight, scales, qzeros, group_size, out_features, bias, _avx2_vnni_here()
        )
    if backend_id == _BACKEND_IDS["portable"]:
        return _portable_extension().awq_gemm_portable(
            x.contiguous(), qweight, scales, qzeros, group_size, out_features, bias
        )
    if backend_id == _BACKEND_IDS["triton"]:
        from awq_plugin.kernels.triton_awq import awq_gemm_triton

        return awq_gemm_triton(x, qweight, qzeros, scales, group_size, bias)
    if backend_id == _BACKEND_IDS["reference"]:
        return linear_ref(x, qweight, scales, qzeros, group_size, bias)
    raise ValueError(f"unknown backend_id {backend_id}")


def _awq_gemm_fake(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    out_features: int,
    backend_id: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_features))  # (M, N)


# Register once per process. With the repo root on sys.path this file can also
# be imported as the top-level package ``kernels`` (transformers probes for the
# Hugging Face ``kernels`` package by importing that name): that second copy
# must not register the op again. FRAGMENT shares the namespace with ops other
# modules of the plugin may define.
if not _op_registered():
    _LIB = torch.library.Library("awq_plugin", "FRAGMENT")
    _LIB.define(_OP_SCHEMA)
    # One implementation for CPU and CUDA tensors alike; the backend id routes.
    _LIB.impl("awq_gemm", _awq_gemm_impl, "CompositeExplicitAutograd")
    torch.library.register_fake("awq_plugin::awq_gemm", _awq_gemm_fake, lib=_LIB)


#: ``awq_gemm(x [M, K], qweight, qzeros, scales, group_size, out_features, backend_id, bias=None)
#: -> y [M, N]`` on the tensors of an :class:`AwqKernelWeight`; ``backend_id``: 0 reference,
#: 1 cpu, 2 triton, 3 avx2, 4 portable, 5 amx; ``y`` has ``x``'s dtype. This is ``torch.ops.awq_plugin.awq_gemm``.
awq_gemm = torch.ops.awq_plugin.awq_gemm


def avx2_linear(
    x: torch.Tensor, weight: AwqKernelWeight, bias: torch.Tensor | None = None, *, inner_product: str
) -> torch.Tensor:
    """``awq_linear`` on the ``avx2`` kernel with its inner product forced by name.

    ``inner_product`` is one of :data:`AVX2_INNER_PRODUCTS`. Auto picks one from the CPU's
    flags; this lets tests check each against the oracle on every host that can run it. A
    product this CPU cannot execute (it would die of SIGILL) is a ValueError.
    """
    from awq_plugin.kernels.cpu import build

    if weight.backend != "avx2":
        raise ValueError(f"avx2_linear needs a weight prepared for 'avx2', not {weight.backend!r}")
    if inner_product not in AVX2_INNER_PRODUCTS:
        raise ValueError(
            f"unknown avx2 inner product {inner_product!r}; expected one of {AVX2_INNER_PRODUCTS}"
        )
    if inner_product not in avx2_inner_products_for(build.cpu_flags()):
        raise ValueError(
            f"this CPU cannot execute the avx2 kernel's {inner_product!r} (flags: {AVX_VNNI_FLAG})"
        )
    return _on_packed_layout(_avx2_extension().awq_gemm_avx2, x, weight, bias, inner_product == "vpdpbusd")


def _on_packed_layout(
    gemm: Callable[..., torch.Tensor],
    x: torch.Tensor,
    weight: AwqKernelWeight,
    bias: torch.Tensor | None,
    *flags: bool,
) -> torch.Tensor:
    """``gemm`` (an extension's entry point on :func:`repack_for_cpu`'s layout) on ``x [..., K]``,
    with its trailing path ``flags``; returns ``[..., N]``."""
    x2 = x.reshape(-1, weight.in_features).contiguous()  # (M, K)
    y = gemm(
        x2, weight.qweight, weight.scales, weight.qzeros, weight.group_size, weight.out_features, bias, *flags
    )
    return y.reshape(*x.shape[:-1], weight.out_features)  # (..., N)


CPU_PATHS = ("vnni", "amx")  # the cpu kernel's two paths (see cpu_path_for)


def cpu_linear(
    x: torch.Tensor, weight: AwqKernelWeight, bias: torch.Tensor | None = None, *, path: str
) -> torch.Tensor:
    """``awq_linear`` on the ``cpu`` kernel with its path forced by name, ``"vnni"`` or ``"amx"``.

    Auto picks one per call by the row count (:func:`cpu_path_for`); this lets tests check
    each against the oracle on every host that runs it, and the benchmark time both. A path
    this CPU cannot run is a ValueError.
    """
    if weight.backend not in ("cpu", "amx"):
        raise ValueError(f"cpu_linear needs a weight prepared for 'cpu' or 'amx', not {weight.backend!r}")
    if path not in CPU_PATHS:
        raise ValueError(f"unknown cpu kernel path {path!r}; expected one of {CPU_PATHS}")
    if path == "amx" and not amx_ready():
        raise ValueError(
            f"this CPU cannot run the cpu kernel's AMX path (flags: {', '.join(AMX_INT8_FLAGS)})"
        )
    return _on_packed_layout(_cpu_extension().awq_gemm_cpu, x, weight, bias, False, path == "amx")


def awq_linear(x: torch.Tensor, weight: AwqKernelWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ W_hat.T + bias`` for ``x [..., K]`` in fp32/bf16/fp16; returns ``[..., N]`` in x's dtype."""
    if x.shape[-1] != weight.in_features:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight expects {weight.in_features}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, weight.in_features)  # (M, K)
    if weight.backend in _CPU_LAYOUT:
        x2 = x2.contiguous()
    y = awq_gemm(
        x2,
        weight.qweight,
        weight.qzeros,
        weight.scales,
        weight.group_size,
        weight.out_features,
        _BACKEND_IDS[weight.backend],
        bias,
    )
    return y.reshape(*lead, weight.out_features)  # (..., N)
