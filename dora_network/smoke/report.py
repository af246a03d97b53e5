"""What a smoke run writes besides the weights: sd-scripts-style metadata, ``loss.png``, ``summary.json``, digests.

sd-scripts' trainer, not the network, writes the ``ss_*`` and ``modelspec.*`` metadata; the smoke trainer stands
in for it, so the keys and value spellings here follow ``train_network.py`` (every value a string, the network
kwargs as JSON with the injected ``"dropout": null``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from .config import SmokeSettings

logger = logging.getLogger(__name__)

__all__ = ["build_summary", "key_counts", "moving_average", "plot_loss", "state_digest", "training_metadata", "write_json"]

BASE_MODEL_VERSION = "sdxl_base_v1-0"
ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"


def training_metadata(
    settings: SmokeSettings,
    network_kwargs: Mapping[str, Any],
    *,
    started_at: float,
    steps: int,
    epochs: int,
    num_images: int,
    num_processes: int,
) -> dict[str, str]:
    """The metadata sd-scripts would pass to ``save_weights`` for this run (all values ``str``).

    Args:
        settings: the run's settings.
        network_kwargs: exactly what ``create_network`` received as ``**kwargs``.
        started_at: ``time.time()`` when training started.
        steps: optimizer steps done.
        epochs: epochs started.
        num_images: training images (repeats included).
        num_processes: data-parallel processes.

    Returns:
        ``ss_*`` and ``modelspec.*`` keys.
    """
    from .. import __version__

    finished = datetime.datetime.now(datetime.timezone.utc)
    te_lr = settings.text_encoder_lr
    metadata: dict[str, Any] = {
        "ss_session_id": settings.seed,
        "ss_training_started_at": started_at,
        "ss_training_finished_at": finished.timestamp(),
        "ss_output_name": settings.output_name,
        "ss_learning_rate": settings.learning_rate,
        "ss_text_encoder_lr": (te_lr[0] if len(te_lr) == 1 else te_lr) if te_lr else None,
        "ss_unet_lr": settings.unet_lr,
        "ss_num_train_images": num_images,
        "ss_num_batches_per_epoch": -(-num_images // (settings.train_batch_size * num_processes)),
        "ss_num_epochs": epochs,
        "ss_epoch": epochs,
        "ss_steps": steps,
        "ss_max_train_steps": settings.max_train_steps,
        "ss_batch_size_per_device": settings.train_batch_size,
        "ss_total_batch_size": settings.train_batch_size * num_processes,
        "ss_gradient_checkpointing": settings.gradient_checkpointing,
        "ss_gradient_accumulation_steps": 1,
        "ss_lr_warmup_steps": 0,
        "ss_lr_scheduler": "constant",
        "ss_optimizer": "torch.optim.adamw.AdamW",
        "ss_max_grad_norm": settings.max_grad_norm,
        "ss_mixed_precision": settings.mixed_precision,
        "ss_full_fp16": False,
        "ss_seed": settings.seed,
        "ss_resolution": (settings.resolution, settings.resolution),
        "ss_noise_offset": None,
        "ss_min_snr_gamma": None,
        "ss_v2": False,
        "ss_base_model_version": BASE_MODEL_VERSION,
        "ss_network_module": "dora_network",
        "ss_network_dim": settings.network_dim,
        "ss_network_alpha": settings.network_alpha,
        "ss_network_dropout": None,
        "ss_network_args": json.dumps(dict(network_kwargs)),
        "ss_network_train_unet_only": settings.network_train_unet_only,
        "ss_sd_model_name": f"tiny_sdxl (random weights, seed {settings.seed})",
        "ss_dataset_dirs": json.dumps({settings.train_data_dir or "synthetic shapes": {"n_repeats": 1,
                                                                                         "img_count": num_images}}),
        "ss_training_comment": "dora_network smoke train",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": ARCHITECTURE,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.implementation_version": f"dora_network/{__version__}",
        "modelspec.title": settings.output_name,
        "modelspec.resolution": f"{settings.resolution}x{settings.resolution}",
        "modelspec.prediction_type": "epsilon",
        "modelspec.date": finished.replace(microsecond=0).isoformat(),
    }
    return {key: str(value) for key, value in metadata.items()}


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (shorter at the start)."""
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(total / min(index + 1, window))
    return out


def plot_loss(losses: Sequence[float], window: int, path: Path, title: str) -> None:
    """Write the raw per-step loss and its moving average as a PNG (Agg canvas; pyplot's global state untouched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    steps = range(1, len(losses) + 1)
    axes.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=0.8, label="loss")
    axes.plot(steps, moving_average(losses, window), color="tab:orange", linewidth=2.0,
              label=f"moving average ({window} steps)")
    axes.set_xlabel("step")
    axes.set_ylabel("noise-prediction MSE")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)


def key_counts(keys: Iterable[str]) -> dict[str, Any]:
    """Counts of a file's keys: total, modules, per suffix and per component (unet, te1, te2)."""
    keys = list(keys)
    modules = {key.split(".", 1)[0] for key in keys}
    suffixes = Counter(key.split(".", 1)[1] for key in keys if "." in key)
    components = Counter(name.split("_")[1] for name in modules)
    return {"keys": len(keys), "modules": len(modules), "by_suffix": dict(sorted(suffixes.items())),
            "modules_by_component": dict(sorted(components.items()))}


def state_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in key order: equal iff the weights are equal."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` as indented JSON."""
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def build_summary(settings: SmokeSettings, result: Any, checks: Sequence[Any], total_seconds: float) -> dict[str, Any]:
    """``summary.json``: the settings, the loss, every check with its numbers, the file's keys and metadata.

    Args:
        settings: the run's settings.
        result: the trainer's ``TrainResult``.
        checks: the self-checks' ``CheckResult`` s.
        total_seconds: wall time of the whole command.
    """
    from dataclasses import asdict

    from safetensors import safe_open

    with safe_open(str(result.file), framework="pt") as handle:
        keys = list(handle.keys())
        metadata = handle.metadata() or {}
    window = max(1, min(settings.loss_window, len(result.losses) // 2 or 1))
    averages = moving_average(result.losses, window)
    steps = len(result.losses)
    return {
        "settings": asdict(settings),
        "network_kwargs": settings.network_kwargs(),
        "steps": steps,
        "epochs": result.epochs,
        "num_images": result.num_images,
        "train_seconds": round(result.seconds, 3),
        "total_seconds": round(total_seconds, 3),
        "resumed_from_step": result.resumed_from,
        "it_per_s": round((steps - result.resumed_from) / result.seconds, 3) if result.seconds else None,
        "loss_window": window,
        "first_moving_average_loss": sum(result.losses[:window]) / window,
        "last_moving_average_loss": averages[-1],
        "checks": {check.name: check.as_dict() for check in checks},
        "passed": not any(check.failed for check in checks),
        "file": str(result.file.resolve()),
        "file_bytes": result.file.stat().st_size,
        "key_counts": key_counts(keys),
        "adapters": result.modules,
        "weights_sha256": result.digest,
        "metadata": {key: metadata[key] for key in sorted(metadata)
                     if key.startswith(("ss_network", "ss_base_model", "modelspec.architecture"))},
        "device": str(result.device),
        "num_processes": result.num_processes,
        "torch_threads": torch.get_num_threads(),
        "losses": [round(value, 6) for value in result.losses],
    }
