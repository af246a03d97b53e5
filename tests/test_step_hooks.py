"""The calls sd-scripts makes on the network every training step cost O(r (in + out)) per layer and report true values.

train_network.py calls update_grad_norms() and update_norms() after every backward, then weight_norms(),
grad_norms() and combined_weight_norms() with .mean().item(); --scale_weight_norms calls
apply_max_norm_regularization() after every optimizer step. A weight-sized tensor per layer there cost 47 s per
step on full-size SDXL, so these tests watch every aten op the hooks run.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from dora_network import create_network
from dora_network import functional as DF
from dora_network.layers import DoRAModule
from tiny_fixtures import batch, frozen_tiny_sdxl, loss_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op allocates (numel; views and in-place results are not new memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for tensor in torch.utils._pytree.tree_leaves(out):
            if (isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs
                    and tensor.numel() > self.numel):
                self.numel, self.op = tensor.numel(), func
        return out


def _trained_network(wd_on_out: bool, **extra: str):
    model = frozen_tiny_sdxl()
    network = create_network(1.0, 4, 2.0, None, model.text_encoders, model.unet, conv_dim="4", conv_alpha="2",
                             wd_on_out=str(wd_on_out), **extra)
    network.apply_to(model.text_encoders, model.unet, True, True)
    network.prepare_grad_etc(model.text_encoders, model.unet)
    with torch.no_grad():
        for module in network.loras:  # a trained-looking adapter: B != 0, m != ||W0||
            module.lora_up.weight.normal_(0.0, 0.05)
            module.dora_scale.mul_(1.1)
    return model, network


def _sd_scripts_step_hooks(network, max_norm: float | None = None):
    """Exactly what train_network.py calls after backward (and after the optimizer step)."""
    torch.nn.utils.clip_grad_norm_(network.get_trainable_params(), 1.0)
    network.update_grad_norms()
    network.update_norms()
    if max_norm is not None:
        return network.apply_max_norm_regularization(max_norm, "cpu")
    return (network.weight_norms().mean().item(), network.grad_norms().mean().item(),
            network.combined_weight_norms().mean().item(), network.weight_norms().max().item())


@pytest.mark.parametrize("wd_on_out", [False, True])
@pytest.mark.parametrize("max_norm", [None, 0.01])
def test_step_hooks_form_no_weight_sized_tensor(wd_on_out, max_norm):
    model, network = _trained_network(wd_on_out, use_tucker="True")
    loss_of(model, batch(0)).backward()
    largest_param = max(p.numel() for p in network.parameters())  # r * (in * k * k) or r * out
    largest_weight = max(m.base_weight.numel() for m in network.loras)
    assert largest_weight > 4 * max(largest_param, len(network.loras))  # the test can tell them apart
    lowrank_flops = sum(2 * m.rank * m.base_weight.numel() for m in network.loras)  # forming every B A once
    largest = LargestTensor()
    with largest, FlopCounterMode(display=False) as flops:
        _sd_scripts_step_hooks(network, max_norm)
    # nothing larger than an adapter parameter, or one number per adapter, is ever allocated
    assert largest.numel <= max(largest_param, len(network.loras)), (largest.op, largest.numel)
    # far below even one B A per layer (the old update_norms formed B A and W' for every layer)
    assert flops.get_total_flops() < 0.25 * lowrank_flops, (flops.get_total_flops(), lowrank_flops)


@pytest.mark.parametrize("wd_on_out", [False, True])
def test_norm_hooks_report_the_true_norms(wd_on_out):
    model, network = _trained_network(wd_on_out, use_tucker="True")
    loss_of(model, batch(0)).backward()
    network.update_grad_norms()
    network.update_norms()
    weight, combined, grads = network.weight_norms(), network.combined_weight_norms(), network.grad_norms()
    assert weight.shape == combined.shape == (len(network.loras),)
    with_grad = [m for m in network.loras if m.lora_up.weight.grad is not None]
    assert grads.shape == (len(with_grad),) and len(with_grad) == len(network.loras) - 6  # te1's unused last layer
    for module, grad_norm in zip(with_grad, grads):
        grad = torch.cat([p.grad.double().flatten() for p in module.parameters()])
        torch.testing.assert_close(grad_norm.double(), grad.norm(), rtol=1e-5, atol=1e-9)
    for i, module in enumerate(network.loras):
        up, down = module.lora_up.weight.double(), module.lora_down.weight.double()
        mid = module.lora_mid.weight.double() if module.use_tucker else None
        delta = DF.lowrank_delta(up, down, module.scale, mid)
        dora = DF.dora_weight(module.base_weight.double(), delta, module.dora_scale.double(), module.wd_on_out)
        torch.testing.assert_close(weight[i].double(), delta.norm(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(combined[i].double(), dora.norm(), rtol=1e-5, atol=1e-7)


def test_norm_hooks_without_a_forward_still_report_true_norms():
    """Outside sd-scripts' order (no forward since the last change) the DoRA norm is computed, still factored."""
    model, network = _trained_network(False)
    network.update_norms()
    module = network.loras[5]
    delta = DF.lowrank_delta(module.lora_up.weight.double(), module.lora_down.weight.double(), module.scale)
    dora = DF.dora_weight(module.base_weight.double(), delta, module.dora_scale.double(), False)
    torch.testing.assert_close(network.combined_weight_norms()[5].double(), dora.norm(), rtol=1e-5, atol=1e-7)


def test_plain_lora_network_has_no_combined_norm_and_grad_norms_skip_gradless_adapters():
    model = frozen_tiny_sdxl()
    network = create_network(1.0, 4, 2.0, None, model.text_encoders, model.unet, algo="lora")
    network.apply_to(model.text_encoders, model.unet, True, True)
    network.update_norms()
    assert network.combined_weight_norms() is None
    assert network.weight_norms().shape == (len(network.loras),)
    network.update_grad_norms()
    assert network.grad_norms() is None  # no backward yet
    network.unet_loras[0].lora_up.weight.grad = torch.ones_like(network.unet_loras[0].lora_up.weight)
    network.update_grad_norms()
    expected = network.unet_loras[0].lora_up.weight.numel() ** 0.5
    assert network.grad_norms().tolist() == pytest.approx([expected])


@pytest.mark.parametrize("tucker", [False, True])
def test_lowrank_frobenius_equals_the_formed_product(tucker):
    gen = torch.Generator().manual_seed(3)
    up = torch.randn(24, 5, 1, 1, generator=gen, dtype=torch.float64)
    down = torch.randn(5, 16, *((1, 1) if tucker else (3, 3)), generator=gen, dtype=torch.float64)
    mid = torch.randn(5, 5, 3, 3, generator=gen, dtype=torch.float64) if tucker else None
    expected = DF.lowrank_delta(up, down, 0.7, mid).norm()
    torch.testing.assert_close(DF.lowrank_frobenius(up, down, 0.7, mid), expected, rtol=1e-12, atol=0)


def test_max_norm_scales_only_adapters_above_the_cap():
    base = torch.nn.Linear(64, 48)
    modules = [DoRAModule(f"m{i}", base, 4, 4.0) for i in range(3)]
    with torch.no_grad():
        for scale, module in zip((0.0, 1e-3, 1.0), modules):
            module.lora_up.weight.normal_(0.0, 1.0).mul_(scale)
    from dora_network.step_hooks import max_norm_regularize

    before = [m.lowrank_norm().item() for m in modules]
    cap = (before[1] + before[2]) / 2
    scaled, mean, top = max_norm_regularize(modules, cap)
    after = [m.lowrank_norm().item() for m in modules]
    assert scaled == 1 and isinstance(mean, float) and isinstance(top, float)
    assert after[:2] == before[:2] and after[2] == pytest.approx(cap, rel=1e-5)
    assert top == pytest.approx(cap, rel=1e-6) and mean == pytest.approx(sum(after) / 3, rel=1e-5)
