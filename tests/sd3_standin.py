"""A stand-in for sd-scripts' ``library/sd3_models.MMDiT`` (SD3.5 Medium/Large) and its three text encoders.

Same module tree, attribute and class names as sd-scripts' model (``joint_blocks[i]`` = ``MMDiTBlock`` with a
``context_block`` and an ``x_block``, each a ``SingleDiTBlock``; the last context block pre-only; MMDiT-X's
``attn2`` in the first x blocks), so adapter names come out as ``networks.lora_sd3`` makes them. Widths are
parameters: full size on the meta device, tiny on the CPU. The forward is a shape-faithful simplification (no
positional embedding, no qk-norm) that runs every adaptable layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AttentionLinears(nn.Module):
    def __init__(self, dim: int, heads: int, pre_only: bool = False) -> None:
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _attend(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, _ = qkv.shape
    q, k, v = qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class SingleDiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, pre_only: bool = False, x_block_self_attn: bool = False) -> None:
        super().__init__()
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = AttentionLinears(dim, heads, pre_only)
        self.x_block_self_attn = x_block_self_attn
        if x_block_self_attn:
            self.attn2 = AttentionLinears(dim, heads)
        if not pre_only:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = MLP(dim, dim * 4)
        mods = 9 if x_block_self_attn else (2 if pre_only else 6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, mods * dim))

    def pre(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        mods = self.adaLN_modulation(c)[:, None].chunk(self.adaLN_modulation[1].out_features // x.shape[-1], dim=-1)
        normed = self.norm1(x)
        return self.attn.qkv(normed * (1 + mods[1]) + mods[0]), mods

    def post(self, x: torch.Tensor, attn: torch.Tensor, mods: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x = x + mods[2] * self.attn.proj(attn)
        if self.x_block_self_attn:
            qkv2 = self.attn2.qkv(self.norm1(x) * (1 + mods[7]) + mods[6])
            x = x + mods[8] * self.attn2.proj(_attend(qkv2, self.attn2.num_heads))
        return x + mods[5] * self.mlp(self.norm2(x) * (1 + mods[4]) + mods[3])


class MMDiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, pre_only: bool, x_block_self_attn: bool) -> None:
        super().__init__()
        self.context_block = SingleDiTBlock(dim, heads, pre_only=pre_only)
        self.x_block = SingleDiTBlock(dim, heads, x_block_self_attn=x_block_self_attn)

    def forward(self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx_qkv, ctx_mods = self.context_block.pre(context, c)
        x_qkv, x_mods = self.x_block.pre(x, c)
        attn = _attend(torch.cat((ctx_qkv, x_qkv), 1), self.x_block.attn.num_heads)
        ctx_attn, x_attn = attn[:, : context.shape[1]], attn[:, context.shape[1]:]
        x = self.x_block.post(x, x_attn, x_mods)
        if not self.context_block.pre_only:
            context = self.context_block.post(context, ctx_attn, ctx_mods)
        return context, x


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_size, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t_freq: torch.Tensor) -> torch.Tensor:
        return self.mlp(t_freq)


class Embedder(TimestepEmbedding):
    pass


class UnPatch(nn.Module):
    def __init__(self, dim: int, patch: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class MMDiT(nn.Module):
    """SD3.5's tree: width 64 x depth, ``depth`` heads; Medium: depth 24, MMDiT-X attn2 in blocks 0-12."""

    def __init__(self, depth: int = 24, x_block_self_attn_layers: tuple[int, ...] = tuple(range(13)),
                 hidden: int | None = None, heads: int | None = None, in_channels: int = 16, patch: int = 2,
                 adm_in_channels: int = 2048, context_dim: int = 4096, frequency_size: int = 256) -> None:
        super().__init__()
        hidden = hidden or 64 * depth
        heads = heads or depth
        self.x_embedder = PatchEmbed(patch, in_channels, hidden)
        self.t_embedder = TimestepEmbedding(hidden, frequency_size)
        self.y_embedder = Embedder(hidden, adm_in_channels)
        self.context_embedder = nn.Linear(context_dim, hidden)
        self.joint_blocks = nn.ModuleList(
            MMDiTBlock(hidden, heads, pre_only=i == depth - 1, x_block_self_attn=i in x_block_self_attn_layers)
            for i in range(depth))
        self.final_layer = UnPatch(hidden, patch, in_channels)

    def forward(self, x: torch.Tensor, t_freq: torch.Tensor, y: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        c = self.t_embedder(t_freq) + self.y_embedder(y)
        tokens, context = self.x_embedder(x), self.context_embedder(context)
        for block in self.joint_blocks:
            context, tokens = block(context, tokens, c)
        return self.final_layer(tokens, c)


def build_sd3(device: str = "cpu", tiny: bool = False, large: bool = False, seed: int = 0) -> MMDiT:
    """SD3.5 Medium (or Large) at full size (``device="meta"``), or a tiny seeded copy that runs on the CPU."""
    torch.manual_seed(seed)
    with torch.device(device):
        if tiny:
            return MMDiT(depth=3, x_block_self_attn_layers=(0,), hidden=32, heads=2, in_channels=4,
                         adm_in_channels=12, context_dim=16, frequency_size=8)
        if large:
            return MMDiT(depth=38, x_block_self_attn_layers=())
        return MMDiT()


def build_sd3_text_encoders(device: str = "meta", tiny: bool = False, seed: int = 0) -> list[nn.Module]:
    """``[CLIP-L, CLIP-G, T5-XXL encoder]`` from transformers, as sd3_train_network.py passes them."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    if tiny:
        clip_l = CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                num_attention_heads=2, max_position_embeddings=16, projection_dim=16)
        clip_g = CLIPTextConfig(vocab_size=100, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=2, max_position_embeddings=16, projection_dim=24)
        t5 = T5Config(vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    else:
        clip_l = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, max_position_embeddings=77, projection_dim=768)
        clip_g = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                num_attention_heads=20, max_position_embeddings=77, projection_dim=1280)
        t5 = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    with torch.device(device):
        return [CLIPTextModelWithProjection(clip_l), CLIPTextModelWithProjection(clip_g), T5EncoderModel(t5)]
