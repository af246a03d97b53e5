"""functional.py: every formula against its explicit definition, in float64, over random shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dora_network import functional as DF


def _explicit_norm(weight: torch.Tensor, wd_on_out: bool) -> torch.Tensor:
    """Column/row norms by a Python loop over the kept axis: the definition, not a reduction."""
    if wd_on_out:
        values = [weight[o].double().pow(2).sum().sqrt() for o in range(weight.shape[0])]
        return torch.stack(values).reshape((-1,) + (1,) * (weight.ndim - 1))
    values = [weight[:, i].double().pow(2).sum().sqrt() for i in range(weight.shape[1])]
    return torch.stack(values).reshape((1, -1) + (1,) * (weight.ndim - 2))


@settings(max_examples=60, deadline=None)
@given(
    out_dim=st.integers(1, 9), in_dim=st.integers(1, 9), rank=st.integers(1, 5), kernel=st.sampled_from([0, 1, 3]),
    wd_on_out=st.booleans(), seed=st.integers(0, 2**16),
)
def test_dora_weight_equals_explicit_formula(out_dim, in_dim, rank, kernel, wd_on_out, seed):
    gen = torch.Generator().manual_seed(seed)
    spatial = () if kernel == 0 else (kernel, kernel)
    w0 = torch.randn((out_dim, in_dim) + spatial, generator=gen, dtype=torch.float64)
    up = torch.randn((out_dim, rank) + ((1, 1) if kernel else ()), generator=gen, dtype=torch.float64)
    down = torch.randn((rank, in_dim) + spatial, generator=gen, dtype=torch.float64)
    scale = 0.7
    delta = DF.lowrank_delta(up, down, scale)
    # explicit s * B A, element by element through einsum over the flattened layout
    expected_delta = scale * torch.einsum("or,ri->oi", up.flatten(1), down.flatten(1)).reshape(w0.shape)
    torch.testing.assert_close(delta, expected_delta, rtol=1e-12, atol=1e-12)
    v = w0 + expected_delta
    magnitude = _explicit_norm(w0, wd_on_out) * (1 + torch.rand(_explicit_norm(w0, wd_on_out).shape, generator=gen,
                                                                dtype=torch.float64))
    expected = magnitude * v / (_explicit_norm(v, wd_on_out) + DF.EPS)
    torch.testing.assert_close(DF.dora_weight(w0, delta, magnitude, wd_on_out), expected, rtol=1e-12, atol=1e-12)


def test_magnitude_shapes_match_lycoris_layout():
    linear, conv = torch.randn(6, 4), torch.randn(6, 4, 3, 3)
    assert DF.weight_norm(linear, False).shape == (1, 4)
    assert DF.weight_norm(linear, True).shape == (6, 1)
    assert DF.weight_norm(conv, False).shape == (1, 4, 1, 1)
    assert DF.weight_norm(conv, True).shape == (6, 1, 1, 1)


def test_tucker_delta_equals_dense_chain():
    """up(mid(down(x))) as convs equals conv(x, s * B T A): the Tucker delta is the dense one."""
    up, mid, down = torch.randn(6, 3, 1, 1).double(), torch.randn(3, 3, 3, 3).double(), torch.randn(3, 5, 1, 1).double()
    x = torch.randn(2, 5, 7, 7).double()
    chain = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)
    dense = F.conv2d(x, DF.lowrank_delta(up, down, 1.0, mid), padding=1)
    torch.testing.assert_close(chain, dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("wd_on_out", [False, True])
@pytest.mark.parametrize("mu", [0.0, 0.3, 1.0, 1.7])
def test_activation_scales_reproduce_blended_weight(wd_on_out, mu):
    """base(x * c_b) + mu * s BA (x * c)  ==  W(mu) x  for in-axis, and the row form for out-axis."""
    w0, up, down = torch.randn(7, 5).double(), torch.randn(7, 2).double(), torch.randn(2, 5).double()
    delta = DF.lowrank_delta(up, down, 0.5)
    magnitude = DF.weight_norm(w0, wd_on_out) * 1.3
    x = torch.randn(4, 5).double()
    c_base, c = DF.activation_scales(DF.weight_norm(w0 + delta, wd_on_out), magnitude, mu)
    if wd_on_out:
        y = (x @ w0.T) * c_base.reshape(-1) + mu * (x @ delta.T) * c.reshape(-1)
    else:
        y = (x * c_base.reshape(-1)) @ w0.T + mu * (x * c.reshape(-1)) @ delta.T
    expected = x @ DF.blend(w0, DF.dora_weight(w0, delta, magnitude, wd_on_out), mu).T
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_norms_are_float32_and_finite_for_low_precision(dtype):
    """Rows of 4096 values of 192 overflow fp16 when squared in fp16 (192^2 * 4096 = 1.5e8 > 65504)."""
    weight = torch.full((3, 4096), 192.0).to(dtype)  # exact in fp8 e4m3
    norm = DF.weight_norm(weight, True)
    assert norm.dtype == torch.float32
    assert torch.isfinite(norm).all()
    torch.testing.assert_close(norm, torch.full((3, 1), 192.0 * 64.0), rtol=1e-3, atol=0)


def test_norm_gradient_flows_only_when_not_detached():
    w0, up, down = torch.randn(4, 3), torch.randn(4, 2, requires_grad=True), torch.randn(2, 3)
    magnitude = DF.weight_norm(w0, False).requires_grad_(True)
    norm = DF.adapted_norm(w0, up, down, 1.0, False)
    _, c = DF.activation_scales(norm.detach(), magnitude, 1.0)
    c.sum().backward()
    assert up.grad is None  # a detached norm is a constant: nothing flows to B through it
    torch.testing.assert_close(magnitude.grad, 1.0 / (DF.weight_norm(w0 + up.detach() @ down, False) + DF.EPS))
    _, c = DF.activation_scales(norm, magnitude, 1.0)
    c.sum().backward()
    assert up.grad is not None and up.grad.abs().sum() > 0


def test_eps_is_float32_machine_epsilon():
    assert DF.EPS == torch.finfo(torch.float32).eps
    assert math.isclose(DF.EPS, 1.1920928955078125e-07)


@settings(max_examples=60, deadline=None)
@given(
    out_dim=st.integers(1, 9), in_dim=st.integers(1, 9), rank=st.integers(1, 5), kernel=st.sampled_from([0, 1, 3]),
    tucker=st.booleans(), wd_on_out=st.booleans(), seed=st.integers(0, 2**16),
)
def test_factored_norm_equals_norm_of_formed_weight(out_dim, in_dim, rank, kernel, tucker, wd_on_out, seed):
    gen = torch.Generator().manual_seed(seed)
    spatial = () if kernel == 0 else (kernel, kernel)
    w0 = torch.randn((out_dim, in_dim) + spatial, generator=gen, dtype=torch.float64)
    up = torch.randn((out_dim, rank) + ((1, 1) if kernel else ()), generator=gen, dtype=torch.float64)
    mid = None
    if tucker and kernel:
        mid = torch.randn((rank, rank) + spatial, generator=gen, dtype=torch.float64)
        down = torch.randn((rank, in_dim, 1, 1), generator=gen, dtype=torch.float64)
    else:
        down = torch.randn((rank, in_dim) + spatial, generator=gen, dtype=torch.float64)
    expected = DF.weight_norm(w0 + DF.lowrank_delta(up, down, 0.3, mid), wd_on_out)
    got = DF.adapted_norm(w0, up, down, 0.3, wd_on_out, mid)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
