"""Pretrain the tiny UNet on the base domain (cached), then fine-tune it on the held-out concept: FT, LoRA, DoRA.

Every fine-tune starts from the same pretrained weights, draws its batches, noise and timesteps from the same seeded
generator, and runs the same number of steps with AdamW; only what is trained differs: every UNet weight (FT), or
rank-r adapters on the UNet's attention/feed-forward Linears (sd-scripts' default targets) with plain LoRA, DoRA
in-axis or DoRA out-axis. Along the way the query projections' effective weights are kept at a few checkpoints for
the paper's weight-decomposition analysis (analysis.py).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .. import create_network
from ..io import load_file, save_file
from ..smoke.model import predict_noise
from ..tiny import TinySDXL
from .data import Encoded, EvalSet

__all__ = ["METHODS", "FinetuneResult", "Settings", "eval_loss", "finetune", "pretrained_base", "query_layers"]

#: fine-tuning methods: full fine-tuning and three adapters
METHODS = ("ft", "lora", "dora_in", "dora_out")
LABELS = {"ft": "FT", "lora": "LoRA", "dora_in": "DoRA (in-axis)", "dora_out": "DoRA (out-axis)"}


@dataclass(frozen=True)
class Settings:
    """Everything that shapes a run (identical for every method; learning rates per family, as is usual)."""

    resolution: int = 128
    batch_size: int = 8
    pretrain_steps: int = 600
    pretrain_lr: float = 5e-4
    finetune_steps: int = 80
    ft_lr: float = 1e-4
    adapter_lr: float = 1e-3
    checkpoints: int = 4
    base_count: int = 256
    concept_count: int = 64
    eval_count: int = 32


def noise_loss(model: TinySDXL, latents: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
               noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The epsilon-prediction MSE sd-scripts trains with."""
    noisy = model.noise_scheduler.add_noise(latents, noise, timesteps)
    return F.mse_loss(predict_noise(model, noisy, timesteps, embeds, pooled), noise)


@torch.no_grad()
def eval_loss(model: TinySDXL, data: EvalSet, batch: int = 32) -> float:
    """Mean denoising loss over the fixed set (its own noise and timesteps): a function of the weights alone."""
    total, count = 0.0, len(data.data)
    for start in range(0, count, batch):
        index = torch.arange(start, min(start + batch, count))
        latents, embeds, pooled = data.data.batch(index)
        loss = noise_loss(model, latents, embeds, pooled, data.noise[index], data.timesteps[index])
        total += float(loss) * len(index)
    return total / count


def _train(model: TinySDXL, params: list, data: Encoded, steps: int, lr: float, batch: int, seed: int,
           on_step: Callable[[int], None] = lambda step: None) -> list[float]:
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(1, steps + 1):
        index = torch.randint(len(data), (batch,), generator=generator)
        latents, embeds, pooled = data.batch(index)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, model.noise_scheduler.config.num_train_timesteps, (batch,), generator=generator)
        loss = noise_loss(model, latents, embeds, pooled, noise, timesteps)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        on_step(step)
    return losses


def _flattened(losses: list[float]) -> float:
    """Relative change between the means of the last two tenths of the run (small: the loss has flattened)."""
    tenth = max(1, len(losses) // 10)
    last, before = sum(losses[-tenth:]) / tenth, sum(losses[-2 * tenth:-tenth]) / tenth
    return abs(before - last) / max(abs(before), 1e-12)


def pretrained_base(model: TinySDXL, data: Encoded, settings: Settings, cache_dir: Path,
                    on_step: Callable[[int], None] = lambda step: None) -> dict:
    """Train every UNet weight on the base domain, or reuse the cached result; loads it into ``model.unet``.

    Returns:
        ``{"file", "losses", "flattening", "cached"}``: the cache file, the pretraining loss curve and how much the
        loss still moved over its last tenth (relative).
    """
    key = hashlib.sha1(json.dumps({"settings": asdict(settings), "captions": data.captions}, sort_keys=True).encode()
                       + data.latents.numpy().tobytes()).hexdigest()[:12]
    path = Path(cache_dir) / f"pretrained_base_{key}.safetensors"
    if path.exists():
        state, metadata = load_file(str(path))
        model.unet.load_state_dict(state)
        losses = json.loads(metadata["evidence.pretrain_losses"])
        return {"file": str(path), "losses": losses, "flattening": _flattened(losses), "cached": True}
    model.unet.requires_grad_(True)
    model.unet.train()
    losses = _train(model, list(model.unet.parameters()), data, settings.pretrain_steps, settings.pretrain_lr,
                    settings.batch_size, seed=12345, on_step=on_step)
    model.unet.requires_grad_(False)
    model.unet.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(str(path), {k: v.detach().contiguous() for k, v in model.unet.state_dict().items()},
              {"evidence.pretrain_losses": json.dumps(losses)})
    return {"file": str(path), "losses": losses, "flattening": _flattened(losses), "cached": False}


def query_layers(model: TinySDXL) -> dict[str, torch.nn.Linear]:
    """The UNet's attention query projections (the paper's figure 2 analyses the query matrices)."""
    return {name: module for name, module in model.unet.named_modules() if name.endswith("to_q")}


@dataclass
class FinetuneResult:
    """One fine-tune: method, rank, seed, its losses, and the query weights at step 0 and each checkpoint."""

    method: str
    rank: int | None
    seed: int
    concept_loss: float = math.nan
    base_loss: float = math.nan
    train_losses: list[float] = field(default_factory=list)
    snapshots: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    trainable: int = 0
    base_unchanged: bool | None = None  # adapters: the UNet's own weights are bit for bit the base after training


def finetune(model: TinySDXL, base_state: dict[str, torch.Tensor], method: str, rank: int | None, seed: int,
             train: Encoded, concept_eval: EvalSet, base_eval: EvalSet, settings: Settings) -> FinetuneResult:
    """Fine-tune ``method`` from ``base_state`` on ``train``; the model is back at ``base_state`` afterwards.

    Raises:
        ValueError: an unknown method, or an adapter method without a rank.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}'; choose from {', '.join(METHODS)}")
    if method != "ft" and not rank:
        raise ValueError(f"method '{method}' needs a rank")
    model.unet.load_state_dict(base_state)
    queries = query_layers(model)
    result = FinetuneResult(method, rank if method != "ft" else None, seed)
    checkpoint_steps = {round(settings.finetune_steps * (i + 1) / settings.checkpoints)
                        for i in range(settings.checkpoints)}
    torch.manual_seed(seed)  # adapter initialisation
    network = None
    if method == "ft":
        model.unet.requires_grad_(True)
        params, lr = list(model.unet.parameters()), settings.ft_lr
    else:
        extra = {"algo": "lora"} if method == "lora" else {"wd_on_out": str(method == "dora_out")}
        network = create_network(1.0, rank, float(rank), None, [], model.unet, **extra)
        network.apply_to(None, model.unet, False, True)
        params, lr = list(network.get_trainable_params()), settings.adapter_lr
    by_base = {id(m.base_layer): m for m in network.loras} if network is not None else {}

    def snapshot(step: int) -> None:
        if step == 0 or step in checkpoint_steps:
            with torch.no_grad():
                result.snapshots[step] = {
                    name: (by_base[id(layer)].merged_weight(1.0) if id(layer) in by_base else layer.weight.float())
                    .detach().clone() for name, layer in queries.items()}

    result.trainable = sum(p.numel() for p in params)
    snapshot(0)
    model.unet.train()
    result.train_losses = _train(model, params, train, settings.finetune_steps, lr, settings.batch_size, seed,
                                 on_step=snapshot)
    model.unet.eval()
    if network is not None:
        network.eval()
    result.concept_loss = eval_loss(model, concept_eval)
    result.base_loss = eval_loss(model, base_eval)
    if network is not None:
        network.restore()
        result.base_unchanged = all(torch.equal(v, base_state[k]) for k, v in model.unet.state_dict().items())
    model.unet.requires_grad_(False)
    model.unet.load_state_dict(base_state)
    return result
