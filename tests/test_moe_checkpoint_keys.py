"""MoE checkpoints saved per expert while the model holds its experts fused (issue 16).

transformers 5 builds GLM-4-MoE, FlexOlmo, ERNIE 4.5 MoE, Qwen3.5-MoE, ... with fused
expert parameters (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj``
[E, H, I]) but ``save_pretrained`` writes one tensor per expert and projection; its
``from_pretrained`` stacks them back. The streaming reader must do the same.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from awq_plugin.format.checkpoint import SafetensorsReader
from awq_plugin.runtime.checkpoint_keys import renamed_reader
from awq_plugin.tools.bench_architectures import _shrink


def _tiny(model_type: str, folder: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny random model saved to ``folder``: (its meta-device skeleton, the model from_pretrained loads)."""
    config = AutoConfig.for_model(model_type)
    _shrink(config)
    config.num_hidden_layers = 1
    for key in ("first_k_dense_replace", "mlp_only_layers"):  # layer 0 must hold experts
        if hasattr(config, key):
            setattr(config, key, 0 if key == "first_k_dense_replace" else [])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return skeleton, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


@pytest.mark.parametrize("model_type", ["glm4_moe", "flex_olmo"])
def test_fused_experts_are_assembled_from_per_expert_tensors(tmp_path: Path, model_type: str) -> None:
    skeleton, loaded = _tiny(model_type, tmp_path)
    raw = SafetensorsReader(tmp_path)
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in raw  # per expert on disk
    assert "model.layers.0.mlp.experts.gate_up_proj" not in raw
    reader = renamed_reader(raw, skeleton)
    state = loaded.state_dict()
    assert set(reader.keys()) == set(state) - (
        {"lm_head.weight"} if loaded.config.tie_word_embeddings else set()
    )
    for leaf in ("gate_up_proj", "down_proj"):
        name = f"model.layers.0.mlp.experts.{leaf}"
        assert name in reader
        assert tuple(reader.get_slice_shape(name)) == tuple(state[name].shape)
        assert reader.get_spec(name).shape == tuple(state[name].shape)
        assert reader.get_dtype(name) == raw.get_dtype("model.layers.0.mlp.experts.0.down_proj.weight")
        assert torch.equal(reader.get(name, torch.float32), state[name])  # what from_pretrained loads
        assert reader.get(name, torch.float16).dtype == torch.float16
    assert reader.shard_of("model.layers.0.mlp.experts.down_proj") == raw.shard_of(
        "model.layers.0.mlp.experts.0.down_proj.weight"
    )


def test_an_unfused_model_reads_the_per_expert_tensors(tmp_path: Path) -> None:
    """A shipped template unfuses Qwen3-MoE experts into per-expert linears named as stored:
    the reader then lists the stored tensors, not the fused ones."""
    from awq_plugin.templates import unfuse_experts_for_loading

    skeleton, loaded = _tiny("qwen3_moe", tmp_path)
    raw = SafetensorsReader(tmp_path)
    reader = renamed_reader(raw, skeleton)
    assert "model.layers.0.mlp.experts.gate_up_proj" in reader
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" not in reader
    assert unfuse_experts_for_loading(skeleton) is not None
    assert "model.layers.0.mlp.experts.gate_up_proj" not in reader
    assert set(reader.keys()) == set(raw.keys())
    name = "model.layers.0.mlp.experts.1.up_proj.weight"
    inter = loaded.config.moe_intermediate_size
    assert torch.equal(reader.get(name), loaded.model.layers[0].mlp.experts.gate_up_proj[1, inter:])


def test_glm4_moe_goes_folder_to_quantize_inspect_reload(tmp_path: Path) -> None:
    from awq_plugin.tools.bench_architectures import run_one

    row = run_one("glm4_moe", "causal-lm", tmp_path)
    assert row["ok"], row
    assert row["step"] == "done"
