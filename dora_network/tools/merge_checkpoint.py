"""Bake DoRA/LoRA files into a checkpoint (SDXL/SD diffusers folder, or an SD/SDXL/SD3.5/FLUX.1 single file),
streaming tensor by tensor.

Each file ``k`` with strength ``s_k`` is applied in the order given, against the weights as merged so far:
``W_k = W_{k-1} + s_k * (W'_k(W_{k-1}) - W_{k-1})`` with ``W'_k`` the file's DoRA (or LoRA) weight built on
``W_{k-1}`` (strength applied outside, as every UI does). This equals merging the files one after the other with
``merge_to``; the intermediate weights stay in float32 and are cast once, at the end, to the output dtype. The
per-module math is :meth:`dora_network.DoRAModule.merged_weight`, run on a stand-in layer holding the tensor.

Layouts: a diffusers folder (``unet/``, ``text_encoder/``, ``text_encoder_2/`` safetensors; every other file is
copied) or a single SAI ``.safetensors`` (``model.diffusion_model.*``, TE1 ``conditioner.embedders.0.transformer.
text_model.*``, TE2 in OpenCLIP form ``conditioner.embedders.1.model.transformer.resblocks.N.*`` whose fused
``attn.in_proj_weight`` (3d, d) holds q, k, v; a q/k/v module updates its row slice), an SD3.5 single file
(``model.diffusion_model.joint_blocks.*``, ``text_encoders.clip_l|clip_g|t5xxl.transformer.*``) or BFL's FLUX.1 file
(bare ``double_blocks.*``/``single_blocks.*``; fused ``qkv``/``linear1`` are one module each). File module names in
either
UNet spelling (SAI or diffusers) and TE names with or without ``text_model_`` resolve through loading.match_file.
The key mapping is ``checkpoint_layout``'s, shared with dora-inspect and dora-convert.

Memory: the base's safetensors files are read one tensor at a time with plain file reads (not ``safe_open``'s mmap,
whose touched pages stay resident: ~one model copy of RSS) and written by a streaming safetensors writer, so the
peak is about one tensor plus the adapter files (``safetensors_stream``). Output goes to a temporary path and is
renamed into place.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..io import load_file
from ..keys import ModuleSpec
from ..layers import DoRAModule
from ..loading import check_coverage, match_file
from ..targets import Target
from .checkpoint_layout import SAI_UNET, Site, scan_targets, stand_in
from .cli import PRECISIONS, make_parser, parse_args, progress_bar
from .safetensors_stream import read_header, stream_copy

logger = logging.getLogger(__name__)

__all__ = ["FileReport", "MergeReport", "main", "merge_into_checkpoint"]

_DIFFUSERS_PARTS = {"unet": "unet", "text_encoder": "te1", "text_encoder_2": "te2"}
SAVE_PRECISIONS = PRECISIONS
Plan = dict[str, list[tuple[float, ModuleSpec, dict]]]  # lora_name -> (strength, spec, tensors) per file, in order


@dataclass
class FileReport:
    """What one adapter file contributed: modules matched to checkpoint weights, and those that matched none."""

    path: str
    strength: float
    matched: int
    unmatched: list[str]
    dora: int


@dataclass
class MergeReport:
    """Outcome of :func:`merge_into_checkpoint`."""

    base: str
    output: str
    layout: str  # "diffusers" or "single_file"
    files: list[FileReport] = field(default_factory=list)
    tensors_total: int = 0
    tensors_modified: int = 0
    seconds: float = 0.0


def _scan(base: Path) -> tuple[str, dict[Path, str | None], list[Target], dict[str, list[Site]]]:
    """Layout, the safetensors files to rewrite (-> diffusers component), targets and where each one lives."""
    if base.is_dir():
        layout = "diffusers"
        components = {name: comp for name, comp in _DIFFUSERS_PARTS.items() if (base / name).is_dir()}
        if "unet" not in components:
            raise ValueError(f"'{base}' is a folder without unet/: pass a diffusers SDXL folder or a .safetensors file")
        if "text_encoder_2" not in components and "text_encoder" in components:
            components["text_encoder"] = "te"  # one text encoder: SD1.x/2.x naming (lora_te_)
        sources: dict[Path, str | None] = {}
        for name, comp in components.items():
            files = sorted((base / name).glob("*.safetensors"))
            if not files:
                raise ValueError(f"'{base / name}' has no .safetensors weights; re-save the pipeline with "
                                 f"save_pretrained(..., safe_serialization=True)")
            sources.update({f: comp for f in files})
    elif base.is_file() and base.suffix.lower() == ".safetensors":
        layout, sources = "single_file", {base: None}
    else:
        raise FileNotFoundError(f"base model '{base}' is neither a diffusers folder nor a .safetensors file")
    targets, sites = scan_targets(sources)
    if layout == "single_file" and not any(t.component == "unet" for t in targets):
        raise ValueError(f"'{base}' has no denoiser tensors ('{SAI_UNET}*', or FLUX.1's bare 'double_blocks.*'): it "
                         f"is not an SAI/BFL-layout SD, SDXL, SD3.5 or FLUX.1 checkpoint")
    return layout, sources, targets, sites


def _merge_weight(weight: torch.Tensor, name: str, steps: list[tuple[float, ModuleSpec, dict]]) -> torch.Tensor:
    """Apply each (strength, spec, tensors) in order with DoRAModule.merged_weight; float32 result."""
    current = weight
    for strength, spec, tensors in steps:
        base = stand_in(current.shape)
        base.weight = nn.Parameter(current, requires_grad=False)
        with torch.random.fork_rng(devices=[]):  # the adapter's init draws random numbers; leave the caller's RNG
            module = DoRAModule(name, base, spec.rank, spec.alpha, dora=spec.dora, wd_on_out=bool(spec.wd_on_out),
                                use_tucker=spec.tucker, multiplier=strength)
        result = module.load_state_dict(tensors, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"module '{name}': unexpected tensors {result.unexpected_keys}")
        current = module.merged_weight()
    return current


def _merge_sites(tensor: torch.Tensor, jobs: list[tuple[str, Site]], plan: Plan) -> torch.Tensor:
    """A stored tensor with every planned layer in it merged (float32, or float64 if stored so)."""
    tensor = tensor.to(torch.float64 if tensor.dtype == torch.float64 else torch.float32)
    for name, site in jobs:
        rows = slice(*site.rows) if site.rows else slice(None)
        tensor[rows] = _merge_weight(tensor[rows].clone(), name, plan[name])
    return tensor


def merge_into_checkpoint(base: str | os.PathLike, files_with_strengths: Sequence[tuple[str | os.PathLike, float]],
                          output: str | os.PathLike, save_dtype: torch.dtype | None = None, *,
                          overwrite: bool = False, progress: bool = False, allow_partial: bool = False
                          ) -> MergeReport:
    """Bake DoRA/LoRA files into a checkpoint, writing a new one.

    Args:
        base: a diffusers SD/SDXL folder, or a single-file ``.safetensors`` (SAI SD/SDXL/SD3.5, BFL FLUX.1).
        files_with_strengths: ``[(file, strength), ...]``, applied in this order, each against the weights as
            merged so far (see the module docstring).
        output: the new folder (diffusers base) or ``.safetensors`` file (single-file base).
        save_dtype: cast every floating tensor of the rewritten files to it; None keeps each tensor's dtype.
        overwrite: replace an existing ``output``.
        progress: show a tqdm bar over tensors.
        allow_partial: merge a file of which some modules name no layer of the checkpoint (they are skipped);
            by default such a file is refused before anything is written.

    Returns:
        A :class:`MergeReport` with per-file matched/unmatched module counts.

    Raises:
        FileNotFoundError: base or a file missing. FileExistsError: ``output`` exists and not ``overwrite``.
        ValueError: a file matches none of the checkpoint's layers (or only some, without ``allow_partial``), or a
            module's shapes do not fit.
    """
    begin = time.perf_counter()
    base, output = Path(base), Path(output)
    if not files_with_strengths:
        raise ValueError("no adapter files given: pass at least one (file, strength) pair (--models a.safetensors)")
    if output.resolve() == base.resolve():
        raise ValueError(f"output '{output}' is the base model; write the merge to a new path")
    if base.is_dir() and output.resolve().is_relative_to(base.resolve()):
        raise ValueError(f"output '{output}' is inside the base folder '{base}'; write the merge elsewhere")
    if output.exists() and not overwrite:
        raise FileExistsError(f"output '{output}' exists; choose another path or pass overwrite=True (--overwrite)")
    layout, sources, targets, sites = _scan(base)
    if layout == "single_file" and output.suffix.lower() != ".safetensors":
        raise ValueError(f"output '{output}' must end in .safetensors for a single-file base")
    report = MergeReport(str(base), str(output), layout)
    plan: Plan = {}
    for file, strength in files_with_strengths:
        state_dict, _ = load_file(file)
        found = match_file(state_dict, targets)
        try:
            check_coverage(found, targets, allow_partial, "allow_partial=True (--allow_partial)")
        except ValueError as error:
            raise ValueError(f"'{file}' on '{base}': {error}") from None
        for name, spec in found.specs.items():
            tensors = {k.partition(".")[2]: v for k, v in found.state_dict.items() if k.partition(".")[0] == name}
            plan.setdefault(name, []).append((float(strength), spec, tensors))
        dora = sum(spec.dora for spec in found.specs.values())
        report.files.append(FileReport(str(file), float(strength), len(found.specs), found.unmatched, dora))
        logger.info("%s (strength %g): %d modules matched (%d DoRA), %d unmatched", file, strength,
                    len(found.specs), dora, len(found.unmatched))
    edits: dict[Path, dict[str, list[tuple[str, Site]]]] = {}
    for name in plan:
        for site in sites[name]:
            edits.setdefault(site.source, {}).setdefault(site.key, []).append((name, site))
    report.tensors_total = sum(len(read_header(source)[0].keys() - {"__metadata__"}) for source in sources)
    output.parent.mkdir(parents=True, exist_ok=True)
    bar = progress_bar(None, desc="merging", unit="tensor", total=report.tensors_total, enabled=progress)
    scratch = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        built = scratch / output.name
        for item in [base] if layout == "single_file" else sorted(base.rglob("*")):
            dest = built / item.relative_to(base) if layout == "diffusers" else built
            dest.parent.mkdir(parents=True, exist_ok=True)
            if item.is_dir():
                dest.mkdir(exist_ok=True)
            elif item in sources:
                jobs = {key: partial(_merge_sites, jobs=found, plan=plan) for key, found in edits.get(item, {}).items()}
                report.tensors_modified += stream_copy(item, dest, jobs, save_dtype, bar)
            else:
                shutil.copy2(item, dest)
        old = None
        if output.exists() and (output.is_dir() or built.is_dir()):  # no atomic rename over a folder: swap
            old = scratch / ".old"
            os.replace(output, old)
        os.replace(built, output)
    finally:
        if bar is not None:
            bar.close()
        shutil.rmtree(scratch, ignore_errors=True)
    report.seconds = time.perf_counter() - begin
    logger.info("wrote %s: %d of %d tensors modified in %.1f s", output, report.tensors_modified,
                report.tensors_total, report.seconds)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "dora-merge",
        "Bake DoRA/LoRA files (LyCORIS layout) into a checkpoint: an SD/SDXL diffusers folder, or a single "
        ".safetensors (SAI SD/SDXL/SD3.5, BFL FLUX.1). Files are applied in order, each against the weights merged so far.",
        "example:\n  dora-merge --sd_model sd_xl_base_1.0.safetensors --models style.safetensors detail.safetensors "
        "\\\n      --ratios 1.0 0.5 --save_to merged.safetensors --save_precision fp16\n"
        "  dora-merge --sd_model sdxl_diffusers/ --models style.safetensors --save_to merged_diffusers/",
    )
    parser.add_argument("--sd_model", required=True, help="base: diffusers folder or SAI .safetensors")
    parser.add_argument("--models", nargs="+", required=True, help="DoRA/LoRA .safetensors files, applied in order")
    parser.add_argument("--ratios", nargs="+", type=float, default=None, help="one strength per file (default 1.0)")
    parser.add_argument("--save_to", required=True, help="output folder (diffusers) or .safetensors (single file)")
    parser.add_argument("--save_precision", choices=["float", "fp16", "bf16", "none"], default="none",
                        help="cast floating tensors of the rewritten files; none keeps the base's dtypes")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --save_to")
    parser.add_argument("--allow_partial", action="store_true",
                        help="merge files of which some modules name no layer of the base (skipped); default: refuse")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``dora-merge``: see ``--help``. Returns 0 on success."""
    args = parse_args(build_parser(), argv)
    ratios = args.ratios if args.ratios is not None else [1.0] * len(args.models)
    if len(ratios) != len(args.models):
        build_parser().error(f"--ratios has {len(ratios)} values for {len(args.models)} --models; give one each")
    report = merge_into_checkpoint(args.sd_model, list(zip(args.models, ratios)), args.save_to,
                                   SAVE_PRECISIONS.get(args.save_precision), overwrite=args.overwrite, progress=True,
                                   allow_partial=args.allow_partial)
    for item in report.files:
        print(f"{item.path} x {item.strength:g}: {item.matched} modules merged ({item.dora} DoRA), "
              f"{len(item.unmatched)} unmatched{' e.g. ' + ', '.join(item.unmatched[:3]) if item.unmatched else ''}")
    print(f"wrote {report.output} ({report.layout}): {report.tensors_modified}/{report.tensors_total} tensors "
          f"modified in {report.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
