"""Quantize a model with llm-compressor (the peer), for the quality table and the format tests.

Runs in a separate environment that has ``llmcompressor`` installed (it pins other
transformers and compressed-tensors versions than this project's); it imports nothing
from ``awq_plugin``. The calibration token ids come from a file, so the peer calibrates on
exactly the windows our quantizer uses::

    PEER_PYTHON scripts/peer_llmcompressor.py MODEL_DIR IDS.json OUT_DIR \
        --recipe gptq|awq+gptq|awq|rtn --group-size 64 [--symmetric] [--dtype float16]

``IDS.json`` holds ``[[token ids], ...]`` (equal lengths). Writes a compressed-tensors
``pack-quantized`` folder to ``OUT_DIR`` and prints one JSON line with the recipe and the
seconds ``oneshot`` took.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("ids")
    p.add_argument("out")
    p.add_argument("--recipe", choices=["gptq", "awq+gptq", "awq", "rtn"], required=True)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--damping", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--dtype", default="float32", help="the model's dtype while quantized (scales are stored so)"
    )
    args = p.parse_args()

    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    if not torch.accelerator.is_available():
        # llm-compressor 0.14's AWQ pins its cached activations in host memory before each
        # smoothing search, which torch refuses without an accelerator ("Cannot access
        # accelerator device"). Pinning only speeds host-to-device copies; without a device
        # there are none, so it is skipped. Nothing else of the peer changes.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, batch_index: None
    with open(args.ids) as handle:
        ids = json.load(handle)
    dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]})
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(
            num_bits=4, type="int", symmetric=args.symmetric, strategy="group", group_size=args.group_size
        ),
    )
    groups = {"group_0": scheme}
    recipe: list = []
    if args.recipe in ("awq", "awq+gptq"):
        # AWQ's smoothing; with a following GPTQ it only scales (the rounding is GPTQ's).
        recipe.append(AWQModifier(config_groups=groups, ignore=["lm_head"]))
    if args.recipe in ("gptq", "awq+gptq"):
        recipe.append(GPTQModifier(config_groups=groups, ignore=["lm_head"], dampening_frac=args.damping))
    if args.recipe == "rtn":
        recipe.append(QuantizationModifier(config_groups=groups, ignore=["lm_head"]))

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    started = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe,
        max_seq_length=len(ids[0]),
        num_calibration_samples=len(ids),
        shuffle_calibration_samples=False,
    )
    seconds = time.perf_counter() - started
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    print(
        json.dumps(
            {
                "recipe": args.recipe,
                "group_size": args.group_size,
                "symmetric": args.symmetric,
                "seconds": round(seconds, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
