"""A LoRA/DoRA state dict seen module by module: grouping with specs and back, each module's s·B·A and W', its axis.

Shared by the inspector (the file's axis) and the conversions (which rebuild modules and measure what moved).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .. import functional as DF
from ..keys import DORA_SCALE, DOWN, MID, UP, ModuleSpec, group_by_module, infer_spec

__all__ = ["adapted_weight", "file_axis", "flatten", "module_delta", "split_modules"]

Groups = dict[str, dict[str, torch.Tensor]]


def split_modules(state_dict: Mapping[str, torch.Tensor]) -> tuple[Groups, dict[str, ModuleSpec], list[str]]:
    """(module -> suffix -> tensor, module -> spec, keys that are not LoRA/DoRA tensors).

    Raises:
        ValueError: a module's tensors do not form a LoRA.
    """
    groups, unknown = group_by_module(dict(state_dict))
    return groups, {name: infer_spec(name, tensors) for name, tensors in groups.items()}, unknown


def flatten(groups: Mapping[str, Mapping[str, torch.Tensor]], unknown: Sequence[str],
            state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Modules back to ``<module>.<suffix>`` keys, with the unknown keys of ``state_dict`` carried over."""
    out = {f"{name}.{suffix}": tensor for name, tensors in groups.items() for suffix, tensor in tensors.items()}
    out.update({key: state_dict[key] for key in unknown})
    return out


def module_delta(tensors: Mapping[str, torch.Tensor], spec: ModuleSpec,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """s * B A (Tucker core included) in ``dtype``; float64 is the reference for exact conversions."""
    mid = tensors.get(MID)
    return DF.lowrank_delta(tensors[UP].to(dtype), tensors[DOWN].to(dtype), spec.alpha / spec.rank,
                            None if mid is None else mid.to(dtype))


def adapted_weight(tensors: Mapping[str, torch.Tensor], spec: ModuleSpec, w0: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W' = m (W0 + dW) / (||W0 + dW|| + eps) in ``dtype``.

    Raises:
        ValueError: a 1-D ``dora_scale`` (its axis may be unknown; reshape it first).
    """
    scale = tensors[DORA_SCALE]
    if scale.ndim == 1:
        raise ValueError("1-D dora_scale: run reshape_dora_scale (dora-convert --dora_scale_2d) first")
    return DF.dora_weight(w0.to(dtype), module_delta(tensors, spec, dtype), scale.to(dtype), bool(spec.wd_on_out))


def file_axis(metadata: Mapping[str, str] | None, groups: Mapping[str, Mapping[str, torch.Tensor]],
              specs: Mapping[str, ModuleSpec]) -> str | None:
    """The file's DoRA axis ("in"/"out") for 1-D ``dora_scale``s on square layers, whose shape does not tell.

    From the ``dora_network.wd_on_out`` metadata, else the axis every module whose ``dora_scale`` tells it shares
    (2-D/4-D, or 1-D on a non-square layer); None when neither decides.
    """
    stored = (metadata or {}).get("dora_network.wd_on_out")
    if stored in ("True", "False"):
        return "out" if stored == "True" else "in"
    known = set()
    for name, spec in specs.items():
        scale = groups[name].get(DORA_SCALE)
        if scale is not None and (scale.ndim != 1 or spec.in_dim != spec.out_dim):
            known.add("out" if spec.wd_on_out else "in")
    return known.pop() if len(known) == 1 else None
