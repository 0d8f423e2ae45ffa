"""The vLLM MoE method's numerics for the 2026 MoE families (issue 27), against pure-PyTorch oracles.

``awq_moe_forward`` with expert biases (gpt-oss), every activation vLLM 0.32 hands a fused-MoE
method for the families we serve (``silu``, ``silu`` with EXAONE-MoE's ``swiglu_limit``,
gpt-oss's interleaved clamped ``swigluoai``, ...), the rule that keeps a whole MoE layer in
full precision, and the loader of whole stacked expert tensors (gpt-oss's route). The oracles
are written out here in another form than the code (per token, per slot; gate and up picked
by reshaping rather than slicing) so that a shared mistake is unlikely. Shapes are awkward on
purpose: 1, 37 and 129 tokens, three groups along H, an expert map that skips experts. Also
Llama 4's q/k output reordering, which vLLM's loader applies to plain weights but not to AWQ
tensors, so our linear method applies it.
No vLLM process; a few seconds in all.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from awq_plugin.config import AwqQuantConfig
from awq_plugin.format.packing import pack_linear
from awq_plugin.integrations.vllm import (
    awq_moe_forward,
    local_expert_order,
    moe_activation,
    moe_layer_kept_full_precision,
    narrow_stacked_expert_tensor,
    permute_awq_output_channels,
    qkv_rotary_order,
    rotary_pair_order,
)
from awq_plugin.kernels import AwqKernelWeight, prepare_awq_weight
from awq_plugin.numerics.pack import AwqPacked, unpack

GROUP = 32
HIDDEN, INTER = 96, 64  # H = three groups of 32; I = two groups (down's K)


# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------


def _sigmoid(t: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-t))


def oracle_activation(
    name: str, h: torch.Tensor, limit: float | None, alpha: float | None, beta: float | None
):
    """The activation written out: pairs picked by reshaping, clamps by min/max, sigmoid by exp."""
    n, width = h.shape
    if name.endswith("_no_mul"):
        single = {
            "silu_no_mul": lambda t: t * _sigmoid(t),
            "gelu_no_mul": lambda t: 0.5 * t * (1 + torch.erf(t / 2**0.5)),
            "relu2_no_mul": lambda t: torch.where(t > 0, t * t, torch.zeros_like(t)),
        }
        return single[name](h)
    if name == "swigluoai":
        pairs = h.reshape(n, width // 2, 2)  # (n, I, 2): columns g0 u0 g1 u1 ...
        gate, up = pairs[..., 0], pairs[..., 1]
        lim, a, b = 7.0 if limit is None else limit, 1.702 if alpha is None else alpha, 1.0
    else:
        halves = h.reshape(n, 2, width // 2)  # (n, 2, I): all gates, then all ups
        gate, up = halves[:, 0], halves[:, 1]
        lim = limit
        a = 1.0 if alpha is None else alpha
        b = (0.0 if beta is None else beta) if name == "swigluoai_uninterleave" else 0.0
    if lim is not None:
        gate = torch.minimum(gate, torch.tensor(lim))
        up = torch.maximum(torch.minimum(up, torch.tensor(lim)), torch.tensor(-lim))
    if name in ("silu", "swigluoai", "swigluoai_uninterleave"):
        return gate * _sigmoid(a * gate) * (up + b)
    if name == "gelu":
        return 0.5 * gate * (1 + torch.erf(gate / 2**0.5)) * up
    if name == "gelu_tanh":
        inner = (2 / torch.pi) ** 0.5 * (gate + 0.044715 * gate**3)
        return 0.5 * gate * (1 + torch.tanh(inner)) * up
    if name == "relu2":
        return torch.where(gate > 0, gate * gate, torch.zeros_like(gate)) * up
    raise AssertionError(name)


ACTIVATION_CASES = [
    ("silu", None, None, None),
    ("gelu", None, None, None),
    ("gelu_tanh", None, None, None),
    ("relu2", None, None, None),
    ("silu", 3.0, None, None),  # EXAONE-MoE: silu with a swiglu_limit
    ("swigluoai", None, None, None),  # gpt-oss: vLLM passes no constants, 7.0 and 1.702 apply
    ("swigluoai", 2.5, 1.2, None),
    ("swigluoai_uninterleave", 2.5, 1.702, 1.0),
    ("silu_no_mul", None, None, None),
    ("gelu_no_mul", None, None, None),
    ("relu2_no_mul", None, None, None),
]


@pytest.mark.parametrize(("name", "limit", "alpha", "beta"), ACTIVATION_CASES)
def test_moe_activation_matches_the_written_out_formula(
    name: str, limit: float | None, alpha: float | None, beta: float | None
) -> None:
    h = torch.randn(37, 2 * 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 6
    got = moe_activation(name, limit, alpha, beta)(h)
    want = oracle_activation(name, h, limit, alpha, beta)
    assert got.shape == want.shape == (37, 24 if not name.endswith("_no_mul") else 48)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    if limit is not None or name == "swigluoai":
        assert h.abs().max() > (limit or 7.0)  # the clamps were reached: they are tested


def test_swigluoai_reads_interleaved_columns_and_clamps() -> None:
    """Planted bugs the oracle must catch: halves instead of pairs, and no clamp."""
    h = torch.randn(16, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 6
    interleaved = moe_activation("swigluoai")(h)
    halves = moe_activation("swigluoai_uninterleave", 7.0, 1.702, 1.0)(h)
    assert (interleaved - halves).abs().max() > 0.5
    unclamped = oracle_activation("swigluoai", h, 1e9, 1.702, None)
    assert (interleaved - unclamped).abs().max() > 0.5


def test_unsupported_activations_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"activation 'swiglustep' is not supported"):
        moe_activation("swiglustep")
    with pytest.raises(ValueError, match=r"'swigluoai_uninterleave' needs a swiglu_limit"):
        moe_activation("swigluoai_uninterleave")
    with pytest.raises(ValueError, match=r"swiglu_limit with activation 'gelu'"):
        moe_activation("gelu", 3.0)


# ---------------------------------------------------------------------------------------------
# The MoE forward with biases
# ---------------------------------------------------------------------------------------------


def _quantized(
    n: int, k: int, generator: torch.Generator, backend: str
) -> tuple[AwqKernelWeight, torch.Tensor]:
    """A random [n, k] linear quantized uint4 group 32: the kernel's weight and the dequantized [n, k]."""
    linear = nn.Linear(k, n, bias=False)
    linear.weight.data = torch.randn(n, k, generator=generator) / k**0.5
    t = pack_linear(linear, AwqQuantConfig(bits=4, group_size=GROUP))
    kernel = prepare_awq_weight(t["qweight"], t["qzeros"], t["scales"], GROUP, backend=backend)
    return kernel, unpack(AwqPacked(t["qweight"], t["qzeros"], t["scales"])).dequantize(torch.float32)


def oracle_moe(x, topk_weights, topk_ids, dense, b13, b2, act, owned, on_input):
    """Per token and slot: ``w * (act(x W13^T + b13) W2^T + b2)`` for the experts this rank owns."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for slot in range(topk_ids.shape[1]):
            g = int(topk_ids[t, slot])
            if g not in owned:
                continue
            e = owned.index(g)
            w = float(topk_weights[t, slot])
            w13, w2 = (d.double() for d in dense[e])
            xin = x[t].double() * (w if on_input else 1.0)
            h = xin @ w13.T + b13[e].double()  # (S*I,)
            y = act(h[None])[0] @ w2.T + b2[e].double()  # (H,)
            out[t] += y if on_input else w * y
    return out


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("activation", ["silu", "swigluoai"])
@pytest.mark.parametrize(("m", "on_input"), [(1, False), (37, True), (129, False)])
def test_moe_forward_with_biases_matches_the_oracle(
    backend: str, activation: str, m: int, on_input: bool
) -> None:
    if backend == "cpu":
        from awq_plugin.kernels import cpu_kernel_available

        if not cpu_kernel_available():
            pytest.skip("no AVX-512 VNNI CPU kernel here")
    n_global, k = 7, 2
    owned = [0, 3, 4, 6]  # this rank's global experts, in local order
    generator = torch.Generator().manual_seed(m)
    w13, w2, dense = [], [], []
    for _ in owned:
        a, da = _quantized(2 * INTER, HIDDEN, generator, backend)  # gate+up [2I, H]
        b, db = _quantized(HIDDEN, INTER, generator, backend)  # down [H, I]
        w13.append(a)
        w2.append(b)
        dense.append((da, db))
    b13 = torch.randn(len(owned), 2 * INTER, generator=generator)  # (E_local, 2I)
    b2 = torch.randn(len(owned), HIDDEN, generator=generator)  # (E_local, H)
    expert_map = torch.full((n_global,), -1, dtype=torch.int32)
    expert_map[owned] = torch.arange(len(owned), dtype=torch.int32)
    x = torch.randn(m, HIDDEN, generator=generator)
    topk_ids = torch.stack([torch.randperm(n_global, generator=generator)[:k] for _ in range(m)])  # (M, k)
    topk_weights = torch.rand(m, k, generator=generator)
    act = moe_activation(activation)

    def run(with_bias: bool) -> torch.Tensor:
        return awq_moe_forward(
            x,
            topk_weights,
            topk_ids,
            w13,
            w2,
            act,
            expert_map=expert_map,
            apply_router_weight_on_input=on_input,
            w13_bias=b13 if with_bias else None,
            w2_bias=b2 if with_bias else None,
        )

    want = oracle_moe(x, topk_weights, topk_ids, dense, b13, b2, act, owned, on_input)

    def relative_error(got: torch.Tensor) -> float:
        return float((got.double() - want).norm() / want.norm())

    if backend == "reference":  # fp32 against the fp64 oracle
        torch.testing.assert_close(run(True).double(), want, rtol=1e-4, atol=1e-4)
        bound = 1e-4
    else:
        # int8 activations per (row, group): measured 0.6-0.9% relative error (norm) on these
        # cases, the same order as the plain linears' (tests/test_kernel_cpu.py).
        bound = 2e-2
        assert relative_error(run(True)) < bound
    # The biases matter at this bound: dropping them (a plausible bug) fails the check.
    assert relative_error(run(False)) > 10 * bound


# ---------------------------------------------------------------------------------------------
# Which MoE layers stay in full precision
# ---------------------------------------------------------------------------------------------

LAYER = "model.layers.1.mlp.experts"


@pytest.mark.parametrize(
    ("patterns", "expected"),
    [
        ([], False),
        (["model.layers.0.mlp.experts"], False),
        (["model.layers.1.mlp.experts"], True),  # the layer itself
        (["mlp.experts"], True),  # a substring of its name, as skips_module matches
        (["model.layers.1."], True),  # the whole decoder layer
        (["model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"], True),
        ([f"{LAYER}.{e}.{p}" for e in range(4) for p in ("gate_proj", "up_proj", "down_proj")], True),
        (["model.layers.10.mlp.experts.0.gate_proj"], False),  # layer 10 is not layer 1
        (["model.layers.1.self_attn.q_proj", "lm_head"], False),
    ],
)
def test_moe_layer_kept_full_precision(patterns: list[str], expected: bool) -> None:
    assert moe_layer_kept_full_precision(LAYER, patterns, 4) is expected


def test_a_partly_listed_moe_layer_is_refused() -> None:
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.experts'.*experts \[0, 2\] of 4"):
        moe_layer_kept_full_precision(LAYER, [f"{LAYER}.0.down_proj", f"{LAYER}.2.gate_proj"], 4)


# ---------------------------------------------------------------------------------------------
# Whole stacked expert tensors (gpt-oss's load route)
# ---------------------------------------------------------------------------------------------


def test_stacked_tensor_gives_this_ranks_experts_and_block() -> None:
    n_experts, hidden, inter, tp = 5, 4, 6, 2
    # w13 as gpt-oss stores it, [E, H, 2I], gate/up interleaved; value = 1000 e + 10 j + u
    # for expert e, intermediate channel j, u = 0 (gate) or 1 (up).
    e = torch.arange(n_experts)[:, None, None]
    col = torch.arange(2 * inter)[None, None, :]
    full = (1000 * e + 10 * (col // 2) + col % 2).expand(n_experts, hidden, 2 * inter)
    expert_map = torch.tensor([-1, 1, -1, 0, 2], dtype=torch.int32)  # local 0 = global 3, ...
    order = local_expert_order(expert_map, n_experts)
    assert order == [3, 1, 4]
    assert local_expert_order(None, 3) == [0, 1, 2]
    part = narrow_stacked_expert_tensor(full, (3, hidden, 2 * inter // tp), order, tp_rank=1)
    # rank 1 holds intermediate channels 3, 4, 5: their gate and up columns, in pairs
    want_cols = torch.tensor([10 * j + u for j in range(3, 6) for u in (0, 1)])
    for local, g in enumerate(order):
        assert torch.equal(part[local, 0], 1000 * g + want_cols)
    w2 = torch.arange(n_experts * inter * hidden).reshape(n_experts, inter, hidden)  # [E, I, H]
    part2 = narrow_stacked_expert_tensor(w2, (3, inter // tp, hidden), order, tp_rank=0)
    assert torch.equal(part2, w2[order][:, : inter // tp])
    with pytest.raises(ValueError, match=r"shape \(5, 6, 4\).*parameter of shape \(3, 4\)"):
        narrow_stacked_expert_tensor(w2, (3, 4), order, 0)


# ---------------------------------------------------------------------------------------------
# Llama 4's rotary reordering of q/k, applied to AWQ tensors
# ---------------------------------------------------------------------------------------------


def test_llama4_rotary_order_is_vllms_view_transpose() -> None:
    """vLLM's loader: ``w.view(heads, D // 2, 2, K).transpose(1, 2).reshape(heads * D, K)``."""
    heads, head_size = 3, 8
    rows = torch.arange(heads * head_size)[:, None].expand(-1, 5)  # (N, K): row i holds i
    vllm_order = rows.view(heads, head_size // 2, 2, 5).transpose(1, 2).reshape(heads * head_size, 5)[:, 0]
    assert rotary_pair_order(heads, head_size) == vllm_order.tolist()
    q, k = 2 * 8, 1 * 8
    merged = qkv_rotary_order(2, 1, 8, 8)
    assert merged[:q] == rotary_pair_order(2, 8)
    assert merged[q : q + k] == [q + i for i in rotary_pair_order(1, 8)]
    assert merged[q + k :] == list(range(q + k, q + k + 8))  # v untouched


def test_permuted_awq_tensors_dequantize_to_the_permuted_weight() -> None:
    linear = nn.Linear(HIDDEN, 48, bias=False)
    linear.weight.data = torch.randn(48, HIDDEN, generator=torch.Generator().manual_seed(3))
    t = pack_linear(linear, AwqQuantConfig(bits=4, group_size=GROUP))
    order = qkv_rotary_order(2, 1, 16, 0)  # q 32 + k 16 = 48 outputs
    permuted = permute_awq_output_channels(t["qweight"], t["qzeros"], t["scales"], order)
    before = unpack(AwqPacked(t["qweight"], t["qzeros"], t["scales"])).dequantize(torch.float32)  # (N, K)
    after = unpack(AwqPacked(*permuted)).dequantize(torch.float32)
    assert torch.equal(after, before[order])
    assert not torch.equal(after, before)  # the order is not the identity
    with pytest.raises(ValueError, match="an order of 3 output channels for a layer with 48"):
        permute_awq_output_channels(t["qweight"], t["qzeros"], t["scales"], [0, 1, 2])


def test_per_expert_awq_tensors_are_stacked_as_gpt_oss_reads_them() -> None:
    """Our per-expert gate/up/down triples regrouped for vLLM's gpt-oss loader: the stacked w13's
    dequantized columns are the experts' gate and up columns interleaved, w2 is each down, the
    biases interleave the same way; other tensors pass through; a missing tensor is named."""
    from awq_plugin.integrations.vllm import stack_expert_tensors
    from awq_plugin.numerics.pack import AwqPacked, dequantize_packed, pack
    from awq_plugin.numerics.quant_ref import quantize as group_quantize

    generator = torch.Generator().manual_seed(0)
    n_experts, hidden, inter, group = 3, 64, 40, 8
    prefix = "model.layers.0.mlp.experts"
    weights, dense = [("model.embed_tokens.weight", torch.ones(2, 2))], {}
    for e in range(n_experts):
        for proj, (n, k) in (
            ("gate_proj", (inter, hidden)),
            ("up_proj", (inter, hidden)),
            ("down_proj", (hidden, inter)),
        ):
            w = torch.randn(n, k, generator=generator)
            packed = pack(group_quantize(w, 4, group, True))
            dense[(e, proj)] = dequantize_packed(packed)  # (N, K)
            for leaf in ("qweight", "qzeros", "scales"):
                weights.append((f"{prefix}.{e}.{proj}.{leaf}", getattr(packed, leaf)))
            weights.append((f"{prefix}.{e}.{proj}.bias", torch.randn(n, generator=generator)))
    out = dict(stack_expert_tensors(iter(weights), n_experts))
    assert torch.equal(out["model.embed_tokens.weight"], torch.ones(2, 2))
    for e in range(n_experts):
        w13 = AwqPacked(*(out[f"{prefix}.w13_{leaf}"][e] for leaf in ("qweight", "qzeros", "scales")))
        deq = dequantize_packed(w13)  # (2I, H): gate and up rows alternate
        assert torch.equal(deq[0::2], dense[(e, "gate_proj")]) and torch.equal(
            deq[1::2], dense[(e, "up_proj")]
        )
        w2 = AwqPacked(*(out[f"{prefix}.w2_{leaf}"][e] for leaf in ("qweight", "qzeros", "scales")))
        assert torch.equal(dequantize_packed(w2), dense[(e, "down_proj")])
    biases = dict(weights)
    assert torch.equal(out[f"{prefix}.gate_up_proj_bias"][1, 1::2], biases[f"{prefix}.1.up_proj.bias"])
    assert torch.equal(out[f"{prefix}.down_proj_bias"][2], biases[f"{prefix}.2.down_proj.bias"])
    incomplete = [(n, t) for n, t in weights if n != f"{prefix}.2.up_proj.scales"]
    with pytest.raises(ValueError, match=r"experts\.2\.up_proj\.scales is missing"):
        list(stack_expert_tensors(iter(incomplete), n_experts))
