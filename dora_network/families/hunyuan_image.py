"""HunyuanImage-2.1 (``hunyuan_image_train_network.py``, sd-scripts' ``networks.lora_hunyuan_image``).

The trainer passes ``HYImageDiffusionTransformer`` and its text encoders, which it may already have moved to the
meta device: they get no adapters and are never read. Targets: every Linear under ``MMDoubleStreamBlock`` and
``MMSingleStreamBlock``: 320 on the 17 B model (20 + 40 blocks). ``img_attn_qkv``/``txt_attn_qkv`` (q, k, v) and
the single blocks' ``linear1`` (q, k, v and the MLP input) are fused weights, kept fused.

ComfyUI spells four of these layers differently (sd-scripts ships ``convert_hunyuan_image_lora_to_comfy.py`` for
it): ``img_mlp.0``/``img_mlp.2`` for ``img_mlp.fc1``/``fc2`` (and txt), ``img_mod.lin`` for ``img_mod.linear``,
``modulation.lin`` for ``modulation.linear``. Files in either spelling load here; ``dora-convert --unet_names comfy``
writes ComfyUI's.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Sequence

from torch import nn

from .base import NO_GGPO, Family, TextEncoderSlot, class_names, parse_flag, refused_option

if TYPE_CHECKING:
    from ..args import NetworkArgs

__all__ = ["HUNYUAN_IMAGE", "HunyuanImageFamily", "to_comfy_name"]

#: sd-scripts' spelling -> ComfyUI's, on underscore names (the table of sd-scripts' converter)
COMFY_NAMES = (
    (r"(double_blocks_\d+_(?:img|txt)_mlp)_fc1$", r"\1_0"),
    (r"(double_blocks_\d+_(?:img|txt)_mlp)_fc2$", r"\1_2"),
    (r"(double_blocks_\d+_(?:img|txt)_mod)_linear$", r"\1_lin"),
    (r"(single_blocks_\d+_modulation)_linear$", r"\1_lin"),
)


def to_comfy_name(name: str) -> str:
    """A name (``lora_unet_...`` or a module path with underscores) as ComfyUI's HunyuanImage model spells it;
    others unchanged. What sd-scripts' converter does."""
    for pattern, replacement in COMFY_NAMES:
        other, count = re.subn(pattern, replacement, name)
        if count:
            return other
    return name


class HunyuanImageFamily(Family):
    name = "hunyuan_image"
    title = "HunyuanImage-2.1"
    trainers = "hunyuan_image_train_network.py"
    sd_scripts_module = "networks.lora_hunyuan_image"
    #: sd-scripts' spelling only: ComfyUI's (img_mlp_0, img_mod_lin, modulation_lin) is FLUX.1's too
    file_pattern = (r"lora_unet_(double_blocks_\d+_(img|txt)_(mod_linear|mlp_fc[12])"
                    r"|single_blocks_\d+_modulation_linear)")
    options = {
        "split_qkv": parse_flag,
        "ggpo_beta": refused_option(NO_GGPO),
        "ggpo_sigma": refused_option(NO_GGPO),
    }

    def recognizes(self, unet: nn.Module | None, text_encoders: Sequence[nn.Module | None]) -> bool:
        if unet is None:
            return False  # its trainer never trains text encoders
        names = class_names(unet)
        return "HYImageDiffusionTransformer" in names or {"MMDoubleStreamBlock", "MMSingleStreamBlock"} <= names

    def text_encoder_slots(self, count: int) -> tuple[TextEncoderSlot, ...]:
        return ()  # no text-encoder adapters; the encoders (maybe on meta) are not walked

    def unet_containers(self, args: NetworkArgs) -> tuple[str, ...]:
        return ("MMDoubleStreamBlock", "MMSingleStreamBlock")

    def unet_aliases(self, path: str) -> tuple[str, ...]:
        flat = path.replace(".", "_")  # aliases become lora_names, so underscores are as good as dots
        other = to_comfy_name(flat)
        return (other,) if other != flat else ()

    def comfy_name(self, lora_name: str) -> str:
        return to_comfy_name(lora_name)

    def fused_parts(self, path: str, in_features: int, out_features: int) -> tuple[int, ...] | None:
        parts = path.split(".")
        if parts[0] == "double_blocks" and parts[-1].endswith("attn_qkv") and out_features == 3 * in_features:
            return (in_features,) * 3
        if parts[0] == "single_blocks" and parts[-1] == "linear1" and out_features > 3 * in_features:
            return (in_features,) * 3 + (out_features - 3 * in_features,)
        return None


HUNYUAN_IMAGE = HunyuanImageFamily()
