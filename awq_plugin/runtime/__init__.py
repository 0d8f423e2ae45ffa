"""Loading for inference: transformers skeletons and AWQ checkpoints (``modeling``), and the quantized
linear module that runs the kernels (``qlinear``)."""
