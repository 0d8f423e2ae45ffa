"""The streaming quantizer: a source folder in, an AWQ checkpoint out, one decoder block in memory.

``quantize`` drives the run; ``blocks`` moves one block between the shards, memory and packed
tensors; ``workdir`` keeps the resumable state; ``assemble`` writes the checkpoint.
"""
