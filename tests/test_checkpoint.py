"""Checkpoint writing, validation and loading: every bad case gives an error naming the problem."""

from __future__ import annotations

import gc
import json
import pickle
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from awq_plugin.cli import main
from awq_plugin.errors import CheckpointError, OutputExistsError
from awq_plugin.format.checkpoint import (
    SafetensorsReader,
    TensorSpec,
    plan_shards,
    save_awq_checkpoint,
    validate_checkpoint,
    write_safetensors,
    write_sharded,
)
from awq_plugin.runtime import modeling

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
    "bits 3": (lambda c: c["quantization_config"].update(bits=3), r"'bits' = 3: bits=3 cannot be packed"),
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
    specs = {k: TensorSpec.of(v) for k, v in state.items()}
    names = write_sharded(out, state, lambda t, _n: t, specs, max_shard_bytes=8 * 2**20)
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


_WRITABLE_DTYPES = [
    torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2,
]  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.text(alphabet="abcxyz._0123456789é", min_size=1, max_size=12),
        st.tuples(st.sampled_from(_WRITABLE_DTYPES), st.lists(st.integers(0, 5), max_size=3)),
        max_size=8,
    ),
    st.booleans(),
)
def test_streamed_safetensors_are_the_librarys_bytes(tmp_path_factory, entries, with_metadata) -> None:
    """Our one-tensor-at-a-time writer produces exactly safetensors.torch.save's bytes."""
    from safetensors.torch import save

    tensors = {
        name: torch.arange(torch.Size(shape).numel(), dtype=torch.float64).reshape(shape).to(dtype)
        for name, (dtype, shape) in entries.items()
    }
    metadata = {"format": "pt"} if with_metadata else None
    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    write_safetensors(path, {n: TensorSpec.of(t) for n, t in tensors.items()}, tensors.__getitem__, metadata)
    assert path.read_bytes() == save(tensors, metadata=metadata)


def test_sharded_writer_holds_one_tensor_at_a_time(tmp_path: Path) -> None:
    """write_sharded loads each tensor only when it writes it and drops it before the next."""
    alive: weakref.WeakSet[torch.Tensor] = weakref.WeakSet()
    most_alive = 0

    def load(seed: int, _name: str) -> torch.Tensor:
        nonlocal most_alive
        gc.collect()
        tensor = torch.full((64, 32), float(seed))
        alive.add(tensor)
        most_alive = max(most_alive, len(alive))
        return tensor

    sources = {f"t{i:02d}": i for i in range(12)}
    specs = dict.fromkeys(sources, TensorSpec(torch.float32, (64, 32)))
    names = write_sharded(tmp_path, sources, load, specs, max_shard_bytes=3 * 64 * 32 * 4)
    assert len(names) == 4 and most_alive == 1
    back = {}
    for name in names:
        back.update(load_file(tmp_path / name))
    assert all(torch.equal(back[n], torch.full((64, 32), float(i))) for n, i in sources.items())


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("chunk_bytes", [1, 6, 64, 2**20])
def test_converting_read_matches_read_then_convert(tmp_path: Path, stored, chunk_bytes: int) -> None:
    """get(name, dtype) converts chunk by chunk (chunks not dividing the tensor included)."""
    tensors = {"w": torch.randn(37, 11).to(stored), "empty": torch.zeros(0, 3, dtype=stored)}
    save_file(tensors, tmp_path / "model.safetensors")
    reader = SafetensorsReader(tmp_path)
    for name, tensor in tensors.items():
        got = reader.get(name, torch.float32, chunk_bytes=chunk_bytes)
        assert got.dtype == torch.float32 and torch.equal(got, tensor.float())
        assert torch.equal(reader.get(name, stored, chunk_bytes=chunk_bytes), tensor)


def test_converting_read_names_a_truncated_file(tmp_path: Path) -> None:
    save_file({"w": torch.randn(64, 64).bfloat16()}, tmp_path / "model.safetensors")
    reader = SafetensorsReader(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])  # cut after the header was validated
    with pytest.raises(CheckpointError, match=r"tensor 'w' in .* is truncated \(8092 of 8192 bytes\)"):
        reader.get("w", torch.float32, chunk_bytes=1000)


def test_streamed_writer_refuses_a_tensor_unlike_its_spec(tmp_path: Path) -> None:
    spec = {"w": TensorSpec(torch.float16, (4, 4))}
    with pytest.raises(CheckpointError, match=r"tensor w is torch.float32 \[4, 4\]"):
        write_safetensors(tmp_path / "x.safetensors", spec, lambda _n: torch.zeros(4, 4))


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
        save_awq_checkpoint(tiny_llama_awq, state, config, quant)
    # A failure mid-write (here: validation of a broken state) leaves no output and no staging dir.
    broken = dict(state)
    broken.pop(f"{LAYER}.scales")
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="scales is missing"):
        save_awq_checkpoint(out, broken, config, quant)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_loaded_model_matches_dequantized_reference(tiny_llama_awq: Path, tiny_llama_fp: Path) -> None:
    model = modeling.load_awq_model(tiny_llama_awq, backend="reference")
    layer = model.get_submodule(LAYER)
    fp = modeling.load_fp_model(tiny_llama_fp)
    from awq_plugin.numerics import quant_ref

    expected = quant_ref.fake_quantize(fp.get_submodule(LAYER).weight.float(), 4, 64)
    assert torch.equal(layer.dequantized_weight(), expected)
