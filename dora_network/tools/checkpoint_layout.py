"""Where adaptable layers live in checkpoint files: SAI single-file and diffusers keys -> our ``lora_name``s.

One mapping serves dora-inspect/dora-convert (base weights read from a checkpoint) and dora-merge (weights rewritten
in place). Layouts:

* SAI single file: UNet ``model.diffusion_model.<SAI path>.weight``; TE1 ``conditioner.embedders.0.transformer.
  [text_model.]<path>.weight`` (SD1: ``cond_stage_model.transformer.``, named ``lora_te``); TE2 in OpenCLIP form
  ``conditioner.embedders.1.model.transformer.resblocks.N.*``, whose fused ``attn.in_proj_weight`` (3d, d) holds
  q, k and v as row slices, and whose ``attn.out_proj`` / ``mlp.c_fc`` / ``mlp.c_proj`` are ``self_attn.out_proj``
  / ``mlp.fc1`` / ``mlp.fc2``.
* DiT single files: the denoiser under ``model.diffusion_model.`` (SD3.5, ComfyUI-saved FLUX.1) or bare (BFL's
  ``flux1-dev.safetensors``: ``double_blocks.*``, ``single_blocks.*``, ``img_in.*``, ..., whatever top-level modules
  the family's ``checkpoint_roots`` name); SD3.5's text encoders under ``text_encoders.clip_l|clip_g|t5xxl.
  transformer.`` (``lora_te1``/``lora_te2``/``lora_te3``; T5's attention ``SelfAttention.q|k|v|o`` and MLP
  ``DenseReluDense.wi_0|wi_1|wo`` weights).
* A diffusers UNet file (``down_blocks.*``, ``conv_in.*``, ..., optionally under ``unet.``).
* The files of a diffusers folder, one component each (``unet``, ``te1``, ``te2`` or ``te``): key = module path.

UNet layers are every 2-D/4-D weight; text-encoder layers are the 2-D attention and MLP weights (what
``targets.find_targets`` adapts), with paths in the classic ``text_model.`` form. Each layer becomes a
:class:`~dora_network.targets.Target` on a weightless stand-in module (for name matching and shape checks) plus the
:class:`Site` (s) its weight is stored at.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import torch
from torch import nn

from ..families import FAMILIES, SDXL, family_of_file
from ..targets import Target, _kind
from .safetensors_stream import read_header, read_tensor_at

__all__ = ["SAI_TE1", "SAI_TE2", "SAI_UNET", "SD_TE", "KeyLayer", "Site", "layers_of_key", "read_site",
           "scan_targets", "stand_in"]

SAI_UNET = "model.diffusion_model."
SAI_TE1 = "conditioner.embedders.0.transformer."
SAI_TE2 = "conditioner.embedders.1.model.transformer.resblocks."
SD_TE = "cond_stage_model.transformer."
#: SD3.5 single files: text encoder wrapper -> component
SAI_TEXT_ENCODERS = {"text_encoders.clip_l.transformer.": "te1", "text_encoders.clip_g.transformer.": "te2",
                     "text_encoders.t5xxl.transformer.": "te3"}
#: bare top-level denoiser modules of the families' original single files (BFL's FLUX.1 has no prefix)
_DIT_ROOTS = tuple(f"{root}." for family in FAMILIES for root in family.checkpoint_roots)
_T5_PARTS = (".SelfAttention.", ".DenseReluDense.")
_OPENCLIP = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_DIFFUSERS_UNET_PATHS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "conv_norm_out.",
                         "time_embedding.", "add_embedding.")


class KeyLayer(NamedTuple):
    """One adaptable layer stored in a checkpoint tensor: its component, dotted path and row slice (or None)."""

    component: str
    path: str
    rows: tuple[int, int] | None

    @property
    def lora_name(self) -> str:
        return f"lora_{self.component}.{self.path}".replace(".", "_")


@dataclass(frozen=True)
class Site:
    """Where a layer's weight lives: tensor ``key`` of file ``source``, rows ``rows`` (fused in_proj) or all."""

    source: Path
    key: str
    rows: tuple[int, int] | None


def stand_in(shape: Sequence[int]) -> nn.Module:
    """A weightless (meta) Linear/Conv2d of this weight shape: a Target for matching, a base for DoRAModule."""
    if len(shape) == 2:
        return nn.Linear(shape[1], shape[0], bias=False, device="meta")
    return nn.Conv2d(shape[1], shape[0], tuple(shape[2:]), bias=False, device="meta")


def _layer(component: str, path: str, ndim: int) -> list[KeyLayer]:
    """The layer at module ``path`` of ``component``, if adaptable (text encoders: 2-D attention/MLP weights)."""
    if ndim not in (2, 4):
        return []
    if component != "unet":
        if ndim != 2:
            return []
        if any(part in path for part in _T5_PARTS):
            return [KeyLayer(component, path, None)]
        if ".self_attn." not in path and ".mlp." not in path:
            return []
        path = path if path.startswith("text_model.") else "text_model." + path
    return [KeyLayer(component, path, None)]


def layers_of_key(key: str, shape: Sequence[int], component: str | None = None) -> list[KeyLayer]:
    """The adaptable layers stored in tensor ``key`` of shape ``shape``.

    Args:
        key: the tensor's key.
        shape: its shape.
        component: for a diffusers folder, the part the file belongs to ("unet", "te1", "te2", "te"); None for a
            single file (SAI keys or a diffusers UNet file).
    """
    if component is None and key.startswith(SAI_TE2):
        block, _, rest = key[len(SAI_TE2):].partition(".")
        prefix = f"text_model.encoder.layers.{block}."
        if len(shape) != 2:
            return []
        if rest == "attn.in_proj_weight":
            d = shape[0] // 3
            return [KeyLayer("te2", f"{prefix}self_attn.{p}_proj", (i * d, (i + 1) * d)) for i, p in enumerate("qkv")]
        part = rest[: -len(".weight")] if rest.endswith(".weight") else None
        return [KeyLayer("te2", prefix + _OPENCLIP[part], None)] if part in _OPENCLIP else []
    if not key.endswith(".weight"):
        return []
    path = key[: -len(".weight")]
    if component is not None:
        return _layer(component, path, len(shape))
    for prefix, part in ((SAI_TE1, "te1"), (SD_TE, "te"), (SAI_UNET, "unet"), *SAI_TEXT_ENCODERS.items()):
        if path.startswith(prefix):
            return _layer(part, path[len(prefix):], len(shape))
    if path.startswith(_DIT_ROOTS):
        return _layer("unet", path, len(shape))
    path = path[len("unet."):] if path.startswith("unet.") else path
    if path.startswith(_DIFFUSERS_UNET_PATHS) or path + "." in _DIFFUSERS_UNET_PATHS:
        return _layer("unet", path, len(shape))
    return []


def scan_targets(sources: Mapping[Path, str | None]) -> tuple[list[Target], dict[str, list[Site]]]:
    """Targets (on stand-ins) and weight sites of every layer in some safetensors files, from their headers only.

    Args:
        sources: file -> diffusers component (None: a single-file checkpoint).

    Returns:
        (targets in file order, lora_name -> sites); a layer has several sites when a component is saved in more
        than one variant (fp16, ...).
    """
    found: list[tuple[KeyLayer, nn.Module, Site]] = []
    for source, component in sources.items():
        for key, info in read_header(source)[0].items():
            if key == "__metadata__":
                continue
            shape = info["shape"]
            for layer in layers_of_key(key, shape, component):
                rows = layer.rows
                found.append((layer, stand_in([rows[1] - rows[0], shape[1]] if rows else shape),
                              Site(source, key, rows)))
    # the other spellings of the denoiser's names are its family's (SDXL's SAI/diffusers table when no DiT family
    # claims the names)
    family = family_of_file([layer.lora_name for layer, _, _ in found]) or SDXL
    targets: dict[str, Target] = {}
    sites: dict[str, list[Site]] = {}
    for layer, module, site in found:
        name = layer.lora_name
        aliases = family.unet_aliases(layer.path) if layer.component == "unet" else ()
        targets.setdefault(name, Target(name, module, layer.component, _kind(module), layer.path, aliases=aliases))
        sites.setdefault(name, []).append(site)
    return list(targets.values()), sites


def read_site(site: Site, header: tuple[dict, int] | None = None) -> torch.Tensor:
    """The weight stored at ``site`` (its rows of a fused tensor, copied out); ``header``: its file's, if read."""
    tensor = read_tensor_at(site.source, site.key, header)
    return tensor if site.rows is None else tensor[site.rows[0]:site.rows[1]].clone()
