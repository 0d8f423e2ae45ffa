"""The README's quick starts, run as written, so the document cannot drift from the code.

Every fenced ``bash`` and ``python`` block under the headings in ``QUICK_STARTS``
runs here, in order, in a scratch folder that holds the default model at
``artifacts/models/smollm2-135m`` (where ``make demo`` writes it). Two
adjustments keep CI short and parallel-safe, and nothing else changes:
``awq-plugin quantize`` gets a small calibration appended (argparse keeps the
last value), and the server listens on a free port that replaces ``8000`` in
the client snippet.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from awq_plugin.tools.server import VllmServer

README = Path(__file__).resolve().parents[1] / "README.md"
QUICK_STARTS = ("Quick start: vLLM", "Quick start: transformers", "Python API")
SMALL_CALIBRATION = ["--n-samples", "8", "--seq-len", "128"]
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def readme_blocks(heading: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced block in the README section ``## heading``."""
    sections = re.split(r"^## ", README.read_text(), flags=re.MULTILINE)
    matches = [s for s in sections if s.startswith(heading + "\n")]
    assert len(matches) == 1, f"README has no single section '## {heading}'"
    return FENCE.findall(matches[0])


def shell_commands(code: str) -> list[list[str]]:
    return [shlex.split(line) for line in code.splitlines() if line.strip() and not line.startswith("#")]


def run_python(code: str, cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=900, env=_env()
    )
    assert result.returncode == 0, f"README snippet failed:\n{code}\n--- stderr ---\n{result.stderr[-4000:]}"
    return result.stdout


def _env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def test_every_quick_start_section_has_code() -> None:
    for heading in QUICK_STARTS:
        languages = {language for language, _ in readme_blocks(heading)}
        assert languages <= {"bash", "python"} and languages, heading


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("readme")
    (root / "artifacts" / "models").mkdir(parents=True)
    (root / "artifacts" / "models" / "smollm2-135m").symlink_to(default_model_dir)
    return root


def vllm_quick_start() -> tuple[list[str], list[str], str]:
    """The quantize command, the serve command and the client code of the vLLM quick start."""
    (shell_lang, shell), (python_lang, client_code) = readme_blocks("Quick start: vLLM")
    assert (shell_lang, python_lang) == ("bash", "python")
    quantize, serve = shell_commands(shell)
    assert quantize[:2] == ["awq-plugin", "quantize"] and serve[:2] == ["vllm", "serve"]
    return quantize, serve, client_code


def run_readme_quantize(workdir: Path) -> None:
    """The quick start's ``awq-plugin quantize`` line, once per scratch folder."""
    quantize, _, _ = vllm_quick_start()
    if not (workdir / quantize[3]).is_dir():
        subprocess.run([*quantize, *SMALL_CALIBRATION, "--no-progress"], cwd=workdir, env=_env(), check=True)


def test_vllm_quick_start(workdir: Path) -> None:
    _, serve, client_code = vllm_quick_start()
    run_readme_quantize(workdir)

    assert "127.0.0.1:8000" in client_code
    with VllmServer(serve[2], workdir / "vllm.log", serve[3:], cwd=workdir) as server:
        answer = run_python(client_code.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}"), workdir)
        log = server.log_text()
    assert answer.strip(), "the chat reply printed nothing"
    assert "awq-plugin: AwqPluginLinearMethod using kernel 'cpu'" in log


def test_transformers_quick_start(workdir: Path) -> None:
    pre_quantized, on_load = readme_blocks("Quick start: transformers")
    run_readme_quantize(workdir)  # the checkpoint this quick start loads
    text = run_python(pre_quantized[1], workdir)
    assert "The capital of France is" in text and len(text.split()) > 6

    run_python(on_load[1], workdir)
    saved = workdir / "artifacts/models/smollm2-awq-on-load"
    inspected = subprocess.run(
        ["awq-plugin", "inspect", str(saved)], cwd=workdir, env=_env(), capture_output=True, text=True
    )
    assert inspected.returncode == 0, inspected.stdout + inspected.stderr


def test_python_api_quick_start(workdir: Path) -> None:
    ((language, code),) = readme_blocks("Python API")
    assert language == "python"
    report = run_python(code, workdir)
    assert report.strip()
    checked = subprocess.run(
        ["awq-plugin", "inspect", "artifacts/models/smollm2-awq-api"], cwd=workdir, env=_env(), check=False
    )
    assert checked.returncode == 0
