"""The quantization config: one frozen, versioned object, read from every spelling.

AWQ checkpoints in the wild describe themselves in several dialects:

=====================  =================================================
AutoAWQ                ``w_bit``, ``q_group_size``, ``zero_point``, ``version: "GEMM"``
llm-awq                ``w_bit``, ``q_group_size``, ``zero_point``
transformers AwqConfig ``bits``, ``group_size``, ``zero_point``, ``format`` / ``version``
vLLM                   ``bits`` / ``w_bit``, ``group_size`` / ``q_group_size``, ``zero_point``
Quark-style schemes    ``uint4_wo_128`` (asymmetric), ``int4_wo_128`` (symmetric), ...
=====================  =================================================

:meth:`AwqQuantConfig.from_dict` absorbs all of them in one place;
:meth:`AwqQuantConfig.to_quantization_config` writes the one dialect that stock
vLLM and stock transformers both read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from awq_plugin.errors import ConfigError
from awq_plugin.numerics import PACKABLE_BITS, PER_CHANNEL, check_packable

#: Version of the dict this package writes under ``awq_plugin`` in quantization_config.
CONFIG_SCHEMA_VERSION = 1

ALLOWED_BITS = (2, 3, 4, 8)  # PACKABLE_BITS pack; the others exist for fake-quant studies
ALLOWED_GROUP_SIZES = (32, 64, 128, PER_CHANNEL)
ALLOWED_VERSIONS = ("gemm", "gemv")  # we write gemm; gemv is read

# Every key spelling we accept, mapped to our field name.
_KEY_ALIASES: dict[str, str] = {
    "bits": "bits",
    "w_bit": "bits",
    "wbits": "bits",
    "weight_bits": "bits",
    "group_size": "group_size",
    "q_group_size": "group_size",
    "groupsize": "group_size",
    "zero_point": "zero_point",
    "version": "version",
    "format": "version",
    "modules_to_not_convert": "modules_to_not_convert",
    "modules_not_to_convert": "modules_to_not_convert",
}
# Keys other tools write that carry no meaning for the weights we load.
_IGNORED_KEYS = frozenset(
    {
        "quant_method",
        "backend",
        "do_fuse",
        "fuse_max_seq_len",
        "modules_to_fuse",
        "exllama_config",
        "checkpoint_format",
        "desc_act",
        "sym",
        "lm_head",
        "true_sequential",
        "awq_plugin",
        "producer",
        "pack_dtype",
        "meta",
    }
)

_SCHEME_RE = re.compile(r"^(?P<sign>u?)int(?P<bits>\d)_wo(?:_(?P<group>\d+|pc))?$")


def _fail(field_name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"quantization config field '{field_name}' = {value!r} is invalid; allowed: {allowed}")


@dataclass(frozen=True)
class AwqQuantConfig:
    """How weights are quantized. Immutable; validated on construction.

    The defaults are the AWQ paper's: 4-bit, group 128, asymmetric with zero points.
    """

    bits: int = 4  # 4 is packed for serving; 2/3/8 are for fake-quant research only
    group_size: int = 128  # input channels sharing one scale/zero; -1 = per output channel
    zero_point: bool = True  # True: uint4 with integer zeros; False: symmetric int4
    version: str = "gemm"  # checkpoint layout; we write "gemm" (AutoAWQ's), and read "gemv" configs
    modules_to_not_convert: tuple[str, ...] = field(default_factory=tuple)  # name substrings left in fp

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in ALLOWED_BITS:
            raise _fail(
                "bits", self.bits, f"one of {list(ALLOWED_BITS)} (only {list(PACKABLE_BITS)} can be packed)"
            )
        if (
            isinstance(self.group_size, bool)
            or not isinstance(self.group_size, int)
            or self.group_size not in ALLOWED_GROUP_SIZES
        ):
            raise _fail(
                "group_size", self.group_size, f"one of {list(ALLOWED_GROUP_SIZES)} (-1 = per-channel)"
            )
        if not isinstance(self.zero_point, bool):
            raise _fail("zero_point", self.zero_point, "true or false")
        if not isinstance(self.version, str) or self.version.lower() not in ALLOWED_VERSIONS:
            raise _fail("version", self.version, f"one of {list(ALLOWED_VERSIONS)}")
        object.__setattr__(self, "version", self.version.lower())
        mods = self.modules_to_not_convert
        if mods is None:
            mods = ()
        if isinstance(mods, str) or not isinstance(mods, Iterable):
            raise _fail("modules_to_not_convert", mods, "a list of module-name substrings")
        mods = tuple(mods)
        if not all(isinstance(m, str) and m for m in mods):
            raise _fail("modules_to_not_convert", list(mods), "a list of non-empty strings")
        object.__setattr__(self, "modules_to_not_convert", mods)

    # ---- reading ---------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, strict: bool = True) -> AwqQuantConfig:
        """Build from any accepted dialect (see the module docstring).

        ``strict`` rejects keys we do not know, naming them; ``quant_method``, when present,
        must be ``"awq"``. Conflicting spellings of one field (``bits: 4, w_bit: 8``) are an error.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"quantization config must be a JSON object, got {type(data).__name__}")
        method = data.get("quant_method")
        if method is not None and str(method).lower() != "awq":
            raise _fail("quant_method", method, "'awq'")
        values: dict[str, Any] = {}
        for key, value in data.items():
            name = _KEY_ALIASES.get(key)
            if name is None:
                if strict and key not in _IGNORED_KEYS:
                    known = sorted(set(_KEY_ALIASES) | _IGNORED_KEYS)
                    raise ConfigError(f"quantization config has unknown field '{key}'; known fields: {known}")
                continue
            if name in values and values[name] != value:
                raise ConfigError(
                    f"quantization config gives '{name}' twice with different values "
                    f"({values[name]!r} and {key}={value!r})"
                )
            values[name] = value
        if "bits" not in values:
            raise ConfigError("quantization config is missing the field 'bits' (or 'w_bit')")
        if "group_size" not in values:
            raise ConfigError("quantization config is missing the field 'group_size' (or 'q_group_size')")
        values.setdefault("zero_point", True)
        if values.get("version") is None:
            values["version"] = "gemm"
        if values.get("modules_to_not_convert") is None:
            values["modules_to_not_convert"] = ()
        return cls(**values)

    @classmethod
    def from_scheme(cls, scheme: str, **overrides: Any) -> AwqQuantConfig:
        """Map a Quark-style scheme name to a config.

        ``uint4_wo_128``: 4-bit asymmetric (zero points), group 128, weight-only.
        ``int4_wo_64``: 4-bit symmetric, group 64. ``uint4_wo_pc``: per output channel.
        Bits 2, 3 and 8 parse too (``uint3_wo_64``) for fake-quant studies.
        """
        match = _SCHEME_RE.match(scheme.strip().lower()) if isinstance(scheme, str) else None
        if match is None:
            raise ConfigError(
                f"unknown scheme {scheme!r}; expected '[u]int<bits>_wo_<group>' such as "
                f"{', '.join(KNOWN_SCHEMES)}"
            )
        group = match["group"]
        group_size = 128 if group is None else (PER_CHANNEL if group == "pc" else int(group))
        return cls(
            bits=int(match["bits"]), group_size=group_size, zero_point=match["sign"] == "u", **overrides
        )

    # ---- writing ---------------------------------------------------------------------------

    @property
    def scheme(self) -> str:
        """The Quark-style name of this config, e.g. ``uint4_wo_64``."""
        group = "pc" if self.group_size == PER_CHANNEL else str(self.group_size)
        return f"{'u' if self.zero_point else ''}int{self.bits}_wo_{group}"

    @property
    def packable(self) -> bool:
        return self.bits in PACKABLE_BITS

    def check_packable(self) -> None:
        """Raise unless this config can be written as a packed AWQ checkpoint."""
        try:
            check_packable(self.bits)
        except ValueError as exc:  # name the field, as a ConfigError like every other field
            raise ConfigError(f"quantization config field 'bits' = {self.bits}: {exc}") from None
        if self.version != "gemm":
            raise ConfigError(f"quantization config field 'version' = {self.version!r}: we write only 'gemm'")

    def to_quantization_config(self) -> dict[str, Any]:
        """The ``config.json["quantization_config"]`` dict stock vLLM and transformers read:
        :func:`quant_config_dict` plus the keys loaders look for."""
        self.check_packable()
        data = {"quant_method": "awq", **quant_config_dict(self), "version": self.version}
        data["modules_to_not_convert"] = data["modules_to_not_convert"] or None  # null when empty
        data["awq_plugin"] = {"schema_version": CONFIG_SCHEMA_VERSION, "scheme": self.scheme}
        return data

    def replace(self, **changes: Any) -> AwqQuantConfig:
        return replace(self, **changes)

    def skips_module(self, name: str) -> bool:
        """Whether the module ``name`` stays unquantized (substring match, as vLLM does)."""
        return any(pattern in name for pattern in self.modules_to_not_convert)


def quant_config_dict(quant: Any) -> dict[str, Any]:
    """The fields of a quantization config that decide the weights, as JSON data.

    The one serialization of those fields: :meth:`AwqQuantConfig.to_quantization_config` builds
    config.json's dict on it, and saved AWQ results store it as is. ``quant`` is an
    :class:`AwqQuantConfig` or anything with ``bits``, ``group_size`` and ``zero_point`` (the
    algorithm accepts such configs); it is not checked for packability (results may be 3-bit).
    """
    return {
        "bits": quant.bits,
        "group_size": quant.group_size,
        "zero_point": quant.zero_point,
        "modules_to_not_convert": list(getattr(quant, "modules_to_not_convert", ()) or ()),
    }


KNOWN_SCHEMES = ("uint4_wo_128", "uint4_wo_64", "uint4_wo_32", "uint4_wo_pc", "int4_wo_128", "int4_wo_64")


def load_quant_config(model_config: Mapping[str, Any], source: str = "config.json") -> AwqQuantConfig:
    """Read ``quantization_config`` from a model's config.json dict, naming ``source`` on error."""
    if "quantization_config" not in model_config:
        raise ConfigError(f"{source} has no 'quantization_config': this is not a quantized checkpoint")
    try:
        return AwqQuantConfig.from_dict(model_config["quantization_config"])
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
