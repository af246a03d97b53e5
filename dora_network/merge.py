"""Bake adapters into base weights (``merge_to``, ``--network_pre_calc``) and undo it.

Merged weights are W(mu) = W0 + mu * (W' - W0), computed in float32 from the *unmerged* base weight and written
once in the base weight's dtype, so merged inference equals the unmerged forward with zero overhead.
"""

from __future__ import annotations

from typing import Iterable

import torch

from .layers import DoRAModule

__all__ = ["backup", "merge_into_base", "pre_calculate", "restore"]


@torch.no_grad()
def merge_into_base(modules: Iterable[DoRAModule]) -> int:
    """Write each adapter's W(mu) into its base layer's weight, where the weight lives; returns the count.

    The adapters must not also be patched into forward (a merged layer would then apply DoRA twice).
    """
    count = 0
    for module in modules:
        weight = module.base_weight
        weight.copy_(module.merged_weight().to(device=weight.device, dtype=weight.dtype))
        count += 1
    return count


@torch.no_grad()
def backup(modules: Iterable[DoRAModule], store: dict[str, torch.Tensor]) -> None:
    """Keep a copy of each base weight (once) so :func:`restore` can put it back exactly."""
    for module in modules:
        store.setdefault(module.lora_name, module.base_weight.detach().clone())


@torch.no_grad()
def restore(modules: Iterable[DoRAModule], store: dict[str, torch.Tensor]) -> None:
    """Put the backed-up base weights back and re-enable the adapters' forward."""
    for module in modules:
        if module.precalculated:
            module.base_weight.copy_(store[module.lora_name])
            module.precalculated = False


@torch.no_grad()
def pre_calculate(modules: Iterable[DoRAModule], store: dict[str, torch.Tensor]) -> None:
    """Bake W(mu) into each base weight (from the backed-up original) and bypass the adapter in forward."""
    modules = list(modules)
    backup(modules, store)
    restore(modules, store)
    for module in modules:
        weight = module.base_weight
        weight.copy_(module.merged_weight().to(weight.dtype))
        module.precalculated = True
