"""Bad input never costs a user their file or a traceback from deep inside torch: NaN/Inf, overflow, and fuzzing
of the network_args parser and the file loader (the only failures allowed are our own ValueError/TypeError)."""

from __future__ import annotations

import math

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

from dora_network import create_network, create_network_from_weights, parse_network_args
from dora_network.args import _ALIASES, _PARSERS
from dora_network.targets import Target
from dora_network.loading import match_file


class TwoLayer(nn.Module):
    """A minimal 'model': one Transformer2DModel-named container with a Linear and a 1x1 and a 3x3 conv."""

    def __init__(self) -> None:
        super().__init__()
        block = nn.Module()
        block.__class__ = type("Transformer2DModel", (nn.Module,), {})
        block.proj_in = nn.Linear(6, 5)
        block.skip = nn.Conv2d(5, 4, 1)
        block.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.block = block


@pytest.fixture()
def small():
    unet = TwoLayer().requires_grad_(False)
    network = create_network(1.0, 2, 1, None, None, unet, conv_dim="2")
    return unet, network


def test_nan_weights_refuse_to_save_and_keep_previous_file(small, tmp_path):
    _, network = small
    file = tmp_path / "n.safetensors"
    network.save_weights(str(file), None, {})
    before = file.read_bytes()
    with torch.no_grad():
        network.lora_unet_block_proj_in.lora_up.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"refusing to save .*NaN/Inf in 1 modules \(e\.g\. \['lora_unet_block_proj_in'\]\)"
                                         r": the training diverged.*Any previous file there is intact"):
        network.save_weights(str(file), None, {})
    assert file.read_bytes() == before
    network.save_weights(str(tmp_path / "forced.safetensors"), None, {}, allow_nonfinite=True)


def test_fp16_overflow_is_refused_with_the_fix(small, tmp_path):
    _, network = small
    with torch.no_grad():
        network.lora_unet_block_skip.lora_up.weight.fill_(1e6)
    with pytest.raises(ValueError, match=r"overflow torch\.float16; save in bfloat16 or float32"):
        network.save_weights(str(tmp_path / "o.safetensors"), torch.float16, {})
    network.save_weights(str(tmp_path / "o.safetensors"), torch.bfloat16, {})


def test_nan_in_a_file_names_the_modules(small, tmp_path):
    unet, network = small
    sd = dict(network.state_dict())
    sd["lora_unet_block_conv.dora_scale"] = torch.full_like(sd["lora_unet_block_conv.dora_scale"], float("inf"))
    file = tmp_path / "inf.safetensors"
    safetensors.torch.save_file(sd, str(file))
    with pytest.raises(ValueError, match=r"NaN/Inf values in 1 modules \(e\.g\. \['lora_unet_block_conv'\]\)"):
        create_network_from_weights(1.0, str(file), None, None, unet)


_KEYS = sorted(list(_PARSERS) + list(_ALIASES) + ["conv_dims", "foo", "block_dims", "factor", "", "ALGO"])
_VALUES = st.one_of(
    st.sampled_from(["True", "false", "0", "1", "yes", "off", "maybe", "", "None", "8", "-1", "0.5", "1e9", "nan",
                     "inf", "dora", "lora", "locon", "loha", "full", "attn-only", "x=y", " 4 "]),
    st.text(max_size=8), st.floats(allow_nan=True), st.integers(-5, 100), st.none(), st.booleans(),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kwargs=st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=6),
       dim=st.one_of(st.none(), st.integers(-2, 64), st.sampled_from(["8", "x", "None"])),
       alpha=st.one_of(st.none(), st.floats(allow_nan=True), st.sampled_from(["1", "a"])))
def test_fuzz_network_args_only_clear_errors(kwargs, dim, alpha):
    try:
        args = parse_network_args(dim, alpha, None, **kwargs)
    except (ValueError, TypeError) as error:
        assert str(error).startswith("network_args:"), error
        return
    assert args.rank >= 1 and math.isfinite(args.alpha) and args.algo in ("dora", "lora")
    for p in (args.dropout, args.rank_dropout, args.module_dropout):
        assert p is None or 0 < p < 1


def _mutations():
    shapes = st.lists(st.integers(0, 7), min_size=0, max_size=4).map(tuple)
    suffix = st.sampled_from(["lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale", "junk"])
    name = st.sampled_from(["lora_unet_block_proj_in", "lora_unet_block_skip", "lora_unet_block_conv", "lora_te_x"])
    value = st.sampled_from([0.0, 1.0, float("nan"), float("inf"), -3.0])
    return st.lists(st.tuples(name, suffix, shapes, value), max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=_mutations(), drop=st.lists(st.integers(0, 11), max_size=3))
@example(mutations=[("lora_unet_block_conv", "dora_scale", (1, 4), 0.0)], drop=[])  # a bug it found once
def test_fuzz_loader_only_clear_errors(mutations, drop):
    unet = TwoLayer().requires_grad_(False)
    network = create_network(1.0, 2, 1, None, None, unet, conv_dim="2")
    sd = dict(network.state_dict())
    keys = sorted(sd)
    for index in drop:
        sd.pop(keys[index % len(keys)], None)
    for name, suffix, shape, fill in mutations:
        sd[f"{name}.{suffix}"] = torch.full(shape, fill)
    try:
        fresh, weights = create_network_from_weights(1.0, None, None, None, unet, weights_sd=sd)
    except (ValueError, TypeError):
        return
    fresh.apply_to(None, unet)
    out = unet.block.proj_in(torch.randn(2, 6))
    assert out.shape == (2, 5)
    fresh.restore()


@pytest.mark.parametrize("name, shape, expected", [
    # found by the fuzzer: a 2-D magnitude on a 3x3 conv used to pass the shape check and fail in load_state_dict
    ("lora_unet_block_conv", (1, 4), r"\(1, 4\), which fits neither \(out, 1, 1, 1\) = \(4, 1, 1, 1\) nor "
                                     r"\(1, in, 1, 1\) = \(1, 4, 1, 1\)"),
    ("lora_unet_block_proj_in", (1, 6, 1, 1), r"\(1, 6, 1, 1\), which fits neither \(out, 1\) = \(5, 1\) nor "
                                              r"\(1, in\) = \(1, 6\)"),
])
def test_dora_scale_of_another_rank_is_a_clear_error(name, shape, expected):
    unet = TwoLayer().requires_grad_(False)
    sd = dict(create_network(1.0, 2, 1, None, None, unet, conv_dim="2").state_dict())
    sd[f"{name}.dora_scale"] = torch.ones(shape)
    with pytest.raises(ValueError, match=rf"module '{name}': dora_scale has shape {expected}"):
        create_network_from_weights(1.0, None, None, None, unet, weights_sd=sd)


def test_targets_helper_accepts_minimal_model():
    unet = TwoLayer()
    network = create_network(1.0, 2, 1, None, None, unet, conv_dim="2")
    assert sorted(n for n, _ in network.named_children()) == [
        "lora_unet_block_conv", "lora_unet_block_proj_in", "lora_unet_block_skip"]
    assert isinstance(network.targets[0], Target)
    assert match_file(dict(network.state_dict()), network.targets).unmatched == []
