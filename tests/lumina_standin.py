"""A stand-in for sd-scripts' ``library/lumina_models.NextDiT`` (Lumina-Image 2.0, NextDiT-2B) and its Gemma2.

Same module tree, attribute and class names as sd-scripts' model (``noise_refiner``/``context_refiner``/``layers``
of ``JointTransformerBlock``, ``FinalLayer``, the embedders), so adapter names come out as ``networks.lora_lumina``
makes them. Widths are parameters: full size on the meta device, tiny on the CPU. The forward is a shape-faithful
simplification (no RoPE, no padding masks) that runs every adaptable layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class JointAttention(nn.Module):
    """Fused grouped-query projection: q has ``heads``, k and v ``kv_heads`` heads."""

    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(heads * self.head_dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                                     self.kv_heads * self.head_dim], dim=-1)
        q = self.q_norm(q.view(b, n, self.heads, -1)).transpose(1, 2)
        k = self.k_norm(k.view(b, n, self.kv_heads, -1)).transpose(1, 2)
        v = v.view(b, n, self.kv_heads, -1).transpose(1, 2)
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class JointTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, ffn: int, cond: int, modulation: bool) -> None:
        super().__init__()
        self.attention = JointAttention(dim, heads, kv_heads)
        self.feed_forward = FeedForward(dim, ffn)
        self.attention_norm1, self.attention_norm2 = RMSNorm(dim), RMSNorm(dim)
        self.ffn_norm1, self.ffn_norm2 = RMSNorm(dim), RMSNorm(dim)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond, 4 * dim, bias=True))

    def forward(self, x: torch.Tensor, adaln: torch.Tensor | None) -> torch.Tensor:
        if not self.modulation:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x)))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln)[:, None].chunk(4, dim=-1)
        x = x + torch.tanh(gate_msa) * self.attention_norm2(self.attention(self.attention_norm1(x) * (1 + scale_msa)))
        return x + torch.tanh(gate_mlp) * self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp)))


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t_freq: torch.Tensor) -> torch.Tensor:
        return self.mlp(t_freq)


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int, cond: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond, dim, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm_final(x) * (1 + self.adaLN_modulation(c)[:, None]))


class NextDiT(nn.Module):
    """NextDiT-2B's tree by default: width 2304, 24 heads / 8 kv heads, 26 layers, 2 + 2 refiner blocks."""

    def __init__(self, dim: int = 2304, heads: int = 24, kv_heads: int = 8, layers: int = 26, refiners: int = 2,
                 ffn: int = 9216, cap_feat_dim: int = 2304, patch_in: int = 64, frequency_size: int = 256) -> None:
        super().__init__()
        cond = min(dim, 1024)
        self.x_embedder = nn.Linear(patch_in, dim, bias=True)
        self.noise_refiner = nn.ModuleList(JointTransformerBlock(dim, heads, kv_heads, ffn, cond, True)
                                           for _ in range(refiners))
        self.context_refiner = nn.ModuleList(JointTransformerBlock(dim, heads, kv_heads, ffn, cond, False)
                                             for _ in range(refiners))
        self.t_embedder = TimestepEmbedder(cond, frequency_size)
        self.cap_embedder = nn.Sequential(RMSNorm(cap_feat_dim), nn.Linear(cap_feat_dim, dim, bias=True))
        self.layers = nn.ModuleList(JointTransformerBlock(dim, heads, kv_heads, ffn, cond, True)
                                    for _ in range(layers))
        self.norm_final = RMSNorm(dim)
        self.final_layer = FinalLayer(dim, patch_in, cond)

    def forward(self, x: torch.Tensor, t_freq: torch.Tensor, cap_feats: torch.Tensor) -> torch.Tensor:
        adaln = self.t_embedder(t_freq)
        img, cap = self.x_embedder(x), self.cap_embedder(cap_feats)
        for block in self.noise_refiner:
            img = block(img, adaln)
        for block in self.context_refiner:
            cap = block(cap, None)
        joint = torch.cat((cap, img), 1)
        for block in self.layers:
            joint = block(joint, adaln)
        return self.final_layer(joint[:, cap.shape[1]:], adaln)


def build_lumina(device: str = "cpu", tiny: bool = False, seed: int = 0) -> NextDiT:
    """NextDiT-2B at full size (``device="meta"``) or a tiny seeded copy of its tree that runs on the CPU."""
    torch.manual_seed(seed)
    with torch.device(device):
        if tiny:
            return NextDiT(dim=32, heads=4, kv_heads=2, layers=2, refiners=1, ffn=48, cap_feat_dim=16, patch_in=8,
                           frequency_size=8)
        return NextDiT()


def build_gemma2(device: str = "meta", tiny: bool = False, seed: int = 0) -> nn.Module:
    """Gemma-2-2B's ``Gemma2Model`` from transformers, as lumina_train_network.py passes it."""
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    if tiny:
        config = Gemma2Config(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    else:
        config = Gemma2Config(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                              num_attention_heads=8, num_key_value_heads=4, head_dim=256)
    with torch.device(device):
        return Gemma2Model(config)
