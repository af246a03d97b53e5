"""Exact conversions of LoRA/DoRA files: the adapted weights do not change (the reported error is 0 or rounding).

* :func:`reshape_dora_scale`: 1-D ``dora_scale`` -> LyCORIS' (1, in[, 1, 1]) / (out, 1[, 1, 1]).
* :func:`fold_alpha`: ``lora_up *= alpha / rank`` and ``alpha = rank`` (what old SD.Next needs).
* :func:`cast_dtype`: fp32 <-> fp16/bf16 (exact when widening; narrowing reports the rounding error).
* :func:`convert_unet_names`: SDXL UNet names SAI (``input_blocks_4_1_...``) <-> diffusers (``down_blocks_1_...``),
  worked out on the underscore names alone from SDXL's block table in families/sdxl.py (no model needed).
* :func:`classic_text_encoder_names`: ``lora_te1_encoder_...`` (transformers 5) -> ``lora_te1_text_model_encoder_...``.

Each returns a :class:`~dora_network.tools.conversion.ConversionResult` holding the converted state dict.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Mapping, Sequence

import torch

from ..keys import ALPHA, DORA_SCALE, DOWN, MID, UP, group_by_module, infer_spec
from ..families import family_of_file
from ..families.sdxl import SDXL_LAYOUT, diffusers_to_sai, sai_to_diffusers
from .conversion import ConversionResult, ErrorMeter
from .file_modules import file_axis, flatten, module_delta, split_modules

__all__ = ["cast_dtype", "classic_text_encoder_names", "convert_unet_names", "fold_alpha", "reshape_dora_scale",
           "unet_lora_name"]


# -- tensors ------------------------------------------------------------------------------------------------------
def reshape_dora_scale(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                       axis: str | None = None) -> ConversionResult:
    """Give every 1-D ``dora_scale`` LyCORIS' 2-D/4-D shape (the values are not touched).

    The axis of a non-square layer follows from the length. For a square layer it is ``axis`` if given, else the
    file's ``dora_network.wd_on_out`` metadata, else the axis all unambiguous modules of the file share.

    Args:
        state_dict: the file's tensors.
        metadata: the file's metadata.
        axis: "in" or "out" for square layers, or None.

    Returns:
        The result (errors 0.0).

    Raises:
        ValueError: a square layer's axis cannot be decided; pass ``axis``.
    """
    if axis not in (None, "in", "out"):
        raise ValueError(f"axis={axis!r}: use 'in' (per input column) or 'out' (per output row)")
    groups, specs, unknown = split_modules(state_dict)
    hint = axis or file_axis(metadata, groups, specs)
    meter, notes = ErrorMeter(), []
    for name, tensors in groups.items():
        scale, spec = tensors.get(DORA_SCALE), specs[name]
        if scale is None or scale.ndim != 1:
            continue
        square = spec.in_dim == spec.out_dim
        if square and hint is None:
            raise ValueError(
                f"module '{name}': a 1-D dora_scale on a square ({spec.out_dim}x{spec.in_dim}) layer does not say "
                f"its axis and the file gives no hint; pass axis='in' or 'out' (dora-convert --axis in|out)"
            )
        out_axis = (hint == "out") if square else bool(spec.wd_on_out)
        ndim = 2 if spec.kernel is None else 4
        shape = (-1,) + (1,) * (ndim - 1) if out_axis else (1, -1) + (1,) * (ndim - 2)
        tensors[DORA_SCALE] = scale.reshape(shape).contiguous()
        meter.add(name, [scale], [tensors[DORA_SCALE].reshape(-1)])
    if meter.per_module and hint and any(specs[n].in_dim == specs[n].out_dim for n in meter.per_module):
        notes.append(f"square layers reshaped as {hint}-axis")
    return meter.result("dora_scale_2d", True, "dora_scale values", flatten(groups, unknown, state_dict),
                        len(meter.per_module), notes)


def fold_alpha(state_dict: Mapping[str, torch.Tensor]) -> ConversionResult:
    """Scale ``lora_up`` by alpha/rank and store alpha = rank, so s B A (hence W') is unchanged.

    A missing alpha (kohya reads it as rank) is written out explicitly. Exact in exact arithmetic; in float the
    new ``lora_up`` is rounded once (zero error when alpha/rank is a power of two), which is what is reported:
    s B A before vs after, in float64.
    """
    groups, specs, unknown = split_modules(state_dict)
    meter, notes, added = ErrorMeter(), [], 0
    for name, tensors in groups.items():
        spec = specs[name]
        old_alpha = tensors.get(ALPHA)
        if old_alpha is not None and float(old_alpha.float()) == spec.rank:
            continue
        before = module_delta(tensors, spec)
        factor = spec.alpha / spec.rank
        up = tensors[UP]
        tensors[UP] = (up.double() * factor).to(up.dtype)
        dtype = torch.float32 if old_alpha is None else old_alpha.dtype
        tensors[ALPHA] = torch.tensor(float(spec.rank), dtype=dtype)
        added += old_alpha is None
        meter.add(name, [before], [module_delta(tensors, infer_spec(name, tensors))])
    if added:
        notes.append(f"{added} modules had no alpha (read as alpha = rank); it is now stored")
    return meter.result("fold_alpha", True, "s*B*A", flatten(groups, unknown, state_dict),
                        len(meter.per_module), notes)


def cast_dtype(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype,
               dora_scale_dtype: torch.dtype | None = torch.float32) -> ConversionResult:
    """Cast ``lora_down``/``lora_up``/``lora_mid`` to ``dtype`` and ``dora_scale`` to ``dora_scale_dtype``.

    ``alpha`` keeps its dtype (a scalar; fp16 would round e.g. 0.1). ``dora_scale`` stays float32 by default
    (reference/loaders.md: every loader reads it, and it is small). The error compares s B A and ``dora_scale``.

    Args:
        state_dict: the file's tensors.
        dtype: float32, float16 or bfloat16.
        dora_scale_dtype: dtype for ``dora_scale``; None means ``dtype``.

    Raises:
        ValueError: a value overflows ``dtype`` (fp16 tops out at 65504; use bf16).
    """
    scale_dtype = dtype if dora_scale_dtype is None else dora_scale_dtype
    groups, specs, unknown = split_modules(state_dict)
    meter = ErrorMeter()
    exact = True
    for name, tensors in groups.items():
        before_delta = module_delta(tensors, specs[name])
        before_scale = tensors.get(DORA_SCALE)
        changed = False
        for suffix in (DOWN, UP, MID, DORA_SCALE):
            tensor = tensors.get(suffix)
            target = scale_dtype if suffix == DORA_SCALE else dtype
            if tensor is None or tensor.dtype == target:
                continue
            cast = tensor.to(target)
            if not torch.isfinite(cast).all() and torch.isfinite(tensor).all():
                raise ValueError(f"module '{name}': {suffix} overflows {target} (max |value| "
                                 f"{float(tensor.abs().max()):.3g}); cast to bfloat16 or keep float32")
            exact = exact and torch.finfo(target).bits >= torch.finfo(tensor.dtype).bits and not (
                {target, tensor.dtype} == {torch.float16, torch.bfloat16})
            tensors[suffix] = cast
            changed = True
        if changed:
            before = [before_delta] + ([] if before_scale is None else [before_scale])
            after = [module_delta(tensors, specs[name])] + ([] if before_scale is None else [tensors[DORA_SCALE]])
            meter.add(name, before, after)
    name = str(dtype).replace("torch.", "")
    return meter.result(f"dtype({name}, dora_scale {str(scale_dtype).replace('torch.', '')})", exact,
                        "s*B*A and dora_scale", flatten(groups, unknown, state_dict), len(meter.per_module))


# -- names --------------------------------------------------------------------------------------------------------
def _redot(text: str) -> Iterable[str]:
    """Every way to turn some of ``text``'s underscores back into dots."""
    tokens = text.split("_")
    for seps in itertools.product("._", repeat=len(tokens) - 1):
        yield tokens[0] + "".join(s + t for s, t in zip(seps, tokens[1:]))


def unet_lora_name(lora_name: str, to: str, pairs: Sequence[tuple[str, str, bool]] | None = None) -> str | None:
    """An SDXL UNet ``lora_name`` in the other spelling (``to`` = "sai" or "diffusers"); unchanged if it already
    is; None if it is not an SDXL UNet name.

    Only the block prefix differs between spellings (plus the resnet layer names ``in_layers_2`` = ``conv1``, ...),
    so the underscore name is split at the longest known block prefix and only that part is translated.
    """
    if to not in ("sai", "diffusers"):
        raise ValueError(f"to={to!r}: use 'sai' or 'diffusers'")
    if not lora_name.startswith("lora_unet_"):
        return None
    rest = lora_name[len("lora_unet_"):]
    pairs = SDXL_LAYOUT.block_pairs() if pairs is None else pairs
    best = None
    for sai, diff, resnet in pairs:
        for src, dst, src_is_sai in ((sai, diff, True), (diff, sai, False)):
            key = src.replace(".", "_")
            if (rest == key or rest.startswith(key + "_")) and (best is None or len(key) > len(best[0])):
                best = (key, src, dst, src_is_sai, resnet)
    if best is None:
        return None
    key, src, dst, src_is_sai, resnet = best
    if src_is_sai == (to == "sai"):
        return lora_name  # already in the wanted spelling
    tail = rest[len(key) + 1:]
    if not tail:
        return "lora_unet_" + dst.replace(".", "_")
    if not resnet:
        return "lora_unet_" + dst.replace(".", "_") + "_" + tail
    convert = sai_to_diffusers if src_is_sai else diffusers_to_sai
    for dotted in _redot(tail):
        converted = convert(f"{src}.{dotted}")
        if converted is not None:
            return "lora_unet_" + converted.replace(".", "_")
    return None


def convert_unet_names(state_dict: Mapping[str, torch.Tensor], to: str) -> ConversionResult:
    """Rename every SDXL UNet module to SAI (``to="sai"``, sd-scripts/ComfyUI/A1111's spelling) or diffusers names,
    or (``to="comfy"``) a DiT file's denoiser names to the spelling of ComfyUI's model for its family.

    Raises:
        ValueError: an SD1/SD2 file (its block layout differs from SDXL's), a UNet name that is not SDXL's, or two
            modules that would get the same name.
    """
    groups, unknown = group_by_module(dict(state_dict))
    names = list(groups)
    if to == "comfy":
        return _comfy_names(groups, unknown, state_dict)
    if any(n.startswith("lora_te_") for n in names) or any(
            n.startswith(("lora_unet_down_blocks_3_", "lora_unet_up_blocks_3_")) for n in names):
        raise ValueError("this looks like an SD1/SD2 file (lora_te_ or a 4th down/up block); UNet name conversion "
                         "only knows SDXL's block layout")
    pairs = SDXL_LAYOUT.block_pairs()
    renamed: dict[str, dict[str, torch.Tensor]] = {}
    bad: list[str] = []
    changed = 0
    for name, tensors in groups.items():
        new = unet_lora_name(name, to, pairs) if name.startswith("lora_unet_") else name
        if new is None:
            bad.append(name)
            continue
        if new in renamed:
            raise ValueError(f"modules '{name}' and another one both become '{new}': the file holds the layer twice")
        changed += new != name
        renamed[new] = tensors
    if bad:
        raise ValueError(f"{len(bad)} UNet names are not SDXL UNet layers, e.g. {bad[:3]}; nothing was converted")
    return ErrorMeter().result(f"unet_names({to})", True, "tensors (moved unchanged)",
                               flatten(renamed, unknown, state_dict), changed)


def _comfy_names(groups: dict[str, dict[str, torch.Tensor]], unknown: dict[str, torch.Tensor],
                 state_dict: Mapping[str, torch.Tensor]) -> ConversionResult:
    """The denoiser names as ComfyUI's model for the file's family spells them (HunyuanImage-2.1: what sd-scripts'
    ``convert_hunyuan_image_lora_to_comfy.py`` does); refused for a family whose names ComfyUI reads as saved."""
    family = family_of_file(list(groups))
    renamed = {family.comfy_name(name) if family else name: tensors for name, tensors in groups.items()}
    changed = sum(new != old for new, old in zip(renamed, groups))
    if not changed:
        what = family.title if family else "SD/SDXL"
        raise ValueError(f"ComfyUI reads this {what} file's names as they are; nothing to convert")
    return ErrorMeter().result("unet_names(comfy)", True, "tensors (moved unchanged)",
                               flatten(renamed, unknown, state_dict), changed)


def classic_text_encoder_names(state_dict: Mapping[str, torch.Tensor]) -> ConversionResult:
    """``lora_te1_encoder_...`` (names taken from a transformers-5 CLIPTextModel) -> ``lora_te1_text_model_encoder_...``,
    the spelling every UI maps (reference/loaders.md §5). Tensors are unchanged."""
    groups, _, unknown = split_modules(state_dict)
    renamed: dict[str, dict[str, torch.Tensor]] = {}
    changed = 0
    for name, tensors in groups.items():
        new = name
        for prefix in ("lora_te1_", "lora_te2_", "lora_te_"):
            if name.startswith(prefix + "encoder_") or name.startswith(prefix + "final_layer_norm"):
                new = prefix + "text_model_" + name[len(prefix):]
                break
        if new in renamed:
            raise ValueError(f"the file holds '{new}' twice (classic and transformers-5 names)")
        changed += new != name
        renamed[new] = tensors
    return ErrorMeter().result("te_names(classic)", True, "tensors (moved unchanged)",
                               flatten(renamed, unknown, state_dict), changed)

