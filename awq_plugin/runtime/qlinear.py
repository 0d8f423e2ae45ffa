"""The runtime linear module for AWQ weights outside vLLM (transformers, our own eval).

It keeps the checkpoint tensors (``qweight``, ``qzeros``, ``scales``) as buffers, so
``state_dict()`` / ``save_pretrained`` write the AWQ layout unchanged, and hands
them to :mod:`awq_plugin.kernels`, which repacks them once for the chosen kernel on
first use.
"""

from __future__ import annotations

import torch
from torch import nn

from awq_plugin.numerics import effective_group_size
from awq_plugin.numerics.pack import PACK_FACTOR, AwqPacked
from awq_plugin.numerics.quant_ref import GroupQuantized


class AwqLinear(nn.Module):
    """``y = x @ W_hat.T + b`` with ``W_hat`` stored as AWQ INT4 groups."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        bias: bool,
        backend: str | None = None,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        group = effective_group_size(group_size, in_features)
        if in_features % group != 0:
            raise ValueError(f"in_features={in_features} is not divisible by group_size={group_size}")
        if out_features % PACK_FACTOR != 0:
            raise ValueError(f"out_features={out_features} is not a multiple of {PACK_FACTOR}")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group
        self.backend = backend
        n_groups = in_features // group
        kwargs = {"device": device}
        self.register_buffer(
            "qweight", torch.zeros(in_features, out_features // PACK_FACTOR, dtype=torch.int32, **kwargs)
        )
        self.register_buffer(
            "qzeros", torch.zeros(n_groups, out_features // PACK_FACTOR, dtype=torch.int32, **kwargs)
        )
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16, **kwargs))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kwargs))
        else:
            self.bias = None
        # Zero elements in the compute dtype, moved by .to() with the module: `weight`'s dtype and device.
        self.register_buffer("_dtype_device", torch.empty(0, dtype=dtype, **kwargs), persistent=False)
        self._kernel_weight = None

    @property
    def weight(self) -> torch.Tensor:
        """A stand-in ``[out, in]`` for model code that reads a linear's ``.weight``.

        Its dtype, device and shape are the layer's; it holds no memory (a fresh NaN, expanded),
        so using it as a weight gives non-finite output rather than a silently wrong one, and
        writing to it changes nothing. It is marked initialised, so transformers' weight
        initialisation on load (``init.kaiming_uniform_(mixer.out_proj.weight)`` in Mamba)
        leaves it alone.
        """
        like = self._dtype_device
        stand_in = torch.full((), float("nan"), dtype=like.dtype, device=like.device)
        stand_in = stand_in.expand(self.out_features, self.in_features)
        stand_in._is_hf_initialized = True
        return stand_in

    @classmethod
    def from_packed(
        cls, packed: AwqPacked, bias: torch.Tensor | None = None, backend: str | None = None
    ) -> AwqLinear:
        layer = cls(
            packed.in_features,
            packed.out_features,
            packed.group_size,
            bias is not None,
            backend=backend,
            dtype=bias.dtype if bias is not None else torch.float16,
        )
        layer.qweight.copy_(packed.qweight)
        layer.qzeros.copy_(packed.qzeros)
        layer.scales.copy_(packed.scales)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    def packed(self) -> AwqPacked:
        return AwqPacked(qweight=self.qweight, qzeros=self.qzeros, scales=self.scales)

    def invalidate(self) -> None:
        """Drop the kernel's repacked copy (call after changing the buffers in place)."""
        self._kernel_weight = None

    def _apply(self, fn, recurse=True):
        # A device or dtype move invalidates the kernel's copy of the weights.
        self._kernel_weight = None
        return super()._apply(fn, recurse)

    def kernel_weight(self):
        if self._kernel_weight is None:
            from awq_plugin.kernels import prepare_awq_weight

            self._kernel_weight = prepare_awq_weight(
                self.qweight, self.qzeros, self.scales, self.group_size, backend=self.backend
            )
        return self._kernel_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from awq_plugin.kernels import awq_linear

        return awq_linear(x, self.kernel_weight(), self.bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``[N, K]`` weight these buffers stand for (reference math)."""
        from awq_plugin.numerics.pack import unpack

        gq: GroupQuantized = unpack(self.packed())
        return gq.dequantize(dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, backend={self.backend or 'auto'}"
        )
