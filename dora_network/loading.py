"""Match a file's modules to a model's adapter targets, and put the file into our canonical form.

A file may name UNet layers in either SDXL spelling (SAI ``input_blocks_...`` or diffusers ``down_blocks_...``),
name text-encoder layers without the ``text_model_`` level (tools built on transformers 5), or carry a 1-D
``dora_scale``. :func:`match_file` resolves every name to one of our targets, reads each module's spec from the
tensors, checks it against the base layer, and returns a state dict keyed and shaped exactly like the network's
own ``state_dict()``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from .keys import ALPHA, DORA_SCALE, ModuleSpec, group_by_module, infer_spec, normalize_dora_scale
from .targets import Target

logger = logging.getLogger(__name__)

__all__ = ["FileMatch", "check_coverage", "match_file", "name_aliases", "nonfinite_modules"]


def nonfinite_modules(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Names of the modules (key prefix before the first '.') holding any NaN or Inf value, sorted."""
    return sorted({key.partition(".")[0] for key, tensor in state_dict.items()
                   if tensor.is_floating_point() and not torch.isfinite(tensor).all()})


@dataclass
class FileMatch:
    """The outcome of matching a file to a model.

    Attributes:
        specs: canonical lora_name -> what the file holds for it.
        state_dict: the file's tensors under canonical names, ``dora_scale`` in 2-D/4-D form.
        unmatched: file module names that match no layer of the model.
    """

    specs: dict[str, ModuleSpec]
    state_dict: dict[str, torch.Tensor]
    unmatched: list[str]


def name_aliases(targets: Sequence[Target]) -> dict[str, str]:
    """Every other spelling of each target's name -> its canonical ``lora_name``.

    The family gives the denoiser's (Target.aliases: SDXL's SAI/diffusers paths); CLIP text encoders are also
    named without ``text_model.`` by tools built on transformers 5.
    """
    aliases: dict[str, str] = {}
    for target in targets:
        prefix = target.lora_name[: target.lora_name.index("_", len("lora_"))]  # lora_unet / lora_te1 / ...
        others: list[str | None] = list(target.aliases)
        if target.component != "unet" and target.path.startswith("text_model."):
            others.append(target.path[len("text_model."):])
        for other in others:
            if other:
                aliases.setdefault(f"{prefix}.{other}".replace(".", "_"), target.lora_name)
        for name in target.file_names:
            aliases.setdefault(name, target.lora_name)
    return aliases


def check_coverage(found: FileMatch, targets: Sequence[Target], allow_partial: bool, how_to_allow: str) -> None:
    """Refuse a file of which some modules name no layer of the model, unless a partial load is allowed.

    Such a file is usually for another base model (an SD1.5 or SD3 file on SDXL), and loading only its matching
    part would silently give a different model. With ``allow_partial`` the unmatched modules are skipped, with a
    warning naming a few.

    Args:
        found: the match of the file against ``targets``.
        targets: every layer of the model the file may name.
        allow_partial: the caller's opt-in.
        how_to_allow: how the user opts in, quoted in the error (e.g. ``network_args "allow_partial_load=True"``).

    Raises:
        ValueError: nothing matches, or some modules do not and a partial load was not allowed.
    """
    model_names = [t.lora_name for t in targets[:3]]
    total = len(found.specs) + len(found.unmatched)
    if not found.specs:
        raise ValueError(
            f"none of the file's {total} modules matches this model (file: {found.unmatched[:3]}; model: "
            f"{model_names}). Is it for another base model?"
        )
    if not found.unmatched:
        return
    summary = (f"{len(found.unmatched)} of the file's {total} modules match no layer of this model (file: "
               f"{found.unmatched[:3]}; model: {model_names})")
    if not allow_partial:
        raise ValueError(
            f"{summary}. The file is probably for another base model or architecture; refusing to load only part of "
            f"it. To load the {len(found.specs)} modules that match and skip the rest, pass {how_to_allow}"
        )
    logger.warning("%s; skipped (partial load allowed)", summary)


def _check_fits(name: str, spec: ModuleSpec, target: Target) -> None:
    weight = target.module.weight
    out_dim, in_dim = int(weight.shape[0]), int(weight.shape[1])
    kernel = None if weight.ndim == 2 else (int(weight.shape[2]), int(weight.shape[3]))
    if (spec.out_dim, spec.in_dim, spec.kernel) != (out_dim, in_dim, kernel):
        got = f"out={spec.out_dim}, in={spec.in_dim}" + (f", kernel={spec.kernel}" if spec.kernel else "")
        want = f"out={out_dim}, in={in_dim}" + (f", kernel={kernel}" if kernel else "")
        raise ValueError(
            f"module '{name}': the file's tensors imply a layer with {got}, but the model's layer has {want}. "
            f"The file was probably trained on another base model (e.g. an SD1.5 file on SDXL)"
        )


def _resolve_square_axes(specs: dict[str, ModuleSpec], axis_hint: bool | None) -> dict[str, ModuleSpec]:
    """Give 1-D ``dora_scale``s on square layers (axis unknown) the file's axis, said once per file."""
    unknown = [name for name, spec in specs.items() if spec.dora and spec.wd_on_out is None]
    if not unknown:
        return specs
    known = {spec.wd_on_out for spec in specs.values() if spec.dora and spec.wd_on_out is not None}
    if axis_hint is not None:
        axis, source = axis_hint, "the file's metadata"
    elif len(known) == 1:
        axis, source = next(iter(known)), "the file's other modules"
    else:
        axis, source = True, "PEFT's convention for 1-D magnitudes (the file gives no other clue)"
    logger.warning("%d square layers have a 1-D dora_scale, whose shape cannot tell the axis; read as %s, from %s",
                   len(unknown), "per output row" if axis else "per input column", source)
    return {name: replace(spec, wd_on_out=axis) if name in unknown else spec for name, spec in specs.items()}


def match_file(
    state_dict: dict[str, torch.Tensor], targets: Sequence[Target], axis_hint: bool | None = None
) -> FileMatch:
    """Resolve a LyCORIS-layout state dict against ``targets``.

    Args:
        state_dict: the file's tensors.
        targets: the model's layers.
        axis_hint: the axis the file's metadata records (keys.axis_from_metadata), used only for 1-D
            ``dora_scale``s on square layers.

    Raises:
        ValueError: a module's tensors are inconsistent or do not fit its layer, or two file modules map to
            the same layer.
    """
    by_name = {t.lora_name: t for t in targets}
    aliases = name_aliases(targets)
    groups, unknown = group_by_module(state_dict)
    broken = nonfinite_modules(state_dict)
    if broken:
        raise ValueError(
            f"the file has NaN/Inf values in {len(broken)} modules (e.g. {broken[:3]}): it was saved from a diverged "
            f"run. Use an earlier checkpoint, and a lower learning rate for the next run"
        )
    if unknown:
        logger.warning("%d keys are not LoRA/DoRA tensors and are ignored, e.g. %s", len(unknown), unknown[:3])
    specs: dict[str, ModuleSpec] = {}
    sources: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}
    unmatched: list[str] = []
    for file_name, tensors in groups.items():
        canonical = file_name if file_name in by_name else aliases.get(file_name)
        if canonical is None:
            unmatched.append(file_name)
            continue
        if canonical in specs:
            raise ValueError(f"the file holds layer '{canonical}' twice (as '{file_name}' and another spelling)")
        spec = infer_spec(file_name, tensors)
        _check_fits(file_name, spec, by_name[canonical])
        specs[canonical] = spec
        sources[canonical] = (file_name, tensors)
    specs = _resolve_square_axes(specs, axis_hint)
    normalized: dict[str, torch.Tensor] = {}
    flat = 0
    for canonical, (file_name, tensors) in sources.items():
        for suffix, tensor in tensors.items():
            if suffix == DORA_SCALE and tensor.ndim == 1:
                tensor = normalize_dora_scale(file_name, tensor, specs[canonical])
                flat += 1
            elif suffix == ALPHA and (tensor.ndim or float(tensor) == 0):
                # a scalar as LyCORIS writes it; 0 means alpha = rank (kohya), as the spec already reads it
                tensor = torch.tensor(specs[canonical].alpha, dtype=tensor.dtype)
            normalized[f"{canonical}.{suffix}"] = tensor
    if flat:
        logger.warning("%d modules store dora_scale as 1-D; reshaped to LyCORIS' 2-D/4-D shape (ComfyUI, Forge, "
                       "A1111, InvokeAI and SD.Next apply 1-D magnitudes wrongly: re-save the file to fix it there)",
                       flat)
    return FileMatch(specs, normalized, unmatched)
