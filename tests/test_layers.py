"""layers.py: each adapter kind and axis against the explicit DoRA weight, and the invariants around it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dora_network import DoRAModule
from dora_network import functional as DF

KINDS = ["linear", "conv1x1", "conv3x3", "conv3x3_stride2", "tucker"]


def make_base(kind: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    if kind == "linear":
        base = nn.Linear(12, 10)
    elif kind == "conv1x1":
        base = nn.Conv2d(12, 10, 1)
    elif kind == "conv3x3_stride2":
        base = nn.Conv2d(12, 10, 3, stride=2, padding=1)
    else:
        base = nn.Conv2d(12, 10, 3, padding=1)
    return base.to(dtype).requires_grad_(False)


def make_input(kind: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(3, 5, 12, dtype=dtype) if kind == "linear" else torch.randn(2, 12, 9, 9, dtype=dtype)


def make_adapter(kind: str, wd_on_out: bool, trained: bool = True, **kwargs) -> tuple[nn.Module, DoRAModule]:
    base = make_base(kind)
    adapter = DoRAModule("lora_unet_x", base, 4, 2.0, wd_on_out=wd_on_out, use_tucker=kind == "tucker", **kwargs)
    adapter.double()
    if trained:  # move away from the B = 0, m = ||W0|| starting point
        with torch.no_grad():
            adapter.lora_up.weight.normal_(std=0.3)
            if adapter.dora:
                adapter.dora_scale.mul_(torch.rand_like(adapter.dora_scale) + 0.5)
    adapter.apply_to()
    return base, adapter


def run_with_weight(base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(base, nn.Linear):
        return F.linear(x, weight, base.bias)
    return F.conv2d(x, weight, base.bias, base.stride, base.padding, base.dilation)


def explicit_weight(base: nn.Module, adapter: DoRAModule, mu: float) -> torch.Tensor:
    """W0 + mu * (m * V / (||V|| + eps) - W0), V = W0 + (alpha/r) * B A, written out in float64."""
    w0 = base.weight.double()
    up, down = adapter.lora_up.weight.double(), adapter.lora_down.weight.double()
    if adapter.use_tucker:
        delta = torch.einsum("oa,abhw,bi->oihw", up.flatten(1), adapter.lora_mid.weight.double(), down.flatten(1))
    else:
        delta = (up.flatten(1) @ down.flatten(1)).reshape(w0.shape)
    v = w0 + (float(adapter.alpha) / adapter.rank) * delta
    dims = [d for d in range(v.ndim) if d != (0 if adapter.wd_on_out else 1)]
    w_dora = adapter.dora_scale.double() * v / (v.pow(2).sum(dim=dims, keepdim=True).sqrt() + DF.EPS)
    return w0 + mu * (w_dora - w0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wd_on_out", [False, True])
@pytest.mark.parametrize("mu", [1.0, 0.5, 1.5])
def test_forward_equals_explicit_dora_weight(kind, wd_on_out, mu):
    base, adapter = make_adapter(kind, wd_on_out, multiplier=mu)
    adapter.eval()
    x = make_input(kind)
    expected = run_with_weight(base, x, explicit_weight(base, adapter, mu))
    torch.testing.assert_close(base(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wd_on_out", [False, True])
def test_dora_scale_shape_is_lycoris_2d_or_4d(kind, wd_on_out):
    _, adapter = make_adapter(kind, wd_on_out, trained=False)
    ndim = 2 if kind == "linear" else 4
    expected = (10,) + (1,) * (ndim - 1) if wd_on_out else (1, 12) + (1,) * (ndim - 2)
    assert tuple(adapter.dora_scale.shape) == expected


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wd_on_out", [False, True])
def test_output_equals_base_at_init(kind, wd_on_out):
    base, adapter = make_adapter(kind, wd_on_out, trained=False)
    x = make_input(kind)
    reference = adapter.base_layer.__class__.forward(base, x)
    # B = 0 and m = ||W0||: W' = W0 * ||W0|| / (||W0|| + eps), equal up to eps / ||W0||
    torch.testing.assert_close(base(x), reference, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wd_on_out", [False, True])
def test_multiplier_zero_is_exactly_the_base(kind, wd_on_out):
    base, adapter = make_adapter(kind, wd_on_out, multiplier=0.0)
    x = make_input(kind)
    assert torch.equal(base(x), base.__class__.forward(base, x))


@pytest.mark.parametrize("kind", KINDS)
def test_restore_gives_the_base_forward_exactly(kind):
    base, adapter = make_adapter(kind, False)
    x = make_input(kind)
    before = base.__class__.forward(base, x)
    adapter.restore()
    assert "forward" not in base.__dict__
    assert torch.equal(base(x), before)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wd_on_out", [False, True])
@pytest.mark.parametrize("mu", [1.0, 0.7])
def test_merged_weight_equals_unmerged_forward(kind, wd_on_out, mu):
    base, adapter = make_adapter(kind, wd_on_out, multiplier=mu)
    adapter.eval()
    x = make_input(kind)
    unmerged = base(x)
    merged = run_with_weight(base, x, adapter.merged_weight())
    torch.testing.assert_close(merged, unmerged, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wd_on_out", [False, True])
def test_gradients_reach_adapter_and_not_base(kind, wd_on_out):
    base, adapter = make_adapter(kind, wd_on_out)
    base.requires_grad_(True)  # would receive gradients if the adapter leaked them
    base(make_input(kind)).square().sum().backward()
    names = ["lora_down.weight", "lora_up.weight", "dora_scale"] + (["lora_mid.weight"] if kind == "tucker" else [])
    grads = dict(adapter.named_parameters())
    for name in names:
        assert grads[name].grad is not None and grads[name].grad.abs().sum() > 0, name
    # the base weight gets a gradient only through the base path; the adapter never writes or owns it
    assert all(p is not base.weight for p in adapter.parameters())
    assert "base_layer" not in dict(adapter.named_modules())


def test_plain_lora_forward_is_base_plus_scaled_lowrank():
    base, adapter = make_adapter("linear", False, dora=False, multiplier=0.8)
    assert not hasattr(adapter, "dora_scale")
    x = make_input("linear")
    delta = (float(adapter.alpha) / adapter.rank) * adapter.lora_up.weight @ adapter.lora_down.weight
    torch.testing.assert_close(base(x), F.linear(x, base.weight + 0.8 * delta, base.bias))


def test_rs_lora_stores_alpha_times_sqrt_rank():
    adapter = DoRAModule("x", make_base("linear"), 4, 2.0, rs_lora=True)
    assert float(adapter.alpha) == pytest.approx(4.0)  # alpha * sqrt(r): every loader's alpha/r = 2/sqrt(4)
    assert adapter.scale == pytest.approx(2.0 / 4 ** 0.5)


def test_alpha_zero_means_rank():
    assert float(DoRAModule("x", make_base("linear"), 8, 0).alpha) == 8.0


def test_dropouts_only_act_in_training():
    base, adapter = make_adapter("linear", False, dropout=0.5, rank_dropout=0.5, module_dropout=0.5)
    x = make_input("linear")
    adapter.eval()
    first, second = base(x), base(x)
    assert torch.equal(first, second)
    adapter.train()
    outs = {tuple(base(x).flatten()[:4].tolist()) for _ in range(8)}
    assert len(outs) > 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_matches_float32_reference(dtype):
    """sd-scripts --full_bf16: base and network in half precision; the norm is still float32."""
    base32 = make_base("linear", torch.float32)
    adapter = DoRAModule("x", base32, 4, 2.0)
    with torch.no_grad():
        adapter.lora_up.weight.normal_(std=0.3)
    x = torch.randn(4, 12)
    expected = F.linear(x, adapter.merged_weight(), base32.bias)
    base_half = make_base("linear", torch.float32)
    base_half.load_state_dict(base32.state_dict())
    base_half.to(dtype)
    half = DoRAModule("x", base_half, 4, 2.0)
    half.load_state_dict(adapter.state_dict())
    half.to(dtype)
    half.apply_to()
    out = base_half(x.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2)


def test_float8_base_weight_norm_and_merge_are_finite():
    """--fp8_base casts the base to float8_e4m3fn after the network is built."""
    base = make_base("linear", torch.float32)
    adapter = DoRAModule("x", base, 4, 2.0)
    base.weight.data = base.weight.data.to(torch.float8_e4m3fn)
    merged = adapter.merged_weight()
    assert merged.dtype == torch.float32 and torch.isfinite(merged).all()


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpoint_recompute_reuses_the_detached_norm(reentrant, monkeypatch):
    """Gradient checkpointing runs the forward twice; the (detached) norm is computed once."""
    from torch.utils.checkpoint import checkpoint

    base, adapter = make_adapter("linear", False)
    calls = []
    original = DF.adapted_norm
    monkeypatch.setattr(DF, "adapted_norm", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = make_input("linear").requires_grad_(True)
    checkpoint(base, x, use_reentrant=reentrant).sum().backward()
    assert len(calls) == 1
    with_ckpt = adapter.lora_up.weight.grad.clone()
    adapter.zero_grad()
    base(x).sum().backward()
    torch.testing.assert_close(adapter.lora_up.weight.grad, with_ckpt, rtol=1e-12, atol=1e-12)


def test_norm_follows_writes_that_bypass_version_counters():
    """bitsandbytes-style optimizers write p.data without bumping versions: the next forward must see it."""
    base, adapter = make_adapter("linear", False)
    adapter.eval()
    x = make_input("linear")
    base(x)
    adapter.lora_up.weight.data.add_(0.5)  # .data writes are invisible to the version counter
    expected = run_with_weight(base, x, explicit_weight(base, adapter, 1.0))
    torch.testing.assert_close(base(x), expected, rtol=1e-10, atol=1e-10)


def test_scale_follows_every_change_of_the_alpha_buffer():
    """s = alpha / r is memoised (a GPU float() would stall every forward); any write, load, cast or move shows."""
    base, adapter = make_adapter("linear", False)
    assert adapter.scale == float(adapter.alpha) / adapter.rank
    adapter.alpha.fill_(3.0)  # in place (DoRAModule.conform)
    assert adapter.scale == 3.0 / adapter.rank
    state = adapter.state_dict()
    state["alpha"] = torch.tensor(5.0)
    adapter.load_state_dict(state)  # copy_ into the buffer (sd-scripts' load_state_dict path)
    assert adapter.scale == 5.0 / adapter.rank
    adapter.alpha = torch.tensor(7.0)  # replaced outright (as Module.to/_apply does)
    assert adapter.scale == 7.0 / adapter.rank
    x = make_input("linear")
    with torch.no_grad():
        adapter.alpha.fill_(1.0)
        expected = run_with_weight(base, x, adapter.merged_weight())
    torch.testing.assert_close(base(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wd_on_out", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grad_forward_equals_no_grad_forward_bit_for_bit(kind, wd_on_out, dtype):
    """Gradient checkpointing runs the no-grad path first and the autograd path in backward: same numbers."""
    base, adapter = make_adapter(kind, wd_on_out)
    base.to(dtype)
    adapter.to(dtype)
    x = make_input(kind, dtype).requires_grad_(True)
    with torch.no_grad():
        plain = base(x)
    assert torch.equal(base(x), plain)
