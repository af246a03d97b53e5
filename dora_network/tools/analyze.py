"""DoRA's weight-decomposition analysis (Liu et al., ICML 2024, section 3): magnitude vs direction change per layer.

For a base weight W0 and the adapted weight W (our merged weight at strength 1), both in torch's (out, in[, kh, kw])
layout, the paper's column-wise norm ||.||_c is taken per *input* feature n: the column W[:, n] (for convs, every
element of input channel n; our ``wd_on_out=False`` axis). With k input features (paper eq. 3 and 4):

    dM = (1/k) * sum_n | ||W[:, n]|| - ||W0[:, n]|| |
    dD = (1/k) * sum_n (1 - cos(W[:, n], W0[:, n]))

(the paper's cos(V, W0) with V = W / ||W||_c equals cos(W, W0): a positive per-column scale does not change it).
``axis="out"`` does the same per output row instead. Per file, the least-squares slope of dD on dM and the Pearson
correlation summarise the pattern: the paper reports a positive correlation for LoRA (magnitude and direction move
together) and a negative one for DoRA and full fine-tuning (figure 2). Works for LoRA and DoRA files alike.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import functional as DF
from .base_model import load_model, model_parts
from .cli import make_parser, parse_args, progress_bar

logger = logging.getLogger(__name__)

__all__ = ["AnalysisReport", "FileAnalysis", "LayerStat", "analyze_files", "decomposition_change", "fit_line", "main"]


@dataclass
class LayerStat:
    """dM and dD of one adapted layer."""

    name: str
    component: str
    kind: str
    dM: float
    dD: float


@dataclass
class FileAnalysis:
    """One file's layers, and the slope (dD on dM) and Pearson correlation over them (NaN with < 2 layers)."""

    path: str
    label: str
    layers: list[LayerStat] = field(default_factory=list)
    slope: float = math.nan
    correlation: float = math.nan


@dataclass
class AnalysisReport:
    """Every file's analysis; ``axis`` is "in" (the paper's columns) or "out"."""

    axis: str
    files: list[FileAnalysis] = field(default_factory=list)

    def rows(self) -> list[dict[str, Any]]:
        """One row per (file, layer), for CSV."""
        return [{"file": f.label, **asdict(layer)} for f in self.files for layer in f.layers]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN slopes/correlations become null)."""
        clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(f).items()}
                 for f in self.files]
        return {"axis": self.axis, "files": clean}


def decomposition_change(base: torch.Tensor, adapted: torch.Tensor, axis: str = "in") -> tuple[float, float]:
    """(dM, dD) of paper eq. 3-4 for one weight pair.

    Args:
        base: W0, (out, in) or (out, in, kh, kw).
        adapted: W, same shape.
        axis: "in": one column per input feature (the paper's ||.||_c); "out": one row per output feature.

    Returns:
        (dM, dD) as Python floats, computed in float64.

    Raises:
        ValueError: shapes differ or ``axis`` is not "in"/"out".
    """
    if axis not in ("in", "out"):
        raise ValueError(f"axis must be 'in' (per input column, the paper's) or 'out' (per output row), got {axis!r}")
    if base.shape != adapted.shape:
        raise ValueError(f"W0 {tuple(base.shape)} and W {tuple(adapted.shape)} differ in shape")
    w0, w = base.detach().double(), adapted.detach().double()
    dims = DF.norm_dims(w.ndim, axis == "out")
    norm0, norm = DF.weight_norm(w0, axis == "out"), DF.weight_norm(w, axis == "out")
    d_m = (norm - norm0).abs().mean()
    denom = norm * norm0
    dot = (w * w0).sum(dim=dims, keepdim=True)
    # an all-zero column (in W or W0) has no direction: count it as unchanged rather than divide by zero
    cos = torch.where(denom > 0, dot / denom.clamp_min(torch.finfo(torch.float64).tiny), torch.ones_like(dot))
    d_d = (1.0 - cos).mean()
    return float(d_m), float(d_d)


def fit_line(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least-squares slope of y on x and Pearson's r; (nan, nan) with < 2 points or no spread."""
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} points and y {len(y)}; they must pair up")
    if len(x) < 2:
        return math.nan, math.nan
    xs, ys = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    dx, dy = xs - xs.mean(), ys - ys.mean()
    sxx, syy, sxy = float((dx * dx).sum()), float((dy * dy).sum()), float((dx * dy).sum())
    slope = sxy / sxx if sxx > 0 else math.nan
    corr = sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan
    return slope, corr


@torch.no_grad()
def analyze_files(model: Any, files: Sequence[str | os.PathLike], labels: Sequence[str] | None = None,
                  axis: str = "in", name_filter: str | None = None) -> AnalysisReport:
    """dM/dD per adapted layer for each file, against the base weights of ``model`` (left unchanged).

    Args:
        model: the base: a ``TinySDXL``, a diffusers SDXL pipeline or ``(text_encoders, unet)``.
        files: DoRA or LoRA files (any spelling our loader accepts).
        labels: one per file (default: the file stems).
        axis: "in" (the paper's per-column analysis) or "out".
        name_filter: keep only layers whose lora_name contains this (e.g. "to_q", as the paper's figure 2).

    Returns:
        An :class:`AnalysisReport`; W is each adapter's ``merged_weight(1.0)``.

    Raises:
        ValueError: a file does not fit the model, ``labels`` has the wrong length, or no layer passes the filter.
    """
    from .. import create_network_from_weights

    text_encoders, unet = model_parts(model)
    labels = list(labels) if labels is not None else [Path(f).stem for f in files]
    if len(labels) != len(files):
        raise ValueError(f"{len(labels)} labels for {len(files)} files; give one label per file")
    report = AnalysisReport(axis)
    for file, label in zip(files, labels):
        # a report, not a load: analyse the modules that match and warn about the rest
        network, _ = create_network_from_weights(1.0, file, None, text_encoders, unet, for_inference=True,
                                                 allow_partial_load="True")
        result = FileAnalysis(str(file), label)
        targets = {t.lora_name: t for t in network.targets}
        for module in network.loras:
            if name_filter and name_filter not in module.lora_name:
                continue
            target = targets[module.lora_name]
            d_m, d_d = decomposition_change(module.base_weight, module.merged_weight(1.0), axis)
            result.layers.append(LayerStat(module.lora_name, target.component, target.kind, d_m, d_d))
        if not result.layers:
            raise ValueError(f"no layer of '{file}' contains {name_filter!r}; drop or change --name_filter")
        result.slope, result.correlation = fit_line([s.dM for s in result.layers], [s.dD for s in result.layers])
        logger.info("%s: %d layers, slope dD/dM %.4g, r %.3f", label, len(result.layers), result.slope,
                    result.correlation)
        report.files.append(result)
    return report


def plot_report(report: AnalysisReport, path: str | os.PathLike, title: str = "") -> None:
    """Scatter of every layer as in the paper's figure 2 (x: dD, y: dM), one colour per file."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for item in report.files:
        axes.scatter([s.dD for s in item.layers], [s.dM for s in item.layers], s=12, alpha=0.7,
                     label=f"{item.label} (r={item.correlation:.2f}, dD/dM slope={item.slope:.3g})")
    axes.set_xlabel(f"ΔD (mean 1 - cos per {'input column' if report.axis == 'in' else 'output row'})")
    axes.set_ylabel("ΔM (mean |Δ norm|)")
    axes.set_title(title or "weight decomposition analysis (DoRA paper, fig. 2)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def summary_table(report: AnalysisReport) -> str:
    """Per-file summary: layers, mean dM, mean dD, slope, correlation."""
    lines = [f"{'file':<24} {'layers':>6} {'mean dM':>11} {'mean dD':>11} {'slope dD/dM':>12} {'pearson r':>9}"]
    for item in report.files:
        n = len(item.layers)
        mean_m = sum(s.dM for s in item.layers) / n
        mean_d = sum(s.dD for s in item.layers) / n
        lines.append(f"{item.label:<24} {n:>6} {mean_m:>11.4e} {mean_d:>11.4e} {item.slope:>12.4g} "
                     f"{item.correlation:>9.3f}")
    return "\n".join(lines)


load_base = load_model  # (text_encoders, unet) of "tiny" or a diffusers folder; the name scripts/ use


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "dora-analyze",
        "Magnitude/direction analysis of DoRA and LoRA files (DoRA paper, section 3): per layer dM and dD against "
        "the base, the dD-on-dM slope and Pearson r per file; writes PNG, CSV and JSON.",
        "example:\n  dora-analyze --model tiny --network_weights out/lora.safetensors out/dora.safetensors "
        "\\\n      --labels LoRA DoRA --output_dir analysis/\n"
        "  dora-analyze --model sdxl_diffusers/ --network_weights my_dora.safetensors --name_filter to_q",
    )
    parser.add_argument("--model", default="tiny", help="'tiny' (seeded tiny SDXL) or a diffusers SDXL folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny model (the smoke trainer's --seed)")
    parser.add_argument("--model_config", default=None, help="tiny SDXL TOML (default: configs/tiny_sdxl.toml)")
    parser.add_argument("--network_weights", nargs="+", required=True, help="DoRA/LoRA .safetensors files")
    parser.add_argument("--labels", nargs="+", default=None, help="one label per file (default: file stems)")
    parser.add_argument("--axis", choices=["in", "out"], default="in", help="in: per input column (the paper)")
    parser.add_argument("--name_filter", default=None, help="only layers whose name contains this, e.g. to_q")
    parser.add_argument("--output_dir", default="analysis", help="where analysis.png/.csv/.json go")
    parser.add_argument("--print_layers", action="store_true", help="print every layer, not just the summary")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``dora-analyze``: see ``--help``. Returns 0 on success."""
    args = parse_args(build_parser(), argv)
    base = load_base(args.model, args.seed, args.model_config)
    labels = args.labels or [Path(f).stem for f in args.network_weights]
    if len(labels) != len(args.network_weights):
        build_parser().error(f"--labels has {len(labels)} values for {len(args.network_weights)} files")
    report = AnalysisReport(args.axis)
    for file, label in progress_bar(list(zip(args.network_weights, labels)), desc="analysing", unit="file"):
        report.files += analyze_files(base, [file], [label], args.axis, args.name_filter).files
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "analysis.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "name", "component", "kind", "dM", "dD"])
        writer.writeheader()
        writer.writerows(report.rows())
    (out / "analysis.json").write_text(json.dumps(report.to_json(), indent=1), encoding="utf-8")
    plot_report(report, out / "analysis.png")
    if args.print_layers:
        for row in report.rows():
            print(f"{row['file']:<16} {row['name']:<90} dM={row['dM']:.4e} dD={row['dD']:.4e}")
    print(summary_table(report))
    print(f"wrote {out / 'analysis.png'}, {out / 'analysis.csv'}, {out / 'analysis.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
