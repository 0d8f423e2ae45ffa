"""Fuzzing the checkpoint reader: mutated headers, tensors and configs either load or raise our error.

Never a crash, a hang, or an exception of another type. The number of cases run
is printed (pytest -s) and recorded in the README.
"""

from __future__ import annotations

import json
import shutil
import signal
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from awq_plugin.errors import AwqPluginError
from awq_plugin.format.checkpoint import SafetensorsReader, validate_checkpoint

CASES = {"header": 0, "bytes": 0, "config": 0, "index": 0}
FUZZ_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module", autouse=True)
def report_case_counts():
    """After the module: print how many fuzz cases ran (for the README and the issue note)."""
    yield
    print(f"\nfuzz cases run: {CASES} (total {sum(CASES.values())})")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A small valid AWQ checkpoint (vocab 512, hidden 128): cheap to rewrite for every case."""
    from awq_plugin.config import AwqQuantConfig
    from awq_plugin.format.packing import write_packed_model
    from awq_plugin.tools import synthetic

    config = synthetic.make_config("tiny-llama", vocab_size=512, hidden_size=128, intermediate_size=256)
    model = synthetic.make_model(config, seed=0)
    out = tmp_path_factory.mktemp("fuzz") / "ckpt"
    write_packed_model(model, out, AwqQuantConfig(bits=4, group_size=64))
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def _write(folder: Path, files: dict[str, bytes]) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


class Hang(BaseException):
    """Raised by the alarm: a case ran longer than CASE_SECONDS (not caught as our error)."""


CASE_SECONDS = 30  # a valid case takes milliseconds; a hang ends the case, not the CI run


def _on_alarm(_signum: int, _frame: object) -> None:
    raise Hang(f"a fuzz case ran over {CASE_SECONDS} s: the reader hangs on it")


def _load_or_our_error(folder: Path) -> None:
    """The property: validation plus reading every tensor succeeds or raises AwqPluginError,
    within CASE_SECONDS."""
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(CASE_SECONDS)
    try:
        validate_checkpoint(folder, check_architecture=False)
        reader = SafetensorsReader(folder)
        for name in reader:
            reader.get(name)
    except AwqPluginError:
        pass
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@FUZZ_SETTINGS
@given(data=st.data())
def test_mutated_headers(tmp_path: Path, pristine: dict[str, bytes], data: st.DataObject) -> None:
    CASES["header"] += 1
    header, body = _split(pristine["model.safetensors"])
    names = sorted(k for k in header if k != "__metadata__")
    name = data.draw(st.sampled_from(names))
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "<entry>", "<drop>", "<metadata>"]))
    if field == "<entry>":
        header[name] = data.draw(JSON_VALUES)
    elif field == "<drop>":
        del header[name]
    elif field == "<metadata>":
        header["__metadata__"] = data.draw(JSON_VALUES)
    else:
        header[name][field] = data.draw(JSON_VALUES)
    files = dict(pristine, **{"model.safetensors": _join(header, body)})
    _load_or_our_error(_write(tmp_path / "ckpt", files))


@FUZZ_SETTINGS
@given(
    cut=st.integers(0, 4096),
    flips=st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), max_size=6),
    length_prefix=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)
def test_mutated_bytes(tmp_path: Path, pristine: dict[str, bytes], cut: int, flips, length_prefix) -> None:
    CASES["bytes"] += 1
    data = bytearray(pristine["model.safetensors"])
    for offset, value in flips:
        data[offset % len(data)] = value
    if length_prefix is not None:
        data[:8] = struct.pack("<Q", length_prefix)
    if cut:
        data = data[: max(0, len(data) - cut * 997)]
    files = dict(pristine, **{"model.safetensors": bytes(data)})
    _load_or_our_error(_write(tmp_path / "ckpt", files))


@FUZZ_SETTINGS
@given(
    key=st.sampled_from(["bits", "group_size", "zero_point", "version", "quant_method", "x"]),
    value=JSON_VALUES,
)
def test_mutated_quantization_config(tmp_path: Path, pristine: dict[str, bytes], key: str, value) -> None:
    CASES["config"] += 1
    config = json.loads(pristine["config.json"])
    config["quantization_config"][key] = value
    files = dict(pristine, **{"config.json": json.dumps(config).encode()})
    _load_or_our_error(_write(tmp_path / "ckpt", files))


@FUZZ_SETTINGS
@given(weight_map=JSON_VALUES, extra=st.dictionaries(st.text(max_size=10), st.text(max_size=12), max_size=3))
def test_mutated_index(tmp_path: Path, pristine: dict[str, bytes], weight_map, extra) -> None:
    CASES["index"] += 1
    index = {"metadata": {}, "weight_map": weight_map if not extra else {**extra}}
    files = dict(pristine)
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    _load_or_our_error(_write(tmp_path / "ckpt", files))
