"""Stand-in SDXL models for adapter *name and shape* tests.

``build_sai_sdxl_unet`` mirrors the module tree of kohya-ss/sd-scripts' ``library/sdxl_original_unet.py``
(``SdxlUNet2DConditionModel``): the SAI/"sgm" attribute paths (``input_blocks.N.M``, ``middle_block.N``,
``output_blocks.N.M``, ``time_embed.0/2``, ``label_emb.0.0/0.2``, ``out.2``), the container class names
(``ResnetBlock2D``, ``Downsample2D``, ``Upsample2D``, ``Transformer2DModel``, ``BasicTransformerBlock``,
``CrossAttention``, ``FeedForward``, ``GEGLU``, ``GroupNorm32``) and the places and registration order of the
plain ``nn.Linear``/``nn.Conv2d``/norm children, so networks that pick modules by class name (as sd-scripts'
``networks/lora.py`` does) get the same adapter names as on the real model. Independent test code, not a copy.

Defaults on ``device="meta"`` give the real SDXL shapes at no memory cost; small arguments (e.g.
``model_channels=32, transformer_depth=(0, 1, 1), context_dim=64, num_head_channels=16``) give a small CPU
model with the same naming pattern and a simple forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm subclass, named as in sd-scripts (used in resnets and ``out.0``)."""


class ResnetBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, emb_dim: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(32, in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        # index 2 is a placeholder (dropout slot) so that the conv sits at ``out_layers.3``
        self.out_layers = nn.Sequential(
            GroupNorm32(32, out_channels), nn.SiLU(), nn.Identity(), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None].to(x.dtype)
        return self.skip_connection(x) + self.out_layers(h)


class Downsample2D(nn.Module):
    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample2D(nn.Module):
    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if context is None else context
        b, n, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(ctx)), split(self.to_v(ctx)))
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        inner = dim * 4
        # [GEGLU (proj: dim -> 8*dim), dropout placeholder, Linear 4*dim -> dim]
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int) -> None:
        super().__init__()
        # registration order (attn1, ff, attn2, norms) matches sd-scripts
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    """SDXL flavour: linear ``proj_in``/``proj_out`` around the transformer blocks."""

    def __init__(self, channels: int, heads: int, dim_head: int, context_dim: int, depth: int) -> None:
        super().__init__()
        inner = heads * dim_head
        if inner != channels:
            raise ValueError(f"heads*dim_head ({inner}) must equal channels ({channels})")
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)]
        )
        self.proj_out = nn.Linear(inner, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(b, hgt * wid, c))
        for block in self.transformer_blocks:
            h = block(h, context)
        h = self.proj_out(h).reshape(b, hgt, wid, c).permute(0, 3, 1, 2)
        return h + x


class SdxlUNet2DConditionModel(nn.Module):
    """Module tree of sd-scripts' SDXL U-Net (two resnets per level, three per output level)."""

    def __init__(
        self,
        model_channels: int = 320,
        channel_mult: Sequence[int] = (1, 2, 4),
        transformer_depth: Sequence[int] = (0, 2, 10),
        context_dim: int = 2048,
        adm_in_channels: int = 2816,
        num_head_channels: int = 64,
        in_channels: int = 4,
        out_channels: int = 4,
    ) -> None:
        super().__init__()
        if len(channel_mult) != len(transformer_depth):
            raise ValueError("channel_mult and transformer_depth must have the same length")
        mc = self.model_channels = model_channels
        emb_dim = self.time_embed_dim = model_channels * 4
        self.in_channels, self.out_channels, self.adm_in_channels = in_channels, out_channels, adm_in_channels

        def transformer(ch: int, depth: int) -> Transformer2DModel:
            heads = max(1, ch // num_head_channels)
            return Transformer2DModel(ch, heads, ch // heads, context_dim, depth)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Sequential(
            nn.Sequential(nn.Linear(adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        )

        self.input_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(in_channels, mc, 3, padding=1))])
        skip_channels, ch = [mc], mc
        last = len(channel_mult) - 1
        for level, (mult, depth) in enumerate(zip(channel_mult, transformer_depth)):
            for _ in range(2):
                layers: list[nn.Module] = [ResnetBlock2D(ch, mult * mc, emb_dim)]
                ch = mult * mc
                if depth > 0:
                    layers.append(transformer(ch, depth))
                self.input_blocks.append(nn.ModuleList(layers))
                skip_channels.append(ch)
            if level != last:
                self.input_blocks.append(nn.Sequential(Downsample2D(ch, ch)))
                skip_channels.append(ch)

        mid: list[nn.Module] = [ResnetBlock2D(ch, ch, emb_dim)]
        if transformer_depth[-1] > 0:
            mid.append(transformer(ch, transformer_depth[-1]))
        mid.append(ResnetBlock2D(ch, ch, emb_dim))
        self.middle_block = nn.ModuleList(mid)

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            mult, depth = channel_mult[level], transformer_depth[level]
            for i in range(3):
                layers = [ResnetBlock2D(ch + skip_channels.pop(), mult * mc, emb_dim)]
                ch = mult * mc
                if depth > 0:
                    layers.append(transformer(ch, depth))
                if level > 0 and i == 2:
                    layers.append(Upsample2D(ch, ch))
                self.output_blocks.append(nn.ModuleList(layers))

        self.out = nn.ModuleList([GroupNorm32(32, mc), nn.SiLU(), nn.Conv2d(mc, out_channels, 3, padding=1)])

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """Simple forward (SDPA attention, no checkpointing); H and W must be divisible by 2**(levels-1)."""
        half = self.model_channels // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
        args = timesteps.expand(x.shape[0]).float()[:, None] * freqs[None]
        t_emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(x.dtype)
        emb = self.time_embed(t_emb) + self.label_emb(y)

        def run(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
            for layer in block:
                if isinstance(layer, ResnetBlock2D):
                    h = layer(h, emb)
                elif isinstance(layer, Transformer2DModel):
                    h = layer(h, context)
                else:
                    h = layer(h)
            return h

        skips: list[torch.Tensor] = []
        h = x
        for block in self.input_blocks:
            h = run(block, h)
            skips.append(h)
        h = run(self.middle_block, h)
        for block in self.output_blocks:
            h = run(block, torch.cat([h, skips.pop()], dim=1))
        return run(self.out, h)


def build_sai_sdxl_unet(
    model_channels: int = 320,
    channel_mult: Sequence[int] = (1, 2, 4),
    transformer_depth: Sequence[int] = (0, 2, 10),
    context_dim: int = 2048,
    adm_in_channels: int = 2816,
    num_head_channels: int = 64,
    device: str | torch.device = "meta",
) -> nn.Module:
    """Build the sd-scripts-shaped SDXL U-Net; defaults give the real SDXL shapes (on meta: instant, no memory)."""
    with torch.device(device):
        return SdxlUNet2DConditionModel(
            model_channels, tuple(channel_mult), tuple(transformer_depth),
            context_dim, adm_in_channels, num_head_channels,
        )


def build_sdxl_text_encoders(device: str | torch.device = "meta") -> list[nn.Module]:
    """[te1, te2] with sd-scripts' SDXL configs: CLIPTextModel (ViT-L) and CLIPTextModelWithProjection (bigG).

    Note: in transformers 5.x ``CLIPTextModel`` has no ``text_model`` attribute level (its layers are at
    ``encoder.layers.N``), while ``CLIPTextModelWithProjection`` keeps ``text_model.encoder.layers.N``.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    common = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5, dropout=0.0,
                  attention_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    cfg1 = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          hidden_act="quick_gelu", projection_dim=768, **common)
    cfg2 = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                          hidden_act="gelu", projection_dim=1280, **common)
    with torch.device(device):
        return [CLIPTextModel(cfg1), CLIPTextModelWithProjection(cfg2)]
