"""The compressed-tensors and GPTQ layouts, and ``awq-plugin convert`` between all three.

Oracles: compressed-tensors' own packing and dequantization (the library vLLM installs),
a GPTQ unpacker written here bit by bit (independent of the packing under test), and the
one reference dequantization; conversions must round-trip tensor for tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from awq_plugin.cli import main as cli_main
from awq_plugin.config import AwqQuantConfig
from awq_plugin.errors import CheckpointError
from awq_plugin.format.checkpoint import SafetensorsReader
from awq_plugin.format.convert import convert_checkpoint, read_linear, read_scheme
from awq_plugin.format.packing import write_packed_model
from awq_plugin.numerics.layouts import (
    GptqPacked,
    pack_compressed_tensors,
    pack_gptq,
    pack_sequential,
    unpack_compressed_tensors,
    unpack_gptq,
    unpack_sequential,
)
from awq_plugin.numerics.quant_ref import GroupQuantized, dequantize, quantize
from awq_plugin.runtime.modeling import load_fp_model

# (N, K, group size, zero point): odd group counts, per-channel, K not a power of two.
SHAPES = [
    (24, 256, 64, True),
    (40, 96, 32, False),
    (16, 384, 128, True),
    (8, 200, -1, True),
    (32, 160, -1, False),
]


def _quantized(n: int, k: int, group: int, zero_point: bool, seed: int = 0) -> GroupQuantized:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen)
    first = k if group == -1 else group
    w[0, :first] = w[0, :first].abs() + 0.1  # an all-positive group: zero point 0
    return quantize(w, 4, group, zero_point)


@pytest.mark.parametrize(("rows", "cols", "dim"), [(3, 16, 1), (5, 8, 1), (24, 7, 0), (8, 1, 0)])
def test_sequential_nibbles_round_trip_and_sit_in_order(rows, cols, dim) -> None:
    values = torch.randint(0, 16, (rows, cols), generator=torch.Generator().manual_seed(rows))
    packed = pack_sequential(values, dim)
    assert torch.equal(unpack_sequential(packed, dim), values.to(torch.uint8))
    # value i of each eight at bits 4i, read back one element with plain integer arithmetic
    word = int(packed[0, 0]) & 0xFFFFFFFF
    column = values[:, 0] if dim == 1 else values[0, :]
    line = values[0, :8] if dim == 1 else values[:8, 0]
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == line.tolist()
    assert column.numel() > 0


def test_sequential_packing_refuses_what_it_cannot_hold() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_sequential(torch.zeros(2, 12, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match=r"0\.\.15"):
        pack_sequential(torch.full((2, 8), 16), 1)


@pytest.mark.parametrize(("n", "k", "group", "zero_point"), SHAPES)
def test_compressed_tensors_layout_matches_the_library(n, k, group, zero_point) -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize

    gq = _quantized(n, k, group, zero_point)
    packed = pack_compressed_tensors(gq, symmetric=not zero_point)
    # The library stores signed integers plus 8: the same nibbles as our unsigned ones.
    signed = (gq.q.to(torch.int16) - 8).to(torch.int8)
    assert torch.equal(packed.weight_packed, pack_to_int32(signed, 4, packed_dim=1))
    if zero_point:
        signed_zeros = (gq.zeros.to(torch.int16) - 8).to(torch.int8)
        assert torch.equal(packed.weight_zero_point, pack_to_int32(signed_zeros, 4, packed_dim=0))
    else:
        assert packed.weight_zero_point is None
    # The library's dequantization of its signed integers equals the one reference.
    args = QuantizationArgs(
        num_bits=4,
        symmetric=not zero_point,
        strategy="channel" if group == -1 else "group",
        group_size=None if group == -1 else group,
    )
    zp = None if not zero_point else (gq.zeros.to(torch.int16) - 8).to(torch.int8)
    theirs = ct_dequantize(signed, packed.weight_scale.float(), zp, args=args, dtype=torch.float32)
    ours = dequantize(gq.q, gq.scales, gq.zeros, group)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
    back = unpack_compressed_tensors(packed)
    assert torch.equal(back.q, gq.q) and torch.equal(back.zeros, gq.zeros)
    assert torch.equal(back.scales, gq.scales) and back.group_size == gq.group_size


def _gptq_dequantize_by_hand(packed: GptqPacked, minus_one: bool) -> torch.Tensor:
    """GPTQ's numbers read element by element from the int32 words (the test's own oracle)."""
    k8, n = packed.qweight.shape
    k = k8 * 8
    out = torch.empty(n, k)
    qweight = packed.qweight.tolist()
    qzeros = packed.qzeros.tolist()
    for row in range(n):
        for col in range(k):
            g = int(packed.g_idx[col])
            q = (qweight[col // 8][row] >> (4 * (col % 8))) & 0xF
            z = (qzeros[g][row // 8] >> (4 * (row % 8))) & 0xF
            out[row, col] = (q - (z + 1 if minus_one else z)) * float(packed.scales[g, row])
    return out


@pytest.mark.parametrize(("n", "k", "group", "zero_point"), SHAPES[:3])
def test_gptq_layout_against_a_hand_unpacker(n, k, group, zero_point) -> None:
    gq = _quantized(n, k, group, zero_point)
    if zero_point:
        with pytest.raises(ValueError, match="zero point of 0"):
            pack_gptq(gq, "gptq")  # v1 stores z - 1: a zero point of 0 has no form there
        formats = ["gptq_v2"]
    else:
        formats = ["gptq", "gptq_v2"]
    reference = dequantize(gq.q, gq.scales.half(), gq.zeros, group)
    for fmt in formats:
        packed = pack_gptq(gq, fmt)
        assert packed.qweight.shape == (k // 8, n) and packed.g_idx.tolist() == [c // group for c in range(k)]
        torch.testing.assert_close(_gptq_dequantize_by_hand(packed, fmt == "gptq"), reference, rtol=0, atol=0)
        back = unpack_gptq(packed, fmt)
        assert torch.equal(back.q, gq.q) and torch.equal(back.zeros, gq.zeros)


def test_gptq_reading_refuses_permuted_groups_and_v1_zero_sixteen() -> None:
    gq = _quantized(16, 128, 32, False)
    packed = pack_gptq(gq, "gptq")
    shuffled = GptqPacked(packed.qweight, packed.qzeros, packed.scales, packed.g_idx.flip(0))
    with pytest.raises(ValueError, match="act-order without static groups"):
        unpack_gptq(shuffled, "gptq")
    wrapped = GptqPacked(packed.qweight, torch.full_like(packed.qzeros, -1), packed.scales, packed.g_idx)
    with pytest.raises(ValueError, match="zero point of 16"):
        unpack_gptq(wrapped, "gptq")  # every nibble 15: v1 readers take z = 16
    with pytest.raises(ValueError, match="checkpoint_format"):
        unpack_gptq(packed, "gptq_v3")


# ---- convert -----------------------------------------------------------------------------------


def _same_tensors(a: Path, b: Path) -> None:
    ra, rb = SafetensorsReader(a), SafetensorsReader(b)
    assert ra.keys() == rb.keys()
    for name in ra:
        assert torch.equal(ra.get(name), rb.get(name)), name


@pytest.mark.parametrize("to", ["compressed-tensors", "gptq"])
@pytest.mark.parametrize("which", ["asymmetric", "symmetric"])
def test_convert_round_trips_are_tensor_identical(
    to, which, tiny_llama_awq, tiny_llama_awq_sym, tmp_path
) -> None:
    source = tiny_llama_awq if which == "asymmetric" else tiny_llama_awq_sym
    there = convert_checkpoint(source, tmp_path / "there", to)
    back = convert_checkpoint(there, tmp_path / "back", "autoawq")
    _same_tensors(source, back)
    original = json.loads((source / "config.json").read_text())["quantization_config"]
    assert json.loads((back / "config.json").read_text())["quantization_config"] == original
    scheme = read_scheme(json.loads((there / "config.json").read_text()))
    assert scheme.symmetric == (which == "symmetric") and scheme.group_size == 64
    if to == "gptq":  # v1 where it can hold the zero points, v2 where a zero point may be 0
        assert scheme.gptq_format == ("gptq" if which == "symmetric" else "gptq_v2")
    # The numbers, read through the other layout, are the source's.
    reader, src = SafetensorsReader(there), SafetensorsReader(source)
    prefix = "model.layers.1.self_attn.o_proj"
    theirs = read_linear(reader, prefix, scheme)
    ours = read_linear(src, prefix, read_scheme(json.loads((source / "config.json").read_text())))
    assert torch.equal(theirs.dequantize(), ours.dequantize())


def test_compressed_tensors_config_is_accepted_by_the_library_and_lists_the_head(
    tiny_llama_awq, tmp_path
) -> None:
    from compressed_tensors.quantization import QuantizationConfig

    out = convert_checkpoint(tiny_llama_awq, tmp_path / "ct", "compressed-tensors")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(config)
    weights = parsed.config_groups["group_0"].weights
    assert (weights.num_bits, weights.group_size, weights.symmetric) == (4, 64, False)
    assert "lm_head" in config["ignore"]


def test_convert_refuses_what_the_target_cannot_hold_and_writes_nothing(
    tiny_llama_awq, tiny_llama_fp, tmp_path
) -> None:
    model = load_fp_model(tiny_llama_fp, dtype=torch.float32)
    with torch.no_grad():  # one all-positive group: its zero point is 0
        model.model.layers[1].mlp.up_proj.weight[3, :64] = torch.linspace(0.1, 1.0, 64)
    source = write_packed_model(
        model, tmp_path / "awq-z0", AwqQuantConfig(bits=4, group_size=64), source_dir=tiny_llama_fp
    )
    v1 = tmp_path / "v1"
    with pytest.raises(CheckpointError, match=r"up_proj: a zero point of 0 .*nothing was written"):
        convert_checkpoint(source, v1, "gptq", gptq_format="gptq")
    assert not v1.exists() and not any(p.name.startswith(".v1") for p in tmp_path.iterdir())
    with pytest.raises(CheckpointError, match="--to must be one of"):
        convert_checkpoint(tiny_llama_awq, tmp_path / "x", "gguf")
    # A compressed-tensors source whose bf16 scales fp16 cannot hold (below fp16's normal range).
    ct = convert_checkpoint(tiny_llama_awq, tmp_path / "ct", "compressed-tensors")
    config = json.loads((ct / "config.json").read_text())
    config["torch_dtype"] = "bfloat16"
    (ct / "config.json").write_text(json.dumps(config))
    reader = SafetensorsReader(ct)
    tensors = {name: reader.get(name) for name in reader}
    name = "model.layers.0.mlp.down_proj.weight_scale"
    tensors[name] = (tensors[name].float() * 1e-4).to(torch.bfloat16)
    from safetensors.torch import save_file

    save_file(tensors, str(ct / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"down_proj.*not exactly representable in float16"):
        convert_checkpoint(ct, tmp_path / "awq", "autoawq")
    assert not (tmp_path / "awq").exists()


def test_convert_refuses_unsupported_schemes_naming_the_field(tiny_llama_awq, tmp_path) -> None:
    ct = convert_checkpoint(tiny_llama_awq, tmp_path / "ct", "compressed-tensors")
    config = json.loads((ct / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 8
    (ct / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config_groups\.group_0\.weights is 8-bit"):
        convert_checkpoint(ct, tmp_path / "out", "autoawq")
    config["quantization_config"] = {"quant_method": "fp8"}
    (ct / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quant_method is 'fp8'"):
        convert_checkpoint(ct, tmp_path / "out", "autoawq")


def test_convert_command(tiny_llama_awq, tmp_path, capsys) -> None:
    out = tmp_path / "gptq"
    assert cli_main(["convert", str(tiny_llama_awq), str(out), "--to", "gptq"]) == 0
    printed = capsys.readouterr().out
    assert (
        "autoawq (group 64, asymmetric) ->" in printed and "gptq (group 64, asymmetric, gptq_v2)" in printed
    )
    assert cli_main(["convert", str(tiny_llama_awq), str(out), "--to", "gptq"]) == 2  # exists, no --overwrite
    assert "already" in capsys.readouterr().err


def test_quantize_writes_the_other_layouts(tiny_llama_fp, tmp_path, capsys) -> None:
    """``quantize --format``: the same numbers as the AutoAWQ run, in the asked layout, and no
    staging folder left behind."""
    common = [str(tiny_llama_fp), "--method", "rtn", "--scheme", "uint4_wo_64", "--no-progress"]
    awq = tmp_path / "awq"
    assert cli_main(["quantize", common[0], str(awq), *common[1:]]) == 0
    ct = tmp_path / "ct"
    assert cli_main(["quantize", common[0], str(ct), *common[1:], "--format", "compressed-tensors"]) == 0
    assert "written in the compressed-tensors layout" in capsys.readouterr().out
    assert read_scheme(json.loads((ct / "config.json").read_text())).layout == "compressed-tensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["awq", "ct"]
    _same_tensors(awq, convert_checkpoint(ct, tmp_path / "back", "autoawq"))
