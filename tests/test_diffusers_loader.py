"""diffusers_loader: a DoRA file applied to a diffusers SDXL pipeline equals our merge and the explicit formula.

Everything runs on the tiny random SDXL (CPU). Files come from ``create_network`` with randomised ``lora_up`` and
``dora_scale`` (nothing is trained). The reference formula is computed here in float64 from the file's tensors,
against layers found by walking the pipeline's modules (not through the package's target/name code).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file as st_load
from torch import nn

import dora_network
from dora_network.integrations.diffusers_loader import DoRAPatch, apply_dora_to_pipeline
from dora_network.tiny import build_pipeline, build_tiny_sdxl
from dora_network.families.sdxl import diffusers_to_sai
from dora_reference import explicit_weight as _explicit

DIFFUSERS_DORA_WARNING = (
    "It seems like you are using a DoRA checkpoint that is not compatible in Diffusers at the moment. So, we are "
    "going to filter out the keys associated to 'dora_scale` from the state dict. If you think this is a mistake "
    "please open an issue https://github.com/huggingface/diffusers/issues/new."
)
#: per layer max |W_patched - W_formula| / max |W_formula - W0|, worst layer (measured <= 2.4e-6 in float32)
REL_TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pipe():
    return build_pipeline(build_tiny_sdxl(seed=0))


def _components(pipe) -> dict[str, nn.Module]:
    return {"unet": pipe.unet, "te1": pipe.text_encoder, "te2": pipe.text_encoder_2}


def _layers(pipe) -> dict[str, tuple[nn.Module, str]]:
    """Every Linear/Conv2d as ``lora_name -> (module, dotted path)``: diffusers UNet names, classic TE names."""
    out = {}
    for component, root in _components(pipe).items():
        prefix = "lora_unet_" if component == "unet" else f"lora_{component}_"
        if component != "unet" and not hasattr(root, "text_model"):
            prefix += "text_model_"  # transformers 5 CLIPTextModel has no text_model level; files keep it
        for path, module in root.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                out[prefix + path.replace(".", "_")] = (module, path)
    return out


def _weight_key(lora_name: str, path: str) -> str:
    """The ``_snapshot`` key of a layer's weight."""
    return f"{'unet' if lora_name.startswith('lora_unet_') else lora_name[5:8]}.{path}.weight"


def _snapshot(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.detach().clone() for c, m in _components(pipe).items() for k, v in m.state_dict().items()}


def _groups(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        name, _, suffix = key.partition(".")
        groups.setdefault(name, {})[suffix] = value
    return groups


def _make_file(tmp_path: Path, wd_on_out: bool, tucker: bool, seed: int = 1) -> Path:
    """Save a DoRA file for the tiny SDXL (TEs, attention, conv 1x1 and 3x3) with non-trivial tensors."""
    model = build_tiny_sdxl(seed=0)
    network = dora_network.create_network(
        1.0, 4, 2, None, model.text_encoders, model.unet, conv_dim="4", conv_alpha="2",
        wd_on_out=str(wd_on_out), use_tucker=str(tucker),
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.loras:
            up = module.lora_up.weight
            up.copy_(torch.randn(up.shape, generator=gen) * 0.3 / math.sqrt(up.shape[1]))
            module.dora_scale.mul_(1 + 0.3 * (2 * torch.rand(module.dora_scale.shape, generator=gen) - 1))
    path = tmp_path / f"dora_{'out' if wd_on_out else 'in'}{'_tucker' if tucker else ''}.safetensors"
    network.save_weights(str(path), None, {})
    return path


def _check_formula(pipe, sd, originals, strength: float, dora: bool = True) -> float:
    """Assert every file layer holds the formula's weight and every other weight is untouched; return max rel err."""
    layers, groups, worst = _layers(pipe), _groups(sd), 0.0
    assert set(groups) <= set(layers), sorted(set(groups) - set(layers))[:3]
    touched = set()
    for name, tensors in groups.items():
        module, path = layers[name]
        key = _weight_key(name, path)
        touched.add(key)
        expected = _explicit(originals[key], tensors, strength, dora)
        update = (expected - originals[key].double()).abs().max()
        assert update > 0
        worst = max(worst, float((module.weight.detach().double() - expected).abs().max() / update))
    assert worst < REL_TOL, worst
    current = _snapshot(pipe)
    assert all(torch.equal(current[k], v) for k, v in originals.items() if k not in touched)
    return worst


def _reference_merge(path: Path, strength: float) -> dict[str, torch.Tensor]:
    """Our own merge on a separate model: create_network_from_weights + merge_to."""
    ref = _pipe()
    network, _ = dora_network.create_network_from_weights(
        strength, None, None, [ref.text_encoder, ref.text_encoder_2], ref.unet, weights_sd=st_load(str(path))
    )
    network.merge_to(None, None)
    return _snapshot(ref)


def _sai_named(pipe, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    layers, out = _layers(pipe), {}
    for key, value in sd.items():
        name, _, suffix = key.partition(".")
        if name.startswith("lora_unet_"):
            sai = diffusers_to_sai(layers[name][1])
            assert sai is not None, name
            name = "lora_unet_" + sai.replace(".", "_")
        out[f"{name}.{suffix}"] = value
    return out


@pytest.mark.parametrize("tucker", [False, True], ids=["conv3x3", "tucker"])
@pytest.mark.parametrize("wd_on_out", [False, True], ids=["in_axis", "out_axis"])
def test_patch_equals_merge_and_formula(tmp_path, wd_on_out, tucker):
    path = _make_file(tmp_path, wd_on_out, tucker)
    sd = st_load(str(path))
    scales = [v for k, v in sd.items() if k.endswith("dora_scale")]
    assert all((s.shape[0] == 1) != wd_on_out for s in scales)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in sd)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in sd)
    assert any(v.ndim == 4 and v.shape[-1] == 3 for k, v in sd.items() if "lora_down" in k or "lora_mid" in k)
    assert any(k.endswith("lora_mid.weight") for k in sd) == tucker
    pipe = _pipe()
    originals = _snapshot(pipe)
    patch = apply_dora_to_pipeline(pipe, path, strength=1.0)
    assert isinstance(patch, DoRAPatch) and len(patch.matched) == len(_groups(sd)) and not patch.unmatched
    for strength in (1.0, 0.5):
        if strength != patch.strength:
            patch.set_strength(strength)
        _check_formula(pipe, sd, originals, strength)
        reference = _reference_merge(path, strength)
        current = _snapshot(pipe)
        assert all(torch.equal(current[k], reference[k]) for k in current)
    patched_half = _snapshot(pipe)
    patch.remove()
    assert all(torch.equal(v, originals[k]) for k, v in _snapshot(pipe).items())

    sai = _sai_named(pipe, sd)
    assert any(k.startswith("lora_unet_input_blocks_") for k in sai)
    with apply_dora_to_pipeline(pipe, sai, strength=0.5) as patch:
        assert len(patch.matched) == len(_groups(sd))
        assert all(torch.equal(v, patched_half[k]) for k, v in _snapshot(pipe).items())
    assert all(torch.equal(v, originals[k]) for k, v in _snapshot(pipe).items())


def test_plain_lora_modules_strength_zero_and_warnings(tmp_path, caplog):
    sd = st_load(str(_make_file(tmp_path, False, False)))
    names = sorted(_groups(sd))
    plain = set(names[::3])
    mixed = {k: v for k, v in sd.items() if not (k.endswith(".dora_scale") and k.partition(".")[0] in plain)}
    mixed["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(4, 8)
    mixed["lora_unet_not_a_layer.lora_up.weight"] = torch.zeros(8, 4)
    pipe = _pipe()
    originals = _snapshot(pipe)
    with pytest.raises(ValueError, match=r"1 of the file's \d+ modules match no layer of this model \(file: "
                                         r"\['lora_unet_not_a_layer'\].*pass allow_partial=True"):
        apply_dora_to_pipeline(pipe, mixed, strength=0.7)
    assert all(torch.equal(v, originals[k]) for k, v in _snapshot(pipe).items())  # refused before any write
    with caplog.at_level(logging.INFO, logger="dora_network"):
        patch = apply_dora_to_pipeline(pipe, mixed, strength=0.7, allow_partial=True)
    assert f"applying {len(names)} of the file's {len(names) + 1} modules" in caplog.text
    assert "1 of the file's" in caplog.text and "skipped (partial load allowed)" in caplog.text
    assert patch.unmatched == ["lora_unet_not_a_layer"]
    _check_formula(pipe, {k: v for k, v in mixed.items() if "not_a_layer" not in k}, originals, 0.7)
    patch.set_strength(0.0)
    assert all(torch.equal(v, originals[k]) for k, v in _snapshot(pipe).items())
    patch.unapply()
    patch.remove()  # idempotent
    with pytest.raises(RuntimeError, match="removed"):
        patch.set_strength(1.0)
    assert all(torch.equal(v, originals[k]) for k, v in _snapshot(pipe).items())


def test_nothing_matches_raises_and_leaves_pipeline_alone():
    pipe = _pipe()
    originals = _snapshot(pipe)
    foreign = {"lora_unet_foo.lora_down.weight": torch.zeros(4, 8), "lora_unet_foo.lora_up.weight": torch.zeros(8, 4)}
    with pytest.raises(ValueError, match="none of the file's 1 modules matches this model"):
        apply_dora_to_pipeline(pipe, foreign)
    assert all(torch.equal(v, originals[k]) for k, v in _snapshot(pipe).items())


class _Grab(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_diffusers_load_lora_weights_drops_dora_scale(tmp_path):
    """Records diffusers' own behaviour today: dora_scale dropped with one warning, plain LoRA W0 + s*dW loaded
    (all modules, both text encoders, conv 3x3), and Tucker files rejected. Fails when diffusers changes."""
    pytest.importorskip("peft")
    path = _make_file(tmp_path, False, False)
    sd = st_load(str(path))
    pipe = _pipe()
    originals = _snapshot(pipe)
    grab = _Grab()
    diffusers_logger = logging.getLogger("diffusers.loaders.lora_pipeline")
    diffusers_logger.addHandler(grab)
    try:
        pipe.load_lora_weights(str(path))
    finally:
        diffusers_logger.removeHandler(grab)
    assert grab.messages == [DIFFUSERS_DORA_WARNING]
    pipe.fuse_lora(lora_scale=0.5)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the PEFT layers
    assert set(_snapshot(pipe)) == set(originals)
    _check_formula(pipe, sd, originals, 0.5, dora=False)  # plain LoRA on every module of the file
    layers, dora_err = _layers(pipe), 0.0
    for name, tensors in _groups(sd).items():
        module, module_path = layers[name]
        dora = _explicit(originals[_weight_key(name, module_path)], tensors, 0.5)
        dora_err = max(dora_err, float((module.weight.detach().double() - dora).abs().max()))
    assert dora_err > 1e-3  # i.e. not the DoRA weight

    tucker = st_load(str(_make_file(tmp_path, False, True)))
    with pytest.raises(ValueError, match="have not been correctly renamed"):
        _pipe().load_lora_weights(tucker)


def test_pipeline_generates_after_patching(tmp_path):
    pipe = _pipe()

    def run() -> np.ndarray:
        return pipe("a photo of a cat", num_inference_steps=2, height=128, width=128, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    before = run()
    patch = apply_dora_to_pipeline(pipe, _make_file(tmp_path, False, True), strength=1.0)
    after = run()
    assert np.isfinite(after).all() and not np.allclose(after, before, atol=1e-4)
    patch.remove()
    assert np.array_equal(run(), before)
