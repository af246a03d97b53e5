"""SDXL UNet module paths in both spellings: SAI/sgm (``input_blocks.4.1...``, sd-scripts, ComfyUI, A1111) and
diffusers (``down_blocks.1.attentions.0...``), so a file written against either tree loads on the other.

The table follows SDXL's layout: three down blocks (the first without attention), two layers per block, a mid block,
three up blocks (the last without attention). Transformer internals have the same names in both spellings;
resnet internals differ (``in_layers.2`` = ``conv1``, ``emb_layers.1`` = ``time_emb_proj``, ...).
"""

from __future__ import annotations

from functools import lru_cache

__all__ = ["diffusers_to_sai", "sai_to_diffusers"]

_RESNET_PARTS = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
)


@lru_cache(maxsize=None)
def _block_pairs() -> tuple[tuple[str, str, bool], ...]:
    """(sai_prefix, diffusers_prefix, is_resnet) for every SDXL UNet block; pure function of the layout."""
    layers, blocks = 2, 3
    down_attn, up_attn = (False, True, True), (True, True, False)
    pairs: list[tuple[str, str, bool]] = [
        ("input_blocks.0.0", "conv_in", False),
        ("time_embed.0", "time_embedding.linear_1", False),
        ("time_embed.2", "time_embedding.linear_2", False),
        ("label_emb.0.0", "add_embedding.linear_1", False),
        ("label_emb.0.2", "add_embedding.linear_2", False),
        ("out.0", "conv_norm_out", False),
        ("out.2", "conv_out", False),
        ("middle_block.0", "mid_block.resnets.0", True),
        ("middle_block.1", "mid_block.attentions.0", False),
        ("middle_block.2", "mid_block.resnets.1", True),
    ]
    for i in range(blocks):
        for j in range(layers):
            n = 1 + i * (layers + 1) + j
            pairs.append((f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}", True))
            if down_attn[i]:
                pairs.append((f"input_blocks.{n}.1", f"down_blocks.{i}.attentions.{j}", False))
        if i < blocks - 1:
            pairs.append((f"input_blocks.{1 + i * (layers + 1) + layers}.0.op", f"down_blocks.{i}.downsamplers.0.conv", False))
        for j in range(layers + 1):
            n = i * (layers + 1) + j
            pairs.append((f"output_blocks.{n}.0", f"up_blocks.{i}.resnets.{j}", True))
            if up_attn[i]:
                pairs.append((f"output_blocks.{n}.1", f"up_blocks.{i}.attentions.{j}", False))
        if i < blocks - 1:
            slot = 2 if up_attn[i] else 1
            pairs.append((f"output_blocks.{i * (layers + 1) + layers}.{slot}.conv", f"up_blocks.{i}.upsamplers.0.conv", False))
    return tuple(pairs)


def _convert(path: str, to_diffusers: bool) -> str | None:
    best: tuple[str, str, bool] | None = None
    for sai, diff, is_resnet in _block_pairs():
        src = sai if to_diffusers else diff
        if (path == src or path.startswith(src + ".")) and (best is None or len(src) > len(best[0])):
            best = (src, diff if to_diffusers else sai, is_resnet)
    if best is None:
        return None
    src, dst, is_resnet = best
    rest = path[len(src):].lstrip(".")
    if is_resnet and rest:
        for sai_part, diff_part in _RESNET_PARTS:
            part_src, part_dst = (sai_part, diff_part) if to_diffusers else (diff_part, sai_part)
            if rest == part_src or rest.startswith(part_src + "."):
                rest = part_dst + rest[len(part_src):]
                break
        else:
            return None
    return f"{dst}.{rest}" if rest else dst


def sai_to_diffusers(path: str) -> str | None:
    """``input_blocks.4.1.proj_in`` -> ``down_blocks.1.attentions.0.proj_in``; None if not an SDXL UNet path."""
    return _convert(path, True)


def diffusers_to_sai(path: str) -> str | None:
    """Inverse of :func:`sai_to_diffusers`; None if not an SDXL UNet path."""
    return _convert(path, False)
