"""dora-merge (checkpoint baking, diffusers folder and SAI single file) and dora-analyze (DoRA paper section 3)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file as st_load
from safetensors.torch import save_file as st_save

from dora_network import create_network, create_network_from_weights, tiny
from dora_network.targets import find_targets
from dora_network.tools import analyze, merge_checkpoint
from dora_network.families.sdxl import diffusers_to_sai

STRENGTHS = (1.0, 0.5)
_OPENCLIP = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "layer_norm1": "ln_1", "layer_norm2": "ln_2"}
_OPENCLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                 "embeddings.position_embedding.weight": "positional_embedding",
                 "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def diffusers_to_sai_checkpoint(folder: Path, output: Path) -> None:
    """Test-side converter: a diffusers SDXL folder's UNet and text encoders in the SAI single-file layout.

    UNet -> ``model.diffusion_model.<sai path>`` (unet_names), TE1 -> ``conditioner.embedders.0.transformer.
    text_model.*``, TE2 -> OpenCLIP (``...embedders.1.model.transformer.resblocks.N``, fused q/k/v ``in_proj``).
    The VAE is left out (the merge never touches it); from_single_file gets it as a component.
    """
    sd: dict[str, torch.Tensor] = {}
    for key, value in st_load(folder / "unet" / "diffusion_pytorch_model.safetensors").items():
        module, _, leaf = key.rpartition(".")
        sd[f"model.diffusion_model.{diffusers_to_sai(module)}.{leaf}"] = value
    for key, value in st_load(folder / "text_encoder" / "model.safetensors").items():
        sd["conditioner.embedders.0.transformer.text_model." + key.removeprefix("text_model.")] = value
    prefix, fused = "conditioner.embedders.1.model.", {}
    for key, value in st_load(folder / "text_encoder_2" / "model.safetensors").items():
        key = key.removeprefix("text_model.")
        if key == "text_projection.weight":
            sd[prefix + "text_projection"] = value.T.contiguous()  # OpenCLIP multiplies x @ proj
        elif key in _OPENCLIP_TOP:
            sd[prefix + _OPENCLIP_TOP[key]] = value
        elif key.startswith("encoder.layers."):
            _, _, block, rest = key.split(".", 3)
            part, _, leaf = rest.rpartition(".")
            if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                fused.setdefault((block, leaf), {})[part[-6]] = value
            else:
                sd[f"{prefix}transformer.resblocks.{block}.{_OPENCLIP[part]}.{leaf}"] = value
    for (block, leaf), qkv in fused.items():
        sd[f"{prefix}transformer.resblocks.{block}.attn.in_proj_{leaf}"] = torch.cat([qkv[c] for c in "qkv"])
    st_save(sd, str(output))


def _random_adapters(seed: int, path: Path, **network_args: str) -> None:
    model = tiny.build_tiny_sdxl(seed=0)
    torch.manual_seed(seed)
    network = create_network(1.0, 4, 2.0, model.vae, model.text_encoders, model.unet, **network_args)
    with torch.no_grad():
        for module in network.loras:
            module.lora_up.weight.normal_(std=0.1)
            if module.dora:
                module.dora_scale.mul_(1.0 + 0.1 * torch.randn_like(module.dora_scale))
    network.save_weights(str(path))


def _sai_spelling(path: Path, model: tiny.TinySDXL) -> None:
    """Rewrite a file's UNet names in the SAI spelling, TE names without ``text_model_``, plus one stray module."""
    rename = {}
    for target in find_targets(model.text_encoders, model.unet, with_conv_blocks=True):
        old = target.lora_name
        if target.component == "unet":
            rename[old] = "lora_unet_" + diffusers_to_sai(target.path).replace(".", "_")
        else:
            rename[old] = old.replace("_text_model_", "_")
    sd = st_load(str(path))
    sd = {rename.get(k.partition(".")[0], k.partition(".")[0]) + "." + k.partition(".")[2]: v for k, v in sd.items()}
    sd["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(4, 8)
    sd["lora_unet_not_a_layer.lora_up.weight"] = torch.zeros(8, 4)
    st_save(sd, str(path))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """Base checkpoints (diffusers folder, SAI single file), two adapter files, and the reference merged model."""
    root = tmp_path_factory.mktemp("merge")
    model = tiny.build_tiny_sdxl(seed=0)
    tiny.build_pipeline(model).save_pretrained(root / "base")
    diffusers_to_sai_checkpoint(root / "base", root / "base.safetensors")
    files = [root / "dora_in_tucker.safetensors", root / "dora_out_sai_names.safetensors"]
    _random_adapters(1, files[0], conv_dim="4", conv_alpha="2", use_tucker="True")
    _random_adapters(2, files[1], wd_on_out="True")
    _sai_spelling(files[1], model)
    reference = tiny.build_tiny_sdxl(seed=0)  # independent: sequential create_network_from_weights + merge_to
    for file, strength in zip(files, STRENGTHS):
        network, _ = create_network_from_weights(strength, str(file), None, reference.text_encoders, reference.unet,
                                                 allow_partial_load="True")  # the second has a stray module
        network.merge_to(reference.text_encoders, reference.unet, None)
    return {"root": root, "files": files, "model": model, "reference": reference}


def _max_error(module: torch.nn.Module, reference: torch.nn.Module) -> float:
    ours, theirs = module.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    return max(float((ours[k].float() - theirs[k].float()).abs().max()) for k in ours)


def _check_pipeline(pipe, reference: tiny.TinySDXL, base: tiny.TinySDXL) -> dict[str, float]:
    errors = {"unet": _max_error(pipe.unet, reference.unet),
              "te1": _max_error(pipe.text_encoder, reference.text_encoders[0]),
              "te2": _max_error(pipe.text_encoder_2, reference.text_encoders[1])}
    assert max(errors.values()) <= 1e-6, errors
    assert _max_error(reference.unet, base.unet) > 1e-2  # the merge changed something worth checking
    assert _max_error(reference.text_encoders[1], base.text_encoders[1]) > 1e-2
    return errors


def test_merge_into_diffusers_folder_equals_sequential_merge_to(bundle):
    from diffusers import StableDiffusionXLPipeline

    root = bundle["root"]
    with pytest.raises(ValueError, match=r"dora_out_sai_names.*1 of the file's \d+ modules match no layer.*--allow_partial"):
        merge_checkpoint.merge_into_checkpoint(root / "base", list(zip(bundle["files"], STRENGTHS)), root / "merged")
    assert not (root / "merged").exists()  # refused before anything was written
    report = merge_checkpoint.merge_into_checkpoint(root / "base", list(zip(bundle["files"], STRENGTHS)),
                                                    root / "merged", allow_partial=True)
    assert report.layout == "diffusers"
    first, second = report.files
    assert (first.matched, first.unmatched, first.dora) == (first.matched, [], first.matched)
    assert second.unmatched == ["lora_unet_not_a_layer"] and second.dora == second.matched > 0
    assert first.matched > second.matched  # conv blocks only in the first file
    pipe = StableDiffusionXLPipeline.from_pretrained(root / "merged", local_files_only=True)
    print("diffusers folder max errors:", _check_pipeline(pipe, bundle["reference"], bundle["model"]))
    assert (root / "merged" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        root / "base" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()


def test_merge_into_sai_single_file_updates_fused_in_proj_slices(bundle):
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    root = bundle["root"]
    output = root / "merged.safetensors"
    report = merge_checkpoint.merge_into_checkpoint(root / "base.safetensors",
                                                    list(zip(bundle["files"], STRENGTHS)), output, allow_partial=True)
    assert report.layout == "single_file" and [f.unmatched for f in report.files] == [[], ["lora_unet_not_a_layer"]]
    merged, base = st_load(str(output)), st_load(str(root / "base.safetensors"))
    assert merged.keys() == base.keys()
    in_proj = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    assert not torch.equal(merged[in_proj], base[in_proj])
    # from_single_file works offline with the local tiny config folder; the VAE is passed in because the test
    # converter writes no LDM-layout VAE (the merge copies VAE tensors untouched anyway)
    vae = AutoencoderKL.from_pretrained(root / "base" / "vae")
    pipe = StableDiffusionXLPipeline.from_single_file(str(output), config=str(root / "base"),
                                                      local_files_only=True, vae=vae)
    print("SAI single file max errors:", _check_pipeline(pipe, bundle["reference"], bundle["model"]))


def test_merge_save_dtype_overwrite_and_errors(bundle):
    root = bundle["root"]
    output = root / "half.safetensors"
    merge_checkpoint.merge_into_checkpoint(root / "base.safetensors", [(bundle["files"][0], 1.0)], output,
                                           torch.float16)
    assert {t.dtype for t in st_load(str(output)).values()} == {torch.float16}
    with pytest.raises(FileExistsError, match="exists; choose another path or pass overwrite=True"):
        merge_checkpoint.merge_into_checkpoint(root / "base.safetensors", [(bundle["files"][0], 1.0)], output)
    merge_checkpoint.merge_into_checkpoint(root / "base.safetensors", [(bundle["files"][0], 0.0)], output,
                                           overwrite=True)
    assert all(torch.equal(a, b) for a, b in zip(st_load(str(output)).values(),
                                                 st_load(str(root / "base.safetensors")).values()))
    stray = root / "stray.safetensors"
    st_save({"lora_unet_nothing.lora_down.weight": torch.zeros(1, 2), "lora_unet_nothing.lora_up.weight":
             torch.zeros(2, 1)}, str(stray))
    with pytest.raises(ValueError, match="stray.safetensors.* none of the file.s 1 modules matches this model"):
        merge_checkpoint.merge_into_checkpoint(root / "base.safetensors", [(stray, 1.0)], root / "x.safetensors")
    assert not (root / "x.safetensors").exists() and not list(root.glob(".x.safetensors*"))
    with pytest.raises(FileNotFoundError, match="neither a diffusers folder nor a .safetensors file"):
        merge_checkpoint.merge_into_checkpoint(root / "missing", [(stray, 1.0)], root / "y")


def test_merge_peak_memory_is_about_one_tensor(bundle, tmp_path):
    """The merge streams: peak RSS growth stays near the largest tensor, far below the checkpoint's size."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to reset and read the RSS high-water mark")
    root = bundle["root"]
    padded = st_load(str(root / "base.safetensors"))
    for i in range(8):  # VAE-like filler: 8 tensors of 16 MiB make the checkpoint ~165 MB
        padded[f"first_stage_model.filler.{i}"] = torch.full((4 * 1024 * 1024,), float(i))
    st_save(padded, str(tmp_path / "padded.safetensors"))
    size = (tmp_path / "padded.safetensors").stat().st_size
    script = (
        "import json, sys, torch\n"
        "from dora_network.tools.merge_checkpoint import merge_into_checkpoint\n"
        "torch.set_num_threads(1)\n"
        "def kb(field):\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(field + ':'))\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = kb('VmRSS')\n"
        "merge_into_checkpoint(sys.argv[1], [(sys.argv[3], 1.0), (sys.argv[4], 0.5)], sys.argv[2],\n"
        "                      allow_partial=True)\n"
        "print(json.dumps({'before_kb': before, 'peak_kb': kb('VmHWM')}))\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "padded.safetensors"),
                           str(tmp_path / "out.safetensors"), *map(str, bundle["files"])],
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    growth = (result["peak_kb"] - result["before_kb"]) * 1024
    print(f"merge peak RSS growth {growth / 2**20:.1f} MiB for a {size / 2**20:.1f} MiB checkpoint "
          f"(largest tensor 16 MiB)")
    assert growth < 0.5 * size
    assert torch.equal(st_load(str(tmp_path / "out.safetensors"))["first_stage_model.filler.7"],
                       padded["first_stage_model.filler.7"])


def test_merge_cli_help_and_run(bundle, capsys):
    with pytest.raises(SystemExit):
        merge_checkpoint.main(["--help"])
    assert "example:" in capsys.readouterr().out
    root = bundle["root"]
    assert merge_checkpoint.main(["--sd_model", str(root / "base.safetensors"), "--models", str(bundle["files"][0]),
                                  "--ratios", "0.7", "--save_to", str(root / "cli.safetensors")]) == 0
    assert "1 unmatched" not in capsys.readouterr().out and (root / "cli.safetensors").is_file()


# -- analyze -----------------------------------------------------------------------------------------------------


def test_decomposition_change_matches_hand_computed_values():
    # layer 1, Linear (out=2, in=2): columns (3,4)->(6,8): |10-5|=5, cos 1; (0,1)->(1,0): |1-1|=0, cos 0
    w0 = torch.tensor([[3.0, 0.0], [4.0, 1.0]])
    w = torch.tensor([[6.0, 1.0], [8.0, 0.0]])
    assert analyze.decomposition_change(w0, w) == pytest.approx((2.5, 0.5), abs=1e-12)
    # per output row: rows (3,0)->(6,1) and (4,1)->(8,0)
    d_m = (abs(math.sqrt(37) - 3) + abs(8 - math.sqrt(17))) / 2
    d_d = ((1 - 6 / math.sqrt(37)) + (1 - 4 / math.sqrt(17))) / 2
    assert analyze.decomposition_change(w0, w, "out") == pytest.approx((d_m, d_d), abs=1e-12)
    # layer 2, Conv2d (out=1, in=2, 1x2): channel 0 (1,1)->(2,2): sqrt2, cos 1; channel 1 (0,2)->(2,0): 0, cos 0
    c0 = torch.tensor([[[[1.0, 1.0]], [[0.0, 2.0]]]])
    c = torch.tensor([[[[2.0, 2.0]], [[2.0, 0.0]]]])
    assert analyze.decomposition_change(c0, c) == pytest.approx((math.sqrt(2) / 2, 0.5), abs=1e-12)
    with pytest.raises(ValueError, match="axis must be 'in'"):
        analyze.decomposition_change(w0, w, "rows")


def test_fit_line_slope_and_pearson_on_synthetic_points():
    assert analyze.fit_line([0, 1, 2, 3], [1, 3, 5, 7]) == pytest.approx((2.0, 1.0))
    x = [0.1, 0.4, 0.2, 0.9, 0.5]
    y = [0.30, 0.10, 0.35, -0.20, 0.12]
    mx, my = sum(x) / 5, sum(y) / 5
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    assert analyze.fit_line(x, y) == pytest.approx((sxy / sxx, sxy / math.sqrt(sxx * syy)))
    assert all(math.isnan(v) for v in analyze.fit_line([1.0], [2.0]))


def test_analyze_files_uses_merged_weight_for_lora_and_dora(bundle, tmp_path):
    model = bundle["model"]
    lora = tmp_path / "lora.safetensors"
    _random_adapters(3, lora, algo="lora")
    report = analyze.analyze_files(model, [bundle["files"][0], lora], ["dora", "lora"])
    dora_stats, lora_stats = report.files
    assert len(dora_stats.layers) > len(lora_stats.layers) > 0 and not math.isnan(dora_stats.correlation)
    network, _ = create_network_from_weights(1.0, str(lora), None, model.text_encoders, model.unet)
    module = network.loras[0]
    expected = analyze.decomposition_change(module.base_weight, module.base_weight + module.delta_weight())
    assert (lora_stats.layers[0].dM, lora_stats.layers[0].dD) == pytest.approx(expected, rel=1e-6)
    only_q = analyze.analyze_files(model, [lora], name_filter="to_q").files[0].layers
    assert only_q and all("to_q" in s.name for s in only_q)


def test_analyze_cli_writes_png_csv_json(bundle, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert analyze.main(["--model", "tiny", "--network_weights", str(bundle["files"][1]), "--labels", "DoRA",
                         "--output_dir", str(out)]) == 0
    assert "pearson r" in capsys.readouterr().out
    assert (out / "analysis.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader(open(out / "analysis.csv", encoding="utf-8")))
    data = json.loads((out / "analysis.json").read_text(encoding="utf-8"))
    assert len(rows) == len(data["files"][0]["layers"]) > 0 and data["axis"] == "in"
    assert rows[0]["file"] == "DoRA" and float(rows[0]["dM"]) >= 0
