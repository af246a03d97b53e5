"""A stand-in for sd-scripts' ``library/anima_models.Anima`` and its Qwen3 text encoder, without sd-scripts.

Same module tree, attribute names and class names as sd-scripts' model, so adapter names come out as
``networks.lora_anima`` makes them (including the embedders, modulation and final layers its default pattern
excludes, and the LLM adapter); widths are parameters: full size on the meta device, tiny on the CPU. The forward is
a shape-faithful simplification (no RoPE, no 3-D patching) that runs every adaptable layer.
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


class Attention(nn.Module):
    """Anima's attention: ``q_proj``/``k_proj``/``v_proj``/``output_proj`` with q/k RMS norms."""

    def __init__(self, dim: int, context_dim: int | None, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(dim // heads)
        self.k_proj = nn.Linear(context_dim or dim, dim, bias=False)
        self.k_norm = RMSNorm(dim // heads)
        self.v_proj = nn.Linear(context_dim or dim, dim, bias=False)
        self.v_norm = nn.Identity()
        self.output_proj = nn.Linear(dim, dim, bias=False)
        self.output_dropout = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(b, -1, self.heads, x.shape[-1] // self.heads)).transpose(1, 2)
        k = self.k_norm(self.k_proj(context).view(b, -1, self.heads, x.shape[-1] // self.heads)).transpose(1, 2)
        v = self.v_proj(context).view(b, -1, self.heads, x.shape[-1] // self.heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.output_dropout(self.output_proj(out))


class GPT2FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.layer1 = nn.Linear(dim, hidden, bias=False)
        self.activation = nn.GELU()
        self.layer2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.activation(self.layer1(x)))


def _modulation(dim: int, hidden: int, chunks: int) -> nn.Sequential:
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, hidden, bias=False), nn.Linear(hidden, chunks * dim, bias=False))


class Block(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int, mlp_ratio: float = 4.0, adaln_dim: int = 256) -> None:
        super().__init__()
        self.layer_norm_self_attn = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.self_attn = Attention(dim, None, heads)
        self.layer_norm_cross_attn = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.cross_attn = Attention(dim, context_dim, heads)
        self.layer_norm_mlp = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = GPT2FeedForward(dim, int(dim * mlp_ratio))
        self.adaln_modulation_self_attn = _modulation(dim, adaln_dim, 3)
        self.adaln_modulation_cross_attn = _modulation(dim, adaln_dim, 3)
        self.adaln_modulation_mlp = _modulation(dim, adaln_dim, 3)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for norm, modulation, run in (
            (self.layer_norm_self_attn, self.adaln_modulation_self_attn, lambda h: self.self_attn(h)),
            (self.layer_norm_cross_attn, self.adaln_modulation_cross_attn, lambda h: self.cross_attn(h, context)),
            (self.layer_norm_mlp, self.adaln_modulation_mlp, self.mlp),
        ):
            shift, scale, gate = modulation(emb)[:, None, :].chunk(3, dim=-1)
            x = x + gate * run(norm(x) * (1 + scale) + shift)
        return x


class PatchEmbed(nn.Module):
    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Identity(), nn.Linear(in_dim, dim, bias=False))  # (Rearrange, Linear) there

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Timesteps(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(-torch.arange(self.dim // 2, dtype=torch.float32) * 9.21 / (self.dim // 2))
        angles = t.float()[:, None] * freqs[None]
        return torch.cat((angles.cos(), angles.sin()), -1)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim, dim, bias=False)
        self.activation = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.activation(self.linear_1(x)))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int, adaln_dim: int = 256) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim, bias=False)
        self.adaln_modulation = _modulation(dim, adaln_dim, 2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaln_modulation(emb)[:, None, :].chunk(2, dim=-1)
        return self.linear(self.layer_norm(x) * (1 + scale) + shift)


class AdapterAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, d = x.shape[0], x.shape[-1]
        q, k, v = (proj(t).view(b, -1, self.heads, d // self.heads).transpose(1, 2)
                   for proj, t in ((self.q_proj, x), (self.k_proj, context), (self.v_proj, context)))
        return self.o_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class LLMAdapterTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_self_attn = RMSNorm(dim)
        self.self_attn = AdapterAttention(dim, heads)
        self.norm_cross_attn = RMSNorm(dim)
        self.cross_attn = AdapterAttention(dim, heads)
        self.norm_mlp = RMSNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.norm_self_attn(x)
        x = x + self.self_attn(h, h)
        x = x + self.cross_attn(self.norm_cross_attn(x), context)
        return x + self.mlp(self.norm_mlp(x))


class LLMAdapter(nn.Module):
    def __init__(self, dim: int, heads: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(LLMAdapterTransformerBlock(dim, heads) for _ in range(depth))
        self.norm = RMSNorm(dim)

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        x = source
        for block in self.blocks:
            x = block(x, source)
        return self.norm(x)


class Anima(nn.Module):
    """Anima's DiT: 28 blocks of width 2048 with 16 heads, context 1024 from the LLM adapter (6 blocks)."""

    def __init__(self, dim: int = 2048, heads: int = 16, depth: int = 28, context_dim: int = 1024,
                 adapter_heads: int = 16, adapter_depth: int = 6, in_dim: int = 68, out_dim: int = 64,
                 adaln_dim: int = 256) -> None:
        super().__init__()
        self.x_embedder = PatchEmbed(in_dim, dim)
        self.t_embedder = nn.Sequential(Timesteps(dim), TimestepEmbedding(dim))
        self.t_embedding_norm = RMSNorm(dim)
        self.blocks = nn.ModuleList(Block(dim, context_dim, heads, adaln_dim=adaln_dim) for _ in range(depth))
        self.final_layer = FinalLayer(dim, out_dim, adaln_dim)
        self.llm_adapter = LLMAdapter(context_dim, adapter_heads, adapter_depth)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        emb = self.t_embedding_norm(self.t_embedder(timesteps))
        context = self.llm_adapter(source)
        x = self.x_embedder(x)
        for block in self.blocks:
            x = block(x, emb, context)
        return self.final_layer(x, emb)


def build_anima(device: str = "cpu", tiny: bool = False, seed: int = 0) -> Anima:
    """Anima at full size (use ``device="meta"``) or a tiny seeded copy of its tree that runs on the CPU."""
    torch.manual_seed(seed)
    with torch.device(device):
        if tiny:
            return Anima(dim=32, heads=2, depth=2, context_dim=16, adapter_heads=2, adapter_depth=1, in_dim=12,
                         out_dim=8, adaln_dim=8)
        return Anima()


def build_qwen3(device: str = "meta", tiny: bool = False, seed: int = 0) -> nn.Module:
    """Qwen3-0.6B's ``Qwen3Model`` from transformers (what anima_train_network.py passes), full or tiny."""
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    if tiny:
        config = Qwen3Config(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    else:
        config = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                             num_attention_heads=16, num_key_value_heads=8, head_dim=128)
    with torch.device(device):
        return Qwen3Model(config)
