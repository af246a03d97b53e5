"""The tiny SDXL model as the smoke trainer uses it: built from the settings, frozen, and run on a batch.

Training and every self-check build their models here, so a reloaded or merged copy is the trained model's exact
twin (same config, same seed, same device) and a noise prediction is computed the same way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .config import SmokeSettings
from ..tiny import TinySDXL, build_tiny_sdxl, encode_prompts, load_tiny_config, make_time_ids, unet_added_cond

__all__ = ["Probe", "build_model", "freeze", "make_probe", "predict_noise", "probe_output", "text_conditioning"]


def build_model(settings: SmokeSettings, device: str | torch.device = "cpu") -> TinySDXL:
    """Build the tiny SDXL model for these settings, frozen as sd-scripts freezes its base models.

    Args:
        settings: uses ``model_config``, ``resolution`` and ``seed``.
        device: where the weights live.

    Returns:
        The model; every base parameter has ``requires_grad=False`` and every part is in eval mode.
    """
    config = load_tiny_config(settings.model_config or None)
    config["image"]["resolution"] = settings.resolution
    config["image"]["latent_size"] = settings.resolution // 8
    model = build_tiny_sdxl(config, seed=settings.seed, device=device)
    freeze(model)
    return model


def freeze(model: TinySDXL) -> None:
    """``requires_grad_(False)`` and ``eval()`` on the UNet, both text encoders and the VAE."""
    for part in (model.unet, model.vae, *model.text_encoders):
        part.requires_grad_(False)
        part.eval()


def text_conditioning(model: TinySDXL, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL text conditioning: ``(prompt_embeds (B, 77, te1+te2 hidden), pooled (B, te2 projection))``."""
    return encode_prompts(model, list(captions))


def predict_noise(
    model: TinySDXL,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
) -> torch.Tensor:
    """The UNet's noise prediction for a batch, with SDXL's added conditioning (pooled text and time ids).

    Args:
        model: the tiny model (with or without adapters applied or merged).
        noisy_latents: ``(B, 4, h, w)``.
        timesteps: ``(B,)`` integer timesteps.
        prompt_embeds: ``(B, 77, C)`` from :func:`text_conditioning`.
        pooled: ``(B, P)`` from :func:`text_conditioning`.

    Returns:
        ``(B, 4, h, w)`` predicted noise.
    """
    batch, height, width = noisy_latents.shape[0], noisy_latents.shape[2] * 8, noisy_latents.shape[3] * 8
    time_ids = make_time_ids(batch, height, width, device=noisy_latents.device, dtype=prompt_embeds.dtype)
    return model.unet(
        noisy_latents, timesteps, encoder_hidden_states=prompt_embeds,
        added_cond_kwargs=unet_added_cond(pooled, time_ids),
    ).sample


@dataclass(frozen=True)
class Probe:
    """A fixed batch on which the self-checks compare models.

    Attributes:
        noisy_latents: ``(B, 4, h, w)``.
        timesteps: ``(B,)``, spread over the schedule.
        captions: B captions.
    """

    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    captions: list[str]


def make_probe(model: TinySDXL, latents: torch.Tensor, captions: Sequence[str], seed: int, size: int = 4) -> Probe:
    """Noise the first ``size`` training latents at timesteps spread from 950 to 50, with a private generator."""
    count = min(size, latents.shape[0])
    generator = torch.Generator().manual_seed(int(seed) + 12345)
    clean = latents[:count].detach().float().cpu()
    noise = torch.randn(clean.shape, generator=generator)
    timesteps = torch.linspace(950, 50, count).round().long()
    noisy = model.noise_scheduler.add_noise(clean, noise, timesteps)
    return Probe(noisy.to(latents.device), timesteps.to(latents.device), list(captions[:count]))


@torch.no_grad()
def probe_output(model: TinySDXL, probe: Probe) -> torch.Tensor:
    """The model's float32 noise prediction on the probe (no autocast, no gradient)."""
    prompt_embeds, pooled = text_conditioning(model, probe.captions)
    return predict_noise(model, probe.noisy_latents, probe.timesteps, prompt_embeds, pooled).float()
