"""The paper's weight-decomposition analysis (Liu et al., ICML 2024, section 2.2 and figure 2), as the paper does it.

For each method, the query matrices' effective weights W_t at several checkpoints t during fine-tuning are compared
with the pretrained W0: per layer and checkpoint, dM_t = mean over columns of | ||W_t[:, n]|| - ||W0[:, n]|| | and
dD_t = mean over columns of 1 - cos(W_t[:, n], W0[:, n]) (``tools.analyze.decomposition_change``, the paper's
column = one input feature; ``axis="out"`` per output row). Over every (layer, checkpoint) point the least-squares
slope of dD on dM and the Pearson correlation summarise the pattern; the paper reports FT -0.62, LoRA +0.83 and
DoRA -0.31 (LLaMA query matrices).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch

from ..tools.analyze import decomposition_change, fit_line

__all__ = ["PAPER_CORRELATION", "Point", "MethodAnalysis", "analyse"]

#: the paper's correlations between dD and dM (figure 2)
PAPER_CORRELATION = {"FT": -0.62, "LoRA": 0.83, "DoRA": -0.31}


@dataclass(frozen=True)
class Point:
    """One query layer at one checkpoint."""

    layer: str
    step: int
    dM: float
    dD: float


@dataclass
class MethodAnalysis:
    """Every point of one fine-tune, and the slope (dD on dM) and correlation over them."""

    points: list[Point] = field(default_factory=list)
    slope: float = math.nan
    correlation: float = math.nan


def analyse(base: Mapping[str, torch.Tensor], snapshots: Mapping[int, Mapping[str, torch.Tensor]],
            axis: str = "in") -> MethodAnalysis:
    """dM/dD of every layer at every checkpoint after step 0 against ``base`` (both in float64).

    Args:
        base: layer name -> W0.
        snapshots: step -> layer name -> W at that step (step 0, the starting point, is skipped).
        axis: "in" (the paper's columns) or "out".
    """
    result = MethodAnalysis()
    for step in sorted(snapshots):
        if step == 0:
            continue
        for layer, weight in snapshots[step].items():
            d_m, d_d = decomposition_change(base[layer], weight, axis)
            result.points.append(Point(layer, step, d_m, d_d))
    result.slope, result.correlation = fit_line([p.dM for p in result.points], [p.dD for p in result.points])
    return result
