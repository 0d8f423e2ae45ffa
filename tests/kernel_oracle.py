"""Oracles for the CPU kernels: the one numeric reference plus error bounds derived per kernel.

Two oracles for the int8-activation kernels (``cpu``, ``avx2`` and ``portable``):

- ``linear_ref`` on the unquantized activations, with a per-element error bound
  derived from the kernel's arithmetic (see :func:`kernel_error_bound`);
- an emulation of the kernel's int8 activation quantization followed by
  ``linear_ref`` in fp32, which must agree to fp32 rounding: this pins the
  layout, zero points and scales far more tightly than the bound can.
"""

import dataclasses

import torch

from awq_plugin import kernels
from awq_plugin.numerics import pack, quant_ref

U32 = 2.0**-24  # unit roundoff of fp32
UNIT_ROUNDOFF = {torch.float32: U32, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@dataclasses.dataclass
class Layer:
    gq: quant_ref.GroupQuantized
    packed: pack.AwqPacked

    @property
    def w_hat(self) -> torch.Tensor:
        return self.gq.dequantize(torch.float32)  # (N, K)


def outputs_on_one_and_two_threads(
    x: torch.Tensor, weight: kernels.AwqKernelWeight
) -> tuple[torch.Tensor, torch.Tensor]:
    """``awq_linear(x, weight)`` with torch set to one thread, then two (restored afterwards)."""
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.awq_linear(x, weight)
        torch.set_num_threads(2)
        two = kernels.awq_linear(x, weight)
    finally:
        torch.set_num_threads(saved)
    return one, two


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


def auto_kernel_here() -> str:
    """The CPU kernel auto picks on this host from its flags: what a vLLM log must name, so that
    no verdict depends on which CPU the suite lands on."""
    from awq_plugin.kernels.cpu import build

    return kernels.cpu_backend_for(build.cpu_flags()).backend
