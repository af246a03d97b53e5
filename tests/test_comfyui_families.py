"""The ComfyUI DoRA Loader places files by ComfyUI's own key map, so it works on every family ComfyUI loads.

Without ComfyUI, each model's key map is written here the way ComfyUI's ``model_lora_keys_unet`` /
``model_lora_keys_clip`` build it (comfy/lora.py): ``lora_unet_`` + every ``diffusion_model.`` path (SAI paths for
UNets, plus diffusers names for any UNet layout), CLIP as ``lora_te_``/``lora_te1_``/``lora_te2_`` +
``text_model...``, T5 as ``lora_te{2,3}_`` after the CLIPs it follows, a single LLM encoder as ``lora_te_``. Every
patched weight must equal the float64 formula on the file's tensors; a file for another model is refused.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file as st_load
from torch import nn

import dora_network
from dora_network.families import FLUX, HUNYUAN_IMAGE, LUMINA, SD, SD3, Family
from dora_network.families.sd import SD1_LAYOUT
from dora_network.integrations.comfyui import layer_updates
from dora_network.targets import every_layer
from dora_reference import explicit_weight
from flux_standin import build_flux, build_flux_text_encoders
from hunyuan_image_standin import build_hunyuan_image
from lumina_standin import build_gemma2, build_lumina
from sd3_standin import build_sd3, build_sd3_text_encoders

#: ComfyUI's name for each text-encoder position, per family (its CLIP/T5/LLM wrappers)
TE_WRAPPERS = {"sd": ("clip_l",), "flux": ("clip_l", "t5xxl"), "sd3": ("clip_l", "clip_g", "t5xxl"),
               "lumina": ("gemma2_2b",), "hunyuan_image": ()}


def build_tiny_sd15(seed: int = 0) -> tuple[list[nn.Module], nn.Module]:
    """A tiny SD1.x-layout diffusers UNet (4 levels, attention on the first three) and a tiny CLIP."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 8, 8, 8),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=16,
        attention_head_dim=2, norm_num_groups=4)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=16))
    return [clip], unet


def comfy_view(family: Family, text_encoders, model):
    """ComfyUI's state dict (key -> weight) and key map (LoRA name -> key) for a model of this family, and our
    lora_name -> that key."""
    weights: dict[str, torch.Tensor] = {}
    key_map: dict[str, str] = {}
    key_of: dict[str, str] = {}
    wrappers = TE_WRAPPERS[family.name]
    for layer in every_layer(text_encoders, model, family):
        if layer.component == "unet":
            if family is SD:
                path = SD1_LAYOUT.convert(layer.path, False)  # ComfyUI holds SD UNets in SAI form
                if path is None:
                    continue
                names = ["lora_unet_" + path.replace(".", "_"), "lora_unet_" + layer.path.replace(".", "_")]
            else:
                path = HUNYUAN_IMAGE.comfy_name(layer.path.replace(".", "_")) if family is HUNYUAN_IMAGE else layer.path
                names = ["lora_unet_" + path.replace(".", "_")]
            key = f"diffusion_model.{path}.weight"
        else:
            wrapper = wrappers[layer.te_index]
            if wrapper.startswith("clip"):
                key = f"{wrapper}.transformer.{layer.path}.weight"
                names = {"clip_l": ["lora_te_", "lora_te1_"], "clip_g": ["lora_te2_"]}[wrapper]
                names = [p + layer.path.replace(".", "_") for p in names]
            elif wrapper == "t5xxl":
                key = f"t5xxl.transformer.{layer.path}.weight"
                index = 1 + ("clip_g" in wrappers) + 1  # ComfyUI counts the CLIPs before T5
                names = [f"lora_te{index}_{layer.path.replace('.', '_')}"]
                if index == 2:
                    names.append(f"lora_te3_{layer.path.replace('.', '_')}")
            else:
                key = f"{wrapper}.transformer.model.{layer.path}.weight"
                names = [f"lora_te_{layer.path.replace('.', '_')}"]
        weights[key] = layer.module.weight.detach()
        key_of[layer.lora_name] = key
        for name in names:
            key_map[name] = key
    return weights, key_map, key_of


def _sd():
    text_encoders, unet = build_tiny_sd15()
    return SD, text_encoders, unet, {}


def _flux():
    return FLUX, build_flux_text_encoders("cpu", tiny=True), build_flux("cpu", tiny=True), {"train_t5xxl": "True"}


def _sd3():
    return SD3, build_sd3_text_encoders("cpu", tiny=True), build_sd3("cpu", tiny=True), {"train_t5xxl": "True"}


def _lumina():
    return LUMINA, [build_gemma2("cpu", tiny=True)], build_lumina("cpu", tiny=True), {}


def _hunyuan_image():
    return HUNYUAN_IMAGE, [], build_hunyuan_image("cpu", tiny=True), {}


CASES = {"sd15": _sd, "flux": _flux, "sd3": _sd3, "lumina": _lumina, "hunyuan_image": _hunyuan_image}


def _saved(case: str, tmp_path, wd_on_out: bool) -> tuple[dict[str, torch.Tensor], object]:
    family, text_encoders, model, options = CASES[case]()
    network = dora_network.create_network(1.0, 4, 2, None, text_encoders, model, wd_on_out=str(wd_on_out),
                                          **options)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in network.loras:
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=gen) * 0.1)
            module.dora_scale.mul_(1 + 0.1 * torch.randn(module.dora_scale.shape, generator=gen))
    path = tmp_path / f"{case}.safetensors"
    network.save_weights(str(path), torch.float32, {})
    return st_load(str(path)), network


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("wd_on_out", [False, True])
def test_node_places_every_family_by_comfyuis_key_map_and_applies_the_formula(case, wd_on_out, tmp_path):
    state_dict, network = _saved(case, tmp_path, wd_on_out)
    family, text_encoders, model, _ = CASES[case]()
    weights, key_map, key_of = comfy_view(family, text_encoders, model)
    updates = layer_updates(state_dict, {}, key_map, weights)
    assert len(updates) == len(network.targets)  # every module of the file placed, text encoders included
    for target in network.targets:
        key = key_of[target.lora_name]
        tensors = {k.split(".", 1)[1]: v for k, v in state_dict.items() if k.split(".", 1)[0] == target.lora_name}
        w0 = weights[key]
        for strength in (1.0, 0.5, -1.0):
            want = w0.double() + strength * (explicit_weight(w0, tensors, 1.0) - w0.double())
            assert torch.allclose(updates[key].weight(w0, strength).double(), want, atol=1e-5, rtol=1e-5), key


def test_sd15_file_with_diffusers_unet_names_is_placed(tmp_path):
    """What sd-scripts' train_network.py saves for SD1.5 (diffusers UNet names): the node used SDXL's name table
    and refused it; with ComfyUI's key map it lands on ComfyUI's SAI-named weights."""
    state_dict, network = _saved("sd15", tmp_path, False)
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_proj_in.") for k in state_dict)
    family, text_encoders, model, _ = CASES["sd15"]()
    weights, key_map, key_of = comfy_view(family, text_encoders, model)
    updates = layer_updates(state_dict, {}, key_map, weights)
    assert "diffusion_model.input_blocks.1.1.proj_in.weight" in updates
    assert any(k.startswith("clip_l.transformer.text_model.encoder.layers.0.") for k in updates)


def test_a_file_for_another_family_is_refused_before_anything_is_patched(tmp_path):
    state_dict, _ = _saved("flux", tmp_path, False)
    family, text_encoders, model, _ = CASES["sd3"]()
    weights, key_map, key_of = comfy_view(family, text_encoders, model)
    with pytest.raises(ValueError, match=r"match no layer of this model"):
        layer_updates(state_dict, {}, key_map, weights)
