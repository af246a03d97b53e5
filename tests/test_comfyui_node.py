"""The ComfyUI "DoRA Loader" nodes: every file layout, applied exactly (= our merge_to = the float64 formula).

Without ComfyUI, the node's mapping (``layer_updates``) runs against a ComfyUI-style state dict and key map built
from the tiny SDXL model (SAI UNet keys under ``diffusion_model.``, ``clip_l`` / ``clip_g`` text encoders, kohya
names in both UNet spellings, as ComfyUI's ``model_lora_keys_unet`` / ``model_lora_keys_clip`` give them).
With ``COMFYUI_PATH`` set to a ComfyUI checkout, ``comfyui_check.py`` runs the real nodes inside ComfyUI: real
ModelPatchers, ``load_models_gpu`` patching, unpatching, and stacking with ComfyUI's own LoraLoader.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file as st_load
from safetensors.torch import save_file

import dora_network
from dora_network.integrations.comfyui import layer_updates
from dora_network.targets import every_layer
from dora_network.tiny import build_tiny_sdxl
from dora_network.families.sdxl import diffusers_to_sai
from dora_reference import explicit_weight

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TESTS = Path(__file__).resolve().parent
STRENGTHS = (1.0, 0.5, 0.0, -1.0)


def comfy_like(model) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """ComfyUI's view of the tiny model: state-dict key -> weight, and kohya name -> state-dict key."""
    weights, key_map = {}, {}
    for target in every_layer(model.text_encoders, model.unet):
        if target.component == "unet":
            sai = diffusers_to_sai(target.path)
            if sai is None:
                continue
            key = f"diffusion_model.{sai}.weight"
            names = ["lora_unet_" + sai.replace(".", "_"), "lora_unet_" + target.path.replace(".", "_")]
        else:
            key = f"clip_{'l' if target.component == 'te1' else 'g'}.transformer.{target.path}.weight"
            names = [target.lora_name]
        weights[key] = target.module.weight.detach()
        for name in names:
            key_map[name] = key
    return weights, key_map


def _randomize(network, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.loras:
            up = module.lora_up.weight
            up.copy_(torch.randn(up.shape, generator=gen) * 0.3 / math.sqrt(up.shape[1]))
            if getattr(module, "dora_scale", None) is not None:
                module.dora_scale.mul_(1 + 0.3 * (2 * torch.rand(module.dora_scale.shape, generator=gen) - 1))


def _ours(folder: Path, name: str, **args: str) -> Path:
    model = build_tiny_sdxl(seed=0)
    network = dora_network.create_network(1.0, 4, 2, None, model.text_encoders, model.unet, conv_dim="4",
                                          conv_alpha="2", **args)
    _randomize(network, seed=len(name))
    path = folder / f"{name}.safetensors"
    network.save_weights(str(path), None, {})
    return path


def _lycoris(folder: Path, wd_on_output: bool) -> Path:
    """A file saved by lycoris-lora 4.1.3 itself (its names: diffusers UNet, short TE names on transformers 5)."""
    lk = pytest.importorskip("lycoris.kohya")
    import toml

    preset = folder / "preset.toml"
    preset.write_text(toml.dumps({"enable_conv": True, "unet_target_module": ["Transformer2DModel", "ResnetBlock2D"],
                                  "unet_target_name": [], "text_encoder_target_module": ["CLIPAttention", "CLIPMLP"],
                                  "text_encoder_target_name": []}))
    model = build_tiny_sdxl(seed=0)
    network = lk.create_network(1.0, 4, 2.0, None, model.text_encoders, model.unet, preset=str(preset), algo="lora",
                                dora_wd="True", wd_on_output=str(wd_on_output), conv_dim="4", conv_alpha="2",
                                use_tucker="True")
    network.apply_to(model.text_encoders, model.unet, True, True)  # LyCORIS registers its modules here
    _randomize(network, seed=7 + wd_on_output)
    path = folder / f"lycoris_{'out' if wd_on_output else 'in'}.safetensors"
    network.save_weights(str(path), torch.float32, {})
    return path


def _one_d_sai(folder: Path, source: Path) -> Path:
    """An out-axis file rewritten PEFT-style (1-D ``dora_scale``) with SAI UNet names (sd-scripts', ComfyUI's)."""
    from dora_network.tools.exact import convert_unet_names

    tensors = convert_unet_names(st_load(str(source)), "sai").state_dict
    assert any(k.startswith("lora_unet_input_blocks_") for k in tensors)
    tensors = {k: v.reshape(-1) if k.endswith(".dora_scale") else v for k, v in tensors.items()}
    path = folder / "one_d_sai.safetensors"
    save_file(tensors, str(path), {"dora_network.wd_on_out": "True"})
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("comfy_files")
    out_file = _ours(folder, "ours_out_tucker", wd_on_out="True", use_tucker="True")
    return {
        "ours_in": _ours(folder, "ours_in"),
        "ours_out_tucker": out_file,
        "ours_lora": _ours(folder, "ours_lora", algo="lora"),
        "lycoris_in": _lycoris(folder, False),
        "lycoris_out": _lycoris(folder, True),
        "one_d": _one_d_sai(folder, out_file),
    }


def _reference_merge(path: Path, strength: float) -> dict[str, torch.Tensor]:
    """Our merge_to (create_network_from_weights + merge_to on a fresh tiny model): ComfyUI key -> merged weight."""
    model = build_tiny_sdxl(seed=0)
    weights, _ = comfy_like(model)
    network, weights_sd = dora_network.create_network_from_weights(strength, str(path), None, model.text_encoders,
                                                                   model.unet, for_inference=True)
    network.merge_to(model.text_encoders, model.unet, weights_sd, torch.float32, "cpu")
    return {k: v.detach().clone() for k, v in weights.items()}  # the same tensors, now merged


@pytest.mark.parametrize("variant", ["ours_in", "ours_out_tucker", "ours_lora", "lycoris_in", "lycoris_out", "one_d"])
def test_node_weights_equal_merge_to_and_the_float64_formula(files, variant):
    path = files[variant]
    state_dict = st_load(str(path))
    model = build_tiny_sdxl(seed=0)
    weights, key_map = comfy_like(model)
    updates = layer_updates(state_dict, {"dora_network.wd_on_out": "True"} if variant == "one_d" else {},
                            key_map, weights)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        name, _, suffix = key.partition(".")
        groups.setdefault(name, {})[suffix] = value
    assert len(updates) == len(groups)  # every module of the file found its weight
    for strength in STRENGTHS:
        merged = _reference_merge(path, strength)
        for key, update in updates.items():
            w0 = weights[key]
            ours = update.weight(w0, strength)
            torch.testing.assert_close(ours, merged[key], rtol=0, atol=2e-6)
            tensors = {"lora_up.weight": update.up, "lora_down.weight": update.down, "alpha": torch.tensor(update.alpha)}
            if update.mid is not None:
                tensors["lora_mid.weight"] = update.mid
            if update.dora_scale is not None:
                tensors["dora_scale"] = update.dora_scale
            expected = explicit_weight(w0, tensors, strength)
            torch.testing.assert_close(update.weight(w0.double(), strength), expected, rtol=0, atol=1e-12)
            if strength == 0.0:
                assert torch.equal(ours, w0)


def test_model_only_leaves_text_encoder_modules_out(files):
    model = build_tiny_sdxl(seed=0)
    weights, key_map = comfy_like(model)
    unet_weights = {k: v for k, v in weights.items() if k.startswith("diffusion_model.")}
    unet_map = {n: k for n, k in key_map.items() if k in unet_weights}
    updates = layer_updates(st_load(str(files["ours_in"])), {}, unet_map, unet_weights, with_text_encoders=False)
    assert updates and all(k.startswith("diffusion_model.") for k in updates)
    with pytest.raises(ValueError, match="match no layer of this model"):  # the same file with clip: TE modules count
        layer_updates(st_load(str(files["ours_in"])), {}, unet_map, unet_weights, with_text_encoders=True)


def test_file_for_another_model_is_refused_with_the_package_message(files):
    model = build_tiny_sdxl(seed=0)
    weights, key_map = comfy_like(model)
    state_dict = st_load(str(files["ours_lora"]))
    name = next(k for k in state_dict if k.startswith("lora_unet_") and k.endswith("lora_down.weight"))
    state_dict[name] = torch.zeros(state_dict[name].shape[0], state_dict[name].shape[1] + 8,
                                   *state_dict[name].shape[2:])
    with pytest.raises(ValueError, match="trained on another base model"):
        layer_updates(state_dict, {}, key_map, weights)
    state_dict = st_load(str(files["ours_in"]))
    state_dict[name] = torch.full_like(state_dict[name], float("nan"))
    with pytest.raises(ValueError, match="NaN/Inf"):
        layer_updates(state_dict, {}, key_map, weights)


@pytest.mark.slow
def test_real_comfyui_nodes(files, tmp_path):
    """The nodes inside a real ComfyUI (COMFYUI_PATH): patched weights, unpatching, stacking, errors."""
    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy:
        pytest.skip("COMFYUI_PATH is not set: ComfyUI is not on a package registry; point it at a ComfyUI checkout "
                    "(git clone https://github.com/Comfy-Org/ComfyUI) whose requirements are importable here")
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(TESTS / "comfyui_check.py"), comfy, str(out),
                           *[f"{k}={v}" for k, v in files.items()]], capture_output=True, text=True, timeout=900)
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    for row in result["cases"]:
        assert row["max_err_vs_float64"] <= 2e-6, row
        assert row["patched_keys"] == row["expected_patched"], row  # strength 0: the inputs come back unpatched
        assert row["restored_bitwise"], row
    assert result["stacked_equals_sequential"] and result["errors_leave_model_unpatched"]
    print("ComfyUI's own LoraLoader on the out-axis file: max |error|", result["comfy_lora_loader_out_axis_err"])
