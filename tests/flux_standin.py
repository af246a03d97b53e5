"""A stand-in for sd-scripts' ``library/flux_models.Flux`` (FLUX.1-dev) and its text encoders, without sd-scripts.

Same module tree, attribute names and class names as sd-scripts' model (what network modules see), so adapter
names come out as sd-scripts' ``networks.lora_flux`` makes them; widths and depth are parameters, so the full model
builds on the meta device (names, shapes) and a tiny one runs on the CPU (forward, merge, save/load). The forward
is a faithful-in-shape simplification (no RoPE): enough to run every adapted layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool) -> None:
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)


def _heads(qkv: torch.Tensor, heads: int, norm: QKNorm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, n, _ = qkv.shape
    q, k, v = qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return norm.query_norm(q), norm.key_norm(k), v


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        mlp = int(hidden * mlp_ratio)
        self.num_heads = heads
        self.img_mod = Modulation(hidden, double=True)
        self.img_norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden, heads)
        self.img_norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.img_mlp = nn.Sequential(nn.Linear(hidden, mlp, bias=True), nn.GELU(approximate="tanh"),
                                     nn.Linear(mlp, hidden, bias=True))
        self.txt_mod = Modulation(hidden, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden, heads)
        self.txt_norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = nn.Sequential(nn.Linear(hidden, mlp, bias=True), nn.GELU(approximate="tanh"),
                                     nn.Linear(mlp, hidden, bias=True))

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)
        iq, ik, iv = _heads(self.img_attn.qkv((1 + i_scale1) * self.img_norm1(img) + i_shift1), self.num_heads,
                            self.img_attn.norm)
        tq, tk, tv = _heads(self.txt_attn.qkv((1 + t_scale1) * self.txt_norm1(txt) + t_shift1), self.num_heads,
                            self.txt_attn.norm)
        attn = _attend(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2))
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]
        img = img + i_gate1 * self.img_attn.proj(img_attn)
        img = img + i_gate2 * self.img_mlp((1 + i_scale2) * self.img_norm2(img) + i_shift2)
        txt = txt + t_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + t_gate2 * self.txt_mlp((1 + t_scale2) * self.txt_norm2(txt) + t_shift2)
        return img, txt


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.hidden_size = hidden
        self.num_heads = heads
        self.mlp_hidden_dim = int(hidden * mlp_ratio)
        self.linear1 = nn.Linear(hidden, hidden * 3 + self.mlp_hidden_dim)  # q, k, v and the MLP input, fused
        self.linear2 = nn.Linear(hidden + self.mlp_hidden_dim, hidden)
        self.norm = QKNorm(hidden // heads)
        self.pre_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden, double=False)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1((1 + scale) * self.pre_norm(x) + shift),
                               [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = _heads(qkv, self.num_heads, self.norm)
        return x + gate * self.linear2(torch.cat((_attend(q, k, v), self.mlp_act(mlp)), 2))


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden, bias=True))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear((1 + scale) * self.norm_final(x) + shift)


class Flux(nn.Module):
    """FLUX.1-dev's tree: hidden 3072, 24 heads, 19 double + 38 single blocks, 64 latent channels by default."""

    def __init__(self, hidden: int = 3072, heads: int = 24, depth: int = 19, depth_single: int = 38,
                 in_channels: int = 64, context_dim: int = 4096, vec_dim: int = 768, guidance: bool = True) -> None:
        super().__init__()
        self.img_in = nn.Linear(in_channels, hidden, bias=True)
        self.time_in = MLPEmbedder(256, hidden)
        self.vector_in = MLPEmbedder(vec_dim, hidden)
        self.guidance_in = MLPEmbedder(256, hidden) if guidance else nn.Identity()
        self.txt_in = nn.Linear(context_dim, hidden)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(hidden, heads) for _ in range(depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(hidden, heads) for _ in range(depth_single))
        self.final_layer = LastLayer(hidden, in_channels)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor,
                guidance: torch.Tensor) -> torch.Tensor:
        vec = self.time_in(timesteps) + self.vector_in(y)
        if isinstance(self.guidance_in, MLPEmbedder):
            vec = vec + self.guidance_in(guidance)
        img, txt = self.img_in(img), self.txt_in(txt)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec)
        x = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            x = block(x, vec)
        return self.final_layer(x[:, txt.shape[1]:], vec)


def build_flux(device: str = "cpu", tiny: bool = False, seed: int = 0) -> Flux:
    """FLUX.1-dev at full size (use ``device="meta"``) or a tiny seeded copy of its tree that runs on the CPU."""
    torch.manual_seed(seed)
    with torch.device(device):
        if tiny:
            return Flux(hidden=32, heads=2, depth=2, depth_single=2, in_channels=8, context_dim=16, vec_dim=12)
        return Flux()


def build_flux_text_encoders(device: str = "meta", tiny: bool = False, seed: int = 0) -> list[nn.Module]:
    """``[CLIP-L, T5-XXL encoder]`` from transformers, as flux_train_network.py passes them."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    if tiny:
        clip = CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=16)
        t5 = T5Config(vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    else:
        clip = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
        t5 = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    with torch.device(device):
        return [CLIPTextModel(clip), T5EncoderModel(t5)]
