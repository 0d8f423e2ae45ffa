#!/usr/bin/env bash
# A separate virtual environment with llm-compressor, the peer our quality table and format
# tests compare against. It pins other transformers and compressed-tensors versions than this
# project, so it never shares .venv. Idempotent (a stamp keyed on this file).
set -euo pipefail
cd "$(dirname "$0")/.."

PEER_VENV="$(realpath -m "${PEER_VENV:-.peer-venv}")"
PYTHON="${PYTHON:-python3}"
STAMP="$PEER_VENV/.peer-installed"
KEY="$(sha256sum scripts/setup_peer_env.sh | cut -c1-16)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$KEY" ]]; then
    exit 0
fi
echo "==> setting up $PEER_VENV (llm-compressor)"
[[ -x "$PEER_VENV/bin/python" ]] || "$PYTHON" -m venv "$PEER_VENV"
PIP=("$PEER_VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${PIP[@]}" "torch==2.13.0"  # the local CPU wheel, as in .venv
"${PIP[@]}" "llmcompressor==0.14.0.1" "transformers<=5.17.0"
# From / : in the repository root our kernels/ folder would shadow the hub's `kernels` package.
(cd / && "$PEER_VENV/bin/python" -c "import llmcompressor, compressed_tensors")
echo "$KEY" > "$STAMP"
echo "==> $PEER_VENV ready"
