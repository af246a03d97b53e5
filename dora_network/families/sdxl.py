"""SDXL (``sdxl_train_network.py``, sd-scripts' ``networks.lora``): SD's rules with SDXL's UNet layout.

sd-scripts passes its own ``SdxlUNet2DConditionModel`` (SAI paths) and ``[CLIPTextModel, CLIPTextModelWithProjection]``;
diffusers' SDXL UNet is recognised by its ``text_time`` added embedding. Names: ``lora_unet_``, ``lora_te1_``,
``lora_te2_``; three levels, attention in the last two down levels and the first two up levels.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from .base import class_names
from .sd import SDFamily, UNetLayout

__all__ = ["SDXL", "SDXL_LAYOUT", "diffusers_to_sai", "sai_to_diffusers"]

SDXL_LAYOUT = UNetLayout(3, (False, True, True), (True, True, False))


class SDXLFamily(SDFamily):
    name = "sdxl"
    title = "SDXL"
    trainers = "sdxl_train_network.py"
    layout = SDXL_LAYOUT

    def recognizes(self, unet: nn.Module | None, text_encoders: Sequence[nn.Module | None]) -> bool:
        if not super().recognizes(unet, text_encoders):
            return False
        if unet is None:
            return len([te for te in text_encoders if te is not None]) == 2
        config = getattr(unet, "config", None)
        added = getattr(config, "addition_embed_type", None) if config is not None else None
        return "SdxlUNet2DConditionModel" in class_names(unet) or added == "text_time" or len(text_encoders) == 2


SDXL = SDXLFamily()


def sai_to_diffusers(path: str) -> str | None:
    """``input_blocks.4.1.proj_in`` -> ``down_blocks.1.attentions.0.proj_in``; None if not an SDXL UNet path."""
    return SDXL_LAYOUT.convert(path, True)


def diffusers_to_sai(path: str) -> str | None:
    """Inverse of :func:`sai_to_diffusers`; None if not an SDXL UNet path."""
    return SDXL_LAYOUT.convert(path, False)
