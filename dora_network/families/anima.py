"""Anima (``anima_train_network.py``, sd-scripts' ``networks.lora_anima``).

The trainer passes ``anima_models.Anima`` and ``[Qwen3Model]`` (always frozen: it applies no text-encoder adapters).
Targets: Linear layers under ``Block``, ``PatchEmbed``, ``TimestepEmbedding`` and ``FinalLayer`` (plus
``LLMAdapterTransformerBlock`` with ``train_llm_adapter``) whose dotted path is not excluded by the default pattern
``.*(_modulation|_norm|_embedder|final_layer).*`` or the user's ``exclude_patterns``, unless an ``include_patterns``
regex matches it (patterns match the whole path). On the full model that is 28 blocks x 10 = 280 layers. Qwen3
attention/MLP layers are named ``lora_te_layers_N_...``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Sequence

from torch import nn

from .base import Family, TextEncoderSlot, class_names, parse_flag, parse_pattern_list

if TYPE_CHECKING:
    from ..args import NetworkArgs

__all__ = ["ANIMA", "AnimaFamily", "DEFAULT_EXCLUDE"]

DEFAULT_EXCLUDE = r".*(_modulation|_norm|_embedder|final_layer).*"
QWEN3_CLASSES = (r"Qwen3\w*Attention\w*", "Qwen3MLP")



class AnimaFamily(Family):
    name = "anima"
    title = "Anima"
    trainers = "anima_train_network.py"
    sd_scripts_module = "networks.lora_anima"
    file_pattern = r"lora_unet_(blocks_\d+_(self|cross)_attn_output_proj|blocks_\d+_mlp_layer[12]|llm_adapter_blocks_\d+_.*)"
    options = {
        "train_llm_adapter": parse_flag,
        "include_patterns": parse_pattern_list,
        "exclude_patterns": parse_pattern_list,
    }

    def recognizes(self, unet: nn.Module | None, text_encoders: Sequence[nn.Module | None]) -> bool:
        if unet is None:
            return any(any(n.startswith("Qwen3") for n in class_names(te)) for te in text_encoders)
        names = class_names(unet)
        return "Anima" in names or {"Block", "LLMAdapterTransformerBlock"} <= names

    def text_encoder_slots(self, count: int) -> tuple[TextEncoderSlot, ...]:
        return (TextEncoderSlot("lora_te", QWEN3_CLASSES),) * max(count, 1)

    def unet_containers(self, args: NetworkArgs) -> tuple[str, ...]:
        containers = ("Block", "PatchEmbed", "TimestepEmbedding", "FinalLayer")
        if args.family_options.get("train_llm_adapter"):
            containers += ("LLMAdapterTransformerBlock",)
        return containers

    def selects(self, lora_name: str, path: str, component: str, args: NetworkArgs) -> bool:
        options = args.family_options
        excludes = tuple(options.get("exclude_patterns", ())) + (DEFAULT_EXCLUDE,)
        if not any(re.fullmatch(p, path) for p in excludes):
            return True
        return any(re.fullmatch(p, path) for p in options.get("include_patterns", ()))

    def reg_matches(self, pattern: str, lora_name: str, path: str) -> bool:
        return re.fullmatch(pattern, path) is not None


ANIMA = AnimaFamily()
