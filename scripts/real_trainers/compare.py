"""Alternated real-trainer runs: sd-scripts' own network module against dora_network, same trainer, same machine.

Runs the CPU harness of ``../shared/sd-scripts/`` (``run_train.sh`` for SD1.5/SDXL, ``run_dit_train.sh`` for
FLUX.1/Anima; set it up first as its README/DIT.md say: sd-scripts source, its venv, the random checkpoints) once per
(rank, round, module), alternating the order every round (A B, B A, ...) so that drifting machine load falls on
both, and prints per rank: the median s/step of each module, their ratio, the per-round ratios, peak RSS, and
whether the two files hold the same module set (names from each run's ``keys.txt``).

    python scripts/real_trainers/compare.py --family sdxl --dims 4:2,16:8,32:16 --rounds 3
    python scripts/real_trainers/compare.py --family flux --ours-args wd_on_out=True

dora_network is imported by the trainer from this checkout (``SDSCRIPTS_PYTHONPATH``); nothing is installed.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: family -> (harness script, harness trainer name, sd-scripts' own module)
FAMILIES = {
    "sd15": ("run_train.sh", "sd15", "networks.lora"),
    "sdxl": ("run_train.sh", "sdxl", "networks.lora"),
    "flux": ("run_dit_train.sh", "flux", "networks.lora_flux"),
    "anima": ("run_dit_train.sh", "anima", "networks.lora_anima"),
}
_LOOP = re.compile(r"train loop [0-9:]+, ([0-9.]+)(s/it|it/s)")
_RSS = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")


@dataclass
class Run:
    """One harness run: its seconds per step, peak RSS (GiB, if GNU time was there) and module names."""

    module: str
    seconds_per_step: float
    peak_rss_gib: float | None
    modules: set[str] = field(default_factory=set)


def parse_output(text: str) -> tuple[float, float | None]:
    """(s/step, peak RSS GiB or None) from a harness run's output; ValueError if it printed no train-loop line."""
    loops = _LOOP.findall(text)
    if not loops:
        raise ValueError("the harness printed no 'train loop ..., X s/it' line (did the trainer run?)")
    value, unit = loops[-1]
    seconds = float(value) if unit == "s/it" else 1.0 / float(value)
    rss = _RSS.findall(text)
    return seconds, (int(rss[-1]) / 1048576 if rss else None)


def read_modules(out_dir: Path) -> set[str]:
    """Module names in a run's ``keys.txt`` (one ``key<TAB>shape`` line per tensor)."""
    keys = out_dir / "keys.txt"
    if not keys.exists():
        return set()
    return {line.split("\t", 1)[0].split(".", 1)[0] for line in keys.read_text().splitlines() if line.strip()}


def run_once(harness: Path, family: str, module: str, network_args: list[str], dim: int, alpha: float, steps: int,
             out_dir: Path) -> Run:
    script, trainer, _ = FAMILIES[family]
    env = dict(os.environ, SDSCRIPTS_DIM=str(dim), SDSCRIPTS_ALPHA=f"{alpha:g}", SDSCRIPTS_STEPS=str(steps),
               SDSCRIPTS_OUT=str(out_dir), SDSCRIPTS_NO_RELOAD=os.environ.get("SDSCRIPTS_NO_RELOAD", "0"))
    if module == "dora_network":
        env["SDSCRIPTS_PYTHONPATH"] = str(REPO)
    result = subprocess.run(["bash", str(harness / script), trainer, module, *network_args], env=env,
                            capture_output=True, text=True)
    text = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"{script} {trainer} {module} failed (rc={result.returncode}):\n{text[-3000:]}")
    seconds, rss = parse_output(text)
    return Run(module, seconds, rss, read_modules(out_dir))


def _median(values: list[float]) -> float:
    return statistics.median(values)


def summarize(dim: int, alpha: float, runs: list[tuple[Run, Run]]) -> str:
    """One Markdown table row: medians, their ratio, per-round ratios, RSS, module sets."""
    reference = [r.seconds_per_step for r, _ in runs]
    ours = [o.seconds_per_step for _, o in runs]
    ratio = _median(ours) / _median(reference)
    rounds = ", ".join(f"{o.seconds_per_step / r.seconds_per_step:.3f}" for r, o in runs)
    rss_pairs = [(r.peak_rss_gib, o.peak_rss_gib) for r, o in runs if r.peak_rss_gib and o.peak_rss_gib]
    rss = (f"{_median([o for _, o in rss_pairs]):.2f} / {_median([r for r, _ in rss_pairs]):.2f} GiB "
           f"({_median([o for _, o in rss_pairs]) / _median([r for r, _ in rss_pairs]):.3f}x)") if rss_pairs else "-"
    ref_modules, our_modules = runs[0][0].modules, runs[0][1].modules
    if ref_modules and our_modules:
        same = "yes" if ref_modules == our_modules else (
            f"no: {len(our_modules - ref_modules)} only ours, {len(ref_modules - our_modules)} only theirs")
        modules = f"{len(our_modules)} / {len(ref_modules)}, same: {same}"
    else:
        modules = "-"
    return (f"| {dim} / {alpha:g} | {_median(reference):.2f} | {_median(ours):.2f} | **{ratio:.3f}x** | {rounds} "
            f"| {rss} | {modules} |")


def parse_dims(text: str) -> list[tuple[int, float]]:
    pairs = []
    for part in text.split(","):
        dim, _, alpha = part.strip().partition(":")
        pairs.append((int(dim), float(alpha) if alpha else int(dim) / 2))
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Needs the CPU harness of ../shared/sd-scripts/ set up (README.md there; DIT.md for flux/anima): "
               "SDSCRIPTS_SRC, SDSCRIPTS_VENV and SDSCRIPTS_MODELS as its scripts read them.")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sdxl")
    parser.add_argument("--harness", type=Path, default=REPO.parent / "shared" / "sd-scripts",
                        help="folder holding run_train.sh / run_dit_train.sh (default: ../shared/sd-scripts)")
    parser.add_argument("--dims", default="4:2,16:8,32:16", help="network_dim:network_alpha pairs (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds per rank (default 3)")
    parser.add_argument("--steps", type=int, default=5, help="--max_train_steps per run (default 5)")
    parser.add_argument("--reference", help="the module to compare against (default: sd-scripts' own for the family)")
    parser.add_argument("--ours-args", nargs="*", default=[], help="network_args for dora_network (e.g. wd_on_out=True)")
    parser.add_argument("--reference-args", nargs="*", default=[], help="network_args for the reference module")
    args = parser.parse_args(argv)
    reference = args.reference or FAMILIES[args.family][2]
    script = args.harness / FAMILIES[args.family][0]
    if not script.exists():
        parser.error(f"{script} not found: pass --harness (the folder of ../shared/sd-scripts)")
    print(f"| dim / alpha | {reference} s/step | dora_network s/step | ratio of medians | per-round ratios "
          f"| peak RSS ours / theirs | modules ours / theirs |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="real-trainer-") as scratch:
        for dim, alpha in parse_dims(args.dims):
            pairs: list[tuple[Run, Run]] = []
            for round_index in range(args.rounds):
                order = [(reference, args.reference_args), ("dora_network", args.ours_args)]
                if round_index % 2:
                    order.reverse()  # A B, B A, ...: drifting load falls on both
                done = {}
                for module, network_args in order:
                    out = Path(scratch) / f"{dim}-{round_index}-{module.replace('.', '_')}"
                    done[module] = run_once(args.harness, args.family, module, network_args, dim, alpha, args.steps,
                                            out)
                    print(f"  round {round_index + 1}, dim {dim}: {module} {done[module].seconds_per_step:.2f} s/step",
                          file=sys.stderr)
                pairs.append((done[reference], done["dora_network"]))
            print(summarize(dim, alpha, pairs), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
