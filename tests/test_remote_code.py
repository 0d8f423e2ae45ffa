"""Code shipped inside a checkpoint folder runs only when the user asks for it (issue #9).

A model folder whose config.json names an architecture transformers does not ship points
at Python files through ``auto_map``. Importing those files is running the checkpoint's
code. Here they are a real Llama subclass that also touches a marker file when imported:
without ``--trust-remote-code`` the quantizer and the loader refuse with an error naming the
option and the marker never appears; with it, the code runs and the model quantizes.
(Pickle files are covered in tests/test_checkpoint.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from awq_plugin.errors import CheckpointError
from awq_plugin.runtime import modeling
from awq_plugin.tools import synthetic

CLI = str(Path(sys.executable).parent / "awq-plugin")
FAST = ["--scheme", "uint4_wo_64", "--method", "rtn", "--n-samples", "2", "--seq-len", "32", "--threads", "1"]


def _custom_code_model(folder: Path, default_model_dir: Path, marker: Path) -> Path:
    config = synthetic.make_config("tiny-llama", num_hidden_layers=2, hidden_size=128, intermediate_size=256)
    synthetic.write_model(folder, synthetic.make_model(config, seed=0), default_model_dir)
    data = json.loads((folder / "config.json").read_text())
    data.update(
        model_type="marker_llama",
        architectures=["MarkerLlamaForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_marker.MarkerLlamaConfig",
            "AutoModelForCausalLM": "modeling_marker.MarkerLlamaForCausalLM",
        },
    )
    (folder / "config.json").write_text(json.dumps(data))
    (folder / "configuration_marker.py").write_text(
        "from pathlib import Path\n"
        "from transformers import LlamaConfig\n\n"
        f"Path({str(marker)!r}).touch()  # the checkpoint's code ran\n\n\n"
        "class MarkerLlamaConfig(LlamaConfig):\n"
        '    model_type = "marker_llama"\n'
    )
    (folder / "modeling_marker.py").write_text(
        "from transformers import LlamaForCausalLM\n\n"
        "from .configuration_marker import MarkerLlamaConfig\n\n\n"
        "class MarkerLlamaForCausalLM(LlamaForCausalLM):\n"
        "    config_class = MarkerLlamaConfig\n"
    )
    return folder


def test_checkpoint_code_runs_only_with_trust_remote_code(tmp_path: Path, default_model_dir: Path) -> None:
    marker = tmp_path / "code-ran"
    source = _custom_code_model(tmp_path / "custom", default_model_dir, marker)
    out = tmp_path / "out"

    refused = subprocess.run(
        [CLI, "quantize", str(source), str(out), *FAST], capture_output=True, text=True, cwd="/"
    )
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "'marker_llama' is not built into transformers" in refused.stderr
    assert "--trust-remote-code" in refused.stderr
    assert not marker.exists() and not out.exists()
    with pytest.raises(CheckpointError, match="trust_remote_code=True"):
        modeling.hf_config_from_dict(json.loads((source / "config.json").read_text()), folder=source)
    assert not marker.exists()

    # Asked for, the code runs (the marker appears) and the model quantizes with a named template.
    trusted = subprocess.run(
        [CLI, "quantize", str(source), str(out), *FAST, "--template", "llama", "--trust-remote-code"],
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert trusted.returncode == 0, trusted.stderr[-2000:]
    assert marker.exists()
    assert sorted(p.name for p in out.glob("*.py")) == ["configuration_marker.py", "modeling_marker.py"]

    # The quantized folder carries the same code: loading it is refused without the option too.
    marker.unlink()
    with pytest.raises(CheckpointError, match="--trust-remote-code"):
        modeling.load_awq_model(out, backend="reference")
    assert not marker.exists()
    model = modeling.load_awq_model(out, backend="reference", trust_remote_code=True)
    assert type(model).__name__ == "MarkerLlamaForCausalLM" and marker.exists()
