"""targets.py + unet_names.py: exact sd-scripts names on SDXL, classic TE names, SAI <-> diffusers both ways."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from dora_network import create_network
from dora_network.targets import find_targets
from dora_network.families.sdxl import diffusers_to_sai, sai_to_diffusers
from sdxl_standin import build_sai_sdxl_unet, build_sdxl_text_encoders

GOLDEN = Path(__file__).resolve().parent / "golden"


def read_golden(name: str) -> list[tuple[str, str, int, int, str]]:
    with open(GOLDEN / name, newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return [(r["lora_name"], r["kind"], int(r["in"]), int(r["out"]), r["kernel"]) for r in rows]


def describe(targets) -> list[tuple[str, str, int, int, str]]:
    rows = []
    for t in targets:
        w = t.module.weight
        kernel = "-" if w.ndim == 2 else f"{w.shape[2]}x{w.shape[3]}"
        kind = "Linear" if w.ndim == 2 else f"Conv2d_{kernel}"  # the golden files' spelling
        rows.append((t.lora_name, kind, int(w.shape[1]), int(w.shape[0]), kernel))
    return rows


@pytest.fixture(scope="module")
def sdxl_meta():
    """sd-scripts' SDXL UNet and both text encoders at full size, on the meta device (no memory)."""
    return build_sdxl_text_encoders(device="meta"), build_sai_sdxl_unet(device="meta")


@pytest.mark.parametrize("golden, conv", [("sdxl_targets_default.tsv", False), ("sdxl_targets_conv.tsv", True)])
def test_sdxl_names_equal_sd_scripts_golden(sdxl_meta, golden, conv):
    text_encoders, unet = sdxl_meta
    targets = find_targets(text_encoders, unet, with_conv_blocks=conv)
    expected = read_golden(golden)
    assert len(expected) == (1052 if conv else 986)
    got = describe(targets)
    assert sorted(got) == sorted(expected)
    assert [row[0] for row in got] == [row[0] for row in expected]  # sd-scripts' order too


def test_create_network_on_meta_sdxl_builds_exact_golden_modules(sdxl_meta):
    text_encoders, unet = sdxl_meta
    network = create_network(1.0, 4, 1.0, None, text_encoders, unet, neuron_dropout=None, conv_dim="8",
                             conv_alpha="4", dropout=None)
    names = {n for n, _ in network.named_children()}
    assert names == {row[0] for row in read_golden("sdxl_targets_conv.tsv")}
    assert all(p.device.type == "meta" for p in network.parameters())


def test_text_encoder_names_are_classic_on_transformers_5(sdxl_meta):
    text_encoders, _ = sdxl_meta
    names = [t.lora_name for t in find_targets(text_encoders, None)]
    assert names[0].startswith("lora_te1_text_model_encoder_layers_0_self_attn_")
    assert all(n.startswith(("lora_te1_text_model_", "lora_te2_text_model_")) for n in names)


def test_single_text_encoder_uses_lora_te_prefix(sdxl_meta):
    text_encoders, _ = sdxl_meta
    names = [t.lora_name for t in find_targets([text_encoders[0]], None)]
    assert names and all(n.startswith("lora_te_text_model_encoder_layers_") for n in names)


@pytest.mark.parametrize("preset, expect_te, expect_conv, only_attn", [
    ("full", True, True, False), ("attn-mlp", True, False, False), ("attn-only", True, False, True),
    ("unet-only", False, True, False), ("unet-transformer-only", False, False, False),
])
def test_presets_choose_layers(sdxl_meta, preset, expect_te, expect_conv, only_attn):
    text_encoders, unet = sdxl_meta
    network = create_network(1.0, 4, 1, None, text_encoders, unet, conv_dim="4", preset=preset)
    names = [n for n, _ in network.named_children()]
    assert any(n.startswith("lora_te") for n in names) == expect_te
    assert any(n.endswith(("in_layers_2", "out_layers_3", "_op")) for n in names) == expect_conv
    if only_attn:
        assert all(("attn1" in n or "attn2" in n or "self_attn" in n) for n in names)
        assert not any("mlp" in n or "ff_net" in n or "proj_in" in n for n in names)


def test_conv3x3_only_with_conv_dim(sdxl_meta):
    text_encoders, unet = sdxl_meta
    default = create_network(1.0, 4, 1, None, text_encoders, unet)
    assert all(m.kind != "conv" for m in default.unet_loras)
    assert len(default.unet_loras) == 722


def test_no_class_state_is_mutated_between_networks(sdxl_meta):
    """sd-scripts' LoRANetwork appends conv targets to a class list; a later default network then grows."""
    text_encoders, unet = sdxl_meta
    create_network(1.0, 4, 1, None, text_encoders, unet, conv_dim="4")
    assert len(create_network(1.0, 4, 1, None, text_encoders, unet).unet_loras) == 722


def test_sai_and_diffusers_names_map_both_ways():
    """The tiny SAI stand-in and the tiny diffusers UNet have the same layers under the two spellings."""
    from dora_network.tiny import build_tiny_sdxl

    model = build_tiny_sdxl(seed=0)
    cfg = model.unet.config
    sai = build_sai_sdxl_unet(
        model_channels=cfg.block_out_channels[0], channel_mult=(1, 2, 4), transformer_depth=(0, 2, 2),
        context_dim=cfg.cross_attention_dim, adm_in_channels=cfg.projection_class_embeddings_input_dim,
        num_head_channels=cfg.block_out_channels[0] // cfg.attention_head_dim[0], device="meta",
    )
    diff_targets = {t.path: tuple(t.module.weight.shape) for t in find_targets([], model.unet, with_conv_blocks=True)}
    sai_targets = {t.path: tuple(t.module.weight.shape) for t in find_targets([], sai, with_conv_blocks=True)}
    assert len(diff_targets) == len(sai_targets) > 100
    mapped = {sai_to_diffusers(path): shape for path, shape in sai_targets.items()}
    assert mapped == diff_targets
    assert {diffusers_to_sai(path): shape for path, shape in diff_targets.items()} == sai_targets


@pytest.mark.parametrize("sai, diffusers", [
    ("input_blocks.4.1.transformer_blocks.0.attn1.to_q", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("input_blocks.8.0.skip_connection", None),
    ("input_blocks.7.0.skip_connection", "down_blocks.2.resnets.0.conv_shortcut"),
    ("input_blocks.3.0.op", "down_blocks.0.downsamplers.0.conv"),
    ("middle_block.2.emb_layers.1", "mid_block.resnets.1.time_emb_proj"),
    ("output_blocks.5.2.conv", "up_blocks.1.upsamplers.0.conv"),
    ("output_blocks.8.0.out_layers.3", "up_blocks.2.resnets.2.conv2"),
    ("output_blocks.2.1.proj_out", "up_blocks.0.attentions.2.proj_out"),
    ("out.2", "conv_out"),
])
def test_known_sdxl_name_pairs(sai, diffusers):
    if diffusers is None:  # resnets without a channel change have no skip conv; the mapping still renames it
        assert sai_to_diffusers(sai) == "down_blocks.2.resnets.1.conv_shortcut"
        return
    assert sai_to_diffusers(sai) == diffusers
    assert diffusers_to_sai(diffusers) == sai


def test_non_unet_paths_do_not_map():
    assert sai_to_diffusers("text_model.encoder.layers.0.mlp.fc1") is None
    assert diffusers_to_sai("foo.bar") is None
