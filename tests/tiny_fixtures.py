"""Test support: a frozen tiny SDXL model and one sd-scripts-style training step, shared by several test files."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dora_network import tiny

PROMPTS = ["a red circle on a blue background", "a green square on a white background"]


def frozen_tiny_sdxl(seed: int = 0) -> tiny.TinySDXL:
    """The tiny model with every base weight frozen, as train_network.py leaves it."""
    model = tiny.build_tiny_sdxl(seed=seed)
    for module in [model.unet, model.vae, *model.text_encoders]:
        module.requires_grad_(False)
        module.eval()
    return model


def batch(seed: int = 0, size: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(size, 4, 16, 16, generator=gen)
    noise = torch.randn(size, 4, 16, 16, generator=gen)
    timesteps = torch.randint(0, 1000, (size,), generator=gen)
    return {"latents": latents, "noise": noise, "timesteps": timesteps}


def unet_output(model: tiny.TinySDXL, data: dict[str, torch.Tensor], prompts=PROMPTS) -> torch.Tensor:
    """Noise prediction for ``data`` (text encoders run, so TE adapters count)."""
    embeds, pooled = tiny.encode_prompts(model, list(prompts))
    noisy = model.noise_scheduler.add_noise(data["latents"], data["noise"], data["timesteps"])
    noisy.requires_grad_(True)  # sd-scripts does this so checkpointed blocks give adapter gradients
    time_ids = tiny.make_time_ids(noisy.shape[0], 128, 128)
    return model.unet(noisy, data["timesteps"], embeds, added_cond_kwargs=tiny.unet_added_cond(pooled, time_ids)).sample


def loss_of(model: tiny.TinySDXL, data: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(unet_output(model, data), data["noise"])
