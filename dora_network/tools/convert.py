"""Convert LoRA/DoRA files between layouts, each conversion returning its measured error (never silently lossy).

Exact conversions (the adapted weights do not change; the reported error is 0 or float rounding):

* :func:`reshape_dora_scale`: 1-D ``dora_scale`` -> LyCORIS' (1, in[, 1, 1]) / (out, 1[, 1, 1]).
* :func:`fold_alpha`: ``lora_up *= alpha / rank`` and ``alpha = rank`` (what old SD.Next needs).
* :func:`convert_unet_names`: SDXL UNet names SAI (``input_blocks_4_1_...``) <-> diffusers (``down_blocks_1_...``),
  worked out on the underscore names alone from ``unet_names``' SDXL block table (no model needed).
* :func:`classic_text_encoder_names`: ``lora_te1_encoder_...`` (transformers 5) -> ``lora_te1_text_model_encoder_...``.
* :func:`cast_dtype`: fp32 <-> fp16/bf16 (exact when widening; narrowing reports the rounding error).

Approximate conversions (need the base weights W0, see ``inspect.load_base_model``):

* :func:`dora_to_lora`: plain LoRA of a chosen rank, by truncated SVD of W' - W0 per module. A LoRA at strength s
  then gives W0 + s (W' - W0), which is exactly what every UI computes for the DoRA at strength s.
* :func:`change_axis`: DoRA with the other magnitude axis: B, A re-fitted by truncated SVD and the new magnitude
  solved exactly per row/column (alternating a few rounds), so that m2 * V2 / ||V2|| approximates W'.

Every function returns a :class:`ConversionResult` with ``max_abs_error`` and ``rel_error``; :func:`convert_file`
chains them and writes atomically with ``io.save_file``, keeping the metadata and adding
``dora_network.converted_from``.

Example::

    dora-convert trained.safetensors fixed.safetensors --dora_scale_2d --fold_alpha --unet_names sai
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from .. import functional as DF
from ..io import load_file, safetensors_hashes, save_file
from ..keys import ALPHA, DORA_SCALE, DOWN, MID, UP, ModuleSpec, group_by_module, infer_spec
from ..unet_names import diffusers_to_sai, sai_to_diffusers
from .inspect import BaseModel, load_base_model, setup_logging

logger = logging.getLogger(__name__)

__all__ = [
    "ConversionResult",
    "cast_dtype",
    "change_axis",
    "classic_text_encoder_names",
    "convert_file",
    "convert_unet_names",
    "dora_to_lora",
    "fold_alpha",
    "main",
    "reshape_dora_scale",
    "unet_lora_name",
]

CONVERTED_FROM = "dora_network.converted_from"
DTYPES = {"float": torch.float32, "fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


@dataclass
class ConversionResult:
    """What one conversion did and how far the adapted weights moved.

    Attributes:
        operation: e.g. ``"fold_alpha"``, ``"dora_to_lora(rank=4)"``.
        exact: the conversion is exact in exact arithmetic (the errors are float rounding, or 0).
        max_abs_error: max |after - before| of the compared quantity over all changed modules.
        rel_error: overall relative Frobenius error, sqrt(sum ||after - before||^2) / sqrt(sum ||before||^2).
        worst_module_rel_error: the largest per-module relative error.
        compared: what was compared (e.g. "W' - W0", "s*B*A and dora_scale", "tensors").
        modules_changed: modules whose tensors or names changed.
        per_module: changed module -> relative error (after the conversion's names).
        notes: anything the user should know (clamped ranks, Tucker cores dropped, ...).
        state_dict: the converted tensors (not in ``to_dict``).
    """

    operation: str
    exact: bool
    max_abs_error: float
    rel_error: float
    worst_module_rel_error: float
    compared: str
    modules_changed: int
    per_module: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["state_dict"]
        return data

    def summary(self) -> str:
        kind = "exact" if self.exact else "approximate"
        worst = max(self.per_module.items(), key=lambda kv: kv[1], default=None)
        text = (f"{self.operation}: {kind}; {self.modules_changed} modules changed; {self.compared}: max |error| "
                f"{self.max_abs_error:.3g}, relative error {self.rel_error:.3g}")
        if worst is not None and worst[1] > 0:
            text += f" (worst module {worst[1]:.3g}: {worst[0]})"
        return text


class _ErrorMeter:
    """Accumulates per-module differences between a reference and a converted quantity (in float64)."""

    def __init__(self) -> None:
        self.max_abs = 0.0
        self.diff_sq = 0.0
        self.ref_sq = 0.0
        self.per_module: dict[str, float] = {}

    def add(self, name: str, before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> None:
        diff_sq = ref_sq = 0.0
        for b, a in zip(before, after):
            diff = a.double().reshape(-1) - b.double().reshape(-1)
            if diff.numel():
                self.max_abs = max(self.max_abs, float(diff.abs().max()))
            diff_sq += float(diff.pow(2).sum())
            ref_sq += float(b.double().pow(2).sum())
        self.diff_sq += diff_sq
        self.ref_sq += ref_sq
        self.per_module[name] = math.sqrt(diff_sq / ref_sq) if ref_sq > 0 else math.sqrt(diff_sq)

    def result(self, operation: str, exact: bool, compared: str, state_dict: dict[str, torch.Tensor],
               changed: int, notes: list[str] | None = None) -> ConversionResult:
        rel = math.sqrt(self.diff_sq / self.ref_sq) if self.ref_sq > 0 else math.sqrt(self.diff_sq)
        worst = max(self.per_module.values(), default=0.0)
        return ConversionResult(operation, exact, self.max_abs, rel, worst, compared, changed,
                                dict(self.per_module), list(notes or []), state_dict)


def _progress(items: Iterable[Any], enabled: bool, desc: str, total: int) -> Iterable[Any]:
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with sd-scripts and our [train] extra; without it, no bar
        return items
    return tqdm(items, desc=desc, total=total, unit="module")


def _specs(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, ModuleSpec],
                                                            list[str]]:
    groups, unknown = group_by_module(dict(state_dict))
    return groups, {name: infer_spec(name, tensors) for name, tensors in groups.items()}, unknown


def _flatten(groups: Mapping[str, Mapping[str, torch.Tensor]], unknown: Sequence[str],
             state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {f"{name}.{suffix}": tensor for name, tensors in groups.items() for suffix, tensor in tensors.items()}
    out.update({key: state_dict[key] for key in unknown})
    return out


def _delta(tensors: Mapping[str, torch.Tensor], spec: ModuleSpec) -> torch.Tensor:
    """s * B A in float64 (as stored; the reference for exact conversions)."""
    mid = tensors.get(MID)
    return DF.lowrank_delta(tensors[UP].double(), tensors[DOWN].double(), spec.alpha / spec.rank,
                            None if mid is None else mid.double())


# -- exact conversions --------------------------------------------------------------------------------------------
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
    groups, specs, unknown = _specs(state_dict)
    known: set[str] = set()
    for name, tensors in groups.items():
        scale, spec = tensors.get(DORA_SCALE), specs[name]
        if scale is not None and (scale.ndim != 1 or spec.in_dim != spec.out_dim):
            known.add("out" if spec.wd_on_out else "in")
    stored = (metadata or {}).get("dora_network.wd_on_out")
    hint = axis or ({"True": "out", "False": "in"}.get(stored or "")) or (known.pop() if len(known) == 1 else None)
    meter, notes = _ErrorMeter(), []
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
    return meter.result("dora_scale_2d", True, "dora_scale values", _flatten(groups, unknown, state_dict),
                        len(meter.per_module), notes)


def fold_alpha(state_dict: Mapping[str, torch.Tensor]) -> ConversionResult:
    """Scale ``lora_up`` by alpha/rank and store alpha = rank, so s B A (hence W') is unchanged.

    A missing alpha (kohya reads it as rank) is written out explicitly. Exact in exact arithmetic; in float the
    new ``lora_up`` is rounded once (zero error when alpha/rank is a power of two), which is what is reported:
    s B A before vs after, in float64.
    """
    groups, specs, unknown = _specs(state_dict)
    meter, notes, added = _ErrorMeter(), [], 0
    for name, tensors in groups.items():
        spec = specs[name]
        old_alpha = tensors.get(ALPHA)
        if old_alpha is not None and float(old_alpha.float()) == spec.rank:
            continue
        before = _delta(tensors, spec)
        factor = spec.alpha / spec.rank
        up = tensors[UP]
        tensors[UP] = (up.double() * factor).to(up.dtype)
        dtype = torch.float32 if old_alpha is None else old_alpha.dtype
        tensors[ALPHA] = torch.tensor(float(spec.rank), dtype=dtype)
        added += old_alpha is None
        meter.add(name, [before], [_delta(tensors, infer_spec(name, tensors))])
    if added:
        notes.append(f"{added} modules had no alpha (read as alpha = rank); it is now stored")
    return meter.result("fold_alpha", True, "s*B*A", _flatten(groups, unknown, state_dict),
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
    groups, specs, unknown = _specs(state_dict)
    meter = _ErrorMeter()
    exact = True
    for name, tensors in groups.items():
        before_delta = _delta(tensors, specs[name])
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
            after = [_delta(tensors, specs[name])] + ([] if before_scale is None else [tensors[DORA_SCALE]])
            meter.add(name, before, after)
    name = str(dtype).replace("torch.", "")
    return meter.result(f"dtype({name}, dora_scale {str(scale_dtype).replace('torch.', '')})", exact,
                        "s*B*A and dora_scale", _flatten(groups, unknown, state_dict), len(meter.per_module))


def _block_pairs() -> list[tuple[str, str, bool]]:
    """(SAI dotted prefix, diffusers dotted prefix, is_resnet) for every SDXL UNet block, via ``unet_names``."""
    candidates = ["time_embed.0", "time_embed.2", "label_emb.0.0", "label_emb.0.2", "out.0", "out.2",
                  "middle_block.0", "middle_block.1", "middle_block.2"]
    candidates += [f"input_blocks.{n}.{m}" for n in range(12) for m in range(2)]
    candidates += [f"input_blocks.{n}.0.op" for n in range(12)]
    candidates += [f"output_blocks.{n}.{m}" for n in range(9) for m in range(3)]
    candidates += [f"output_blocks.{n}.{m}.conv" for n in range(9) for m in range(1, 3)]
    pairs = []
    for sai in candidates:
        diff = sai_to_diffusers(sai)
        parent, _, leaf = sai.rpartition(".")
        if leaf in ("op", "conv") and sai_to_diffusers(parent) is not None:
            continue  # a child path of another block (conv_in.op), not a block of its own
        if diff is not None and diffusers_to_sai(diff) == sai:
            pairs.append((sai, diff, ".resnets." in diff))
    return pairs


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
    pairs = _block_pairs() if pairs is None else pairs
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
    """Rename every SDXL UNet module to SAI (``to="sai"``, sd-scripts/ComfyUI/A1111's spelling) or diffusers names.

    Raises:
        ValueError: an SD1/SD2 file (its block layout differs from SDXL's), a UNet name that is not SDXL's, or two
            modules that would get the same name.
    """
    groups, unknown = group_by_module(dict(state_dict))
    names = list(groups)
    if any(n.startswith("lora_te_") for n in names) or any(
            n.startswith(("lora_unet_down_blocks_3_", "lora_unet_up_blocks_3_")) for n in names):
        raise ValueError("this looks like an SD1/SD2 file (lora_te_ or a 4th down/up block); UNet name conversion "
                         "only knows SDXL's block layout")
    pairs = _block_pairs()
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
    return _ErrorMeter().result(f"unet_names({to})", True, "tensors (moved unchanged)",
                                _flatten(renamed, unknown, state_dict), changed)


def classic_text_encoder_names(state_dict: Mapping[str, torch.Tensor]) -> ConversionResult:
    """``lora_te1_encoder_...`` (names taken from a transformers-5 CLIPTextModel) -> ``lora_te1_text_model_encoder_...``,
    the spelling every UI maps (reference/loaders.md §5). Tensors are unchanged."""
    groups, _, unknown = _specs(state_dict)
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
    return _ErrorMeter().result("te_names(classic)", True, "tensors (moved unchanged)",
                                _flatten(renamed, unknown, state_dict), changed)


# -- approximate conversions --------------------------------------------------------------------------------------
def _targets(groups: Mapping[str, Mapping[str, torch.Tensor]], specs: Mapping[str, ModuleSpec], base: BaseModel,
             names: Iterable[str]) -> dict[str, torch.Tensor]:
    """W0 for each named module, checked against the file's shapes."""
    missing, weights = [], {}
    for name in names:
        if base.resolve(name) is None:
            missing.append(name)
            continue
        w0 = base.weight(name)
        spec = specs[name]
        kernel = None if w0.ndim == 2 else tuple(w0.shape[2:])
        if (int(w0.shape[0]), int(w0.shape[1]), kernel) != (spec.out_dim, spec.in_dim, spec.kernel):
            raise ValueError(f"module '{name}' does not fit the base model's layer of shape {tuple(w0.shape)}; "
                             f"is the file for another model?")
        weights[name] = w0
    if missing:
        raise ValueError(f"{len(missing)} DoRA modules have no layer in the base model '{base.description}', e.g. "
                         f"{missing[:3]}; the base weights are needed to compute W'")
    return weights


def _adapted(tensors: Mapping[str, torch.Tensor], spec: ModuleSpec, w0: torch.Tensor) -> torch.Tensor:
    """W' = m (W0 + dW) / (||W0 + dW|| + eps) in float32."""
    scale = tensors[DORA_SCALE]
    if scale.ndim == 1:
        raise ValueError("1-D dora_scale: run reshape_dora_scale (dora-convert --dora_scale_2d) first")
    mid = tensors.get(MID)
    delta = DF.lowrank_delta(tensors[UP].float(), tensors[DOWN].float(), spec.alpha / spec.rank,
                             None if mid is None else mid.float())
    return DF.dora_weight(w0.float(), delta, scale.float(), bool(spec.wd_on_out))


def _truncated(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B A the best rank-``rank`` approximation of a (out, n) matrix; singular values split evenly."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def _lora_tensors(b: torch.Tensor, a: torch.Tensor, w0: torch.Tensor, dtype: torch.dtype,
                  alpha_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    rank = b.shape[1]
    if w0.ndim == 4:
        up, down = b.reshape(b.shape[0], rank, 1, 1), a.reshape(rank, *w0.shape[1:])
    else:
        up, down = b, a
    return {DOWN: down.to(dtype).contiguous(), UP: up.to(dtype).contiguous(),
            ALPHA: torch.tensor(float(rank), dtype=alpha_dtype)}


def _rank_for(spec: ModuleSpec, w0: torch.Tensor, rank: int | None) -> tuple[int, bool]:
    full = min(int(w0.shape[0]), int(w0[0].numel()))
    wanted = spec.rank if rank is None else int(rank)
    if wanted < 1:
        raise ValueError(f"rank={rank}: must be a positive integer")
    return min(wanted, full), wanted > full


def dora_to_lora(state_dict: Mapping[str, torch.Tensor], base: Any, rank: int | None = None,
                 progress: bool = False) -> ConversionResult:
    """Replace every DoRA module by the plain LoRA closest to W' - W0 (truncated SVD, rank ``rank``).

    Plain LoRA modules are copied. The new modules have alpha = rank, no ``dora_scale`` and no ``lora_mid`` (a kxk
    conv becomes a LoCon pair: down (r, in, kh, kw), up (out, r, 1, 1)), in the dtype of the old ``lora_up``.

    Args:
        state_dict: the file's tensors (2-D/4-D ``dora_scale``).
        base: the base model (``inspect.load_base_model`` argument, e.g. "tiny" or a checkpoint path).
        rank: the new rank; None keeps each module's rank; clamped to min(out, in*kh*kw) (exact there).
        progress: show a tqdm bar.

    Returns:
        The result; errors compare the LoRA's update B A with W' - W0 (per-module and overall relative
        Frobenius error).

    Raises:
        ValueError: a DoRA module has no layer in the base model, or its shapes do not fit.
    """
    base = load_base_model(base)
    groups, specs, unknown = _specs(state_dict)
    dora = [n for n in groups if specs[n].dora]
    weights = _targets(groups, specs, base, dora)
    meter, clamped, tucker = _ErrorMeter(), 0, 0
    for name in _progress(dora, progress, "DoRA -> LoRA", len(dora)):
        tensors, spec, w0 = groups[name], specs[name], weights[name].float()
        target = _adapted(tensors, spec, w0) - w0  # W' - W0, what every UI adds at strength 1
        r, was_clamped = _rank_for(spec, w0, rank)
        clamped += was_clamped
        tucker += spec.tucker
        b, a = _truncated(target.flatten(1), r)
        alpha = tensors.get(ALPHA)
        groups[name] = _lora_tensors(b, a, w0, tensors[UP].dtype,
                                     torch.float32 if alpha is None else alpha.dtype)
        new_spec = infer_spec(name, groups[name])
        meter.add(name, [target], [_delta(groups[name], new_spec)])
    notes = []
    if clamped:
        notes.append(f"{clamped} modules: rank {rank} exceeds the layer's full rank; clamped (exact there)")
    if tucker:
        notes.append(f"{tucker} Tucker modules became plain LoCon pairs (no lora_mid)")
    label = "own rank" if rank is None else f"rank={rank}"
    return meter.result(f"dora_to_lora({label})", False, "W' - W0 vs B*A", _flatten(groups, unknown, state_dict),
                        len(dora), notes)


def _fit_axis(w_adapted: torch.Tensor, w0: torch.Tensor, rank: int, wd_on_out: bool,
              iterations: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Fit W2 = d * (W0 + B A) to W' with d one factor per row (out-axis) or column (in-axis).

    Alternates: B A = truncated SVD of W'/d - W0; then d per row/column by least squares (exact given V2). Keeps
    the best round. Returns (B, A, m2, residual norm) with m2 = d * (||V2|| + eps), so m2 V2 / (||V2|| + eps) = W2.
    """
    dims = DF.norm_dims(w0.ndim, wd_on_out)
    d = torch.ones_like(DF.weight_norm(w0, wd_on_out))
    good_enough = 1e-7 * float((w_adapted - w0).norm())
    best = None
    for _ in range(max(1, iterations)):
        b, a = _truncated((w_adapted / d - w0).flatten(1), rank)
        v2 = w0 + (b @ a).reshape(w0.shape)
        d = (v2 * w_adapted).sum(dim=dims, keepdim=True) / v2.pow(2).sum(dim=dims, keepdim=True).clamp_min(1e-30)
        residual = float((d * v2 - w_adapted).norm())
        if best is None or residual < best[3]:
            best = (b, a, d * (DF.weight_norm(v2, wd_on_out) + DF.EPS), residual)
        if residual <= good_enough:
            break
    assert best is not None
    return best


def change_axis(state_dict: Mapping[str, torch.Tensor], base: Any, wd_on_out: bool, rank: int | None = None,
                iterations: int = 2, progress: bool = False) -> ConversionResult:
    """Re-fit every DoRA module of the other axis to ``wd_on_out`` (False: in-axis, what every UI applies exactly).

    W' of the old module is approximated by W2 = m2 V2 / ||V2|| with V2 = W0 + B2 A2 (alpha = rank) and m2 along
    the new axis: B2 A2 by truncated SVD, m2 solved exactly, alternated ``iterations`` times. The residual
    ||W2 - W'|| / ||W' - W0|| is reported; it shrinks with the rank (0 at full rank).

    Args:
        state_dict: the file's tensors (2-D/4-D ``dora_scale``).
        base: the base model (see :func:`dora_to_lora`).
        wd_on_out: the new axis.
        rank: the new rank; None keeps each module's rank.
        iterations: alternating rounds (the first is SVD-refit + exact magnitude; measured, later rounds gain
            under 1% of the residual, which is dominated by what the other axis cannot express).
        progress: show a tqdm bar.

    Raises:
        ValueError: a module has no layer in the base model, or its shapes do not fit.
    """
    base = load_base_model(base)
    groups, specs, unknown = _specs(state_dict)
    todo = [n for n in groups if specs[n].dora and bool(specs[n].wd_on_out) != wd_on_out]
    weights = _targets(groups, specs, base, todo)
    meter, clamped, tucker = _ErrorMeter(), 0, 0
    axis = "out" if wd_on_out else "in"
    for name in _progress(todo, progress, f"DoRA -> {axis}-axis", len(todo)):
        tensors, spec, w0 = groups[name], specs[name], weights[name].float()
        w_adapted = _adapted(tensors, spec, w0)
        r, was_clamped = _rank_for(spec, w0, rank)
        clamped += was_clamped
        tucker += spec.tucker
        b, a, magnitude, _ = _fit_axis(w_adapted, w0, r, wd_on_out, iterations)
        alpha = tensors.get(ALPHA)
        new = _lora_tensors(b, a, w0, tensors[UP].dtype, torch.float32 if alpha is None else alpha.dtype)
        new[DORA_SCALE] = magnitude.to(tensors[DORA_SCALE].dtype).contiguous()
        groups[name] = new
        w2 = _adapted(new, infer_spec(name, new), w0)
        meter.add(name, [w_adapted - w0], [w2 - w0])
    notes = []
    if clamped:
        notes.append(f"{clamped} modules: rank {rank} exceeds the layer's full rank; clamped")
    if tucker:
        notes.append(f"{tucker} Tucker modules became plain LoCon pairs (no lora_mid)")
    return meter.result(f"to_axis({axis}, {'own rank' if rank is None else f'rank={rank}'})", False,
                        "W' - W0 vs W2 - W0", _flatten(groups, unknown, state_dict), len(todo), notes)


# -- files --------------------------------------------------------------------------------------------------------
def _update_metadata(metadata: dict[str, str], state_dict: Mapping[str, torch.Tensor], source: str,
                     results: Sequence[ConversionResult]) -> dict[str, str]:
    out = dict(metadata)
    groups, specs, _ = _specs(state_dict)
    axes = {bool(s.wd_on_out) for s in specs.values() if s.dora}
    if "dora_network.algo" in out:
        out["dora_network.algo"] = "dora" if axes else "lora"
    if "dora_network.wd_on_out" in out:
        out["dora_network.wd_on_out"] = "mixed" if len(axes) > 1 else str(axes.pop()) if axes else "None"
    ranks = {s.rank for s in specs.values()}
    alphas = {s.alpha for s in specs.values()}
    if "ss_network_dim" in out and len(ranks) == 1:
        out["ss_network_dim"] = str(ranks.pop())
    if "ss_network_alpha" in out and len(alphas) == 1:
        out["ss_network_alpha"] = f"{alphas.pop():g}"
    out[CONVERTED_FROM] = json.dumps({
        "source": os.path.basename(source),
        "sshs_model_hash": metadata.get("sshs_model_hash"),
        "operations": [{"operation": r.operation, "exact": r.exact, "max_abs_error": r.max_abs_error,
                        "rel_error": r.rel_error} for r in results],
    })
    if "sshs_model_hash" in out or "sshs_legacy_hash" in out:  # the tensors changed: stale hashes would lie
        out["sshs_model_hash"], out["sshs_legacy_hash"] = safetensors_hashes(state_dict, out)
    return out


def convert_file(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    dora_scale_2d: bool = False,
    axis: str | None = None,
    te_names: bool = False,
    unet_names: str | None = None,
    to_lora: bool = False,
    to_axis: str | None = None,
    rank: int | None = None,
    fold_alpha_to_rank: bool = False,
    dtype: torch.dtype | None = None,
    dora_scale_dtype: torch.dtype | None = torch.float32,
    model: Any = None,
    overwrite: bool = False,
    progress: bool = False,
) -> list[ConversionResult]:
    """Apply the chosen conversions in a fixed order and write the result atomically.

    Order: 1-D ``dora_scale`` reshape, text-encoder names, UNet names, DoRA -> LoRA or axis change, alpha fold,
    dtype. Arguments as in the functions above; ``model`` is needed by ``to_lora``/``to_axis``.

    Returns:
        One :class:`ConversionResult` per conversion, in order (their ``state_dict`` is the final one's input).

    Raises:
        ValueError: nothing to do, contradictory options, a missing model, or a conversion's own errors.
        FileExistsError: ``destination`` exists and ``overwrite`` is False.
    """
    if to_lora and to_axis:
        raise ValueError("to_lora and to_axis exclude each other: a plain LoRA has no axis")
    if to_axis not in (None, "in", "out"):
        raise ValueError(f"to_axis={to_axis!r}: use 'in' or 'out'")
    if (to_lora or to_axis) and model is None:
        raise ValueError("to_lora/to_axis need the base weights: pass --model (tiny, a diffusers folder or a "
                         ".safetensors checkpoint)")
    if rank is not None and not (to_lora or to_axis):
        raise ValueError("--rank only applies to --to_lora and --to_axis")
    dst = Path(destination)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"'{dst}' exists; pass --overwrite to replace it")
    state_dict, metadata = load_file(source)
    base = load_base_model(model) if (to_lora or to_axis) else None
    steps: list[tuple[bool, Any]] = [
        (dora_scale_2d, lambda sd: reshape_dora_scale(sd, metadata, axis)),
        (te_names, classic_text_encoder_names),
        (unet_names is not None, lambda sd: convert_unet_names(sd, unet_names)),
        (to_lora, lambda sd: dora_to_lora(sd, base, rank, progress)),
        (to_axis is not None, lambda sd: change_axis(sd, base, to_axis == "out", rank, progress=progress)),
        (fold_alpha_to_rank, fold_alpha),
        (dtype is not None, lambda sd: cast_dtype(sd, dtype, dora_scale_dtype)),
    ]
    if not any(enabled for enabled, _ in steps):
        raise ValueError("no conversion chosen; see dora-convert --help")
    results: list[ConversionResult] = []
    for enabled, step in steps:
        if enabled:
            result = step(state_dict)
            logger.info("%s", result.summary())
            state_dict = result.state_dict
            results.append(result)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file(dst, tensors, _update_metadata(metadata, tensors, str(source), results))
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dora-convert",
        description="Convert a LoRA/DoRA file. Exact: --dora_scale_2d, --fold_alpha, --unet_names, --te_names, "
                    "widening --save_precision. Approximate (needs --model for the base weights): --to_lora, "
                    "--to_axis. Every conversion prints its measured error; the file keeps its metadata and gains "
                    "dora_network.converted_from.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  # make a file every UI applies the same way (2-D dora_scale, alpha == rank, SAI names)\n"
               "  dora-convert in.safetensors out.safetensors --dora_scale_2d --fold_alpha --unet_names sai\n"
               "  # out-axis (LyCORIS default) -> in-axis, re-fitted at rank 32\n"
               "  dora-convert lyco.safetensors in_axis.safetensors --to_axis in --rank 32 "
               "--model sd_xl_base_1.0.safetensors\n"
               "  # plain LoRA for diffusers, rank 64\n"
               "  dora-convert dora.safetensors lora.safetensors --to_lora --rank 64 --model sd_xl_base_1.0.safetensors\n\n"
               "--model accepts 'tiny', a local diffusers folder or a .safetensors checkpoint (SAI single-file or\n"
               "diffusers UNet keys; weights are read lazily).",
    )
    parser.add_argument("source", help="input .safetensors")
    parser.add_argument("destination", help="output .safetensors (written atomically)")
    parser.add_argument("--dora_scale_2d", action="store_true", help="reshape 1-D dora_scale to 2-D/4-D (exact)")
    parser.add_argument("--axis", choices=("in", "out"), default=None,
                        help="axis of 1-D dora_scale on square layers, if the file does not tell")
    parser.add_argument("--fold_alpha", action="store_true", help="scale lora_up by alpha/rank, set alpha = rank")
    parser.add_argument("--unet_names", choices=("sai", "diffusers"), default=None,
                        help="rename SDXL UNet modules to this spelling (exact)")
    parser.add_argument("--te_names", choices=("classic",), default=None,
                        help="rename transformers-5 text-encoder names to lora_te1_text_model_... (exact)")
    parser.add_argument("--to_lora", action="store_true", help="DoRA -> plain LoRA by truncated SVD (needs --model)")
    parser.add_argument("--to_axis", choices=("in", "out"), default=None,
                        help="re-fit DoRA modules to this magnitude axis (needs --model)")
    parser.add_argument("--rank", type=int, default=None, help="rank for --to_lora/--to_axis (default: keep)")
    parser.add_argument("--save_precision", choices=("float", "fp16", "bf16"), default=None,
                        help="dtype of lora_down/lora_up/lora_mid")
    parser.add_argument("--dora_scale_precision", choices=("float", "fp16", "bf16"), default="float",
                        help="dtype of dora_scale with --save_precision (default float)")
    parser.add_argument("--model", default=None, help="base model: tiny, a diffusers folder or a checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--verbose", action="store_true", help="log at INFO level")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``dora-convert``; returns 0, or 2 when the input, model or options are rejected."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        results = convert_file(
            args.source, args.destination, dora_scale_2d=args.dora_scale_2d, axis=args.axis,
            te_names=args.te_names is not None, unet_names=args.unet_names, to_lora=args.to_lora,
            to_axis=args.to_axis, rank=args.rank, fold_alpha_to_rank=args.fold_alpha,
            dtype=None if args.save_precision is None else DTYPES[args.save_precision],
            dora_scale_dtype=DTYPES[args.dora_scale_precision], model=args.model, overwrite=args.overwrite,
            progress=not args.json,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        logger.error("%s", error)
        return 2
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        for result in results:
            print(result.summary())
            for note in result.notes:
                print(f"  note: {note}")
        print(f"wrote {args.destination}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
