"""``torch.ops.awq_plugin.awq_gemm`` under ``torch.compile`` (vLLM compiles models)."""

import pytest
import torch

import awq_plugin.kernels as kernels
from awq_plugin.numerics import pack, quant_ref


class TinyAwqMlp(torch.nn.Module):
    """Two AWQ linears around a nonlinearity: enough graph for the compiler to fuse around."""

    def __init__(self, up: kernels.AwqKernelWeight, down: kernels.AwqKernelWeight, bias: torch.Tensor):
        super().__init__()
        self.up, self.down = up, down
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(kernels.awq_linear(x, self.up, self.bias))
        return kernels.awq_linear(h, self.down) * 2


def prepared(k: int, n: int, group_size: int, backend: str, seed: int) -> kernels.AwqKernelWeight:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05  # (N, K)
    p = pack.pack(quant_ref.quantize(w, 4, group_size))
    return kernels.prepare_awq_weight(p.qweight, p.qzeros, p.scales, group_size, backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "avx2", "portable", "reference"])
def test_compiled_module_matches_eager(backend: str) -> None:
    if backend == "cpu" and "cpu" not in kernels.available_backends():
        pytest.skip("CPU kernel unavailable on this machine")
    torch._dynamo.reset()
    model = TinyAwqMlp(
        prepared(256, 136, 64, backend, seed=1),
        prepared(136, 64, -1, backend, seed=2),
        torch.randn(136, dtype=torch.bfloat16),
    )
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for shape in [(3, 256), (2, 7, 256)]:  # a second shape exercises the fake kernel's symbolic M
        x = torch.randn(*shape, dtype=torch.bfloat16)
        expected = model(x)
        got = compiled(x)
        assert got.shape == (*shape[:-1], 64) and got.dtype == torch.bfloat16
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
