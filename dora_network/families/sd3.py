"""SD3 / SD3.5 (``sd3_train_network.py``, sd-scripts' ``networks.lora_sd3``).

The trainer passes ``sd3_models.MMDiT`` and ``[CLIP-L, CLIP-G, T5-XXL]`` and reads ``network.train_t5xxl``.
Targets: every Linear under ``SingleDiTBlock`` (each joint block's ``context_block`` and ``x_block``; 263 on
SD3.5 Medium, whose last context block is pre-only and whose first 13 x blocks have a second attention, 377 on
Large); CLIP-L as ``lora_te1``, CLIP-G as ``lora_te2``, T5 as ``lora_te3`` only with ``train_t5xxl``. ``attn.qkv``
is one fused weight (q, k, v): one layer, one magnitude, saved under the fused name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from torch import nn

from .base import (Family, TextEncoderSlot, class_names, diffusers_joint_block, parse_block_selection, parse_flag,
                   parse_int_list, parse_optional_rank, type_dim)
from .flux import T5_CLASSES
from .sd import CLIP_CLASSES

if TYPE_CHECKING:
    from ..args import NetworkArgs

__all__ = ["SD3", "SD3Family"]

#: per-type rank options and the lora_name parts that pick their layers, first match wins (sd-scripts' order)
TYPE_DIMS = (
    ("context_attn_dim", ("context_block", "attn")),
    ("context_mlp_dim", ("context_block", "mlp")),
    ("context_mod_dim", ("context_block", "adaLN_modulation")),
    ("x_attn_dim", ("x_block", "attn")),
    ("x_mlp_dim", ("x_block", "mlp")),
    ("x_mod_dim", ("x_block", "adaLN_modulation")),
)
#: emb_dims positions: the lora_name part of each layer outside the blocks ("_t_embedder": "t_embedder" is also
#: inside "context_embedder"); x_embedder is the patch-embedding conv
EMB_LAYERS = ("context_embedder", "_t_embedder", "x_embedder", "y_embedder", "final_layer_adaLN_modulation",
              "final_layer_linear")
#: sd-scripts parses train_block_indices without knowing the depth (its dummy total); indices past the model's
#: depth select nothing
MAX_BLOCKS = 999


class SD3Family(Family):
    name = "sd3"
    title = "SD3/SD3.5"
    trainers = "sd3_train_network.py"
    sd_scripts_module = "networks.lora_sd3"
    file_pattern = r"lora_unet_joint_blocks_\d+_(context|x)_block_.*"
    diffusers_classes = ("SD3Transformer2DModel",)
    diffusers_transformer = (
        *diffusers_joint_block(r"joint_blocks_(\d+)_x_block_", r"joint_blocks_(\d+)_context_block_", "attn_qkv",
                               "attn_proj", "mlp_fc1", "mlp_fc2", "adaLN_modulation_1"),
        (r"joint_blocks_(\d+)_x_block_attn2_qkv", ("transformer_blocks.{0}.attn2.to_q",
                                                   "transformer_blocks.{0}.attn2.to_k",
                                                   "transformer_blocks.{0}.attn2.to_v")),
        (r"joint_blocks_(\d+)_x_block_attn2_proj", ("transformer_blocks.{0}.attn2.to_out.0",)),
        (r"x_embedder_proj", ("pos_embed.proj",)),
        (r"context_embedder", ("context_embedder",)),
        (r"t_embedder_mlp_0", ("time_text_embed.timestep_embedder.linear_1",)),
        (r"t_embedder_mlp_2", ("time_text_embed.timestep_embedder.linear_2",)),
        (r"y_embedder_mlp_0", ("time_text_embed.text_embedder.linear_1",)),
        (r"y_embedder_mlp_2", ("time_text_embed.text_embedder.linear_2",)),
        (r"final_layer_linear", ("proj_out",)),
        (r"final_layer_adaLN_modulation_1", ("norm_out.linear",)),
    )
    options = {
        "train_t5xxl": parse_flag,
        "split_qkv": parse_flag,
        "emb_dims": parse_int_list(len(EMB_LAYERS), "context, t, x, y, final_mod, final_linear"),
        "train_block_indices": parse_block_selection(MAX_BLOCKS),
        **{key: parse_optional_rank for key, _ in TYPE_DIMS},
    }

    def recognizes(self, unet: nn.Module | None, text_encoders: Sequence[nn.Module | None]) -> bool:
        if unet is None:
            names = set().union(*(class_names(te) for te in text_encoders))
            return len(text_encoders) == 3 and "T5EncoderModel" in names
        names = class_names(unet)
        return "MMDiT" in names or {"SingleDiTBlock", "MMDiTBlock"} <= names

    def text_encoder_slots(self, count: int) -> tuple[TextEncoderSlot, ...]:
        classes = CLIP_CLASSES + T5_CLASSES  # sd-scripts looks for every class in every encoder
        return (TextEncoderSlot("lora_te1", classes, clip_paths=True),
                TextEncoderSlot("lora_te2", classes, clip_paths=True),
                TextEncoderSlot("lora_te3", classes, enabled_by="train_t5xxl"))[:max(count, 1)]

    def unet_containers(self, args: NetworkArgs) -> tuple[str, ...]:
        return ("SingleDiTBlock",)

    def extra_unet_layers(self, args: NetworkArgs) -> tuple[tuple[str, int], ...]:
        emb_dims = args.family_options.get("emb_dims")
        return tuple((part, rank) for part, rank in zip(EMB_LAYERS, emb_dims or ()) if rank)

    def type_rank(self, lora_name: str, path: str, args: NetworkArgs) -> int | None:
        options = args.family_options
        rank = type_dim(lora_name, options, TYPE_DIMS)
        chosen = options.get("train_block_indices")
        head = path.split(".")
        if rank != 0 and chosen is not None and head[0] == "joint_blocks" and not chosen[int(head[1])]:
            return 0
        return rank

    def fused_parts(self, path: str, in_features: int, out_features: int) -> tuple[int, ...] | None:
        """``split_qkv``: every joint block's ``qkv`` (``attn`` and MMDiT-X's ``attn2``) is hidden -> 3*hidden."""
        if path.startswith("joint_blocks.") and path.endswith(".qkv") and out_features == 3 * in_features:
            return (in_features,) * 3
        return None


SD3 = SD3Family()
