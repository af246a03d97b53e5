"""The evidence run's data: a base domain the tiny model is pretrained on and a held-out concept it never saw.

Both are the smoke trainer's synthetic coloured shapes (torch only, seeded): the base domain draws four shapes in
eight colours; the concept draws two *other* shapes (triangle, diamond) in colours that include two the base never
saw (yellow, cyan), captioned the same way ("a yellow triangle on a red background"). Images are VAE-encoded and
captions text-encoded once, with the frozen tiny VAE and text encoders, so every method trains and is measured on
the same tensors. The evaluation sets carry their own fixed noise and timesteps (:class:`EvalSet`), so a held-out
loss is a deterministic function of the UNet alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ..smoke.data import synthetic_examples
from ..tiny import TinySDXL, encode_prompts

__all__ = ["BASE_COLORS", "BASE_SHAPES", "CONCEPT_COLORS", "CONCEPT_SHAPES", "Encoded", "EvalSet", "encode",
           "eval_set"]

BASE_SHAPES = ("circle", "square", "ring", "cross")
BASE_COLORS = ("red", "green", "blue", "white", "black", "gray", "orange", "purple")
CONCEPT_SHAPES = ("triangle", "diamond")
CONCEPT_COLORS = ("yellow", "cyan", "red", "blue")


@dataclass(frozen=True)
class Encoded:
    """A dataset as the UNet sees it: latents ``(N, 4, h, w)``, prompt embeds ``(N, 77, C)``, pooled ``(N, P)``."""

    latents: torch.Tensor
    embeds: torch.Tensor
    pooled: torch.Tensor
    captions: tuple[str, ...]

    def __len__(self) -> int:
        return self.latents.shape[0]

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.latents[index], self.embeds[index], self.pooled[index]


@dataclass(frozen=True)
class EvalSet:
    """A fixed evaluation batch: data plus the noise and timesteps every method is measured with."""

    data: Encoded
    noise: torch.Tensor
    timesteps: torch.Tensor

    def digest(self) -> str:
        """SHA-1 of every tensor: equal across methods means they were measured on the same set."""
        h = hashlib.sha1()
        for t in (self.data.latents, self.data.embeds, self.data.pooled, self.noise, self.timesteps):
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


@torch.no_grad()
def encode(model: TinySDXL, count: int, seed: int, shapes: tuple[str, ...], colors: tuple[str, ...],
           resolution: int) -> Encoded:
    """Draw ``count`` images of these shapes and colours and encode them with the frozen VAE and text encoders."""
    examples = synthetic_examples(count, resolution, seed, shapes=shapes, colors=colors)
    images = torch.stack([e.image for e in examples])
    generator = torch.Generator().manual_seed(seed)
    latents = model.vae.encode(images).latent_dist.sample(generator=generator) * model.vae.config.scaling_factor
    captions = [e.caption for e in examples]
    embeds, pooled = encode_prompts(model, captions)
    return Encoded(latents, embeds, pooled, tuple(captions))


def eval_set(data: Encoded, seed: int, num_train_timesteps: int = 1000) -> EvalSet:
    """Fix noise and timesteps for ``data`` (timesteps spread evenly over the schedule, then shuffled by seed)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(data.latents.shape, generator=generator)
    spread = torch.linspace(0, num_train_timesteps - 1, len(data)).round().long()
    timesteps = spread[torch.randperm(len(data), generator=generator)]
    return EvalSet(data, noise, timesteps)
