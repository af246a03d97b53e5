"""FLUX.1 and Chroma (``flux_train_network.py``, sd-scripts' ``networks.lora_flux``).

The trainer passes ``flux_models.Flux`` and ``[CLIP-L, T5-XXL]`` (Chroma: ``[None, T5-XXL]``) and reads
``network.train_t5xxl``. Targets: every Linear under ``DoubleStreamBlock`` and ``SingleStreamBlock`` (304 on
FLUX.1-dev); CLIP-L attention/MLP as ``lora_te1``; T5 attention/gated MLP as ``lora_te3`` only with ``train_t5xxl``.
``img_attn.qkv`` (q, k, v) and the single blocks' ``linear1`` (q, k, v and the MLP input) are fused weights: one
layer, one magnitude, saved under the fused name as ComfyUI expects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from torch import nn

from .base import (NO_GGPO, Family, TextEncoderSlot, class_names, diffusers_joint_block, parse_block_selection,
                   parse_flag, parse_int_list, parse_optional_rank, refused_option, type_dim)
from .sd import CLIP_CLASSES

if TYPE_CHECKING:
    from ..args import NetworkArgs

__all__ = ["FLUX", "FluxFamily"]

#: FLUX.1's fixed depth; sd-scripts validates block indices against it
DOUBLE_BLOCKS, SINGLE_BLOCKS = 19, 38
T5_CLASSES = ("T5Attention", "T5DenseGatedActDense")

#: per-type rank options and the lora_name parts that pick their layers, first match wins (sd-scripts' order)
TYPE_DIMS = (
    ("img_attn_dim", ("img_attn",)),
    ("txt_attn_dim", ("txt_attn",)),
    ("img_mlp_dim", ("img_mlp",)),
    ("txt_mlp_dim", ("txt_mlp",)),
    ("img_mod_dim", ("img_mod",)),
    ("txt_mod_dim", ("txt_mod",)),
    ("single_dim", ("single_blocks", "linear")),
    ("single_mod_dim", ("modulation",)),
)
#: in_dims positions: the lora_name part of each embedder
IN_LAYERS = ("_img_in", "_time_in", "_vector_in", "_guidance_in", "_txt_in")


def _train_blocks(key: str, value: Any) -> str:
    text = str(value).strip().lower()
    if text not in ("all", "single", "double"):
        raise ValueError(f"network_args: {key}={value!r} must be all, single or double")
    return text


class FluxFamily(Family):
    name = "flux"
    title = "FLUX.1"
    trainers = "flux_train_network.py"
    sd_scripts_module = "networks.lora_flux"
    file_pattern = r"lora_unet_(double_blocks_\d+_(img|txt)_(attn_qkv|mod_lin)|single_blocks_\d+_(linear1|modulation_lin))"
    checkpoint_roots = ("double_blocks", "single_blocks", "img_in", "txt_in", "time_in", "vector_in", "guidance_in",
                        "final_layer")
    diffusers_classes = ("FluxTransformer2DModel",)
    diffusers_transformer = (
        *diffusers_joint_block(r"double_blocks_(\d+)_img_", r"double_blocks_(\d+)_txt_", "attn_qkv", "attn_proj",
                               "mlp_0", "mlp_2", "mod_lin"),
        (r"single_blocks_(\d+)_linear1", ("single_transformer_blocks.{0}.attn.to_q",
                                          "single_transformer_blocks.{0}.attn.to_k",
                                          "single_transformer_blocks.{0}.attn.to_v",
                                          "single_transformer_blocks.{0}.proj_mlp")),
        (r"single_blocks_(\d+)_linear2", ("single_transformer_blocks.{0}.proj_out",)),
        (r"single_blocks_(\d+)_modulation_lin", ("single_transformer_blocks.{0}.norm.linear",)),
        (r"img_in", ("x_embedder",)),
        (r"txt_in", ("context_embedder",)),
        (r"time_in_in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
        (r"time_in_out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
        (r"vector_in_in_layer", ("time_text_embed.text_embedder.linear_1",)),
        (r"vector_in_out_layer", ("time_text_embed.text_embedder.linear_2",)),
        (r"guidance_in_in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
        (r"guidance_in_out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
        (r"final_layer_linear", ("proj_out",)),
        (r"final_layer_adaLN_modulation_1", ("norm_out.linear",)),
    )
    options = {
        "train_blocks": _train_blocks,
        "train_double_block_indices": parse_block_selection(DOUBLE_BLOCKS),
        "train_single_block_indices": parse_block_selection(SINGLE_BLOCKS),
        **{key: parse_optional_rank for key, _ in TYPE_DIMS},
        "in_dims": parse_int_list(len(IN_LAYERS), "img, time, vector, guidance, txt"),
        "train_t5xxl": parse_flag,
        "split_qkv": parse_flag,
        "ggpo_beta": refused_option(NO_GGPO),
        "ggpo_sigma": refused_option(NO_GGPO),
    }

    def recognizes(self, unet: nn.Module | None, text_encoders: Sequence[nn.Module | None]) -> bool:
        if unet is None:
            names = set().union(*(class_names(te) for te in text_encoders))
            return len(text_encoders) == 2 and "T5EncoderModel" in names
        return bool({"DoubleStreamBlock", "SingleStreamBlock"} & class_names(unet))

    def text_encoder_slots(self, count: int) -> tuple[TextEncoderSlot, ...]:
        classes = CLIP_CLASSES + T5_CLASSES  # sd-scripts looks for both in either encoder
        slots = (TextEncoderSlot("lora_te1", classes, clip_paths=True),
                 TextEncoderSlot("lora_te3", classes, enabled_by="train_t5xxl"))
        return slots[:max(count, 1)]

    def unet_containers(self, args: NetworkArgs) -> tuple[str, ...]:
        blocks = args.family_options.get("train_blocks", "all")
        return {"all": ("DoubleStreamBlock", "SingleStreamBlock"), "single": ("SingleStreamBlock",),
                "double": ("DoubleStreamBlock",)}[blocks]

    def extra_unet_layers(self, args: NetworkArgs) -> tuple[tuple[str, int], ...]:
        in_dims = args.family_options.get("in_dims")
        return tuple((part, rank) for part, rank in zip(IN_LAYERS, in_dims or ()) if rank)

    def type_rank(self, lora_name: str, path: str, args: NetworkArgs) -> int | None:
        options = args.family_options
        rank = type_dim(lora_name, options, TYPE_DIMS)
        for stack, key in (("double_blocks", "train_double_block_indices"),
                           ("single_blocks", "train_single_block_indices")):
            chosen = options.get(key)
            head = path.split(".")
            if chosen is not None and len(head) > 1 and head[0] == stack and not chosen[int(head[1])]:
                return 0
        return rank

    def fused_parts(self, path: str, in_features: int, out_features: int) -> tuple[int, ...] | None:
        """Output rows of each part of a fused projection (``split_qkv``): q, k, v (and the single block's MLP).

        Both read the hidden size from the layer's input: ``qkv`` is hidden -> 3*hidden, ``linear1`` is
        hidden -> 3*hidden + MLP width.
        """
        parts = path.split(".")
        if parts[0] == "double_blocks" and parts[-1] == "qkv" and out_features == 3 * in_features:
            return (in_features,) * 3
        if parts[0] == "single_blocks" and parts[-1] == "linear1" and out_features > 3 * in_features:
            return (in_features,) * 3 + (out_features - 3 * in_features,)
        return None


FLUX = FluxFamily()
