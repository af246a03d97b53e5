"""keys.py + io.py + loading.py: the saved layout (golden manifest), bit-exact round trips, hashes, atomic saves,
and the errors a bad file gets. Regenerate the manifest with ``python tests/test_keys_io.py --regenerate``."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from io import BytesIO
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from dora_network import create_network, create_network_from_weights
from dora_network import io as dio
from dora_network.keys import infer_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_fixtures import frozen_tiny_sdxl  # noqa: E402

MANIFEST = Path(__file__).resolve().parent / "golden" / "tiny_manifest.json"
MANIFEST_CONFIGS = {
    "default": {},
    "conv_tucker_out": {"conv_dim": "4", "conv_alpha": "2", "use_tucker": "True", "wd_on_out": "True"},
}


def manifest_of(network) -> dict[str, list]:
    return {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in sorted(network.state_dict().items())}


def build_manifests() -> dict[str, dict[str, list]]:
    model = frozen_tiny_sdxl()
    return {name: manifest_of(create_network(1.0, 4, 2, None, model.text_encoders, model.unet, **kwargs))
            for name, kwargs in MANIFEST_CONFIGS.items()}


@pytest.fixture(scope="module")
def model():
    return frozen_tiny_sdxl()


@pytest.fixture()
def trained(model):
    network = create_network(1.0, 4, 2, None, model.text_encoders, model.unet, conv_dim="4", conv_alpha="2")
    with torch.no_grad():
        for name, p in network.named_parameters():
            p.add_(torch.randn_like(p) * (0.05 if "dora_scale" not in name else 0.01))
    return network


def test_saved_layout_equals_golden_manifest(model):
    assert build_manifests() == json.loads(MANIFEST.read_text())


def test_layout_suffixes_and_shapes_follow_lycoris(model):
    manifest = json.loads(MANIFEST.read_text())["conv_tucker_out"]
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert manifest[f"{name}.lora_down.weight"][0] == [4, 32, 1, 1]
    assert manifest[f"{name}.lora_mid.weight"][0] == [4, 4, 3, 3]
    assert manifest[f"{name}.lora_up.weight"][0] == [32, 4, 1, 1]
    assert manifest[f"{name}.dora_scale"][0] == [32, 1, 1, 1]
    assert manifest[f"{name}.alpha"] == [[], "float32"]
    default = json.loads(MANIFEST.read_text())["default"]
    q = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    assert default[f"{q}.dora_scale"][0] == [1, 32]  # in-axis default, 2-D


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.float16, torch.bfloat16])
def test_save_load_round_trip_is_bit_exact(model, trained, tmp_path, dtype):
    file = tmp_path / "rt.safetensors"
    trained.save_weights(str(file), dtype, {"ss_network_dim": "4"})
    saved = safetensors.torch.load_file(str(file))
    expected_dtype = dtype or torch.float32
    assert all(t.dtype == expected_dtype for t in saved.values())
    other = create_network(1.0, 4, 2, None, model.text_encoders, model.unet, conv_dim="4", conv_alpha="2")
    other.load_weights(str(file))
    for key, tensor in other.state_dict().items():
        assert torch.equal(tensor, saved[key].to(tensor.dtype)), key
        if dtype in (None, torch.float32):
            assert torch.equal(tensor, trained.state_dict()[key]), key


def _sd_scripts_hashes(state_dict, metadata):
    """sd-scripts' train_util.precalculate_safetensors_hashes, re-derived from its description."""
    blob = BytesIO(safetensors.torch.save(state_dict, {k: v for k, v in metadata.items() if k.startswith("ss_")}))
    n = int.from_bytes(blob.read(8), "little")
    blob.seek(n + 8)
    model_hash = hashlib.sha256(blob.read()).hexdigest()
    blob.seek(0x100000)
    legacy = hashlib.sha256(blob.read(0x10000)).hexdigest()[:8]
    return model_hash, legacy


def test_metadata_and_hashes_match_sd_scripts(trained, tmp_path):
    file = tmp_path / "h.safetensors"
    meta = {"ss_network_module": "dora_network", "ss_network_dim": "4", "ss_output_name": "h", "modelspec.title": "t"}
    trained.save_weights(str(file), torch.float16, dict(meta))
    with safe_open(str(file), "pt") as handle:
        saved_meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    assert {k: saved_meta[k] for k in meta} == meta
    assert (saved_meta["sshs_model_hash"], saved_meta["sshs_legacy_hash"]) == _sd_scripts_hashes(tensors, meta)
    raw = file.read_bytes()
    data = raw[8 + int.from_bytes(raw[:8], "little"):]
    assert hashlib.sha256(data).hexdigest() == saved_meta["sshs_model_hash"]  # the hash is of the tensor bytes
    assert saved_meta["dora_network.algo"] == "dora" and saved_meta["dora_network.wd_on_out"] == "False"


def test_failed_save_leaves_previous_file_and_no_partial(trained, tmp_path, monkeypatch):
    file = tmp_path / "keep.safetensors"
    trained.save_weights(str(file), None, {})
    before = file.read_bytes()

    def half_then_crash(tensors, path, metadata=None):
        Path(path).write_bytes(safetensors.torch.save(tensors, metadata)[: 1000])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        trained.save_weights(str(file), None, {})
    assert file.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.safetensors"]


def test_save_into_missing_folder_is_a_clear_error(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="folder .* does not exist; create it first"):
        trained.save_weights(str(tmp_path / "nope" / "x.safetensors"), None, {})


def test_missing_truncated_and_foreign_files(model, trained, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"network weights '.*missing\.safetensors' not found"):
        dio.load_file(tmp_path / "missing.safetensors")
    good = tmp_path / "good.safetensors"
    trained.save_weights(str(good), None, {})
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"is not a readable safetensors file: .*truncated"):
        dio.load_file(truncated)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, this is not a model")
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        dio.load_file(text)
    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"lora_transformer_single_blocks_0_attn_to_q.lora_down.weight": torch.zeros(4, 8),
                                 "lora_transformer_single_blocks_0_attn_to_q.lora_up.weight": torch.zeros(8, 4)},
                                str(foreign))
    with pytest.raises(ValueError, match=r"none of the file's 1 modules matches this model .*another base model"):
        create_network_from_weights(1.0, str(foreign), None, model.text_encoders, model.unet)


def _with_stray_module(network, path: Path) -> Path:
    """``network``'s file plus one module that names no layer of the tiny SDXL (as a file for another model has)."""
    network.save_weights(str(path))
    tensors = safetensors.torch.load_file(str(path))
    tensors["lora_unet_single_transformer_blocks_0_attn_to_q.lora_down.weight"] = torch.zeros(4, 8)
    tensors["lora_unet_single_transformer_blocks_0_attn_to_q.lora_up.weight"] = torch.zeros(8, 4)
    safetensors.torch.save_file(tensors, str(path))
    return path


def _weights(network) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in network.state_dict().items()}


def test_partly_matching_file_is_refused_unless_allowed(model, trained, tmp_path, caplog):
    file = _with_stray_module(trained, tmp_path / "partial.safetensors")
    total = len(trained.loras) + 1
    fresh = create_network(1.0, 4, 2, None, model.text_encoders, model.unet, conv_dim="4", conv_alpha="2")
    before = _weights(fresh)
    message = (rf"1 of the file's {total} modules match no layer of this model \(file: "
               r"\['lora_unet_single_transformer_blocks_0_attn_to_q'\]; model: \['lora_te1_.*\]\)\. The file is "
               rf"probably for another base model .* To load the {total - 1} modules that match and skip the rest, "
               r'pass --network_args "allow_partial_load=True"')
    with pytest.raises(ValueError, match=message):
        fresh.load_weights(str(file))
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())  # refused before any write
    with pytest.raises(ValueError, match=message):
        create_network_from_weights(1.0, str(file), None, model.text_encoders, model.unet)
    # opting in: by network_args (what sd-scripts passes), or by the Python keyword
    allowed = create_network(1.0, 4, 2, None, model.text_encoders, model.unet, conv_dim="4", conv_alpha="2",
                             allow_partial_load="True")
    with caplog.at_level(logging.WARNING, logger="dora_network"):
        allowed.load_weights(str(file))
    assert "skipped (partial load allowed)" in caplog.text
    expected = _weights(trained)
    assert all(torch.equal(v, expected[k]) for k, v in allowed.state_dict().items())
    fresh.load_weights(str(file), allow_partial=True)
    assert all(torch.equal(v, expected[k]) for k, v in fresh.state_dict().items())
    built, _ = create_network_from_weights(1.0, str(file), None, model.text_encoders, model.unet,
                                           allow_partial_load="True")
    assert len(built.loras) == total - 1


def test_unet_only_resume_skips_text_encoder_modules_with_a_warning(model, trained, tmp_path, caplog):
    """sd-scripts' --network_train_unet_only with --network_weights from a full run: the file's text-encoder
    modules name real layers this network does not adapt, so the file loads (as sd-scripts' lora.py does)."""
    file = tmp_path / "full.safetensors"
    trained.save_weights(str(file))
    unet_only = create_network(1.0, 4, 2, None, model.text_encoders, model.unet, conv_dim="4", conv_alpha="2")
    unet_only.apply_to(model.text_encoders, model.unet, apply_text_encoder=False, apply_unet=True)
    try:
        with caplog.at_level(logging.WARNING, logger="dora_network"):
            info = unet_only.load_weights(str(file))
    finally:
        unet_only.restore()
    skipped = len(trained.text_encoder_loras)
    assert f"{skipped} of the file's modules are for layers this network does not adapt" in caplog.text
    assert not info.missing_keys and not info.unexpected_keys
    expected = _weights(trained)
    assert unet_only.state_dict().keys() == {k for k in expected if k.startswith("lora_unet_")}
    assert all(torch.equal(v, expected[k]) for k, v in unet_only.state_dict().items())


def test_wrong_shapes_name_module_and_cause(model, tmp_path):
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    file = tmp_path / "sd15.safetensors"
    safetensors.torch.save_file({f"{name}.lora_down.weight": torch.zeros(4, 320),
                                 f"{name}.lora_up.weight": torch.zeros(320, 4)}, str(file))
    with pytest.raises(ValueError, match=rf"module '{name}': the file's tensors imply a layer with out=320, in=320, "
                                         r"but the model's layer has out=64, in=64\. .*another base model"):
        create_network_from_weights(1.0, str(file), None, model.text_encoders, model.unet)


def test_pickle_files_load_tensors_only(model, trained, tmp_path):
    pt = tmp_path / "w.pt"
    torch.save(trained.state_dict(), pt)
    tensors, meta = dio.load_file(pt)
    assert meta == {} and set(tensors) == set(trained.state_dict())

    class Evil:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    bad = tmp_path / "evil.ckpt"
    torch.save({"x": Evil()}, bad)
    with pytest.raises(ValueError, match=r"weights_only=True: pickled code is never run"):
        dio.load_file(bad)


def test_one_d_dora_scale_is_reshaped_with_warning(model, trained, tmp_path, caplog):
    sd = {k: v.clone() for k, v in trained.state_dict().items()}
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj.dora_scale"  # 64 -> 512
    original = sd[key].clone()
    assert original.shape == (1, 64)
    sd[key] = sd[key].reshape(-1)
    file = tmp_path / "flat.safetensors"
    safetensors.torch.save_file(sd, str(file))
    with caplog.at_level(logging.WARNING):
        network, weights = create_network_from_weights(1.0, str(file), None, model.text_encoders, model.unet)
    assert "UIs" in caplog.text or "apply 1-D magnitudes wrongly" in caplog.text
    assert weights[key].shape == original.shape
    assert torch.equal(dict(network.named_parameters())[key], original)


@pytest.mark.parametrize("via", ["metadata", "other modules"])
def test_one_d_dora_scale_on_square_layers_takes_the_files_axis(model, trained, tmp_path, caplog, via):
    """A 1-D magnitude on a square layer cannot tell its axis; the file's metadata or other modules do."""
    sd = {k: v.reshape(-1) if (k.endswith("dora_scale") and (via == "metadata" or "proj_in" in k)) else v
          for k, v in trained.state_dict().items()}
    file = tmp_path / "flat_in.safetensors"
    metadata = {"dora_network.wd_on_out": "False"} if via == "metadata" else {}
    safetensors.torch.save_file(sd, str(file), metadata)
    with caplog.at_level(logging.WARNING):
        network, _ = create_network_from_weights(1.0, str(file), None, model.text_encoders, model.unet)
    assert f"read as per input column, from the file's {'metadata' if via == 'metadata' else 'other modules'}" \
        in caplog.text
    assert len([r for r in caplog.records if "1-D" in r.getMessage()]) == 2  # once per file, not per module
    for name, value in trained.state_dict().items():
        if name.endswith("dora_scale"):
            assert torch.equal(dict(network.named_parameters())[name], value), name


def test_missing_alpha_means_alpha_equals_rank(model, tmp_path):
    name = "lora_unet_down_blocks_1_attentions_0_proj_in"
    file = tmp_path / "noalpha.safetensors"
    safetensors.torch.save_file({f"{name}.lora_down.weight": torch.randn(8, 64),
                                 f"{name}.lora_up.weight": torch.randn(64, 8)}, str(file))
    network, _ = create_network_from_weights(1.0, str(file), None, model.text_encoders, model.unet)
    (module,) = network.loras
    assert module.rank == 8 and float(module.alpha) == 8.0 and not module.dora


@pytest.mark.parametrize("shapes, expected", [
    ({"lora_down.weight": (4, 10), "lora_up.weight": (6, 4), "dora_scale": (1, 10)}, (4, None, False, False)),
    ({"lora_down.weight": (4, 10), "lora_up.weight": (6, 4), "dora_scale": (6, 1)}, (4, None, True, False)),
    ({"lora_down.weight": (2, 10, 3, 3), "lora_up.weight": (6, 2, 1, 1), "dora_scale": (1, 10, 1, 1)},
     (2, (3, 3), False, False)),
    ({"lora_down.weight": (2, 10, 1, 1), "lora_mid.weight": (2, 2, 3, 3), "lora_up.weight": (6, 2, 1, 1),
      "dora_scale": (6, 1, 1, 1)}, (2, (3, 3), True, True)),
    ({"lora_down.weight": (4, 10), "lora_up.weight": (6, 4), "dora_scale": (6,)}, (4, None, True, False)),
    ({"lora_down.weight": (4, 10), "lora_up.weight": (6, 4), "dora_scale": (10,)}, (4, None, False, False)),
])
def test_infer_spec_reads_rank_kernel_axis_tucker(shapes, expected):
    spec = infer_spec("m", {k: torch.zeros(v) for k, v in shapes.items()})
    assert (spec.rank, spec.kernel, spec.wd_on_out, spec.tucker) == expected


@pytest.mark.parametrize("shapes, message", [
    ({"lora_down.weight": (4, 10)}, r"module 'm' has no 'lora_up.weight' tensor"),
    ({"lora_down.weight": (4, 10), "lora_up.weight": (6, 3)}, r"do not form a rank-r pair"),
    ({"lora_down.weight": (4, 10), "lora_up.weight": (6, 4), "dora_scale": (6, 10)}, r"dora_scale has shape \(6, 10\)"),
])
def test_infer_spec_errors(shapes, message):
    with pytest.raises(ValueError, match=message):
        infer_spec("m", {k: torch.zeros(v) for k, v in shapes.items()})


def test_sai_named_file_loads_on_diffusers_model(model, trained, tmp_path):
    """Users mix trees: a file written against sd-scripts' SAI names loads on a diffusers UNet."""
    from dora_network.families.sdxl import diffusers_to_sai

    paths = {t.lora_name: t.path for t in trained.targets}
    renamed = {}
    for key, value in trained.state_dict().items():
        name, suffix = key.split(".", 1)
        if name.startswith("lora_unet_"):
            name = "lora_unet_" + diffusers_to_sai(paths[name]).replace(".", "_")
        renamed[f"{name}.{suffix}"] = value
    assert any(k.startswith("lora_unet_input_blocks_") for k in renamed)
    network, weights = create_network_from_weights(1.0, None, None, model.text_encoders, model.unet,
                                                   weights_sd=renamed)
    for key, value in trained.state_dict().items():
        assert torch.equal(weights[key], value), key


def test_wider_preset_layers_load(model, tmp_path):
    """LyCORIS' `full` preset on a diffusers UNet also adapts conv_in and time_embedding: those load too."""
    names = {"lora_unet_conv_in": ((4, 4, 3, 3), (32, 4, 1, 1), (1, 4, 1, 1)),
             "lora_unet_time_embedding_linear_1": ((4, 32), (128, 4), (1, 32))}
    sd = {}
    for name, (down, up, scale) in names.items():
        sd[f"{name}.lora_down.weight"] = torch.randn(down)
        sd[f"{name}.lora_up.weight"] = torch.randn(up) * 0.01
        sd[f"{name}.dora_scale"] = torch.rand(scale) + 0.5
        sd[f"{name}.alpha"] = torch.tensor(2.0)
    network, weights = create_network_from_weights(1.0, None, None, model.text_encoders, model.unet, weights_sd=sd)
    assert sorted(n for n, _ in network.named_children()) == sorted(names)
    assert set(weights) == set(sd)


if __name__ == "__main__" and "--regenerate" in sys.argv:
    lines = []
    for config, manifest in build_manifests().items():
        rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in manifest.items())
        lines.append(f"{json.dumps(config)}: {{\n{rows}\n}}")
    MANIFEST.write_text("{\n" + ",\n".join(lines) + "\n}\n")  # one key per line: reviewable diffs
    print(f"wrote {MANIFEST}")
