"""vLLM: compressed-tensors W4A16 and GPTQ 4-bit checkpoints on this package's CPU kernels.

Most 4-bit checkpoints on the hub are not AutoAWQ folders but llm-compressor's
compressed-tensors (``format: "pack-quantized"``) or GPTQ. Their numbers are the same as
AutoAWQ's over contiguous groups (:mod:`awq_plugin.numerics.layouts`), so on the CPU the
plugin serves them with its own kernels: :func:`register` adds :class:`AwqPluginLayoutConfig`
under ``awq_plugin_ct`` and ``awq_plugin_gptq``, whose ``override_quantization_method`` claims
such a checkpoint when vLLM runs on the CPU (``vllm serve DIR``, or ``--quantization
compressed-tensors`` / ``gptq``). Each 4-bit linear's tensors are created in the checkpoint's
own layout (vLLM's parameter classes narrow them for tensor parallelism as for its own
methods), then, once loaded, unpacked to integers, scales and zeros, packed in the AutoAWQ
layout and repacked for the kernel, exactly as an AWQ layer is.

Everything else goes to vLLM's own config for the checkpoint (``CompressedTensorsConfig`` or
``AutoGPTQConfig``), with one log line naming it: layers of other schemes (8-bit, FP8,
activation quantization), MoE experts, and every layer on GPUs (where vLLM's Marlin serves these layouts).
``VLLM_PLUGINS=""`` restores vLLM's own handling throughout.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("vllm.awq_plugin")

#: Our names for the two layouts' configs, and the checkpoint ``quant_method`` each claims.
LAYOUT_NAMES = {"compressed-tensors": "awq_plugin_ct", "gptq": "awq_plugin_gptq"}
#: ``--quantization`` values under which we still claim such a checkpoint (None: not given).
_CLAIMABLE = {
    "compressed-tensors": (None, "compressed-tensors", "awq_plugin_ct"),
    "gptq": (None, "gptq", "gptq_marlin", "auto_gptq", "awq_plugin_gptq"),
}
_logged: set[str] = set()


def _log_once(key: str, message: str, *args: Any) -> None:
    if key not in _logged:
        _logged.add(key)
        log.info(message, *args)


def claims(hf_quant_cfg: dict[str, Any], user_quant: str | None, on_cpu: bool) -> str | None:
    """Our config name for a checkpoint vLLM is about to load, or None to leave it to vLLM:
    a pure function (tested per case). Claims 4-bit GPTQ checkpoints (not act-order across
    groups: ``desc_act`` without ``static_groups``) and compressed-tensors checkpoints that
    have a 4-bit pack-quantized group, on the CPU only."""
    method = str(hf_quant_cfg.get("quant_method", "")).lower()
    if not on_cpu or method not in LAYOUT_NAMES or user_quant not in _CLAIMABLE[method]:
        return None
    if method == "gptq":
        # act-order without static groups permutes input channels across groups (a g_idx
        # that is not contiguous): vLLM's own GPTQ path serves that, not ours
        act_order = bool(hf_quant_cfg.get("desc_act")) and not hf_quant_cfg.get("static_groups")
        return LAYOUT_NAMES[method] if hf_quant_cfg.get("bits") == 4 and not act_order else None
    groups = hf_quant_cfg.get("config_groups") or {}
    top = hf_quant_cfg.get("format")
    for group in groups.values():
        weights = group.get("weights") or {}
        if (
            (group.get("format") or top) == "pack-quantized"
            and weights.get("num_bits") == 4
            and weights.get("type", "int") == "int"
            and not group.get("input_activations")
        ):
            return LAYOUT_NAMES[method]
    return None


class _LayoutConfigImpl:
    """Body of :class:`AwqPluginLayoutConfig` (vLLM's ``QuantizationConfig`` contract)."""

    def __init__(self, layout: str, native: Any, raw: dict[str, Any]) -> None:
        super().__init__()
        self.layout = layout
        self.native = native  # vLLM's own config for the checkpoint
        self.raw = raw
        self.packed_modules_mapping = native.packed_modules_mapping

    def __repr__(self) -> str:
        return f"AwqPluginLayoutConfig({self.layout})"

    layout_name = "awq_plugin_ct"  # per class: see _vllm_classes

    @classmethod
    def get_name(cls) -> str:
        return cls.layout_name

    def get_supported_act_dtypes(self) -> list[Any]:
        import torch

        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 75

    @staticmethod
    def get_config_filenames() -> list[str]:
        return ["quantize_config.json"]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Any:
        method = str(config.get("quant_method", "")).lower()
        if method == "compressed-tensors":
            from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
                CompressedTensorsConfig,
            )

            return _class_for("compressed-tensors")(
                "compressed-tensors", CompressedTensorsConfig.from_config(config), config
            )
        if method == "gptq":
            from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig

            return _class_for("gptq")("gptq", _gptq_native(AutoGPTQConfig, config), config)
        raise ValueError(f"awq-plugin: quant_method {method!r} is not a layout this config reads")

    @classmethod
    def override_quantization_method(
        cls, hf_quant_cfg: dict[str, Any], user_quant: str | None, hf_config: Any = None
    ) -> str | None:
        from vllm.platforms import current_platform

        return claims(hf_quant_cfg, user_quant, current_platform.is_cpu())

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        self.native.apply_vllm_mapper(hf_to_vllm_mapper)

    def maybe_update_config(
        self, model_name: str, hf_config: Any = None, revision: str | None = None
    ) -> None:
        update = getattr(self.native, "maybe_update_config", None)
        if update is not None:
            update(model_name, hf_config=hf_config, revision=revision)

    def get_cache_scale(self, name: str) -> Any:
        return self.native.get_cache_scale(name) if hasattr(self.native, "get_cache_scale") else None

    def get_quant_method(self, layer: Any, prefix: str) -> Any:
        from vllm.model_executor.layers.linear import LinearBase

        native_method = self.native.get_quant_method(layer, prefix)
        if not isinstance(layer, LinearBase) or native_method is None:
            return native_method
        spec = self._our_spec(layer, native_method)
        if spec is None:
            _log_once(
                f"native:{type(native_method).__name__}",
                "awq-plugin: %s (and layers like it) left to vLLM's %s",
                prefix,
                type(native_method).__name__,
            )
            return native_method
        from awq_plugin.integrations.vllm import _vllm_classes

        return _vllm_classes()["AwqPluginLayoutLinearMethod"](self, spec, native_method)

    def _our_spec(self, layer: Any, native_method: Any) -> dict[str, Any] | None:
        """What our linear method needs for this layer, or None where vLLM's own method serves it."""
        if self.layout == "compressed-tensors":
            from vllm.model_executor.layers.quantization.compressed_tensors.schemes import (
                CompressedTensorsWNA16,
            )

            scheme = getattr(layer, "scheme", None)
            if not isinstance(scheme, CompressedTensorsWNA16) or scheme.num_bits != 4:
                return None
            return {"group_size": scheme.group_size, "symmetric": bool(scheme.symmetric)}
        from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQLinearMethod

        if not isinstance(native_method, AutoGPTQLinearMethod):
            return None  # a layer the checkpoint keeps in full precision (vLLM's own decision)
        return {
            "group_size": int(self.raw["group_size"]),
            "symmetric": bool(self.raw.get("sym", True)),
            "format": str(self.raw.get("checkpoint_format", "gptq")).lower(),
        }


def _class_for(layout: str) -> Any:
    from awq_plugin.integrations.vllm import _vllm_classes

    return _vllm_classes()["AwqPluginCtConfig" if layout == "compressed-tensors" else "AwqPluginGptqConfig"]


def _gptq_native(config_cls: Any, config: dict[str, Any]) -> Any:
    """vLLM's GPTQ config for the checkpoint; for asymmetric 4-bit GPTQ, which vLLM 0.32 refuses,
    the same config built as if symmetric: it then only decides which layers are quantized
    (every one it quantizes comes to us, and we read the zero points)."""
    return config_cls.from_config(config if config.get("sym", True) else {**config, "sym": True})


class _LayoutLinearMethodImpl:
    """Body of :class:`AwqPluginLayoutLinearMethod`: a 4-bit compressed-tensors or GPTQ linear on
    our CPU kernel (weights created in the checkpoint's layout, repacked once after loading)."""

    def __init__(self, config: Any, spec: dict[str, Any], native_method: Any) -> None:
        self.config = config
        self.spec = spec
        self.native_method = native_method
        self.kernel: str | None = None

    def create_weights(
        self,
        layer: Any,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: Any,
        **extra_weight_attrs: Any,
    ) -> None:
        from awq_plugin.integrations.vllm import _choose_kernel_here, _log_kernel_once, awq_shard_shapes

        name = getattr(layer, "prefix", "") or type(layer).__name__
        group = self.spec["group_size"]
        shapes = awq_shard_shapes(name, input_size, input_size_per_partition, output_partition_sizes, group)
        choice = _choose_kernel_here(layer, shapes.group_size, _QuantFacts(group, not self.spec["symmetric"]))
        if choice.kernel == "marlin":  # no kernel of ours on this platform: vLLM's own method
            self.native_method.create_weights(
                layer,
                input_size_per_partition,
                output_partition_sizes,
                input_size,
                output_size,
                params_dtype,
                **extra_weight_attrs,
            )
            self.kernel = "native"
            return
        self.kernel = choice.kernel
        _log_kernel_once(choice, f"AwqPluginLayoutLinearMethod ({self.config.layout})")
        loader = extra_weight_attrs["weight_loader"]
        k_part, n_part = input_size_per_partition, sum(output_partition_sizes)
        groups = input_size_per_partition // shapes.group_size
        layer.awq_group_size = shapes.group_size
        layer.awq_layout_shape = (n_part, k_part)
        if self.config.layout == "compressed-tensors":
            _create_compressed_tensors(layer, n_part, k_part, groups, self.spec, loader)
        else:
            _create_gptq(layer, n_part, k_part, groups, self.spec, loader)

    def process_weights_after_loading(self, layer: Any) -> None:
        if self.kernel == "native":
            self.native_method.process_weights_after_loading(layer)
            return
        import torch

        from awq_plugin.integrations.vllm import install_kernel_weight
        from awq_plugin.numerics import layouts
        from awq_plugin.numerics.pack import pack
        from awq_plugin.numerics.quant_ref import GroupQuantized

        n, k = layer.awq_layout_shape
        g = layer.awq_group_size
        if self.config.layout == "compressed-tensors":
            zeros = getattr(layer, "weight_zero_point", None)
            gq = layouts.unpack_compressed_tensors(
                layouts.CompressedTensorsPacked(
                    layer.weight_packed.data,
                    layer.weight_scale.data,
                    None if zeros is None else zeros.data,
                    torch.tensor([n, k], dtype=torch.int64),
                )
            )
            for name in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape"):
                if hasattr(layer, name):
                    delattr(layer, name)
        else:
            gq = layouts.unpack_gptq(
                layouts.GptqPacked(
                    layer.qweight.data, layer.qzeros.data, layer.scales.data, _rank_g_idx(layer.g_idx.data, g)
                ),
                self.spec["format"],
            )
            delattr(layer, "g_idx")
        # One group per row for the channel strategy: the kernel takes it as a group of all K.
        packed = pack(GroupQuantized(gq.q, gq.scales.to(torch.float16), gq.zeros, 4, g))
        install_kernel_weight(layer, packed.qweight, packed.qzeros, packed.scales, g, self.kernel)

    def apply(self, layer: Any, x: Any, bias: Any = None) -> Any:
        if self.kernel == "native":
            return self.native_method.apply(layer, x, bias)
        from awq_plugin.kernels import awq_linear

        return awq_linear(x, layer.awq_weight, bias)


class _QuantFacts:
    """The two facts kernel choice reads from a quantization config (for vLLM's Marlin check)."""

    def __init__(self, group_size: int, zero_point: bool) -> None:
        self.group_size = group_size
        self.zero_point = zero_point
        self.bits = 4


def _rank_g_idx(g_idx: Any, group_size: int) -> Any:
    """This rank's ``g_idx`` renumbered from its first group (row-parallel shards hold later
    groups); contiguous groups where the loader left it unset (all -1)."""
    from awq_plugin.numerics.layouts import contiguous_g_idx

    if g_idx.numel() == 0 or bool((g_idx == -1).all()):
        return contiguous_g_idx(g_idx.numel(), group_size)
    return g_idx - g_idx.min()


def _create_compressed_tensors(
    layer: Any, n: int, k: int, groups: int, spec: dict[str, Any], loader: Any
) -> None:
    import torch
    from vllm.model_executor.parameter import (
        BasevLLMParameter,
        ChannelQuantScaleParameter,
        GroupQuantScaleParameter,
        PackedColumnParameter,
        PackedvLLMParameter,
    )

    channel = spec["group_size"] in (-1, None)
    weight = PackedvLLMParameter(
        input_dim=1,
        output_dim=0,
        packed_dim=1,
        packed_factor=8,
        weight_loader=loader,
        data=torch.empty(n, k // 8, dtype=torch.int32),
    )
    # float32 holds any stored scale dtype exactly (fp16, bf16 or fp32); the kernel takes fp16.
    scale_data = torch.empty(n, 1 if channel else groups, dtype=torch.float32)
    if channel:
        scale = ChannelQuantScaleParameter(output_dim=0, weight_loader=loader, data=scale_data)
    else:
        scale = GroupQuantScaleParameter(output_dim=0, input_dim=1, weight_loader=loader, data=scale_data)
    layer.register_parameter("weight_packed", weight)
    layer.register_parameter("weight_scale", scale)
    layer.register_parameter(
        "weight_shape", BasevLLMParameter(data=torch.empty(2, dtype=torch.int64), weight_loader=loader)
    )
    if not spec["symmetric"]:
        zero_data = torch.zeros(n // 8, 1 if channel else groups, dtype=torch.int32)
        if channel:
            zeros = PackedColumnParameter(
                output_dim=0, packed_dim=0, packed_factor=8, weight_loader=loader, data=zero_data
            )
        else:
            zeros = PackedvLLMParameter(
                input_dim=1, output_dim=0, packed_dim=0, packed_factor=8, weight_loader=loader, data=zero_data
            )
        layer.register_parameter("weight_zero_point", zeros)


def _create_gptq(layer: Any, n: int, k: int, groups: int, spec: dict[str, Any], loader: Any) -> None:
    import torch
    from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter, RowvLLMParameter

    layer.register_parameter(
        "qweight",
        PackedvLLMParameter(
            input_dim=0,
            output_dim=1,
            packed_dim=0,
            packed_factor=8,
            weight_loader=loader,
            data=torch.empty(k // 8, n, dtype=torch.int32),
        ),
    )
    # -1 until loaded: vLLM's loaders may leave g_idx out (it is redundant without act-order),
    # and then the groups are the contiguous ones.
    layer.register_parameter(
        "g_idx",
        RowvLLMParameter(input_dim=0, weight_loader=loader, data=torch.full((k,), -1, dtype=torch.int32)),
    )
    layer.register_parameter(
        "qzeros",
        PackedvLLMParameter(
            input_dim=0,
            output_dim=1,
            packed_dim=1,
            packed_factor=8,
            weight_loader=loader,
            data=torch.empty(groups, n // 8, dtype=torch.int32),
        ),
    )
    layer.register_parameter(
        "scales",
        GroupQuantScaleParameter(
            input_dim=0, output_dim=1, weight_loader=loader, data=torch.empty(groups, n, dtype=torch.float16)
        ),
    )
