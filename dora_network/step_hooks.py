"""What sd-scripts calls on the network once per training step, besides forward: norm statistics and max-norm.

``train_network.py`` calls ``update_grad_norms()`` and ``update_norms()`` after every backward (when the network
has them), then reads ``weight_norms()``, ``grad_norms()`` and ``combined_weight_norms()`` with ``.mean().item()``
for its progress bar and logs; ``--scale_weight_norms`` calls ``apply_max_norm_regularization`` after every
optimizer step. At SDXL size that is ~800 layers per call, so each function here costs O(r (in + out)) per layer
and forms no weight-sized tensor: norms of s B A come from r x r Gram matrices, the DoRA weight's norm from the
axis norms the forward already computed. (Forming B A or W' per layer here cost 47 s per step on full-size SDXL.)
"""

from __future__ import annotations

from typing import Sequence

import torch

from .layers import DoRAModule

__all__ = ["dora_weight_norms", "grad_norms", "lowrank_norms", "max_norm_regularize"]


@torch.no_grad()
def lowrank_norms(modules: Sequence[DoRAModule]) -> torch.Tensor | None:
    """||s B A||_F of every adapter (one float32 value each), or None without adapters."""
    if not modules:
        return None
    return torch.stack([m.lowrank_norm().to(torch.float32) for m in modules])


@torch.no_grad()
def dora_weight_norms(modules: Sequence[DoRAModule]) -> torch.Tensor | None:
    """||W'||_F of every DoRA adapter (plain-LoRA adapters have no W' and are left out), or None if none is DoRA."""
    norms = [m.dora_weight_norm().to(torch.float32) for m in modules if m.dora]
    return torch.stack(norms) if norms else None


@torch.no_grad()
def grad_norms(modules: Sequence[DoRAModule]) -> torch.Tensor | None:
    """The L2 norm of each adapter's whole gradient (all its parameters together); None when no gradient exists.

    Adapters without any gradient (e.g. skipped by module dropout with ``set_to_none`` grads) are left out.
    """
    grads: list[torch.Tensor] = []
    owners: list[int] = []
    for index, module in enumerate(modules):
        for param in module.parameters():
            if param.grad is not None:
                grads.append(param.grad)
                owners.append(index)
    if not grads:
        return None
    squares = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]).square()
    device = squares.device
    per_module = torch.zeros(len(modules), device=device, dtype=torch.float32)
    per_module.index_add_(0, torch.tensor(owners, device=device), squares)
    present = torch.tensor(sorted(set(owners)), device=device)  # from the host list: no device sync
    return per_module[present].sqrt()


@torch.no_grad()
def max_norm_regularize(modules: Sequence[DoRAModule], max_norm: float) -> tuple[int, float, float]:
    """Scale B and A (and T) of every adapter whose ||s B A||_F exceeds ``max_norm`` (``--scale_weight_norms``).

    One host sync for the whole network (the norms are read once), not one per layer.

    Returns:
        (number of adapters scaled, mean norm after scaling, max norm after scaling), as Python numbers.
    """
    if not modules:
        return 0, 0.0, 0.0
    norms = lowrank_norms(modules).tolist()
    scaled, kept = 0, []
    for module, norm in zip(modules, norms):
        ratio = min(norm, max_norm) / norm if norm > 0 else 1.0
        if ratio < 1.0:
            factor = ratio ** (1.0 / (3 if module.use_tucker else 2))
            module.lora_up.weight.mul_(factor)
            module.lora_down.weight.mul_(factor)
            if module.use_tucker:
                module.lora_mid.weight.mul_(factor)
            scaled += 1
        kept.append(norm * ratio)
    return scaled, sum(kept) / len(kept), max(kept)
