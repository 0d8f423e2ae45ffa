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

    @property
    def kernel_backend(self) -> str:
        """The kernel this layer runs on (repacks the weights for it on first use)."""
        return self.kernel_weight().backend

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


class AwqGroupedLinear(AwqLinear):
    """A grouped linear (DeepSeek-V4's ``o_a_proj``, see :mod:`awq_plugin.models.grouped_linear`)
    with AWQ weights: input ``[..., G, k]``, group ``g`` through output channels
    ``g*r:(g+1)*r``, output ``[..., G, r]``.

    Its buffers are one AWQ linear's (``[k, G*r/8]`` ...), as the checkpoint stores them; the
    kernel runs once per group on that group's output channels (whole packed columns, as
    ``r`` is a multiple of 8).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        bias: bool,
        input_groups: int,
        backend: str | None = None,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        if input_groups < 1 or out_features % (input_groups * PACK_FACTOR):
            raise ValueError(
                f"out_features={out_features} does not split into {input_groups} groups of a multiple of "
                f"{PACK_FACTOR} channels"
            )
        super().__init__(in_features, out_features, group_size, bias, backend, dtype, device)
        self.input_groups = input_groups

    @property
    def kernel_backend(self) -> str:
        return self.kernel_weight()[0].backend

    def kernel_weight(self):
        """One kernel weight per group of output channels."""
        if self._kernel_weight is None:
            from awq_plugin.kernels import prepare_awq_weight

            columns = self.out_features // self.input_groups // PACK_FACTOR
            self._kernel_weight = [
                prepare_awq_weight(
                    self.qweight[:, g * columns : (g + 1) * columns].contiguous(),
                    self.qzeros[:, g * columns : (g + 1) * columns].contiguous(),
                    self.scales[:, g * columns * PACK_FACTOR : (g + 1) * columns * PACK_FACTOR].contiguous(),
                    self.group_size,
                    backend=self.backend,
                )
                for g in range(self.input_groups)
            ]
        return self._kernel_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from awq_plugin.kernels import awq_linear

        if x.shape[-2] != self.input_groups:
            raise ValueError(
                f"grouped AWQ linear of {self.input_groups} groups got an input of shape {tuple(x.shape)}"
            )
        rows = self.out_features // self.input_groups
        outs = []
        for g, weight in enumerate(self.kernel_weight()):
            bias = None if self.bias is None else self.bias[g * rows : (g + 1) * rows]
            outs.append(awq_linear(x[..., g, :].contiguous(), weight, bias))
        return torch.stack(outs, dim=-2)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, input_groups={self.input_groups}"
