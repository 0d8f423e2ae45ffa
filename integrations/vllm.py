"""vLLM integration: serve AWQ checkpoints with this package's config, linear method and kernels.

How a checkpoint reaches our code
---------------------------------
vLLM calls :func:`register` (the ``vllm.general_plugins`` entry point ``awq``) in every
process it starts. ``register`` adds :class:`AwqPluginConfig` through vLLM's public
``register_quantization_config`` under our own name ``awq_plugin`` and under the three
built-in AWQ names (see :data:`BUILTIN_AWQ_NAMES`). Then both ways of starting a server
end in our config:

- ``vllm serve DIR`` (``quant_method: "awq"`` in config.json) and
  ``vllm serve DIR --quantization awq``: vLLM asks every config's
  ``override_quantization_method`` which method owns the checkpoint, custom configs
  first. Ours claims every AWQ checkpoint and answers ``awq_plugin``. Without it vLLM's
  ``AutoAWQConfig`` would answer ``auto_awq`` on GPUs, and on CPU no override fires and the
  checkpoint's own name ``awq`` is used.
- Routes that look a config up by a built-in name without asking the overrides (for
  instance ``--quantization awq`` on a checkpoint whose AWQ settings live only in
  ``quant_config.json``) find our class because it is registered under those names too.

``--quantization awq`` on a full-precision folder quantizes it first, once, into the
checkpoint cache (:mod:`awq_plugin.pipeline.cache`), and serves that: see
:func:`quantize_on_start`.

With ``VLLM_PLUGINS=""`` the entry point is not loaded, nothing of this package is
imported, and vLLM's built-in AWQ path runs: that is how the two are compared.

Laziness
--------
Importing this module imports nothing from vLLM or from our kernels: vLLM loads general
plugins early in each process, before it needs its layer modules. The vLLM-facing classes
:class:`AwqPluginConfig` and :class:`AwqPluginLinearMethod` are assembled on first access
(a module ``__getattr__``, PEP 562) from the plain classes :class:`_ConfigImpl` and
:class:`_LinearMethodImpl`, which hold all the logic, and vLLM's base classes. They keep
importable names, so vLLM can pickle the config into its engine process.

Mixture of experts
------------------
vLLM gives every MoE layer's routed experts to ``get_quant_method`` as one
``RoutedExperts`` module, loading the checkpoint's per-expert tensors
(``experts.E.w1.qweight`` ...) into stacked ``w13_*`` / ``w2_*`` parameters. On CPU
:class:`AwqPluginMoEMethod` keeps them in the AutoAWQ layout (per expert: gate and up
side by side in ``w13``), repacks each expert once for our kernel and, per forward,
runs :func:`awq_moe_forward`: for each expert that received tokens, our INT4 GEMM on
its tokens, the gated activation, the down GEMM, weighted by the router (on CPUs without
AVX-512 VNNI, the same with the pure-PyTorch reference: vLLM 0.32's own CPU AWQ MoE
kernel needs AMX). Expert biases (gpt-oss) are added inside each expert; the activation is
the one the model gives vLLM (:func:`moe_activation`: SiLU, optionally clamped, gpt-oss's
interleaved ``swigluoai``, ...). gpt-oss's loader hands over whole stacked tensors named like
our parameters (``experts.w13_qweight``), which our parameters' loader takes as well. A MoE
layer that ``modules_to_not_convert`` names (or names all of whose experts) gets vLLM's
unquantized fused-MoE method (:func:`moe_layer_kept_full_precision`). On CUDA and ROCm the
experts go to vLLM's own AWQ MoE method (Marlin MoE, or its WNA16 MoE kernels), which reads
the same per-expert tensors; that route is written to vLLM's API but was not run here (no
GPU), and it has neither our stacked-tensor loader (gpt-oss) nor the activations above.

Kernel choice
-------------
:func:`choose_kernel` is a pure function of the platform, ``AWQ_PLUGIN_KERNEL`` and two
capability flags; see its docstring. Only the CPU branches run on the machines this
project is tested on; the CUDA/ROCm branches are written to the vLLM APIs and kept short.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from awq_plugin.config import AwqQuantConfig
from awq_plugin.errors import ConfigError

# In vLLM, AWQ_PLUGIN_KERNEL also accepts ``marlin``.
from awq_plugin.kernels import AMX_MIN_ROWS, KERNEL_ENV, kernel_name
from awq_plugin.kernels import amx_ready as _amx_ready_here
from awq_plugin.numerics import PER_CHANNEL, effective_group_size
from awq_plugin.numerics.pack import PACK_FACTOR

if TYPE_CHECKING:
    import torch

#: The name vLLM shows for our method (``ModelConfig.quantization``).
PLUGIN_QUANT_NAME = "awq_plugin"
#: vLLM's own names for AWQ checkpoints. We register our config under them as well, which
#: replaces vLLM's ``AutoAWQConfig`` for them in this process: that is the point, every
#: route vLLM takes for an AWQ checkpoint must end in our config. ``VLLM_PLUGINS=""``
#: restores the built-in behaviour.
BUILTIN_AWQ_NAMES = ("awq", "awq_marlin", "auto_awq")
#: ``--quantization`` values we accept for an AWQ checkpoint (None: not given).
_CLAIMABLE_USER_QUANT = (None, PLUGIN_QUANT_NAME, "marlin", *BUILTIN_AWQ_NAMES)

#: ``marlin`` means vLLM's own AWQ linear method, whose ``choose_mp_linear_kernel`` picks
#: Marlin on CUDA GPUs that support it (and its CPU/XPU WNA16 kernels elsewhere).
KERNELS = ("cpu", "amx", "avx2", "portable", "triton", "marlin", "reference")
_CPU_KERNELS = ("cpu", "amx", "avx2", "portable")  # ours, for CPU tensors (see awq_plugin.kernels)
_GPU_PLATFORMS = ("cuda", "rocm")


log = logging.getLogger("vllm.awq_plugin")  # a child of vLLM's logger: shows in server logs


# ---------------------------------------------------------------------------------------------
# Pure helpers (no vLLM)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelChoice:
    """Which kernel runs the quantized linears of this process, and why."""

    kernel: str  # one of KERNELS
    reason: str


def choose_kernel(
    platform: str,
    env_value: str | None,
    *,
    cpu_kernel_ok: bool,
    marlin_ok: bool,
    cpu_fallback: KernelChoice | None = None,
    amx_ready: bool = False,
) -> KernelChoice:
    """Pick the kernel for one layer: a pure function of its inputs (tested per case).

    ``platform``: ``"cpu"``, ``"cuda"``, ``"rocm"`` or another vLLM device type.
    ``env_value``: ``AWQ_PLUGIN_KERNEL`` (``None``, ``""`` and ``"auto"`` mean auto).
    ``cpu_kernel_ok``: our AVX-512 VNNI kernel runs on this CPU.
    ``marlin_ok``: vLLM's Marlin supports this GPU, quant type, group size and layer shape.
    ``cpu_fallback``: our kernel for a CPU without AVX-512 VNNI (``avx2`` or ``portable``, with
    the reason ``awq_plugin.kernels.auto_cpu_choice`` gives), or None where none runs.
    ``amx_ready``: our kernel's AMX path runs here (named in the reason).

    Auto: CPU -> ``cpu``, else ``cpu_fallback``, else vLLM's own ``marlin`` route; CUDA/ROCm ->
    ``marlin`` where supported, else our ``triton``; other platforms -> vLLM's own route. A
    forced value must suit the platform.
    """
    wanted = kernel_name(env_value)
    if wanted is not None:
        if wanted not in KERNELS:
            raise ValueError(f"{KERNEL_ENV}={env_value!r} is not one of auto, {', '.join(KERNELS)}")
        if wanted in _CPU_KERNELS and platform != "cpu":
            raise ValueError(f"{KERNEL_ENV}={wanted} needs the CPU platform; this is {platform!r}")
        if wanted == "triton" and platform not in _GPU_PLATFORMS:
            raise ValueError(f"{KERNEL_ENV}=triton needs a CUDA or ROCm GPU; this is {platform!r}")
        return KernelChoice(wanted, f"forced by {KERNEL_ENV}")
    if platform == "cpu":
        if cpu_kernel_ok and amx_ready:
            return KernelChoice(
                "cpu",
                f"CPU with AVX-512 VNNI and AMX-INT8: the awq-plugin C++ kernel, on the AMX tiles "
                f"from {AMX_MIN_ROWS} rows",
            )
        if cpu_kernel_ok:
            return KernelChoice("cpu", "CPU with AVX-512 VNNI: the awq-plugin C++ kernel")
        if cpu_fallback is not None:
            return cpu_fallback
        return KernelChoice("marlin", "CPU without AVX-512 VNNI: vLLM's own WNA16 CPU kernel")
    if platform in _GPU_PLATFORMS:
        if marlin_ok:
            return KernelChoice("marlin", f"{platform}: vLLM's Marlin supports this GPU and layer")
        return KernelChoice("triton", f"{platform}: Marlin unsupported here, the awq-plugin Triton kernel")
    return KernelChoice("marlin", f"{platform}: vLLM's own mixed-precision kernel selection")


@dataclass(frozen=True)
class AwqShardShapes:
    """Shapes of one rank's AWQ tensors for a (possibly merged, possibly sharded) linear."""

    qweight: tuple[int, int]  # int32 (K_part, N_part / 8)
    qzeros: tuple[int, int]  # int32 (K_part / G, N_part / 8)
    scales: tuple[int, int]  # fp16  (K_part / G, N_part)
    group_size: int  # G, with per-channel (-1) resolved to the full K


def awq_shard_shapes(
    layer_name: str,
    input_size: int,
    input_size_per_partition: int,
    output_partition_sizes: list[int],
    group_size: int,
) -> AwqShardShapes:
    """The AWQ tensor shapes of one tensor-parallel shard, or a clear error naming the layer.

    Column-parallel shards split N: each logical output (q/k/v, gate/up) must stay a
    multiple of 8 to keep whole int32 words. Row-parallel shards split K: each shard must
    hold whole quantization groups, or one group's scale and zero would serve two ranks.
    """
    g = effective_group_size(group_size, input_size)
    if input_size % g != 0:
        raise ValueError(
            f"AWQ layer '{layer_name}': input size {input_size} is not a multiple of the group size {g}"
        )
    if input_size_per_partition % g != 0:
        raise ValueError(
            f"AWQ layer '{layer_name}': tensor parallelism gives each rank {input_size_per_partition} "
            f"of its {input_size} input channels, which splits a quantization group of {g} "
            f"({input_size // g} groups in all). Use a tensor-parallel size that divides the "
            "group count, or a checkpoint with a smaller group size."
        )
    for size in output_partition_sizes:
        if size % PACK_FACTOR != 0:
            raise ValueError(
                f"AWQ layer '{layer_name}': an output shard of {size} channels is not a multiple of "
                f"{PACK_FACTOR}, so it cannot hold whole packed int32 words (output partitions "
                f"{output_partition_sizes}); use a smaller tensor-parallel size"
            )
    n = sum(output_partition_sizes)
    groups = input_size_per_partition // g
    return AwqShardShapes(
        qweight=(input_size_per_partition, n // PACK_FACTOR),
        qzeros=(groups, n // PACK_FACTOR),
        scales=(groups, n),
        group_size=g,
    )


#: Model types whose vLLM 0.32 loader reorders the q/k output channels of *unquantized and
#: compressed-tensors* weights for its rotary convention (``Llama4ForCausalLM.
#: permute_qk_weight_for_rotary``: names ending ``weight``, ``weight_packed``, ``weight_scale``).
#: AWQ's ``qweight``/``qzeros``/``scales`` pass unpermuted, so our linear method applies the same
#: order itself after loading (see :func:`rotary_pair_order`).
ROTARY_PERMUTED_QK_MODEL_TYPES = ("llama4", "llama4_text")


def rotary_pair_order(n_heads: int, head_size: int) -> list[int]:
    """The output channels vLLM's Llama 4 loader puts where: ``new[i] = old[order[i]]``.

    Within each head, Meta's checkpoints store rotary pairs interleaved (0, 1 = pair 0; 2, 3 =
    pair 1; ...); vLLM's rotary reads them as halves, so each head's even channels come first,
    then its odd ones: head h, half a, pair b takes old channel ``h * D + 2 * b + a``.
    """
    half = head_size // 2
    return [h * head_size + 2 * b + a for h in range(n_heads) for a in (0, 1) for b in range(half)]


def permute_awq_output_channels(
    qweight: Any, qzeros: Any, scales: Any, order: list[int]
) -> tuple[Any, Any, Any]:
    """AWQ tensors of the same linear with its output channels (N) in ``order`` (``new = old[order]``).

    ``qweight`` int32 ``[K, N/8]``, ``qzeros`` int32 ``[K/G, N/8]``, ``scales`` ``[K/G, N]``;
    the packed ones are unpacked to ``[*, N]`` nibbles, reordered and packed again (exact).
    """
    import torch

    from awq_plugin.numerics.pack import pack_int4_columns, unpack_int4_columns

    index = torch.tensor(order, dtype=torch.long, device=scales.device)
    if index.numel() != scales.shape[-1]:
        raise ValueError(f"an order of {index.numel()} output channels for a layer with {scales.shape[-1]}")
    return (
        pack_int4_columns(unpack_int4_columns(qweight)[:, index]),  # (K, N/8)
        pack_int4_columns(unpack_int4_columns(qzeros)[:, index]),  # (K/G, N/8)
        scales[:, index],  # (K/G, N)
    )


def qkv_rotary_order(num_heads: int, num_kv_heads: int, head_size: int, v_size: int) -> list[int]:
    """:func:`rotary_pair_order` over one rank's merged q, k, v outputs (v keeps its order)."""
    q, k = num_heads * head_size, num_kv_heads * head_size
    return (
        rotary_pair_order(num_heads, head_size)
        + [q + i for i in rotary_pair_order(num_kv_heads, head_size)]
        + list(range(q + k, q + k + v_size))
    )


def read_awq_config(raw: dict[str, Any]) -> AwqQuantConfig:
    """Our config from a checkpoint's quantization config, refusing what we cannot serve."""
    try:
        quant = AwqQuantConfig.from_dict(raw, strict=False)
        quant.check_packable()  # 4-bit, GEMM layout: the only ones our kernels read
    except ConfigError as exc:
        raise ValueError(f"awq-plugin cannot serve this checkpoint: {exc}") from None
    if raw.get("lm_head"):
        raise ValueError("awq-plugin cannot serve this checkpoint: a quantized lm_head is not supported")
    return quant


def map_module_patterns(mapper: Any, patterns: list[str]) -> list[str]:
    """``modules_to_not_convert`` under the names a vLLM model gives its modules.

    vLLM's ``WeightsMapper`` renames *weight* names (``model.visual.blocks.0.attn.qkv.weight``);
    a pattern is a module name, often a subtree (``model.visual``). Mapped as it is, a subtree
    without its trailing dot misses its own rule (``"model.visual."`` -> ``"visual."``) and falls
    to a shorter one (``"model."`` -> ``"language_model.model."``), giving
    ``language_model.model.visual``, which matches nothing. So each pattern is mapped as a
    module prefix (with a dot) and the dot it did not have is taken off again; a pattern the
    mapper drops (a weight vLLM ignores) keeps its plain mapping, or itself.
    """
    out: list[str] = []
    for pattern in patterns:
        dotted = pattern if pattern.endswith(".") else pattern + "."
        mapped = mapper.apply_list([dotted])
        if mapped:
            name = mapped[0] if pattern.endswith(".") else mapped[0].removesuffix(".")
        else:
            plain = mapper.apply_list([pattern])
            name = plain[0] if plain else pattern
        if name and name not in out:
            out.append(name)
    return out


def moe_layer_kept_full_precision(prefix: str, patterns: list[str], num_experts: int) -> bool:
    """Whether the MoE layer ``prefix`` (``model.layers.3.mlp.experts``) is listed in
    ``modules_to_not_convert``, so its experts load and run in full precision.

    Listed means: a pattern inside the layer's name (the substring rule of
    :meth:`~awq_plugin.config.AwqQuantConfig.skips_module`, e.g. ``mlp.experts`` or the name
    itself), or a pattern naming something under it: its fused tensors
    (``...experts.gate_up_proj``) or its experts' linears (``...experts.5.down_proj``). One
    vLLM MoE layer has one method for all its experts, so a list that names some experts but
    not all of them cannot be served: that raises ``ValueError`` naming the layer.
    """
    inside = [p for p in patterns if p and p.startswith(prefix + ".")]
    if any(p and p in prefix for p in patterns):
        return True
    if not inside:
        return False
    experts = {int(head) for p in inside if (head := p[len(prefix) + 1 :].split(".")[0]).isdigit()}
    fused_names = [p for p in inside if not p[len(prefix) + 1 :].split(".")[0].isdigit()]
    if fused_names or experts >= set(range(num_experts)):
        return True
    raise ValueError(
        f"awq-plugin cannot serve MoE layer '{prefix}': modules_to_not_convert keeps experts "
        f"{sorted(experts)} of {num_experts} in full precision and quantizes the others; vLLM runs "
        "all experts of a layer with one method. Keep the whole layer in full precision (list "
        f"'{prefix}') or quantize all of its experts."
    )


_logged_kernels: set[str] = set()
_logged_skip = False


def _log_skipped_once(prefix: str, patterns: list[str]) -> None:
    """One line per process when a linear stays in full precision by ``modules_to_not_convert``."""
    global _logged_skip
    if not _logged_skip:
        _logged_skip = True
        shown = patterns[:8] + (["..."] if len(patterns) > 8 else [])
        log.info(
            "awq-plugin: %s (and any other layer matching modules_to_not_convert %s) stays in full precision",
            prefix,
            shown,
        )


def _log_kernel_once(choice: KernelChoice, method: str = "AwqPluginLinearMethod") -> None:
    """One line per method, kernel and process: the serving tests read it from the server log."""
    key = f"{method}:{choice.kernel}"
    if key not in _logged_kernels:
        _logged_kernels.add(key)
        log.info("awq-plugin: %s using kernel '%s' (%s)", method, choice.kernel, choice.reason)


# ---------------------------------------------------------------------------------------------
# Mixture of experts: shapes and the forward (pure torch, no vLLM)
# ---------------------------------------------------------------------------------------------

#: Kernels :class:`AwqPluginMoEMethod` runs itself, one expert at a time; the others
#: (``marlin``, and ``triton`` on GPUs) hand the experts to vLLM's own AWQ MoE method.
_MOE_KERNELS = ("cpu", "amx", "avx2", "portable", "reference")
#: vLLM's ``MoEActivation`` values :func:`moe_activation` computes. Gated ones read gate and up
#: from the two halves of ``w13``'s output (``swigluoai``: interleaved, see there);
#: ``NAME_no_mul`` applies ``act`` alone to a single projection.
_MOE_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu2", "swigluoai", "swigluoai_uninterleave")
#: gpt-oss's clamped SwiGLU constants, which vLLM's fused-MoE ``swigluoai`` kernel uses when the
#: model passes none (``SwigluOAIAndMul``'s defaults; transformers' ``GptOssExperts`` likewise).
SWIGLUOAI_ALPHA = 1.702
SWIGLUOAI_LIMIT = 7.0


@dataclass(frozen=True)
class AwqMoeShapes:
    """Per-rank shapes of one MoE layer's stacked AWQ tensors (E local experts)."""

    w13_qweight: tuple[int, int, int]  # int32 (E, H, S*I/8): gate then up, S = 2 (1 if not gated)
    w13_qzeros: tuple[int, int, int]  # int32 (E, H/G13, S*I/8)
    w13_scales: tuple[int, int, int]  # fp16  (E, H/G13, S*I)
    w2_qweight: tuple[int, int, int]  # int32 (E, I, H/8)
    w2_qzeros: tuple[int, int, int]  # int32 (E, I/G2, H/8)
    w2_scales: tuple[int, int, int]  # fp16  (E, I/G2, H)
    group_w13: int  # G13, per-channel (-1) resolved to H
    group_w2: int  # G2, per-channel resolved to I


def awq_moe_shapes(
    layer_name: str,
    num_experts: int,
    hidden_size: int,
    intermediate_per_partition: int,
    group_size: int,
    w13_shards: int = 2,
    tp_size: int = 1,
) -> AwqMoeShapes:
    """The stacked AWQ tensor shapes of one rank's experts, or a clear error naming the layer.

    ``intermediate_per_partition`` (I) is the per-rank share of the experts' intermediate
    size under tensor parallelism: it is the output size of gate/up (N, packed by 8) and
    the input size of down (K, whole quantization groups per rank).
    """
    h, i = hidden_size, intermediate_per_partition
    if group_size == PER_CHANNEL and tp_size > 1:
        raise ValueError(
            f"AWQ MoE layer '{layer_name}': a per-channel group (group_size -1) spans all of down's "
            f"input, which tensor parallelism splits across {tp_size} ranks; use tensor-parallel size 1"
        )
    g13 = effective_group_size(group_size, h)
    g2 = effective_group_size(group_size, i)
    if h % g13 or h % PACK_FACTOR:
        raise ValueError(
            f"AWQ MoE layer '{layer_name}': hidden size {h} must be a multiple of the group size {g13} "
            f"and of {PACK_FACTOR}"
        )
    if i % g2 or i % PACK_FACTOR:
        raise ValueError(
            f"AWQ MoE layer '{layer_name}': each rank holds {i} intermediate channels per expert, which "
            f"must be a multiple of the group size {g2} and of {PACK_FACTOR}; use a tensor-parallel "
            "size that keeps whole groups per rank"
        )
    e, n13 = num_experts, w13_shards * i
    return AwqMoeShapes(
        w13_qweight=(e, h, n13 // PACK_FACTOR),
        w13_qzeros=(e, h // g13, n13 // PACK_FACTOR),
        w13_scales=(e, h // g13, n13),
        w2_qweight=(e, i, h // PACK_FACTOR),
        w2_qzeros=(e, i // g2, h // PACK_FACTOR),
        w2_scales=(e, i // g2, h),
        group_w13=g13,
        group_w2=g2,
    )


def moe_activation(
    name: str,
    swiglu_limit: float | None = None,
    swiglu_alpha: float | None = None,
    swiglu_beta: float | None = None,
) -> Any:
    """``fn(h)`` for vLLM's MoE activation ``name`` on ``h = x @ w13`` ``[n, S*I]`` -> ``[n, I]``.

    The math of vLLM 0.32's fused-MoE activations (``apply_moe_activation``), written out:

    - ``silu`` / ``gelu`` / ``gelu_tanh`` / ``relu2``: ``act(gate) * up``, gate = the first
      half of ``h`` (the checkpoint's w1), up = the second (w3). ``silu`` with ``swiglu_limit``
      L (EXAONE-MoE) clamps first: ``gate <= L``, ``-L <= up <= L``.
    - ``swigluoai`` (gpt-oss): gate and up *interleaved* (``h[:, 0::2]``, ``h[:, 1::2]``),
      ``g = min(gate, L)``, ``u = clamp(up, -L, L)``, ``g * sigmoid(alpha * g) * (u + 1)``;
      L, alpha default to gpt-oss's 7.0 and 1.702 (vLLM's kernel uses those).
    - ``swigluoai_uninterleave``: the same on the two halves, ``(u + beta)``, L required.
    - ``NAME_no_mul``: ``act(h)`` on a single projection (S = 1).
    """
    import torch
    import torch.nn.functional as F

    base, gated = (name[: -len("_no_mul")], False) if name.endswith("_no_mul") else (name, True)
    acts = {
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
        "relu2": lambda t: F.relu(t).square(),
    }
    if base not in _MOE_ACTIVATIONS or (not gated and base not in acts):
        raise ValueError(
            f"awq-plugin MoE: activation {name!r} is not supported; supported: "
            f"{', '.join(_MOE_ACTIVATIONS)} and the _no_mul forms of {', '.join(acts)}"
        )
    if not gated:
        return acts[base]
    if base.startswith("swigluoai"):
        interleaved = base == "swigluoai"
        if not interleaved and swiglu_limit is None:
            raise ValueError(f"awq-plugin MoE: activation {name!r} needs a swiglu_limit")
        limit = SWIGLUOAI_LIMIT if swiglu_limit is None else float(swiglu_limit)
        alpha = SWIGLUOAI_ALPHA if swiglu_alpha is None else float(swiglu_alpha)
        beta = 1.0 if interleaved or swiglu_beta is None else float(swiglu_beta)

        def swiglu_oai(h: Any) -> Any:
            if interleaved:
                gate, up = h[..., 0::2], h[..., 1::2]  # (n, I) each: columns g0 u0 g1 u1 ...
            else:
                gate, up = h.chunk(2, dim=-1)  # (n, I) each
            gate = gate.clamp(max=limit)
            up = up.clamp(min=-limit, max=limit)
            return gate * torch.sigmoid(alpha * gate) * (up + beta)

        return swiglu_oai
    act = acts[base]
    clamp = None if swiglu_limit is None else float(swiglu_limit)
    if clamp is not None and base != "silu":
        raise ValueError(f"awq-plugin MoE: a swiglu_limit with activation {name!r} is not supported")

    def gated_act(h: Any) -> Any:
        gate, up = h.chunk(2, dim=-1)  # (n, I) each: the checkpoint's w1 (gate) then w3 (up)
        if clamp is not None:
            gate, up = gate.clamp(max=clamp), up.clamp(min=-clamp, max=clamp)
        return act(gate) * up

    return gated_act


def awq_moe_forward(
    x: Any,
    topk_weights: Any,
    topk_ids: Any,
    w13: list[Any],
    w2: list[Any],
    activation: Any,
    expert_map: Any = None,
    apply_router_weight_on_input: bool = False,
    w13_bias: Any = None,
    w2_bias: Any = None,
) -> Any:
    """Routed experts on AWQ weights, one expert at a time; returns ``[M, H]`` in ``x``'s dtype.

    ``x`` ``[M, H]``; ``topk_weights``/``topk_ids`` ``[M, k]`` (global expert ids);
    ``w13[e]``/``w2[e]``: local expert ``e``'s :class:`~awq_plugin.kernels.AwqKernelWeight`
    for gate+up ``[H -> S*I]`` and down ``[I -> H]``; ``activation`` from
    :func:`moe_activation`; ``expert_map`` ``[E_global]`` maps global ids to local ones
    (-1: another rank's expert, skipped); ``w13_bias`` ``[E, S*I]`` / ``w2_bias`` ``[E, H]``
    (optional, local experts) are added to the expert's GEMM outputs, so the router weight
    scales the down bias too (as vLLM's fused kernels and transformers' gpt-oss do). The
    expert outputs are summed in fp32.
    """
    import torch

    from awq_plugin.kernels import awq_linear

    m, k = topk_ids.shape
    ids = topk_ids.long()
    if expert_map is not None:
        ids = expert_map.long()[ids]  # (M, k) local ids, -1 = not on this rank
    flat_ids = ids.reshape(-1)  # (M*k,)
    flat_weights = topk_weights.reshape(-1)  # (M*k,)
    out = torch.zeros(m, x.shape[-1], dtype=torch.float32, device=x.device)  # (M, H)
    for e in torch.unique(flat_ids).tolist():
        if e < 0:
            continue
        slots = (flat_ids == e).nonzero().squeeze(1)  # (n_e,) positions in (M, k)
        tokens = slots // k  # (n_e,)
        routed = x[tokens]  # (n_e, H)
        weights = flat_weights[slots].float()[:, None]  # (n_e, 1)
        if apply_router_weight_on_input:
            routed = (routed.float() * weights).to(x.dtype)
        h = awq_linear(routed, w13[e])  # (n_e, S*I)
        if w13_bias is not None:
            h = (h.float() + w13_bias[e].float()).to(h.dtype)
        y = awq_linear(activation(h), w2[e]).float()  # (n_e, H)
        if w2_bias is not None:
            y = y + w2_bias[e].float()
        if not apply_router_weight_on_input:
            y = y * weights
        out.index_add_(0, tokens, y)
    return out.to(x.dtype)


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _choose_kernel_here(layer: Any, group_size: int, quant: AwqQuantConfig) -> KernelChoice:
    """Gather the platform facts for :func:`choose_kernel` (the only impure part)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        platform = "cpu"
    elif current_platform.is_rocm():
        platform = "rocm"
    elif current_platform.is_cuda():
        platform = "cuda"
    else:
        platform = str(current_platform.device_type)
    cpu_kernel_ok = platform == "cpu" and _cpu_kernel_ok()
    return choose_kernel(
        platform,
        os.environ.get(KERNEL_ENV),
        cpu_kernel_ok=cpu_kernel_ok,
        marlin_ok=platform in _GPU_PLATFORMS and _marlin_ok(layer, quant, group_size),
        cpu_fallback=_cpu_fallback() if platform == "cpu" and not cpu_kernel_ok else None,
        amx_ready=cpu_kernel_ok and _amx_ready_here(),
    )


def _cpu_fallback() -> KernelChoice | None:
    """Our kernel for a CPU without AVX-512 VNNI (AVX2 or portable), as auto picks it, or None."""
    from awq_plugin.kernels import auto_cpu_choice

    choice = auto_cpu_choice()
    if choice.backend in ("avx2", "portable"):
        return KernelChoice(choice.backend, choice.reason)
    return None


# ---------------------------------------------------------------------------------------------
# The logic of the vLLM classes (plain classes; vLLM's bases are added in _vllm_classes)
# ---------------------------------------------------------------------------------------------


class _ConfigImpl:
    """Body of :class:`AwqPluginConfig` (vLLM's ``QuantizationConfig`` contract)."""

    packed_modules_mapping: dict[str, list[str]]

    def __init__(self, quant: AwqQuantConfig, raw: dict[str, Any]) -> None:
        super().__init__()  # QuantizationConfig.__init__ sets packed_modules_mapping
        self.quant = quant
        self.raw = dict(raw)
        self.modules_to_not_convert = list(quant.modules_to_not_convert)

    def __repr__(self) -> str:
        return f"AwqPluginConfig({self.quant!r})"

    @classmethod
    def get_name(cls) -> str:
        return PLUGIN_QUANT_NAME

    def get_supported_act_dtypes(self) -> list[Any]:
        import torch
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            return [torch.float32, torch.bfloat16, torch.float16]
        return [torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 75  # Turing: the oldest GPU our Triton kernel and vLLM's AWQ kernels target

    @staticmethod
    def get_config_filenames() -> list[str]:
        # AutoAWQ's side files, read when config.json has no quantization_config.
        return ["quant_config.json", "quantize_config.json"]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Any:
        return cls(read_awq_config(config), config)

    @classmethod
    def override_quantization_method(
        cls, hf_quant_cfg: dict[str, Any], user_quant: str | None, hf_config: Any = None
    ) -> str | None:
        # vLLM asks custom configs before its own, so answering here takes the checkpoint away
        # from AutoAWQConfig (which would answer "auto_awq" on GPUs) for plain `vllm serve DIR`
        # and for `--quantization awq` / `awq_marlin` / `auto_awq` alike.
        if str(hf_quant_cfg.get("quant_method", "")).lower() != "awq":
            return None
        return PLUGIN_QUANT_NAME if user_quant in _CLAIMABLE_USER_QUANT else None

    def get_quant_method(self, layer: Any, prefix: str) -> Any:
        from vllm.model_executor.layers.fused_moe import GateLinear, RoutedExperts
        from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
        from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped

        if isinstance(layer, LinearBase):
            # MoE routers stay in full precision in AWQ checkpoints (AutoAWQ excludes them, and
            # so do our templates); Qwen3-MoE's model still hands its router our config.
            if isinstance(layer, GateLinear):
                return UnquantizedLinearMethod()
            # Substring match, as AwqQuantConfig.skips_module; the mapping lets a merged
            # qkv_proj / gate_up_proj be skipped when its checkpoint parts are listed.
            if is_layer_skipped(
                prefix, self.modules_to_not_convert, self.packed_modules_mapping, match_mode="substring"
            ):
                _log_skipped_once(prefix, self.modules_to_not_convert)
                return UnquantizedLinearMethod()
            return _vllm_classes()["AwqPluginLinearMethod"](self)
        if isinstance(layer, RoutedExperts):
            from vllm.model_executor.layers.fused_moe import UnquantizedFusedMoEMethod

            _install_expert_stacking(_current_model_type())  # gpt-oss reads its experts stacked

            if moe_layer_kept_full_precision(
                prefix, self.modules_to_not_convert, layer.moe_config.num_logical_experts
            ):
                # The checkpoint holds this layer's experts as plain weights (per-expert
                # ``.weight`` tensors or fused 3-D ones): vLLM's own unquantized method loads them.
                _log_skipped_once(prefix, self.modules_to_not_convert)
                return UnquantizedFusedMoEMethod(layer.moe_config)
            choice = _choose_kernel_here(layer, self.quant.group_size, self.quant)
            if choice.kernel not in _MOE_KERNELS and _on_cpu():
                # vLLM's own CPU AWQ MoE kernel (CPUExpertsInt4, 0.32) needs AMX; a CPU without
                # our kernel's VNNI has no AMX either, so the experts run on the reference.
                choice = KernelChoice("reference", "CPU without AVX-512 VNNI: the pure-PyTorch reference")
            if choice.kernel in _MOE_KERNELS:
                _log_kernel_once(choice, "AwqPluginMoEMethod")
                return _vllm_classes()["AwqPluginMoEMethod"](self, layer.moe_config, choice.kernel)
            # GPUs (and CPUs our kernel cannot run on): vLLM's own AWQ MoE method, Marlin MoE
            # or its WNA16 MoE kernels, on the same checkpoint tensors.
            return self.vllm_awq_config().get_quant_method(layer, prefix)
        # Anything else, notably ParallelLMHead (lm_head, tied or not) and embeddings: None
        # makes vLLM use its unquantized method; AWQ checkpoints keep them in fp16.
        return None

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        # Models that rename modules on load (e.g. "model." -> "language_model.model.") rename
        # the skip list too, or it would never match.
        if self.modules_to_not_convert:
            self.modules_to_not_convert = map_module_patterns(hf_to_vllm_mapper, self.modules_to_not_convert)

    def vllm_awq_config(self) -> Any:
        """vLLM's ``AutoAWQConfig`` for the same settings: the routes we reuse rather than rewrite."""
        from vllm.model_executor.layers.quantization.auto_awq import AutoAWQConfig

        cfg = AutoAWQConfig(
            weight_bits=self.quant.bits,
            group_size=self.quant.group_size,
            zero_point=self.quant.zero_point,
            lm_head_quantized=False,
            modules_to_not_convert=list(self.modules_to_not_convert),
            full_config={**self.raw, "quant_method": "awq"},
        )
        cfg.packed_modules_mapping = self.packed_modules_mapping
        return cfg


class _LinearMethodImpl:
    """Body of :class:`AwqPluginLinearMethod` (vLLM's ``LinearMethodBase`` contract).

    For the ``marlin`` kernel every call is forwarded to vLLM's own AWQ method for the layer
    (Marlin through ``choose_mp_linear_kernel``); otherwise weights are created in the
    checkpoint layout, repacked once after loading and run by ``torch.ops.awq_plugin.awq_gemm``.
    """

    def __init__(self, config: Any) -> None:
        self.config = config
        self.kernel: str | None = None  # decided in create_weights
        self.delegate: Any = None  # vLLM's method when kernel == "marlin"

    def create_weights(
        self,
        layer: Any,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: Any,
        **extra_weight_attrs: Any,
    ) -> None:
        import torch
        from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter

        name = getattr(layer, "prefix", "") or type(layer).__name__
        shapes = awq_shard_shapes(
            name, input_size, input_size_per_partition, output_partition_sizes, self.config.quant.group_size
        )
        choice = self._choose(layer, shapes.group_size)
        _log_kernel_once(choice)
        self.kernel = choice.kernel
        layer.awq_permute_rotary_qk = _loader_permutes_rotary_qk(name)
        if self.kernel == "marlin":
            self.delegate = self.config.vllm_awq_config().get_quant_method(layer, name)
            self.delegate.create_weights(
                layer,
                input_size_per_partition,
                output_partition_sizes,
                input_size,
                output_size,
                params_dtype,
                **extra_weight_attrs,
            )
            return
        loader = extra_weight_attrs["weight_loader"]
        # The checkpoint layout packs 8 outputs per int32 along N (packed_dim=1): vLLM's
        # parameter classes then divide the q/k/v and gate/up offsets by 8 when loading merged
        # layers, narrow N for column-parallel shards and K (input_dim=0) for row-parallel ones.
        packed = dict(
            input_dim=0, output_dim=1, packed_dim=1, packed_factor=PACK_FACTOR, weight_loader=loader
        )
        qweight = PackedvLLMParameter(data=torch.empty(shapes.qweight, dtype=torch.int32), **packed)
        qzeros = PackedvLLMParameter(data=torch.empty(shapes.qzeros, dtype=torch.int32), **packed)
        # Scales stay fp16 as stored: casting them to a bf16 params_dtype would round them.
        scales = GroupQuantScaleParameter(
            data=torch.empty(shapes.scales, dtype=torch.float16),
            input_dim=0,
            output_dim=1,
            weight_loader=loader,
        )
        layer.register_parameter("qweight", qweight)
        layer.register_parameter("qzeros", qzeros)
        layer.register_parameter("scales", scales)
        layer.awq_group_size = shapes.group_size

    def _choose(self, layer: Any, group_size: int) -> KernelChoice:
        return _choose_kernel_here(layer, group_size, self.config.quant)

    def process_weights_after_loading(self, layer: Any) -> None:
        if getattr(layer, "awq_permute_rotary_qk", False):
            order = qkv_rotary_order(
                layer.num_heads, layer.num_kv_heads, layer.head_size, layer.num_kv_heads * layer.v_head_size
            )
            permuted = permute_awq_output_channels(
                layer.qweight.data, layer.qzeros.data, layer.scales.data, order
            )
            for param, data in zip((layer.qweight, layer.qzeros, layer.scales), permuted):
                param.data.copy_(data)
        if self.delegate is not None:
            self.delegate.process_weights_after_loading(layer)
            return
        install_kernel_weight(
            layer, layer.qweight.data, layer.qzeros.data, layer.scales.data, layer.awq_group_size, self.kernel
        )

    def apply(self, layer: Any, x: Any, bias: Any = None) -> Any:
        if self.delegate is not None:
            return self.delegate.apply(layer, x, bias)
        from awq_plugin.kernels import awq_linear

        return awq_linear(x, layer.awq_weight, bias)  # x (..., K) -> (..., N) in x's dtype


def install_kernel_weight(
    layer: Any, qweight: Any, qzeros: Any, scales: Any, group_size: int, kernel: str | None
) -> None:
    """Repack one linear's AutoAWQ tensors for ``kernel`` (once, after loading) and keep them as
    the layer's ``qweight``/``qzeros``/``scales`` parameters, replacing what the checkpoint
    loaded under those names; ``layer.awq_weight`` points at them for ``apply()``."""
    import torch
    from vllm.model_executor.layers.quantization.utils import replace_parameter

    from awq_plugin.kernels import prepare_awq_weight

    weight = prepare_awq_weight(qweight, qzeros, scales, group_size, backend=kernel)
    for name, tensor in (("qweight", weight.qweight), ("qzeros", weight.qzeros), ("scales", weight.scales)):
        if name in layer._parameters:
            replace_parameter(layer, name, tensor)
        else:
            layer.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
    layer.awq_weight = dataclasses.replace(
        weight, qweight=layer.qweight, qzeros=layer.qzeros, scales=layer.scales
    )


class _MoEMethodImpl:
    """Body of :class:`AwqPluginMoEMethod` (vLLM's ``FusedMoEMethodBase`` contract) for our kernels.

    Weights are created in the AutoAWQ layout, stacked over experts, with the attributes
    vLLM's expert weight loader needs to place each expert's w1/w3/w2 shards (``is_transposed``:
    AWQ stores ``[K, N/8]``; group-wise scales and zeros). After loading, each expert is
    repacked once for the kernel; :meth:`apply` runs :func:`awq_moe_forward`.
    """

    def __init__(self, config: Any, moe: Any, kernel: str) -> None:
        super().__init__(moe)  # FusedMoEMethodBase: moe config, no modular kernel
        self.config = config
        self.kernel = kernel
        # Refuses unsupported activations early, at model construction.
        self.activation = moe_activation(
            moe.activation.value, moe.swiglu_limit, moe.swiglu_alpha, moe.swiglu_beta
        )

    def create_weights(
        self,
        layer: Any,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: Any,
        **extra_weight_attrs: Any,
    ) -> None:
        import torch
        from vllm.model_executor.layers.fused_moe.routed_experts import FusedMoeWeightScaleSupported
        from vllm.model_executor.utils import set_weight_attrs

        shapes = awq_moe_shapes(
            getattr(layer, "layer_name", "") or type(layer).__name__,
            num_experts,
            hidden_size,
            intermediate_size_per_partition,
            self.config.quant.group_size,
            w13_shards=self.moe.w13_num_shards,
            tp_size=self.moe.tp_size,
        )
        attrs = {
            "weight_loader": _expert_weight_loader(layer, extra_weight_attrs["weight_loader"]),
            "is_transposed": True,  # AWQ is K-first: the loader shards the other dimension
            "quant_method": FusedMoeWeightScaleSupported.GROUP.value,
        }
        # Scales stay fp16 as stored: casting them to a bf16 params_dtype would round them.
        for name, dtype in (("qweight", torch.int32), ("qzeros", torch.int32), ("scales", torch.float16)):
            for stem in ("w13", "w2"):
                shape = getattr(shapes, f"{stem}_{name}")
                param = torch.nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
                layer.register_parameter(f"{stem}_{name}", param)
                set_weight_attrs(param, attrs)
        if self.moe.has_bias:
            # Expert biases (gpt-oss): full precision, in w13's column order. vLLM's loader
            # silently skips a checkpoint bias the method has no parameter for, so they must exist.
            n13 = shapes.w13_scales[-1]
            for stem, shape in (("w13", (num_experts, n13)), ("w2", (num_experts, hidden_size))):
                param = torch.nn.Parameter(torch.zeros(shape, dtype=params_dtype), requires_grad=False)
                layer.register_parameter(f"{stem}_bias", param)
                set_weight_attrs(param, {"weight_loader": attrs["weight_loader"]})
        layer.awq_moe_shapes = shapes

    def process_weights_after_loading(self, layer: Any) -> None:
        import torch
        from vllm.model_executor.layers.quantization.utils import replace_parameter

        from awq_plugin.kernels import prepare_awq_weight

        shapes: AwqMoeShapes = layer.awq_moe_shapes
        for stem, group in (("w13", shapes.group_w13), ("w2", shapes.group_w2)):
            qweight, qzeros, scales = (
                getattr(layer, f"{stem}_{n}").data for n in ("qweight", "qzeros", "scales")
            )
            per_expert = [
                prepare_awq_weight(qweight[e], qzeros[e], scales[e], group, backend=self.kernel)
                for e in range(qweight.shape[0])
            ]
            # Every expert repacks to the same shapes: stack them back into the layer's
            # parameters (replacing the checkpoint layout) and keep per-expert views.
            for name in ("qweight", "qzeros", "scales"):
                replace_parameter(
                    layer, f"{stem}_{name}", torch.stack([getattr(w, name) for w in per_expert])
                )
            stacked = [getattr(layer, f"{stem}_{n}") for n in ("qweight", "qzeros", "scales")]
            views = [
                dataclasses.replace(w, qweight=stacked[0][e], qzeros=stacked[1][e], scales=stacked[2][e])
                for e, w in enumerate(per_expert)
            ]
            setattr(layer, f"awq_{stem}", views)

    def get_fused_moe_quant_config(self, layer: Any) -> Any:
        # No vLLM modular kernel runs these experts (apply() does), so there is no kernel
        # quant config to describe.
        return None

    def apply(
        self,
        layer: Any,
        x: Any,
        topk_weights: Any,
        topk_ids: Any,
        shared_experts: Any = None,
        shared_experts_input: Any = None,
    ) -> Any:
        # Shared experts (Qwen2-MoE, DeepSeek, GLM-4-MoE, Llama 4, ...) are run by vLLM's MoE
        # runner around this call, as are routing, grouped top-k and the routed scaling factor.
        return awq_moe_forward(
            x,
            topk_weights,
            topk_ids,
            layer.awq_w13,
            layer.awq_w2,
            self.activation,
            expert_map=layer.expert_map,
            apply_router_weight_on_input=layer.apply_router_weight_on_input,
            w13_bias=getattr(layer, "w13_bias", None),
            w2_bias=getattr(layer, "w2_bias", None),
        )


def local_expert_order(expert_map: Any, num_global: int) -> list[int]:
    """Global expert ids in local order (``expert_map`` ``[E_global]``: local id or -1; None: all)."""
    if expert_map is None:
        return list(range(num_global))
    local = expert_map.tolist()
    owned = sorted((lid, g) for g, lid in enumerate(local) if lid >= 0)
    return [g for _, g in owned]


def narrow_stacked_expert_tensor(
    loaded: Any, param_shape: tuple[int, ...], experts: list[int], tp_rank: int
) -> Any:
    """This rank's part of a checkpoint tensor stacked over all experts (``[E_global, ...]``).

    ``experts``: the global ids this rank holds, in local order (:func:`local_expert_order`).
    Every other dimension the rank holds a slice of (tensor parallelism splits the experts'
    intermediate size: the N of ``w13``, the K of ``w2``) is narrowed to the rank's
    ``tp_rank``-th block of the parameter's size there. gpt-oss's gate/up columns are
    interleaved, so a rank's block of ``2 * I / tp`` columns is contiguous, as in vLLM's own
    gpt-oss loader.
    """
    import torch

    if loaded.dim() != len(param_shape):
        raise ValueError(
            f"stacked expert tensor of shape {tuple(loaded.shape)} for a parameter of shape {param_shape}"
        )
    out = loaded[torch.tensor(experts, dtype=torch.long)]  # (E_local, ...)
    for dim in range(1, out.dim()):
        size = param_shape[dim]
        if out.shape[dim] != size:
            if out.shape[dim] < (tp_rank + 1) * size:
                raise ValueError(
                    f"stacked expert tensor of shape {tuple(loaded.shape)}: dimension {dim} has no "
                    f"block {tp_rank} of size {size}"
                )
            out = out.narrow(dim, tp_rank * size, size)
    return out


def _expert_weight_loader(layer: Any, layer_loader: Any) -> Any:
    """The weight loader of our MoE parameters: vLLM's, plus whole stacked tensors.

    Most models hand each expert's tensor to ``RoutedExperts.weight_loader`` with its shard
    and expert id. gpt-oss's ``load_weights`` (vLLM 0.32) has no per-expert route for AWQ
    names: a checkpoint tensor named like our parameter (``...mlp.experts.w13_qweight``,
    ``[E, H, 2I/8]``) is handed over whole as ``weight_loader(param, tensor)``. That call is
    loaded here: this rank's experts and tensor-parallel block, copied as they are.
    """

    def load(
        param: Any, loaded_weight: Any, weight_name: str | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        if weight_name is None and not args and not kwargs:
            experts = local_expert_order(layer.expert_map, layer.global_num_experts)
            part = narrow_stacked_expert_tensor(
                loaded_weight, tuple(param.shape), experts, layer.moe_config.moe_parallel_config.tp_rank
            )
            param.data.copy_(part)
            return None
        return layer_loader(param, loaded_weight, weight_name, *args, **kwargs)

    # vLLM marks its loader as taking expert ids and shard names; ours takes them as well.
    load.supports_moe_loading = getattr(layer_loader, "supports_moe_loading", False)  # type: ignore[attr-defined]
    return load


def _loader_permutes_rotary_qk(prefix: str) -> bool:
    """Whether ``prefix`` is a decoder qkv_proj whose model's loader reorders q/k for rotary
    but skips AWQ tensors (:data:`ROTARY_PERMUTED_QK_MODEL_TYPES`). vLLM has no hook for a
    quantization method to see its model; the current config names it during model init."""
    if not prefix.endswith("self_attn.qkv_proj"):
        return False
    from vllm.config import get_current_vllm_config_or_none

    vllm_config = get_current_vllm_config_or_none()  # None: a layer built outside a model
    model_config = getattr(vllm_config, "model_config", None)
    model_type = getattr(getattr(model_config, "hf_config", None), "model_type", None)
    return (
        model_type in ROTARY_PERMUTED_QK_MODEL_TYPES
        and prefix.endswith("self_attn.qkv_proj")
        and "vision" not in prefix
    )


# ---------------------------------------------------------------------------------------------
# gpt-oss: per-expert AWQ tensors handed to vLLM's loader stacked
# ---------------------------------------------------------------------------------------------
#
# Our checkpoints store a gpt-oss expert as three AWQ linears (``mlp.experts.E.gate_proj``,
# ``up_proj``, ``down_proj``, each with its bias), as they store every family's. vLLM 0.32's
# gpt-oss loader has no per-expert route for AWQ names (it drops them); it hands a tensor named
# like the MoE method's parameter to that parameter's loader whole. So, for gpt-oss models
# only, the weights vLLM streams to the model are regrouped per layer: gate and up columns
# interleaved as in gpt-oss's own ``gate_up_proj`` (``w13_*`` ``[E, H, 2I/8]``, scales
# ``[E, H/G, 2I]``), down stacked (``w2_*``), biases under gpt-oss's names. Integers, zeros and
# scales are moved, never recomputed.

STACKED_EXPERT_MODEL_TYPES = ("gpt_oss",)
_EXPERT_TENSOR = re.compile(
    r"^(?P<prefix>.+\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\."
    r"(?P<leaf>qweight|qzeros|scales|bias)$"
)
_EXPERT_LEAVES = ("qweight", "qzeros", "scales", "bias")
_EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _interleave_columns(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``[..., C]`` twice -> ``[..., 2C]`` as g0 u0 g1 u1 ..."""
    import torch

    return torch.stack((gate, up), dim=-1).flatten(-2)


def _interleave_packed(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    from awq_plugin.numerics.pack import pack_int4_columns, unpack_int4_columns

    return pack_int4_columns(_interleave_columns(unpack_int4_columns(gate), unpack_int4_columns(up)))


def stack_expert_tensors(
    weights: Iterable[tuple[str, torch.Tensor]], n_experts: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Per-expert AWQ gate/up/down tensors (and biases) regrouped as gpt-oss's loader reads them.

    Every other tensor passes through in order. A layer's experts are yielded once all
    ``n_experts`` x 3 projections x (qweight, qzeros, scales, bias) have arrived, so memory holds
    at most the layers in flight; a checkpoint that lacks some raises, naming the first gap.
    """
    pending: dict[str, dict[tuple[int, str, str], torch.Tensor]] = {}
    wanted = n_experts * len(_EXPERT_PROJECTIONS) * len(_EXPERT_LEAVES)
    for name, tensor in weights:
        match = _EXPERT_TENSOR.match(name)
        if match is None:
            yield name, tensor
            continue
        layer = pending.setdefault(match["prefix"], {})
        layer[(int(match["expert"]), match["proj"], match["leaf"])] = tensor
        if len(layer) == wanted:
            yield from _stacked_experts(match["prefix"], pending.pop(match["prefix"]), n_experts)
    for prefix, layer in pending.items():
        missing = next(
            f"{prefix}.{e}.{proj}.{leaf}"
            for e in range(n_experts)
            for proj in _EXPERT_PROJECTIONS
            for leaf in _EXPERT_LEAVES
            if (e, proj, leaf) not in layer
        )
        raise ValueError(
            f"awq-plugin: the checkpoint's experts of {prefix} are incomplete: {missing} is missing"
        )


def _stacked_experts(
    prefix: str, layer: dict[tuple[int, str, str], torch.Tensor], n_experts: int
) -> Iterator[tuple[str, torch.Tensor]]:
    import torch

    def each(proj: str, leaf: str) -> list[torch.Tensor]:
        return [layer[(e, proj, leaf)] for e in range(n_experts)]

    for leaf in ("qweight", "qzeros"):
        pairs = zip(each("gate_proj", leaf), each("up_proj", leaf))
        yield f"{prefix}.w13_{leaf}", torch.stack([_interleave_packed(g, u) for g, u in pairs])
    pairs = zip(each("gate_proj", "scales"), each("up_proj", "scales"))
    yield f"{prefix}.w13_scales", torch.stack([_interleave_columns(g, u) for g, u in pairs])
    for leaf in ("qweight", "qzeros", "scales"):
        yield f"{prefix}.w2_{leaf}", torch.stack(each("down_proj", leaf))
    pairs = zip(each("gate_proj", "bias"), each("up_proj", "bias"))
    yield f"{prefix}.gate_up_proj_bias", torch.stack([_interleave_columns(g, u) for g, u in pairs])
    yield f"{prefix}.down_proj_bias", torch.stack(each("down_proj", "bias"))


def _install_expert_stacking(model_type: str | None) -> None:
    """Wrap the gpt-oss model's ``load_weights`` with :func:`stack_expert_tensors` (once).

    Called while vLLM builds a model whose config names a :data:`STACKED_EXPERT_MODEL_TYPES`
    type with our quantization config, before its weights load.
    """
    if model_type not in STACKED_EXPERT_MODEL_TYPES:
        return
    from vllm.model_executor.models import gpt_oss

    cls = gpt_oss.GptOssForCausalLM
    if getattr(cls.load_weights, "_awq_plugin_stacking", False):
        return
    original = cls.load_weights

    def load_weights(self: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> Any:
        return original(self, stack_expert_tensors(weights, self.config.num_local_experts))

    load_weights._awq_plugin_stacking = True  # type: ignore[attr-defined]
    cls.load_weights = load_weights


def _current_model_type() -> str | None:
    from vllm.config import get_current_vllm_config_or_none

    vllm_config = get_current_vllm_config_or_none()
    model_config = getattr(vllm_config, "model_config", None)
    return getattr(getattr(model_config, "hf_config", None), "model_type", None)


def _cpu_kernel_ok() -> bool:
    from awq_plugin.kernels import cpu_kernel_available

    return cpu_kernel_available()  # builds the C++ kernel once (cached on disk)


def _marlin_ok(layer: Any, quant: AwqQuantConfig, group_size: int) -> bool:
    """vLLM's own Marlin checks for this GPU, quant type and layer (GPU only; unrun here)."""
    from vllm.model_executor.layers.quantization.utils.marlin_utils import (
        check_marlin_supported,
        check_marlin_supports_layer,
    )
    from vllm.scalar_type import scalar_types

    return check_marlin_supported(
        scalar_types.uint4, quant.group_size, quant.zero_point
    ) and check_marlin_supports_layer(layer, group_size, allow_tile_padding=True)


# ---------------------------------------------------------------------------------------------
# The vLLM classes, assembled on first use
# ---------------------------------------------------------------------------------------------

_VLLM_CLASS_NAMES = (
    "AwqPluginConfig",
    "AwqPluginLinearMethod",
    "AwqPluginMoEMethod",
    "AwqPluginCtConfig",
    "AwqPluginGptqConfig",
    "AwqPluginLayoutLinearMethod",
)


@functools.cache
def _vllm_classes() -> dict[str, type]:
    """Combine the logic above with vLLM's base classes (imports vLLM; once per process)."""
    from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase
    from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

    from awq_plugin.integrations.vllm_layouts import LAYOUT_NAMES, _LayoutConfigImpl, _LayoutLinearMethodImpl

    def make(name: str, impl: type, base: type, **attrs: Any) -> type:
        # __module__/__qualname__ make the class importable by name (pickling the config
        # into vLLM's engine process resolves it through this module's __getattr__).
        return type(
            name,
            (impl, base),
            {"__module__": __name__, "__qualname__": name, "__doc__": impl.__doc__, **attrs},
        )

    config_cls = make("AwqPluginConfig", _ConfigImpl, QuantizationConfig)
    # vLLM hands weight_loader_v2 (the one that understands its parameter classes and TP
    # shards) only to linear methods whose class name is on this list.
    method_cls = register_weight_loader_v2_supported_method(
        make("AwqPluginLinearMethod", _LinearMethodImpl, LinearMethodBase)
    )
    moe_cls = make("AwqPluginMoEMethod", _MoEMethodImpl, FusedMoEMethodBase)
    # compressed-tensors and GPTQ checkpoints on our kernels (awq_plugin.integrations.vllm_layouts)
    layouts = {
        "AwqPluginCtConfig": make(
            "AwqPluginCtConfig",
            _LayoutConfigImpl,
            QuantizationConfig,
            layout_name=LAYOUT_NAMES["compressed-tensors"],
        ),
        "AwqPluginGptqConfig": make(
            "AwqPluginGptqConfig", _LayoutConfigImpl, QuantizationConfig, layout_name=LAYOUT_NAMES["gptq"]
        ),
        "AwqPluginLayoutLinearMethod": register_weight_loader_v2_supported_method(
            make("AwqPluginLayoutLinearMethod", _LayoutLinearMethodImpl, LinearMethodBase)
        ),
    }
    return {
        "AwqPluginConfig": config_cls,
        "AwqPluginLinearMethod": method_cls,
        "AwqPluginMoEMethod": moe_cls,
        **layouts,
    }


def __getattr__(name: str) -> Any:
    if name in _VLLM_CLASS_NAMES:
        return _vllm_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------

_register_lock = threading.Lock()
_registered = False


def register() -> None:
    """Register :class:`AwqPluginConfig` with vLLM (the ``vllm.general_plugins`` entry point).

    Idempotent: vLLM calls it once in each of its processes, tests may call it again.
    """
    global _registered
    with _register_lock:
        if _registered:
            return
        from vllm.model_executor.layers.quantization import register_quantization_config

        config_cls = _vllm_classes()["AwqPluginConfig"]
        # Our own name, plus the built-in AWQ names: see BUILTIN_AWQ_NAMES for why we take them.
        for name in (PLUGIN_QUANT_NAME, *BUILTIN_AWQ_NAMES):
            register_quantization_config(name)(config_cls)
        from awq_plugin.integrations.vllm_layouts import LAYOUT_NAMES

        # compressed-tensors and GPTQ 4-bit checkpoints, claimed on the CPU only (see there)
        classes = _vllm_classes()
        register_quantization_config(LAYOUT_NAMES["compressed-tensors"])(classes["AwqPluginCtConfig"])
        register_quantization_config(LAYOUT_NAMES["gptq"])(classes["AwqPluginGptqConfig"])
        _install_quantize_on_start()  # `--quantization awq` on a full-precision folder
        _registered = True
        log.info(
            "awq-plugin: registered AwqPluginConfig for quantization %s",
            ", ".join((PLUGIN_QUANT_NAME, *BUILTIN_AWQ_NAMES)),
        )


# ---------------------------------------------------------------------------------------------
# Quantize on first start: `vllm serve FP_DIR --quantization awq` (and LLM(FP_DIR, quantization="awq"))
# ---------------------------------------------------------------------------------------------
#
# vLLM reads the quantization config while it builds its VllmConfig, in the API-server (or
# offline) process, before any engine or tensor-parallel worker exists: for a folder without
# a quantization_config, get_quant_config then fails with "Cannot find the config file for
# awq". So the AWQ checkpoint must exist, and vLLM's `model` must name it, before vLLM builds
# its ModelConfig from the engine arguments. vLLM 0.32 has no public hook there: general
# plugins are loaded (EngineArgs.__post_init__) without the arguments, the quantization
# config's hooks (from_config, override_quantization_method, maybe_update_config) run after
# ModelConfig fixed the model path the workers load weights from, and `model_weights` is read
# only by the RunAI loader. Hence the one patch: EngineArgs.create_model_config is wrapped so
# that, for `--quantization awq` on an unquantized local folder, it first makes (or finds)
# the checkpoint in the cache and points `model` at it. It runs once per start, in the
# process that spawns the engine, so tensor-parallel ranks never quantize and no engine
# start-up timeout applies to it.

#: ``--quantization`` values that quantize a full-precision folder on start.
QUANTIZE_ON_START_NAMES = (PLUGIN_QUANT_NAME, *BUILTIN_AWQ_NAMES)
#: The ``--hf-overrides`` key that carries the options (see the README, "Serve any model").
OPTIONS_KEY = "quantization_config"


def quantize_on_start(engine_args: Any) -> None:
    """Point ``engine_args`` at the cached AWQ checkpoint of its full-precision model (made if missing).

    Does nothing unless ``--quantization`` is an AWQ name and ``model`` is a local folder or a
    hub id (its snapshot in the hub cache) without a quantization config (AWQ checkpoints are
    served as they are). Options come from
    ``--hf-overrides '{"quantization_config": {...}}'`` (keys of
    :meth:`~awq_plugin.pipeline.cache.QuantizeRequest.from_dict`), which this removes: the
    checkpoint's own config.json carries the result. The served model name stays the folder
    the user gave. Bad input raises ``ValueError`` with one line saying what and why.
    """
    if engine_args.quantization not in QUANTIZE_ON_START_NAMES or not isinstance(engine_args.model, str):
        return
    source = _local_model_folder(engine_args.model, getattr(engine_args, "revision", None))
    if source is None:
        return  # nothing this process can read: vLLM's own route (and its error)
    from awq_plugin.errors import AwqPluginError
    from awq_plugin.pipeline.cache import QuantizeRequest, ensure_quantized, quantized_method

    overrides = engine_args.hf_overrides
    options = overrides.get(OPTIONS_KEY) if isinstance(overrides, dict) else None
    try:
        method = quantized_method(source)
        if method is not None and method.lower() == "awq":
            if options is not None:  # its own config wins; ours would replace it in vLLM's hf_config
                log.warning(
                    "awq-plugin: %s is already an AWQ checkpoint; ignoring the %s override",
                    source,
                    OPTIONS_KEY,
                )
                engine_args.hf_overrides = {k: v for k, v in overrides.items() if k != OPTIONS_KEY}
            return
        if method is not None:
            raise ConfigError(
                f"it is already quantized with {method!r} (its config.json says so); --quantization "
                f"{engine_args.quantization} quantizes full-precision models: serve this one without "
                "--quantization, or give its full-precision original"
            )
        request = QuantizeRequest.from_dict(options)
        if "device" not in (options or {}):  # compute where vLLM serves, before its engine takes the memory
            request = dataclasses.replace(request, device=_serving_device())
        entry = ensure_quantized(
            source,
            request,
            tp_size=int(engine_args.tensor_parallel_size or 1),
            trust_remote_code=bool(engine_args.trust_remote_code),
            logger=log,
        )
    except (AwqPluginError, OSError) as exc:
        message = f"awq-plugin: cannot quantize {source} on start: {exc}"
        log.error("%s", message)
        raise ValueError(message) from None
    if not engine_args.served_model_name:
        engine_args.served_model_name = engine_args.model  # clients keep the name they started with
    engine_args.model = str(entry.path)
    if isinstance(overrides, dict) and OPTIONS_KEY in overrides:
        engine_args.hf_overrides = {k: v for k, v in overrides.items() if k != OPTIONS_KEY}
    log.info("awq-plugin: serving %s from cache entry %s", source, entry.path)


def _serving_device() -> str:
    """The device vLLM serves on (``cuda`` on CUDA and ROCm builds, else ``cpu``)."""
    from vllm.platforms import current_platform

    return "cuda" if current_platform.is_cuda_alike() else "cpu"


#: What a hub snapshot needs for quantizing and serving: config, weights, tokenizer files.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def _local_model_folder(model: str, revision: str | None = None) -> Path | None:
    """``model`` as a local folder: itself, or a Hugging Face hub id's snapshot in the hub cache
    (fetched the way vLLM would fetch it; only the cache with ``HF_HUB_OFFLINE=1``). None where
    it is neither (vLLM then reports the model as it always does)."""
    path = Path(model).expanduser()
    if (path / "config.json").is_file():
        return path
    if path.exists() or model.count("/") != 1 or model.startswith(("/", ".", "~")):
        return None
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(model, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # unknown repo, no network and not cached, gated: vLLM's route says so
        log.info("awq-plugin: %s is no local folder and the hub gave no snapshot (%s)", model, exc)
        return None
    return folder if (folder / "config.json").is_file() else None


def _install_quantize_on_start() -> None:
    """Wrap ``EngineArgs.create_model_config`` with :func:`quantize_on_start` (once; see above)."""
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_model_config
    if getattr(original, "_awq_plugin_quantize_on_start", False):
        return

    @functools.wraps(original)
    def create_model_config(self: Any) -> Any:
        quantize_on_start(self)
        return original(self)

    create_model_config._awq_plugin_quantize_on_start = True  # type: ignore[attr-defined]
    EngineArgs.create_model_config = create_model_config
