"""The LyCORIS key layout, and what a file says about each module: rank, alpha, conv kind, Tucker, DoRA, axis.

Per module ``<lora_name>``: ``.lora_down.weight`` (r, in[, kh, kw]), ``.lora_up.weight`` (out, r[, 1, 1]),
optional ``.lora_mid.weight`` (r, r, kh, kw), ``.alpha`` (scalar) and, for DoRA, ``.dora_scale`` of shape
(1, in[, 1, 1]) (per input column) or (out, 1[, 1, 1]) (per output row). The shape of ``dora_scale`` is the only
reliable record of the axis (LyCORIS' default flipped in 3.2.0 and older files carry no metadata for it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "ALPHA",
    "DORA_SCALE",
    "DOWN",
    "MID",
    "UP",
    "ModuleSpec",
    "group_by_module",
    "infer_spec",
    "axis_from_metadata",
    "normalize_dora_scale",
]

DOWN = "lora_down.weight"
UP = "lora_up.weight"
MID = "lora_mid.weight"
ALPHA = "alpha"
DORA_SCALE = "dora_scale"
SUFFIXES = (DOWN, UP, MID, ALPHA, DORA_SCALE)


@dataclass(frozen=True)
class ModuleSpec:
    """What a file holds for one module.

    Attributes:
        rank: r, from ``lora_down``.
        alpha: the stored alpha (r if the file has none, as kohya reads it).
        dora: whether ``dora_scale`` is present.
        wd_on_out: the DoRA axis read from ``dora_scale``'s shape (None for plain LoRA, and for a 1-D
            ``dora_scale`` on a square layer, whose shape cannot tell the axis).
        tucker: whether ``lora_mid`` is present.
        kernel: (kh, kw) of the adapted conv, None for Linear.
        in_dim / out_dim: the base layer's channels as implied by the tensors.
    """

    rank: int
    alpha: float
    dora: bool
    wd_on_out: bool | None
    tucker: bool
    kernel: tuple[int, int] | None
    in_dim: int
    out_dim: int


def group_by_module(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Split ``<name>.<suffix>`` keys into ``{name: {suffix: tensor}}``; returns the unrecognised keys too."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        name, _, suffix = key.partition(".")
        if suffix in SUFFIXES:
            groups.setdefault(name, {})[suffix] = tensor
        else:
            unknown.append(key)
    return groups, unknown


def infer_spec(name: str, tensors: dict[str, torch.Tensor]) -> ModuleSpec:
    """Read one module's configuration from its tensors.

    Raises:
        ValueError: ``lora_down``/``lora_up`` missing or with inconsistent shapes.
    """
    down, up = tensors.get(DOWN), tensors.get(UP)
    if down is None or up is None:
        missing = DOWN if down is None else UP
        raise ValueError(f"module '{name}' has no '{missing}' tensor; the file is incomplete or not a LoRA/DoRA file")
    mid = tensors.get(MID)
    _check_pair(name, down, up, mid)
    rank = int(down.shape[0])
    if down.ndim == 2:
        kernel = None
    elif mid is not None:
        kernel = (int(mid.shape[2]), int(mid.shape[3]))
    else:
        kernel = (int(down.shape[2]), int(down.shape[3]))
    in_dim, out_dim = int(down.shape[1]), int(up.shape[0])
    alpha_tensor = tensors.get(ALPHA)
    if alpha_tensor is not None and alpha_tensor.numel() != 1:
        raise ValueError(f"module '{name}': alpha must be a single number, got shape {tuple(alpha_tensor.shape)}")
    alpha = float(alpha_tensor.float()) if alpha_tensor is not None else 0.0
    if alpha < 0:
        raise ValueError(f"module '{name}': alpha is {alpha}; it must be positive (0 means alpha = rank)")
    alpha = alpha or float(rank)  # kohya: a missing or zero alpha means alpha = rank
    scale = tensors.get(DORA_SCALE)
    ndim = 2 if kernel is None else 4
    wd_on_out = None if scale is None else _axis_from_shape(name, tuple(scale.shape), out_dim, in_dim, ndim)
    return ModuleSpec(rank, alpha, scale is not None, wd_on_out, mid is not None, kernel, in_dim, out_dim)


def _check_pair(name: str, down: torch.Tensor, up: torch.Tensor, mid: torch.Tensor | None) -> None:
    """LyCORIS shapes: down (r, in[, kh, kw]), up (out, r[, 1, 1]), Tucker mid (r, r, kh, kw) with a 1x1 down."""
    linear = down.ndim == 2 and up.ndim == 2 and mid is None
    conv = down.ndim == 4 and up.ndim == 4 and tuple(up.shape[2:]) == (1, 1)
    if mid is not None:
        conv = conv and mid.ndim == 4 and tuple(down.shape[2:]) == (1, 1) and tuple(mid.shape[:2]) == (
            down.shape[0], down.shape[0])
    if not (linear or conv) or up.shape[1] != down.shape[0] or min(down.shape) < 1 or min(up.shape) < 1:
        shapes = f"lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)}"
        if mid is not None:
            shapes += f" and lora_mid {tuple(mid.shape)}"
        raise ValueError(
            f"module '{name}': {shapes} do not form a rank-r pair (expected (r, in[, kh, kw]) and (out, r[, 1, 1]), "
            f"Tucker: (r, in, 1, 1), (r, r, kh, kw), (out, r, 1, 1))"
        )


def _axis_from_shape(name: str, shape: tuple[int, ...], out_dim: int, in_dim: int, ndim: int) -> bool | None:
    """True for per-output-row magnitudes, False for per-input-column, from ``dora_scale``'s shape.

    A multi-dimensional ``dora_scale`` must have the layer's own rank (2 for Linear, 4 for Conv2d), as LyCORIS
    writes it; only 1-D ones are reshaped (loading.match_file).
    """
    if len(shape) == 1:
        if shape[0] == out_dim and out_dim != in_dim:
            return True
        if shape[0] == in_dim and out_dim != in_dim:
            return False
        if shape[0] == out_dim:  # square layer: undecidable from the shape; loading.match_file resolves it
            return None
    elif len(shape) == ndim:
        if shape[0] == out_dim and all(s == 1 for s in shape[1:]) and not (shape[0] == 1 and shape[1] == in_dim):
            return True
        if shape[0] == 1 and shape[1] == in_dim and all(s == 1 for s in shape[2:]):
            return False
    ones = ", 1" * (ndim - 2)
    raise ValueError(
        f"module '{name}': dora_scale has shape {shape}, which fits neither (out, 1{ones}) = ({out_dim}, 1{ones}) "
        f"nor (1, in{ones}) = (1, {in_dim}{ones}); the file does not belong to this layer"
    )


def normalize_dora_scale(name: str, tensor: torch.Tensor, spec: ModuleSpec) -> torch.Tensor:
    """Reshape a 1-D ``dora_scale`` to LyCORIS' 2-D/4-D shape along ``spec``'s (resolved) axis."""
    ndim = 2 if spec.kernel is None else 4
    if tensor.ndim == ndim:
        return tensor
    if tensor.ndim != 1 and tensor.numel() not in (spec.in_dim, spec.out_dim):
        raise ValueError(f"module '{name}': dora_scale shape {tuple(tensor.shape)} cannot be reshaped")
    if spec.wd_on_out:
        return tensor.reshape((-1,) + (1,) * (ndim - 1))
    return tensor.reshape((1, -1) + (1,) * (ndim - 2))


def axis_from_metadata(metadata: dict[str, str] | None) -> bool | None:
    """The DoRA axis a file's metadata records (ours, or the user's ``wd_on_out(put)`` in ``ss_network_args``)."""
    import json

    metadata = metadata or {}
    recorded = metadata.get("dora_network.wd_on_out")
    if recorded in ("True", "False"):
        return recorded == "True"
    try:
        network_args = json.loads(metadata.get("ss_network_args") or "{}")
    except ValueError:
        return None
    for key in ("wd_on_out", "wd_on_output"):
        value = str(network_args.get(key, "")).strip().lower() if isinstance(network_args, dict) else ""
        if value in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value in ("true", "1", "yes", "on")
    return None
