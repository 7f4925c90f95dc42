"""torch.compile(fullgraph=True) traces the operators (fake kernels + autograd) without graph breaks."""

from __future__ import annotations

import pytest
import torch

import torch_wsl
import torch_wsl.nn.functional as TF
from conftest import DEVICES


class PreNormBlock(torch.nn.Module):
    """A pre-norm transformer block whose norms carry the residual stream (the fused-add pattern)."""

    def __init__(self, dim: int, heads: int = 4) -> None:
        super().__init__()
        self.norm1 = torch_wsl.nn.RMSNorm(dim)
        self.attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = torch_wsl.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        h, x = self.norm2(a, x)  # x = a + x; h = norm2(x)
        x = x + self.mlp(h)
        return TF.add_rms_norm(x, x, x.shape[-1:], self.norm1.weight)[0]


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_block_matches_eager(device, backend):
    torch.manual_seed(0)
    torch._dynamo.reset()
    block = PreNormBlock(64).to(device)
    x = torch.randn(2, 9, 64, device=device, requires_grad=True)
    eager_out = block(x)
    eager_out.square().sum().backward()
    eager_grads = [p.grad.clone() for p in block.parameters()] + [x.grad.clone()]
    block.zero_grad()
    x.grad = None

    compiled = torch.compile(block, fullgraph=True, backend=backend)
    out = compiled(x)
    out.square().sum().backward()
    grads = [p.grad for p in block.parameters()] + [x.grad]
    torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-5)
    for g, ref in zip(grads, eager_grads):
        torch.testing.assert_close(g, ref, atol=1e-4, rtol=1e-4)


def test_compiled_graph_calls_the_fused_operators():
    """The traced graph keeps torch_wsl's operators (no decomposition, no graph break)."""
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(lambda x, r, w: TF.add_layer_norm(x, r, (16,), w), fullgraph=True, backend=backend)
    x, r, w = torch.randn(3, 16), torch.randn(3, 16), torch.randn(16)
    out, res = fn(x, r, w)
    assert any("torch_wsl.add_layer_norm" in s for s in seen), seen
    torch.testing.assert_close(res, x + r)
