"""The config schema: every accepted spelling, round-trips, and errors that name the field."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from awq_plugin.config import ALLOWED_BITS, ALLOWED_GROUP_SIZES, AwqQuantConfig, load_quant_config
from awq_plugin.errors import ConfigError

DIALECTS = {
    "autoawq": {"zero_point": True, "q_group_size": 64, "w_bit": 4, "version": "GEMM"},
    "autoawq_config_json": {
        "quant_method": "awq",
        "zero_point": True,
        "group_size": 64,
        "bits": 4,
        "version": "gemm",
        "modules_to_not_convert": None,
    },
    "llm_awq": {"zero_point": True, "q_group_size": 64, "w_bit": 4},
    "transformers": {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 64,
        "zero_point": True,
        "backend": "auto",
        "format": "gemm",
        "modules_to_not_convert": [],
        "desc_act": False,
        "sym": True,
    },
    "vllm": {"quant_method": "awq", "w_bit": 4, "q_group_size": 64, "zero_point": True, "lm_head": False},
    "gemv": {"w_bit": 4, "q_group_size": 64, "zero_point": True, "version": "GEMV"},
}


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_every_dialect_reads_to_the_same_config(dialect: str) -> None:
    config = AwqQuantConfig.from_dict(DIALECTS[dialect])
    assert (config.bits, config.group_size, config.zero_point) == (4, 64, True)
    assert config.version == ("gemv" if dialect == "gemv" else "gemm")
    if config.version == "gemm":
        written = config.to_quantization_config()
        assert AwqQuantConfig.from_dict(written) == config


def test_written_dict_is_what_stock_readers_expect() -> None:
    written = AwqQuantConfig(bits=4, group_size=128, zero_point=True).to_quantization_config()
    assert written["quant_method"] == "awq"
    assert {written[k] for k in ("bits", "group_size")} == {4, 128}
    assert written["zero_point"] is True and written["version"] == "gemm"


def test_stock_transformers_accepts_the_written_dict() -> None:
    from transformers import AwqConfig

    written = AwqQuantConfig(bits=4, group_size=64).to_quantization_config()
    hf = AwqConfig.from_dict(written)
    assert (hf.bits, hf.group_size, hf.zero_point) == (4, 64, True)


@settings(max_examples=100, deadline=None)
@given(
    bits=st.sampled_from(ALLOWED_BITS),
    group=st.sampled_from(ALLOWED_GROUP_SIZES),
    zp=st.booleans(),
    mods=st.lists(st.text(alphabet="abcdefghij._", min_size=1, max_size=12), max_size=3),
    bit_key=st.sampled_from(["bits", "w_bit"]),
    group_key=st.sampled_from(["group_size", "q_group_size"]),
)
def test_roundtrip_any_valid_config(bits, group, zp, mods, bit_key, group_key) -> None:
    data = {bit_key: bits, group_key: group, "zero_point": zp, "modules_to_not_convert": mods}
    config = AwqQuantConfig.from_dict(data)
    assert config.modules_to_not_convert == tuple(mods)
    assert AwqQuantConfig.from_scheme(config.scheme, modules_to_not_convert=mods) == config
    if bits == 4:
        assert AwqQuantConfig.from_dict(config.to_quantization_config()) == config


@pytest.mark.parametrize(
    ("scheme", "expected"),
    [
        ("uint4_wo_128", (4, 128, True)),
        ("uint4_wo_64", (4, 64, True)),
        ("uint4_wo_32", (4, 32, True)),
        ("int4_wo_128", (4, 128, False)),
        ("int4_wo_64", (4, 64, False)),
        ("uint4_wo_pc", (4, -1, True)),
        ("uint3_wo_64", (3, 64, True)),
        ("UINT4_WO_64", (4, 64, True)),
    ],
)
def test_scheme_names(scheme: str, expected: tuple[int, int, bool]) -> None:
    config = AwqQuantConfig.from_scheme(scheme)
    assert (config.bits, config.group_size, config.zero_point) == expected


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"bits": 5, "group_size": 64}, r"'bits' = 5 is invalid; allowed: one of \[2, 3, 4, 8\]"),
        ({"bits": "4", "group_size": 64}, r"'bits' = '4' is invalid"),
        ({"bits": 4, "group_size": 48}, r"'group_size' = 48 is invalid; allowed: one of \[32, 64, 128, -1\]"),
        (
            {"bits": 4, "group_size": 64, "zero_point": "yes"},
            r"'zero_point' = 'yes' is invalid; allowed: true or false",
        ),
        ({"bits": 4, "group_size": 64, "version": "exllama"}, r"'version' = 'exllama' is invalid"),
        ({"bits": 4, "group_size": 64, "modules_to_not_convert": "lm_head"}, r"'modules_to_not_convert'"),
        (
            {"bits": 4, "group_size": 64, "quant_method": "gptq"},
            r"'quant_method' = 'gptq' is invalid; allowed: 'awq'",
        ),
        ({"group_size": 64}, r"missing the field 'bits'"),
        ({"bits": 4}, r"missing the field 'group_size'"),
        ({"bits": 4, "w_bit": 8, "group_size": 64}, r"gives 'bits' twice"),
        ({"bits": 4, "group_size": 64, "colour": "red"}, r"unknown field 'colour'"),
        ([4, 64], r"must be a JSON object"),
    ],
)
def test_bad_configs_name_the_field(data, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AwqQuantConfig.from_dict(data)


@pytest.mark.parametrize("scheme", ["uint4", "fp8_wo_128", "uint4_wo_48x", "", "int4_w_128"])
def test_unknown_scheme(scheme: str) -> None:
    with pytest.raises(ConfigError, match="unknown scheme"):
        AwqQuantConfig.from_scheme(scheme)


def test_missing_and_malformed_quantization_config_name_the_file() -> None:
    with pytest.raises(ConfigError, match=r"x/config\.json has no 'quantization_config'"):
        load_quant_config({"model_type": "llama"}, "x/config.json")
    with pytest.raises(ConfigError, match=r"x/config.json: quantization config field 'bits' = 7"):
        load_quant_config({"quantization_config": {"bits": 7, "group_size": 64}}, "x/config.json")


def test_config_is_frozen() -> None:
    config = AwqQuantConfig()
    with pytest.raises(AttributeError):
        config.bits = 8  # type: ignore[misc]


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            ["bits", "w_bit", "group_size", "q_group_size", "zero_point", "version", "format", "x"]
        ),
        st.one_of(
            st.none(), st.booleans(), st.integers(-300, 300), st.text(max_size=6), st.lists(st.integers())
        ),
    )
)
def test_fuzzed_dicts_either_parse_or_raise_config_error(data) -> None:
    try:
        config = AwqQuantConfig.from_dict(data)
    except ConfigError:
        return
    assert config.bits in ALLOWED_BITS and config.group_size in ALLOWED_GROUP_SIZES
