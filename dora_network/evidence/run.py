"""The evidence run end to end: data, pretrained base, every fine-tune, analysis; then the table, figure and JSON.

``scripts/evidence_lora_vs_dora.py`` is its command line. Per (method, rank, seed): the held-out concept's denoising
loss (fixed noise and timesteps) and forgetting (the base domain's loss after minus before); per method at the
analysis rank: dM/dD of the query matrices at every checkpoint, slope and correlation (mean over seeds), next to the
paper's. The figure is laid out like the paper's figure 2: one panel per method, dD on x, dM on y, one colour per
checkpoint.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..tiny import build_tiny_sdxl, load_tiny_config
from ..tools.cli import progress_bar
from .analysis import PAPER_CORRELATION, MethodAnalysis, analyse
from .data import BASE_COLORS, BASE_SHAPES, CONCEPT_COLORS, CONCEPT_SHAPES, encode, eval_set
from .train import LABELS, METHODS, Settings, eval_loss, finetune, pretrained_base, query_layers

__all__ = ["Plan", "QUICK", "run_evidence"]


@dataclass(frozen=True)
class Plan:
    """What to run: ranks and seeds of the fine-tunes, the rank the analysis figure shows, and the settings."""

    ranks: tuple[int, ...] = (2, 4, 8, 16)
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    analysis_rank: int = 8
    settings: Settings = Settings()


#: ``--quick``: a few minutes on 2 cores
QUICK = Plan(ranks=(4, 16), seeds=(0, 1), analysis_rank=4,
             settings=Settings(pretrain_steps=150, finetune_steps=40, checkpoints=3, base_count=64,
                               concept_count=32, eval_count=16))


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _runs(plan: Plan) -> list[tuple[str, int | None, int]]:
    out = []
    for seed in plan.seeds:
        for method in plan.methods:
            out += [(method, None, seed)] if method == "ft" else [(method, r, seed) for r in plan.ranks]
    return out


def run_evidence(plan: Plan, output_dir: str | Path, cache_dir: str | Path | None = None, model_config: str | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Run ``plan``; write ``evidence.json``, ``evidence_table.md`` and ``evidence_fig2.png`` to ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    s = plan.settings
    config = load_tiny_config(model_config)
    config["image"]["resolution"], config["image"]["latent_size"] = s.resolution, s.resolution // 8
    model = build_tiny_sdxl(config, seed=0)
    for part in (model.unet, model.vae, *model.text_encoders):
        part.requires_grad_(False)
        part.eval()
    base_train = encode(model, s.base_count, 0, BASE_SHAPES, BASE_COLORS, s.resolution)
    base_eval = eval_set(encode(model, s.eval_count, 1, BASE_SHAPES, BASE_COLORS, s.resolution), seed=11)
    concept_train = encode(model, s.concept_count, 2, CONCEPT_SHAPES, CONCEPT_COLORS, s.resolution)
    concept_eval = eval_set(encode(model, s.eval_count, 3, CONCEPT_SHAPES, CONCEPT_COLORS, s.resolution), seed=13)

    bar = progress_bar(None, desc="pretraining the base", unit="step", total=s.pretrain_steps, enabled=progress)
    base_info = pretrained_base(model, base_train, s, Path(cache_dir or out), on_step=lambda _: bar and bar.update())
    if bar:
        bar.close()
    base_state = {k: v.detach().clone() for k, v in model.unet.state_dict().items()}
    base_queries = {n: m.weight.detach().float().clone() for n, m in query_layers(model).items()}
    before = {"concept": eval_loss(model, concept_eval), "base": eval_loss(model, base_eval)}

    rows, analyses = [], {}
    runs = _runs(plan)
    bar = progress_bar(runs, desc="fine-tuning", unit="run", enabled=progress)
    for method, rank, seed in bar:
        result = finetune(model, base_state, method, rank, seed, concept_train, concept_eval, base_eval, s)
        analysis = analyse(base_queries, result.snapshots)
        rows.append({"method": method, "rank": rank, "seed": seed, "concept_loss": result.concept_loss,
                     "base_loss": result.base_loss, "forgetting": result.base_loss - before["base"],
                     "trainable": result.trainable, "base_unchanged": result.base_unchanged,
                     "slope": analysis.slope, "correlation": analysis.correlation,
                     "train_loss_first": result.train_losses[0], "train_loss_last": result.train_losses[-1]})
        if method == "ft" or rank == plan.analysis_rank:
            analyses[(method, seed)] = analysis

    summary = _summarize(rows, plan)
    result = {"plan": {**asdict(plan), "settings": asdict(s)}, "base": {**base_info, "losses": None,
              "pretrain_first_loss": base_info["losses"][0], "pretrain_last_loss": base_info["losses"][-1]},
              "before_finetune": before, "eval_set_digests": {"concept": concept_eval.digest(),
                                                              "base": base_eval.digest()},
              "rows": rows, "summary": summary, "paper_correlation": PAPER_CORRELATION,
              "analysis_points": {f"{m}/seed{sd}": [asdict(p) for p in a.points] for (m, sd), a in analyses.items()},
              "seconds": time.perf_counter() - started}
    (out / "evidence.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    (out / "evidence_table.md").write_text(render_table(result), encoding="utf-8")
    plot_fig2({m: a for (m, sd), a in analyses.items() if sd == plan.seeds[0]}, out / "evidence_fig2.png",
              plan.analysis_rank)
    return result


def _summarize(rows: list[dict[str, Any]], plan: Plan) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["rank"]), []).append(row)
    out = []
    for (method, rank), items in groups.items():
        entry: dict[str, Any] = {"method": method, "label": LABELS[method], "rank": rank, "seeds": len(items)}
        for name in ("concept_loss", "forgetting", "slope", "correlation"):
            entry[name], entry[f"{name}_sd"] = _mean_sd([r[name] for r in items])
        # same seed = same batches, noise and timesteps: the paired difference is free of seed-to-seed spread
        lora = {r["seed"]: r["concept_loss"] for r in groups.get(("lora", rank), []) if method not in ("lora", "ft")}
        entry["vs_lora"], entry["vs_lora_sd"] = _mean_sd([r["concept_loss"] - lora[r["seed"]] for r in items
                                                          if r["seed"] in lora])
        out.append(entry)
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(out, key=lambda e: (order[e["method"]], e["rank"] or 0))


def render_table(result: dict[str, Any]) -> str:
    """Markdown: held-out loss and forgetting per method and rank; slope and correlation next to the paper's."""
    plan = result["plan"]
    lines = [f"Held-out concept loss (lower is better; before fine-tuning {result['before_finetune']['concept']:.4f}) "
             f"and forgetting (base-domain loss after minus before, {result['before_finetune']['base']:.4f} before); "
             f"mean ± sd over {len(plan['seeds'])} seeds; {plan['settings']['finetune_steps']} steps each.", "",
             "| method | rank | trainable | held-out loss | vs LoRA, same seed (x1e-5) | forgetting | corr(ΔD, ΔM) "
             "| slope ΔD/ΔM | paper corr |",
             "|---|---|---|---|---|---|---|---|---|"]
    trainable = {(r["method"], r["rank"]): r["trainable"] for r in result["rows"]}
    for e in result["summary"]:
        paper = PAPER_CORRELATION.get(e["label"].split(" ")[0])
        lines.append(
            f"| {e['label']} | {e['rank'] or 'full'} | {trainable[(e['method'], e['rank'])]:,} | "
            f"{e['concept_loss']:.5f} ± {e['concept_loss_sd']:.5f} | {_paired(e)} | "
            f"{e['forgetting']:+.5f} ± {e['forgetting_sd']:.5f} | "
            f"{e['correlation']:+.2f} ± {e['correlation_sd']:.2f} | {e['slope']:+.3g} | "
            f"{'-' if paper is None else f'{paper:+.2f}'} |")
    return "\n".join(lines) + "\n"


def _paired(entry: dict[str, Any]) -> str:
    if math.isnan(entry.get("vs_lora", math.nan)):
        return "-"
    return f"{entry['vs_lora'] * 1e5:+.2f} ± {entry['vs_lora_sd'] * 1e5:.2f}"


def plot_fig2(analyses: dict[str, MethodAnalysis], path: Path, rank: int) -> None:
    """One panel per method (dD on x, dM on y), one colour per checkpoint step: the layout of the paper's fig. 2."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = [m for m in METHODS if m in analyses]
    figure = Figure(figsize=(3.6 * len(methods), 3.4))
    FigureCanvasAgg(figure)
    for i, method in enumerate(methods):
        axes = figure.add_subplot(1, len(methods), i + 1)
        analysis = analyses[method]
        steps = sorted({p.step for p in analysis.points})
        for step in steps:
            pts = [p for p in analysis.points if p.step == step]
            axes.scatter([p.dD for p in pts], [p.dM for p in pts], s=14, alpha=0.8, label=f"step {step}")
        title = LABELS[method] + ("" if method == "ft" else f", r={rank}")
        axes.set_title(f"{title}\ncorr {analysis.correlation:+.2f}", fontsize=9)
        axes.set_xlabel("ΔD", fontsize=8)
        axes.set_ylabel("ΔM", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.ticklabel_format(style="sci", scilimits=(-2, 2))
        if i == 0:
            axes.legend(fontsize=7)
    figure.suptitle("query matrices during fine-tuning (as the DoRA paper's figure 2)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
