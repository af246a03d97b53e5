"""A stand-in for sd-scripts' ``library/hunyuan_image_models.HYImageDiffusionTransformer`` (HunyuanImage-2.1).

Same module tree, attribute and class names as sd-scripts' model (``double_blocks`` of ``MMDoubleStreamBlock``
with ``img_attn_qkv``/``img_mod.linear``/``img_mlp.fc1``, ``single_blocks`` of ``MMSingleStreamBlock`` with
fused ``linear1``), so adapter names come out as ``networks.lora_hunyuan_image`` makes them. The 17 B model builds
on the meta device (names, shapes); the same block classes at reduced width run on the CPU. The forward is a
shape-faithful simplification (no RoPE, no qk-norm) that runs every adaptable layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ModulateDiT(nn.Module):
    def __init__(self, dim: int, factor: int) -> None:
        super().__init__()
        self.factor = factor
        self.act = nn.SiLU()
        self.linear = nn.Linear(dim, factor * dim, bias=True)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(self.act(vec))[:, None].chunk(self.factor, dim=-1)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, n, _ = qkv.shape
    q, k, v = qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class MMDoubleStreamBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.heads = heads
        mlp = int(dim * mlp_ratio)
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", ModulateDiT(dim, 6))
            setattr(self, f"{stream}_norm1", nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{stream}_attn_qkv", nn.Linear(dim, dim * 3, bias=True))
            setattr(self, f"{stream}_attn_proj", nn.Linear(dim, dim, bias=True))
            setattr(self, f"{stream}_norm2", nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{stream}_mlp", MLP(dim, mlp))

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.img_mod(vec)
        t = self.txt_mod(vec)
        iq, ik, iv = _heads(self.img_attn_qkv(self.img_norm1(img) * (1 + i[1]) + i[0]), self.heads)
        tq, tk, tv = _heads(self.txt_attn_qkv(self.txt_norm1(txt) * (1 + t[1]) + t[0]), self.heads)
        attn = _attend(torch.cat((iq, tq), 2), torch.cat((ik, tk), 2), torch.cat((iv, tv), 2))
        img_attn, txt_attn = attn[:, : img.shape[1]], attn[:, img.shape[1]:]
        img = img + i[2] * self.img_attn_proj(img_attn)
        img = img + i[5] * self.img_mlp(self.img_norm2(img) * (1 + i[4]) + i[3])
        txt = txt + t[2] * self.txt_attn_proj(txt_attn)
        txt = txt + t[5] * self.txt_mlp(self.txt_norm2(txt) * (1 + t[4]) + t[3])
        return img, txt


class MMSingleStreamBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.heads, self.dim, self.mlp_hidden = heads, dim, int(dim * mlp_ratio)
        self.linear1 = nn.Linear(dim, dim * 3 + self.mlp_hidden)  # q, k, v and the MLP input, fused
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim)
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = ModulateDiT(dim, 3)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = self.linear1(self.pre_norm(x) * (1 + scale) + shift).split([3 * self.dim, self.mlp_hidden], -1)
        return x + gate * self.linear2(torch.cat((_attend(*_heads(qkv, self.heads)), self.mlp_act(mlp)), 2))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=True))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None].chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class HYImageDiffusionTransformer(nn.Module):
    """HunyuanImage-2.1's tree: width 3584, 28 heads, 20 double + 40 single blocks, 64 latent channels."""

    def __init__(self, dim: int = 3584, heads: int = 28, depth_double: int = 20, depth_single: int = 40,
                 in_channels: int = 64, text_dim: int = 3584, frequency_size: int = 256) -> None:
        super().__init__()
        self.img_in = nn.Linear(in_channels, dim)
        self.txt_in = nn.Linear(text_dim, dim)
        self.time_in = nn.Sequential(nn.Linear(frequency_size, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.double_blocks = nn.ModuleList(MMDoubleStreamBlock(dim, heads) for _ in range(depth_double))
        self.single_blocks = nn.ModuleList(MMSingleStreamBlock(dim, heads) for _ in range(depth_single))
        self.final_layer = FinalLayer(dim, in_channels)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, t_freq: torch.Tensor) -> torch.Tensor:
        vec = self.time_in(t_freq)
        img, txt = self.img_in(img), self.txt_in(txt)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec)
        x = torch.cat((img, txt), 1)
        for block in self.single_blocks:
            x = block(x, vec)
        return self.final_layer(x[:, : img.shape[1]], vec)


def build_hunyuan_image(device: str = "cpu", tiny: bool = False, seed: int = 0) -> HYImageDiffusionTransformer:
    """HunyuanImage-2.1 at full size (``device="meta"``), or its block classes at reduced width on the CPU."""
    torch.manual_seed(seed)
    with torch.device(device):
        if tiny:
            return HYImageDiffusionTransformer(dim=32, heads=2, depth_double=2, depth_single=2, in_channels=8,
                                               text_dim=16, frequency_size=8)
        return HYImageDiffusionTransformer()
