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

- ``"cpu"``: the C++ AVX-512 VNNI kernel in ``kernels/cpu/awq_gemm.cpp``,
  compiled on first use (see ``kernels/cpu/build.py``). Activations are
  quantized to int8 per (row, group) inside the kernel: the result differs from
  the reference by at most ``sum_k |w_hat[n, k]| * s_a[m, k // G] / 2`` plus
  fp32 rounding, with ``s_a = max_{k in group} |x[m, k]| / 127``.
- ``"reference"``: :func:`awq_plugin.numerics.quant_ref.linear_ref` on unpacked
  integers; exact in fp32. The fallback everywhere.
- ``"triton"``: ``awq_plugin.kernels.triton_awq.awq_gemm_triton`` for CUDA
  tensors, on the checkpoint layout as is.

Choice: an explicit ``backend=`` argument wins; otherwise the environment
variable ``AWQ_PLUGIN_KERNEL`` (``auto|cpu|triton|reference``) decides; ``auto``
(or unset) picks triton for CUDA weights, the CPU kernel where the CPU has
AVX-512 VNNI and the kernel builds, and the reference otherwise. Importing
this module compiles nothing.
"""

import functools
import os
from dataclasses import dataclass

import torch

from awq_plugin.numerics.pack import PACK_FACTOR, unpack_int4_columns
from awq_plugin.numerics.quant_ref import linear_ref, resolve_group_size

__all__ = [
    "BACKENDS",
    "KERNEL_ENV",
    "AwqKernelWeight",
    "available_backends",
    "awq_gemm",
    "awq_linear",
    "choose_backend",
    "cpu_kernel_available",
    "prepare_awq_weight",
    "repack_for_cpu",
]

KERNEL_ENV = "AWQ_PLUGIN_KERNEL"
BACKENDS = ("cpu", "triton", "reference")
# Integer ids: the custom op takes tensors and ints only.
_BACKEND_IDS = {"reference": 0, "cpu": 1, "triton": 2}

CPU_TILE_N = 16  # output channels per tile: one zmm of int32 accumulators
CPU_BLOCK_TILES = 4  # tiles per streamed block; must match kBlockTiles in awq_gemm.cpp
CPU_K_STEP = 8  # input channels per 64-byte row (two nibbles x 4 bytes per lane)


@dataclass(frozen=True)
class AwqKernelWeight:
    """One linear layer's quantized weight, repacked for ``backend``.

    The three tensors mean different things per backend:

    - ``"cpu"``: ``qweight`` uint8 (blocked nibbles), ``scales`` fp16 and
      ``qzeros`` uint8 (blocked per group), all 1-D; see ``awq_gemm.cpp``.
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


def choose_backend(
    requested: str | None,
    env_value: str | None,
    device_type: str,
    cpu_kernel_ok: bool,
) -> str:
    """Pick a backend: a pure function of its inputs (tested directly).

    ``requested`` (the ``backend=`` argument) wins over ``env_value`` (the
    ``AWQ_PLUGIN_KERNEL`` variable); ``None``, ``""`` and ``"auto"`` defer to
    the next rule. Auto picks ``"triton"`` for CUDA, ``"cpu"`` when
    ``cpu_kernel_ok`` (AVX-512 VNNI present and the extension builds), else
    ``"reference"``.
    """
    for choice in (requested, env_value):
        if choice is None:
            continue
        choice = choice.strip().lower()
        if choice in ("", "auto"):
            continue
        if choice not in BACKENDS:
            raise ValueError(f"unknown AWQ kernel backend {choice!r}; expected auto or one of {BACKENDS}")
        return choice
    if device_type == "cuda":
        return "triton"
    if device_type == "cpu" and cpu_kernel_ok:
        return "cpu"
    return "reference"


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


def available_backends() -> list[str]:
    """Backends usable in this process (``"reference"`` always; builds the CPU kernel)."""
    out = []
    if cpu_kernel_available():
        out.append("cpu")
    if torch.cuda.is_available():
        out.append("triton")
    out.append("reference")
    return out


def _cpu_extension():
    from awq_plugin.kernels.cpu import build

    return build.load_extension()


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
    (per-channel). ``backend``: ``None``/``"auto"``, ``"cpu"``, ``"triton"``
    or ``"reference"`` (see :func:`choose_backend`).
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
    wants_auto_cpu = device_type == "cpu" and backend in (None, "auto")
    name = choose_backend(
        backend,
        os.environ.get(KERNEL_ENV),
        device_type,
        # Building the extension is only worth it when auto could pick it.
        cpu_kernel_available() if wants_auto_cpu else False,
    )
    if name == "cpu":
        if device_type != "cpu":
            raise ValueError("the 'cpu' AWQ kernel needs CPU tensors")
        wq, wz, ws = repack_for_cpu(qweight, qzeros, scales, g)
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
        return _cpu_extension().awq_gemm_cpu(
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
#: 1 cpu, 2 triton; ``y`` has ``x``'s dtype. This is ``torch.ops.awq_plugin.awq_gemm``.
awq_gemm = torch.ops.awq_plugin.awq_gemm


def awq_linear(x: torch.Tensor, weight: AwqKernelWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ W_hat.T + bias`` for ``x [..., K]`` in fp32/bf16/fp16; returns ``[..., N]`` in x's dtype."""
    if x.shape[-1] != weight.in_features:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight expects {weight.in_features}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, weight.in_features)  # (M, K)
    if weight.backend == "cpu":
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
