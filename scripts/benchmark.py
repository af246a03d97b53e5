#!/usr/bin/env python
"""CPU benchmark of dora_network against plain LoRA, LyCORIS and PEFT (method: reference/performance.md).

Sections (``--sections``):
  step   training steps of an SDXL-shaped UNet (configs/bench_sdxl.toml): forward, MSE, backward with latents
         requiring grad, AdamW on the adapter parameters; per (latent, rank, gradient checkpointing) config
  micro  one layer forward + backward (input requires grad): Linear 1280x1280 and 1280->5120 at 4096 tokens,
         Conv 3x3 640->640 at 1x32x32; plus ours' norm computation alone, against the r/(2N) FLOP model
  infer  eval-mode no_grad UNet forwards: base, unmerged adapters, and ours saved, reloaded with
         create_network_from_weights and merged with merge_to (``*_merged``; should cost x1.00 of the base)
  trainer  the step users run (scripts/bench_trainer.py): sd-scripts train_network.py's whole loop body, every
         per-step hook included, on a FULL-SIZE SDXL UNet (configs/bench_sdxl_full.toml, ~10 GB float32, built once
         and cached in outputs/bench_cache), gradient checkpointing on; ours LoRA / DoRA in-axis / DoRA out-axis,
         interleaved, one process at a time with every core; per config latent:conv_dim[:scale_weight_norms].
         Not in the default sections: ~1-2 h on a 2-core CPU, ~20 GB of RAM. --quick runs it on the small UNet.

Every (section, config, method, round) runs in its own process forked from a preloaded forkserver, one torch
thread, rounds interleaved. Primary metric: process CPU time, median over rounds; ratios are medians of per-round
paired ratios. Peak RSS is the process's ru_maxrss (it includes ~300 MB of imported libraries); "saved" is the sum
of unique tensors saved for backward (parameters excluded; under gradient checkpointing only what is saved outside
the checkpointed blocks). Prints markdown tables; ``--json out.json`` writes every number.

    python scripts/benchmark.py                 # full default (~20 min on an idle 2-core machine)
    python scripts/benchmark.py --quick         # smoke check: 1 round, 1 step, latent 32, rank 16
    python scripts/benchmark.py --sections step --methods ours_lora,ours_dora_in --latents 64 --ranks 16,32 --gc off,on
    python scripts/benchmark.py --sections trainer                      # full-size SDXL, 256 and 512 px
    python scripts/benchmark.py --sections trainer --quick              # the same loop on the small UNet
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the forkserver before it imports torch
os.environ["MKL_NUM_THREADS"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
sys.path[:0] = [str(SCRIPTS), str(REPO)]

import bench_methods  # noqa: E402
import bench_trainer  # noqa: E402
from bench_methods import MERGED_SUFFIX, METHODS, PRELOAD, micro_shapes  # noqa: E402

DEFAULT_CONFIGS = "64:16:off,32:16:off,32:32:off,32:16:on"
#: latent:conv_dim[:scale_weight_norms]; latent 32 is 256 px, 64 is 512 px
DEFAULT_TRAINER_CONFIGS = "32:off,32:on,64:off,64:on,32:on:1"
MICRO_METHODS = ("none", "ours_lora", "ours_dora_in", "ours_dora_out", "lycoris_dora", "peft_dora")
INFER_METHODS = ("none", "ours_lora", "ours_dora_in", "ours_dora_out", "ours_dora_in_merged", "lycoris_dora",
                 "peft_dora")


# -- command line ------------------------------------------------------------------------------------------------
def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "bench_sdxl.toml"), help="UNet config (TOML)")
    p.add_argument("--sections", default="step,micro,infer", help="comma list of step, micro, infer")
    p.add_argument("--methods", help=f"comma list overriding every section's methods; from {', '.join(METHODS)}, "
                   f"and ours_*{MERGED_SUFFIX} (infer only)")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="step configs latent:rank:gc (default %(default)s)")
    p.add_argument("--latents", help="comma list; with --ranks/--gc, the full product replaces --configs")
    p.add_argument("--ranks", help="comma list of ranks (see --latents)")
    p.add_argument("--gc", help="comma list of off/on: gradient checkpointing (see --latents)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per process (default 3)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed warm-up steps per process (default 2: the first two steps still page-fault in fresh "
                        "allocator memory, ~7%% of a step in system time, more for methods that allocate more)")
    p.add_argument("--micro-rank", type=int, default=32)
    p.add_argument("--micro-tokens", type=int, default=4096, help="tokens of the Linear micro shapes")
    p.add_argument("--infer-latent", type=int, help="default: the largest step latent")
    p.add_argument("--infer-rank", type=int, help="default: the first step config's rank")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="measurement processes at once, 1 thread each (default %(default)s)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per measurement process")
    p.add_argument("--trainer-configs", default=DEFAULT_TRAINER_CONFIGS,
                   help="trainer section: latent:conv(on/off)[:scale_weight_norms] (default %(default)s)")
    p.add_argument("--trainer-rank", type=int, default=16, help="trainer section: network_dim (alpha = dim/2)")
    p.add_argument("--trainer-model", default=str(bench_trainer.FULL_CONFIG),
                   help="trainer section: UNet config (default: full-size SDXL)")
    p.add_argument("--trainer-threads", type=int, default=os.cpu_count() or 1,
                   help="trainer section: torch threads (default: every core, as the trainer runs)")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--quick", action="store_true",
                   help="1 round, 1 step, latent 32, rank 16, 1024 micro tokens (smoke check)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup, args.micro_rank, args.micro_tokens = 1, 1, 1, 16, 1024
        args.configs, args.latents, args.ranks, args.gc = "32:16:off", None, None, None
        args.trainer_configs, args.trainer_model = "16:on,16:on:1", str(REPO / "configs" / "bench_sdxl.toml")
    args.sections = _csv(args.sections)
    bad = set(args.sections) - {"step", "micro", "infer", "trainer"}
    if bad:
        p.error(f"unknown sections {sorted(bad)}")
    if args.latents or args.ranks or args.gc:
        first = _parse_config(_csv(DEFAULT_CONFIGS)[0])
        lat = [int(v) for v in _csv(args.latents)] if args.latents else [first[0]]
        ranks = [int(v) for v in _csv(args.ranks)] if args.ranks else [first[1]]
        gcs = [_on(v) for v in _csv(args.gc)] if args.gc else [False]
        args.step_configs = list(itertools.product(lat, ranks, gcs))
    else:
        args.step_configs = [_parse_config(c) for c in _csv(args.configs)]
    args.trainer_config_list = [_parse_trainer_config(c) for c in _csv(args.trainer_configs)]
    args.infer_latent = args.infer_latent or max(c[0] for c in args.step_configs)
    args.infer_rank = args.infer_rank or args.step_configs[0][1]
    if args.methods:
        methods = _csv(args.methods)
        unknown = [m for m in methods if m not in METHODS and not _is_merged(m)]
        if unknown:
            p.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)} (+ ours_*{MERGED_SUFFIX})")
        args.section_methods = {s: [m for m in methods if m in METHODS or (s == "infer" and _is_merged(m))]
                                for s in args.sections}
        args.section_methods["trainer"] = [m for m in methods if m in bench_trainer.METHODS]
    else:
        args.section_methods = {"step": list(METHODS), "micro": list(MICRO_METHODS), "infer": list(INFER_METHODS),
                                "trainer": list(bench_trainer.METHODS)}
    return args


def _on(text: str) -> bool:
    if text.lower() not in ("on", "off", "1", "0", "true", "false"):
        raise SystemExit(f"gradient checkpointing must be on/off, got {text!r}")
    return text.lower() in ("on", "1", "true")


def _parse_config(text: str) -> tuple[int, int, bool]:
    latent, rank, gc = text.split(":")
    return int(latent), int(rank), _on(gc)


def _parse_trainer_config(text: str) -> tuple[int, bool, float | None]:
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise SystemExit(f"trainer config must be latent:conv[:scale_weight_norms], got {text!r}")
    return int(parts[0]), _on(parts[1]), float(parts[2]) if len(parts) == 3 else None


def _is_merged(method: str) -> bool:
    return method.endswith(MERGED_SUFFIX) and method[: -len(MERGED_SUFFIX)] in METHODS and method.startswith("ours_")


# -- running -----------------------------------------------------------------------------------------------------
def build_tasks(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Specs in run order: rounds outermost (interleaved), method order rotated each round."""
    base = {"config": args.config, "steps": args.steps, "warmup": args.warmup, "threads": 1}
    tasks = []
    for rnd in range(args.rounds):
        for section in args.sections:
            methods = args.section_methods[section]
            methods = methods[rnd % len(methods):] + methods[: rnd % len(methods)] if methods else []
            if section == "trainer":
                configs = [{"latent": lat, "conv": conv, "max_norm": mn, "rank": args.trainer_rank,
                            "config": args.trainer_model, "threads": args.trainer_threads}
                           for lat, conv, mn in args.trainer_config_list]
            elif section == "step":
                configs = [{"latent": lat, "rank": r, "gc": gc} for lat, r, gc in args.step_configs]
            elif section == "micro":
                configs = [{"rank": args.micro_rank, "tokens": args.micro_tokens}]
            else:
                configs = [{"latent": args.infer_latent, "rank": args.infer_rank}]
            for cfg in configs:
                tasks += [{**base, **cfg, "section": section, "method": m, "round": rnd} for m in methods]
    return tasks


def run_tasks(tasks: list[dict[str, Any]], jobs: int, timeout: float) -> list[dict[str, Any]]:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    logs = tempfile.mkdtemp(prefix="dora_bench_")
    start, done = time.time(), [0]

    def one(index: int) -> dict[str, Any]:
        spec = tasks[index]
        log = os.path.join(logs, f"{index:04d}.log")
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=bench_methods.child, args=(spec, send, log))
        proc.start()
        send.close()
        try:
            result = recv.recv() if recv.poll(timeout) else {"error": f"timed out after {timeout:.0f} s"}
        except EOFError:  # killed (out of memory?) before it could answer
            proc.join(5)
            result = {"error": f"measurement process died, exit code {proc.exitcode}"}
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
        if "error" in result:
            with open(log, errors="replace") as f:
                result["log_tail"] = f.read()[-3000:]
        done[0] += 1
        what = ", ".join(f"{k}={spec[k]}" for k in ("latent", "rank", "gc", "conv", "max_norm") if k in spec)
        cpu = result.get("cpu_ms", sum(v.get("cpu_ms", 0) for v in result.get("shapes", {}).values()))
        status = "FAILED" if "error" in result else f"{cpu:.0f} cpu ms"
        print(f"[{done[0]}/{len(tasks)} {time.time() - start:5.0f}s] {spec['section']} {what} round {spec['round']}"
              f" {spec['method']}: {status}", file=sys.stderr, flush=True)
        return result

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        return list(pool.map(one, range(len(tasks))))


def run_sections(tasks: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The small sections ``--jobs`` at a time; the trainer section alone, one process at a time, after building
    (or finding) the cached full-size UNet in a process of its own."""
    small = [i for i, t in enumerate(tasks) if t["section"] != "trainer"]
    big = [i for i, t in enumerate(tasks) if t["section"] == "trainer"]
    results: list[dict[str, Any]] = [{} for _ in tasks]
    for i, res in zip(small, run_tasks([tasks[i] for i in small], args.jobs, args.timeout)):
        results[i] = res
    if big:
        prep = run_tasks([{"section": "trainer_prepare", "method": "-", "round": 0, "config": args.trainer_model,
                           "threads": args.trainer_threads}], 1, args.timeout)[0]
        if "error" in prep:
            raise SystemExit(f"could not build the trainer section's UNet: {prep['error']}")
        for i, res in zip(big, run_tasks([tasks[i] for i in big], 1, args.timeout)):
            results[i] = res
    return results


# -- aggregation -------------------------------------------------------------------------------------------------
def _median(values: list[float | None]) -> float | None:
    """Median of the finite values; None (JSON null) when there is none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else None


def _paired(rounds: dict[int, float], base: dict[int, float]) -> float | None:
    return _median([v / base[r] for r, v in rounds.items() if base.get(r)])


def aggregate(section: str, tasks: list[dict[str, Any]], results: list[dict[str, Any]],
              methods: list[str]) -> list[dict[str, Any]]:
    """One row per (config[, shape], method): medians over rounds and paired ratios."""
    runs: dict[tuple, dict[int, dict[str, Any]]] = {}
    for spec, res in zip(tasks, results):
        if spec["section"] != section:
            continue
        if section == "micro":
            for shape, row in res.get("shapes", {"(every shape)": res}).items():
                runs.setdefault((shape, spec["method"]), {})[spec["round"]] = row
            continue
        key = tuple(spec.get(k) for k in ("latent", "rank", "gc")) + (spec["method"],)
        runs.setdefault(key, {})[spec["round"]] = res
    rows = []
    for key, by_round in runs.items():
        ok = {r: v for r, v in by_round.items() if "error" not in v}
        cpu = {r: v["cpu_ms"] for r, v in ok.items()}
        row: dict[str, Any] = {"method": key[-1], "rounds_ok": len(ok), "rounds": len(by_round),
                               "cpu_ms_rounds": [cpu[r] for r in sorted(cpu)], "cpu_ms": _median(list(cpu.values()))}
        if section == "micro":
            row["shape"] = key[0]
        else:
            row.update(latent=key[0], rank=key[1], gc=key[2])
        fields = {k for v in ok.values() for k, x in v.items()
                  if isinstance(x, (int, float)) and not isinstance(x, bool)}
        for name in sorted(fields - {"cpu_ms", "round"}):
            row[name] = _median([v.get(name) for v in ok.values()])
        for name in ("layers_hash", "norm_error"):
            row[name] = next((v[name] for v in ok.values() if name in v), None)
        row["spread_pct"] = (100 * (max(cpu.values()) - min(cpu.values())) / row["cpu_ms"]) if len(cpu) > 1 else None
        errors = [v["error"].strip().splitlines()[-1] for v in by_round.values() if "error" in v]
        if errors:
            row["error"] = errors[0]
        row["_cpu"] = cpu
        rows.append(row)
    group = (lambda r: r["shape"]) if section == "micro" else (lambda r: (r["latent"], r["rank"], r["gc"]))
    for row in rows:
        peers = {r["method"]: r for r in rows if group(r) == group(row)}
        for base in ("ours_lora", "none"):
            if base in peers:
                row[f"x_{base}"] = _paired(row["_cpu"], peers[base]["_cpu"])
                for name in ("peak_rss_mb", "saved_mb"):
                    if base == "none" and row.get(name) is not None and peers[base].get(name) is not None:
                        row[f"{name}_vs_none"] = row[name] - peers[base][name]
    order = {m: i for i, m in enumerate(methods)}
    first_seen: dict[Any, int] = {}
    for row in rows:
        first_seen.setdefault(group(row), len(first_seen))
    rows.sort(key=lambda r: (first_seen[group(r)], order.get(r["method"], 99)))
    for row in rows:
        del row["_cpu"]
    return rows


def check_layers(rows: list[dict[str, Any]]) -> list[str]:
    """Every adapter method of one config must adapt the same layers (count and path hash)."""
    problems, by_cfg = [], {}
    for r in rows:
        if r["method"] != "none" and r.get("layers_hash"):
            by_cfg.setdefault((r["latent"], r["rank"], r["gc"]), set()).add((int(r["n_layers"]), r["layers_hash"]))
    for cfg, found in by_cfg.items():
        if len(found) != 1:
            problems.append(f"config {cfg}: methods adapt different layer sets {sorted(found)}")
    return problems


# -- output ------------------------------------------------------------------------------------------------------
def _f(value: Any, fmt: str = "{:.0f}") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return fmt.format(value)


def _method(row: dict[str, Any]) -> str:
    if "error" not in row:
        return row["method"]
    return f"{row['method']} **({row['rounds'] - row['rounds_ok']}/{row['rounds']} rounds failed: {row['error']})**"


def _table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(cells) + " |" for cells in lines])


def _norm_share(row: dict[str, Any]) -> str:
    """Ours' DoRA: every adapter's norm once, in ms and as a share of the step (the r/T claim, per step)."""
    if row.get("norm_ms") is None or not row.get("cpu_ms"):
        return "-"
    return f"{row['norm_ms']:.0f} ({100 * row['norm_ms'] / row['cpu_ms']:.1f}%)"


def render(section: str, rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    ratio = "{:.2f}"
    if section == "step":
        head = ["latent", "rank", "GC", "method", "layers", "trainable", "cpu ms/step", "fwd / bwd / opt ms",
                "x ours_lora", "x none", "spread", "peak RSS MB", "RSS - none", "saved MB", "saved - none",
                "norm ms (share)"]
        lines = [[f"{r['latent']}x{r['latent']}", str(r["rank"]), "on" if r["gc"] else "off", _method(r),
                  _f(r.get("n_layers")), _f(r.get("trainable"), "{:,.0f}"), _f(r["cpu_ms"]),
                  f"{_f(r.get('fwd_ms'))} / {_f(r.get('bwd_ms'))} / {_f(r.get('opt_ms'))}",
                  _f(r.get("x_ours_lora"), ratio), _f(r.get("x_none"), ratio), _f(r.get("spread_pct"), "{:.0f}%"),
                  _f(r.get("peak_rss_mb")), _f(r.get("peak_rss_mb_vs_none"), "{:+.0f}"), _f(r.get("saved_mb")),
                  _f(r.get("saved_mb_vs_none"), "{:+.0f}"), _norm_share(r)]
                 for r in rows]
        return _table(head, lines)
    if section == "micro":
        head = ["shape", "method", "cpu ms fwd+bwd", "x ours_lora", "x none", "spread", "saved MB", "trainable"]
        lines = [[r["shape"], _method(r), _f(r["cpu_ms"], "{:.1f}"), _f(r.get("x_ours_lora"), ratio),
                  _f(r.get("x_none"), ratio), _f(r.get("spread_pct"), "{:.0f}%"), _f(r.get("saved_mb"), "{:.1f}"),
                  _f(r.get("trainable"), "{:,.0f}")] for r in rows]
        norm_lines = []
        none = {r["shape"]: r["cpu_ms"] for r in rows if r["method"] == "none"}
        for r in rows:
            if r.get("norm_error"):
                norm_lines.append([r["shape"], r["method"], f"error: {r['norm_error']}", "-", "-"])
            if r.get("norm_ms") is None:
                continue
            kind, _, _, n = micro_shapes(args.micro_tokens)[r["shape"]]
            tokens = n if kind == "linear" else n * n
            norm_lines.append([r["shape"], r["method"], _f(r["norm_ms"], "{:.2f}"),
                               _f(100 * r["norm_ms"] / none[r["shape"]] if none.get(r["shape"]) else None, "{:.2f}%"),
                               f"{100 * args.micro_rank / (2 * tokens):.2f}%"])
        norm = _table(["shape", "method", "norm ms (no_grad)", "norm / none fwd+bwd", "r/(2N) FLOP model"],
                      norm_lines) if norm_lines else "(no ours DoRA method run: no norm timing)"
        return _table(head, lines) + "\n\nNorm computation alone (what ours' forward calls for its scales):\n\n" + norm
    head = ["latent", "rank", "method", "cpu ms/forward", "x none", "x ours_lora", "spread", "peak RSS MB",
            "merged max |diff|"]
    lines = [[f"{r['latent']}x{r['latent']}", str(r["rank"]), _method(r), _f(r["cpu_ms"]), _f(r.get("x_none"), ratio),
              _f(r.get("x_ours_lora"), ratio), _f(r.get("spread_pct"), "{:.0f}%"), _f(r.get("peak_rss_mb")),
              _f(r.get("merged_max_abs_diff"), "{:.1e}")]
             for r in rows]
    return _table(head, lines)


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "?"
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = next(ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name"))
        flag_line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "").split()
        flags = " ".join(f for f in ("avx2", "avx512f", "amx_tile") if f in flag_line)
    except (OSError, StopIteration):
        pass
    versions = {}
    for pkg in ("torch", "diffusers", "transformers", "peft", "lycoris-lora", "safetensors"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    src = hashlib.sha1(b"".join(p.read_bytes() for p in sorted((REPO / "dora_network").glob("*.py"))))
    return {"cpu": cpu, "cpu_flags": flags, "cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions, "git": commit,
            "dora_network_sources_sha1": src.hexdigest()[:12],
            "load_avg_start": os.getloadavg(), "date": datetime.datetime.now().isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> int:
    t0 = time.time()
    args = parse_args(argv)
    info = machine_info()
    tasks = build_tasks(args)
    print(f"running {len(tasks)} measurement processes, {args.jobs} at a time (trainer: 1)", file=sys.stderr,
          flush=True)
    results = run_sections(tasks, args)
    info["load_avg_end"] = os.getloadavg()
    info["worker_torch_threads"] = sorted({r["threads"] for r in results if "threads" in r})
    elapsed = time.time() - t0
    out: dict[str, Any] = {"command": " ".join(shlex.quote(a) for a in [sys.argv[0]] + (argv or sys.argv[1:])),
                           "machine": info, "elapsed_s": elapsed, "settings": {
                               "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup, "jobs": args.jobs,
                               "step_configs": args.step_configs, "micro_rank": args.micro_rank,
                               "infer_latent": args.infer_latent, "infer_rank": args.infer_rank,
                               "config": args.config, "trainer_configs": args.trainer_config_list,
                               "trainer_rank": args.trainer_rank, "trainer_model": args.trainer_model,
                               "trainer_threads": args.trainer_threads}}
    problems = [f"{t['section']} {t['method']} round {t['round']}: {r['error'].strip().splitlines()[-1]}"
                for t, r in zip(tasks, results) if "error" in r]
    v = info["versions"]
    print(f"# dora_network benchmark\n\ncommand: `{out['command']}`\n\n"
          f"machine: {info['cpu']} ({info['cpu_flags']}), {info['cpus']} CPUs, load avg {info['load_avg_start'][0]:.1f}"
          f" -> {info['load_avg_end'][0]:.1f}; torch {v['torch']}, {info['worker_torch_threads']} thread(s) per "
          f"worker, {args.jobs} worker(s) at a time; Python {info['python']}, diffusers {v['diffusers']}, "
          f"transformers {v['transformers']}, peft {v['peft']}, lycoris-lora {v['lycoris-lora']}; git {info['git']} "
          f"(dora_network/*.py sha1 {info['dora_network_sources_sha1']})\n\n"
          f"{args.rounds} interleaved round(s) x {args.steps} timed step(s) after {args.warmup} warm-up; "
          f"CPU ms are medians over rounds, ratios medians of per-round paired ratios.\n")
    titles = {"step": "Training step (SDXL-shaped UNet, batch 1)", "micro": f"One layer, rank {args.micro_rank}",
              "infer": "Inference (eval, no_grad)",
              "trainer": f"The step users run: sd-scripts' loop body on {Path(args.trainer_model).name}, rank "
                         f"{args.trainer_rank}, gradient checkpointing, {args.trainer_threads} thread(s)"}
    for section in args.sections:
        if section == "trainer":
            rows = bench_trainer.summarize(tasks, results)
            out[section] = {"rows": rows}
            print(f"## {titles[section]}\n\n{bench_trainer.render(rows)}\n\nhooks = all_reduce + clip_grad_norm_ + "
                  "update_grad_norms + update_norms; logs = the four norm reads (or apply_max_norm_regularization); "
                  "x LoRA = median of per-round ratios to ours_lora; wall-clock.\n")
            continue
        rows = aggregate(section, tasks, results, args.section_methods[section])
        out[section] = {"rows": rows}
        extra = ""
        if section == "step":
            layer_problems = check_layers(rows)
            problems += layer_problems
            counts = sorted({int(r["n_layers"]) for r in rows if r["method"] != "none" and r.get("n_layers")})
            extra = (f"\nAdapted layers per method: {counts} (Linear children of Transformer2DModel); same set for "
                     f"every method: {'NO - ' + '; '.join(layer_problems) if layer_problems else 'yes'}\n")
            out[section]["adapted_layers"] = counts
        print(f"## {titles[section]}\n\n{render(section, rows, args)}\n{extra}")
    out["problems"] = problems
    cpu_min = sum(r.get("process_cpu_s", 0) for r in results) / 60
    out["measurement_cpu_min"] = cpu_min
    print(f"total time: {elapsed / 60:.1f} min wall; the measurement processes used {cpu_min:.1f} CPU-min "
          f"(~{cpu_min / max(1, args.jobs):.0f} min at {args.jobs} jobs on an otherwise idle machine)")
    if problems:
        print("\nPROBLEMS:\n- " + "\n- ".join(problems))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
