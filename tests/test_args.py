"""args.py: every documented key and spelling, and the exact error for bad input."""

from __future__ import annotations

import logging

import pytest

from dora_network import NetworkArgs, parse_network_args
from dora_network.args import PRESETS


def test_defaults_are_the_decided_ones():
    args = parse_network_args(None, None, None)
    assert args == NetworkArgs()
    assert (args.rank, args.alpha, args.algo, args.wd_on_out, args.detach_norm) == (4, 4.0, "dora", False, True)
    assert args.conv_dim is None and args.preset == "full"


GOOD = [
    ({"algo": "dora"}, {"algo": "dora"}),
    ({"algo": "LoRA"}, {"algo": "lora"}),
    ({"algo": "locon"}, {"algo": "lora"}),
    ({"algo": "lora", "dora_wd": "True"}, {"algo": "dora"}),
    ({"algo": "locon", "dora_wd": "true"}, {"algo": "dora"}),
    ({"algo": "lora", "dora_wd": "False"}, {"algo": "lora"}),
    ({"conv_dim": "8", "conv_alpha": "4"}, {"conv_dim": 8, "conv_alpha": 4.0}),
    ({"conv_dim": "8.0"}, {"conv_dim": 8}),
    ({"wd_on_out": "True"}, {"wd_on_out": True}),
    ({"wd_on_output": "true"}, {"wd_on_out": True}),
    ({"wd_on_output": "False"}, {"wd_on_out": False}),
    ({"use_tucker": "yes", "conv_dim": "4"}, {"use_tucker": True}),
    ({"use_cp": "on", "conv_dim": "4"}, {"use_tucker": True}),
    ({"use_conv_cp": "1", "conv_dim": "4"}, {"use_tucker": True}),
    ({"disable_conv_cp": "True", "conv_dim": "4"}, {"use_tucker": False}),
    ({"disable_conv_cp": "False", "conv_dim": "4"}, {"use_tucker": True}),
    ({"detach_norm": "off"}, {"detach_norm": False}),
    ({"dora_simple": "0"}, {"detach_norm": False}),
    ({"dropout": "0.1", "rank_dropout": "0.2", "module_dropout": "0.05"},
     {"dropout": 0.1, "rank_dropout": 0.2, "module_dropout": 0.05}),
    ({"dropout": None}, {"dropout": None}),
    ({"dropout": 0.25}, {"dropout": 0.25}),
    ({"dropout": "0"}, {"dropout": None}),
    ({"rs_lora": "TRUE"}, {"rs_lora": True}),
    ({"preset": "attn-only"}, {"preset": "attn-only"}),
    ({"preset": "Unet-Transformer-Only"}, {"preset": "unet-transformer-only"}),
    ({"loraplus_lr_ratio": "16"}, {"loraplus_lr_ratio": 16.0}),
    ({"loraplus_unet_lr_ratio": "8", "loraplus_text_encoder_lr_ratio": "4"},
     {"loraplus_unet_lr_ratio": 8.0, "loraplus_text_encoder_lr_ratio": 4.0}),
    ({"bypass_mode": "False"}, {}),
    ({"bypass_mode": "True"}, {}),
    ({"use_scalar": "False", "train_norm": "false"}, {}),
    ({"enable_conv": "False", "conv_dim": "8"}, {"conv_dim": None}),
    ({"conv_dim": "None"}, {"conv_dim": None}),
]


@pytest.mark.parametrize("kwargs, expected", GOOD)
def test_accepted_inputs(kwargs, expected):
    args = parse_network_args(16, 8.0, None, **kwargs)
    for key, value in expected.items():
        assert getattr(args, key) == value, key


def test_lycoris_command_works_unchanged():
    """The GUI/LyCORIS DoRA command, only the module name changed."""
    args = parse_network_args(32, 16.0, None, algo="lora", dora_wd="True", wd_on_output="True", conv_dim="8",
                              conv_alpha="4", use_tucker="True", bypass_mode="False", preset="full", dropout=None)
    assert (args.algo, args.wd_on_out, args.conv_dim, args.conv_alpha, args.use_tucker) == ("dora", True, 8, 4.0, True)


def test_alias_logs_canonical_key(caplog):
    with caplog.at_level(logging.WARNING, logger="dora_network.args"):
        parse_network_args(4, 1, None, wd_on_output="True")
    assert "'wd_on_output' is LyCORIS' spelling; read as 'wd_on_out'" in caplog.text


@pytest.mark.parametrize("dim, alpha, rank, expected_alpha", [
    (None, None, 4, 4.0), ("None", 1, 4, 1.0), (32, None, 32, 32.0), (32, 0, 32, 32.0), (32, 16.0, 32, 16.0),
    ("16", "8", 16, 8.0), (8, 1, 8, 1.0),
])
def test_dim_and_alpha_forms(dim, alpha, rank, expected_alpha):
    args = parse_network_args(dim, alpha, None)
    assert (args.rank, args.alpha) == (rank, expected_alpha)


def test_neuron_dropout_and_dropout_precedence():
    assert parse_network_args(4, 1, 0.1).dropout == 0.1
    assert parse_network_args(4, 1, 0.1, dropout="0.3").dropout == 0.3
    assert parse_network_args(4, 1, None, dropout=None).dropout is None


BAD = [
    ({"conv_dims": "8"}, r"unknown key 'conv_dims' \(value '8'\)\. Did you mean 'conv_dim'\? Valid keys: .*conv_dim"),
    ({"wd_on_ouput": "True"}, r"unknown key 'wd_on_ouput'.*Did you mean 'wd_on_output'\?"),
    ({"normalization": "x"}, r"unknown key 'normalization'"),
    ({"conv_dim": "abc"}, r"conv_dim='abc' must be a positive integer, e\.g\. conv_dim=8"),
    ({"conv_dim": "0"}, r"conv_dim='0' must be a positive integer"),
    ({"conv_dim": "2.5"}, r"conv_dim='2.5' must be a positive integer"),
    ({"conv_alpha": "-1"}, r"conv_alpha='-1' must be a number in \[0, inf\), e\.g\. conv_alpha=4"),
    ({"dropout": "1.5"}, r"dropout='1.5' must be a number in \[0, 1\), e\.g\. dropout=0\.1"),
    ({"rank_dropout": "nan"}, r"rank_dropout='nan' must be a number in \[0, 1\)"),
    ({"module_dropout": "1"}, r"module_dropout='1' must be a number in \[0, 1\)"),
    ({"wd_on_out": "maybe"}, r"wd_on_out='maybe' is not a boolean\. Use one of true/false, 1/0, yes/no, on/off"),
    ({"dora_wd": "2"}, r"dora_wd='2' is not a boolean"),
    ({"algo": "loha"}, r"algo='loha' is not supported\. dora_network trains 'dora' \(default\) or plain 'lora'/'locon'; "
                       r"for LoHa/LoKr/other LyCORIS algorithms use --network_module=lycoris\.kohya"),
    ({"algo": "dora", "dora_wd": "False"}, r"algo=dora contradicts dora_wd=False"),
    ({"preset": "ful"}, r"preset='ful' is not a preset\. Did you mean 'full'\? Allowed: full, attn-mlp"),
    ({"preset": "my_preset.toml"}, r"preset='my_preset.toml' is not a preset\..*preset files are not supported"),
    ({"loraplus_lr_ratio": "0"}, r"loraplus_lr_ratio='0' must be greater than 0"),
    ({"use_scalar": "True"}, r"use_scalar='True' is not supported by dora_network: use_scalar is a LyCORIS-only option"),
    ({"block_dims": "2,4,4"}, r"'block_dims' is not supported by dora_network: block-wise ranks are not supported"),
    ({"factor": "4"}, r"'factor' is not supported by dora_network: it belongs to LoKr"),
    ({"constrain": "1"}, r"'constrain' is not supported by dora_network: it belongs to Diag-OFT"),
    ({"wd_on_out": "True", "wd_on_output": "False"}, r"'wd_on_out' is given twice with different values"),
]


@pytest.mark.parametrize("kwargs, message", BAD)
def test_bad_inputs_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        parse_network_args(4, 1, None, **kwargs)


@pytest.mark.parametrize("dim, message", [("abc", r"network_dim='abc' must be a positive integer"),
                                          (-4, r"network_dim=-4 must be a positive integer")])
def test_bad_dim(dim, message):
    with pytest.raises(ValueError, match=message):
        parse_network_args(dim, 1, None)


def test_every_preset_is_documented_in_readme():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for preset in PRESETS:
        assert f"`{preset}`" in readme, preset


def test_every_key_is_documented_in_readme():
    from pathlib import Path

    from dora_network.args import _ALIASES, _PARSERS
    from dora_network.families import FAMILIES

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    family_keys = [key for family in FAMILIES for key in family.options]
    for key in list(_PARSERS) + list(_ALIASES) + family_keys:
        assert f"`{key}`" in readme, key
