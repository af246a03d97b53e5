"""Test support: the DoRA weight a file describes, computed here in float64 from its tensors alone.

Independent of the package's math (functional.py): W(s) = W0 + s * (m V / (||V|| + eps) - W0),
V = W0 + (alpha / r) * up @ down (Tucker: up T down), the norm along the axis ``dora_scale``'s shape gives.
"""

from __future__ import annotations

import torch

EPS = float(torch.finfo(torch.float32).eps)


def explicit_weight(w0: torch.Tensor, t: dict[str, torch.Tensor], strength: float, dora: bool = True) -> torch.Tensor:
    """W0 + s * (m V / (||V|| + eps) - W0), V = W0 + (alpha/r) up down, in float64 (plain LoRA: W0 + s dW)."""
    w0 = w0.double()
    up, down = t["lora_up.weight"].double().flatten(1), t["lora_down.weight"].double()
    scale = float(t["alpha"]) / down.shape[0]
    if "lora_mid.weight" in t:
        delta = torch.einsum("oa,abhw,bi->oihw", up, t["lora_mid.weight"].double(), down.flatten(1))
    else:
        delta = (up @ down.flatten(1)).reshape(w0.shape)
    delta = scale * delta
    if not dora or "dora_scale" not in t:
        return w0 + strength * delta
    m = t["dora_scale"].double()
    keep = 0 if m.shape[0] == w0.shape[0] and m.shape[1] == 1 else 1
    v = w0 + delta
    norm = v.pow(2).sum(dim=[d for d in range(v.ndim) if d != keep], keepdim=True).sqrt()
    return w0 + strength * (m * v / (norm + EPS) - w0)
