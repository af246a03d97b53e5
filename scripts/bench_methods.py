"""One benchmark measurement per process, for scripts/benchmark.py.

benchmark.py forks one process per (section, config, method, round) from a forkserver that has imported torch,
diffusers, peft, lycoris and dora_network (so imports are paid once), and calls :func:`child` there: peak RSS
(``ru_maxrss``) and CPU time are that process's own. For debugging, ``python scripts/bench_methods.py '<json spec>'``
runs one spec in a fresh interpreter and prints ``RESULT {json}``.
Primary metric: process CPU time with one torch thread. Saved-for-backward bytes are counted in the (untimed)
warm-up step with ``saved_tensors_hooks``, unique storages only, parameters and buffers excluded.

Methods (same layers for all: every Linear inside the UNet's Transformer2DModel blocks):
  none           frozen base, no adapter
  ours_lora      dora_network algo=lora            ours_dora_in / ours_dora_out   default / wd_on_out=True
  lycoris_lora   lycoris.kohya algo=lora           lycoris_dora   + dora_wd=True, wd_on_output=True
  peft_lora      peft LoraConfig                   peft_dora      + use_dora=True
lora_up / lora_B start at N(0, 1e-3) for every method, so DoRA is not at its trivial init.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

METHODS = ("none", "ours_lora", "ours_dora_in", "ours_dora_out", "lycoris_lora", "lycoris_dora", "peft_lora",
           "peft_dora")
MERGED_SUFFIX = "_merged"  # inference only: ours_* saved, reloaded with create_network_from_weights and merge_to
LORA_UP_STD = 1e-3
#: Imported once by the forkserver that every measurement process is forked from.
PRELOAD = ["bench_methods", "diffusers.models.unets.unet_2d_condition", "dora_network", "dora_network.tiny", "peft",
           "lycoris.kohya"]
#: PEFT targets: the Linear layers that ours picks by default (children of Transformer2DModel).
PEFT_UNET_TARGETS = (r".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\."
                     r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))")
def micro_shapes(tokens: int = 4096) -> dict[str, tuple[str, int, int, int]]:
    """Per-layer micro benchmark shapes: name -> (kind, in, out, tokens for Linear / spatial side for Conv)."""
    return {
        f"Linear 1280x1280, {tokens} tok": ("linear", 1280, 1280, tokens),
        f"Linear 1280->5120, {tokens} tok": ("linear", 1280, 5120, tokens),
        "Conv3x3 640->640, 1x32x32": ("conv", 640, 640, 32),
    }


# -- model -------------------------------------------------------------------------------------------------------
def load_config(path: str) -> dict[str, Any]:
    from dora_network.tiny import load_tiny_config

    return load_tiny_config(path)


def build_unet(cfg: dict[str, Any], seed: int = 0) -> nn.Module:
    """The UNet part of ``dora_network.tiny.build_tiny_sdxl`` (the same builder), without text encoders or VAE."""
    from dora_network.tiny import build_unet as tiny_unet

    return tiny_unet(cfg, seed)


def unet_inputs(cfg: dict[str, Any], latent: int, seed: int = 123) -> dict[str, torch.Tensor]:
    """Random latents, noise target and conditioning of SDXL's shapes (batch 1); text encoders are not run."""
    from dora_network.tiny import make_time_ids

    g = torch.Generator().manual_seed(seed)
    ch = cfg["vae"]["latent_channels"]
    hidden = cfg["text_encoder_1"]["hidden_size"] + cfg["text_encoder_2"]["hidden_size"]
    tokens = int(cfg["tokenizer"].get("max_length", 77))
    return {
        "latents": torch.randn(1, ch, latent, latent, generator=g),
        "target": torch.randn(1, ch, latent, latent, generator=g),
        "timesteps": torch.tensor([500]),
        "context": torch.randn(1, tokens, hidden, generator=g),
        "pooled": torch.randn(1, cfg["text_encoder_2"]["projection_dim"], generator=g),
        "time_ids": make_time_ids(1, latent * 8, latent * 8),
    }


def run_unet(unet: nn.Module, x: dict[str, torch.Tensor], latents: torch.Tensor) -> torch.Tensor:
    cond = {"text_embeds": x["pooled"], "time_ids": x["time_ids"]}
    return unet(latents, x["timesteps"], x["context"], added_cond_kwargs=cond).sample


def _holder(layer: nn.Module, class_name: str) -> nn.Module:
    """Wrap one layer in a container whose class name the adapters' target rules pick (micro benchmark)."""
    cls = type(class_name, (nn.Module,), {"forward": lambda self, x: self.layer(x)})
    holder = cls()
    holder.layer = layer
    return holder


# -- methods -----------------------------------------------------------------------------------------------------
@dataclass
class Applied:
    params: list[nn.Parameter] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)  # adapted base-layer paths
    network: Any = None


def _lycoris_preset(container: str, conv: bool) -> str:
    path = os.path.join(tempfile.mkdtemp(prefix="bench_lyco_"), "preset.toml")
    with open(path, "w") as f:
        f.write(f'enable_conv = {"true" if conv else "false"}\nunet_target_module = ["{container}"]\n'
                "unet_target_name = []\ntext_encoder_target_module = []\ntext_encoder_target_name = []\n")
    return path


def apply_method(method: str, model: nn.Module, rank: int, *, container: str = "Transformer2DModel",
                 conv: bool = False, peft_targets: Any = PEFT_UNET_TARGETS, seed: int = 1) -> Applied:
    """Freeze ``model``, attach ``method``'s adapters (rank r, alpha r/2) and set lora_up to N(0, 1e-3)."""
    model.requires_grad_(False)
    paths = {id(m): n for n, m in model.named_modules()}
    alpha = rank / 2
    if method == "none":
        return Applied()
    family, _, variant = method.partition("_")
    dora = variant.startswith("dora")
    if family == "ours":
        import dora_network

        kw: dict[str, str] = {} if dora else {"algo": "lora"}
        if variant == "dora_out":
            kw["wd_on_out"] = "True"
        if conv:
            kw.update(conv_dim=str(rank), conv_alpha=str(alpha))
        net = dora_network.create_network(1.0, rank, alpha, None, [], model, **kw)
        net.apply_to(None, model, apply_text_encoder=False, apply_unet=True)
        mods = list(net.unet_loras)
        ups = [m.lora_up.weight for m in mods]
        layers = [paths[id(m.base_layer)] for m in mods]
        params = list(net.get_trainable_params())
    elif family == "lycoris":
        import lycoris.kohya as lk

        kw = {"algo": "lora", "preset": _lycoris_preset(container, conv)}
        if dora:
            kw.update(dora_wd="True", wd_on_output="True")
        if conv:
            kw.update(conv_dim=str(rank), conv_alpha=str(alpha))
        net = lk.create_network(1.0, rank, alpha, None, [], model, warn_on_unmatched=False, **kw)
        net.apply_to([], model, apply_text_encoder=False, apply_unet=True)
        mods = list(net.unet_loras)
        ups = [m.lora_up.weight for m in mods]
        layers = [paths[id(m.org_module[0])] for m in mods]
        params = [p for group in net.prepare_optimizer_params(None, 1e-4, 1e-4)[0] for p in group["params"]]
    elif family == "peft":
        from peft import LoraConfig, inject_adapter_in_model

        cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, use_dora=dora, target_modules=peft_targets)
        inject_adapter_in_model(cfg, model)
        net = None
        mods = [(n, m) for n, m in model.named_modules() if "default" in getattr(m, "lora_A", {})]
        ups = [m.lora_B["default"].weight for _, m in mods]
        layers = [n for n, _ in mods]
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in ups:
            w.copy_(torch.randn(w.shape, generator=g) * LORA_UP_STD)
    return Applied(params, layers, net)


# -- measurement helpers -----------------------------------------------------------------------------------------
class SavedBytes(contextlib.AbstractContextManager):
    """Sum of unique storages saved for backward, excluding the given (parameter/buffer) storages."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude, self.sizes = exclude, {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        with contextlib.suppress(Exception):
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr and ptr not in self.exclude:
                self.sizes[ptr] = storage.nbytes()
        return t

    def __enter__(self) -> "SavedBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)

    @property
    def mb(self) -> float:
        return sum(self.sizes.values()) / 2**20


def storages(*modules_or_tensors: Any) -> set[int]:
    out = set()
    for item in modules_or_tensors:
        tensors = list(item.parameters()) + list(item.buffers()) if isinstance(item, nn.Module) else list(item)
        out |= {t.untyped_storage().data_ptr() for t in tensors}
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    return (time.process_time() - c) * 1e3, (time.perf_counter() - w) * 1e3, out


def layer_hash(layers: list[str]) -> str:
    return hashlib.sha1("\n".join(sorted(layers)).encode()).hexdigest()[:12]


# -- sections ----------------------------------------------------------------------------------------------------
def measure_step(spec: dict[str, Any]) -> dict[str, Any]:
    """Training steps: forward, MSE, backward (latents require grad), AdamW on the adapter parameters."""
    cfg = load_config(spec["config"])
    unet = build_unet(cfg)
    applied = apply_method(spec["method"], unet, spec["rank"])
    if spec["gc"]:
        unet.enable_gradient_checkpointing()
        if applied.network is not None:
            applied.network.enable_gradient_checkpointing()
    unet.train()
    if applied.network is not None:
        applied.network.train()
    opt = torch.optim.AdamW(applied.params, lr=1e-4) if applied.params else None
    x = unet_inputs(cfg, spec["latent"])
    latents = x["latents"].clone().requires_grad_(True)
    keep = storages(unet, applied.params)
    rows: dict[str, list[float]] = {"cpu_ms": [], "wall_ms": [], "fwd_ms": [], "bwd_ms": [], "opt_ms": []}
    saved_mb, loss = 0.0, float("nan")
    for i in range(spec["warmup"] + spec["steps"]):
        counter = SavedBytes(keep | storages([latents])) if i == 0 else contextlib.nullcontext()
        w0 = time.perf_counter()
        with counter:
            fwd, _, out = timed(lambda: F.mse_loss(run_unet(unet, x, latents).float(), x["target"]))
        bwd, _, _ = timed(out.backward)

        def _opt() -> None:
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            latents.grad = None

        opt_ms, _, _ = timed(_opt)
        wall = (time.perf_counter() - w0) * 1e3
        loss = float(out.detach())
        del out
        if i == 0:
            saved_mb = counter.mb
        if i >= spec["warmup"]:
            for key, value in zip(rows, (fwd + bwd + opt_ms, wall, fwd, bwd, opt_ms)):
                rows[key].append(value)
    return {**{k: statistics.median(v) for k, v in rows.items()}, "saved_mb": saved_mb, "peak_rss_mb": peak_rss_mb(),
            "trainable": sum(p.numel() for p in applied.params), "n_layers": len(applied.layers),
            "layers_hash": layer_hash(applied.layers), "loss": loss, "norm_ms": _step_norm_ms(applied)}


def _ours_dora_modules(applied: Applied) -> list[Any]:
    """Ours' DoRA adapters on the UNet; empty for other methods."""
    net = applied.network
    if not type(net).__module__.startswith("dora_network"):
        return []
    return [m for m in net.unet_loras if m.dora]


def _norm_call(applied: Applied) -> Callable[[], Any] | None:
    """What ours' DoRA forward computes for its scales (norm, then c), for one adapter; None for other methods."""
    mods = _ours_dora_modules(applied)
    if not mods:
        return None
    from dora_network import functional as DF

    m = mods[0]
    return lambda: DF.activation_scales(m.adapted_norm(), m.dora_scale, m.multiplier)


def _step_norm_ms(applied: Applied) -> float | None:
    """CPU ms to compute every adapter's norm once, as one training step does (outside backward: no memo)."""
    mods = _ours_dora_modules(applied)
    if not mods:
        return None

    def norms() -> None:
        with torch.no_grad():
            for m in mods:
                m.adapted_norm()

    norms()
    return statistics.median(timed(norms)[0] for _ in range(3))


def measure_micro(spec: dict[str, Any]) -> dict[str, Any]:
    """One layer, forward + backward with the input requiring grad, for every shape in ``spec['shapes']``."""
    result: dict[str, Any] = {}
    for name, (kind, cin, cout, n) in micro_shapes(spec["tokens"]).items():
        torch.manual_seed(0)
        if kind == "linear":
            layer, container, x = nn.Linear(cin, cout), "Transformer2DModel", torch.randn(1, n, cin)
        else:
            layer, container, x = nn.Conv2d(cin, cout, 3, padding=1), "ResnetBlock2D", torch.randn(1, cin, n, n)
        model = _holder(layer, container)
        applied = apply_method(spec["method"], model, spec["rank"], container=container, conv=kind == "conv",
                               peft_targets=["layer"])
        x.requires_grad_(True)
        with torch.no_grad():
            gy = torch.randn_like(model(x))
        keep = storages(model, applied.params, [x])
        cpu, wall, saved_mb = [], [], 0.0
        for i in range(spec["warmup"] + spec["steps"]):
            counter = SavedBytes(keep) if i == 0 else contextlib.nullcontext()

            def _step() -> None:
                with counter:
                    y = model(x)
                y.backward(gy)
                x.grad = None
                for p in applied.params:
                    p.grad = None

            c, w, _ = timed(_step)
            if i == 0:
                saved_mb = counter.mb
            else:
                cpu.append(c)
                wall.append(w)
        row = {"cpu_ms": statistics.median(cpu), "wall_ms": statistics.median(wall), "saved_mb": saved_mb,
               "trainable": sum(p.numel() for p in applied.params), "n_layers": len(applied.layers)}
        try:
            norm = _norm_call(applied)
            if norm is not None:
                with torch.no_grad():
                    norm()
                    row["norm_ms"] = statistics.median(timed(norm)[0] for _ in range(max(5, spec["steps"])))
        except Exception as exc:  # noqa: BLE001 - ours' internals changed; the layer timing still stands
            row["norm_error"] = repr(exc)
        result[name] = row
        del model, applied, x, gy
    return {"shapes": result, "peak_rss_mb": peak_rss_mb()}


def _merged_unet(method: str, cfg: dict[str, Any], unet: nn.Module, rank: int,
                 x: dict[str, torch.Tensor]) -> float:
    """Train-free round trip: adapters -> save -> create_network_from_weights -> merge_to; returns max |diff|."""
    import dora_network

    applied = apply_method(method, unet, rank)
    with torch.no_grad():
        reference = run_unet(unet, x, x["latents"])
    applied.network.restore()
    path = os.path.join(tempfile.mkdtemp(prefix="bench_merge_"), "adapter.safetensors")
    applied.network.save_weights(path, torch.float32, {})
    net, weights_sd = dora_network.create_network_from_weights(1.0, path, None, [], unet, for_inference=True)
    net.merge_to([], unet, weights_sd, torch.float32, "cpu")
    with torch.no_grad():
        return float((run_unet(unet, x, x["latents"]) - reference).abs().max())


def measure_infer(spec: dict[str, Any]) -> dict[str, Any]:
    """Eval-mode, no_grad UNet forwards: base, unmerged adapters, or ours merged into the base weights."""
    cfg = load_config(spec["config"])
    unet = build_unet(cfg).eval()
    x = unet_inputs(cfg, spec["latent"])
    method, merged_diff, trainable = spec["method"], None, 0
    if method.endswith(MERGED_SUFFIX):
        merged_diff = _merged_unet(method[: -len(MERGED_SUFFIX)], cfg, unet, spec["rank"], x)
    else:
        applied = apply_method(method, unet, spec["rank"])
        trainable = sum(p.numel() for p in applied.params)
        if applied.network is not None:
            applied.network.eval()
    unet.eval()
    cpu, wall = [], []
    with torch.no_grad():
        for i in range(spec["warmup"] + spec["steps"]):
            c, w, _ = timed(lambda: run_unet(unet, x, x["latents"]))
            if i >= spec["warmup"]:
                cpu.append(c)
                wall.append(w)
    return {"cpu_ms": statistics.median(cpu), "wall_ms": statistics.median(wall), "peak_rss_mb": peak_rss_mb(),
            "adapter_params": trainable, "merged_max_abs_diff": merged_diff}


def _trainer(spec: dict[str, Any]) -> dict[str, Any]:
    import bench_trainer

    return bench_trainer.measure(spec)


def _trainer_prepare(spec: dict[str, Any]) -> dict[str, Any]:
    import bench_trainer

    return bench_trainer.prepare(spec["config"])


SECTIONS = {"step": measure_step, "micro": measure_micro, "infer": measure_infer, "trainer": _trainer,
            "trainer_prepare": _trainer_prepare}


def _setup(threads: int = 1) -> None:
    import logging
    import warnings

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    logging.disable(logging.INFO)  # LyCORIS/ours info chatter; warnings still reach stderr
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    _setup(spec.get("threads", 1))
    result = SECTIONS[spec["section"]](spec)
    result["threads"] = torch.get_num_threads()
    result["process_cpu_s"] = time.process_time()  # whole process: build, setup and every step
    return result


def child(spec: dict[str, Any], conn: Any, log_path: str) -> None:
    """multiprocessing target (forked from a preloaded forkserver): stdout/stderr to ``log_path``, result to conn."""
    import traceback

    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        conn.send(run_spec(spec))
    except BaseException:  # noqa: BLE001 - reported to the parent
        conn.send({"error": traceback.format_exc()})
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def main() -> None:
    print("RESULT " + json.dumps(run_spec(json.loads(sys.argv[1]))), flush=True)


if __name__ == "__main__":
    main()
