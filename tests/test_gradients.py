"""The adapters' gradients against autograd of the explicit formula, in float64.

Our forward never forms W'; its backward must still be exactly that of
W(mu) = W0 + mu * (m * V / (||V||.detach() + eps) - W0), V = W0 + s B A (Tucker: V = W0 + s B T A), the default
detached norm (paper section 4.3): every gradient (x, lora_down, lora_mid, lora_up, dora_scale) for Linear, Conv 1x1,
Conv 3x3 and Tucker, both axes, three strengths, with and without a bias and an input that requires grad.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dora_network import DoRAModule
from dora_network import functional as DF

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KINDS = ["linear", "conv1x1", "conv3x3", "tucker"]


def _base(kind: str, bias: bool) -> nn.Module:
    if kind == "linear":
        base = nn.Linear(12, 10, bias=bias)
    else:
        base = nn.Conv2d(12, 10, 1 if kind == "conv1x1" else 3, padding=0 if kind == "conv1x1" else 1, bias=bias)
    return base.double().requires_grad_(False)


def _adapter(kind: str, wd_on_out: bool, mu: float, bias: bool) -> tuple[nn.Module, DoRAModule]:
    base = _base(kind, bias)
    adapter = DoRAModule("lora_unet_x", base, 4, 2.0, wd_on_out=wd_on_out, multiplier=mu,
                         use_tucker=kind == "tucker").double()
    with torch.no_grad():
        adapter.lora_up.weight.normal_(std=0.3)
        adapter.dora_scale.mul_(torch.rand_like(adapter.dora_scale) + 0.5)
    adapter.apply_to()
    return base, adapter


def _input(kind: str, requires_grad: bool) -> torch.Tensor:
    x = torch.randn(3, 5, 12, dtype=torch.float64) if kind == "linear" else torch.randn(2, 12, 7, 7,
                                                                                         dtype=torch.float64)
    return x.requires_grad_(requires_grad)


def _explicit(base: nn.Module, adapter: DoRAModule, x: torch.Tensor, mu: float) -> torch.Tensor:
    w0 = base.weight
    up, down = adapter.lora_up.weight, adapter.lora_down.weight
    mid = adapter.lora_mid.weight if adapter.use_tucker else None
    if mid is None:
        v = w0 + adapter.scale * (up.flatten(1) @ down.flatten(1)).reshape(w0.shape)
    else:  # B T A: (out, r) x (r, r, kh, kw) x (r, in)
        v = w0 + adapter.scale * torch.einsum("or,rshw,si->oihw", up.flatten(1), mid, down.flatten(1))
    norm = torch.linalg.vector_norm(v, dim=DF.norm_dims(v.ndim, adapter.wd_on_out), keepdim=True).detach()
    w = w0 + mu * (adapter.dora_scale * v / (norm + DF.EPS) - w0)
    if isinstance(base, nn.Linear):
        return F.linear(x, w, base.bias)
    return F.conv2d(x, w, base.bias, base.stride, base.padding)


def _grads(adapter: DoRAModule, x: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    params = [adapter.lora_down.weight, adapter.lora_up.weight, adapter.dora_scale]
    params += [adapter.lora_mid.weight] if adapter.use_tucker else []
    inputs = params + ([x] if x.requires_grad else [])
    return [y.detach()] + list(torch.autograd.grad(y, inputs, g))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wd_on_out", [False, True])
@pytest.mark.parametrize("mu", [0.5, 1.0, 1.5])
@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_match_the_explicit_formula(kind, wd_on_out, mu, x_grad, bias):
    base, adapter = _adapter(kind, wd_on_out, mu, bias)
    x = _input(kind, x_grad)
    y = base(x)
    g = torch.randn_like(y)
    ours = _grads(adapter, x, y, g)
    ref = _grads(adapter, x, _explicit(base, adapter, x, mu), g)
    assert len(ours) == len(ref) == 4 + adapter.use_tucker + x_grad
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
