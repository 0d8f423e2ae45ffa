"""Random-weight models of any architecture, built from a transformers config.

Right for kernels, formats, loading, serving and speed; wrong for quality. Each
preset is plain data: a model_type and the config fields that shape it.

Two ways to get one on disk: :func:`make_model` + :func:`write_model` builds the
model in memory (small models, tests); :func:`write_random_checkpoint` streams a
checkpoint of any size tensor by tensor, never holding the model in memory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from awq_plugin.fsutil import atomic_output_dir

PRESETS: dict[str, dict[str, Any]] = {
    # Small enough for unit tests; hidden and intermediate are multiples of 64.
    "tiny-llama": dict(
        model_type="llama",
        hidden_size=256,
        intermediate_size=640,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=49152,  # the default model's tokenizer
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    ),
    # Deep and narrow, for the larger-than-memory benchmark: 56 blocks of 44M weights (4.97 GiB
    # in bf16 with the embeddings) while one block is only 176 MiB in fp32. 2.67B parameters;
    # the default model's vocabulary, so its tokenizer fits.
    "llama-2.7b-deep": dict(
        model_type="llama",
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=56,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=49152,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
    # A wide mixture of experts (OLMoE's layout, transformers keeps the experts fused): 64
    # experts per block, 8 routed per token. One block's experts are 25M weights (100 MiB in
    # fp32); the quantizer's peak must not grow with the number of such blocks.
    "olmoe-64x": dict(
        model_type="olmoe",
        hidden_size=512,
        intermediate_size=256,
        num_hidden_layers=16,
        num_attention_heads=8,
        num_key_value_heads=8,
        num_experts=64,
        num_experts_per_tok=8,
        vocab_size=49152,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
    # The TinyLlama-1.1B shape: weights (2.2 GB in bf16) far exceed the 260 MiB L3.
    "llama-1.1b": dict(
        model_type="llama",
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
}


def make_config(preset: str | dict[str, Any], **overrides: Any) -> Any:
    """A transformers config from a preset name (or a dict of fields) plus overrides."""
    from transformers import AutoConfig

    fields = dict(PRESETS[preset]) if isinstance(preset, str) else dict(preset)
    fields.update(overrides)
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


def make_model(
    config: Any, seed: int = 0, weight_std: float | None = None, logit_gain: float = 1.0
) -> torch.nn.Module:
    """A model with seeded random weights.

    ``weight_std`` rescales every Linear/Embedding weight to that std: at the
    usual 0.02 a tiny random model's logits are nearly uniform, so greedy tokens
    would hinge on rounding; a larger std gives decisive top-1 choices.
    ``logit_gain`` further multiplies the output head, widening top-1 margins.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if weight_std is not None:
        generator = torch.Generator().manual_seed(seed)
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                fan_in = module.weight.shape[1] if isinstance(module, torch.nn.Linear) else 1
                std = weight_std if isinstance(module, torch.nn.Embedding) else weight_std / fan_in**0.5
                module.weight.data = torch.randn(module.weight.shape, generator=generator) * std
    head = model.get_output_embeddings()
    if logit_gain != 1.0 and head is not None and not getattr(config, "tie_word_embeddings", False):
        head.weight.data *= logit_gain
    return model.eval()


def write_model(
    out_dir: str | Path,
    model: torch.nn.Module,
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float16,
    overwrite: bool = True,
) -> Path:
    """Save ``model`` (in ``dtype``) and, if given, the tokenizer files of ``tokenizer_dir``."""
    from awq_plugin.format.checkpoint import copy_side_files

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_dir(out, overwrite=overwrite) as staging:
        model.to(dtype).save_pretrained(staging)
        if tokenizer_dir is not None:
            copy_side_files(Path(tokenizer_dir), staging)
            (staging / "generation_config.json").unlink(missing_ok=True)
            model.generation_config.save_pretrained(staging)
    return out


def _meta_model(config: Any) -> torch.nn.Module:
    """The model of ``config`` with every tensor on the meta device (shapes only, no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def parameter_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape for ``config``; a tied output head appears once, as the embedding."""
    return {name: tuple(p.shape) for name, p in _meta_model(config).named_parameters()}


def random_tensor(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int, std: float
) -> torch.Tensor:
    """The seeded random value of one parameter: the same for a name and seed in any run or order.

    Matrices are N(0, std^2) (transformers' own initialisation of Llama-like
    models); vectors (norm weights) are ones and biases zeros.
    """
    if len(shape) == 1:
        return torch.zeros(shape, dtype=dtype) if name.endswith(".bias") else torch.ones(shape, dtype=dtype)
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return torch.randn(shape, generator=generator, dtype=dtype).mul_(std)


def checkpoint_bytes(config: Any, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the weights a checkpoint of ``config`` holds in ``dtype``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(itemsize * torch.Size(shape).numel() for shape in parameter_shapes(config).values())


def write_random_checkpoint(
    out_dir: str | Path,
    config: Any,
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    max_shard_bytes: int | None = None,
    overwrite: bool = True,
) -> Path:
    """Write a random-weight checkpoint of ``config`` tensor by tensor, atomically.

    Shapes come from a skeleton on the meta device and each tensor is drawn,
    written and dropped in turn, so memory holds one tensor (the largest is the
    embedding) whatever the model's size. Shards, index and config.json follow
    ``save_pretrained``'s layout; the tokenizer files of ``tokenizer_dir`` are
    copied. Deterministic: the same config and seed give the same bytes.
    """
    from transformers import GenerationConfig

    from awq_plugin.format.checkpoint import DEFAULT_SHARD_BYTES, TensorSpec, copy_side_files, write_sharded

    skeleton = _meta_model(config)
    shapes = {name: tuple(p.shape) for name, p in skeleton.named_parameters()}
    specs = {name: TensorSpec(dtype, shape) for name, shape in shapes.items()}
    std = float(getattr(config, "initializer_range", 0.02))
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_dir(out, overwrite=overwrite) as staging:
        write_sharded(
            staging,
            shapes,
            lambda shape, name: random_tensor(name, shape, dtype, seed, std),
            specs,
            max_shard_bytes or DEFAULT_SHARD_BYTES,
        )
        if tokenizer_dir is not None:
            copy_side_files(Path(tokenizer_dir), staging)
        config = config.__class__.from_dict(config.to_dict())  # a copy we may annotate
        config.architectures = config.architectures or [type(skeleton).__name__]
        config.dtype = dtype
        config.save_pretrained(staging)
        GenerationConfig.from_model_config(config).save_pretrained(staging)
    return out
