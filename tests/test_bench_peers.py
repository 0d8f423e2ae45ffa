"""``bench peers`` scores a peer's checkpoint by loading it into the full-precision model."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from awq_plugin.format.checkpoint import SafetensorsReader, read_json
from awq_plugin.format.convert import quantized_linears, read_linear, read_scheme
from awq_plugin.tools.bench_peers import load_dequantized


def _with_folded_norms(checkpoint: Path, out: Path) -> list[str]:
    """A copy of ``checkpoint`` whose norm weights are scaled, as AWQ's smoothing leaves them
    when it divides a norm by its scales (and multiplies the linears after it). Returns them."""
    shutil.copytree(checkpoint, out)
    changed = []
    for shard in sorted(out.glob("*.safetensors")):
        tensors = load_file(shard)
        for key, tensor in tensors.items():
            if key.endswith("norm.weight"):
                tensors[key] = tensor * torch.linspace(0.5, 2.0, tensor.numel()).to(tensor.dtype)
                changed.append(key)
        save_file(tensors, shard, metadata={"format": "pt"})
    return changed


def test_a_checkpoint_with_folded_norms_loads_whole(tiny_llama_fp, tiny_llama_awq, tmp_path) -> None:
    """Scoring a peer's dequantized linears with the base model's norms would score another
    model when the recipe folded scales into the norms (the llm-compressor AWQ+GPTQ row came
    out at perplexity 5.7 million that way). Every tensor the checkpoint holds lands in the
    model: the quantized linears dequantized, the rest as written."""
    checkpoint = tmp_path / "folded"
    changed = _with_folded_norms(tiny_llama_awq, checkpoint)
    assert changed
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_fp, dtype=torch.float32).eval()
    model = load_dequantized(base, checkpoint)
    reader = SafetensorsReader(checkpoint)
    scheme = read_scheme(read_json(checkpoint / "config.json"))
    names = set(quantized_linears(reader, scheme.layout))
    assert names
    state, original = model.state_dict(), base.state_dict()
    for key in reader:
        prefix = key.rsplit(".", 1)[0]
        if prefix in names:
            expected = read_linear(reader, prefix, scheme).dequantize(torch.float32)
            assert torch.equal(state[prefix + ".weight"], expected), prefix
        else:
            assert torch.equal(state[key], reader.get(key).float()), key
    for key in changed:
        assert not torch.equal(state[key], original[key]), key
        assert torch.equal(original[key], base.state_dict()[key]), key  # the base is left alone
