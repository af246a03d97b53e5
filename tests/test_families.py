"""families/: each family's adapter names equal what its sd-scripts module creates (golden lists made at full size
with sd-scripts' own modules), its options mean what they mean there, unknown models are refused, and the network
works on each family as on SDXL: forward = the float64 formula, merge, save/load bit for bit, per-step hooks."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dora_network import create_network, create_network_from_weights
from dora_network.args import parse_network_args
from dora_network.families import ANIMA, FLUX, HUNYUAN_IMAGE, LUMINA, SD, SD3, SDXL, detect_family
from dora_network.targets import find_targets
from anima_standin import build_anima, build_qwen3
from dora_reference import explicit_weight
from flux_standin import build_flux, build_flux_text_encoders
from hunyuan_image_standin import build_hunyuan_image
from lumina_standin import build_gemma2, build_lumina
from sd3_standin import build_sd3, build_sd3_text_encoders
from sdxl_standin import build_sai_sdxl_unet

GOLDEN = Path(__file__).resolve().parent / "golden"


def golden(name: str) -> set[tuple[str, str, int, int]]:
    rows = [line.rstrip("\n").split("\t") for line in open(GOLDEN / f"{name}.tsv") if not line.startswith("#")]
    return {(r[0], r[1], int(r[2]), int(r[3])) for r in rows}


def described(targets) -> set[tuple[str, str, int, int]]:
    return {(t.lora_name, type(t.module).__name__, int(t.module.weight.shape[1]), int(t.module.weight.shape[0]))
            for t in targets}


@pytest.fixture(scope="module")
def flux_meta():
    """FLUX.1-dev (19 + 38 blocks), CLIP-L and T5-XXL at full size on the meta device."""
    return build_flux_text_encoders("meta"), build_flux("meta")


@pytest.fixture(scope="module")
def anima_meta():
    """Anima (28 blocks, LLM adapter) and Qwen3-0.6B at full size on the meta device."""
    return [build_qwen3("meta")], build_anima("meta")


@pytest.fixture(scope="module")
def sd3_meta():
    """SD3.5 Medium (24 joint blocks, MMDiT-X), CLIP-L, CLIP-G and T5-XXL at full size on the meta device."""
    return build_sd3_text_encoders("meta"), build_sd3("meta")


@pytest.fixture(scope="module")
def lumina_meta():
    """NextDiT-2B and Gemma-2-2B at full size on the meta device."""
    return [build_gemma2("meta")], build_lumina("meta")


# -- names = sd-scripts' own module, at full size ----------------------------------------------------------------
@pytest.mark.parametrize("name, network_args", [
    ("flux_dev", {}),
    ("flux_dev_train_t5xxl", {"train_t5xxl": "True"}),
    ("flux_dev_train_blocks_single", {"train_blocks": "single"}),
])
def test_flux_names_equal_lora_flux_golden(flux_meta, name, network_args):
    text_encoders, flux = flux_meta
    network = create_network(1.0, 4, 1, None, text_encoders, flux, **network_args)
    assert described(network.targets) == golden(name)
    assert network.family is FLUX
    assert network.train_t5xxl == ("train_t5xxl" in network_args)
    assert all(p.device.type == "meta" for p in network.parameters())


@pytest.mark.parametrize("name, network_args", [("anima", {}),
                                                ("anima_train_llm_adapter", {"train_llm_adapter": "true"})])
def test_anima_names_equal_lora_anima_golden(anima_meta, name, network_args):
    text_encoders, anima = anima_meta
    network = create_network(1.0, 4, 1, None, text_encoders, anima, **network_args)
    assert described(network.targets) == golden(name)
    assert network.family is ANIMA
    assert sum(t.component == "unet" for t in network.targets) == (280 if name == "anima" else 340)


@pytest.mark.parametrize("name, large, network_args", [("sd35_medium", False, {}), ("sd35_large", True, {})])
def test_sd3_names_equal_lora_sd3_golden(sd3_meta, name, large, network_args):
    """The golden was made with [CLIP-L, CLIP-G]: T5 gets adapters only with train_t5xxl, as lora_te3."""
    text_encoders, _ = sd3_meta
    network = create_network(1.0, 4, 1, None, text_encoders, build_sd3("meta", large=large), **network_args)
    assert described(network.targets) == golden(name)
    assert network.family is SD3 and network.train_t5xxl is False
    with_t5 = create_network(1.0, 4, 1, None, text_encoders, sd3_meta[1], train_t5xxl="True")
    t5 = {t.lora_name for t in with_t5.targets if t.component == "te3"}
    assert len(t5) == 24 * 7 and all(n.startswith("lora_te3_encoder_block_") for n in t5)
    assert with_t5.train_t5xxl is True


def test_lumina_names_equal_lora_lumina_golden(lumina_meta):
    network = create_network(1.0, 4, 1, None, *lumina_meta)
    assert described(network.targets) == golden("lumina2")
    assert network.family is LUMINA
    assert sum(t.component == "unet" for t in network.targets) == 180


def test_hunyuan_image_names_equal_golden_and_its_text_encoders_are_never_read():
    """The trainer may pass text encoders already on the meta device; they get no adapters and are not walked."""
    class Exploding(nn.Module):
        def modules(self):
            raise AssertionError("a HunyuanImage text encoder was walked")

    network = create_network(1.0, 4, 1, None, [Exploding(), Exploding()], build_hunyuan_image("meta"))
    assert described(network.targets) == golden("hunyuan_image21")
    assert network.family is HUNYUAN_IMAGE and network.text_encoder_loras == []


def test_chroma_text_encoder_list_keeps_positions(flux_meta):
    """Chroma passes [None, T5]: T5 stays lora_te3 (its position), CLIP is simply absent."""
    (clip, t5), flux = flux_meta
    network = create_network(1.0, 4, 1, None, [None, t5], flux, train_t5xxl="True")
    te_names = {t.lora_name for t in network.targets if t.component != "unet"}
    assert te_names and all(n.startswith("lora_te3_encoder_block_") for n in te_names)
    assert len(te_names) == 24 * 7


# -- recognition ----------------------------------------------------------------------------------------------------
def test_families_are_recognised_from_structure(flux_meta, anima_meta, sd3_meta, lumina_meta):
    assert detect_family(flux_meta[1], flux_meta[0]) is FLUX
    assert detect_family(sd3_meta[1], sd3_meta[0]) is SD3
    assert detect_family(None, sd3_meta[0]) is SD3  # text encoders alone: three, T5 last
    assert detect_family(lumina_meta[1], lumina_meta[0]) is LUMINA
    assert detect_family(None, lumina_meta[0]) is LUMINA
    assert detect_family(build_hunyuan_image("meta"), []) is HUNYUAN_IMAGE
    assert detect_family(anima_meta[1], anima_meta[0]) is ANIMA
    assert detect_family(build_sai_sdxl_unet(device="meta"), []) is SDXL
    assert detect_family(None, [flux_meta[0][0]]) is SD


def test_unknown_model_is_refused_naming_what_was_found_and_the_families():
    class HunyuanVideo(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    with pytest.raises(ValueError, match=r"does not know this model: denoiser HunyuanVideo .*Supported families: "
                                         r"HunyuanImage-2\.1 .*FLUX\.1 .*SD3/SD3\.5 .*Lumina 2 .*Anima .*SDXL "
                                         r".*SD1\.x"):
        create_network(1.0, 4, 1, None, [], HunyuanVideo())


# -- options, with sd-scripts' meaning -----------------------------------------------------------------------------
def _names(text_encoders, model, family, **network_args) -> dict[str, int | None]:
    args = parse_network_args(4, 1, family=family, **network_args)
    return {t.lora_name: t.rank for t in find_targets(text_encoders, model, args, family=family)}


def test_flux_block_indices_type_dims_and_in_dims(flux_meta):
    text_encoders, flux = flux_meta
    names = _names(text_encoders, flux, FLUX, train_double_block_indices="0,2-3", train_single_block_indices="none")
    doubles = {int(n.split("_")[4]) for n in names if "double_blocks" in n}
    assert doubles == {0, 2, 3} and not any("single_blocks" in n for n in names)

    names = _names(text_encoders, flux, FLUX, img_attn_dim="8", txt_mlp_dim="0", single_mod_dim="2")
    assert names["lora_unet_double_blocks_0_img_attn_qkv"] == 8
    assert names["lora_unet_double_blocks_0_img_attn_proj"] == 8
    assert not any("txt_mlp" in n for n in names)
    assert names["lora_unet_single_blocks_5_modulation_lin"] == 2
    assert names["lora_unet_single_blocks_5_linear1"] is None  # the network's rank

    names = _names(text_encoders, flux, FLUX, in_dims="[4,0,2,0,3]")
    assert {n: r for n, r in names.items() if "_in" in n and "blocks" not in n} == {
        "lora_unet_img_in": 4, "lora_unet_vector_in_in_layer": 2, "lora_unet_vector_in_out_layer": 2,
        "lora_unet_txt_in": 3}


def test_network_reg_dims_match_as_each_family_matches(flux_meta, anima_meta):
    # FLUX: re.search on the lora_name; Anima: the whole dotted path
    names = _names(*flux_meta, FLUX, network_reg_dims="double_blocks_1_.*attn=16,single_blocks_0_=0")
    assert names["lora_unet_double_blocks_1_img_attn_qkv"] == 16
    assert not any(n.startswith("lora_unet_single_blocks_0_") for n in names)
    names = _names(*anima_meta, ANIMA, network_reg_dims=r"blocks\.0\..*=8,blocks=2")
    assert names["lora_unet_blocks_0_mlp_layer1"] == 8
    assert names["lora_unet_blocks_1_mlp_layer1"] is None  # "blocks" alone matches no whole path


def test_anima_include_and_exclude_patterns(anima_meta):
    text_encoders, anima = anima_meta
    names = _names(text_encoders, anima, ANIMA, exclude_patterns="['.*mlp.*']")
    assert not any("mlp" in n for n in names if n.startswith("lora_unet"))
    names = _names(text_encoders, anima, ANIMA, include_patterns=r"['blocks\.\d+\.adaln_modulation_mlp\.\d']")
    assert sum("adaln_modulation_mlp" in n for n in names) == 28 * 2
    assert not any("adaln_modulation_self_attn" in n for n in names)


def test_sd3_type_dims_block_indices_and_emb_dims(sd3_meta):
    text_encoders, mmdit = sd3_meta
    names = _names([], mmdit, SD3, context_attn_dim="8", x_mlp_dim="0", x_mod_dim="2")
    assert names["lora_unet_joint_blocks_0_context_block_attn_qkv"] == 8
    assert names["lora_unet_joint_blocks_0_x_block_attn_qkv"] is None  # the network's rank
    assert names["lora_unet_joint_blocks_0_x_block_adaLN_modulation_1"] == 2
    assert not any("x_block_mlp" in n for n in names)

    names = _names([], mmdit, SD3, train_block_indices="0,5-6")
    assert {int(n.split("_")[4]) for n in names} == {0, 5, 6}

    names = _names([], mmdit, SD3, emb_dims="[4,2,8,0,0,3]")
    extras = {n: r for n, r in names.items() if "joint_blocks" not in n}
    assert extras == {"lora_unet_context_embedder": 4, "lora_unet_t_embedder_mlp_0": 2,
                      "lora_unet_t_embedder_mlp_2": 2, "lora_unet_x_embedder_proj": 8,
                      "lora_unet_final_layer_linear": 3}
    targets = find_targets([], mmdit, parse_network_args(4, 1, family=SD3, emb_dims="0,0,8,0,0,0"), family=SD3)
    assert next(t for t in targets if t.lora_name == "lora_unet_x_embedder_proj").kind == "conv"  # 2x2 patch conv


def test_lumina_train_blocks_type_dims_and_embedder_dims(lumina_meta):
    text_encoders, nextdit = lumina_meta
    for blocks, kept in (("transformer", {"layers"}), ("refiners", {"noise_refiner", "context_refiner"}),
                         ("context_refiner", {"context_refiner"}),
                         ("all", {"layers", "noise_refiner", "context_refiner", "final_layer"})):
        names = _names([], nextdit, LUMINA, train_blocks=blocks)
        assert {re.sub(r"^lora_unet_(.*?)(_\d+)?_(attention|feed|adaLN|linear).*", r"\1", n) for n in names} == kept
    names = _names(text_encoders, nextdit, LUMINA, attn_dim="8", mod_dim="0", refiner_dim="2")
    assert names["lora_unet_layers_0_attention_qkv"] == 8
    assert names["lora_unet_noise_refiner_0_attention_qkv"] == 8  # "attention" is matched first
    assert names["lora_unet_noise_refiner_0_feed_forward_w1"] == 2
    assert not any("adaLN_modulation" in n for n in names)
    assert names["lora_te_layers_0_self_attn_q_proj"] is None  # type dims are the DiT's only
    names = _names([], nextdit, LUMINA, embedder_dims="[4,0,2]")
    assert {n: r for n, r in names.items() if "embedder" in n} == {
        "lora_unet_x_embedder": 4, "lora_unet_cap_embedder_1": 2}


def test_split_qkv_parts_follow_each_family():
    """The fused projections split_qkv trains as parts: SD3 q/k/v, Lumina's grouped-query q/k/v (k and v
    narrower), HunyuanImage q/k/v and linear1's MLP input, as their sd-scripts modules split them."""
    cases = (
        (SD3, build_sd3("meta"), "joint_blocks.0.x_block.attn2.qkv", (1536,) * 3),
        (LUMINA, build_lumina("meta"), "layers.0.attention.qkv", (2304, 768, 768)),
        (HUNYUAN_IMAGE, build_hunyuan_image("meta"), "double_blocks.0.txt_attn_qkv", (3584,) * 3),
        (HUNYUAN_IMAGE, build_hunyuan_image("meta"), "single_blocks.0.linear1", (3584,) * 3 + (14336,)),
    )
    for family, model, path, parts in cases:
        weight = dict(model.named_modules())[path].weight
        assert family.fused_parts(path, weight.shape[1], weight.shape[0]) == parts
    assert HUNYUAN_IMAGE.fused_parts("double_blocks.0.img_attn_proj", 3584, 3584) is None


@pytest.mark.parametrize("family, key, value, message", [
    (SDXL, "train_t5xxl", "True", r"'train_t5xxl' is an option of FLUX\.1 and SD3/SD3\.5 models; this model is SDXL"),
    (FLUX, "train_llm_adapter", "true", r"option of Anima models; this model is FLUX\.1"),
    (FLUX, "conv_dim", "8", r"conv_dim is meaningless on FLUX\.1"),
    (ANIMA, "preset", "attn-only", r"preset='attn-only' describes SD/SDXL UNet layers; on Anima"),
    (FLUX, "ggpo_beta", "0.01", r"LoRA-GGPO .* no DoRA form"),
    (FLUX, "train_blocks", "both", r"train_blocks='both' must be all, single or double"),
    (FLUX, "train_double_block_indices", "0-19", r"'0-19' is not a block index or range within 0-18"),
    (FLUX, "in_dims", "1,2", r"needs 5 ranks \(img, time, vector, guidance, txt\)"),
    (ANIMA, "exclude_patterns", "[", r"not a quoted regex or a list"),
    (FLUX, "network_reg_dims", "attn", r"'attn' is not 'regex=value'"),
    (FLUX, "split_qkv", "yes please", r"split_qkv='yes please' is not a boolean"),
    (SD3, "emb_dims", "[1,2,3]", r"needs 6 ranks \(context, t, x, y, final_mod, final_linear\)"),
    (SD3, "train_blocks", "single", r"'train_blocks' is an option of .*; this model is SD3/SD3\.5"),
    (LUMINA, "train_blocks", "double", r"must be one of all, transformer, refiners, noise_refiner, context_refiner"),
    (LUMINA, "train_t5xxl", "True", r"option of .*; this model is Lumina 2"),
    (HUNYUAN_IMAGE, "ggpo_sigma", "0.03", r"LoRA-GGPO .* no DoRA form"),
    (HUNYUAN_IMAGE, "conv_dim", "4", r"conv_dim is meaningless on HunyuanImage-2\.1"),
])
def test_family_options_refused_with_the_reason(family, key, value, message):
    with pytest.raises(ValueError, match=message):
        parse_network_args(4, 1, family=family, **{key: value})


def test_options_that_select_nothing_are_refused(flux_meta):
    with pytest.raises(ValueError, match=r"no layer matched on this FLUX\.1 model"):
        create_network(1.0, 4, 1, None, [], flux_meta[1], train_double_block_indices="none",
                       train_single_block_indices="none")


# -- the network on each family, tiny and on the CPU ---------------------------------------------------------------
def _flux_case():
    text_encoders, flux = build_flux_text_encoders("cpu", tiny=True), build_flux("cpu", tiny=True)
    gen = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, 6, 8, generator=gen), torch.randn(2, 5, 16, generator=gen),
              torch.randn(2, 256, generator=gen), torch.randn(2, 12, generator=gen), torch.randn(2, 256, generator=gen))
    return text_encoders, flux, lambda model: model(*inputs), {"train_t5xxl": "True"}


def _anima_case():
    text_encoders, anima = [build_qwen3("cpu", tiny=True)], build_anima("cpu", tiny=True)
    gen = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, 6, 12, generator=gen), torch.rand(2, generator=gen), torch.randn(2, 5, 16, generator=gen))
    return text_encoders, anima, lambda model: model(*inputs), {"train_llm_adapter": "true"}


def _sd3_case():
    text_encoders, mmdit = build_sd3_text_encoders("cpu", tiny=True), build_sd3("cpu", tiny=True)
    gen = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 8, generator=gen),
              torch.randn(2, 12, generator=gen), torch.randn(2, 5, 16, generator=gen))
    return text_encoders, mmdit, lambda model: model(*inputs), {"train_t5xxl": "True", "emb_dims": "[2,2,2,2,2,2]"}


def _lumina_case():
    text_encoders, nextdit = [build_gemma2("cpu", tiny=True)], build_lumina("cpu", tiny=True)
    gen = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, 6, 8, generator=gen), torch.randn(2, 8, generator=gen),
              torch.randn(2, 5, 16, generator=gen))
    return text_encoders, nextdit, lambda model: model(*inputs), {"embedder_dims": "[2,2,2]"}


def _hunyuan_image_case():
    dit = build_hunyuan_image("cpu", tiny=True)
    gen = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, 6, 8, generator=gen), torch.randn(2, 5, 16, generator=gen),
              torch.randn(2, 8, generator=gen))
    return [], dit, lambda model: model(*inputs), {}


CASES = {"flux": _flux_case, "anima": _anima_case, "sd3": _sd3_case, "lumina": _lumina_case,
         "hunyuan_image": _hunyuan_image_case}


def _trained(network) -> None:
    """Give every adapter a non-trivial update and magnitude, as training would."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in network.loras:
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=gen) * 0.1)
            if module.dora:
                module.dora_scale.mul_(1 + 0.1 * torch.randn(module.dora_scale.shape, generator=gen))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("wd_on_out", [False, True])
def test_forward_equals_float64_formula_and_merge(case, wd_on_out):
    text_encoders, model, run, options = CASES[case]()
    base_out = run(model)
    network = create_network(1.0, 4, 2, None, text_encoders, model, wd_on_out=str(wd_on_out), **options)
    network.apply_to(text_encoders, model, True, True)
    _trained(network)
    network.eval()
    with torch.no_grad():
        adapted = run(model)
        network.set_multiplier(0.0)  # differential output preservation runs the base this way
        assert torch.allclose(run(model), base_out, atol=1e-6)
        network.set_multiplier(1.0)

    network.restore()
    reference = copy.deepcopy(model)  # after restore: a copy of a patched model would copy the adapters too
    layers = dict(reference.named_modules())
    unet_paths = {t.lora_name: t.path for t in network.targets if t.component == "unet"}
    state = network.state_dict()
    with torch.no_grad():
        for name, path in unet_paths.items():
            tensors = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(name + ".")}
            layer = layers[path]
            layer.weight.copy_(explicit_weight(layer.weight, tensors, 1.0).float())
        assert torch.allclose(run(reference), adapted, atol=2e-5, rtol=1e-4)
        network.merge_to(text_encoders, model, None)
        assert torch.allclose(run(model), adapted, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case", sorted(CASES))
def test_save_reload_bit_for_bit_and_hooks(case, tmp_path):
    text_encoders, model, run, options = CASES[case]()
    network = create_network(1.0, 4, 2, None, text_encoders, model, **options)
    network.apply_to(text_encoders, model, True, True)
    network.prepare_grad_etc(text_encoders, model)
    _trained(network)
    network.train()
    run(model).square().mean().backward()
    network.update_grad_norms()
    network.update_norms()
    count = len(network.loras)
    assert network.weight_norms().shape == (count,) and torch.isfinite(network.weight_norms()).all()
    assert network.combined_weight_norms().shape == (count,)
    with_grad = sum(any(p.grad is not None for p in m.parameters()) for m in network.loras)
    assert with_grad == len(network.unet_loras)  # every denoiser layer ran; the text encoders did not
    assert network.grad_norms().shape[0] == with_grad
    file = tmp_path / f"{case}.safetensors"
    network.save_weights(str(file), torch.float32, {"ss_network_module": "dora_network"})

    fresh_te, fresh_model, _, _ = CASES[case]()
    reloaded, weights = create_network_from_weights(1.0, str(file), None, fresh_te, fresh_model)
    assert {t.lora_name for t in reloaded.targets} == {t.lora_name for t in network.targets}
    info = reloaded.load_state_dict(weights, strict=False)
    assert not info.missing_keys and not info.unexpected_keys
    saved, loaded = network.state_dict(), reloaded.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert reloaded.train_t5xxl == network.train_t5xxl


def test_flux_text_encoder_learning_rates_follow_positions():
    text_encoders, flux, _, _ = _flux_case()
    network = create_network(1.0, 4, 2, None, text_encoders, flux, train_t5xxl="True")
    network.apply_to(text_encoders, flux, True, True)
    groups, names = network.prepare_optimizer_params_with_multiple_te_lrs([1e-5, 2e-5], 1e-4, 1e-3)
    assert names == ["textencoder 1", "textencoder 2", "unet"]
    assert [g["lr"] for g in groups] == [1e-5, 2e-5, 1e-4]
    first = {id(p) for p in groups[0]["params"]}
    clip_params = {id(p) for m in network.text_encoder_loras if m.lora_name.startswith("lora_te1_")
                   for p in m.parameters()}
    assert first == clip_params


def test_network_reg_lrs_make_their_own_groups():
    text_encoders, flux, _, _ = _flux_case()
    network = create_network(1.0, 4, 2, None, text_encoders, flux, network_reg_lrs="single_blocks=5e-5")
    network.apply_to(text_encoders, flux, False, True)
    groups, names = network.prepare_optimizer_params_with_multiple_te_lrs(None, 1e-4, 1e-3)
    assert names == ["unet reg_lr_0", "unet"]
    assert groups[0]["lr"] == 5e-5 and groups[1]["lr"] == 1e-4
    single = {id(p) for m in network.unet_loras if "single_blocks" in m.lora_name for p in m.parameters()}
    assert {id(p) for p in groups[0]["params"]} == single


def test_anima_trainer_applies_no_text_encoder_adapters():
    """anima_train_network.py: is_train_text_encoder() is False, so apply_to(..., False, True); the file has the
    DiT's modules only, like lora_anima's."""
    text_encoders, anima, _, _ = _anima_case()
    network = create_network(1.0, 4, 2, None, text_encoders, anima)
    network.apply_to(text_encoders, anima, False, True)
    assert network.text_encoder_loras == []
    assert all(re.match(r"lora_unet_blocks_\d+_", key) for key in network.state_dict())


def test_split_qkv_trains_parts_and_saves_a_file_every_loader_applies_at_trained_strength(tmp_path):
    """q, k, v (and linear1's MLP input) get their own rank-r factors; the file holds one block-diagonal module
    under the fused name with alpha scaled by the number of parts, so alpha/rank is the trained alpha/r, and the
    formula applied to the file (what ComfyUI/LyCORIS/our loaders compute) is the trained layer."""
    text_encoders, flux, run, _ = _flux_case()
    network = create_network(1.0, 4, 2, None, text_encoders, flux, split_qkv="True")
    network.apply_to(text_encoders, flux, False, True)
    modules = dict(network.named_children())
    qkv = modules["lora_unet_double_blocks_0_img_attn_qkv"]
    linear1 = modules["lora_unet_single_blocks_0_linear1"]
    assert (qkv.rank, float(qkv.alpha), linear1.rank, float(linear1.alpha)) == (12, 6.0, 16, 8.0)
    assert modules["lora_unet_double_blocks_0_img_attn_proj"].rank == 4
    _trained(network)  # writes off-block entries too: the math must not see them
    network.train()
    run(flux).square().mean().backward()
    off_block = 1 - qkv._up_mask
    assert not (qkv.lora_up.weight.grad * off_block).any()

    file = tmp_path / "split.safetensors"
    network.save_weights(str(file), torch.float32, {})
    from safetensors.torch import load_file

    saved = load_file(str(file))
    up = saved["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert up.shape == (96, 12) and not (up * off_block).any()
    assert float(saved["lora_unet_single_blocks_0_linear1.alpha"]) / 16 == 2 / 4

    network.eval()
    with torch.no_grad():
        adapted = run(flux)
        network.restore()
        for name in ("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"):
            layer = dict(flux.named_modules())[next(t.path for t in network.targets if t.lora_name == name)]
            tensors = {k.split(".", 1)[1]: v for k, v in saved.items() if k.startswith(name + ".")}
            w = explicit_weight(layer.weight, tensors, 1.0).float()
            x = torch.randn(3, layer.weight.shape[1])
            network.apply_to(text_encoders, flux, False, True)
            got = layer(x)
            network.restore()
            assert torch.allclose(got, F.linear(x, w, layer.bias), atol=2e-5, rtol=1e-4)
    assert adapted.isfinite().all()

    fresh_te, fresh_flux, _, _ = _flux_case()
    reloaded, weights = create_network_from_weights(1.0, str(file), None, fresh_te, fresh_flux)
    assert not reloaded.load_state_dict(weights, strict=False).unexpected_keys

    dense = dict(saved)
    dense["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] = torch.ones(96, 12)
    split = create_network(1.0, 4, 2, None, [], build_flux("cpu", tiny=True), split_qkv="True")
    with pytest.raises(ValueError, match=r"not block-diagonal, so it was not trained with split_qkv"):
        split.load_file_state(dense)


@pytest.mark.parametrize("case, title", [("flux", "FLUX.1"), ("anima", "Anima"), ("sd3", "SD3/SD3.5"),
                                         ("lumina", "Lumina 2"), ("hunyuan_image", "HunyuanImage-2.1")])
def test_dora_inspect_names_the_family_and_judges_the_loaders_measured_on_it(case, title, tmp_path):
    from dora_network.tools.inspect import format_report, inspect_file

    text_encoders, model, _, options = CASES[case]()
    for wd_on_out in (False, True):
        network = create_network(1.0, 4, 2, None, text_encoders, model, wd_on_out=str(wd_on_out), **options)
        file = tmp_path / f"{case}_{wd_on_out}.safetensors"
        network.save_weights(str(file), torch.float16, {})
        report = inspect_file(str(file))
        assert report.base_model == title
        verdicts = report.verdicts()
        if case in ("anima", "lumina"):
            assert verdicts == {}
            assert "not judged: the loader rules were measured on SD/SDXL" in format_report(report)
            continue
        assert verdicts["ComfyUI + DoRA Loader node"] == "exact"
        expected_comfy = ("wrong" if case == "hunyuan_image" else "approximate" if wd_on_out else "exact")
        assert verdicts["ComfyUI"] == expected_comfy
        assert "A1111" not in verdicts and "not judged on" in format_report(report)
        if case != "hunyuan_image":
            assert verdicts["diffusers + dora_network helper"] == "exact"
            assert verdicts["diffusers"] == ("fails" if case == "sd3" else "wrong")


def test_sd3_text_encoder_learning_rates_repeat_the_last_as_sd_scripts():
    text_encoders, mmdit, _, _ = _sd3_case()
    network = create_network(1.0, 4, 2, None, text_encoders, mmdit, train_t5xxl="True")
    network.apply_to(text_encoders, mmdit, True, True)
    groups, names = network.prepare_optimizer_params_with_multiple_te_lrs([1e-5, 2e-5], 1e-4, 1e-3)
    assert names == ["textencoder 1", "textencoder 2", "textencoder 3", "unet"]
    assert [g["lr"] for g in groups] == [1e-5, 2e-5, 2e-5, 1e-4]  # lora_sd3: [a, b] -> CLIP-L a, CLIP-G b, T5 b


def test_hunyuan_image_file_in_comfyui_spelling_loads_onto_the_same_layers(tmp_path):
    """sd-scripts' converter renames img_mlp_fc1 -> img_mlp_0, img_mod_linear -> img_mod_lin, modulation_linear ->
    modulation_lin for ComfyUI; such a file reloads here onto the same layers with the same tensors."""
    from dora_network.families.hunyuan_image import to_comfy_name
    from dora_network.io import load_file, save_file

    _, dit, _, _ = _hunyuan_image_case()
    network = create_network(1.0, 4, 2, None, [], dit)
    _trained(network)
    file = tmp_path / "hy.safetensors"
    network.save_weights(str(file), torch.float32, {})
    state, metadata = load_file(str(file))
    comfy = {to_comfy_name(k.split(".", 1)[0]) + "." + k.split(".", 1)[1]: v for k, v in state.items()}
    renamed = {k.split(".")[0] for k in comfy} - {k.split(".")[0] for k in state}
    assert {re.sub(r"\d+", "N", n) for n in renamed} == {
        "lora_unet_double_blocks_N_img_mlp_N", "lora_unet_double_blocks_N_txt_mlp_N",
        "lora_unet_double_blocks_N_img_mod_lin", "lora_unet_double_blocks_N_txt_mod_lin",
        "lora_unet_single_blocks_N_modulation_lin"}
    save_file(str(tmp_path / "comfy.safetensors"), comfy, metadata)
    reloaded, weights = create_network_from_weights(1.0, str(tmp_path / "comfy.safetensors"), None, [],
                                                    build_hunyuan_image("cpu", tiny=True))
    reloaded.load_file_state(weights)
    assert {t.lora_name for t in reloaded.targets} == {t.lora_name for t in network.targets}
    saved, loaded = network.state_dict(), reloaded.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_lumina_split_qkv_grouped_query_parts_apply_at_trained_strength(tmp_path):
    """Lumina's qkv splits into q (width 32) and narrower k, v (16 each): one block-diagonal module of rank 3r
    and alpha 3*alpha in the file, whose formula is the trained layer."""
    text_encoders, nextdit, run, _ = _lumina_case()
    network = create_network(1.0, 4, 2, None, text_encoders, nextdit, split_qkv="True")
    network.apply_to(text_encoders, nextdit, False, True)
    qkv = dict(network.named_children())["lora_unet_layers_0_attention_qkv"]
    assert (qkv.rank, float(qkv.alpha)) == (12, 6.0)
    _trained(network)
    file = tmp_path / "split.safetensors"
    network.save_weights(str(file), torch.float32, {})
    from safetensors.torch import load_file

    saved = load_file(str(file))
    layer = dict(nextdit.named_modules())["layers.0.attention.qkv"]
    tensors = {k.split(".", 1)[1]: v for k, v in saved.items() if k.startswith("lora_unet_layers_0_attention_qkv.")}
    x = torch.randn(3, 32)
    network.eval()
    with torch.no_grad():
        got = layer(x)
        network.restore()
        want = F.linear(x, explicit_weight(layer.weight, tensors, 1.0).float(), layer.bias)
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-4)


def test_dora_convert_writes_hunyuan_image_names_as_comfyui_spells_them(tmp_path):
    from dora_network.io import load_file
    from dora_network.tools.convert import main

    _, dit, _, _ = _hunyuan_image_case()
    network = create_network(1.0, 4, 2, None, [], dit)
    _trained(network)
    network.save_weights(str(tmp_path / "hy.safetensors"), torch.float32, {})
    assert main([str(tmp_path / "hy.safetensors"), str(tmp_path / "comfy.safetensors"), "--unet_names", "comfy"]) == 0
    original, _ = load_file(str(tmp_path / "hy.safetensors"))
    converted, _ = load_file(str(tmp_path / "comfy.safetensors"))
    assert "lora_unet_double_blocks_0_img_mlp_0.lora_up.weight" in converted
    assert "lora_unet_single_blocks_1_modulation_lin.dora_scale" in converted
    assert len(converted) == len(original)
    assert all(torch.equal(converted[k.replace("mlp_fc1", "mlp_0").replace("mlp_fc2", "mlp_2")
                                     .replace("mod_linear", "mod_lin").replace("modulation_linear", "modulation_lin")],
                           v) for k, v in original.items())
    flux_file = tmp_path / "flux.safetensors"
    text_encoders, flux, _, _ = _flux_case()
    create_network(1.0, 4, 2, None, text_encoders, flux).save_weights(str(flux_file), torch.float32, {})
    with pytest.raises(ValueError, match="ComfyUI reads this FLUX.1 file's names as they are"):
        from dora_network.tools.convert import convert_file

        convert_file(flux_file, tmp_path / "x.safetensors", unet_names="comfy")


@pytest.mark.parametrize("case, layout", [("flux", "bfl"), ("flux", "comfy"), ("sd3", "sai")])
def test_dora_merge_bakes_dit_files_into_their_single_file_checkpoints(case, layout, tmp_path):
    """FLUX.1 as BFL ships it (bare double_blocks.*) or under model.diffusion_model.; SD3.5 as SAI ships it (with
    text_encoders.clip_l|clip_g|t5xxl.transformer.*). Every merged tensor equals merge_to on the model, within one
    float32 ulp-level tolerance; tensors no adapter touches are copied bit for bit."""
    from safetensors.torch import load_file, save_file

    from dora_network.tools.merge_checkpoint import merge_into_checkpoint

    text_encoders, model, _, options = CASES[case]()
    if case == "flux":  # BFL's file holds the DiT only: train it alone (--network_train_unet_only)
        text_encoders, options = [], {}
    network = create_network(1.0, 4, 2, None, text_encoders, model, **options)
    _trained(network)
    adapters = tmp_path / "dora.safetensors"
    network.save_weights(str(adapters), torch.float32, {})

    prefix = "" if layout == "bfl" else "model.diffusion_model."
    checkpoint = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    if case == "sd3":
        for wrapper, te in zip(("clip_l", "clip_g", "t5xxl"), text_encoders):
            checkpoint.update({f"text_encoders.{wrapper}.transformer.{k}": v.clone()
                               for k, v in te.state_dict().items()})
    base = tmp_path / "base.safetensors"
    save_file(checkpoint, str(base))
    report = merge_into_checkpoint(base, [(adapters, 0.75)], tmp_path / "merged.safetensors")
    assert report.files[0].matched == len(network.targets) and not report.files[0].unmatched

    fresh_te, fresh_model, _, _ = CASES[case]()
    fresh_te = fresh_te if case == "sd3" else []
    reference, weights = create_network_from_weights(0.75, str(adapters), None, fresh_te, fresh_model,
                                                     for_inference=True)
    reference.merge_to(fresh_te, fresh_model, weights, torch.float32, "cpu")
    expected = {prefix + k: v for k, v in fresh_model.state_dict().items()}
    if case == "sd3":
        for wrapper, te in zip(("clip_l", "clip_g", "t5xxl"), fresh_te):
            expected.update({f"text_encoders.{wrapper}.transformer.{k}": v for k, v in te.state_dict().items()})
    merged = load_file(str(tmp_path / "merged.safetensors"))
    assert merged.keys() == checkpoint.keys()
    changed = [k for k in merged if not torch.equal(merged[k], checkpoint[k])]
    assert len(changed) == len(network.targets)
    for key, tensor in merged.items():
        assert torch.allclose(tensor, expected[key], atol=1e-6, rtol=1e-6), key
