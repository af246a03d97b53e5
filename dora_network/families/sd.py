"""Stable Diffusion 1.x/2.x (``train_network.py``, sd-scripts' ``networks.lora``), and the UNet rules SDXL shares.

Targets (sd-scripts' ``networks/lora.py``): every Linear/Conv2d under ``Transformer2DModel``, plus the kxk convs of
``ResnetBlock2D``/``Downsample2D``/``Upsample2D`` when ``conv_dim`` is set; text encoders: CLIP attention and MLP.
Prefixes: ``lora_unet``; ``lora_te`` for one text encoder, ``lora_te1``/``lora_te2`` for a list of two.

UNet layers have two spellings in files: SAI/sgm (``input_blocks.4.1...``, ComfyUI, A1111) and diffusers
(``down_blocks.1.attentions.0...``, sd-scripts). :class:`UNetLayout` maps one to the other for a given block layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Sequence

from torch import nn

from .base import Family, TextEncoderSlot, class_names

if TYPE_CHECKING:
    from ..args import NetworkArgs

__all__ = ["CLIP_CLASSES", "SD", "SD1_LAYOUT", "SDFamily", "UNetLayout"]

#: CLIPAttention, CLIPSdpaAttention, CLIPFlashAttention2, ... and CLIPMLP (regexes, matched whole)
CLIP_CLASSES = (r"CLIP\w*Attention\w*", "CLIPMLP")

#: preset -> (UNet scope, text encoders included). Scopes: "all" = Transformer2DModel (+ resnet/down/up blocks
#: when conv_dim is set); "transformer" = Transformer2DModel only; "attn" = attention projections only.
PRESETS: dict[str, tuple[str, bool]] = {
    "full": ("all", True),
    "attn-mlp": ("transformer", True),
    "attn-only": ("attn", True),
    "unet-only": ("all", False),
    "unet-transformer-only": ("transformer", False),
}

_RESNET_PARTS = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
)


@dataclass(frozen=True)
class UNetLayout:
    """An SD-style UNet's block layout: how many down/up levels, which hold attention, two layers per level."""

    levels: int
    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]

    @lru_cache(maxsize=None)
    def block_pairs(self) -> tuple[tuple[str, str, bool], ...]:
        """(sai_prefix, diffusers_prefix, is_resnet) for every block of this layout."""
        layers = 2
        pairs: list[tuple[str, str, bool]] = [
            ("input_blocks.0.0", "conv_in", False),
            ("time_embed.0", "time_embedding.linear_1", False),
            ("time_embed.2", "time_embedding.linear_2", False),
            ("label_emb.0.0", "add_embedding.linear_1", False),
            ("label_emb.0.2", "add_embedding.linear_2", False),
            ("out.0", "conv_norm_out", False),
            ("out.2", "conv_out", False),
            ("middle_block.0", "mid_block.resnets.0", True),
            ("middle_block.1", "mid_block.attentions.0", False),
            ("middle_block.2", "mid_block.resnets.1", True),
        ]
        for i in range(self.levels):
            for j in range(layers):
                n = 1 + i * (layers + 1) + j
                pairs.append((f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}", True))
                if self.down_attention[i]:
                    pairs.append((f"input_blocks.{n}.1", f"down_blocks.{i}.attentions.{j}", False))
            if i < self.levels - 1:
                pairs.append((f"input_blocks.{1 + i * (layers + 1) + layers}.0.op",
                               f"down_blocks.{i}.downsamplers.0.conv", False))
            for j in range(layers + 1):
                n = i * (layers + 1) + j
                pairs.append((f"output_blocks.{n}.0", f"up_blocks.{i}.resnets.{j}", True))
                if self.up_attention[i]:
                    pairs.append((f"output_blocks.{n}.1", f"up_blocks.{i}.attentions.{j}", False))
            if i < self.levels - 1:
                slot = 2 if self.up_attention[i] else 1
                pairs.append((f"output_blocks.{i * (layers + 1) + layers}.{slot}.conv",
                               f"up_blocks.{i}.upsamplers.0.conv", False))
        return tuple(pairs)

    def convert(self, path: str, to_diffusers: bool) -> str | None:
        """One dotted path in the other spelling; None if it is not a path of this layout."""
        best: tuple[str, str, bool] | None = None
        for sai, diff, is_resnet in self.block_pairs():
            src = sai if to_diffusers else diff
            if (path == src or path.startswith(src + ".")) and (best is None or len(src) > len(best[0])):
                best = (src, diff if to_diffusers else sai, is_resnet)
        if best is None:
            return None
        src, dst, is_resnet = best
        rest = path[len(src):].lstrip(".")
        if is_resnet and rest:
            for sai_part, diff_part in _RESNET_PARTS:
                part_src, part_dst = (sai_part, diff_part) if to_diffusers else (diff_part, sai_part)
                if rest == part_src or rest.startswith(part_src + "."):
                    rest = part_dst + rest[len(part_src):]
                    break
            else:
                return None
        return f"{dst}.{rest}" if rest else dst


#: SD1.x/SD2.x: four levels, attention in the first three down levels and the last three up levels
SD1_LAYOUT = UNetLayout(4, (True, True, True, False), (False, True, True, True))


class SDFamily(Family):
    """SD-style UNets with CLIP text encoders; SD1.x/2.x here, SDXL (sdxl.py) with another layout."""

    name = "sd"
    title = "SD1.x/SD2.x"
    trainers = "train_network.py"
    sd_scripts_module = "networks.lora"
    has_convs = True
    has_presets = True
    layout = SD1_LAYOUT

    def recognizes(self, unet: nn.Module | None, text_encoders: Sequence[nn.Module | None]) -> bool:
        if unet is None:
            encoders = [te for te in text_encoders if te is not None]
            return bool(encoders) and all(any(n.startswith("CLIP") for n in class_names(te)) for te in encoders)
        return "Transformer2DModel" in class_names(unet)

    def text_encoder_slots(self, count: int) -> tuple[TextEncoderSlot, ...]:
        if count <= 1:
            return (TextEncoderSlot("lora_te", CLIP_CLASSES, clip_paths=True),)
        return tuple(TextEncoderSlot(f"lora_te{i + 1}", CLIP_CLASSES, clip_paths=True) for i in range(count))

    def unet_containers(self, args: NetworkArgs) -> tuple[str, ...]:
        scope, _ = PRESETS[args.preset]
        if args.conv_dim is not None and scope == "all":
            return ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
        return ("Transformer2DModel",)

    def selects(self, lora_name: str, path: str, component: str, args: NetworkArgs) -> bool:
        scope, with_text_encoders = PRESETS[args.preset]
        if component != "unet" and not with_text_encoders:
            return False
        if scope == "attn":
            parts = path.split(".")
            return any(p in ("attn1", "attn2", "self_attn") for p in parts)
        return True

    def unet_aliases(self, path: str) -> tuple[str, ...]:
        return tuple(other for other in (self.layout.convert(path, True), self.layout.convert(path, False)) if other)


SD = SDFamily()
