"""The outcome of a conversion: :class:`ConversionResult`, and the meter that measures how far the weights moved.

Every conversion of ``dora-convert`` (``tools/exact.py``, ``tools/refit.py``) compares a reference quantity before
and after, per module, in float64, and reports the maximum absolute and relative Frobenius errors: nothing is
silently lossy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

__all__ = ["ConversionResult", "ErrorMeter"]


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
        """JSON-ready dict (without the tensors)."""
        data = asdict(self)
        del data["state_dict"]
        return data

    def summary(self) -> str:
        """One line: operation, exact or not, modules changed, errors, the worst module."""
        kind = "exact" if self.exact else "approximate"
        worst = max(self.per_module.items(), key=lambda kv: kv[1], default=None)
        text = (f"{self.operation}: {kind}; {self.modules_changed} modules changed; {self.compared}: max |error| "
                f"{self.max_abs_error:.3g}, relative error {self.rel_error:.3g}")
        if worst is not None and worst[1] > 0:
            text += f" (worst module {worst[1]:.3g}: {worst[0]})"
        return text


class ErrorMeter:
    """Accumulates per-module differences between a reference and a converted quantity (in float64)."""

    def __init__(self) -> None:
        self.max_abs = 0.0
        self.diff_sq = 0.0
        self.ref_sq = 0.0
        self.per_module: dict[str, float] = {}

    def add(self, name: str, before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> None:
        """Record module ``name``: each ``before`` tensor (the reference) against its ``after`` counterpart."""
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
        """The :class:`ConversionResult` of what was recorded, holding the converted ``state_dict``."""
        rel = math.sqrt(self.diff_sq / self.ref_sq) if self.ref_sq > 0 else math.sqrt(self.diff_sq)
        worst = max(self.per_module.values(), default=0.0)
        return ConversionResult(operation, exact, self.max_abs, rel, worst, compared, changed,
                                dict(self.per_module), list(notes or []), state_dict)
