"""awq-plugin: Activation-aware Weight Quantization for vLLM and transformers.

Code map, in the order data flows (each imports only earlier ones, kernels/ only numerics and
fsutil; a test holds it)::

    config.py      the quantization config: one frozen object read from every dialect
    errors.py      the exceptions a user can cause (all AwqPluginError)
    fsutil.py      atomic writes, output-folder checks, the cache root ($AWQ_PLUGIN_CACHE)
    procmem.py     a process's resident memory, read from /proc
    numerics/      the one pure-PyTorch group quantizer (quant_ref) and the int32 bit layout (pack)
    models/        model surgery: fused MoE experts as one nn.Linear per expert
    calibration/   text -> token windows (text), settings and defaults (settings),
                   recorded block inputs and their statistics (capture, statistics)
    templates/     which module feeds which linears: schema, shipped JSON, resolver,
                   inference from data flow, the folds themselves and their numerical proof
    algorithm/     AWQ on plain torch modules: options, scale search, clip search, the
                   quantized linears, per-block step, MoE fallback, results as data
    format/        checkpoint tensors (packing) and files: safetensors I/O, config, validation
    kernels/       INT4 GEMM: CPU C++ and Triton, checked against numerics (awq_plugin.kernels)
    runtime/       loading for inference: skeletons, AwqLinear on the kernels
    pipeline/      the streaming, resumable quantizer: blocks, work dir, assembly
    evaluate.py    perplexity on fixed token windows
    api.py         the public Python surface (a thin shell over the stages)
    integrations/  vLLM and transformers hooks (installed as awq_plugin.integrations)
    tools/         benchmarks, soak test, demo, server launcher, synthetic models (the
                   ``tools`` extra); the core never imports them
    cli.py         the awq-plugin command line, a shell over the API and the tools

Importing this package is cheap: it builds no kernel and imports neither torch, vLLM nor
transformers. Heavy pieces load on first use.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any

from awq_plugin.config import AwqQuantConfig
from awq_plugin.errors import (
    AwqPluginError,
    CalibrationError,
    CheckpointError,
    ConfigError,
    OutputExistsError,
    TemplateError,
)

__version__ = "0.1.0"

__all__ = [
    "AwqConfig",
    "AwqPluginError",
    "AwqQuantConfig",
    "CalibrationError",
    "CheckpointError",
    "ConfigError",
    "OutputExistsError",
    "TemplateError",
    "__version__",
]


# ---- transformers integration, activated lazily -------------------------------------------------
# transformers finds quantizers only in the dicts of ``transformers.quantizers.auto`` (it has no
# entry points), so the plugin must put its "awq" quantizer there itself -- yet importing
# transformers here would make ``import awq_plugin`` slow. Python has no post-import hook, so a
# one-shot finder on sys.meta_path waits for that module (every ``from_pretrained`` imports it),
# lets the usual loader load it, then imports ``awq_plugin.integrations.transformers``, which
# activates itself on import. If transformers got there first, it is imported right away.
_HF_REGISTRY = "transformers.quantizers.auto"
_HF_INTEGRATION = "awq_plugin.integrations.transformers"


def _import_hf_integration() -> None:
    try:
        importlib.import_module(_HF_INTEGRATION)
    except Exception as exc:  # never break the user's transformers: keep its own "awq" and say why
        warnings.warn(f"awq_plugin: transformers integration not activated: {exc!r}", stacklevel=2)


class _ThenActivate(importlib.abc.Loader):
    """Runs a module's own loader, then imports the transformers integration."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        _import_hf_integration()

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... stay the real loader's
        return getattr(self.loader, name)


class _WaitForTransformers(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _HF_REGISTRY:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding us again
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenActivate(spec.loader)
        return spec


if _HF_REGISTRY in sys.modules:
    _import_hf_integration()
elif not any(isinstance(f, _WaitForTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _WaitForTransformers())


def __getattr__(name: str) -> Any:
    # ``from awq_plugin import AwqConfig`` imports transformers only when asked for.
    if name == "AwqConfig":
        return importlib.import_module(_HF_INTEGRATION).AwqConfig
    raise AttributeError(f"module 'awq_plugin' has no attribute {name!r}")
