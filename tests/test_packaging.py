"""Packaging: entry points come from entry_points.toml, the console script runs, imports stay cheap,
and the module graph flows one way (core -> kernels/integrations never the reverse)."""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_installed_entry_points_equal_entry_points_toml() -> None:
    declared = tomllib.loads((REPO / "entry_points.toml").read_text())
    dist = importlib.metadata.distribution("awq-plugin")
    installed: dict[str, dict[str, str]] = {}
    for ep in dist.entry_points:
        installed.setdefault(ep.group, {})[ep.name] = ep.value
    assert installed == declared


def test_vllm_plugin_entry_point_is_named_awq() -> None:
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    ours = [ep for ep in eps if ep.value.startswith("awq_plugin.")]
    assert [ep.name for ep in ours] == ["awq"]


def test_console_script_help() -> None:
    exe = Path(sys.executable).parent / "awq-plugin"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("default-model", "inspect"):
        assert command in out


def test_console_script_default_model_is_idempotent(default_model_dir: Path) -> None:
    exe = Path(sys.executable).parent / "awq-plugin"
    before = (default_model_dir / "model.safetensors").stat().st_mtime_ns
    out = subprocess.run([str(exe), "default-model", str(default_model_dir)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (default_model_dir / "model.safetensors").stat().st_mtime_ns == before  # reused, not rewritten
    config = (default_model_dir / "config.json").read_text()
    assert '"LlamaForCausalLM"' in config and '"num_hidden_layers": 30' in config
    assert (default_model_dir / "chat_template.jinja").is_file()


def test_import_is_cheap() -> None:
    code = (
        "import sys, awq_plugin; "
        "heavy = [m for m in ('vllm', 'transformers', 'awq_plugin.kernels', 'triton') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "", f"importing awq_plugin pulled in: {out.stdout.strip()}"


def _imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


ALGORITHM = {
    "awq_plugin.algorithm.awq",
    "awq_plugin.algorithm.search",
    "awq_plugin.algorithm.scale",
    "awq_plugin.algorithm.clip",
    "awq_plugin.calibration.capture",
}


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        # The core never imports vLLM nor the integrations.
        ("awq_plugin", ("vllm", "awq_plugin.integrations")),
        # Kernels never import the algorithm, vLLM or the integrations.
        ("kernels", ("vllm", "awq_plugin.integrations", *sorted(ALGORITHM))),
    ],
)
def test_import_edges(folder: str, forbidden: tuple[str, ...]) -> None:
    offenders = []
    for path in sorted((REPO / folder).rglob("*.py")):
        if path.name.startswith("bench"):
            continue  # benchmarks time vLLM's kernels as peers: they may import it
        for module in _imports_of(path):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                offenders.append(f"{path.relative_to(REPO)} imports {module}")
    assert not offenders, offenders
