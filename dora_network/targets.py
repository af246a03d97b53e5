"""Which base layers get adapters, and their ``lora_name``s, exactly as sd-scripts' ``networks/lora.py`` picks them.

Rule (sd-scripts): for every module whose *class name* is a target, each descendant whose class name is exactly
``Linear`` or ``Conv2d`` gets an adapter named ``prefix + "." + container_path + "." + child_path`` with every "."
replaced by "_". UNet targets: ``Transformer2DModel``, plus ``ResnetBlock2D``/``Downsample2D``/``Upsample2D`` when
kxk convs are on; text-encoder targets: every CLIP attention class and ``CLIPMLP``. Prefixes: ``lora_unet``,
``lora_te`` (one encoder) or ``lora_te1``/``lora_te2`` (a list of two).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["Target", "every_layer", "find_targets", "normalize_text_encoders", "unwrap_unet"]

UNET_TRANSFORMER_CLASSES = ("Transformer2DModel",)
UNET_CONV_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
UNET_PREFIX = "lora_unet"
_LAYER_CLASSES = ("Linear", "Conv2d")


@dataclass(frozen=True)
class Target:
    """One base layer to adapt.

    Attributes:
        lora_name: its name in files.
        module: the base ``nn.Linear`` / ``nn.Conv2d``.
        component: "unet", "te1", "te2" or "te" (a single text encoder).
        kind: "linear", "conv1x1" or "conv" (kxk).
        path: dotted module path under its model (text encoders in the classic ``text_model.`` form).
    """

    lora_name: str
    module: nn.Module
    component: str
    kind: str
    path: str


def is_text_encoder_target(class_name: str) -> bool:
    """CLIPAttention, CLIPSdpaAttention, CLIPFlashAttention2, ... and CLIPMLP."""
    return class_name.startswith("CLIP") and ("Attention" in class_name or class_name == "CLIPMLP")


def unwrap_unet(unet: Any) -> nn.Module | None:
    """The real UNet behind sd-scripts' gen-script wrapper (``InferSdxlUNet2DConditionModel.delegate``)."""
    if unet is None or isinstance(unet, nn.Module):
        return unet
    delegate = getattr(unet, "delegate", None)
    if isinstance(delegate, nn.Module):
        return delegate
    raise TypeError(f"unet must be an nn.Module or a wrapper with .delegate, got {type(unet).__name__}")


def normalize_text_encoders(text_encoder: Any) -> list[nn.Module]:
    """sd-scripts passes one module (SD1/2), a list [te1, te2] (SDXL, gen scripts) or nothing."""
    if text_encoder is None:
        return []
    if isinstance(text_encoder, nn.Module):
        return [text_encoder]
    encoders = [te for te in text_encoder if te is not None]
    for te in encoders:
        if not isinstance(te, nn.Module):
            raise TypeError(f"text encoders must be nn.Module, got {type(te).__name__}")
    return encoders


def _kind(module: nn.Module) -> str:
    if type(module).__name__ == "Linear":
        return "linear"
    return "conv1x1" if tuple(module.kernel_size) == (1, 1) else "conv"


def _text_encoder_path(root: nn.Module, path: str) -> str:
    """Classic ``text_model.`` paths whatever the transformers version.

    transformers 5 dropped the ``text_model`` level from ``CLIPTextModel``; UIs only map the classic names.
    """
    if hasattr(root, "text_model") or path.startswith("text_model."):
        return path
    return "text_model." + path


def _walk(
    root: nn.Module, prefix: str, component: str, classes: Iterable[str] | None, is_te: bool, with_kxk: bool,
    attn_only: bool, seen: set[str],
) -> list[Target]:
    found: list[Target] = []
    class_set = set(classes or ())
    for path, container in root.named_modules():
        name = type(container).__name__
        if is_te:
            if not is_text_encoder_target(name) or (attn_only and "Attention" not in name):
                continue
        elif name not in class_set:
            continue
        for child_path, child in container.named_modules():
            if type(child).__name__ not in _LAYER_CLASSES or child is container:
                continue
            kind = _kind(child)
            if kind == "conv" and not with_kxk:
                continue
            if attn_only and not is_te and not any(p in ("attn1", "attn2") for p in child_path.split(".")):
                continue
            full = f"{_text_encoder_path(root, path) if is_te else path}.{child_path}"
            lora_name = f"{prefix}.{full}".replace(".", "_")
            if lora_name in seen:
                continue  # nested target containers list the same layer twice
            seen.add(lora_name)
            found.append(Target(lora_name, child, component, kind, full))
    return found


def _walk_all(root: nn.Module, prefix: str, component: str, is_te: bool, seen: set[str]) -> list[Target]:
    """Every Linear/Conv2d under ``root``, named by the same rule (for files made with wider presets)."""
    found: list[Target] = []
    for path, child in root.named_modules():
        if type(child).__name__ not in _LAYER_CLASSES:
            continue
        full = _text_encoder_path(root, path) if is_te else path
        lora_name = f"{prefix}.{full}".replace(".", "_")
        if lora_name not in seen:
            seen.add(lora_name)
            found.append(Target(lora_name, child, component, _kind(child), full))
    return found


def find_targets(
    text_encoders: Sequence[nn.Module],
    unet: nn.Module | None,
    *,
    unet_scope: str = "all",
    include_text_encoders: bool = True,
    with_conv_blocks: bool = False,
    all_layers: bool = False,
) -> list[Target]:
    """All adapter targets, text encoders first (sd-scripts' order).

    Args:
        text_encoders: 0, 1 or 2 text encoders.
        unet: the UNet (sd-scripts' SAI-named SDXL UNet or a diffusers one), or None.
        unet_scope: "all" (Transformer2DModel, plus conv blocks if ``with_conv_blocks``), "transformer"
            (Transformer2DModel only) or "attn" (attention projections only).
        include_text_encoders: False for the unet-only presets.
        with_conv_blocks: add ResnetBlock2D/Downsample2D/Upsample2D and their kxk convs (``conv_dim`` set,
            or built from a file).
        all_layers: then append every other Linear/Conv2d (``conv_in``, ``time_embedding``, ...): a file
            trained with a wider preset (LyCORIS ``full`` on a diffusers UNet) names such layers too.

    Returns:
        The targets, in a stable order, with unique names.
    """
    seen: set[str] = set()
    targets: list[Target] = []
    if include_text_encoders:
        many = len(text_encoders) > 1
        for index, te in enumerate(text_encoders):
            component = f"te{index + 1}" if many else "te"
            prefix = f"lora_{component}"
            targets += _walk(te, prefix, component, None, True, False, unet_scope == "attn", seen)
    if unet is not None:
        classes = UNET_TRANSFORMER_CLASSES
        conv = with_conv_blocks and unet_scope == "all"
        if conv:
            classes = classes + UNET_CONV_CLASSES
        targets += _walk(unet, UNET_PREFIX, "unet", classes, False, conv, unet_scope == "attn", seen)
    if all_layers:
        if include_text_encoders:
            for index, te in enumerate(text_encoders):
                component = f"te{index + 1}" if len(text_encoders) > 1 else "te"
                targets += _walk_all(te, f"lora_{component}", component, True, seen)
        if unet is not None:
            targets += _walk_all(unet, UNET_PREFIX, "unet", False, seen)
    return targets


def every_layer(text_encoders: Sequence[nn.Module], unet: nn.Module | None) -> list[Target]:
    """Every layer a file may adapt, whatever preset trained it: conv blocks, text encoders and layers outside
    sd-scripts' default scope (LyCORIS' ``full`` preset adds ``conv_in``, ``time_embedding``, ...)."""
    return find_targets(text_encoders, unet, unet_scope="all", include_text_encoders=True, with_conv_blocks=True,
                        all_layers=True)
