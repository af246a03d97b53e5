"""dora-inspect and dora-convert on files saved from the tiny SDXL: loader verdicts follow reference/loaders.md's
rules, counts match the network, exact conversions leave the merged weights unchanged, approximate ones report the
error they really make.

Files come from ``create_network`` with randomised ``lora_up`` and ``dora_scale`` (nothing is trained). The
verdicts are the rules of loaders.md applied to each file's properties; no UI code runs here.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file as st_save
from torch import nn

import dora_network
from dora_network.io import load_file, safetensors_hashes
from dora_network.tiny import build_tiny_sdxl
from dora_network.tools import convert as C
from dora_network.tools import inspect as I
from dora_network.families.sdxl import diffusers_to_sai

GOLDEN = Path(__file__).resolve().parent / "golden"
ALL_EXACT = {loader: "exact" for loader in I.LOADERS}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    model = build_tiny_sdxl(seed=0)
    for module in [model.unet, *model.text_encoders]:
        module.requires_grad_(False)
    return model


def _save(tiny, folder: Path, name: str, alpha: float = 2, **network_args: str) -> Path:
    """A file with non-trivial tensors: rank 4, conv 3x3 rank 4, the given alpha and network_args."""
    network = dora_network.create_network(1.0, 4, alpha, None, tiny.text_encoders, tiny.unet, conv_dim="4",
                                          conv_alpha=str(alpha), **network_args)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in network.loras:
            up = module.lora_up.weight
            up.copy_(torch.randn(up.shape, generator=gen) * 0.3 / math.sqrt(up.shape[1]))
            if module.dora:
                module.dora_scale.mul_(1 + 0.3 * (2 * torch.rand(module.dora_scale.shape, generator=gen) - 1))
    path = folder / f"{name}.safetensors"
    network.save_weights(str(path), None, {"ss_network_dim": "4", "ss_network_alpha": str(alpha)})
    return path


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("files")
    return {
        "in": _save(tiny, folder, "in"),  # full preset (te1, te2, UNet), alpha 2 / rank 4
        "in_unet": _save(tiny, folder, "in_unet", alpha=4, preset="unet-only"),  # alpha == rank, no TE
        "out": _save(tiny, folder, "out", wd_on_out="True"),
        "tucker": _save(tiny, folder, "tucker", use_tucker="True"),
        "lora": _save(tiny, folder, "lora", algo="lora"),
    }


def _load(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)[0]


def _one_d(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.reshape(-1) if k.endswith(".dora_scale") else v for k, v in sd.items()}


def _short_te(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text-encoder names as a module-path walk over a transformers-5 CLIPTextModel spells them."""
    out = {}
    for key, value in sd.items():
        for prefix in ("lora_te1_", "lora_te2_"):
            if key.startswith(prefix + "text_model_"):
                key = prefix + key[len(prefix + "text_model_"):]
        out[key] = value
    return out


def _merged(tiny, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lora_name -> W(1) through our own loader (create_network_from_weights, any accepted spelling)."""
    network, _ = dora_network.create_network_from_weights(1.0, None, None, tiny.text_encoders, tiny.unet,
                                                          weights_sd=dict(sd))
    return {m.lora_name: m.merged_weight() for m in network.loras}


def _base(tiny) -> I.BaseModel:
    return I.load_base_model(tiny)


def _worst_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], base: I.BaseModel) -> float:
    """max over modules of ||a - b|| / ||b - W0||."""
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).norm() / (b[n] - base.weight(n)).norm()) for n in a)


def _verdicts(**changes: str) -> dict[str, str]:
    return {**ALL_EXACT, **changes}


# -- inspect: counts and properties -------------------------------------------------------------------------------
def test_inspect_counts_match_network(tiny, files):
    report = I.inspect_file(files["in"])
    network, _ = dora_network.create_network_from_weights(1.0, files["in"], None, tiny.text_encoders, tiny.unet)
    kinds = Counter(t.kind for t in network.targets)
    parts = Counter(t.component for t in network.targets)
    assert report.modules == len(network.targets) == report.dora_modules
    assert report.by_kind == {"Linear": kinds["linear"], "Conv 1x1": kinds["conv1x1"], "Conv kxk": kinds["conv"],
                              "Tucker": 0}
    assert report.by_part == {"UNet": parts["unet"], "TE1": parts["te1"], "TE2": parts["te2"]}
    assert (report.unet_naming, report.te_naming, report.algo, report.axis) == ("diffusers", "classic", "DoRA", "in")
    assert report.ranks == {4: report.modules} and report.alphas == {2.0: report.modules}
    assert report.alpha_not_rank == report.modules and report.dora_scale_1d == 0
    assert report.te2_self_attn_dora == 8 and report.base_model == "SDXL"
    assert report.dtypes == {"float32": report.tensors} and report.hashes_match is True
    assert report.metadata["ss_network_module"] == "dora_network"
    assert report.metadata["dora_network.wd_on_out"] == "False"

    tucker = I.inspect_file(files["tucker"])
    assert tucker.by_kind["Tucker"] == kinds["conv"] and tucker.by_kind["Conv kxk"] == 0
    assert tucker.tucker_dora == kinds["conv"]
    lora = I.inspect_file(files["lora"])
    assert (lora.algo, lora.axis, lora.dora_modules, lora.dora_scale_dtypes) == ("LoRA", "none", 0, {})


# -- inspect: loader verdicts (reference/loaders.md) ----------------------------------------------------------------
CASES = {
    # in-axis, alpha == rank, no text encoders: the recommended file
    "in_unet": _verdicts(diffusers="wrong", LyCORIS="fails"),
    # + te2 self-attention DoRA (A1111 skips those groups) and alpha 2 / rank 4 (old SD.Next)
    "in": _verdicts(A1111="wrong", **{"SD.Next (before 2026-07-12)": "wrong"}, diffusers="wrong", LyCORIS="fails"),
    "out": _verdicts(ComfyUI="approximate", Forge="approximate", A1111="wrong", InvokeAI="wrong",
                     **{"SD.Next (before 2026-07-12)": "wrong"}, diffusers="wrong"),
    "tucker": _verdicts(A1111="wrong", InvokeAI="fails", **{"SD.Next (before 2026-07-12)": "wrong"},
                        diffusers="fails", LyCORIS="fails"),
    "lora": ALL_EXACT,
}


@pytest.mark.parametrize("case", list(CASES))
def test_inspect_verdicts_follow_loader_rules(files, case):
    report = I.inspect_file(files[case])
    assert report.verdicts() == CASES[case]
    for verdict in report.loaders.values():
        assert bool(verdict.reasons) == (verdict.verdict != "exact")


def test_inspect_reasons_name_the_cause(files):
    out = I.inspect_file(files["out"]).loaders
    assert "||W0||" in out["ComfyUI"].reasons[0] and "grows with training" in out["ComfyUI"].reasons[0]
    full = I.inspect_file(files["in"]).loaders
    assert any("CLIP-G self-attention" in r for r in full["A1111"].reasons)
    assert any("alpha != rank" in r for r in full["SD.Next (before 2026-07-12)"].reasons)
    assert any("wd_on_output=False" in r for r in full["LyCORIS"].reasons)
    assert any("apply_dora_to_pipeline" in r for r in full["diffusers"].reasons)
    tucker = I.inspect_file(files["tucker"]).loaders
    assert any("lora_mid" in r for r in tucker["InvokeAI"].reasons + tucker["diffusers"].reasons)


def test_inspect_one_d_dora_scale(files):
    sd, metadata = load_file(files["in"])
    report = I.inspect_file(_one_d(sd), metadata)
    assert report.dora_scale_1d == report.modules and report.axis == "in" and report.axis_hint == "in"
    assert report.axis_counts["ambiguous"] > 0  # square layers
    assert report.verdicts() == _verdicts(
        ComfyUI="wrong", Forge="wrong", A1111="fails", InvokeAI="fails", **{"SD.Next": "wrong"},
        **{"SD.Next (before 2026-07-12)": "wrong"}, diffusers="wrong", LyCORIS="fails")
    assert any("DoRA Loader node" in r for r in report.loaders["ComfyUI"].reasons)  # the way out in ComfyUI
    # without the metadata nothing tells the square layers' axis: our loaders guess out-axis, wrong for this file
    square = {k.partition(".")[0] for k, v in sd.items() if k.endswith(".lora_down.weight")
              and sd[k.replace("lora_down", "lora_up")].shape[0] == v.shape[1]}
    bare = I.inspect_file(_one_d({k: v for k, v in sd.items() if k.partition(".")[0] in square}), {})
    assert bare.axis_hint is None and bare.axis_counts["ambiguous"] == bare.modules
    for loader in ("diffusers + dora_network helper", "ComfyUI + DoRA Loader node"):
        assert bare.loaders[loader].verdict == "wrong" and "in-axis" in bare.loaders[loader].reasons[0]


def test_inspect_transformers5_text_encoder_names(files):
    report = I.inspect_file(_short_te(_load(files["lora"])))
    assert report.te_naming == "short"
    assert report.verdicts() == _verdicts(ComfyUI="wrong", Forge="wrong", A1111="wrong", InvokeAI="wrong",
                                          **{"SD.Next": "wrong", "SD.Next (before 2026-07-12)": "wrong"})
    assert "--te_names classic" in report.loaders["ComfyUI"].reasons[0]


def test_inspect_mixed_unet_names_fail_in_invokeai(files):
    sd = _load(files["lora"])
    first = next(k.partition(".")[0] for k in sd if k.startswith("lora_unet_down_blocks_1_attentions_0_"))
    sai = C.unet_lora_name(first, "sai")
    mixed = {(sai + k[len(first):] if k.startswith(first + ".") else k): v for k, v in sd.items()}
    report = I.inspect_file(mixed)
    assert report.unet_naming == "mixed" and report.loaders["InvokeAI"].verdict == "fails"


def test_inspect_lycoris_written_file(tiny, tmp_path):
    """A file saved by LyCORIS 4.1.3 itself (out-axis default, Tucker, fp16, short te1 names on transformers 5)."""
    lk = pytest.importorskip("lycoris.kohya")
    toml = pytest.importorskip("toml")
    preset = tmp_path / "preset.toml"  # LyCORIS' built-in "full" crashes on diffusers UNets (duplicate names)
    toml.dump({"enable_conv": True, "unet_target_name": [], "text_encoder_target_name": [],
               "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
               "text_encoder_target_module": ["CLIPAttention", "CLIPMLP"]}, preset.open("w"))
    own = build_tiny_sdxl(seed=0)  # LyCORIS patches forwards; keep the shared model clean
    network = lk.create_network(1.0, 4, 2, None, own.text_encoders, own.unet, algo="lora", dora_wd="True",
                                preset=str(preset), conv_dim="4", conv_alpha="2", use_tucker="True")
    network.apply_to(own.text_encoders, own.unet, True, True)  # LyCORIS registers its modules here
    path = tmp_path / "lycoris.safetensors"
    network.save_weights(str(path), torch.float16, {})
    report = I.inspect_file(path, model=tiny)
    assert (report.algo, report.axis, report.tucker_dora, report.hashes_match) == ("DoRA", "out", 38, None)
    assert report.dtypes["float16"] > 0 and report.model.matched == report.modules
    assert report.te_naming == ("mixed" if not hasattr(tiny.text_encoders[0], "text_model") else "classic")
    verdicts = report.verdicts()
    assert verdicts["InvokeAI"] == verdicts["diffusers"] == "fails" and verdicts["LyCORIS"] == "exact"
    assert verdicts["diffusers + dora_network helper"] == "exact" and verdicts["SD.Next"] != "fails"


# -- inspect: base model matching ---------------------------------------------------------------------------------
def _sai_checkpoint(tiny, path: Path) -> Path:
    """The tiny SDXL written as an SAI single-file checkpoint (OpenCLIP layout for the second text encoder)."""
    sd: dict[str, torch.Tensor] = {}
    for name, module in tiny.unet.named_modules():
        sai = diffusers_to_sai(name) if isinstance(module, (nn.Linear, nn.Conv2d)) else None
        if sai:
            sd[f"model.diffusion_model.{sai}.weight"] = module.weight.detach().clone()
    for name, module in tiny.text_encoders[0].named_modules():
        if isinstance(module, nn.Linear):
            path_ = name if name.startswith("text_model.") else "text_model." + name
            sd[f"conditioner.embedders.0.transformer.{path_}.weight"] = module.weight.detach().clone()
    for i, layer in enumerate(tiny.text_encoders[1].text_model.encoder.layers):
        stem = f"conditioner.embedders.1.model.transformer.resblocks.{i}."
        attn = layer.self_attn
        sd[stem + "attn.in_proj_weight"] = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        sd[stem + "attn.out_proj.weight"] = attn.out_proj.weight.detach().clone()
        sd[stem + "mlp.c_fc.weight"] = layer.mlp.fc1.weight.detach().clone()
        sd[stem + "mlp.c_proj.weight"] = layer.mlp.fc2.weight.detach().clone()
    st_save({k: v.detach().contiguous() for k, v in sd.items()}, str(path))
    return path


def test_inspect_model_matches_tiny_and_sai_checkpoint(tiny, files, tmp_path):
    sd = _load(files["out"])
    by_object = I.inspect_file(sd, model=tiny)
    assert by_object.model.matched == by_object.modules and not by_object.model.unmatched
    assert "measured on the given base model" in by_object.loaders["ComfyUI"].reasons[0]
    sai = C.convert_unet_names(sd, "sai").state_dict
    checkpoint = _sai_checkpoint(tiny, tmp_path / "tiny_sai.safetensors")
    for state_dict in (sai, sd):  # either UNet spelling matches the checkpoint
        report = I.inspect_file(state_dict, model=str(checkpoint))
        assert report.model.matched == report.modules, report.model
    base = I.load_base_model(str(checkpoint))  # fused CLIP-G in_proj rows are sliced back to q/k/v
    q = "lora_te2_text_model_encoder_layers_1_self_attn_k_proj"
    assert torch.equal(base.weight(q), tiny.text_encoders[1].text_model.encoder.layers[1].self_attn.k_proj.weight)
    foreign = {k.replace("lora_unet_down_blocks_1_", "lora_unet_down_blocks_9_"): v for k, v in sd.items()}
    assert I.inspect_file(foreign, model=tiny).model.unmatched


def test_inspect_model_from_diffusers_folder(tiny, files, tmp_path):
    tiny.unet.save_pretrained(tmp_path / "unet")
    tiny.text_encoders[0].save_pretrained(tmp_path / "text_encoder")
    tiny.text_encoders[1].save_pretrained(tmp_path / "text_encoder_2")
    report = I.inspect_file(files["in"], model=str(tmp_path))
    assert report.model.matched == report.modules


# -- CLI ----------------------------------------------------------------------------------------------------------
def test_cli_inspect_json_and_text(files, capsys):
    assert I.main([str(files["out"]), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {k: v["verdict"] for k, v in data["loaders"].items()} == CASES["out"]
    assert data["ranks"] == {"4": data["modules"]} and data["axis"] == "out"
    assert I.main([str(files["in"])]) == 0
    text = capsys.readouterr().out
    assert "kinds:" in text and "LyCORIS" in text and "fails" in text
    assert I.main([str(files["in"].parent / "missing.safetensors")]) == 2
    with pytest.raises(SystemExit) as exit_info:
        I.main(["--help"])
    assert exit_info.value.code == 0 and "examples:" in capsys.readouterr().out


# -- convert: exact ------------------------------------------------------------------------------------------------
def test_fold_alpha_is_exact_and_fixes_old_sdnext(tiny, files):
    sd = _load(files["in"])
    result = C.fold_alpha(sd)
    assert result.exact and result.max_abs_error == 0.0 and result.rel_error == 0.0  # alpha/rank = 1/2
    assert result.modules_changed == _modules(sd)
    folded = result.state_dict
    assert all(float(v) == 4.0 for k, v in folded.items() if k.endswith(".alpha"))
    base = _base(tiny)
    assert _worst_rel(_merged(tiny, folded), _merged(tiny, sd), base) < 1e-6
    assert I.inspect_file(folded).loaders["SD.Next (before 2026-07-12)"].verdict == "exact"
    # alpha/rank = 3/4 is not a power of two: lora_up is rounded once, and that is what is reported
    odd = {k: (torch.tensor(3.0) if k.endswith(".alpha") else v) for k, v in sd.items()}
    result = C.fold_alpha(odd)
    assert result.exact and 0 <= result.rel_error < 1e-6
    assert _worst_rel(_merged(tiny, result.state_dict), _merged(tiny, odd), base) < 1e-6


def _modules(sd: dict[str, torch.Tensor]) -> int:
    return len({k.partition(".")[0] for k in sd})


def test_reshape_one_d_dora_scale_restores_the_file(tiny, files):
    sd, metadata = load_file(files["in"])
    result = C.reshape_dora_scale(_one_d(sd), metadata)
    assert result.exact and result.max_abs_error == 0.0 and result.modules_changed == _modules(sd)
    assert result.state_dict.keys() == sd.keys()
    assert all(torch.equal(result.state_dict[k], v) and result.state_dict[k].shape == v.shape for k, v in sd.items())
    # without metadata the unambiguous (non-square) modules give the axis
    guessed = C.reshape_dora_scale(_one_d(sd)).state_dict
    assert all(torch.equal(guessed[k], v) for k, v in sd.items())
    square = {k: v for k, v in _one_d(sd).items() if k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q")}
    with pytest.raises(ValueError, match="axis='in' or 'out'"):
        C.reshape_dora_scale(square)
    assert C.reshape_dora_scale(square, axis="out").state_dict[next(k for k in square if "dora" in k)].shape == (32, 1)


def test_unet_name_conversion_is_exact_and_round_trips(tiny, files):
    sd = _load(files["out"])
    to_sai = C.convert_unet_names(sd, "sai")
    assert to_sai.exact and to_sai.max_abs_error == 0.0 and to_sai.rel_error == 0.0
    assert to_sai.modules_changed == I.inspect_file(sd).by_part["UNet"]
    assert I.inspect_file(to_sai.state_dict).unet_naming == "SAI"
    assert _worst_rel(_merged(tiny, to_sai.state_dict), _merged(tiny, sd), _base(tiny)) == 0.0
    back = C.convert_unet_names(to_sai.state_dict, "diffusers").state_dict
    assert back.keys() == sd.keys() and all(torch.equal(back[k], v) for k, v in sd.items())
    # every real SDXL UNet target name (golden list, SAI spelling) survives SAI -> diffusers -> SAI
    rows = (GOLDEN / "sdxl_targets_conv.tsv").read_text().splitlines()[1:]
    names = [row.split("\t")[0] for row in rows if row.startswith("lora_unet_")]
    assert len(names) > 700
    for name in names:
        diffusers_name = C.unet_lora_name(name, "diffusers")
        assert diffusers_name != name and C.unet_lora_name(diffusers_name, "sai") == name
    with pytest.raises(ValueError, match="SD1/SD2"):
        C.convert_unet_names({"lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)}, "sai")


def test_text_encoder_name_fix_restores_classic_names(files):
    sd = _load(files["lora"])
    result = C.classic_text_encoder_names(_short_te(sd))
    assert result.exact and result.max_abs_error == 0.0 and result.modules_changed == 24
    assert result.state_dict.keys() == sd.keys()
    assert I.inspect_file(result.state_dict).verdicts() == ALL_EXACT


def test_dtype_conversion_reports_rounding(files):
    sd = _load(files["in"])
    half = C.cast_dtype(sd, torch.bfloat16)
    assert not half.exact and 0 < half.rel_error < 1e-2 and half.max_abs_error > 0
    assert I.inspect_file(half.state_dict).dtypes == {"bfloat16": 2 * _modules(sd), "float32": 2 * _modules(sd)}
    back = C.cast_dtype(half.state_dict, torch.float32)
    assert back.exact and back.max_abs_error == 0.0 and back.rel_error == 0.0
    big = {k: (v * 1e6 if k.endswith("lora_up.weight") else v) for k, v in sd.items()}
    with pytest.raises(ValueError, match="overflows"):
        C.cast_dtype(big, torch.float16)


# -- convert: approximate ------------------------------------------------------------------------------------------
def test_dora_to_lora_error_falls_with_rank_and_is_measured(tiny, files):
    sd = _load(files["in"])
    base = I.load_base_model(tiny)
    errors = {rank: C.dora_to_lora(sd, base, rank) for rank in (4, 64, 100_000)}
    assert errors[4].rel_error > errors[64].rel_error > 10 * errors[100_000].rel_error
    assert errors[100_000].rel_error < 1e-5 and not errors[4].exact
    lora = errors[4].state_dict
    report = I.inspect_file(lora)
    assert report.algo == "LoRA" and report.ranks == {4: report.modules} and report.alpha_not_rank == 0
    # the reported error is the real one: W' - W0 of the DoRA vs the LoRA's update, through our own loader
    dora, plain, w0 = _merged(tiny, sd), _merged(tiny, lora), _base(tiny)
    for name in list(dora)[::37]:
        real = float((plain[name] - dora[name]).norm() / (dora[name] - w0.weight(name)).norm())
        assert real == pytest.approx(errors[4].per_module[name], rel=1e-3)


def test_dora_to_lora_from_sai_checkpoint_equals_tiny(tiny, files, tmp_path):
    sd = _load(files["tucker"])
    checkpoint = _sai_checkpoint(tiny, tmp_path / "tiny_sai.safetensors")
    from_tiny = C.dora_to_lora(sd, tiny, 4)
    from_checkpoint = C.dora_to_lora(C.convert_unet_names(sd, "sai").state_dict, str(checkpoint), 4)
    assert from_tiny.rel_error == pytest.approx(from_checkpoint.rel_error, rel=1e-5)
    assert any("Tucker" in note for note in from_tiny.notes)


def test_change_axis_refits_and_reports_residual(tiny, files):
    sd = _load(files["out"])
    base = I.load_base_model(tiny)
    refit = C.change_axis(sd, base, wd_on_out=False)
    full = C.change_axis(sd, base, wd_on_out=False, rank=100_000)
    assert not refit.exact and full.rel_error < 1e-5 < refit.rel_error
    converted = I.inspect_file(refit.state_dict)
    assert converted.axis == "in" and converted.ranks == {4: converted.modules}
    assert converted.loaders["A1111"].verdict == "wrong"  # te2 self-attention DoRA, nothing else
    original, new, w0 = _merged(tiny, sd), _merged(tiny, refit.state_dict), _base(tiny)
    for name in list(original)[::41]:
        real = float((new[name] - original[name]).norm() / (original[name] - w0.weight(name)).norm())
        assert real == pytest.approx(refit.per_module[name], rel=1e-3)
    assert C.change_axis(sd, base, wd_on_out=True).modules_changed == 0


# -- convert: files and CLI ---------------------------------------------------------------------------------------
def test_cli_convert_writes_fixed_file_with_provenance(tiny, files, tmp_path, capsys):
    sd, metadata = load_file(files["in"])
    one_d = tmp_path / "one_d.safetensors"
    st_save(_one_d(sd), str(one_d), metadata)
    fixed = tmp_path / "fixed.safetensors"
    assert C.main([str(one_d), str(fixed), "--dora_scale_2d", "--fold_alpha", "--unet_names", "sai"]) == 0
    printed = capsys.readouterr().out
    assert "dora_scale_2d: exact" in printed and "fold_alpha: exact" in printed and "unet_names(sai)" in printed
    out_sd, out_meta = load_file(fixed)
    provenance = json.loads(out_meta[C.CONVERTED_FROM])
    assert provenance["source"] == "one_d.safetensors"
    assert [op["operation"] for op in provenance["operations"]] == ["dora_scale_2d", "unet_names(sai)", "fold_alpha"]
    assert all(op["max_abs_error"] == 0.0 for op in provenance["operations"])
    assert out_meta["sshs_model_hash"] == safetensors_hashes(out_sd, out_meta)[0]  # recomputed, not stale
    report = I.inspect_file(fixed)
    assert report.verdicts() == _verdicts(A1111="wrong", diffusers="wrong", LyCORIS="fails")
    assert _worst_rel(_merged(tiny, out_sd), _merged(tiny, sd), _base(tiny)) < 1e-6
    assert C.main([str(one_d), str(fixed), "--fold_alpha"]) == 2  # exists, no --overwrite
    assert C.main([str(files["in"]), str(tmp_path / "x.safetensors"), "--to_lora"]) == 2  # needs --model
    assert C.main([str(files["in"]), str(tmp_path / "y.safetensors")]) == 2  # nothing to do


def test_cli_convert_to_lora_json_with_tiny_model(files, tmp_path, capsys):
    out = tmp_path / "lora.safetensors"
    assert C.main([str(files["in_unet"]), str(out), "--to_lora", "--rank", "8", "--model", "tiny", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results[0]["operation"] == "dora_to_lora(rank=8)" and results[0]["rel_error"] > 0
    assert I.inspect_file(out).verdicts() == ALL_EXACT
    assert load_file(out)[1]["ss_network_dim"] == "8"
