"""Fused AWQ INT4 GEMM in Triton, for CUDA and ROCm GPUs.

``y = x @ dequantize(W).T + bias`` read straight from the AutoAWQ "GEMM" checkpoint
layout (see :mod:`awq_plugin.numerics.pack`): no repacking step is needed, so there is no
``prepare_triton_weight``. The kernel unpacks the nibbles in AWQ order, subtracts the
integer zeros, applies the fp16 scales and multiplies with ``tl.dot``, accumulating in
fp32.

Numerics. When a K tile lies inside one quantization group (``BLOCK_K`` divides the
group size, or the layer is per-channel), the kernel feeds the *integers* ``q - z``
(in ``[-15, 15]``, exact in fp16/bf16) to ``tl.dot`` and multiplies the fp32 partial
product by the group's scale afterwards. The products are then exact and the only
rounding is fp32 accumulation plus the final cast to the output dtype: more accurate
than rounding ``(q - z) * s`` to fp16/bf16 first, and cheaper for small M because
the scale is applied to a ``[BLOCK_M, BLOCK_N]`` tile instead of ``[BLOCK_K,
BLOCK_N]``. When several groups share a K tile (group size smaller than ``BLOCK_K``,
or not a multiple of 16), it dequantizes ``(q - z) * s`` in fp32, rounds it to the
activation dtype and multiplies that, as other AWQ kernels do. The autotuner keeps
to tiles of the first kind whenever one exists.

Split-K. For small M there are too few ``[BLOCK_M, BLOCK_N]`` tiles to fill the GPU,
so the K loop can be divided among ``split_k`` programs that add their fp32 partial
sums into a zeroed fp32 buffer with atomics (the summation order, hence the last
bits, then varies from run to run). The buffer is cast to the output dtype after.

Verification. There is no GPU where this was written: the kernel was tested for
correctness only, on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``;
``tests/test_kernel_triton.py``). The same test lowers it with the real compiler, no
GPU needed, to sm_80 (every autotune config; fp16 dots use ``mma.sync``), sm_90 and
gfx942 binaries. The compiled kernel's results, its speed, the autotuner and the split-K
heuristic have not been run on a GPU; the ``gpu``-marked test checks the results where
a CUDA device exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from awq_plugin.numerics import effective_group_size
from awq_plugin.numerics.pack import PACK_FACTOR

try:  # Triton is optional: the CPU kernel and the reference need no GPU stack.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

_ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def is_available() -> bool:
    """True when Triton imports and a CUDA or ROCm device is present."""
    return triton is not None and torch.cuda.is_available()


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError(
            "awq_gemm_triton needs the 'triton' package, which is not installed; "
            "use awq_plugin.kernels.awq_gemm, which falls back to another implementation"
        )


@dataclass(frozen=True)
class TileConfig:
    """A fixed launch configuration, bypassing the autotuner.

    The interpreter always uses one (autotuning would time Python). Tests pass one to
    reach a particular code path, e.g. ``block_k`` larger than the group size.
    """

    block_m: int = 16  # rows of x per program (tl.dot needs >= 16)
    block_n: int = 64  # output columns per program; a multiple of 8 (one int32 = 8 columns)
    block_k: int = 32  # reduction step; >= 16, a power of two
    group_m: int = 8  # programs along M that share one column strip (L2 reuse)
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"{name}={size} must be a power of two >= 16 (tl.dot and tl.arange need it)")


#: What the interpreter runs: large enough tiles that few programs are interpreted.
INTERPRETER_CONFIG = TileConfig(block_m=16, block_n=64, block_k=32)


if triton is not None:

    @triton.jit
    def _unpack_awq_int4(packed, BLOCK_N: tl.constexpr):
        """int32 ``(R, BLOCK_N / 8)`` -> int32 ``(R, BLOCK_N)`` values in 0..15, channel order.

        Output channel ``8j + c`` is nibble ``(c % 2) * 4 + c // 2`` of int32 ``j``
        (the AWQ interleave 0 4 1 5 2 6 3 7 of awq_plugin.numerics.pack.AWQ_UNPACK_ORDER).
        """
        rows: tl.constexpr = packed.shape[0]
        # Repeat every int32 eight times along the columns, then shift each copy.
        wide = tl.broadcast_to(packed[:, :, None], (rows, BLOCK_N // 8, 8))  # (R, BN/8, 8)
        wide = tl.reshape(wide, (rows, BLOCK_N))  # (R, BN)
        c = tl.arange(0, BLOCK_N) % 8
        shifts = ((c % 2) * 4 + c // 2) * 4  # (BN,)
        return (wide >> shifts[None, :]) & 0xF

    @triton.jit
    def _awq_gemm_kernel(
        x_ptr,  # (M, K) activations, any strides
        qweight_ptr,  # int32 (K, N/8), unit column stride
        qzeros_ptr,  # int32 (K/G, N/8), unit column stride
        scales_ptr,  # (K/G, N), unit column stride
        bias_ptr,  # (N,) or a dummy pointer when HAS_BIAS is false
        y_ptr,  # (M, N) output; fp32 and zero-filled when SPLIT_K > 1
        M,
        N,
        K,
        stride_xm,
        stride_xk,
        stride_qweight,
        stride_qzeros,
        stride_scales,
        stride_ym,
        m_bucket,  # unused in the body: an autotune key that buckets M
        GROUP_SIZE: tl.constexpr,
        SINGLE_GROUP: tl.constexpr,  # one group spans all of K (per-channel)
        HAS_BIAS: tl.constexpr,
        SPLIT_K: tl.constexpr,
        DOT_DTYPE: tl.constexpr,  # operand dtype handed to tl.dot
        DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32"; only matters for fp32 operands
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # Grouped launch order: GROUP_M consecutive programs walk down M over the same
        # column strip, so the strip's weights stay in L2 while they are reused.
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        programs_per_group = GROUP_M * num_pid_n
        first_pid_m = (pid // programs_per_group) * GROUP_M
        rows_in_group = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + (pid % programs_per_group) % rows_in_group
        pid_n = (pid % programs_per_group) // rows_in_group

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        offs_p = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)  # packed columns (BN/8,)
        mask_m = offs_m < M
        mask_n = offs_n < N
        mask_p = offs_p < N // 8

        # This program's share of the K loop: a contiguous run of K tiles.
        k_tiles = tl.cdiv(K, BLOCK_K)
        tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
        tile_begin = pid_k * tiles_per_split
        tile_end = min(tile_begin + tiles_per_split, k_tiles)

        # A K tile lies inside one group when BLOCK_K divides G (then K is a multiple of
        # BLOCK_K too, so there is no K tail) or when the one group is all of K.
        SCALE_AFTER_DOT: tl.constexpr = SINGLE_GROUP or (GROUP_SIZE % BLOCK_K == 0)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for tile in range(tile_begin, tile_end):
            offs_k = tile * BLOCK_K + tl.arange(0, BLOCK_K)  # (BK,)
            mask_k = offs_k < K
            # Masked K rows load x = 0, so whatever the weight there is, it adds nothing.
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )  # (BM, BK)
            packed = tl.load(
                qweight_ptr + offs_k[:, None] * stride_qweight + offs_p[None, :],
                mask=mask_k[:, None] & mask_p[None, :],
                other=0,
            )  # (BK, BN/8)
            q = _unpack_awq_int4(packed, BLOCK_N)  # (BK, BN)
            if SCALE_AFTER_DOT:
                group = 0 if SINGLE_GROUP else (tile * BLOCK_K) // GROUP_SIZE
                zeros = _unpack_awq_int4(
                    tl.load(
                        qzeros_ptr + group * stride_qzeros + offs_p[None, :], mask=mask_p[None, :], other=0
                    ),
                    BLOCK_N,
                )  # (1, BN)
                scales = tl.load(
                    scales_ptr + group * stride_scales + offs_n[None, :], mask=mask_n[None, :], other=0.0
                ).to(tl.float32)  # (1, BN)
                # q - z is an integer in [-15, 15]: exact in every DOT_DTYPE, so are the products.
                w_int = (q - zeros).to(DOT_DTYPE)  # (BK, BN)
                partial = tl.dot(x.to(DOT_DTYPE), w_int, input_precision=DOT_PRECISION)  # (BM, BN) fp32
                acc += partial * scales
            else:
                group_of_k = offs_k // GROUP_SIZE  # (BK,)
                mask_kp = mask_k[:, None] & mask_p[None, :]
                zeros = _unpack_awq_int4(
                    tl.load(
                        qzeros_ptr + group_of_k[:, None] * stride_qzeros + offs_p[None, :],
                        mask=mask_kp,
                        other=0,
                    ),
                    BLOCK_N,
                )  # (BK, BN)
                scales = tl.load(
                    scales_ptr + group_of_k[:, None] * stride_scales + offs_n[None, :],
                    mask=mask_k[:, None] & mask_n[None, :],
                    other=0.0,
                ).to(tl.float32)  # (BK, BN)
                # Round the dequantized weight to the activation dtype, as a GPU MMA takes
                # it; the extra cast to DOT_DTYPE is a no-op except under the interpreter.
                w = ((q - zeros).to(tl.float32) * scales).to(x_ptr.dtype.element_ty).to(DOT_DTYPE)
                acc = tl.dot(x.to(DOT_DTYPE), w, acc, input_precision=DOT_PRECISION)  # (BM, BN)

        # Two ifs: HAS_BIAS is resolved at compile time, pid_k == 0 is a runtime branch.
        if HAS_BIAS:  # noqa: SIM102
            if pid_k == 0:  # the bias is added once, by the first K split
                acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]

        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        mask_y = mask_m[:, None] & mask_n[None, :]
        if SPLIT_K == 1:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_y)
        else:
            # The launch ends before anyone reads y, so relaxed ordering suffices.
            tl.atomic_add(y_ptrs, acc, mask=mask_y, sem="relaxed")

    def _autotune_configs() -> list[triton.Config]:
        """Tiles for NVIDIA (sm80+) and AMD GPUs, from decode (M <= 16) to prefill."""
        shapes = [
            # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
            (16, 64, 128, 4, 3),
            (16, 128, 32, 4, 4),
            (16, 128, 64, 4, 4),
            (16, 128, 128, 4, 3),
            (16, 256, 64, 8, 3),
            (32, 128, 32, 4, 4),
            (32, 128, 64, 4, 4),
            (32, 64, 128, 4, 3),
            (64, 128, 64, 4, 4),
            (64, 64, 128, 4, 3),
            (128, 128, 32, 8, 4),
            (128, 128, 64, 8, 3),
            (128, 256, 32, 8, 3),
            (64, 256, 64, 8, 3),
        ]
        return [
            triton.Config(
                {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                num_warps=warps,
                num_stages=stages,
            )
            for bm, bn, bk, warps, stages in shapes
        ]

    def _prune_configs(
        configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any
    ) -> list[triton.Config]:
        """Keep K tiles that stay inside one group (the exact scale-after-dot path)
        when any do, then drop tiles much taller than M when shorter ones remain."""
        args = {**named_args, **kwargs}
        kept = configs
        if not args["SINGLE_GROUP"]:
            kept = [c for c in kept if args["GROUP_SIZE"] % c.kwargs["BLOCK_K"] == 0] or kept
        return [c for c in kept if c.kwargs["BLOCK_M"] <= max(16, args["m_bucket"])] or kept

    _awq_gemm_autotuned = triton.autotune(
        configs=_autotune_configs(),
        key=["m_bucket", "N", "K", "GROUP_SIZE", "SPLIT_K"],
        prune_configs_by={"early_config_prune": _prune_configs},
        # Split-K accumulates into y with atomics: every timed run must start from zero.
        reset_to_zero=["y_ptr"],
    )(_awq_gemm_kernel)


def _interpreting() -> bool:
    """True when Triton was imported with TRITON_INTERPRET=1 (kernels run on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_awq_gemm_kernel, InterpretedFunction)


def _dot_operands(x_dtype: torch.dtype, interpreting: bool) -> tuple[Any, str]:
    """The dtype ``tl.dot`` multiplies in, and its precision mode, for activations of x_dtype."""
    if x_dtype == torch.bfloat16 and interpreting:
        # The interpreter's tl.dot multiplies bf16 operands as raw uint16 bits (triton
        # 3.9), so there they are widened to fp32. Both operands hold bf16 values either
        # way and fp32 holds their products exactly: the arithmetic is unchanged.
        return tl.float32, "ieee"
    if x_dtype == torch.float32:
        # Follow PyTorch's own switch for TF32 matmuls (off by default).
        return tl.float32, "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return (tl.float16 if x_dtype == torch.float16 else tl.bfloat16), "ieee"


def _m_bucket(m: int) -> int:
    """M rounded up to a power of two, capped: autotuning per exact M would retune for every batch."""
    return min(1 << max(0, m - 1).bit_length(), 512)


def choose_split_k(m: int, n: int, k: int, device: torch.device) -> int:
    """How many ways to split K so that a small-M GEMM fills the GPU.

    Aims at about two programs per streaming multiprocessor, assuming 16 x 128 output
    tiles (the decode-sized autotune configs), while keeping at least 512 of K per
    split so the atomic reduction stays a small part of the traffic.
    """
    if m > 64 or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = math.ceil(m / 16) * math.ceil(n / 128)
    return max(1, min(16, k // 512, math.ceil(2 * sms / tiles)))


def _check_inputs(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> tuple[int, int, int]:
    """Validate shapes and dtypes; return ``(K, N, G)`` with per-channel (-1) resolved to K."""
    if x.dtype not in _ACTIVATION_DTYPES:
        raise TypeError(f"x must be fp16, bf16 or fp32, got {x.dtype}")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise TypeError(f"qweight and qzeros must be int32, got {qweight.dtype} and {qzeros.dtype}")
    if qweight.dim() != 2 or qzeros.dim() != 2 or scales.dim() != 2:
        raise ValueError("qweight, qzeros and scales must be 2-D (the AutoAWQ GEMM layout)")
    k, n = qweight.shape[0], qweight.shape[1] * PACK_FACTOR
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features but qweight has K={k} rows")
    g = effective_group_size(group_size, k)
    if g <= 0 or k % g != 0:
        raise ValueError(f"group_size={group_size} does not divide K={k}")
    if tuple(scales.shape) != (k // g, n):
        raise ValueError(f"scales must be [K/G, N] = {[k // g, n]}, got {list(scales.shape)}")
    if tuple(qzeros.shape) != (k // g, n // PACK_FACTOR):
        raise ValueError(
            f"qzeros must be [K/G, N/8] = {[k // g, n // PACK_FACTOR]}, got {list(qzeros.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be [N] = [{n}], got {list(bias.shape)}")
    tensors = [x, qweight, qzeros, scales] + ([bias] if bias is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError("x, qweight, qzeros, scales and bias must be on one device")
    return k, n, g


def awq_gemm_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    split_k: int | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """``y = x @ dequantize(qweight, qzeros, scales).T + bias`` with the fused Triton kernel.

    Args:
        x: activations ``[..., K]``, fp16, bf16 or fp32, any strides.
        qweight: int32 ``[K, N/8]``, AutoAWQ nibble order.
        qzeros: int32 ``[K/G, N/8]``, packed like ``qweight``.
        scales: ``[K/G, N]`` (fp16 in AWQ checkpoints).
        group_size: G, dividing K; ``-1`` (or K) for one group per output channel.
        bias: optional ``[N]``, added in fp32.
        split_k: number of programs sharing each output tile's K loop; ``None``
            picks one from the shape and the GPU (1 under the interpreter).
        config: fixed tile sizes instead of autotuning (always fixed under the
            interpreter, where it defaults to :data:`INTERPRETER_CONFIG`).

    Returns:
        ``[..., N]`` in x's dtype, accumulated in fp32.

    Runs on CUDA/ROCm tensors, or on CPU tensors when Triton was imported with
    ``TRITON_INTERPRET=1``.
    """
    _require_triton()
    k, n, g = _check_inputs(x, qweight, qzeros, scales, group_size, bias)
    interpreting = _interpreting()
    if x.device.type != "cuda" and not interpreting:
        raise RuntimeError(
            f"awq_gemm_triton runs on CUDA/ROCm tensors (got {x.device}); for CPU tensors "
            "set TRITON_INTERPRET=1 before triton is imported (correctness testing only)"
        )

    lead_shape = x.shape[:-1]
    x2 = x.reshape(-1, k)  # (M, K); a view whenever the strides allow
    m = x2.shape[0]
    if m == 0:
        return x.new_empty((*lead_shape, n))
    # The kernel indexes packed columns with unit stride; checkpoints are already contiguous.
    qweight, qzeros, scales = (t if t.stride(1) == 1 else t.contiguous() for t in (qweight, qzeros, scales))

    # The kernel computes element offsets in int32.
    last_x = (m - 1) * x2.stride(0) + (k - 1) * x2.stride(1)
    if max(last_x, m * n, qweight.numel()) >= 2**31:
        raise ValueError(f"x [{m}, {k}] or y [{m}, {n}] is too large for int32 offsets; split the batch")

    if split_k is None:
        split_k = choose_split_k(m, n, k, x.device)
    if split_k < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k}")
    if split_k == 1:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        y = torch.zeros((m, n), dtype=torch.float32, device=x.device)  # atomics add into it

    dot_dtype, dot_precision = _dot_operands(x.dtype, interpreting)
    args = (x2, qweight, qzeros, scales, bias if bias is not None else y, y, m, n, k)
    args += (x2.stride(0), x2.stride(1), qweight.stride(0), qzeros.stride(0), scales.stride(0), y.stride(0))
    meta = {
        "m_bucket": _m_bucket(m),
        "GROUP_SIZE": g,
        "SINGLE_GROUP": g == k,
        "HAS_BIAS": bias is not None,
        "SPLIT_K": split_k,
        "DOT_DTYPE": dot_dtype,
        "DOT_PRECISION": dot_precision,
    }
    if interpreting and config is None:
        config = INTERPRETER_CONFIG
    if config is not None:
        grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n), split_k)
        _awq_gemm_kernel[grid](
            *args,
            **meta,
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            BLOCK_K=config.block_k,
            GROUP_M=config.group_m,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
    else:

        def grid(meta: dict[str, Any]) -> tuple[int, int]:
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split_k)

        _awq_gemm_autotuned[grid](*args, **meta)

    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y.reshape(*lead_shape, n)
