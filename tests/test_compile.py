"""torch.compile (sd-scripts' --torch_compile): adapters compile into the model's graph, with eager's numbers.

sd-scripts compiles the UNet through accelerate (inductor by default). An adapter that breaks the graph splits the
model into one graph per layer and recompiles per layer until dynamo's limit; here a model with every adapter kind
must compile into one graph with no break, give eager's outputs and gradients, and not recompile on later steps
(the optimizer changes the adapters' values, not what the graph guards on).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

from dora_network.layers import DoRAModule

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Block(nn.Module):
    """Linear, 3x3 conv (plain and Tucker), 1x1 conv, in a residual shape like the UNet's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(8, 16, 3, padding=1)
        self.conv_tucker = nn.Conv2d(16, 16, 3, padding=1)
        self.skip = nn.Conv2d(16, 12, 1)
        self.proj = nn.Linear(12, 20)
        self.out = nn.Linear(20, 12, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.conv_in(x))
        h = self.skip(h + self.conv_tucker(h))
        t = h.flatten(2).transpose(1, 2)  # (N, HW, C)
        return self.out(torch.nn.functional.gelu(self.proj(t)))


def _adapted(wd_on_out: bool) -> tuple[Block, list[DoRAModule]]:
    torch.manual_seed(0)
    block = Block().requires_grad_(False)
    adapters = []
    for name, layer in block.named_children():
        adapter = DoRAModule(f"lora_{name}", layer, 4, 2.0, wd_on_out=wd_on_out, use_tucker=name == "conv_tucker")
        with torch.no_grad():
            adapter.lora_up.weight.normal_(0.0, 0.1)
        adapter.apply_to()
        adapter.refresh_base_norm()  # what DoRANetwork.prepare_grad_etc does before training
        adapters.append(adapter)
    return block, adapters


def _steps(model, adapters, steps: int, after_first=lambda: None) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    params = [p for a in adapters for p in a.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.1)
    gen = torch.Generator().manual_seed(1)
    results = []
    for step in range(steps):
        x = torch.randn(2, 8, 6, 6, generator=gen).requires_grad_(True)  # as sd-scripts sets its latents
        y = model(x)
        y.square().mean().backward()
        results.append((y.detach(), [p.grad.clone() for p in params] + [x.grad.clone()]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            after_first()
    return results


@pytest.mark.parametrize("wd_on_out", [False, True])
def test_inductor_compiles_adapters_into_one_graph_with_eager_numbers(wd_on_out):
    block, adapters = _adapted(wd_on_out)
    eager = _steps(block, adapters, 3)

    block, adapters = _adapted(wd_on_out)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(block, backend="inductor")
    graphs = []
    steps = _steps(compiled, adapters, 3, after_first=lambda: graphs.append(counters["stats"]["unique_graphs"]))

    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs == [1]  # the whole block, adapters inlined
    assert counters["stats"]["unique_graphs"] == 1  # no recompilation on the next steps
    for (y_e, g_e), (y_c, g_c) in zip(eager, steps):
        torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-6)
        for a, b in zip(g_c, g_e):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
