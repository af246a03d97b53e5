"""Apply a DoRA (or plain LoRA) file in our/LyCORIS layout to a diffusers pipeline, exactly: SD/SDXL (``unet``),
FLUX.1 and SD3/3.5 (``transformer``, files with sd-scripts' names).

diffusers' own ``pipe.load_lora_weights`` drops ``dora_scale`` and loads such a file as a plain LoRA (and rejects
Tucker ``lora_mid`` files), so it does not reproduce a DoRA. :func:`apply_dora_to_pipeline` instead writes the
merged weights W(s) = W0 + s * (W' - W0), W' = m * V / (||V|| + eps), V = W0 + (alpha/r) * up @ down, into the
pipeline's ``unet`` or ``transformer`` and its text encoders, reusing this package's name resolution
(``loading.match_file``: SAI or diffusers UNet names, classic ``text_model_`` text-encoder names) and math
(``functional``). sd-scripts names FLUX.1/SD3 layers as the original models do; diffusers splits some of them
(FLUX's fused ``qkv`` is ``to_q``/``to_k``/``to_v``, ``linear1`` adds ``proj_mlp``) and keeps its
``AdaLayerNormContinuous`` outputs as (scale, shift): each such layer is handled as one weight made of those rows
(the family's ``diffusers_transformer`` table), so the DoRA norm is the fused weight's, as trained. The returned
:class:`DoRAPatch` changes the strength or puts the original weights back bit for bit.

Example::

    patch = apply_dora_to_pipeline(pipe, "my_dora.safetensors", strength=0.8)
    image = pipe(prompt).images[0]
    patch.set_strength(0.5)
    patch.remove()  # the pipeline is exactly as before
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Mapping

import torch

from .. import functional as DF
from ..io import load_file
from ..keys import DORA_SCALE, DOWN, MID, UP, ModuleSpec
from ..keys import axis_from_metadata
from ..families import FAMILIES, Family, family_of_file
from ..loading import check_coverage, match_file
from ..targets import Target, _kind, every_layer

logger = logging.getLogger(__name__)

__all__ = ["DoRAPatch", "apply_dora_to_pipeline"]


class _Rows:
    """One original-model layer whose rows diffusers keeps in one or more modules, read and written as one weight.

    ``pieces``: (module, first row, end row) in the original layer's row order.
    """

    def __init__(self, pieces: list[tuple[Any, int, int]]) -> None:
        self.pieces = pieces
        first = pieces[0][0]
        self.kernel_size = getattr(first, "kernel_size", None)

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([module.weight.detach()[start:end] for module, start, end in self.pieces])

    def write_weight(self, value: torch.Tensor) -> None:
        offset = 0
        for module, start, end in self.pieces:
            module.weight.detach()[start:end].copy_(value[offset:offset + end - start])
            offset += end - start


def _write(module: Any, value: torch.Tensor) -> None:
    if isinstance(module, _Rows):
        module.write_weight(value)
    else:
        module.weight.copy_(value)


def _pieces(transformer: Any, path: str) -> list[tuple[Any, int, int]]:
    module = transformer.get_submodule(path)
    rows = module.weight.shape[0]
    parent = transformer.get_submodule(path.rsplit(".", 1)[0]) if "." in path else transformer
    if type(parent).__name__ == "AdaLayerNormContinuous":  # diffusers emits (scale, shift), the original (shift, scale)
        return [(module, rows // 2, rows), (module, 0, rows // 2)]
    return [(module, 0, rows)]


def _transformer_targets(family: Family, transformer: Any, names: list[str]) -> list[Target]:
    """Targets for the file's ``lora_unet_`` modules that the family's table places in the diffusers transformer."""
    targets: list[Target] = []
    for name in names:
        short = name[len("lora_unet_"):]
        for pattern, paths in family.diffusers_transformer:
            found = re.fullmatch(pattern, short)
            if found is None:
                continue
            try:
                pieces = [p for path in paths for p in _pieces(transformer, path.format(*found.groups()))]
            except AttributeError:
                break  # the table names a module this transformer does not have (fewer blocks, no guidance)
            module = _Rows(pieces)
            kind = "linear" if module.kernel_size is None else _kind(pieces[0][0])
            targets.append(Target(name, module, "unet", kind, short))
            break
    return targets


def _transformer_family(transformer: Any, names: list[str]) -> Family:
    # the transformer's own family first: another family's table may name modules this one has too
    family = next((f for f in FAMILIES if type(transformer).__name__ in f.diffusers_classes), None)
    if family is None:
        family = family_of_file(names)
    if family is None or not family.diffusers_transformer:
        supported = ", ".join(c for f in FAMILIES for c in f.diffusers_classes)
        raise ValueError(f"apply_dora_to_pipeline knows no layer table for {type(transformer).__name__}; "
                         f"supported transformers: {supported} (and pipelines with a unet)")
    return family


class DoRAPatch:
    """Merged adapter weights written into a pipeline's layers, with their originals kept for undoing.

    Attributes:
        strength: the current strength s (0 gives the base model).
        matched: canonical ``lora_name`` of every patched layer.
        unmatched: the file's module names that match no layer of the pipeline (ignored).
        active: False once :meth:`remove` has run.
    """

    def __init__(
        self,
        targets: list[Target],
        specs: Mapping[str, ModuleSpec],
        tensors: Mapping[str, torch.Tensor],
        unmatched: list[str],
        backup_device: str | torch.device | None,
    ) -> None:
        self._targets = targets
        self._specs = dict(specs)
        self._tensors = dict(tensors)
        with torch.no_grad():
            self._originals = {
                t.lora_name: t.module.weight.detach().to(backup_device or t.module.weight.device, copy=True)
                for t in targets
            }
        self.matched = [t.lora_name for t in targets]
        self.unmatched = list(unmatched)
        self.strength = 0.0
        self.active = True

    def merged_weight(self, target: Target, strength: float) -> torch.Tensor:
        """W(s) for one target in float32 (float64 for a float64 model), on the layer's device.

        Args:
            target: one of the patched targets.
            strength: s.

        Returns:
            W0 + s * (W' - W0) for DoRA, W0 + s * (alpha/r) * up @ down for plain LoRA, from the saved original.
        """
        name, weight = target.lora_name, target.module.weight
        spec = self._specs[name]
        w0 = self._originals[name].to(weight.device)

        def get(suffix: str) -> torch.Tensor | None:
            tensor = self._tensors.get(f"{name}.{suffix}")
            return None if tensor is None else tensor.to(weight.device)

        delta = DF.lowrank_delta(get(UP), get(DOWN), spec.alpha / spec.rank, get(MID))  # type: ignore[arg-type]
        if not spec.dora:
            return w0.to(delta.dtype) + strength * delta
        adapted = DF.dora_weight(w0, delta, get(DORA_SCALE), bool(spec.wd_on_out))  # type: ignore[arg-type]
        return DF.blend(w0, adapted, strength)

    @torch.no_grad()
    def set_strength(self, strength: float) -> None:
        """Recompute every patched weight at ``strength`` from the saved originals and write it in place.

        Raises:
            RuntimeError: the patch was removed.
        """
        if not self.active:
            raise RuntimeError("this DoRAPatch was removed; apply the file again")
        for target in self._targets:
            weight = target.module.weight
            _write(target.module, self.merged_weight(target, float(strength)).to(dtype=weight.dtype))
        self.strength = float(strength)

    @torch.no_grad()
    def remove(self) -> None:
        """Put every original weight back, bit for bit (idempotent)."""
        if not self.active:
            return
        for target in self._targets:
            _write(target.module, self._originals[target.lora_name])
        self._originals.clear()
        self.active = False

    unapply = remove

    def __enter__(self) -> DoRAPatch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def apply_dora_to_pipeline(
    pipe: Any,
    file_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
    strength: float = 1.0,
    *,
    backup_device: str | torch.device | None = "cpu",
    allow_partial: bool = False,
) -> DoRAPatch:
    """Write a DoRA/LoRA file's merged weights into ``pipe.unet``, ``pipe.text_encoder`` and ``pipe.text_encoder_2``.

    Either DoRA axis (read from ``dora_scale``'s shape), plain LoRA modules, conv 1x1/kxk and Tucker
    (``lora_mid``) modules are applied exactly as :meth:`DoRANetwork.merge_to` would, with strength outside.
    UNet keys may use SAI (``input_blocks_...``) or diffusers (``down_blocks_...``) names; text-encoder keys are
    ``lora_te1_``/``lora_te2_`` (``lora_te_`` for a single-encoder pipeline) with or without ``text_model_``.

    Args:
        pipe: a diffusers pipeline (SDXL; any pipeline with ``unet`` and optional ``text_encoder``/``_2`` works).
        file_or_state_dict: a ``.safetensors`` (or tensors-only ``.ckpt``/``.pt``) path, or a loaded state dict.
        strength: s in W0 + s * (W' - W0); 0 leaves the weights as they are.
        backup_device: where the original weights are kept ("cpu" saves accelerator memory; None keeps them next
            to the weights).

    Returns:
        The patch; call ``set_strength`` to change s and ``remove`` to restore the originals exactly.

    Raises:
        ValueError: no module of the file matches the pipeline, some do not (without ``allow_partial``), or a
            module does not fit its layer.
        FileNotFoundError: the file does not exist.
    """
    metadata: dict[str, str] = {}
    if isinstance(file_or_state_dict, Mapping):
        state_dict = dict(file_or_state_dict)
    else:
        state_dict, metadata = load_file(file_or_state_dict)
    transformer = getattr(pipe, "transformer", None)
    if getattr(pipe, "unet", None) is None and transformer is not None:
        names = sorted({k.split(".", 1)[0] for k in state_dict})
        family = _transformer_family(transformer, names)
        encoders = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2", "text_encoder_3")]
        while encoders and encoders[-1] is None:
            encoders.pop()
        denoiser = [n for n in names if n.startswith("lora_unet_")]
        placed = _transformer_targets(family, transformer, denoiser)
        if denoiser and not placed:
            raise ValueError(
                f"none of the file's {len(denoiser)} denoiser modules (e.g. {denoiser[:3]}) is a {family.title} "
                f"layer of this {type(transformer).__name__}: the file is probably for another model")
        targets = every_layer(encoders, None, family) + placed
    else:
        encoders = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2")]
        encoders = [te for te in encoders if te is not None]
        targets = every_layer(encoders, getattr(pipe, "unet", None))
    found = match_file(state_dict, targets, axis_from_metadata(metadata))
    check_coverage(found, targets, allow_partial, "allow_partial=True")
    patched = [t for t in targets if t.lora_name in found.specs]
    report = (f"dora_network: applying {len(patched)} of the file's {len(patched) + len(found.unmatched)} modules "
              f"({sum(s.dora for s in found.specs.values())} DoRA) at strength {strength}; ")
    logger.info(report + (f"{len(found.unmatched)} skipped" if found.unmatched else "all matched"))
    patch = DoRAPatch(patched, found.specs, found.state_dict, found.unmatched, backup_device)
    try:
        patch.set_strength(strength)
    except BaseException:
        patch.remove()  # never leave a half-patched pipeline behind
        raise
    return patch
