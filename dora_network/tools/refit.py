"""Approximate conversions, re-fitted by truncated SVD against the base weights W0 (never silently lossy).

* :func:`dora_to_lora`: plain LoRA of a chosen rank, by truncated SVD of W' - W0 per module. A LoRA at strength s
  then gives W0 + s (W' - W0), which is exactly what every UI computes for the DoRA at strength s.
* :func:`change_axis`: DoRA with the other magnitude axis: B, A re-fitted by truncated SVD and the new magnitude
  solved exactly per row/column (alternating a few rounds), so that m2 * V2 / ||V2|| approximates W'.

Both need the base model (``base_model.load_base_model``: "tiny", a diffusers folder or a checkpoint) and report
the residual as a :class:`~dora_network.tools.conversion.ConversionResult`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch

from .. import functional as DF
from ..keys import ALPHA, DORA_SCALE, DOWN, UP, ModuleSpec, infer_spec
from .base_model import BaseModel, load_base_model
from .cli import progress_bar
from .conversion import ConversionResult, ErrorMeter
from .file_modules import adapted_weight, flatten, module_delta, split_modules

__all__ = ["change_axis", "dora_to_lora"]


def _base_weights(specs: Mapping[str, ModuleSpec], base: BaseModel, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """W0 for each named module, checked against the file's shapes."""
    missing, weights = [], {}
    for name in names:
        if base.resolve(name) is None:
            missing.append(name)
            continue
        if not base.fits(name, specs[name]):
            raise ValueError(f"module '{name}' does not fit the base model's layer of shape "
                             f"{base.shapes[base.resolve(name)]}; is the file for another model?")
        weights[name] = base.weight(name)
    if missing:
        raise ValueError(f"{len(missing)} DoRA modules have no layer in the base model '{base.description}', e.g. "
                         f"{missing[:3]}; the base weights are needed to compute W'")
    return weights


def _truncated(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B A the best rank-``rank`` approximation of a (out, n) matrix; singular values split evenly."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def _lora_tensors(b: torch.Tensor, a: torch.Tensor, w0: torch.Tensor,
                  like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """B (out, r), A (r, n) as ``lora_up``/``lora_down`` of W0's layer kind, alpha = r; dtypes follow the old module."""
    rank = b.shape[1]
    if w0.ndim == 4:
        up, down = b.reshape(b.shape[0], rank, 1, 1), a.reshape(rank, *w0.shape[1:])
    else:
        up, down = b, a
    alpha = like.get(ALPHA)
    dtype = like[UP].dtype
    return {DOWN: down.to(dtype).contiguous(), UP: up.to(dtype).contiguous(),
            ALPHA: torch.tensor(float(rank), dtype=torch.float32 if alpha is None else alpha.dtype)}


def _rank_for(spec: ModuleSpec, w0: torch.Tensor, rank: int | None) -> tuple[int, bool]:
    """(the rank to fit: ``rank`` or the module's, at most the layer's full rank; whether it was clamped)."""
    full = min(int(w0.shape[0]), int(w0[0].numel()))
    wanted = spec.rank if rank is None else int(rank)
    if wanted < 1:
        raise ValueError(f"rank={rank}: must be a positive integer")
    return min(wanted, full), wanted > full


#: (name, old tensors, W', W0, rank) -> (new tensors, reference quantity, the new module's counterpart)
_Fit = Callable[[str, Mapping[str, torch.Tensor], torch.Tensor, torch.Tensor, int],
                tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]]


def _refit(state_dict: Mapping[str, torch.Tensor], base: Any, select: Callable[[ModuleSpec], bool],
           rank: int | None, fit: _Fit, *, operation: str, compared: str, desc: str, progress: bool,
           clamp_note: str) -> ConversionResult:
    """Re-fit every selected module with ``fit`` against its W0 and W', measuring what moved."""
    base = load_base_model(base)
    groups, specs, unknown = split_modules(state_dict)
    names = [n for n in groups if select(specs[n])]
    weights = _base_weights(specs, base, names)
    meter, clamped, tucker = ErrorMeter(), 0, 0
    for name in progress_bar(names, desc=desc, unit="module", total=len(names), enabled=progress):
        tensors, spec, w0 = groups[name], specs[name], weights[name].float()
        w_adapted = adapted_weight(tensors, spec, w0)
        r, was_clamped = _rank_for(spec, w0, rank)
        clamped += was_clamped
        tucker += spec.tucker
        groups[name], before, after = fit(name, tensors, w_adapted, w0, r)
        meter.add(name, [before], [after])
    notes = []
    if clamped:
        notes.append(f"{clamped} modules: rank {rank} exceeds the layer's full rank; {clamp_note}")
    if tucker:
        notes.append(f"{tucker} Tucker modules became plain LoCon pairs (no lora_mid)")
    return meter.result(operation, False, compared, flatten(groups, unknown, state_dict), len(names), notes)


def dora_to_lora(state_dict: Mapping[str, torch.Tensor], base: Any, rank: int | None = None,
                 progress: bool = False) -> ConversionResult:
    """Replace every DoRA module by the plain LoRA closest to W' - W0 (truncated SVD, rank ``rank``).

    Plain LoRA modules are copied. The new modules have alpha = rank, no ``dora_scale`` and no ``lora_mid`` (a kxk
    conv becomes a LoCon pair: down (r, in, kh, kw), up (out, r, 1, 1)), in the dtype of the old ``lora_up``.

    Args:
        state_dict: the file's tensors (2-D/4-D ``dora_scale``).
        base: the base model (``load_base_model`` argument, e.g. "tiny" or a checkpoint path).
        rank: the new rank; None keeps each module's rank; clamped to min(out, in*kh*kw) (exact there).
        progress: show a tqdm bar.

    Returns:
        The result; errors compare the LoRA's update B A with W' - W0 (per-module and overall relative
        Frobenius error).

    Raises:
        ValueError: a DoRA module has no layer in the base model, or its shapes do not fit.
    """
    def fit(name: str, tensors: Mapping[str, torch.Tensor], w_adapted: torch.Tensor, w0: torch.Tensor,
            r: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        target = w_adapted - w0  # W' - W0, what every UI adds at strength 1
        new = _lora_tensors(*_truncated(target.flatten(1), r), w0, tensors)
        return new, target, module_delta(new, infer_spec(name, new))

    label = "own rank" if rank is None else f"rank={rank}"
    return _refit(state_dict, base, lambda spec: spec.dora, rank, fit, operation=f"dora_to_lora({label})",
                  compared="W' - W0 vs B*A", desc="DoRA -> LoRA", progress=progress, clamp_note="clamped (exact there)")


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
    def fit(name: str, tensors: Mapping[str, torch.Tensor], w_adapted: torch.Tensor, w0: torch.Tensor,
            r: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        b, a, magnitude, _ = _fit_axis(w_adapted, w0, r, wd_on_out, iterations)
        new = _lora_tensors(b, a, w0, tensors)
        new[DORA_SCALE] = magnitude.to(tensors[DORA_SCALE].dtype).contiguous()
        return new, w_adapted - w0, adapted_weight(new, infer_spec(name, new), w0) - w0

    axis = "out" if wd_on_out else "in"
    return _refit(state_dict, base, lambda spec: spec.dora and bool(spec.wd_on_out) != wd_on_out, rank, fit,
                  operation=f"to_axis({axis}, {'own rank' if rank is None else f'rank={rank}'})",
                  compared="W' - W0 vs W2 - W0", desc=f"DoRA -> {axis}-axis", progress=progress, clamp_note="clamped")
