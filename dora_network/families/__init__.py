"""The model families dora_network trains, one description each, and how a model is matched to one.

Order matters: the first family that recognises the model wins (SDXL before SD, whose rules it extends), and the
first whose ``file_pattern`` a file's names match claims the file (HunyuanImage before FLUX.1, which share the
``double_blocks_N_img_attn_qkv`` spelling).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from torch import nn

from .anima import ANIMA
from .base import Family, TextEncoderSlot
from .flux import FLUX
from .hunyuan_image import HUNYUAN_IMAGE
from .lumina import LUMINA
from .sd import SD
from .sd3 import SD3
from .sdxl import SDXL

__all__ = ["ANIMA", "FAMILIES", "FLUX", "HUNYUAN_IMAGE", "LUMINA", "SD", "SD3", "SDXL", "Family", "TextEncoderSlot",
           "detect_family", "family_named", "family_of_file"]

FAMILIES: tuple[Family, ...] = (HUNYUAN_IMAGE, FLUX, SD3, LUMINA, ANIMA, SDXL, SD)


def family_named(name: str) -> Family:
    """The family with this short name (``flux``); ValueError listing the known ones otherwise."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def family_of_file(module_names: Sequence[str]) -> Family | None:
    """The family whose own module names a file uses (FLUX.1's ``double_blocks_N_img_attn_qkv``, ...), or None when
    no family claims them (SD-style UNet files, told apart by their text encoders and layout)."""
    for family in FAMILIES:
        if family.file_pattern and any(re.fullmatch(family.file_pattern, name) for name in module_names):
            return family
    return None


def _summary(module: nn.Module | None) -> str:
    if module is None:
        return "None"
    containers = sorted({type(m).__name__ for m in module.modules()} - {"Linear", "Conv2d", "ModuleList",
                                                                         "Sequential", "Dropout", "Identity"})
    shown = ", ".join(containers[:8]) + (", ..." if len(containers) > 8 else "")
    return f"{type(module).__name__} (classes: {shown})"


def detect_family(unet: nn.Module | None, text_encoders: Sequence[Any]) -> Family:
    """The family of the objects a trainer passes, recognised from class names and structure.

    Raises:
        ValueError: no family recognises them; the message names what was found and what is supported.
    """
    for family in FAMILIES:
        if family.recognizes(unet, text_encoders):
            return family
    encoders = ", ".join(_summary(te) for te in text_encoders) or "none"
    supported = "; ".join(f.describe() for f in FAMILIES)
    raise ValueError(
        f"dora_network does not know this model: denoiser {_summary(unet)}; text encoders: {encoders}. "
        f"Supported families: {supported}. For another architecture use its own sd-scripts network module "
        f"or --network_module=lycoris.kohya"
    )
