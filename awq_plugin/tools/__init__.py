"""Tooling, not library: benchmarks, the soak test, the demo, the vLLM server launcher and synthetic
models. Installed with the ``tools`` extra; nothing in the core imports this package."""
