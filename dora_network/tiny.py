"""Tiny, randomly initialised SDXL-shaped model for fast CPU tests.

Builds diffusers / transformers components with SDXL's *structure* (UNet block
layout, dual CLIP text encoders, ``text_time`` added conditioning, 8x VAE,
SDXL noise schedule) but tiny widths, from a TOML config and a seed. No
downloads: the tokenizer vocabulary ships in ``dora_network/data``.

Module import needs only ``torch``; diffusers / transformers are imported
lazily inside the functions that need them.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any

import torch

_PKG_DATA = pathlib.Path(__file__).resolve().parent / "data"
PACKAGED_CONFIG: pathlib.Path = _PKG_DATA / "tiny_sdxl.toml"
TOKENIZER_DIR: pathlib.Path = _PKG_DATA / "tiny_clip_tokenizer"
_REPO_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny_sdxl.toml"
DEFAULT_CONFIG: pathlib.Path = _REPO_CONFIG if _REPO_CONFIG.is_file() else PACKAGED_CONFIG
"""The user-editable repo config if present, else the copy shipped in the package."""


def _read_toml(path: pathlib.Path) -> dict[str, Any]:
    try:
        import tomllib  # Python >= 3.11

        with open(path, "rb") as f:
            return tomllib.load(f)
    except ImportError:  # pragma: no cover - Python 3.10
        import toml

        return toml.load(path)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_tiny_config(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Load a tiny-SDXL TOML config, filling omitted keys from the packaged defaults.

    Args:
        path: TOML file to load. ``None`` loads ``DEFAULT_CONFIG`` (the repo's
            ``configs/tiny_sdxl.toml`` when present, else the packaged copy).

    Returns:
        Nested config dict with sections ``image``, ``tokenizer``,
        ``text_encoder_1``, ``text_encoder_2``, ``unet``, ``vae``, ``scheduler``.
    """
    defaults = _read_toml(PACKAGED_CONFIG)
    return _merge(defaults, _read_toml(pathlib.Path(path) if path is not None else DEFAULT_CONFIG))


@dataclass
class TinySDXL:
    """Components of a tiny SDXL model (same roles as in sd-scripts / diffusers).

    Attributes:
        unet: ``diffusers.UNet2DConditionModel`` with SDXL's block layout.
        text_encoders: ``[CLIPTextModel, CLIPTextModelWithProjection]``.
        tokenizers: ``[CLIPTokenizer, CLIPTokenizer]``; the second pads with ``"!"`` (id 0) as SDXL's.
        vae: ``diffusers.AutoencoderKL`` (8x downsampling, ``scaling_factor`` 0.13025).
        noise_scheduler: training ``DDPMScheduler`` with SDXL's beta schedule.
        config: The resolved config dict (including derived values under ``"derived"``).
    """

    unet: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    vae: Any
    noise_scheduler: Any
    config: dict[str, Any] = field(default_factory=dict)


def _place(module: torch.nn.Module, device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    # plain nn.Module.to: diffusers' ModelMixin.to warns spuriously about fp32 modules on any dtype cast
    return torch.nn.Module.to(module, device=device, dtype=dtype)


def load_tokenizers(config: dict[str, Any] | None = None) -> list[Any]:
    """Build SDXL's two CLIP tokenizers from the shipped (or configured) vocab/merges.

    Args:
        config: Tiny config; only ``config["tokenizer"]`` is used. ``None`` uses defaults.

    Returns:
        ``[tokenizer1, tokenizer2]``; tokenizer 1 pads with ``<|endoftext|>``, tokenizer 2 with ``"!"``.
    """
    from transformers import CLIPTokenizer

    tcfg = (config or load_tiny_config()).get("tokenizer", {})
    tdir = pathlib.Path(tcfg.get("path") or TOKENIZER_DIR)
    max_len = int(tcfg.get("max_length", 77))
    vocab = json.loads((tdir / "vocab.json").read_text(encoding="utf-8"))
    lines = (tdir / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(ln.split()) for ln in lines if ln and not ln.startswith("#version")]
    tok1 = CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=max_len)
    tok2 = CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=max_len, pad_token="!")
    return [tok1, tok2]


def build_unet(cfg: dict[str, Any], seed: int) -> Any:
    """The SDXL-layout ``UNet2DConditionModel`` of a resolved config, seeded; on CPU in float32.

    Shared by :func:`build_tiny_sdxl` and the benchmark, which needs the UNet alone.
    """
    from diffusers import UNet2DConditionModel

    u, v = cfg["unet"], cfg["vae"]
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=cfg["image"]["latent_size"],
        in_channels=v["latent_channels"],
        out_channels=v["latent_channels"],
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=tuple(u["block_out_channels"]),
        layers_per_block=u["layers_per_block"],
        transformer_layers_per_block=tuple(u["transformer_layers_per_block"]),
        attention_head_dim=tuple(u["attention_head_dim"]),
        norm_num_groups=u["norm_num_groups"],
        cross_attention_dim=cfg["text_encoder_1"]["hidden_size"] + cfg["text_encoder_2"]["hidden_size"],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=u["addition_time_embed_dim"],
        projection_class_embeddings_input_dim=cfg["text_encoder_2"]["projection_dim"] + 6 * u["addition_time_embed_dim"],
    )


def build_tiny_sdxl(
    config: dict[str, Any] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> TinySDXL:
    """Build a tiny SDXL-shaped model with deterministic random weights.

    Args:
        config: Config dict (see ``load_tiny_config``); ``None`` loads the default.
            Partial dicts are merged over the packaged defaults.
        seed: Seed; each component is built after ``torch.manual_seed(seed + i)``,
            so equal seeds give bit-identical weights.
        dtype: Parameter dtype of all models.
        device: Device to place all models on.

    Returns:
        The assembled ``TinySDXL``. Parameters keep ``requires_grad=True`` and
        models are left in their default mode; freeze them as a trainer would.

    Raises:
        ValueError: If ``image.resolution`` / VAE downsampling != ``image.latent_size``.
    """
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = _merge(load_tiny_config(PACKAGED_CONFIG), config) if config is not None else load_tiny_config()
    img, u, v, s = cfg["image"], cfg["unet"], cfg["vae"], cfg["scheduler"]
    factor = 2 ** (len(v["block_out_channels"]) - 1)
    if img["resolution"] // factor != img["latent_size"] or img["resolution"] % factor:
        raise ValueError(f"resolution {img['resolution']} / vae factor {factor} != latent_size {img['latent_size']}")

    tokenizers = load_tokenizers(cfg)
    tok = tokenizers[0]
    text_encoders = []
    for i, cls in enumerate((CLIPTextModel, CLIPTextModelWithProjection)):
        tcfg = cfg[f"text_encoder_{i + 1}"]
        te_config = CLIPTextConfig(
            vocab_size=len(tok),
            max_position_embeddings=int(cfg["tokenizer"].get("max_length", 77)),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tokenizers[i].pad_token_id,
            **tcfg,
        )
        torch.manual_seed(seed + i)
        text_encoders.append(_place(cls(te_config), device, dtype))

    te_hidden = cfg["text_encoder_1"]["hidden_size"] + cfg["text_encoder_2"]["hidden_size"]
    proj_dim = cfg["text_encoder_2"]["projection_dim"]
    add_in = proj_dim + 6 * u["addition_time_embed_dim"]
    unet = build_unet(cfg, seed + 2)
    _place(unet, device, dtype)

    torch.manual_seed(seed + 3)
    nblk = len(v["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * nblk,
        up_block_types=("UpDecoderBlock2D",) * nblk,
        block_out_channels=tuple(v["block_out_channels"]),
        layers_per_block=v["layers_per_block"],
        norm_num_groups=v["norm_num_groups"],
        latent_channels=v["latent_channels"],
        sample_size=img["resolution"],
        scaling_factor=v["scaling_factor"],
        force_upcast=False,
    )
    _place(vae, device, dtype)

    noise_scheduler = DDPMScheduler(
        num_train_timesteps=s["num_train_timesteps"],
        beta_start=s["beta_start"],
        beta_end=s["beta_end"],
        beta_schedule=s["beta_schedule"],
        clip_sample=False,
    )
    cfg["derived"] = {
        "cross_attention_dim": te_hidden,
        "projection_class_embeddings_input_dim": add_in,
        "vocab_size": len(tok),
        "vae_scale_factor": factor,
    }
    return TinySDXL(unet, text_encoders, tokenizers, vae, noise_scheduler, cfg)


def encode_prompts(model: TinySDXL, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode prompts the SDXL way (no ``torch.no_grad``, so text-encoder adapters train).

    Args:
        model: The tiny model.
        prompts: Batch of captions.

    Returns:
        ``(prompt_embeds, pooled)``: ``(B, 77, te1_hidden + te2_hidden)`` from the
        penultimate hidden state of each encoder, concatenated; and ``(B, te2_proj)``
        from te2's ``text_embeds``.
    """
    embeds = []
    pooled = None
    for tok, te in zip(model.tokenizers, model.text_encoders):
        ids = tok(
            list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(next(te.parameters()).device)
        out = te(ids, output_hidden_states=True)
        embeds.append(out.hidden_states[-2])
        if hasattr(out, "text_embeds"):
            pooled = out.text_embeds
    return torch.cat(embeds, dim=-1), pooled


def make_time_ids(
    batch: int,
    height: int,
    width: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """SDXL micro-conditioning ids: original size, crop top-left (0, 0), target size.

    Args:
        batch: Batch size.
        height: Image height in pixels.
        width: Image width in pixels.
        device: Output device.
        dtype: Output dtype.

    Returns:
        Tensor ``(batch, 6)`` = ``[h, w, 0, 0, h, w]`` per row.
    """
    ids = torch.tensor([height, width, 0, 0, height, width], device=device, dtype=dtype)
    return ids.unsqueeze(0).repeat(batch, 1)


def unet_added_cond(pooled: torch.Tensor, time_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Build the UNet's ``added_cond_kwargs`` for ``addition_embed_type="text_time"``.

    Args:
        pooled: ``(B, te2_proj)`` pooled text embeddings.
        time_ids: ``(B, 6)`` from ``make_time_ids``.

    Returns:
        ``{"text_embeds": pooled, "time_ids": time_ids}``.
    """
    return {"text_embeds": pooled, "time_ids": time_ids}


def build_pipeline(model: TinySDXL) -> Any:
    """Assemble a ``StableDiffusionXLPipeline`` (Euler scheduler) from the same components.

    Args:
        model: The tiny model; its modules are shared, not copied.

    Returns:
        A ready ``diffusers.StableDiffusionXLPipeline`` (progress bar disabled, no watermarker).
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    s = model.config["scheduler"]
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=s["num_train_timesteps"],
        beta_start=s["beta_start"],
        beta_end=s["beta_end"],
        beta_schedule=s["beta_schedule"],
        timestep_spacing="leading",
        steps_offset=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=model.vae,
        text_encoder=model.text_encoders[0],
        text_encoder_2=model.text_encoders[1],
        tokenizer=model.tokenizers[0],
        tokenizer_2=model.tokenizers[1],
        unet=model.unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
