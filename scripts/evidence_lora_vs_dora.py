"""Evidence run: LoRA and DoRA trained with identical settings on the tiny SDXL model, then the DoRA paper's
weight-decomposition analysis (section 3, figure 2) of both files, side by side.

Both runs use the smoke trainer (``python -m dora_network.smoke``, settings from configs/smoke.toml plus the flags
below), differing only in ``--algo``. Reported per run: the first and last moving-average training loss, and, over
all adapted layers and over the query projections only (the paper's figure 2 uses query matrices), the Pearson
correlation and least-squares slope of dD on dM. The paper reports r = -0.31 for DoRA and +0.83 for LoRA (LLaMA,
commonsense fine-tuning, over layers and training steps); a tiny random model trained for a few hundred steps on
synthetic shapes is a much weaker test, so read the numbers as what they are.

    python scripts/evidence_lora_vs_dora.py --output_dir outputs/evidence --max_train_steps 200
    python scripts/evidence_lora_vs_dora.py -- --network_dim 8 --learning_rate 1e-3   # extra smoke flags after --
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from dora_network.smoke import main as smoke_main
from dora_network.smoke import setup_logging
from dora_network.tools import analyze

ALGOS = ("lora", "dora")
LABELS = ("LoRA", "DoRA")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="example:\n  python scripts/evidence_lora_vs_dora.py --max_train_steps 200",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/evidence")
    parser.add_argument("--max_train_steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model_config", default=None, help="tiny SDXL TOML (default: configs/tiny_sdxl.toml)")
    parser.add_argument("--num_cpu_threads", type=int, default=1)
    parser.add_argument("smoke_args", nargs="*", help="extra smoke-trainer flags (after --), same for both runs")
    return parser


def run(argv: Sequence[str] | None = None) -> dict:
    """Train both, analyse both; returns the summary (also written to ``<output_dir>/evidence.json``)."""
    args = build_parser().parse_args(argv)
    out = Path(args.output_dir)
    files, losses, seconds = {}, {}, {}
    for algo in ALGOS:
        flags = ["--algo", algo, "--output_dir", str(out / algo), "--output_name", algo, "--seed", str(args.seed),
                 "--max_train_steps", str(args.max_train_steps), "--num_cpu_threads", str(args.num_cpu_threads),
                 "--skip_checks", "diffusers", *(["--model_config", args.model_config] if args.model_config else []),
                 *args.smoke_args]
        begin = time.perf_counter()
        status = smoke_main(flags)
        seconds[algo] = time.perf_counter() - begin
        summary = json.loads((out / algo / "summary.json").read_text(encoding="utf-8"))
        if status != 0:
            print(f"note: the {algo} smoke run reported a failed self-check (exit {status}); analysing it anyway")
        files[algo] = summary["file"]
        losses[algo] = (summary["first_moving_average_loss"], summary["last_moving_average_loss"])
    base = analyze.load_base("tiny", args.seed, args.model_config)
    labels = list(LABELS)
    report = analyze.analyze_files(base, [files[a] for a in ALGOS], labels)
    query = analyze.analyze_files(base, [files[a] for a in ALGOS], labels, name_filter="to_q")
    analyze.plot_report(report, out / "evidence_all_layers.png", "tiny SDXL, all adapted layers")
    analyze.plot_report(query, out / "evidence_to_q.png", "tiny SDXL, query projections (as the paper's fig. 2)")
    result = {"max_train_steps": args.max_train_steps, "seed": args.seed, "paper": {"DoRA": -0.31, "LoRA": 0.83},
              "runs": {}}
    print(f"\n{'':<6} {'loss first->last (moving avg)':>30} {'layers':>7} {'r all':>7} {'slope all':>10} "
          f"{'q layers':>8} {'r to_q':>7} {'slope to_q':>10} {'train s':>8}")
    for algo, label, every, only_q in zip(ALGOS, labels, report.files, query.files):
        first, last = losses[algo]
        print(f"{label:<6} {first:>14.4f} -> {last:<12.4f} {len(every.layers):>7} {every.correlation:>7.3f} "
              f"{every.slope:>10.4g} {len(only_q.layers):>8} {only_q.correlation:>7.3f} {only_q.slope:>10.4g} "
              f"{seconds[algo]:>8.1f}")
        result["runs"][label] = {"file": files[algo], "first_loss": first, "last_loss": last,
                                 "layers": len(every.layers), "r_all": every.correlation, "slope_all": every.slope,
                                 "q_layers": len(only_q.layers), "r_to_q": only_q.correlation,
                                 "slope_to_q": only_q.slope, "seconds": seconds[algo]}
    print("paper (LLaMA, query matrices over layers and steps): DoRA r = -0.31, LoRA r = +0.83")
    (out / "evidence.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(f"wrote {out / 'evidence.json'}, {out / 'evidence_all_layers.png'}, {out / 'evidence_to_q.png'}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
