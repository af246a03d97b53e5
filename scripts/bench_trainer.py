"""The step users run, for scripts/benchmark.py's ``trainer`` section: train_network.py's loop body on a full-size
SDXL UNet.

One measurement process per (config, method, round), one at a time, every core (sd-scripts' trainer uses them all).
Each replays exactly what kohya-ss/sd-scripts' ``train_network.py`` (main 48d368fa) does per step with a network
module, on diffusers' ``UNet2DConditionModel`` with SDXL base 1.0's config (configs/bench_sdxl_full.toml, 2.57 B
parameters, random float32, cached under outputs/bench_cache after the first build):

    on_step_start -> latents and text conditioning requires_grad_(True) (sd-scripts does so under gradient
    checkpointing) -> UNet forward -> MSE -> backward -> all_reduce_network (one process: p.grad = reduce(p.grad),
    the identity) -> clip_grad_norm_(get_trainable_params(), 1.0) -> update_grad_norms() -> update_norms() ->
    optimizer.step() -> zero_grad(set_to_none=True) -> either apply_max_norm_regularization(v) (--scale_weight_norms)
    or weight_norms().mean().item(), grad_norms().mean().item(), combined_weight_norms().mean().item(),
    weight_norms().max().item() (the progress-bar logs)

with gradient checkpointing on (sd-scripts' SDXL runs use it), AdamW, batch 1, the text encoders cached (U-Net only,
as ``--cache_text_encoder_outputs --network_train_unet_only``). Times are wall-clock per phase; peak RSS is the
process's (the 10.3 GB base is in every row; "over base" subtracts the RSS after loading the UNet).
"""

from __future__ import annotations

import hashlib
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
FULL_CONFIG = REPO / "configs" / "bench_sdxl_full.toml"
CACHE_DIR = Path(os.environ.get("DORA_BENCH_CACHE", REPO / "outputs" / "bench_cache"))
METHODS = ("ours_lora", "ours_dora_in", "ours_dora_out")
PHASES = ("fwd", "bwd", "hooks", "opt", "logs")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cache_file(config: str) -> Path:
    import diffusers

    key = hashlib.sha1(Path(config).read_bytes() + diffusers.__version__.encode()).hexdigest()[:10]
    return CACHE_DIR / f"unet_{Path(config).stem}_{key}.safetensors"


def load_unet(config: str) -> torch.nn.Module:
    """The UNet of ``config`` with seed-0 random weights: built once (~1 min for SDXL), then read from the cache."""
    from safetensors.torch import load_file, save_file

    from dora_network.tiny import build_unet, load_tiny_config

    cfg = load_tiny_config(config)
    path = _cache_file(config)
    if path.exists():
        with torch.device("meta"):
            unet = build_unet(cfg, 0)
        unet.load_state_dict(load_file(str(path)), assign=True)
        if not any(t.is_meta for t in list(unet.parameters()) + list(unet.buffers())):
            return unet
    unet = build_unet(cfg, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return unet


def prepare(config: str) -> dict[str, Any]:
    """Build and cache the UNet once, before the measurement processes read it."""
    t0 = time.perf_counter()
    unet = load_unet(config)
    return {"params_m": sum(p.numel() for p in unet.parameters()) / 1e6, "seconds": time.perf_counter() - t0,
            "cache": str(_cache_file(config))}


def _inputs(latent: int, seed: int = 123) -> dict[str, torch.Tensor]:
    from dora_network.tiny import make_time_ids

    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(1, 4, latent, latent, generator=g),
            "noise": torch.randn(1, 4, latent, latent, generator=g),
            "timesteps": torch.tensor([500]),
            "context": torch.randn(1, 77, 2048, generator=g),
            "pooled": torch.randn(1, 1280, generator=g),
            "time_ids": make_time_ids(1, latent * 8, latent * 8)}


def _network(method: str, unet: torch.nn.Module, rank: int, conv: bool) -> Any:
    import dora_network

    kwargs: dict[str, str] = {"algo": "lora"} if method == "ours_lora" else {}
    if method == "ours_dora_out":
        kwargs["wd_on_out"] = "True"
    if conv:
        kwargs.update(conv_dim=str(rank), conv_alpha=str(rank / 2))
    # sd-scripts: create_network(1.0, dim, alpha, vae, text_encoders, unet, neuron_dropout=..., dropout=None, ...)
    network = dora_network.create_network(1.0, rank, rank / 2, None, [], unet, neuron_dropout=None, dropout=None,
                                          **kwargs)
    network.apply_to(None, unet, False, True)
    return network


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One process: load the UNet, attach ``spec['method']``, run warm-up + timed steps of sd-scripts' loop body."""
    t0 = time.perf_counter()
    unet = load_unet(spec["config"])
    unet.requires_grad_(False)
    load_s, base_rss = time.perf_counter() - t0, _rss_mb()
    network = _network(spec["method"], unet, spec["rank"], spec["conv"])
    unet.enable_gradient_checkpointing()
    network.enable_gradient_checkpointing()
    groups, _ = network.prepare_optimizer_params_with_multiple_te_lrs(None, 1e-4, 1e-4)
    optimizer = torch.optim.AdamW(groups)
    unet.train()
    network.prepare_grad_etc(None, unet)
    network.on_epoch_start(None, unet)
    with torch.no_grad():  # a trained-looking adapter (lora_up starts at 0): DoRA is not at its trivial init
        gen = torch.Generator().manual_seed(1)
        for module in network.loras:
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=gen) * 1e-3)
    x = _inputs(spec["latent"])
    max_norm = spec.get("max_norm")
    rows: dict[str, list[float]] = {p: [] for p in PHASES + ("step",)}
    cpu_rows: list[float] = []
    for step in range(spec["warmup"] + spec["steps"]):
        marks = [time.perf_counter()]
        cpu0 = time.process_time()
        network.on_step_start(None, unet)
        noisy = (x["latents"] + x["noise"]).requires_grad_(True)
        context, pooled = x["context"].clone().requires_grad_(True), x["pooled"].clone().requires_grad_(True)
        cond = {"text_embeds": pooled, "time_ids": x["time_ids"]}
        pred = unet(noisy, x["timesteps"], context, added_cond_kwargs=cond).sample
        loss = F.mse_loss(pred.float(), x["noise"].float(), reduction="none").mean([1, 2, 3]).mean()
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        for param in network.parameters():  # all_reduce_network with one process: reduce() returns the tensor
            if param.grad is not None:
                param.grad = param.grad
        torch.nn.utils.clip_grad_norm_(network.get_trainable_params(), 1.0)
        network.update_grad_norms()
        network.update_norms()
        marks.append(time.perf_counter())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        if max_norm:
            network.apply_max_norm_regularization(max_norm, "cpu")
        else:
            weight_norms = network.weight_norms()
            _ = weight_norms.mean().item() if weight_norms is not None else None
            grad_norms = network.grad_norms()
            _ = grad_norms.mean().item() if grad_norms is not None else None
            combined = network.combined_weight_norms()
            _ = combined.mean().item() if combined is not None else None
            _ = weight_norms.max().item() if weight_norms is not None else None
        marks.append(time.perf_counter())
        if step >= spec["warmup"]:
            for phase, a, b in zip(PHASES, marks, marks[1:]):
                rows[phase].append((b - a) * 1e3)
            rows["step"].append((marks[-1] - marks[0]) * 1e3)
            cpu_rows.append((time.process_time() - cpu0) * 1e3)
        del pred, loss
    out = {f"{k}_ms": statistics.median(v) for k, v in rows.items()}
    out.update(cpu_ms=statistics.median(cpu_rows), wall_ms=out["step_ms"], peak_rss_mb=_peak_rss_mb(),
               base_rss_mb=base_rss, load_s=load_s, n_layers=len(network.loras),
               trainable=sum(p.numel() for p in network.parameters()), threads=torch.get_num_threads())
    out["over_base_mb"] = out["peak_rss_mb"] - base_rss
    return out


# -- results -----------------------------------------------------------------------------------------------------
def config_key(spec: dict[str, Any]) -> tuple:
    return spec["latent"], spec["conv"], spec.get("max_norm"), spec["rank"]


def summarize(tasks: list[dict[str, Any]], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (config, method): medians over rounds; ratios are medians of per-round ratios to our LoRA."""
    runs: dict[tuple, dict[int, dict[str, Any]]] = {}
    for spec, res in zip(tasks, results):
        if spec["section"] == "trainer":
            runs.setdefault(config_key(spec) + (spec["method"],), {})[spec["round"]] = res
    rows = []
    for key, by_round in runs.items():
        ok = {r: v for r, v in by_round.items() if "error" not in v}
        row: dict[str, Any] = {"latent": key[0], "conv": key[1], "max_norm": key[2], "rank": key[3],
                               "method": key[4], "rounds_ok": len(ok), "rounds": len(by_round)}
        if len(ok) < len(by_round):
            bad = next(v for v in by_round.values() if "error" in v)
            row["error"] = bad["error"].strip().splitlines()[-1]
        for name in sorted({k for v in ok.values() for k, x in v.items() if isinstance(x, (int, float))}):
            row[name] = statistics.median(v[name] for v in ok.values() if name in v)
        row["step_ms_rounds"] = [ok[r]["step_ms"] for r in sorted(ok)]
        row["_by_round"] = ok
        rows.append(row)
    for row in rows:
        base = next((r for r in rows if r["method"] == "ours_lora" and config_key(r) == config_key(row)), None)
        if base is None:
            continue
        for name in ("step_ms", "cpu_ms", "fwd_ms", "bwd_ms", "over_base_mb", "peak_rss_mb"):
            ratios = [v[name] / base["_by_round"][r][name] for r, v in row["_by_round"].items()
                      if r in base["_by_round"] and base["_by_round"][r].get(name)]
            row[f"x_lora_{name}"] = statistics.median(ratios) if ratios else None
    for row in rows:
        del row["_by_round"]
    order = {m: i for i, m in enumerate(METHODS)}
    rows.sort(key=lambda r: (r["latent"], r["conv"], r["max_norm"] or 0, order.get(r["method"], 9)))
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    def f(value: Any, fmt: str = "{:.0f}") -> str:
        return "-" if value is None else fmt.format(value)

    head = ["px", "conv_dim", "max-norm", "method", "layers", "s/step", "x LoRA", "fwd / bwd s", "hooks ms",
            "opt ms", "logs ms", "peak RSS GB", "over base GB", "x LoRA (over base)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        method = r["method"] + (f" **({r['rounds'] - r['rounds_ok']} failed: {r['error']})**" if "error" in r else "")
        cells = [str(r["latent"] * 8), "on" if r["conv"] else "off", f(r["max_norm"], "{:g}"), method,
                 f(r.get("n_layers")), f(r.get("step_ms") and r["step_ms"] / 1e3, "{:.2f}"),
                 f(r.get("x_lora_step_ms"), "{:.3f}"),
                 f"{f(r.get('fwd_ms') and r['fwd_ms'] / 1e3, '{:.2f}')} / {f(r.get('bwd_ms') and r['bwd_ms'] / 1e3, '{:.2f}')}",
                 f(r.get("hooks_ms")), f(r.get("opt_ms")), f(r.get("logs_ms")),
                 f(r.get("peak_rss_mb") and r["peak_rss_mb"] / 1024, "{:.2f}"),
                 f(r.get("over_base_mb") and r["over_base_mb"] / 1024, "{:.2f}"),
                 f(r.get("x_lora_over_base_mb"), "{:.3f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
