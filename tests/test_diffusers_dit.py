"""apply_dora_to_pipeline on FLUX.1 and SD3 pipelines: files with sd-scripts' names land on diffusers' transformer
(fused layers as the rows of several diffusers modules, AdaLayerNormContinuous halves swapped) exactly as merge_to
computes them on the original model; remove() restores every weight bit for bit.

The diffusers transformers get the stand-in's weights through diffusers' own single-file converters, so the row
mapping is checked against diffusers (FLUX.1's converter hard-codes the 3072 width for ``linear1``: there the tiny
single blocks are copied by our table, whose order q, k, v, MLP is the converter's).
"""

from __future__ import annotations

import copy
import types

import pytest
import torch

from dora_network import create_network, create_network_from_weights
from dora_network.families import FLUX, SD3
from dora_network.integrations.diffusers_loader import _transformer_targets, apply_dora_to_pipeline
from flux_standin import Flux, build_flux_text_encoders
from sd3_standin import MMDiT, build_sd3_text_encoders

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _flux_pair():
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    torch.manual_seed(0)
    original = Flux(hidden=32, heads=2, depth=2, depth_single=2, in_channels=8, context_dim=16, vec_dim=12)
    diffusers_model = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=12, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    checkpoint = {k: v.clone() for k, v in original.state_dict().items()}
    for key in [k for k in checkpoint if k.startswith("single_blocks.")]:  # the converter's fixed 3072 width
        checkpoint[key] = torch.zeros(3 * 3072 + 4 * 3072, 1) if "linear1" in key else checkpoint[key]
    converted = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    converted = {k: v for k, v in converted.items() if not k.startswith("single_transformer_blocks.")}
    missing = diffusers_model.load_state_dict(converted, strict=False).missing_keys
    assert all(k.startswith("single_transformer_blocks.") for k in missing)
    return original, diffusers_model


def _sd3_pair():
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    torch.manual_seed(0)
    original = MMDiT(depth=3, x_block_self_attn_layers=(0,), hidden=32, heads=2, in_channels=4, adm_in_channels=12,
                     context_dim=16, frequency_size=256)
    diffusers_model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=32, pooled_projection_dim=12, out_channels=4,
        pos_embed_max_size=4, dual_attention_layers=(0,))
    checkpoint = {k: v.clone() for k, v in original.state_dict().items()}
    checkpoint["pos_embed"] = diffusers_model.pos_embed.pos_embed.clone()
    converted = convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)
    diffusers_model.load_state_dict(converted, strict=True)
    return original, diffusers_model


CASES = {"flux": (FLUX, _flux_pair, build_flux_text_encoders), "sd3": (SD3, _sd3_pair, build_sd3_text_encoders)}


def _rows(family, transformer, original):
    names = [f"lora_unet_{path.replace('.', '_')}" for path, m in original.named_modules()
             if type(m).__name__ in ("Linear", "Conv2d")]
    return {t.lora_name: t for t in _transformer_targets(family, transformer, names)}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("wd_on_out", [False, True])
def test_sd_scripts_file_on_diffusers_transformer_equals_merge_to(case, wd_on_out, tmp_path):
    family, pair, encoders = CASES[case]
    original, transformer = pair()
    layers = {f"lora_unet_{p.replace('.', '_')}": m for p, m in original.named_modules()
              if type(m).__name__ in ("Linear", "Conv2d")}
    rows = _rows(family, transformer, original)
    if case == "flux":  # single blocks: copied by our table (see the module docstring)
        with torch.no_grad():
            for name, target in rows.items():
                if name.startswith("lora_unet_single_blocks_"):
                    target.module.write_weight(layers[name].weight.detach())
    assert rows.keys() == layers.keys()  # every layer of the original model has a place in diffusers'
    for name, target in rows.items():
        assert torch.equal(target.module.weight, layers[name].weight.detach()), name

    text_encoders = encoders("cpu", tiny=True)
    network = create_network(1.0, 4, 2, None, text_encoders, original, wd_on_out=str(wd_on_out), train_t5xxl="True",
                             **({"emb_dims": "[2,2,2,2,2,2]"} if case == "sd3" else {"in_dims": "[2,2,2,2,2]"}))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in network.loras:
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=gen) * 0.1)
            module.dora_scale.mul_(1 + 0.1 * torch.randn(module.dora_scale.shape, generator=gen))
    file = tmp_path / f"{case}.safetensors"
    network.save_weights(str(file), torch.float32, {})

    reference_model, reference_te = copy.deepcopy(original), copy.deepcopy(text_encoders)
    reference, weights = create_network_from_weights(0.7, str(file), None, reference_te, reference_model,
                                                     for_inference=True)
    reference.merge_to(reference_te, reference_model, weights, torch.float32, "cpu")

    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    pipe = types.SimpleNamespace(transformer=transformer, **dict(zip(names, copy.deepcopy(text_encoders))))
    patch = apply_dora_to_pipeline(pipe, str(file), strength=0.7)
    assert not patch.unmatched and len(patch.matched) == len(network.targets)
    merged = {f"lora_unet_{p.replace('.', '_')}": m for p, m in reference_model.named_modules()
              if type(m).__name__ in ("Linear", "Conv2d")}
    for name, target in rows.items():
        assert torch.allclose(target.module.weight, merged[name].weight, atol=1e-6, rtol=1e-6), name
    for ours, theirs in zip((getattr(pipe, n) for n in names if hasattr(pipe, n)), reference_te):
        for (key, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-6), key
    patch.remove()
    assert all(torch.equal(v, before[k]) for k, v in transformer.state_dict().items())


def test_a_file_for_another_transformer_is_refused(tmp_path):
    original, transformer = _sd3_pair()
    network = create_network(1.0, 4, 2, None, [], Flux(hidden=32, heads=2, depth=2, depth_single=2, in_channels=8,
                                                          context_dim=16, vec_dim=12))
    file = tmp_path / "flux.safetensors"
    network.save_weights(str(file), torch.float32, {})
    with pytest.raises(ValueError, match=r"none of the file.s 26 denoiser modules .* is a SD3/SD3\.5 layer of "
                                         r"this SD3Transformer2DModel"):
        apply_dora_to_pipeline(types.SimpleNamespace(transformer=transformer), str(file))
