"""Convert LoRA/DoRA files between layouts, each conversion returning its measured error (never silently lossy).

Exact conversions (the adapted weights do not change; the reported error is 0 or float rounding):

* :func:`reshape_dora_scale`: 1-D ``dora_scale`` -> LyCORIS' (1, in[, 1, 1]) / (out, 1[, 1, 1]).
* :func:`fold_alpha`: ``lora_up *= alpha / rank`` and ``alpha = rank`` (what old SD.Next needs).
* :func:`convert_unet_names`: SDXL UNet names SAI (``input_blocks_4_1_...``) <-> diffusers (``down_blocks_1_...``),
  worked out on the underscore names alone from SDXL's block table in families/sdxl.py (no model needed); ``comfy``:
  a DiT file's names as ComfyUI's model for its family spells them (HunyuanImage-2.1's ``img_mlp_0``, ...).
* :func:`classic_text_encoder_names`: ``lora_te1_encoder_...`` (transformers 5) -> ``lora_te1_text_model_encoder_...``.
* :func:`cast_dtype`: fp32 <-> fp16/bf16 (exact when widening; narrowing reports the rounding error).

Approximate conversions (need the base weights W0, see ``base_model.load_base_model``):

* :func:`dora_to_lora`: plain LoRA of a chosen rank, by truncated SVD of W' - W0 per module. A LoRA at strength s
  then gives W0 + s (W' - W0), which is exactly what every UI computes for the DoRA at strength s.
* :func:`change_axis`: DoRA with the other magnitude axis: B, A re-fitted by truncated SVD and the new magnitude
  solved exactly per row/column (alternating a few rounds), so that m2 * V2 / ||V2|| approximates W'.

Every function returns a :class:`ConversionResult` with ``max_abs_error`` and ``rel_error``; :func:`convert_file`
chains them and writes atomically with ``io.save_file``, keeping the metadata and adding
``dora_network.converted_from``. The conversions live in ``tools/exact.py`` and ``tools/refit.py`` (re-exported
here); this module is the pipeline and the ``dora-convert`` command.

Example::

    dora-convert trained.safetensors fixed.safetensors --dora_scale_2d --fold_alpha --unet_names sai
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..io import load_file, safetensors_hashes, save_file
from .base_model import load_base_model
from .cli import PRECISIONS, add_report_flags, make_parser, parse_args
from .conversion import ConversionResult
from .exact import (cast_dtype, classic_text_encoder_names, convert_unet_names, fold_alpha, reshape_dora_scale,
                    unet_lora_name)
from .file_modules import split_modules
from .refit import change_axis, dora_to_lora

logger = logging.getLogger(__name__)

__all__ = [
    "ConversionResult",
    "cast_dtype",
    "change_axis",
    "classic_text_encoder_names",
    "convert_file",
    "convert_unet_names",
    "dora_to_lora",
    "fold_alpha",
    "main",
    "reshape_dora_scale",
    "unet_lora_name",
]

CONVERTED_FROM = "dora_network.converted_from"
DTYPES = PRECISIONS  # --save_precision / --dora_scale_precision -> dtype


def _update_metadata(metadata: dict[str, str], state_dict: Mapping[str, torch.Tensor], source: str,
                     results: Sequence[ConversionResult]) -> dict[str, str]:
    out = dict(metadata)
    _, specs, _ = split_modules(state_dict)
    axes = {bool(s.wd_on_out) for s in specs.values() if s.dora}
    if "dora_network.algo" in out:
        out["dora_network.algo"] = "dora" if axes else "lora"
    if "dora_network.wd_on_out" in out:
        out["dora_network.wd_on_out"] = "mixed" if len(axes) > 1 else str(axes.pop()) if axes else "None"
    ranks = {s.rank for s in specs.values()}
    alphas = {s.alpha for s in specs.values()}
    if "ss_network_dim" in out and len(ranks) == 1:
        out["ss_network_dim"] = str(ranks.pop())
    if "ss_network_alpha" in out and len(alphas) == 1:
        out["ss_network_alpha"] = f"{alphas.pop():g}"
    out[CONVERTED_FROM] = json.dumps({
        "source": os.path.basename(source),
        "sshs_model_hash": metadata.get("sshs_model_hash"),
        "operations": [{"operation": r.operation, "exact": r.exact, "max_abs_error": r.max_abs_error,
                        "rel_error": r.rel_error} for r in results],
    })
    if "sshs_model_hash" in out or "sshs_legacy_hash" in out:  # the tensors changed: stale hashes would lie
        out["sshs_model_hash"], out["sshs_legacy_hash"] = safetensors_hashes(state_dict, out)
    return out


def convert_file(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    dora_scale_2d: bool = False,
    axis: str | None = None,
    te_names: bool = False,
    unet_names: str | None = None,
    to_lora: bool = False,
    to_axis: str | None = None,
    rank: int | None = None,
    fold_alpha_to_rank: bool = False,
    dtype: torch.dtype | None = None,
    dora_scale_dtype: torch.dtype | None = torch.float32,
    model: Any = None,
    overwrite: bool = False,
    progress: bool = False,
) -> list[ConversionResult]:
    """Apply the chosen conversions in a fixed order and write the result atomically.

    Order: 1-D ``dora_scale`` reshape, text-encoder names, UNet names, DoRA -> LoRA or axis change, alpha fold,
    dtype. Arguments as in the functions above; ``model`` is needed by ``to_lora``/``to_axis``.

    Returns:
        One :class:`ConversionResult` per conversion, in order (their ``state_dict`` is the final one's input).

    Raises:
        ValueError: nothing to do, contradictory options, a missing model, or a conversion's own errors.
        FileExistsError: ``destination`` exists and ``overwrite`` is False.
    """
    if to_lora and to_axis:
        raise ValueError("to_lora and to_axis exclude each other: a plain LoRA has no axis")
    if to_axis not in (None, "in", "out"):
        raise ValueError(f"to_axis={to_axis!r}: use 'in' or 'out'")
    if (to_lora or to_axis) and model is None:
        raise ValueError("to_lora/to_axis need the base weights: pass --model (tiny, a diffusers folder or a "
                         ".safetensors checkpoint)")
    if rank is not None and not (to_lora or to_axis):
        raise ValueError("--rank only applies to --to_lora and --to_axis")
    dst = Path(destination)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"'{dst}' exists; pass --overwrite to replace it")
    state_dict, metadata = load_file(source)
    base = load_base_model(model) if (to_lora or to_axis) else None
    steps: list[tuple[bool, Any]] = [
        (dora_scale_2d, lambda sd: reshape_dora_scale(sd, metadata, axis)),
        (te_names, classic_text_encoder_names),
        (unet_names is not None, lambda sd: convert_unet_names(sd, unet_names)),
        (to_lora, lambda sd: dora_to_lora(sd, base, rank, progress)),
        (to_axis is not None, lambda sd: change_axis(sd, base, to_axis == "out", rank, progress=progress)),
        (fold_alpha_to_rank, fold_alpha),
        (dtype is not None, lambda sd: cast_dtype(sd, dtype, dora_scale_dtype)),
    ]
    if not any(enabled for enabled, _ in steps):
        raise ValueError("no conversion chosen; see dora-convert --help")
    results: list[ConversionResult] = []
    for enabled, step in steps:
        if enabled:
            result = step(state_dict)
            logger.info("%s", result.summary())
            state_dict = result.state_dict
            results.append(result)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file(dst, tensors, _update_metadata(metadata, tensors, str(source), results))
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "dora-convert",
        "Convert a LoRA/DoRA file. Exact: --dora_scale_2d, --fold_alpha, --unet_names, --te_names, widening "
        "--save_precision. Approximate (needs --model for the base weights): --to_lora, --to_axis. Every conversion "
        "prints its measured error; the file keeps its metadata and gains dora_network.converted_from.",
        "examples:\n"
        "  # make a file every UI applies the same way (2-D dora_scale, alpha == rank, SAI names)\n"
        "  dora-convert in.safetensors out.safetensors --dora_scale_2d --fold_alpha --unet_names sai\n"
        "  # out-axis (LyCORIS default) -> in-axis, re-fitted at rank 32\n"
        "  dora-convert lyco.safetensors in_axis.safetensors --to_axis in --rank 32 --model sd_xl_base_1.0.safetensors\n"
        "  # plain LoRA for diffusers, rank 64\n"
        "  dora-convert dora.safetensors lora.safetensors --to_lora --rank 64 --model sd_xl_base_1.0.safetensors\n\n"
        "--model accepts 'tiny', a local diffusers folder or a .safetensors checkpoint (SAI single-file or\n"
        "diffusers UNet keys; weights are read lazily).",
    )
    parser.add_argument("source", help="input .safetensors")
    parser.add_argument("destination", help="output .safetensors (written atomically)")
    parser.add_argument("--dora_scale_2d", action="store_true", help="reshape 1-D dora_scale to 2-D/4-D (exact)")
    parser.add_argument("--axis", choices=("in", "out"), default=None,
                        help="axis of 1-D dora_scale on square layers, if the file does not tell")
    parser.add_argument("--fold_alpha", action="store_true", help="scale lora_up by alpha/rank, set alpha = rank")
    parser.add_argument("--unet_names", choices=("sai", "diffusers", "comfy"), default=None,
                        help="rename SDXL UNet modules to this spelling, or (comfy) a HunyuanImage-2.1 file's "
                             "to ComfyUI's (exact)")
    parser.add_argument("--te_names", choices=("classic",), default=None,
                        help="rename transformers-5 text-encoder names to lora_te1_text_model_... (exact)")
    parser.add_argument("--to_lora", action="store_true", help="DoRA -> plain LoRA by truncated SVD (needs --model)")
    parser.add_argument("--to_axis", choices=("in", "out"), default=None,
                        help="re-fit DoRA modules to this magnitude axis (needs --model)")
    parser.add_argument("--rank", type=int, default=None, help="rank for --to_lora/--to_axis (default: keep)")
    parser.add_argument("--save_precision", choices=("float", "fp16", "bf16"), default=None,
                        help="dtype of lora_down/lora_up/lora_mid")
    parser.add_argument("--dora_scale_precision", choices=("float", "fp16", "bf16"), default="float",
                        help="dtype of dora_scale with --save_precision (default float)")
    parser.add_argument("--model", default=None, help="base model: tiny, a diffusers folder or a checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    add_report_flags(parser, "print the results as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``dora-convert``; returns 0, or 2 when the input, model or options are rejected."""
    args = parse_args(build_parser(), argv)
    try:
        results = convert_file(
            args.source, args.destination, dora_scale_2d=args.dora_scale_2d, axis=args.axis,
            te_names=args.te_names is not None, unet_names=args.unet_names, to_lora=args.to_lora,
            to_axis=args.to_axis, rank=args.rank, fold_alpha_to_rank=args.fold_alpha,
            dtype=None if args.save_precision is None else DTYPES[args.save_precision],
            dora_scale_dtype=DTYPES[args.dora_scale_precision], model=args.model, overwrite=args.overwrite,
            progress=not args.json,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        logger.error("%s", error)
        return 2
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        for result in results:
            print(result.summary())
            for note in result.notes:
                print(f"  note: {note}")
        print(f"wrote {args.destination}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
