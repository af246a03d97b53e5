"""The ComfyUI nodes "DoRA Loader" and "DoRA Loader (model only)": any DoRA/LoRA file, applied exactly.

ComfyUI's own LoraLoader applies in-axis DoRA files exactly but not the others: for an out-axis ``dora_scale``
((out, 1[, 1, 1]): LyCORIS >= 3.2, OneTrainer's output-axis option, ours with ``wd_on_out=True``) its
``weight_decompose`` divides by the norm of the *base* weight instead of W0 + dW, and a 1-D ``dora_scale`` (PEFT /
diffusers style) breaks non-square layers. These nodes read the file with this package's loader (every layout it
accepts: ours, LyCORIS DoRA/LoCon of either axis, 1-D ``dora_scale``, Tucker ``lora_mid``, SAI or diffusers UNet
names, classic or short text-encoder names, plain LoRA) and hand ComfyUI one patch object per weight that computes

    W(mu) = W0 + mu * (m * V / (||V|| + eps) - W0),   V = W0 + (alpha / r) * B A   (plain LoRA: W0 + mu * s B A)

in float32 from whatever W0 ComfyUI gives it (so stacking with other LoRAs composes as ComfyUI's own does), through
``ModelPatcher.add_patches`` on clones: ComfyUI's unpatching, caching, lowvram offloading and stacking keep working,
and nothing else in the process changes. A file that does not fit the model is refused, before anything is patched,
with the same messages as the rest of the package.

The mapping from file modules to ComfyUI's weights (:func:`layer_updates`) needs no ComfyUI; the node glue imports
``comfy`` / ``folder_paths`` only when ComfyUI calls it. ``comfyui_custom_node/`` at the repository root is the
folder ComfyUI loads from ``custom_nodes/``.
"""

from __future__ import annotations

import logging
import os
import types
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from .. import functional as DF
from ..io import load_file
from ..keys import ALPHA, DORA_SCALE, DOWN, MID, UP, axis_from_metadata
from ..loading import check_coverage, match_file
from ..families import family_of_file
from ..targets import Target

logger = logging.getLogger(__name__)

__all__ = ["LayerUpdate", "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "layer_updates", "load_dora_for_models"]

#: the nodes load whole files only; a file of which only part fits is refused with this way out
_PARTIAL_HINT = "--allow_partial to dora-merge (the DoRA Loader nodes load whole files only)"
_UNET_PREFIX = "diffusion_model."
_TE_PREFIXES = {"clip_l.transformer.": "clip_l", "clip_g.transformer.": "clip_g"}


@dataclass(frozen=True)
class LayerUpdate:
    """One layer's adapter from a file; :meth:`weight` gives W(mu) for any W0 and strength mu.

    Attributes:
        up: B, (out, r[, 1, 1]).
        down: A, (r, in[, kh, kw]).
        mid: Tucker core (r, r, kh, kw) or None.
        alpha: the file's alpha (s = alpha / r).
        dora_scale: m in 2-D/4-D form, or None for plain LoRA.
        wd_on_out: the DoRA axis (None for plain LoRA).
    """

    up: torch.Tensor
    down: torch.Tensor
    mid: torch.Tensor | None
    alpha: float
    dora_scale: torch.Tensor | None
    wd_on_out: bool | None

    def weight(self, w0: torch.Tensor, strength: float) -> torch.Tensor:
        """W(strength) in float32 (float64 for a float64 W0), on W0's device."""
        acc = torch.float64 if w0.dtype == torch.float64 else torch.float32
        base = w0.to(acc)

        def put(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=base.device, dtype=acc)

        mid = None if self.mid is None else put(self.mid)
        delta = DF.lowrank_delta(put(self.up), put(self.down), self.alpha / self.down.shape[0], mid)
        if self.dora_scale is None:
            return base + strength * delta
        adapted = DF.dora_weight(base, delta, put(self.dora_scale), bool(self.wd_on_out))
        return DF.blend(base, adapted, strength)


def _layer(kind_weight: torch.Tensor) -> str:
    if kind_weight.ndim == 2:
        return "linear"
    return "conv1x1" if tuple(kind_weight.shape[2:]) == (1, 1) else "conv"


def _component(key: str) -> str | None:
    """Which part of ComfyUI's model a state-dict key belongs to: "unet", a text encoder's wrapper name
    (``clip_l``, ``t5xxl``, ...), or None for keys no LoRA names."""
    if key.startswith(_UNET_PREFIX):
        return "unet"
    head, sep, _ = key.partition(".transformer.")
    return head if sep and "." not in head else None


def _targets(key_map: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> tuple[list[Target], dict[str, str]]:
    """One target per weight that ComfyUI's key map names, with every name the key map gives it, and canonical
    lora_name -> ComfyUI state-dict key.

    The key map is ComfyUI's own (``model_lora_keys_unet``/``model_lora_keys_clip`` for the loaded model): it spells
    the denoiser the SAI/original way (``lora_unet_`` + its path) and, for UNets of any layout (SD1.x, SD2.x, SDXL,
    pruned), the diffusers way, and each family's text encoders as trainers name them (``lora_te_``, ``lora_te1_``,
    ``lora_te2_``, T5 as ``lora_te2_``/``lora_te3_``, single LLM encoders as ``lora_te_``). So the node places
    every file ComfyUI's LoraLoader places, and nothing it would not.
    """
    names_of: dict[str, list[str]] = {}
    for name, key in key_map.items():
        if isinstance(key, str) and key in weights and key.endswith(".weight") and _component(key):
            names_of.setdefault(key, []).append(name)
    targets: list[Target] = []
    model_key_of: dict[str, str] = {}
    for key, names in names_of.items():
        component = _component(key)
        path = key[: -len(".weight")]
        if component == "unet":
            path = path[len(_UNET_PREFIX):]
            canonical = "lora_unet_" + path.replace(".", "_")
        else:
            path = path[len(component) + len(".transformer."):]
            kohya = sorted(n for n in names if n.startswith("lora_te"))
            if not kohya:
                continue  # a weight no trainer adapts (no kohya name for it)
            canonical = kohya[0]
            component = canonical[len("lora_"): canonical.index("_", len("lora_"))]
        weight = weights[key]
        others = tuple(n for n in names if n != canonical)
        targets.append(Target(canonical, types.SimpleNamespace(weight=weight), component, _layer(weight), path,
                              file_names=others))
        model_key_of[canonical] = key
    return targets, model_key_of


def layer_updates(
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None,
    key_map: Mapping[str, Any],
    weights: Mapping[str, torch.Tensor],
    *,
    with_text_encoders: bool = True,
) -> dict[str, LayerUpdate]:
    """Resolve a file against ComfyUI's weights: ComfyUI state-dict key -> :class:`LayerUpdate`.

    Args:
        state_dict: the file's tensors (any layout this package loads).
        metadata: the file's metadata (its DoRA axis, for 1-D ``dora_scale`` on square layers).
        key_map: ComfyUI's ``model_lora_keys_unet`` (+ ``model_lora_keys_clip``) result.
        weights: ComfyUI's state dict(s) (model and clip), for names and shapes.
        with_text_encoders: False for a model-only load: the file's text-encoder modules are left out, as
            ComfyUI's LoraLoaderModelOnly does.

    Raises:
        ValueError: the file does not fit the model (another base model, NaN/Inf, inconsistent tensors).
    """
    targets, model_key_of = _targets(key_map, weights)
    if not targets:
        raise ValueError("the model has no layer that ComfyUI's key map names, so no LoRA/DoRA file can adapt it")
    tensors = _family_spelling(dict(state_dict))
    if not with_text_encoders:
        dropped = {k for k in tensors if k.startswith("lora_te")}
        if dropped:
            logger.info("DoRA Loader (model only): %d text-encoder tensors of the file are not applied",
                        len(dropped))
        tensors = {k: v for k, v in tensors.items() if k not in dropped}
        targets = [t for t in targets if t.component == "unet"]
    found = match_file(tensors, targets, axis_from_metadata(dict(metadata or {})))
    check_coverage(found, targets, allow_partial=False, how_to_allow=_PARTIAL_HINT)
    updates: dict[str, LayerUpdate] = {}
    for name, spec in found.specs.items():
        get = found.state_dict.get
        updates[model_key_of[name]] = LayerUpdate(
            up=get(f"{name}.{UP}"), down=get(f"{name}.{DOWN}"), mid=get(f"{name}.{MID}"),
            alpha=float(get(f"{name}.{ALPHA}", torch.tensor(spec.alpha))), dora_scale=get(f"{name}.{DORA_SCALE}"),
            wd_on_out=spec.wd_on_out if spec.dora else None)
    return updates


def _family_spelling(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A file's module names as ComfyUI's model for its family spells them (sd-scripts' HunyuanImage-2.1 names
    differ from ComfyUI's in four layer types); other files unchanged."""
    family = family_of_file(sorted({k.split(".", 1)[0] for k in tensors}))
    if family is None:
        return tensors
    renamed = {}
    for key, value in tensors.items():
        module, dot, rest = key.partition(".")
        renamed[family.comfy_name(module) + dot + rest] = value
    return renamed


# -- ComfyUI glue (imports ComfyUI only when ComfyUI calls it) ---------------------------------------------------
_PATCH_TYPE: type | None = None


def _patch_type() -> type:
    """A ``comfy.weight_adapter.WeightAdapterBase`` that ComfyUI's ``calculate_weight`` calls for our weights."""
    global _PATCH_TYPE
    if _PATCH_TYPE is None:
        from comfy.weight_adapter import WeightAdapterBase

        class DoRANetworkPatch(WeightAdapterBase):
            """One weight's exact DoRA/LoRA update, computed when ComfyUI patches (or, in lowvram, casts) it."""

            name = "dora_network"

            def __init__(self, update: LayerUpdate) -> None:
                self.update = update
                self.loaded_keys: set[str] = set()
                self.weights = (update.up, update.down, update.alpha, update.mid, update.dora_scale)

            def calculate_weight(self, weight: torch.Tensor, key: str, strength: float, strength_model: float,
                                 offset: Any, function: Callable[[torch.Tensor], torch.Tensor] | None,
                                 intermediate_dtype: torch.dtype = torch.float32,
                                 original_weight: Any = None) -> torch.Tensor:
                # ``weight`` is W0 as ComfyUI has it now (earlier patches on this key included), a float32 copy when
                # patching or the compute dtype in lowvram mode; the update is formed in float32 either way
                base = weight.to(torch.float32)
                new = self.update.weight(base, float(strength))
                if function is not None:
                    new = base + function(new - base)
                return new.to(weight.dtype)

        _PATCH_TYPE = DoRANetworkPatch
    return _PATCH_TYPE


def load_dora_for_models(model: Any, clip: Any, file: str, strength_model: float,
                         strength_clip: float) -> tuple[Any, Any]:
    """Patched clones of ComfyUI's ``model`` (ModelPatcher) and ``clip`` (CLIP, or None) with ``file`` applied.

    Raises:
        ValueError, FileNotFoundError: the file is missing, unreadable or does not fit; nothing is patched.
    """
    import comfy.lora

    state_dict, metadata = load_file(file)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    weights = dict(model.model_state_dict())
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
        weights.update(clip.patcher.model_state_dict())
    updates = layer_updates(state_dict, metadata, key_map, weights, with_text_encoders=clip is not None)
    patch = _patch_type()
    unet = {k: patch(u) for k, u in updates.items() if k.startswith(_UNET_PREFIX)}
    text = {k: patch(u) for k, u in updates.items() if not k.startswith(_UNET_PREFIX)}
    new_model, new_clip = model, clip
    if unet and strength_model != 0:
        new_model = model.clone()
        _add(new_model, unet, strength_model, "model")
    if clip is not None and text and strength_clip != 0:
        new_clip = clip.clone()
        _add(new_clip, text, strength_clip, "clip")
    logger.info("DoRA Loader: %s: %d UNet and %d text-encoder weights patched (strength %g / %g)",
                os.path.basename(file), len(unet), len(text), strength_model, strength_clip)
    return new_model, new_clip


def _add(patcher: Any, patches: dict[str, Any], strength: float, what: str) -> None:
    accepted = set(patcher.add_patches(patches, float(strength)))
    missing = sorted(set(patches) - accepted)
    if missing:  # cannot happen for keys taken from the model's own state dict; say so loudly if it does
        raise ValueError(f"ComfyUI's {what} did not accept {len(missing)} patched weights, e.g. {missing[:3]}")


class DoRALoader:
    """MODEL + CLIP in, a DoRA/LoRA file from ComfyUI's ``loras`` folder applied exactly, MODEL + CLIP out."""

    DESCRIPTION = ("Applies a DoRA or LoRA file exactly, whatever its DoRA axis or layout (ComfyUI's LoRA loader is "
                   "exact only for input-axis DoRA files). From the dora_network package.")
    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "load_dora"
    CATEGORY = "loaders"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 - ComfyUI's name
        import folder_paths

        strength = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",),
                             "lora_name": (folder_paths.get_filename_list("loras"),),
                             "strength_model": ("FLOAT", strength), "strength_clip": ("FLOAT", strength)}}

    def load_dora(self, model: Any, clip: Any, lora_name: str, strength_model: float,
                  strength_clip: float) -> tuple[Any, Any]:
        if strength_model == 0 and strength_clip == 0:
            return model, clip
        import folder_paths

        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        return load_dora_for_models(model, clip, path, strength_model, strength_clip)


class DoRALoaderModelOnly(DoRALoader):
    """MODEL in, the file's UNet part applied exactly, MODEL out."""

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_dora_model_only"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 - ComfyUI's name
        import folder_paths

        return {"required": {"model": ("MODEL",), "lora_name": (folder_paths.get_filename_list("loras"),),
                             "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0,
                                                          "step": 0.01})}}

    def load_dora_model_only(self, model: Any, lora_name: str, strength_model: float) -> tuple[Any]:
        return (self.load_dora(model, None, lora_name, strength_model, 0.0)[0],)


NODE_CLASS_MAPPINGS = {"DoRALoader": DoRALoader, "DoRALoaderModelOnly": DoRALoaderModelOnly}
NODE_DISPLAY_NAME_MAPPINGS = {"DoRALoader": "DoRA Loader", "DoRALoaderModelOnly": "DoRA Loader (model only)"}
