"""dora_network: DoRA for kohya sd-scripts (``--network_module=dora_network``), saved in LyCORIS' key layout.

The two entry points sd-scripts calls are :func:`create_network` and :func:`create_network_from_weights`. Importing
this package needs only torch and safetensors and has no side effects.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from .args import NetworkArgs, parse_network_args
from .families import detect_family
from .io import load_file
from .keys import axis_from_metadata
from .layers import DoRAModule
from .network import DoRANetwork
from .targets import normalize_text_encoders, unwrap_unet

__version__ = "0.1.0"

__all__ = [
    "DoRAModule",
    "DoRANetwork",
    "NetworkArgs",
    "__version__",
    "create_network",
    "create_network_from_weights",
    "parse_network_args",
]

logger = logging.getLogger(__name__)


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: Any,
    text_encoder: Any,
    unet: Any,
    neuron_dropout: float | None = None,
    **kwargs: Any,
) -> DoRANetwork:
    """Build a new DoRA network over ``text_encoder`` and ``unet`` (sd-scripts' default path).

    Args:
        multiplier: strength mu (1.0 in training).
        network_dim: ``--network_dim``; None means 4.
        network_alpha: ``--network_alpha``; None or 0 means alpha = rank.
        vae: unused (sd-scripts passes it).
        text_encoder: one module, or the trainer's list (``[te1, te2]`` SDXL, ``[clip_l, t5xxl]`` FLUX,
            ``[qwen3]`` Anima; None entries keep their position), or None/empty.
        unet: the UNet or DiT, or sd-scripts' gen-script wrapper with ``.delegate``.
        neuron_dropout: ``--network_dropout``.
        **kwargs: ``--network_args`` (string values); see README for every key, common and per family.

    Returns:
        The network; call ``apply_to`` before training.

    Raises:
        ValueError: a model of no known family, a bad or unknown ``network_args`` key (or one of another
            family), or options that leave no layer to adapt.
    """
    text_encoders, real_unet = normalize_text_encoders(text_encoder), unwrap_unet(unet)
    family = detect_family(real_unet, text_encoders)
    args = parse_network_args(network_dim, network_alpha, neuron_dropout, family=family, **kwargs)
    return DoRANetwork(text_encoders, real_unet, args, multiplier=float(multiplier), family=family)


def create_network_from_weights(
    multiplier: float,
    file: str | os.PathLike | None,
    vae: Any,
    text_encoder: Any,
    unet: Any,
    weights_sd: dict[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> tuple[DoRANetwork, dict[str, torch.Tensor]]:
    """Build a network shaped by a file: per layer rank, alpha, conv kind, Tucker, DoRA and axis come from it.

    Used by ``--dim_from_weights``, ``--base_weights`` and the generation scripts. Training options in
    ``kwargs`` (dropouts, LoRA+) apply; structural ones are taken from the file.

    Args:
        multiplier: strength mu (``--base_weights_multiplier`` for a merge).
        file: the ``.safetensors`` (or tensors-only ``.ckpt``/``.pt``) file; ignored if ``weights_sd`` is given.
        vae: unused.
        text_encoder: one module, a list, or None.
        unet: the UNet or a wrapper with ``.delegate``.
        weights_sd: an already loaded state dict.
        for_inference: put the network in eval mode.
        **kwargs: ``network_args``.

    Returns:
        ``(network, weights_sd)``, where ``weights_sd`` uses the network's own key names and shapes (SAI or
        diffusers UNet names resolved, 1-D ``dora_scale`` reshaped), ready for ``load_state_dict``.

    Raises:
        FileNotFoundError / ValueError: unreadable file, or one that does not fit the model (one of which only
            some modules name a layer here needs ``allow_partial_load=True`` in kwargs).
    """
    metadata: dict[str, str] = {}
    if weights_sd is None:
        if file is None:
            raise ValueError("create_network_from_weights needs a file or weights_sd")
        weights_sd, metadata = load_file(file)
    text_encoders = normalize_text_encoders(text_encoder)
    real_unet = unwrap_unet(unet)
    family = detect_family(real_unet, text_encoders)
    # which layers, ranks and kinds: all from the file (the family's layer options included)
    structural = {"algo", "conv_dim", "conv_alpha", "wd_on_out", "wd_on_output", "dora_wd", "use_tucker", "preset",
                  "network_reg_dims", *family.options}
    ignored = sorted(k for k in kwargs if k.lower() in structural)
    if ignored:
        logger.info("create_network_from_weights: %s taken from the file, not from network_args", ignored)
    args = parse_network_args(None, None, None, family=family,
                              **{k: v for k, v in kwargs.items() if k.lower() not in structural})
    probe = DoRANetwork.match_targets(text_encoders, real_unet, weights_sd, axis_from_metadata(metadata),
                                      allow_partial=args.allow_partial_load, family=family)
    network = DoRANetwork(text_encoders, real_unet, args, multiplier=float(multiplier), file_specs=probe.specs,
                          family=family)
    network.load_state_dict(probe.state_dict, strict=False)
    if for_inference:
        network.eval()
    return network, probe.state_dict
