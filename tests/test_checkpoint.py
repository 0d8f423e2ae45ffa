"""Checkpoint writing, validation and loading: every bad case gives an error naming the problem."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from awq_plugin import modeling
from awq_plugin.checkpoint import SafetensorsReader, plan_shards, validate_checkpoint, write_sharded
from awq_plugin.cli import main
from awq_plugin.errors import CheckpointError, OutputExistsError

LAYER = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def ckpt(tmp_path: Path, tiny_llama_awq: Path) -> Path:
    """A private copy of the tiny AWQ checkpoint that a test may damage."""
    return Path(shutil.copytree(tiny_llama_awq, tmp_path / "ckpt"))


def _edit_tensors(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_written_checkpoint_is_valid_and_summarised(tiny_llama_awq: Path) -> None:
    summary = validate_checkpoint(tiny_llama_awq)
    assert summary.quantized_layers == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert summary.quant["bits"] == 4 and summary.quant["group_size"] == 64
    # Embeddings dominate this tiny model, so only the packed layers shrink by ~3.5x.
    assert summary.compression_ratio > 1.0
    assert 3.3 < summary.layer_compression_ratio < 4.0
    config = json.loads((tiny_llama_awq / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "awq"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tiny_llama_awq / name).is_file()
    assert not list(tiny_llama_awq.parent.glob(".*tmp*")), "staging directory left behind"


def test_inspect_cli(tiny_llama_awq: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tiny_llama_awq)]) == 0
    out = capsys.readouterr().out
    assert "uint4_wo_64" in out and "14 linear layers" in out and "smaller" in out
    assert main(["inspect", str(tiny_llama_awq), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["quantized_layers"] == 14 and data["layer_compression_ratio"] > 3.3


def _drop(name):
    return lambda t: t.pop(name)


def _set(name, value):
    def edit(t):
        t[name] = value

    return edit


BAD_TENSORS = {
    "missing qzeros": (_drop(f"{LAYER}.qzeros"), rf"tensor {LAYER}.qzeros is missing"),
    "missing dense tensor": (_drop("model.norm.weight"), r"tensor model.norm.weight .* is missing"),
    "qweight as float": (
        lambda t: t.__setitem__(f"{LAYER}.qweight", t[f"{LAYER}.qweight"].float()),
        rf"tensor {LAYER}.qweight has dtype F32, expected I32",
    ),
    "scales as bf16": (
        lambda t: t.__setitem__(f"{LAYER}.scales", t[f"{LAYER}.scales"].bfloat16()),
        rf"tensor {LAYER}.scales has dtype BF16, expected F16",
    ),
    "scales wrong shape": (
        lambda t: t.__setitem__(f"{LAYER}.scales", t[f"{LAYER}.scales"][:, :-8].contiguous()),
        rf"tensor {LAYER}.scales has shape \[4, 248\], expected \[4, 256\]",
    ),
    "qweight wrong K": (
        lambda t: t.__setitem__(f"{LAYER}.qweight", t[f"{LAYER}.qweight"][:-32].contiguous()),
        rf"layer {LAYER}: in_features K=224 is not divisible by group_size=64",
    ),
    "dense wrong shape": (
        lambda t: t.__setitem__("model.norm.weight", torch.ones(255, dtype=torch.float16)),
        r"tensor model.norm.weight has shape \[255\], the architecture expects \[256\]",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TENSORS))
def test_bad_tensors_are_named(ckpt: Path, case: str) -> None:
    edit, message = BAD_TENSORS[case]
    _edit_tensors(ckpt, edit)
    with pytest.raises(CheckpointError, match=message):
        validate_checkpoint(ckpt)
    assert main(["inspect", str(ckpt)]) == 1


BAD_CONFIGS = {
    "no quantization_config": (lambda c: c.pop("quantization_config"), r"has no 'quantization_config'"),
    "bits 3": (lambda c: c["quantization_config"].update(bits=3), r"'bits' = 3 cannot be packed"),
    "bits 5": (lambda c: c["quantization_config"].update(bits=5), r"'bits' = 5 is invalid"),
    "group 48": (lambda c: c["quantization_config"].update(group_size=48), r"'group_size' = 48 is invalid"),
    "gptq": (lambda c: c["quantization_config"].update(quant_method="gptq"), r"'quant_method' = 'gptq'"),
    "config group size disagrees with tensors": (
        lambda c: c["quantization_config"].update(group_size=128),
        r"qzeros has shape \[10, 32\], expected \[5, 32\] \(K=640, N=256, group_size=128\)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_configs_are_named(ckpt: Path, case: str) -> None:
    edit, message = BAD_CONFIGS[case]
    _edit_config(ckpt, edit)
    with pytest.raises(CheckpointError, match=message):
        validate_checkpoint(ckpt)


def test_malformed_config_json(ckpt: Path) -> None:
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        validate_checkpoint(ckpt)


def test_truncated_safetensors(ckpt: Path) -> None:
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        validate_checkpoint(ckpt)


def test_corrupted_header(ckpt: Path) -> None:
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"#" * 32  # inside the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        validate_checkpoint(ckpt)


def test_sharded_checkpoint_and_missing_shard(tmp_path: Path, tiny_llama_awq: Path) -> None:
    reader = SafetensorsReader(tiny_llama_awq)
    state = {name: reader.get(name) for name in reader}
    out = tmp_path / "sharded"
    out.mkdir()
    sizes = {k: v.numel() * v.element_size() for k, v in state.items()}
    names = write_sharded(out, state, lambda t, _n: t, sizes, max_shard_bytes=8 * 2**20)
    assert len(names) > 2 and (out / "model.safetensors.index.json").is_file()
    for side in ("config.json", "tokenizer.json"):
        shutil.copy(tiny_llama_awq / side, out / side)
    assert validate_checkpoint(out).quantized_layers == 14
    (out / names[1]).unlink()
    with pytest.raises(
        CheckpointError, match=f"shard {names[1]} is listed in model.safetensors.index.json but missing"
    ):
        validate_checkpoint(out)


def test_plan_shards_is_deterministic_and_bounded() -> None:
    sizes = {f"t{i:02d}": 10 for i in range(25)}
    shards = plan_shards(sizes, 35)
    assert [len(s) for s in shards] == [3] * 8 + [1]
    assert plan_shards(dict(reversed(sizes.items())), 35) == shards


def test_pickle_files_are_never_loaded(tmp_path: Path, tiny_llama_awq: Path) -> None:
    class Boom:
        def __reduce__(self):
            return (Path(tmp_path / "pwned").touch, ())

    folder = Path(shutil.copytree(tiny_llama_awq, tmp_path / "with_pickle"))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    validate_checkpoint(folder)
    modeling.load_awq_model(folder, backend="reference")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="pickle files are never loaded"):
        validate_checkpoint(folder)
    assert not (tmp_path / "pwned").exists()


def test_writer_refuses_existing_model_and_leaves_nothing(tmp_path: Path, tiny_llama_awq: Path) -> None:
    reader = SafetensorsReader(tiny_llama_awq)
    state = {name: reader.get(name) for name in reader}
    config = json.loads((tiny_llama_awq / "config.json").read_text())
    from awq_plugin.config import AwqQuantConfig

    quant = AwqQuantConfig(bits=4, group_size=64)
    with pytest.raises(OutputExistsError, match="already holds a model; pass --overwrite"):
        modeling.save_awq_checkpoint(tiny_llama_awq, state, config, quant)
    # A failure mid-write (here: validation of a broken state) leaves no output and no staging dir.
    broken = dict(state)
    broken.pop(f"{LAYER}.scales")
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="scales is missing"):
        modeling.save_awq_checkpoint(out, broken, config, quant)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_loaded_model_matches_dequantized_reference(tiny_llama_awq: Path, tiny_llama_fp: Path) -> None:
    model = modeling.load_awq_model(tiny_llama_awq, backend="reference")
    layer = model.get_submodule(LAYER)
    fp = modeling.load_fp_model(tiny_llama_fp)
    from awq_plugin import quant_ref

    expected = quant_ref.fake_quantize(fp.get_submodule(LAYER).weight.float(), 4, 64)
    assert torch.equal(layer.dequantized_weight(), expected)
