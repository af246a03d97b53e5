"""Run the DoRA Loader nodes inside a real ComfyUI checkout (for tests/test_comfyui_node.py; a separate process,
because importing ComfyUI configures logging, devices and folders process-wide).

    python tests/comfyui_check.py COMFYUI_PATH OUT.json name=file.safetensors ...

Builds ComfyUI's own SDXL ModelPatcher and CLIP at the tiny model's shapes (ComfyUI cannot detect a non-standard
SDXL from a state dict, so ``comfy.supported_models.SDXL`` is given the tiny config), loads the node package from
``comfyui_custom_node/`` the way ComfyUI does, and for every file and strength: patches through
``load_models_gpu``, compares each patched weight with the float64 formula, unpatches and checks the base is back
bit for bit. Then stacking with ComfyUI's LoraLoader, a refused file, and ComfyUI's own loader on an out-axis file.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
comfy_path, out_path, file_args = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
sys.path[:0] = [comfy_path, str(REPO / "tests")]

try:  # ComfyUI's core imports torchvision for models unrelated to SDXL; a CPU-only torch may have no build of it
    import torchvision  # noqa: F401
except Exception:  # noqa: BLE001 - any failure to import means: stub it (with a spec, as importlib checks it)
    import importlib.machinery

    for name in [n for n in sys.modules if n.startswith("torchvision")]:
        del sys.modules[name]
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
        stub = types.ModuleType(name)
        stub.__spec__, stub.__path__, stub.__version__ = importlib.machinery.ModuleSpec(name, None), [], "0.0.0"
        sys.modules[name] = stub
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True  # before anything else of comfy: CPU torch has no CUDA
import torch  # noqa: E402

import comfy.lora  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.sdxl_clip  # noqa: E402
import comfy.supported_models  # noqa: E402
import folder_paths  # noqa: E402
import nodes  # noqa: E402
from dora_reference import explicit_weight  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from dora_network.integrations.comfyui import layer_updates  # noqa: E402

STRENGTHS = (1.0, 0.5, 0.0, -1.0)


def _init(module: torch.nn.Module, seed: int) -> None:
    """comfy.ops layers are created with torch.empty: give every parameter seeded finite values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.02 if p.dim() > 1 else 0.01) + (
                1.0 if p.dim() == 1 and "norm" in name and name.endswith("weight") else 0.0))


def build_model() -> comfy.model_patcher.ModelPatcher:
    """ComfyUI's SDXL at configs/tiny_sdxl.toml's shapes (channels 32/64/128, 2 transformer layers, context 96)."""
    cfg = comfy.supported_models.SDXL({
        "model_channels": 32, "in_channels": 4, "out_channels": 4, "num_res_blocks": [2, 2, 2],
        "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 2, 2],
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 2, 2, 2], "transformer_depth_middle": 2, "context_dim": 96,
        "use_linear_in_transformer": True, "adm_in_channels": 64 + 6 * 256, "num_classes": "sequential",
        "use_temporal_attention": False, "use_temporal_resblock": False, "image_size": 32, "use_checkpoint": False,
        "use_spatial_transformer": True, "legacy": False})
    cfg.unet_config["num_head_channels"] = 16
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({}, "")
    _init(model, 0)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def build_clip() -> comfy.sd.CLIP:
    class Target:  # ComfyUI's clip target: SDXL's clip_l + clip_g at the tiny model's widths (>= 3 layers: -2 is used)
        tokenizer = comfy.sdxl_clip.SDXLTokenizer
        params: dict = {}

        @staticmethod
        def clip(**kw):
            options = {**kw.get("model_options", {}),
                       "clip_l_model_config": {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
                                               "intermediate_size": 128},
                       "clip_g_model_config": {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
                                               "intermediate_size": 256}}
            return comfy.sdxl_clip.SDXLClipModel(device=kw.get("device"), dtype=kw.get("dtype"), model_options=options)

    clip = comfy.sd.CLIP(Target(), model_options={"dtype": torch.float32})
    _init(clip.cond_stage_model, 1)
    return clip


def weights_of(model, clip) -> dict[str, torch.Tensor]:
    out = {k: v.detach().clone() for k, v in model.model_state_dict().items()}
    if clip is not None:
        out.update({k: v.detach().clone() for k, v in clip.patcher.model_state_dict().items()})
    return out


def expected_weights(file: Path, model, clip, base: dict[str, torch.Tensor], strength: float,
                     with_te: bool = True) -> dict[str, torch.Tensor]:
    """float64 formula per ComfyUI key, from the file's tensors as our loader resolves them."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    sd = load_file(str(file))
    from safetensors import safe_open

    with safe_open(str(file), "pt") as handle:
        metadata = handle.metadata() or {}
    out = {}
    for key, u in layer_updates(sd, metadata, key_map, base, with_text_encoders=with_te).items():
        tensors = {"lora_up.weight": u.up, "lora_down.weight": u.down, "alpha": torch.tensor(u.alpha)}
        if u.mid is not None:
            tensors["lora_mid.weight"] = u.mid
        if u.dora_scale is not None:
            tensors["dora_scale"] = u.dora_scale
        out[key] = explicit_weight(base[key], tensors, strength)
    return out


def main() -> None:
    files = {arg.split("=", 1)[0]: Path(arg.split("=", 1)[1]) for arg in file_args}
    loras = Path(tempfile.mkdtemp(prefix="comfy_loras_"))
    for name, path in files.items():
        shutil.copy(path, loras / f"{name}.safetensors")
    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
    loaded = asyncio.run(nodes.load_custom_node(str(REPO / "comfyui_custom_node")))
    assert loaded and "DoRALoader" in nodes.NODE_CLASS_MAPPINGS, "the node package did not load"
    listed = nodes.NODE_CLASS_MAPPINGS["DoRALoader"].INPUT_TYPES()["required"]["lora_name"][0]
    assert set(listed) >= {f"{n}.safetensors" for n in files}, listed
    loader = nodes.NODE_CLASS_MAPPINGS["DoRALoader"]()
    model_only = nodes.NODE_CLASS_MAPPINGS["DoRALoaderModelOnly"]()

    model, clip = build_model(), build_clip()
    base = weights_of(model, clip)
    cases = []
    for name, path in files.items():
        for strength in STRENGTHS:
            for only_model in (False, True) if strength == 0.5 else (False,):
                if only_model:
                    (m2,) = model_only.load_dora_model_only(model, f"{name}.safetensors", strength)
                    c2, patchers = None, [m2]
                else:
                    m2, c2 = loader.load_dora(model, clip, f"{name}.safetensors", strength, strength)
                    patchers = [m2, c2.patcher]
                expected = expected_weights(path, model, None if only_model else clip, base, strength, not only_model)
                mm.load_models_gpu(patchers)
                now = weights_of(model, None if only_model else clip)
                err = max(float((now[k].double() - v).abs().max()) for k, v in expected.items())
                patched = len([k for k in expected if k in getattr(m2, "patches", {}) or
                               (c2 is not None and k in c2.patcher.patches)])
                mm.unload_all_models()
                restored = all(torch.equal(v, base[k]) for k, v in weights_of(model, clip).items())
                cases.append({"file": name, "strength": strength, "model_only": only_model,
                              "max_err_vs_float64": err, "file_modules": len(expected),
                              "patched_keys": patched, "expected_patched": len(expected) if strength else 0,
                              "restored_bitwise": restored})
                print(json.dumps(cases[-1]), flush=True)

    # stacking: ComfyUI's own LoraLoader (an in-axis file, exact there) then ours on top
    comfy_loader = nodes.LoraLoader()
    m1, c1 = comfy_loader.load_lora(model, clip, "ours_in.safetensors", 0.5, 0.5)
    m2, c2 = loader.load_dora(m1, c1, "lycoris_out.safetensors", 1.0, 1.0)
    first = {**base, **expected_weights(files["ours_in"], model, clip, base, 0.5)}
    second = {**first, **expected_weights(files["lycoris_out"], model, clip, first, 1.0)}
    mm.load_models_gpu([m2, c2.patcher])
    now = weights_of(model, clip)
    stacked_err = max(float((now[k].double() - second[k].double()).abs().max()) for k in second)
    mm.unload_all_models()

    # a file that does not fit: refused, nothing patched
    bad = load_file(str(files["ours_lora"]))
    key = next(k for k in bad if k.startswith("lora_unet_") and k.endswith("lora_down.weight"))
    bad[key] = torch.zeros(bad[key].shape[0], bad[key].shape[1] + 8, *bad[key].shape[2:])
    save_file(bad, str(loras / "bad.safetensors"))
    try:
        loader.load_dora(model, clip, "bad.safetensors", 1.0, 1.0)
        refused = ""
    except ValueError as error:
        refused = str(error)
    untouched = not model.patches and not clip.patcher.patches and all(
        torch.equal(v, base[k]) for k, v in weights_of(model, clip).items())

    # ComfyUI's own loader on an out-axis file (what the node fixes)
    m3, c3 = comfy_loader.load_lora(model, clip, "lycoris_out.safetensors", 1.0, 1.0)
    expected = expected_weights(files["lycoris_out"], model, clip, base, 1.0)
    mm.load_models_gpu([m3, c3.patcher])
    now = weights_of(model, clip)
    comfy_err = max(float((now[k].double() - v).abs().max()) for k, v in expected.items())
    mm.unload_all_models()

    result = {"comfyui_path": comfy_path, "cases": cases, "stacked_max_err": stacked_err,
              "stacked_equals_sequential": stacked_err <= 2e-6, "refused_message": refused,
              "errors_leave_model_unpatched": bool(refused) and untouched,
              "comfy_lora_loader_out_axis_err": comfy_err}
    out_path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "cases"}, indent=1))


if __name__ == "__main__":
    main()
