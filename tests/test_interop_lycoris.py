"""Parity with LyCORIS 4.1.3 (``lycoris.kohya``, ``algo=lora dora_wd=True``) and PEFT DoRA, on the tiny SDXL model.

What is proven here, on CPU in float32:

1. Same model, same tensors: our network and LyCORIS' (same command-line spelling, a TOML preset targeting the
   same layers) have the same modules and key shapes, give the same UNet output and the same merged weight per
   module.
2. Files both ways: LyCORIS files (output axis, and input axis, which LyCORIS itself cannot reload) load in ours
   with LyCORIS' own merged weights; our output-axis file loads in LyCORIS with our merged weights (UNet and the
   text encoder whose module paths LyCORIS spells like us).
3. The documented differences stay true: LyCORIS' multiplier 0 is W0 + sBA (ours is the base model), and LyCORIS
   does not detach the norm (its gradient equals ours with ``detach_norm=False``, not our default).
4. PEFT ``use_dora=True`` merged weights equal ours (output axis) on a single Linear and Conv2d.

Measured maxima are printed (``pytest -s``) so regressions in precision show up in logs.
"""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import lycoris  # noqa: F401 - a real test dependency: this file must fail, not skip, without it
import lycoris.kohya as lk
import pytest
import toml
import torch
import torch.nn.functional as F
from lycoris.kohya import LycorisNetworkKohya
from lycoris.utils.preset import read_preset
from safetensors.torch import load_file
from torch import nn

from dora_network import DoRAModule, create_network, create_network_from_weights
from tiny_fixtures import PROMPTS, batch, frozen_tiny_sdxl, unet_output

# The exact LyCORIS command line (`--network_args`), plus the dropout sd-scripts injects; ours must accept it too.
LYCO_ARGS = dict(algo="lora", dora_wd="True", wd_on_output="True", conv_dim="4", conv_alpha="2", dropout=None)
DIM, ALPHA = 4, 2.0
# The layers our default (with conv_dim) targets, as a LyCORIS preset. LyCORIS' built-in `full` crashes on diffusers
# UNets in 4.1.3 (TimestepEmbedding is both a class and a name target) and also adds conv_in/conv_out/time_embedding.
PRESET = {
    "enable_conv": True,
    "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
    "unet_target_name": [],
    "text_encoder_target_module": ["CLIPAttention", "CLIPMLP"],
    "text_encoder_target_name": [],
}
PROMPT = PROMPTS[:1]  # batch of one: the comparisons do not need more, and CPU time is the budget

FWD_ATOL = 1e-5  # UNet output (|y| ~ 2): measured ~1e-6
WEIGHT_ATOL = 1e-6  # merged weights (|W| <~ 1): measured ~1e-7


def _out(model, data):
    return unet_output(model, data, PROMPT)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def _te_needs_text_model(model) -> dict[str, bool]:
    """Per TE prefix: True where the encoder has no ``text_model`` level (transformers 5 CLIPTextModel).

    There LyCORIS writes ``lora_teN_encoder_...`` while we keep the classic ``lora_teN_text_model_encoder_...``.
    """
    return {f"lora_te{i + 1}_": not hasattr(te, "text_model") for i, te in enumerate(model.text_encoders)}


def _lycoris_name(ours_name: str, short_te: dict[str, bool]) -> str:
    for prefix, short in short_te.items():
        if short and ours_name.startswith(prefix + "text_model_"):
            return prefix + ours_name[len(prefix + "text_model_"):]
    return ours_name


def _randomize(modules, seed: int) -> None:
    """lora_up non-zero and dora_scale moved off ||W0||, so every term of the formula matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=gen) * 0.1)
            module.dora_scale.mul_(1 + 0.1 * torch.randn(module.dora_scale.shape, generator=gen))


def _lycoris_network(model, preset_path, **overrides):
    args = {**LYCO_ARGS, **overrides}
    return lk.create_network(1.0, DIM, ALPHA, None, model.text_encoders, model.unet, preset=str(preset_path), **args)


@pytest.fixture(scope="module")
def preset_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("lycoris") / "dora_network_targets.toml"
    with open(path, "w") as handle:
        toml.dump(PRESET, handle)
    return path


@pytest.fixture(scope="module", autouse=True)
def _quiet_single_threaded():
    """LyCORIS logs every module at INFO; one thread is several times faster for these tiny ops (and on a busy CI)."""
    logger = logging.getLogger("LyCORIS")
    level, threads = logger.level, torch.get_num_threads()
    logger.setLevel(logging.WARNING)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    logger.setLevel(level)


@pytest.fixture(scope="module")
def pair(preset_path, tmp_path_factory):
    """Ours and LyCORIS on two identical tiny models, holding the same random tensors, applied, in eval mode."""
    torch.manual_seed(0)
    ours_model, lyco_model = frozen_tiny_sdxl(0), frozen_tiny_sdxl(0)
    data = batch(0, size=1)
    with torch.no_grad():
        y_base = _out(ours_model, data)
    ours = create_network(1.0, DIM, ALPHA, None, ours_model.text_encoders, ours_model.unet, **LYCO_ARGS)
    lyco = _lycoris_network(lyco_model, preset_path)
    short_te = _te_needs_text_model(ours_model)
    lyco_by_name = {module.lora_name: module for module in lyco.loras}
    names = {m.lora_name: _lycoris_name(m.lora_name, short_te) for m in ours.loras}

    _randomize(ours.loras, seed=1)
    with torch.no_grad():
        for module in ours.loras:
            other = lyco_by_name[names[module.lora_name]]
            for theirs, mine in ((other.lora_up.weight, module.lora_up.weight),
                                 (other.lora_down.weight, module.lora_down.weight),
                                 (other.dora_scale, module.dora_scale)):
                assert theirs.shape == mine.shape, module.lora_name
                theirs.copy_(mine)
            assert float(other.alpha) == float(module.alpha) and other.scale == module.scale == ALPHA / DIM

    ours.apply_to(ours_model.text_encoders, ours_model.unet, True, True)
    lyco.apply_to(lyco_model.text_encoders, lyco_model.unet, True, True)
    ours.eval()
    lyco.eval()  # LyCORIS modules are created in training mode
    with torch.no_grad():
        y_ours, y_lyco = _out(ours_model, data), _out(lyco_model, data)

    folder = tmp_path_factory.mktemp("files")
    lyco_file, ours_file = folder / "lycoris_out_axis.safetensors", folder / "ours_out_axis.safetensors"
    lyco.save_weights(str(lyco_file), torch.float32, {})
    ours.save_weights(str(ours_file), torch.float32, {})
    return SimpleNamespace(
        ours_model=ours_model, lyco_model=lyco_model, ours=ours, lyco=lyco, data=data, names=names,
        lyco_by_name=lyco_by_name, short_te=short_te, y_base=y_base, y_ours=y_ours, y_lyco=y_lyco,
        lyco_file=lyco_file, ours_file=ours_file,
    )


# ---------------------------------------------------------------------------------------------------------------
# 1. Same model, same tensors
# ---------------------------------------------------------------------------------------------------------------
def test_same_modules_and_key_shapes(pair):
    ours_sd = pair.ours.state_dict()
    lyco_sd = load_file(str(pair.lyco_file))
    mapped = {}
    for key, tensor in ours_sd.items():
        name, _, suffix = key.partition(".")
        mapped[f"{pair.names[name]}.{suffix}"] = tuple(tensor.shape)
    assert set(mapped) == set(lyco_sd)
    assert {k: tuple(v.shape) for k, v in lyco_sd.items()} == mapped
    # the only spelling difference is the missing `text_model_` level of transformers-5 CLIPTextModel in LyCORIS
    renamed = {o for o, lyc in pair.names.items() if o != lyc}
    expected = {m.lora_name for m in pair.ours.text_encoder_loras
                if any(short and m.lora_name.startswith(p) for p, short in pair.short_te.items())}
    assert renamed == expected
    assert len(pair.ours.unet_loras) == len(pair.lyco.unet_loras)
    assert len(pair.ours.text_encoder_loras) == len(pair.lyco.text_encoder_loras) == 24
    print(f"\n[modules] {len(pair.ours.loras)} modules, {len(ours_sd)} keys; TE names renamed for LyCORIS: "
          f"{len(renamed)}")


def test_same_unet_output(pair):
    diff = _max_diff(pair.y_ours, pair.y_lyco)
    moved = _max_diff(pair.y_ours, pair.y_base)
    print(f"\n[forward] max|ours - lycoris| = {diff:.3g} (output moved from base by {moved:.3g})")
    assert moved > 0.05  # the adapters really act
    assert diff < FWD_ATOL


def test_same_merged_weight_per_module(pair):
    worst, worst_rel = 0.0, 0.0
    for module in pair.ours.loras:
        mine = module.merged_weight()
        theirs = pair.lyco_by_name[pair.names[module.lora_name]].get_merged_weight(1.0)[0]
        assert mine.shape == theirs.shape
        diff = _max_diff(mine, theirs)
        worst = max(worst, diff)
        worst_rel = max(worst_rel, diff / _max_diff(mine, module.base_weight))
    print(f"\n[merged] max|W'_ours - W'_lycoris| = {worst:.3g} (relative to max|W'-W0|: {worst_rel:.3g})")
    assert worst < WEIGHT_ATOL


# ---------------------------------------------------------------------------------------------------------------
# 2. Files both ways
# ---------------------------------------------------------------------------------------------------------------
def test_lycoris_out_axis_file_loads_in_ours(pair):
    model = frozen_tiny_sdxl(0)
    network, weights_sd = create_network_from_weights(1.0, str(pair.lyco_file), None, model.text_encoders, model.unet,
                                                      for_inference=True)
    assert len(network.loras) == len(pair.lyco.loras)
    assert all(m.dora and m.wd_on_out for m in network.loras)
    worst = 0.0
    for module in network.loras:
        theirs = pair.lyco_by_name[_lycoris_name(module.lora_name, pair.short_te)].get_merged_weight(1.0)[0]
        worst = max(worst, _max_diff(module.merged_weight(), theirs))
    network.apply_to(model.text_encoders, model.unet, True, True)
    with torch.no_grad():
        y = _out(model, pair.data)
    fwd = _max_diff(y, pair.y_lyco)
    print(f"\n[lycoris out-axis file -> ours] merged max diff {worst:.3g}, forward max diff {fwd:.3g}")
    assert worst < WEIGHT_ATOL
    assert fwd < FWD_ATOL


def test_lycoris_in_axis_file_loads_in_ours_and_not_in_lycoris(preset_path, tmp_path):
    lyco_model = frozen_tiny_sdxl(0)
    lyco = _lycoris_network(lyco_model, preset_path, wd_on_output="False")
    _randomize(lyco.loras, seed=2)
    lyco.apply_to(lyco_model.text_encoders, lyco_model.unet, True, True)
    lyco.eval()
    path = tmp_path / "lycoris_in_axis.safetensors"
    lyco.save_weights(str(path), torch.float32, {})
    with torch.no_grad():
        y_lyco = _out(lyco_model, batch(0, size=1))

    model = frozen_tiny_sdxl(0)
    network, _ = create_network_from_weights(1.0, str(path), None, model.text_encoders, model.unet, for_inference=True)
    short_te = _te_needs_text_model(model)
    lyco_by_name = {m.lora_name: m for m in lyco.loras}
    assert len(network.loras) == len(lyco.loras)
    worst = 0.0
    for module in network.loras:
        assert module.dora and module.wd_on_out is False, module.lora_name
        in_dim = module.base_weight.shape[1]
        assert tuple(module.dora_scale.shape) == (1, in_dim) + (1,) * (module.base_weight.ndim - 2)
        theirs = lyco_by_name[_lycoris_name(module.lora_name, short_te)].get_merged_weight(1.0)[0]
        worst = max(worst, _max_diff(module.merged_weight(), theirs))
    network.apply_to(model.text_encoders, model.unet, True, True)
    with torch.no_grad():
        y = _out(model, batch(0, size=1))
    fwd = _max_diff(y, y_lyco)
    print(f"\n[lycoris in-axis file -> ours] merged max diff {worst:.3g}, forward max diff {fwd:.3g}")
    assert worst < WEIGHT_ATOL
    assert fwd < FWD_ATOL

    # Documented LyCORIS 4.1.3 behaviour: its loader never restores wd_on_out, so an in-axis file cannot be read
    # back (reference/lycoris-dora.md §0.6). When LyCORIS fixes this, this assertion fails: update the README.
    LycorisNetworkKohya.apply_preset(read_preset(str(preset_path)))  # the loader builds a throw-away network first
    fresh = frozen_tiny_sdxl(0)
    with pytest.raises(RuntimeError, match="doesn't match the broadcast shape"):
        lk.create_network_from_weights(1.0, str(path), None, fresh.text_encoders, fresh.unet)


def test_our_file_loads_in_lycoris(pair, preset_path):
    file_sd = load_file(str(pair.ours_file))
    assert all(t.shape[1:] == (1,) * (t.ndim - 1) for k, t in file_sd.items() if k.endswith("dora_scale"))
    # LyCORIS' loader first builds a throw-away network from its class-level preset (the default `full` crashes)
    LycorisNetworkKohya.apply_preset(read_preset(str(preset_path)))
    model = frozen_tiny_sdxl(0)
    lyco, _ = lk.create_network_from_weights(1.0, str(pair.ours_file), None, model.text_encoders, model.unet)
    ours_by_name = {m.lora_name: m for m in pair.ours.loras}

    # UNet: every module, same merged weights
    assert {m.lora_name for m in lyco.unet_loras} == {m.lora_name for m in pair.ours.unet_loras}
    # Text encoders: LyCORIS matches file names against named_modules(); under transformers 5 CLIPTextModel (te1)
    # has no `text_model` level, so our classic `lora_te1_text_model_*` modules are silently skipped, while
    # CLIPTextModelWithProjection (te2) keeps `text_model` and loads.
    loaded_te = {m.lora_name for m in lyco.text_encoder_loras}
    expected_te = {m.lora_name for m in pair.ours.text_encoder_loras
                   if not any(short and m.lora_name.startswith(p) for p, short in pair.short_te.items())}
    assert loaded_te == expected_te
    assert pair.short_te == {"lora_te1_": True, "lora_te2_": False}  # transformers 5: the observed case
    assert len(lyco.unet_loras) == len(pair.ours.unet_loras) and len(loaded_te) == 12
    worst = 0.0
    # not `lyco.loras`: before apply_to it still lists the throw-away network's (non-DoRA, unloaded) modules
    for module in lyco.unet_loras + lyco.text_encoder_loras:
        assert module.wd and module.wd_on_out
        worst = max(worst, _max_diff(module.get_merged_weight(1.0)[0], ours_by_name[module.lora_name].merged_weight()))
    print(f"\n[our file -> lycoris] {len(lyco.unet_loras)} UNet + {len(loaded_te)} TE modules loaded "
          f"(of {len(pair.ours.text_encoder_loras)} TE); merged max diff {worst:.3g}")
    assert worst < WEIGHT_ATOL


# ---------------------------------------------------------------------------------------------------------------
# 3. Documented differences
# ---------------------------------------------------------------------------------------------------------------
def test_multiplier_zero_lycoris_keeps_lowrank_ours_gives_base(pair):
    worst_ours, worst_lyco, min_moved = 0.0, 0.0, float("inf")
    for module in pair.ours.loras:
        other = pair.lyco_by_name[pair.names[module.lora_name]]
        base = module.base_weight
        assert torch.equal(module.merged_weight(0.0), base.float())
        theirs = other.get_merged_weight(0.0)[0]
        worst_lyco = max(worst_lyco, _max_diff(theirs, base + module.delta_weight()))
        min_moved = min(min_moved, _max_diff(theirs, base))
    assert worst_lyco < WEIGHT_ATOL and min_moved > 0
    try:
        pair.ours.set_multiplier(0.0)
        pair.lyco.set_multiplier(0.0)
        with torch.no_grad():
            y_ours, y_lyco = _out(pair.ours_model, pair.data), _out(pair.lyco_model, pair.data)
    finally:
        pair.ours.set_multiplier(1.0)
        pair.lyco.set_multiplier(1.0)
    moved = _max_diff(y_lyco, pair.y_base)
    print(f"\n[multiplier 0] LyCORIS W' - (W0+sBA): {worst_lyco:.3g}; ours forward == base exactly; "
          f"LyCORIS forward differs from base by {moved:.3g}")
    assert torch.equal(y_ours, pair.y_base)
    assert moved > 0.05


def _lora_up_grads(network_modules, model, data) -> dict[str, torch.Tensor]:
    for module in network_modules:
        for param in module.parameters():
            param.grad = None
    F.mse_loss(_out(model, data), data["noise"]).backward()
    return {m.lora_name: m.lora_up.weight.grad for m in network_modules}


def test_lycoris_norm_is_not_detached(pair, preset_path):
    lyco_modules = [pair.lyco_by_name[pair.names[m.lora_name]] for m in pair.ours.loras]
    g_lyco = _lora_up_grads(lyco_modules, pair.lyco_model, pair.data)
    g_detached = _lora_up_grads(pair.ours.loras, pair.ours_model, pair.data)

    model = frozen_tiny_sdxl(0)
    undetached = create_network(1.0, DIM, ALPHA, None, model.text_encoders, model.unet, detach_norm="False",
                                **LYCO_ARGS)
    result = undetached.load_state_dict(pair.ours.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    undetached.apply_to(model.text_encoders, model.unet, True, True)
    undetached.eval()
    g_full = _lora_up_grads(undetached.loras, model, pair.data)

    names = [m.lora_name for m in pair.ours.loras]
    lyco_grads = [g_lyco[pair.names[n]] for n in names]
    # layers after the last used hidden state (e.g. te1's last block: SDXL reads the penultimate layer) get none
    none_lyco = {n for n, g in zip(names, lyco_grads) if g is None}
    assert none_lyco == {n for n in names if g_detached[n] is None} == {n for n in names if g_full[n] is None}
    used = [n for n in names if n not in none_lyco]
    assert len(used) > 0.9 * len(names)

    def rel(grads: dict[str, torch.Tensor]) -> tuple[float, float]:
        mine = torch.cat([grads[n].flatten() for n in used])
        theirs = torch.cat([g_lyco[pair.names[n]].flatten() for n in used])
        worst = max(float((grads[n] - g_lyco[pair.names[n]]).norm() / g_lyco[pair.names[n]].norm()) for n in used)
        return float((mine - theirs).norm() / theirs.norm()), worst

    total_detached, worst_detached = rel(g_detached)
    total_full, worst_full = rel(g_full)
    print(f"\n[grad lora_up] relative ||g_ours - g_lycoris||: detach_norm=True {total_detached:.3g} "
          f"(worst module {worst_detached:.3g}); detach_norm=False {total_full:.3g} (worst module {worst_full:.3g})")
    assert total_detached > 1e-2  # LyCORIS back-propagates through ||W0 + sBA||; our default does not
    assert total_full < 1e-5 and worst_full < 1e-4


# ---------------------------------------------------------------------------------------------------------------
# 4. PEFT DoRA on a single layer
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_peft_dora_merge_matches_ours(kind):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    layer = nn.Linear(32, 48) if kind == "linear" else nn.Conv2d(8, 16, 3, padding=1)
    holder = nn.Sequential()
    holder.add_module("layer", copy.deepcopy(layer))
    ours = DoRAModule("lora_unet_layer", layer, 4, 2.0, dora=True, wd_on_out=True)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        ours.lora_down.weight.copy_(torch.randn(ours.lora_down.weight.shape, generator=gen) * 0.3)
        ours.lora_up.weight.copy_(torch.randn(ours.lora_up.weight.shape, generator=gen) * 0.3)
        ours.dora_scale.mul_(1 + 0.2 * torch.randn(ours.dora_scale.shape, generator=gen))

    peft_model = get_peft_model(holder, LoraConfig(r=4, lora_alpha=2, use_dora=True, target_modules=["layer"],
                                                   lora_dropout=0.0))
    peft_layer = peft_model.base_model.model.layer
    magnitude = peft_layer.lora_magnitude_vector["default"].weight
    assert peft_layer.scaling["default"] == ours.scale
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(ours.lora_down.weight)
        peft_layer.lora_B["default"].weight.copy_(ours.lora_up.weight)
        # PEFT: (out,) for Linear, (1, out, 1, 1) for Conv2d; ours (out, 1[, 1, 1])
        magnitude.copy_(ours.dora_scale.reshape(magnitude.shape))
    merged = peft_model.merge_and_unload().layer.weight
    mine = ours.merged_weight()
    diff = _max_diff(mine, merged)
    rel = diff / _max_diff(mine, layer.weight)
    print(f"\n[peft {kind}] max|W'_ours - W'_peft| = {diff:.3g} (relative to max|W'-W0|: {rel:.3g}; PEFT has no eps)")
    assert diff < 1e-6 and rel < 1e-5
