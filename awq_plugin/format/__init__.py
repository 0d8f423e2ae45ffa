"""The on-disk contract: checkpoint tensors (``packing``) and files (``checkpoint``: safetensors I/O,
``config.json``, validation), in the AutoAWQ GEMM layout vLLM and transformers read."""
