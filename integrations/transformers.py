"""transformers integration: :class:`AwqConfig` and the ``"awq"`` quantizer, on our AwqLinear and kernels.

What ``from_pretrained`` gains once this module is active:

- **AWQ checkpoints load without gptqmodel.** Every layer the checkpoint stores as
  ``qweight``/``qzeros``/``scales`` becomes an :class:`~awq_plugin.runtime.qlinear.AwqLinear`
  before the weights are read, so transformers' loader fills its buffers directly.
  The kernel is chosen per device by :mod:`awq_plugin.kernels`: the AVX-512 VNNI
  kernel (or the pure-PyTorch reference) on CPU, the Triton kernel on CUDA. The
  CUDA path is written for CUDA but was verified only on CPU and in Triton's
  interpreter: no GPU was available to this project.
- **Quantizing on load.** ``from_pretrained(fp_dir, quantization_config=AwqConfig(dataset=...))``
  loads the full-precision weights as usual, then runs AWQ
  (:func:`awq_plugin.api.quantize_model`) on the loaded model and returns it with
  its linears packed; ``save_pretrained`` then writes an AWQ checkpoint that
  ``awq-plugin inspect``, our loader and stock vLLM read.
- **transformers' own** ``AwqConfig`` objects are accepted and converted.

Activation. transformers finds quantizers only through two dicts in
``transformers.quantizers.auto`` (it has no entry-point discovery), and its
``register_quantizer`` / ``register_quantization_config`` refuse a name that is
already there -- and ``"awq"`` always is (the built-in, gptqmodel-backed one). So
:func:`activate` replaces the two ``"awq"`` entries deliberately and keeps the
originals for :func:`deactivate`. Importing this module activates it;
``import awq_plugin`` arranges for that import to happen as soon as transformers
loads its quantizer registry (see ``awq_plugin/__init__.py``).

This module is imported while ``transformers.quantizers`` is still initialising
(from that hook), so at module level it imports only transformers submodules by
their full path, never names from the lazy top-level ``transformers`` package.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers import auto as hf_auto
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import AwqConfig as HfAwqConfig
from transformers.utils.quantization_config import QuantizationMethod

from awq_plugin.algorithm.awq import AwqOptions
from awq_plugin.algorithm.options import GUARD_MODES
from awq_plugin.calibration.settings import DEFAULTS as CALIBRATION
from awq_plugin.config import AwqQuantConfig
from awq_plugin.errors import CheckpointError, ConfigError
from awq_plugin.format.checkpoint import iter_quantized_prefixes, read_safetensors_header
from awq_plugin.kernels import BACKENDS
from awq_plugin.runtime.modeling import dequantize_awq_linears, swap_in_awq_linears
from awq_plugin.runtime.qlinear import AwqLinear
from awq_plugin.templates import CheckpointNames, unfuse_experts_for_loading

__all__ = ["AwqConfig", "AwqHfQuantizer", "activate", "deactivate", "is_active"]

logger = logging.getLogger(__name__)

METHOD = "awq"
_AUTO = (None, "", "auto")


def _plain(value: Any) -> Any:
    """An enum member's value (transformers' AwqFormat / AwqBackend are str enums), else the value."""
    return value.value if isinstance(value, Enum) else value


def _kernel_backend(value: Any, *, strict: bool) -> str | None:
    """A kernel name for :mod:`awq_plugin.kernels`; None means "choose per device".

    ``strict`` rejects unknown names. Lenient mode maps the backends of other AWQ stacks
    (transformers' ``AwqBackend``: marlin, exllama, ...) to automatic choice with a warning:
    they name kernels we do not ship.
    """
    value = _plain(value)
    if isinstance(value, str):
        value = value.strip().lower()
    if value in _AUTO:
        return None
    if value in BACKENDS:
        return value
    if strict:
        raise ConfigError(f"AwqConfig backend {value!r} is unknown; choose auto or one of {list(BACKENDS)}")
    logger.warning("AWQ backend %r names a kernel awq_plugin does not have; choosing one per device", value)
    return None


class AwqConfig(HfAwqConfig):
    """AWQ for ``from_pretrained``: loading AWQ checkpoints, or quantizing full-precision ones on load.

    The format fields are transformers' ``AwqConfig``'s; the others drive quantization on
    load and are ignored when the checkpoint is already quantized (its own
    ``quantization_config`` wins, as in transformers), except ``backend``, which is a
    loading choice and is applied in both cases.

    Args:
        bits: weight bits; 4 (the only packable width).
        group_size: input channels sharing a scale and zero point (32, 64, 128; -1 = per channel).
        zero_point: asymmetric uint4 with zero points (True) or symmetric int4.
        version: checkpoint layout, ``"gemm"`` (AutoAWQ's; ``format`` is accepted as an alias).
        modules_to_not_convert: name substrings of linears left in full precision.
        dataset: calibration text: a built-in set (``"enwiki"``, ``"news"``, ``"pydoc"``), a
            .txt/.jsonl path, or a list of strings.
        n_samples: calibration windows drawn from ``dataset``.
        seq_len: tokens per calibration window.
        duo_scaling: scale by activation and weight magnitude (AutoAWQ's ``duo_scaling``).
        clip: run the clip (max-range shrink) search after scaling.
        rounding: ``"compensated"`` (default: GPTQ's error compensation after the scales and
            clips, kept per block where its held-out error is lower) or ``"nearest"``.
        act_order: compensated rounding walks the input columns by decreasing second moment
            (GPTQ's act-order; the groups stay contiguous, so the layout is unchanged);
            ``"auto"``: each block walks both orders and keeps the better on held-out tokens.
        propagate: what feeds each next block: ``"quantized"`` (default) outputs of the block
            as quantized, or ``"fp"`` its full-precision outputs (one forward per block less).
        fit_to: what each block is judged against and compensation fits: ``"block"`` its
            full-precision output on the quantized inputs, or ``"model"`` the full-precision
            model's own (default; asymmetric calibration; the same under ``propagate="fp"``).
        sequential: compensated rounding refits each run of linears after the first on its
            inputs recorded again with the linears before it rounded (true-sequential; default).
        fit_norms: compensated rounding refits the norm feeding each rounded run of linears
            (q/k/v, gate/up) to their rounded weights.
        refine_passes: compensated rounding: passes of coordinate descent over each walk's
            integers (each column moved to its best level with the others fixed).
        template: architecture template name, path or dict (default: the shipped one).
        backend: kernel, ``"auto"`` (default: CPU kernel or Triton by device), ``"cpu"``,
            ``"triton"`` or ``"reference"``.
        tokenizer: tokenizer (object or path) for the calibration text; default: the one in
            the model's folder.
        guard: when AWQ ends worse than plain rounding on held-out windows: ``"fallback"``
            (default) writes rounding, ``"warn"`` keeps AWQ and warns, ``"off"`` skips the check.
        device: where the quantizer computes each block (``"auto"``, ``"cpu"``, ``"cuda:N"``);
            default: the device the model is loaded on.

    Only the format fields are serialized (:meth:`to_dict`): a saved checkpoint's
    ``quantization_config`` is exactly what :class:`AwqQuantConfig` writes.

    It subclasses transformers' ``AwqConfig`` so that transformers treats it as one (it
    forwards loading attributes such as ``backend`` only to instances of its own class), but
    none of that class's GPTQ-derived fields apply here: its ``__init__`` is not run, and
    every method that would read those fields is overridden.
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 128,
        zero_point: bool = True,
        version: str | None = None,
        modules_to_not_convert: Sequence[str] | None = None,
        dataset: str | Path | Sequence[str] = CALIBRATION.source,
        n_samples: int = CALIBRATION.n_samples,
        seq_len: int = CALIBRATION.seq_len,
        duo_scaling: bool = AwqOptions.duo_scaling,
        clip: bool = AwqOptions.clip,
        rounding: str = AwqOptions.rounding,
        act_order: bool | str = AwqOptions.act_order,
        fit_to: str = AwqOptions.fit_to,
        sequential: bool = AwqOptions.sequential,
        fit_norms: bool = AwqOptions.fit_norms,
        refine_passes: int = AwqOptions.refine_passes,
        propagate: str = AwqOptions.propagate,
        template: str | Path | Mapping[str, Any] | None = None,
        backend: str | None = None,
        tokenizer: Any = None,
        guard: str = "fallback",
        device: str | None = None,
        format: str | None = None,
    ) -> None:
        version, format = _plain(version), _plain(format)
        if version is not None and format is not None and str(version).lower() != str(format).lower():
            raise ConfigError(f"AwqConfig got version={version!r} and format={format!r}; give one")
        self.quant_method = QuantizationMethod.AWQ
        self.bits = bits
        self.group_size = group_size
        self.zero_point = zero_point
        self.version = version or format or "gemm"
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert else None
        self.dataset = dataset
        self.n_samples = n_samples
        self.seq_len = seq_len
        self.duo_scaling = duo_scaling
        self.clip = clip
        self.rounding = rounding
        self.act_order = act_order
        self.fit_to = fit_to
        self.sequential = sequential
        self.fit_norms = fit_norms
        self.refine_passes = refine_passes
        self.propagate = propagate
        self.template = template
        self.backend = backend
        self.tokenizer = tokenizer
        self.guard = guard
        self.device = device
        self.post_init()

    def post_init(self) -> None:
        """Validate every field (transformers' name for this step); raise :class:`ConfigError`."""
        self.quant_config().check_packable()  # bits, group size, zero point, layout, skips
        self.version = self.quant_config().version
        if isinstance(self.n_samples, bool) or not isinstance(self.n_samples, int) or self.n_samples < 1:
            raise ConfigError(f"AwqConfig n_samples must be a positive int, got {self.n_samples!r}")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ConfigError(f"AwqConfig seq_len must be an int >= 2, got {self.seq_len!r}")
        if not isinstance(self.dataset, (str, Path, list, tuple)):
            raise ConfigError(
                "AwqConfig dataset must be a built-in name, a file path or a list of strings, "
                f"got {type(self.dataset).__name__}"
            )
        self.backend = _kernel_backend(self.backend, strict=True)
        self.awq_options()  # AwqOptions validates its own fields
        if self.guard not in GUARD_MODES:
            raise ConfigError(f"AwqConfig guard must be one of {list(GUARD_MODES)}, got {self.guard!r}")
        if self.device is not None and not isinstance(self.device, str):
            raise ConfigError(f"AwqConfig device must be a device name such as 'cuda:0', got {self.device!r}")

    @property
    def format(self) -> str:
        """transformers' name for :attr:`version`."""
        return self.version

    @format.setter
    def format(self, value: str) -> None:
        self.version = _plain(value)

    # ---- views for the core API ------------------------------------------------------------

    def quant_config(self) -> AwqQuantConfig:
        """The format fields as our frozen, validated config."""
        return AwqQuantConfig(
            bits=self.bits,
            group_size=self.group_size,
            zero_point=self.zero_point,
            version=str(self.version),
            modules_to_not_convert=tuple(self.modules_to_not_convert or ()),
        )

    def awq_options(self) -> AwqOptions:
        """The search knobs this config sets; the rest keep :class:`AwqOptions`' defaults."""
        return AwqOptions(
            duo_scaling=self.duo_scaling,
            clip=self.clip,
            rounding=self.rounding,
            act_order=self.act_order,
            fit_to=self.fit_to,
            sequential=self.sequential,
            fit_norms=self.fit_norms,
            refine_passes=self.refine_passes,
            propagate=self.propagate,
        )

    @property
    def kernel_backend(self) -> str | None:
        """The kernel for :class:`AwqLinear` (None = per device).

        Lenient: transformers may set ``backend`` after construction to a value of its own
        ``AwqBackend`` (a loading attribute copied from its ``AwqConfig``).
        """
        return _kernel_backend(self.backend, strict=False)

    # ---- (de)serialization -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """``config.json["quantization_config"]``: the format fields only, as our checkpoint writer writes them."""
        return self.quant_config().to_quantization_config()

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    @classmethod
    def from_dict(
        cls, config_dict: Mapping[str, Any], return_unused_kwargs: bool = False, **kwargs: Any
    ) -> AwqConfig | tuple[AwqConfig, dict[str, Any]]:
        """Read a checkpoint's ``quantization_config`` in any AWQ dialect (AutoAWQ, llm-awq,
        transformers, vLLM, ours); keys that do not describe the weights are ignored, including
        another tool's ``backend`` (the kernel is a property of the machine, not the checkpoint).

        ``kwargs`` that name attributes are applied, as transformers' own ``from_dict`` does.
        """
        quant = AwqQuantConfig.from_dict(config_dict, strict=False)
        config = cls(
            bits=quant.bits,
            group_size=quant.group_size,
            zero_point=quant.zero_point,
            version=quant.version,
            modules_to_not_convert=quant.modules_to_not_convert,
        )
        unused = config.update(**kwargs)
        return (config, unused) if return_unused_kwargs else config

    @classmethod
    def from_any(cls, config: Any) -> AwqConfig:
        """Ours unchanged; transformers' ``AwqConfig`` or a dict (any dialect) converted.

        From transformers' class we take the format fields, ``dataset``, ``tokenizer`` and
        ``model_seqlen`` (as ``seq_len``); its ``backend`` names kernels we do not ship and
        becomes automatic choice.
        """
        if isinstance(config, cls):
            return config
        if isinstance(config, Mapping):
            return cls.from_dict(config)
        if isinstance(config, HfAwqConfig):
            fields: dict[str, Any] = {
                "bits": config.bits,
                "group_size": config.group_size,
                "zero_point": config.zero_point,
                "version": _plain(getattr(config, "format", None)),
                "modules_to_not_convert": config.modules_to_not_convert,
                "backend": _kernel_backend(getattr(config, "backend", None), strict=False),
                "tokenizer": getattr(config, "tokenizer", None),
            }
            if getattr(config, "dataset", None) is not None:
                fields["dataset"] = config.dataset
            if getattr(config, "model_seqlen", None) is not None:
                fields["seq_len"] = config.model_seqlen
            return cls(**fields)
        raise ConfigError(
            f"expected an AwqConfig (ours or transformers') or a dict, got {type(config).__name__}"
        )

    def get_loading_attributes(self) -> dict[str, Any]:
        """What transformers copies from a passed config onto a checkpoint's config: the kernel."""
        return {"backend": self.backend}

    def to_dict_optimum(self) -> dict[str, Any]:
        return self.to_dict()

    @classmethod
    def from_dict_optimum(cls, config_dict: Mapping[str, Any]) -> AwqConfig:
        return cls.from_any(config_dict)

    def __eq__(self, other: object) -> bool:
        # The dataclass equality inherited from transformers compares quant_method only.
        if not isinstance(other, AwqConfig):
            return NotImplemented
        return self.__dict__ == other.__dict__

    __hash__ = None  # mutable, like every transformers config

    def __repr__(self) -> str:
        calibration = {
            k: getattr(self, k)
            for k in (
                "dataset",
                "n_samples",
                "seq_len",
                "duo_scaling",
                "clip",
                "rounding",
                "act_order",
                "fit_to",
                "sequential",
                "fit_norms",
                "refine_passes",
                "propagate",
                "template",
                "backend",
            )
        }
        if isinstance(calibration["dataset"], (list, tuple)):
            calibration["dataset"] = f"<{len(calibration['dataset'])} texts>"
        return f"AwqConfig(format={self.to_dict()}, calibration={calibration})"

    def __deepcopy__(self, memo: dict[int, Any]) -> AwqConfig:
        # transformers deep-copies model configs, and with them this one; a tokenizer object
        # is shared rather than copied (it is read-only here, and copying it is slow).
        clone = copy.copy(self)
        memo[id(self)] = clone
        clone.__dict__ = {
            k: (v if k == "tokenizer" else copy.deepcopy(v, memo)) for k, v in self.__dict__.items()
        }
        return clone


# ---- the quantizer -------------------------------------------------------------------------------


def _checkpoint_quantized_layers(checkpoint_files: Sequence[str] | None) -> list[str]:
    """Names of the layers the checkpoint stores packed (those with a ``.qweight``), from the headers."""
    if not checkpoint_files:
        raise CheckpointError("loading an AWQ checkpoint needs its weight files (none were found)")
    names: list[str] = []
    for file in checkpoint_files:
        if not str(file).endswith(".safetensors"):
            raise CheckpointError(f"AWQ checkpoints load from safetensors files only, got {file}")
        entries, _metadata = read_safetensors_header(Path(file))
        names.extend(entries)
    prefixes = list(iter_quantized_prefixes(names))
    if not prefixes:
        raise CheckpointError(
            "the checkpoint has a quantization_config but no quantized layers ('*.qweight')"
        )
    return prefixes


def _module_path(model: nn.Module, checkpoint_prefix: str) -> str:
    """The model's module for a checkpoint prefix, allowing for a missing or extra base-model prefix."""
    base = getattr(model, "base_model_prefix", "")
    candidates = [checkpoint_prefix]
    if base:
        candidates += [f"{base}.{checkpoint_prefix}", checkpoint_prefix.removeprefix(f"{base}.")]
    for path in candidates:
        try:
            model.get_submodule(path)
        except AttributeError:
            continue
        return path
    raise CheckpointError(f"the checkpoint quantizes {checkpoint_prefix!r}, which this model does not have")


def _model_devices(model: nn.Module) -> set[torch.device]:
    return {t.device for t in (*model.parameters(), *model.buffers())}


class AwqHfQuantizer(HfQuantizer):
    """transformers' quantizer protocol for AWQ, on :class:`AwqLinear` and :mod:`awq_plugin.kernels`.

    Pre-quantized checkpoints: the linears the checkpoint stores packed become empty
    ``AwqLinear`` modules before loading (:meth:`_process_model_before_weight_loading`), and
    transformers' loader fills their buffers. Full-precision checkpoints: loaded unchanged,
    then quantized by AWQ after loading (:meth:`_process_model_after_weight_loading`).
    """

    requires_calibration = False  # we can calibrate: full-precision checkpoints are quantized on load
    quantization_config: AwqConfig

    def __init__(self, quantization_config: Any, **kwargs: Any) -> None:
        super().__init__(AwqConfig.from_any(quantization_config), **kwargs)

    def validate_environment(self, device_map: Any = None, **kwargs: Any) -> None:
        """AwqLinear keeps its weights as buffers, which accelerate's disk offload does not stream."""
        if isinstance(device_map, Mapping) and "disk" in set(device_map.values()):
            raise ConfigError("AWQ models cannot be offloaded to disk; give a device_map without 'disk'")
        # Configs not built through AwqConfig.__init__ (converted, merged) are checked here too.
        self.quantization_config.quant_config().check_packable()

    def _process_model_before_weight_loading(
        self,
        model: nn.Module,
        dtype: torch.dtype | None = None,
        checkpoint_files: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> nn.Module:
        if not self.pre_quantized:
            return model  # full-precision weights load into the model as it is; AWQ runs after
        quant = self.quantization_config.quant_config()
        # MoE: transformers keeps experts fused; the checkpoint stores them per expert (AutoAWQ's
        # layout). Unfusing gives every per-expert layer a module, under the names transformers'
        # own key renaming (e.g. Mixtral's block_sparse_moe -> mlp) loads into.
        names = unfuse_experts_for_loading(model, quant.modules_to_not_convert)
        to_model_name = names.from_checkpoint_name if names is not None else str
        self._renamed_dtype = (names, dtype or torch.get_default_dtype())
        # The checkpoint's headers say which layers are packed: that is the truth to load, whatever
        # modules_to_not_convert says (AutoAWQ and others skip layers by their own rules).
        paths = [
            _module_path(model, to_model_name(p)) for p in _checkpoint_quantized_layers(checkpoint_files)
        ]
        # Runs inside from_pretrained's meta-device context: the new modules are empty skeletons.
        swap_in_awq_linears(
            model,
            paths,
            quant.group_size,
            self.quantization_config.kernel_backend,
            dtype or torch.get_default_dtype(),
        )
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self.pre_quantized:
            _keep_scales_in_fp16(model)
            names, dtype = getattr(self, "_renamed_dtype", (None, None))
            if names is not None:
                _cast_renamed_parameters(model, names, dtype)
            return model
        return self._quantize_loaded_model(model)

    def _quantize_loaded_model(self, model: nn.Module) -> nn.Module:
        from awq_plugin.api import quantize_model

        config = self.quantization_config
        devices = _model_devices(model)
        if len(devices) != 1:
            raise ConfigError(
                f"quantizing on load needs the whole model on one device; it is on {sorted(map(str, devices))} "
                "(load with device_map=None or a single device)"
            )
        (device,) = devices
        source = _cacheable_source(model, config)
        if source is not None:
            model = _load_from_cache(model, source, config, device)
            _list_full_precision_modules(model, config)
            return model
        logger.info(
            "AWQ: quantizing %s on load (%s, %s)",
            model.config.name_or_path,
            config.quant_config().scheme,
            device,
        )
        quantize_model(
            model,
            config.quant_config(),
            config.dataset,
            tokenizer=self._calibration_tokenizer(model),
            n_samples=config.n_samples,
            seq_len=config.seq_len,
            template=config.template,
            options=config.awq_options(),
            backend=config.kernel_backend,
            guard=config.guard,
        )
        # quantize_model builds the AwqLinear modules on the CPU; bring them to the model's device.
        for module in model.modules():
            if isinstance(module, AwqLinear):
                module.to(device)
        _list_full_precision_modules(model, config)
        return model

    def _calibration_tokenizer(self, model: nn.Module) -> Any:
        """The configured tokenizer (an object, or a path to load), else the model folder's."""
        tokenizer = self.quantization_config.tokenizer
        if tokenizer is None:
            tokenizer = model.config.name_or_path
            if not tokenizer:
                raise ConfigError("quantizing on load needs a tokenizer: pass AwqConfig(tokenizer=...)")
        if isinstance(tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(tokenizer))
        return tokenizer

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        """``model.dequantize()``: every AwqLinear back to an ``nn.Linear`` holding its dequantized weight."""
        return dequantize_awq_linears(model, dtype or torch.float32)

    def is_serializable(self) -> bool:
        return True  # AwqLinear's buffers are the checkpoint tensors; to_dict is the checkpoint's config

    @property
    def is_trainable(self) -> bool:
        return False  # packed integer buffers carry no gradient


def _cacheable_source(model: nn.Module, config: AwqConfig) -> Path | None:
    """The local folder ``model`` was loaded from, when the shared cache can stand for this run.

    The checkpoint cache (:mod:`awq_plugin.pipeline.cache`, the one ``vllm serve FP_DIR
    --quantization awq`` fills) keys a run by its source folder and plain options. A
    tokenizer object, a list of texts or a custom template has no key, and MoE experts load
    under other names: those runs quantize in memory, as before.
    """
    folder = Path(model.config.name_or_path or "")
    if not model.config.name_or_path or not (folder / "config.json").is_file():
        return None
    if not any(folder.glob("*.safetensors")):
        return None
    if (
        config.tokenizer is not None
        or config.template is not None
        or not isinstance(config.dataset, (str, Path))
    ):
        return None
    if _has_shipped_experts(model):
        return None
    return folder


def _has_shipped_experts(model: nn.Module) -> bool:
    """Whether the model's shipped template lists MoE experts (their checkpoint names differ)."""
    from awq_plugin.errors import TemplateError
    from awq_plugin.templates import find_shipped_template

    config = model.config
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    try:
        data, _ = find_shipped_template(architectures[0], getattr(config, "model_type", None))
    except TemplateError:
        return False
    return data["experts"] is not None


def _list_full_precision_modules(model: nn.Module, config: AwqConfig) -> None:
    """Add the subtrees left in full precision outside the quantized layers (a VLM's vision
    tower and projector) to ``config.modules_to_not_convert``, as ``awq-plugin quantize``
    lists them, so that ``save_pretrained`` writes a checkpoint vLLM loads (it would give
    every unlisted linear the AWQ method)."""
    from awq_plugin.format.checkpoint import full_precision_modules

    quantized = [name for name, module in model.named_modules() if isinstance(module, AwqLinear)]
    listed = list(config.modules_to_not_convert or [])
    missing = [p for p in full_precision_modules(model.config.to_dict(), quantized) if p not in listed]
    if missing:
        config.modules_to_not_convert = listed + missing


def _load_from_cache(model: nn.Module, source: Path, config: AwqConfig, device: torch.device) -> nn.Module:
    """Quantize ``source`` into the shared cache (or find it there), then load that checkpoint into ``model``.

    Every tensor comes from the cached checkpoint: the packed linears and also the
    norms that AWQ divided by its scales, so the model equals ``from_pretrained(ENTRY)``.
    """
    from safetensors.torch import load_file

    from awq_plugin.pipeline.cache import QuantizeRequest, ensure_quantized

    quant = config.quant_config()
    defaults = AwqOptions().to_dict()
    options = {k: v for k, v in config.awq_options().to_dict().items() if v != defaults[k]}
    request = QuantizeRequest(
        scheme=quant.scheme,
        method="awq",
        calib=str(config.dataset),
        n_samples=config.n_samples,
        seq_len=config.seq_len,
        options=options,
        guard=config.guard,
        device=config.device or str(device),  # by default where the model is being loaded
    )
    entry = ensure_quantized(source, request, logger=logger)
    files = sorted(entry.path.glob("*.safetensors"))
    paths = [_module_path(model, p) for p in _checkpoint_quantized_layers([str(f) for f in files])]
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    swap_in_awq_linears(model, paths, quant.group_size, config.kernel_backend, dtype)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    result = model.load_state_dict(state, strict=False)  # copies into the model's own dtypes
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"cache entry {entry.path} does not fit the loaded model (missing {missing[:1]}, "
            f"unexpected {result.unexpected_keys[:1]}); from_pretrained arguments may have changed its shape"
        )
    _keep_scales_in_fp16(model)
    for module in model.modules():
        if isinstance(module, AwqLinear):
            module.invalidate()
            module.to(device)
    return model


def _cast_renamed_parameters(model: nn.Module, names: CheckpointNames, dtype: torch.dtype) -> None:
    """Give parameters stored under another name (Mixtral's ``block_sparse_moe.gate``) the load dtype.

    For pre-quantized checkpoints transformers loads every tensor whose key it renamed in the
    checkpoint's own dtype (``core_model_loading``: a renamed key is taken for a serialized
    quantized tensor), so the fp16 router of an fp16 checkpoint would stay fp16 in an fp32
    model and fail to multiply its fp32 input. Quantized layers hold buffers, not parameters,
    and are untouched.
    """
    for name, param in model.named_parameters():
        if param.is_floating_point() and param.dtype != dtype and names.to_checkpoint_name(name) != name:
            param.data = param.data.to(dtype)


def _keep_scales_in_fp16(model: nn.Module) -> None:
    """Scales are fp16 in every AWQ checkpoint. transformers casts floating tensors to the load dtype
    unless the empty buffer says otherwise (it does: fp16), but a model's ``keep_in_fp32`` plan can
    still widen them; narrowing back is exact, since the values came from fp16."""
    for module in model.modules():
        if isinstance(module, AwqLinear) and module.scales.dtype != torch.float16:
            module.scales = module.scales.to(torch.float16)
            module.invalidate()


# ---- activation ----------------------------------------------------------------------------------

# transformers' "awq" entries as they were before activate(), for deactivate().
_ORIGINALS: dict[str, Any] = {}


def is_active() -> bool:
    """Whether transformers' "awq" entries are ours."""
    return hf_auto.AUTO_QUANTIZER_MAPPING.get(METHOD) is AwqHfQuantizer


def activate() -> None:
    """Make ``from_pretrained`` use this integration for ``quant_method: "awq"``. Idempotent.

    transformers has no entry-point discovery for quantizers, and ``register_quantizer`` /
    ``register_quantization_config`` raise for a name that exists ("awq" is built in), so the
    two mapping entries are replaced in place; the originals are kept for :func:`deactivate`.
    """
    if is_active():
        return
    _ORIGINALS.setdefault("quantizer", hf_auto.AUTO_QUANTIZER_MAPPING.get(METHOD))
    _ORIGINALS.setdefault("config", hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(METHOD))
    hf_auto.AUTO_QUANTIZER_MAPPING[METHOD] = AwqHfQuantizer
    hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING[METHOD] = AwqConfig


def deactivate() -> None:
    """Give transformers its own "awq" quantizer and config back (for tests)."""
    if not is_active():
        return
    for mapping, key in (
        (hf_auto.AUTO_QUANTIZER_MAPPING, "quantizer"),
        (hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "config"),
    ):
        original = _ORIGINALS.pop(key)
        if original is None:
            mapping.pop(METHOD, None)
        else:
            mapping[METHOD] = original


# Importing this module is how it gets activated (by awq_plugin's import hook, or by hand).
activate()
