"""Which base layers get adapters, and their ``lora_name``s, exactly as each family's sd-scripts module picks them.

Rule (every sd-scripts network module): for every module whose *class name* is one of the family's containers, each
descendant whose class name is exactly ``Linear`` or ``Conv2d`` gets an adapter named
``prefix + "." + container_path + "." + child_path`` with every "." replaced by "_". What the containers, prefixes,
options and other spellings are comes from the model's family (``families/``); this file only walks.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from typing import Any, Sequence

from torch import nn

from .args import NetworkArgs
from .families import Family, TextEncoderSlot, detect_family

logger = logging.getLogger(__name__)

__all__ = ["Target", "every_layer", "find_targets", "normalize_text_encoders", "unwrap_unet"]

_LAYER_CLASSES = ("Linear", "Conv2d")


@dataclass(frozen=True)
class Target:
    """One base layer to adapt.

    Attributes:
        lora_name: its name in files.
        module: the base ``nn.Linear`` / ``nn.Conv2d``.
        component: "unet", or the text encoder's prefix without ``lora_`` ("te", "te1", "te2", "te3").
        kind: "linear", "conv1x1" or "conv" (kxk).
        path: dotted module path under its model (CLIP text encoders in the classic ``text_model.`` form).
        te_index: the text encoder's position in the trainer's list (None for the denoiser).
        rank: the rank an option sets for this layer (per-type dims, ``network_reg_dims``, ``in_dims``); None means
            the network's rank for its kind.
        aliases: other dotted paths files use for this layer (SDXL's SAI/diffusers spellings), under its prefix.
        file_names: other whole module names files use for it (ComfyUI's key map names, any prefix).
    """

    lora_name: str
    module: nn.Module
    component: str
    kind: str
    path: str
    te_index: int | None = None
    rank: int | None = None
    aliases: tuple[str, ...] = ()
    file_names: tuple[str, ...] = ()


def unwrap_unet(unet: Any) -> nn.Module | None:
    """The real UNet behind sd-scripts' gen-script wrapper (``InferSdxlUNet2DConditionModel.delegate``)."""
    if unet is None or isinstance(unet, nn.Module):
        return unet
    delegate = getattr(unet, "delegate", None)
    if isinstance(delegate, nn.Module):
        return delegate
    raise TypeError(f"unet must be an nn.Module or a wrapper with .delegate, got {type(unet).__name__}")


def normalize_text_encoders(text_encoder: Any) -> list[nn.Module | None]:
    """The trainer's text encoders as a list, positions kept: one module (SD1/2), a list (SDXL ``[te1, te2]``,
    FLUX ``[clip_l, t5]``, Chroma ``[None, t5]``) or nothing. A None keeps its position, which sets the prefixes."""
    if text_encoder is None:
        return []
    if isinstance(text_encoder, nn.Module):
        return [text_encoder]
    encoders = list(text_encoder)
    for te in encoders:
        if te is not None and not isinstance(te, nn.Module):
            raise TypeError(f"text encoders must be nn.Module or None, got {type(te).__name__}")
    return encoders


def _kind(module: nn.Module) -> str:
    if type(module).__name__ == "Linear":
        return "linear"
    return "conv1x1" if tuple(module.kernel_size) == (1, 1) else "conv"


def _classic_path(root: nn.Module, path: str) -> str:
    """Classic CLIP ``text_model.`` paths whatever the transformers version.

    transformers 5 dropped the ``text_model`` level from ``CLIPTextModel``; UIs only map the classic names.
    """
    if hasattr(root, "text_model") or path.startswith("text_model."):
        return path
    return "text_model." + path


def _is_container(class_name: str, patterns: Sequence[str]) -> bool:
    return any(re.fullmatch(p, class_name) for p in patterns)


def _walk(root: nn.Module, prefix: str, component: str, containers: Sequence[str], *, clip_paths: bool,
          with_kxk: bool, te_index: int | None, seen: set[str]) -> list[Target]:
    found: list[Target] = []
    for path, container in root.named_modules():
        if not _is_container(type(container).__name__, containers):
            continue
        for child_path, child in container.named_modules():
            if type(child).__name__ not in _LAYER_CLASSES or child is container:
                continue
            kind = _kind(child)
            if kind == "conv" and not with_kxk:
                continue
            full = f"{path}.{child_path}" if path else child_path
            if clip_paths:
                full = _classic_path(root, full)
            lora_name = f"{prefix}.{full}".replace(".", "_")
            if lora_name in seen:
                continue  # nested target containers list the same layer twice
            seen.add(lora_name)
            found.append(Target(lora_name, child, component, kind, full, te_index))
    return found


def _walk_all(root: nn.Module, prefix: str, component: str, clip_paths: bool, te_index: int | None,
              seen: set[str]) -> list[Target]:
    """Every Linear/Conv2d under ``root``, named by the same rule."""
    found: list[Target] = []
    for path, child in root.named_modules():
        if type(child).__name__ not in _LAYER_CLASSES:
            continue
        full = _classic_path(root, path) if clip_paths else path
        lora_name = f"{prefix}.{full}".replace(".", "_")
        if lora_name not in seen:
            seen.add(lora_name)
            found.append(Target(lora_name, child, component, _kind(child), full, te_index))
    return found


def _slots(family: Family, text_encoders: Sequence[nn.Module | None]) -> list[tuple[int, nn.Module, TextEncoderSlot]]:
    slots = family.text_encoder_slots(len(text_encoders))
    return [(i, te, slot) for i, (te, slot) in enumerate(zip(text_encoders, slots)) if te is not None]


def _option_rank(family: Family, target: Target, args: NetworkArgs) -> int | None:
    """``network_reg_dims`` first (first pattern that matches), then the family's per-type options."""
    for pattern, rank in args.reg_dims:
        if family.reg_matches(pattern, target.lora_name, target.path):
            return rank
    if target.component == "unet":
        return family.type_rank(target.lora_name, target.path, args)
    return None


def find_targets(
    text_encoders: Sequence[nn.Module | None],
    unet: nn.Module | None,
    args: NetworkArgs | None = None,
    *,
    family: Family | None = None,
    with_conv_blocks: bool = False,
) -> list[Target]:
    """The layers a new network adapts, text encoders first (sd-scripts' order), with per-layer ranks.

    Args:
        text_encoders: the trainer's text-encoder list (positions kept; None entries skipped).
        unet: the denoiser, or None.
        args: the options (family options, preset, conv_dim, reg dims); defaults to NetworkArgs().
        family: the model family; recognised from the models when None.
        with_conv_blocks: as if ``conv_dim`` were set (kxk convs and their blocks), for tools and tests.

    Returns:
        The targets, in a stable order, with unique names; layers whose rank an option sets to 0 are left out.
    """
    args = args or NetworkArgs()
    if with_conv_blocks and args.conv_dim is None:
        args = replace(args, conv_dim=args.rank)
    family = family or detect_family(unet, text_encoders)
    seen: set[str] = set()
    candidates: list[Target] = []
    for index, te, slot in _slots(family, text_encoders):
        if slot.enabled_by and not args.family_options.get(slot.enabled_by):
            continue
        candidates += _walk(te, slot.prefix, slot.component, slot.classes, clip_paths=slot.clip_paths,
                            with_kxk=False, te_index=index, seen=seen)
    if unet is not None:
        containers = tuple(re.escape(c) for c in family.unet_containers(args))
        candidates += _walk(unet, family.unet_prefix, "unet", containers, clip_paths=False,
                            with_kxk=args.conv_dim is not None, te_index=None, seen=seen)
    targets: list[Target] = []
    for target in candidates:
        if not family.selects(target.lora_name, target.path, target.component, args):
            continue
        rank = _option_rank(family, target, args)
        if rank == 0:
            continue
        targets.append(_finish(family, target, rank))
    extras = family.extra_unet_layers(args)
    if unet is not None and extras:  # layers outside the containers that options add (FLUX in_dims)
        for target in _walk_all(unet, family.unet_prefix, "unet", False, None, seen):
            rank = next((rank for part, rank in extras if part in target.lora_name), 0)
            if rank:
                targets.append(_finish(family, target, rank))
    return targets


def _finish(family: Family, target: Target, rank: int | None) -> Target:
    aliases = family.unet_aliases(target.path) if target.component == "unet" else ()
    return replace(target, rank=rank, aliases=aliases)


def every_layer(text_encoders: Sequence[nn.Module | None], unet: nn.Module | None,
                family: Family | None = None) -> list[Target]:
    """Every layer a file may adapt, whatever options or tool trained it: every Linear/Conv2d of every text encoder
    (T5 included) and of the denoiser (LyCORIS' ``full`` preset adds ``conv_in``, ``time_embedding``, ...)."""
    family = family or detect_family(unet, text_encoders)
    seen: set[str] = set()
    layers: list[Target] = []
    for index, te, slot in _slots(family, text_encoders):
        layers += _walk_all(te, slot.prefix, slot.component, slot.clip_paths, index, seen)
    if unet is not None:
        layers += [_finish(family, t, None) for t in _walk_all(unet, family.unet_prefix, "unet", False, None, seen)]
    return layers
