"""Grouped (block-diagonal) linears: DeepSeek-V4's ``o_a_proj`` quantized as G linears side by side.

Recognised by what it computes (never by name); split into plain linears for every stage that
works on ``nn.Linear``; stored as one AWQ linear; run by :class:`AwqGroupedLinear`, whose kernel
output is checked group by group against the one reference (``tests/kernel_oracle.py``).
"""

from __future__ import annotations

import pytest
import torch
from kernel_oracle import Layer, auto_kernel_here, check_against_reference, make_layer
from test_families import tiny_model
from torch import nn

from awq_plugin.config import AwqQuantConfig
from awq_plugin.format.packing import pack_linear, packed_state_dict
from awq_plugin.models import as_plain_linears
from awq_plugin.models.grouped_linear import GroupedLinearSplit, input_groups, split_linear
from awq_plugin.numerics import pack as pack_mod
from awq_plugin.numerics.quant_ref import GroupQuantized
from awq_plugin.runtime.modeling import dequantize_awq_linears, swap_in_awq_linears
from awq_plugin.runtime.qlinear import AwqGroupedLinear


class Grouped(nn.Linear):
    """The math of DeepSeek-V4's ``DeepseekV4GroupedLinear``, written independently."""

    def __init__(self, k: int, n: int, groups: int, bias: bool = False) -> None:
        super().__init__(k, n, bias=bias)
        self.n_groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self.weight.view(self.n_groups, -1, self.in_features)  # (G, r, k)
        y = torch.einsum("...gk,grk->...gr", x, blocks)
        return y if self.bias is None else y + self.bias.view(self.n_groups, -1)


class Interleaved(nn.Linear):
    """Grouped, but group g owns rows g, g + G, ... : not the layout the split assumes."""

    def __init__(self, k: int, n: int, groups: int) -> None:
        super().__init__(k, n, bias=False)
        self.n_groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self.weight.view(-1, self.n_groups, self.in_features).transpose(0, 1)
        return torch.einsum("...gk,grk->...gr", x, blocks)


class Plain(nn.Linear):  # Falcon's FalconLinear: a linear's own forward, same math
    n_groups = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


def test_a_grouped_linear_is_recognised_by_what_it_computes() -> None:
    assert input_groups(Grouped(32, 48, 3)) == 3
    assert input_groups(Grouped(32, 48, 3, bias=True)) == 3
    assert input_groups(Interleaved(32, 48, 3)) is None  # same attribute, other math
    assert input_groups(Plain(32, 48)) is None
    assert input_groups(nn.Linear(32, 48)) is None
    with torch.device("meta"):  # the loaders' skeletons: proven on random weights of its shape
        assert input_groups(Grouped(32, 48, 3)) == 3


def test_deepseek_v4_output_projection_is_a_grouped_linear() -> None:
    model = tiny_model("deepseek_v4")
    assert input_groups(model.model.layers[0].self_attn.o_a_proj) == model.config.o_groups


@pytest.mark.parametrize("bias", [False, True])
def test_the_split_computes_the_same_and_keeps_the_state_dict(bias: bool) -> None:
    torch.manual_seed(0)
    grouped = Grouped(32, 48, 3, bias=bias)
    split = split_linear(grouped, 3)
    x = torch.randn(2, 5, 3, 32)
    torch.testing.assert_close(split(x), grouped(x), rtol=0, atol=1e-6)
    saved = split.state_dict()
    assert saved.keys() == grouped.state_dict().keys()
    for key, tensor in grouped.state_dict().items():
        assert torch.equal(saved[key], tensor), key
    with torch.device("meta"):
        fresh = split_linear(Grouped(32, 48, 3, bias=bias), 3)
    fresh.load_state_dict(grouped.state_dict(), assign=True)  # a source checkpoint loads unchanged
    assert torch.equal(fresh(x), split(x))


def test_a_whole_model_splits_without_changing_its_logits() -> None:
    model = tiny_model("deepseek_v4")
    ids = torch.randint(1, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    names = as_plain_linears(model)
    assert names == [f"model.layers.{i}.self_attn.o_a_proj" for i in range(model.config.num_hidden_layers)]
    assert all(isinstance(model.get_submodule(name), GroupedLinearSplit) for name in names)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_the_checkpoint_stores_one_awq_linear_the_same_as_the_whole_weight() -> None:
    """Group-wise rounding is per output row: the parts packed and joined are the whole packed."""
    torch.manual_seed(0)
    quant = AwqQuantConfig(bits=4, group_size=32)
    grouped = Grouped(64, 48, 3, bias=True)
    holder = nn.Module()
    holder.proj = split_linear(grouped, 3)
    state = packed_state_dict(holder, ["proj.0", "proj.1", "proj.2"], quant)
    whole = pack_linear(grouped, quant)
    assert set(state) == {f"proj.{leaf}" for leaf in whole}
    for leaf, tensor in whole.items():
        assert torch.equal(state[f"proj.{leaf}"], tensor), leaf
    with pytest.raises(ValueError, match="whole or not at all"):
        packed_state_dict(holder, ["proj.0"], quant)


def _rows(layer: Layer, start: int, stop: int) -> Layer:
    gq = layer.gq
    part = GroupQuantized(
        gq.q[start:stop], gq.scales[start:stop], gq.zeros[start:stop], gq.bits, gq.group_size
    )
    return Layer(part, pack_mod.pack(part))


def _grouped_awq(layer: Layer, groups: int, bias: torch.Tensor | None, backend: str) -> AwqGroupedLinear:
    n, k = layer.gq.q.shape
    module = AwqGroupedLinear(k, n, layer.gq.group_size, bias is not None, groups, backend=backend)
    module.qweight.copy_(layer.packed.qweight)
    module.qzeros.copy_(layer.packed.qzeros)
    module.scales.copy_(layer.packed.scales)
    if bias is not None:
        module.bias = bias.to(module.bias.dtype)
    return module


@pytest.mark.parametrize(
    ("k", "rows", "groups", "group_size", "m"),
    [(32, 8, 2, 32, 1), (96, 24, 3, 32, 7), (128, 16, 4, 64, 33), (40, 8, 5, 40, 3), (4096, 64, 2, 128, 17)],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_grouped_awq_linear_against_the_reference(k, rows, groups, group_size, m, with_bias) -> None:
    """Each group's output is the kernel on that group's rows: the reference's bounds, per group."""
    layer = make_layer(k, rows * groups, group_size, seed=k + m)
    gen = torch.Generator().manual_seed(m)
    bias = torch.randn(rows * groups, generator=gen) if with_bias else None
    x = torch.randn(2, m, groups, k, generator=gen)
    module = _grouped_awq(layer, groups, bias, backend=None)
    assert module.kernel_backend == auto_kernel_here()
    y = module(x)
    assert y.shape == (2, m, groups, rows)
    for g in range(groups):
        part = _rows(layer, g * rows, (g + 1) * rows)
        b = None if bias is None else bias[g * rows : (g + 1) * rows].to(torch.float16).float()
        check_against_reference(x[..., g, :].contiguous(), part, y[..., g, :], b)
    # The reference backend computes exactly the dequantized grouped math.
    exact = _grouped_awq(layer, groups, bias, backend="reference")(x)
    blocks = layer.w_hat.view(groups, rows, k)
    want = torch.einsum("...gk,grk->...gr", x, blocks)
    if bias is not None:
        want = want + bias.to(torch.float16).float().view(groups, rows)
    torch.testing.assert_close(exact, want, rtol=1e-5, atol=1e-5)


def test_the_loaders_build_and_dequantize_a_grouped_awq_linear() -> None:
    layer = make_layer(64, 48, 32)
    holder = nn.Module()
    with torch.device("meta"):
        holder.proj = Grouped(64, 48, 3, bias=False)
    swap_in_awq_linears(holder, ["proj"], 32, None, torch.float32)
    assert isinstance(holder.proj, AwqGroupedLinear) and holder.proj.input_groups == 3
    holder.load_state_dict(_packed_state(layer), assign=True)
    x = torch.randn(4, 3, 64, generator=torch.Generator().manual_seed(1))
    quantized = holder.proj(x)
    dequantize_awq_linears(holder)
    assert isinstance(holder.proj, GroupedLinearSplit)
    want = torch.einsum("tgk,grk->tgr", x, layer.w_hat.view(3, 16, 64))
    torch.testing.assert_close(holder.proj(x), want, rtol=1e-5, atol=1e-5)
    assert (quantized - want).abs().max() < 0.05 * want.abs().max()  # int8 activations, loosely


def _packed_state(layer: Layer) -> dict[str, torch.Tensor]:
    p = layer.packed
    return {"proj.qweight": p.qweight, "proj.qzeros": p.qzeros, "proj.scales": p.scales}


def test_a_grouped_awq_linear_refuses_channels_that_do_not_split() -> None:
    with pytest.raises(ValueError, match="does not split into 3 groups"):
        AwqGroupedLinear(64, 36, 32, False, 3)


def test_an_unpackable_grouped_linear_is_listed_by_the_name_loaders_see(tmp_path) -> None:
    """8 inputs per group cannot hold a group of 32: the grouped linear stays in full precision,
    listed in modules_to_not_convert as ``o_a_proj`` (not its parts), and reloads as itself."""
    import json

    from transformers import AutoModelForCausalLM

    import awq_plugin.integrations.transformers as awq_transformers
    from awq_plugin.api import quantize

    model = tiny_model("deepseek_v4", o_groups=8, o_lora_rank=64)  # 4 heads x 16 / 8 = 8 inputs
    model.save_pretrained(tmp_path / "src")
    ids = torch.randint(1, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    quantize(
        str(tmp_path / "src"), "uint4_wo_32", ids, out_dir=tmp_path / "awq", progress=False, guard="warn"
    )
    config = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    listed = [name for name in config["modules_to_not_convert"] if "o_a_proj" in name]
    assert listed == [f"model.layers.{i}.self_attn.o_a_proj" for i in range(model.config.num_hidden_layers)]
    awq_transformers.activate()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "awq").eval()
    assert type(loaded.model.layers[0].self_attn.o_a_proj) is type(model.model.layers[0].self_attn.o_a_proj)
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert torch.nn.functional.cosine_similarity(want.flatten(), got.flatten(), dim=0) > 0.99


def test_layouts_whose_loaders_would_run_a_grouped_linear_flat_are_refused(tmp_path, capsys) -> None:
    """compressed-tensors and GPTQ loaders would make o_a_proj one plain quantized linear: convert
    and quantize --format refuse, naming it, before writing anything."""
    from awq_plugin import cli
    from awq_plugin.api import quantize
    from awq_plugin.errors import CheckpointError
    from awq_plugin.format.convert import convert_checkpoint

    model = tiny_model("deepseek_v4")
    model.save_pretrained(tmp_path / "src")
    ids = torch.randint(1, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    quantize(
        str(tmp_path / "src"), "uint4_wo_32", ids, out_dir=tmp_path / "awq", progress=False, guard="warn"
    )
    for to in ("compressed-tensors", "gptq"):
        with pytest.raises(CheckpointError, match=r"self_attn\.o_a_proj .* grouped linear"):
            convert_checkpoint(tmp_path / "awq", tmp_path / to, to)
        assert not (tmp_path / to).exists()
    convert_checkpoint(tmp_path / "awq", tmp_path / "same", "autoawq")  # its own layout still converts
    argv = [
        "quantize",
        str(tmp_path / "src"),
        str(tmp_path / "ct"),
        "--format",
        "compressed-tensors",
        "--no-progress",
    ]
    assert cli.main(argv) != 0
    assert "grouped linear" in capsys.readouterr().err
    assert not (tmp_path / "ct").exists()
