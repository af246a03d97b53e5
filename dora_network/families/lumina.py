"""Lumina 2 (``lumina_train_network.py``, sd-scripts' ``networks.lora_lumina``).

The trainer passes ``lumina_models.NextDiT`` and ``[Gemma2Model]``. Targets: every Linear under
``JointTransformerBlock`` (``layers``, ``noise_refiner``, ``context_refiner``) and ``FinalLayer``: 180 on
NextDiT-2B; Gemma2 attention/MLP layers as ``lora_te_layers_N_...`` (182). ``attention.qkv`` is one fused
grouped-query weight (q of the model's width, k and v narrower): one layer, one magnitude, saved fused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from torch import nn

from .base import Family, TextEncoderSlot, class_names, parse_flag, parse_int_list, parse_optional_rank, type_dim

if TYPE_CHECKING:
    from ..args import NetworkArgs

__all__ = ["LUMINA", "LuminaFamily"]

GEMMA2_CLASSES = (r"Gemma2\w*Attention\w*", "Gemma2MLP")
#: per-type rank options and the lora_name part that picks their layers, first match wins (sd-scripts' order;
#: its "mlp" names no NextDiT layer, whose feed-forward is ``feed_forward``, so mlp_dim changes nothing there)
TYPE_DIMS = (("attn_dim", ("attention",)), ("mlp_dim", ("mlp",)), ("mod_dim", ("modulation",)),
             ("refiner_dim", ("refiner",)))
#: embedder_dims positions: the lora_name part of each embedder
EMBEDDERS = ("x_embedder", "t_embedder", "cap_embedder")
#: train_blocks choices -> the lora_name parts that keep a layer (None: every block and the final layer)
TRAIN_BLOCKS = {
    "all": None,
    "transformer": ("layers_",),
    "refiners": ("noise_refiner", "context_refiner"),
    "noise_refiner": ("noise_refiner",),
    "context_refiner": ("context_refiner",),
}


def _train_blocks(key: str, value: Any) -> str:
    text = str(value).strip()
    if text not in TRAIN_BLOCKS:
        raise ValueError(f"network_args: {key}={value!r} must be one of {', '.join(TRAIN_BLOCKS)}")
    return text


class LuminaFamily(Family):
    name = "lumina"
    title = "Lumina 2"
    trainers = "lumina_train_network.py"
    sd_scripts_module = "networks.lora_lumina"
    file_pattern = r"lora_unet_(layers|noise_refiner|context_refiner)_\d+_(attention_(qkv|out)|feed_forward_w[123])"
    options = {
        "train_blocks": _train_blocks,
        **{key: parse_optional_rank for key, _ in TYPE_DIMS},
        "embedder_dims": parse_int_list(len(EMBEDDERS), "x_embedder, t_embedder, cap_embedder"),
        "split_qkv": parse_flag,
    }

    def recognizes(self, unet: nn.Module | None, text_encoders: Sequence[nn.Module | None]) -> bool:
        if unet is None:
            return any(any(n.startswith("Gemma2") for n in class_names(te)) for te in text_encoders)
        names = class_names(unet)
        return "NextDiT" in names or "JointTransformerBlock" in names

    def text_encoder_slots(self, count: int) -> tuple[TextEncoderSlot, ...]:
        return (TextEncoderSlot("lora_te", GEMMA2_CLASSES),)  # sd-scripts adapts the first encoder only

    def unet_containers(self, args: NetworkArgs) -> tuple[str, ...]:
        return ("JointTransformerBlock", "FinalLayer")

    def extra_unet_layers(self, args: NetworkArgs) -> tuple[tuple[str, int], ...]:
        dims = args.family_options.get("embedder_dims")
        return tuple((part, rank) for part, rank in zip(EMBEDDERS, dims or ()) if rank)

    def selects(self, lora_name: str, path: str, component: str, args: NetworkArgs) -> bool:
        keep = TRAIN_BLOCKS[args.family_options.get("train_blocks", "all")]
        return component != "unet" or keep is None or any(part in lora_name for part in keep)

    def type_rank(self, lora_name: str, path: str, args: NetworkArgs) -> int | None:
        return type_dim(lora_name, args.family_options, TYPE_DIMS)

    def fused_parts(self, path: str, in_features: int, out_features: int) -> tuple[int, ...] | None:
        """``split_qkv``: q has the model's width, k and v share the rest (grouped-query attention)."""
        kv = out_features - in_features
        if path.endswith("attention.qkv") and kv > 0 and kv % 2 == 0:
            return (in_features, kv // 2, kv // 2)
        return None


LUMINA = LuminaFamily()
