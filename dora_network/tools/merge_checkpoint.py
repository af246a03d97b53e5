"""Bake DoRA/LoRA files into an SDXL checkpoint (diffusers folder or SAI single file), streaming tensor by tensor.

Each file ``k`` with strength ``s_k`` is applied in the order given, against the weights as merged so far:
``W_k = W_{k-1} + s_k * (W'_k(W_{k-1}) - W_{k-1})`` with ``W'_k`` the file's DoRA (or LoRA) weight built on
``W_{k-1}`` (strength applied outside, as every UI does). This equals merging the files one after the other with
``merge_to``; the intermediate weights stay in float32 and are cast once, at the end, to the output dtype. The
per-module math is :meth:`dora_network.DoRAModule.merged_weight`, run on a stand-in layer holding the tensor.

Layouts: a diffusers folder (``unet/``, ``text_encoder/``, ``text_encoder_2/`` safetensors; every other file is
copied) or a single SAI ``.safetensors`` (``model.diffusion_model.*``, TE1 ``conditioner.embedders.0.transformer.
text_model.*``, TE2 in OpenCLIP form ``conditioner.embedders.1.model.transformer.resblocks.N.*`` whose fused
``attn.in_proj_weight`` (3d, d) holds q, k, v; a q/k/v module updates its row slice). File module names in either
UNet spelling (SAI or diffusers) and TE names with or without ``text_model_`` resolve through loading.match_file.

Memory: the base's safetensors files are read one tensor at a time with plain file reads (not ``safe_open``'s mmap,
whose touched pages stay resident: ~one model copy of RSS) and written by a streaming safetensors writer, so the
peak is about one tensor plus the adapter files. Output goes to a temporary path and is renamed into place.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..io import load_file
from ..keys import ModuleSpec
from ..layers import DoRAModule
from ..loading import match_file
from ..targets import Target

logger = logging.getLogger(__name__)

__all__ = ["FileReport", "MergeReport", "main", "merge_into_checkpoint"]

SAI_UNET = "model.diffusion_model."
SAI_TE1 = "conditioner.embedders.0.transformer."
SAI_TE2 = "conditioner.embedders.1.model.transformer.resblocks."
_OPENCLIP = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_DIFFUSERS_PARTS = {"unet": "unet", "text_encoder": "te1", "text_encoder_2": "te2"}
_DTYPES = {code: getattr(torch, name) for code, name in (  # safetensors codes; float8 needs torch >= 2.1
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"),
    ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"),
    ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")) if hasattr(torch, name)}
_CODES = {v: k for k, v in _DTYPES.items()}
SAVE_PRECISIONS = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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


@dataclass(frozen=True)
class _Site:
    """Where a target layer's weight lives: tensor ``key`` of ``source``, rows ``rows`` (fused in_proj) or all."""

    source: Path
    key: str
    rows: tuple[int, int] | None


def _stand_in(shape: Sequence[int]) -> nn.Module:
    """A weightless (meta) Linear/Conv2d of this weight shape: a Target for matching, a base for DoRAModule."""
    if len(shape) == 2:
        return nn.Linear(shape[1], shape[0], bias=False, device="meta")
    return nn.Conv2d(shape[1], shape[0], tuple(shape[2:]), bias=False, device="meta")


def _te_path(path: str) -> str | None:
    """Classic ``text_model.`` path of a CLIP attention/MLP weight, or None for other text-encoder tensors."""
    if ".self_attn." not in path and ".mlp." not in path:
        return None
    return path if path.startswith("text_model.") else "text_model." + path


def _layers_of_key(key: str, shape: list[int], component: str | None) -> list[tuple[str, str, tuple[int, int] | None]]:
    """(component, path, rows) of the adaptable layers stored in tensor ``key`` (``component``: diffusers part)."""
    if component is not None:  # diffusers folder
        if not key.endswith(".weight") or len(shape) not in (2, 4):
            return []
        path = key[: -len(".weight")]
        if component != "unet":
            path = _te_path(path) if len(shape) == 2 else None
        return [(component, path, None)] if path else []
    if key.startswith(SAI_UNET) and key.endswith(".weight") and len(shape) in (2, 4):
        return [("unet", key[len(SAI_UNET): -len(".weight")], None)]
    if key.startswith(SAI_TE1) and key.endswith(".weight") and len(shape) == 2:
        path = _te_path(key[len(SAI_TE1): -len(".weight")])
        return [("te1", path, None)] if path else []
    if key.startswith(SAI_TE2) and len(shape) == 2:
        block, _, rest = key[len(SAI_TE2):].partition(".")
        prefix = f"text_model.encoder.layers.{block}."
        if rest == "attn.in_proj_weight":
            d = shape[0] // 3
            return [("te2", f"{prefix}self_attn.{p}_proj", (i * d, (i + 1) * d)) for i, p in enumerate("qkv")]
        part = rest[: -len(".weight")] if rest.endswith(".weight") else None
        if part in _OPENCLIP:
            return [("te2", prefix + _OPENCLIP[part], None)]
    return []


def _scan(base: Path) -> tuple[str, dict[Path, str | None], list[Target], dict[str, list[_Site]]]:
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
    targets: dict[str, Target] = {}
    sites: dict[str, list[_Site]] = {}  # several sites: a component saved in more than one variant (fp16, ...)
    for source, comp in sources.items():
        for key, info in _read_header(source)[0].items():
            if key != "__metadata__":
                shape = info["shape"]
                for component, path, rows in _layers_of_key(key, shape, comp):
                    name = f"lora_{component}.{path}".replace(".", "_")
                    wshape = [rows[1] - rows[0], shape[1]] if rows else shape
                    kind = "linear" if len(wshape) == 2 else "conv1x1" if wshape[2:] == [1, 1] else "conv"
                    targets.setdefault(name, Target(name, _stand_in(wshape), component, kind, path))
                    sites.setdefault(name, []).append(_Site(source, key, rows))
    if layout == "single_file" and not any(t.component == "unet" for t in targets.values()):
        raise ValueError(f"'{base}' has no '{SAI_UNET}*' tensors: it is not an SAI-layout SDXL checkpoint")
    return layout, sources, list(targets.values()), sites


def _merge_weight(weight: torch.Tensor, name: str, steps: list[tuple[float, ModuleSpec, dict]]) -> torch.Tensor:
    """Apply each (strength, spec, tensors) in order with DoRAModule.merged_weight; float32 result."""
    current = weight
    for strength, spec, tensors in steps:
        base = _stand_in(current.shape)
        base.weight = nn.Parameter(current, requires_grad=False)
        with torch.random.fork_rng(devices=[]):  # the adapter's init draws random numbers; leave the caller's RNG
            module = DoRAModule(name, base, spec.rank, spec.alpha, dora=spec.dora, wd_on_out=bool(spec.wd_on_out),
                                use_tucker=spec.tucker, multiplier=strength)
        result = module.load_state_dict(tensors, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"module '{name}': unexpected tensors {result.unexpected_keys}")
        current = module.merged_weight()
    return current


def _read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's JSON header and the offset of its data (read directly: no mmap, see the docstring)."""
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        if not isinstance(header, dict) or size > path.stat().st_size:
            raise ValueError("bad header")
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"'{path}' is not a readable safetensors file ({error}); re-download or re-save it") from error
    return header, 8 + size


def _read_tensor(handle, info: dict, start: int) -> torch.Tensor:
    """One tensor read with plain file reads into a fresh buffer (no mmap pages left resident afterwards)."""
    begin, end = info["data_offsets"]
    handle.seek(start + begin)
    buffer = torch.empty(end - begin, dtype=torch.uint8)
    if handle.readinto(memoryview(buffer.numpy())) != end - begin:
        raise ValueError(f"'{handle.name}' is truncated; re-download or re-save it")
    return buffer.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def _stream(source: Path, dest: Path, edits: dict[str, list[tuple[str, _Site]]], plan: dict, save_dtype, bar) -> int:
    """Copy ``source`` to ``dest`` (safetensors) tensor by tensor, replacing edited tensors; returns the count."""
    header, start = _read_header(source)
    metadata = header.pop("__metadata__", None)
    keys = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    out_header: dict = {"__metadata__": metadata} if metadata else {}
    offset, dtypes = 0, {}
    for key in keys:
        dtype = _DTYPES.get(header[key]["dtype"])
        if dtype is None:
            raise ValueError(f"'{source}': tensor '{key}' has dtype {header[key]['dtype']}, which this torch cannot "
                             f"hold; upgrade torch or convert the checkpoint")
        if save_dtype is not None and dtype.is_floating_point:
            dtype = save_dtype
        nbytes = math.prod(header[key]["shape"]) * torch.empty((), dtype=dtype).element_size()
        out_header[key] = {"dtype": _CODES[dtype], "shape": header[key]["shape"], "data_offsets": [offset, offset + nbytes]}
        dtypes[key], offset = dtype, offset + nbytes
    blob = json.dumps(out_header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # 8-byte aligned data, as safetensors writes it
    modified = 0
    with open(source, "rb") as handle, open(dest, "wb") as out:
        out.write(len(blob).to_bytes(8, "little") + blob)
        for key in keys:
            tensor = _read_tensor(handle, header[key], start)
            if key in edits:
                tensor = tensor.to(torch.float64 if tensor.dtype == torch.float64 else torch.float32)
                for name, site in edits[key]:
                    rows = slice(*site.rows) if site.rows else slice(None)
                    tensor[rows] = _merge_weight(tensor[rows].clone(), name, plan[name])
                modified += 1
            data = tensor.to(dtypes[key]).contiguous().reshape(-1).view(torch.uint8)  # safetensors: little-endian
            out.write(memoryview(data.numpy()))
            del tensor, data  # before the next read: the peak stays at one tensor
            if bar is not None:
                bar.update(1)
        out.flush()
        os.fsync(out.fileno())
    return modified


def merge_into_checkpoint(base: str | os.PathLike, files_with_strengths: Sequence[tuple[str | os.PathLike, float]],
                          output: str | os.PathLike, save_dtype: torch.dtype | None = None, *,
                          overwrite: bool = False, progress: bool = False) -> MergeReport:
    """Bake DoRA/LoRA files into an SDXL checkpoint, writing a new one.

    Args:
        base: a diffusers SDXL folder or an SAI single-file ``.safetensors``.
        files_with_strengths: ``[(file, strength), ...]``, applied in this order, each against the weights as
            merged so far (see the module docstring).
        output: the new folder (diffusers base) or ``.safetensors`` file (single-file base).
        save_dtype: cast every floating tensor of the rewritten files to it; None keeps each tensor's dtype.
        overwrite: replace an existing ``output``.
        progress: show a tqdm bar over tensors.

    Returns:
        A :class:`MergeReport` with per-file matched/unmatched module counts.

    Raises:
        FileNotFoundError: base or a file missing. FileExistsError: ``output`` exists and not ``overwrite``.
        ValueError: a file matches none of the checkpoint's layers, or a module's shapes do not fit.
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
    plan: dict[str, list[tuple[float, ModuleSpec, dict]]] = {}
    for file, strength in files_with_strengths:
        state_dict, _ = load_file(file)
        found = match_file(state_dict, targets)
        if not found.specs:
            raise ValueError(f"none of the {len(found.unmatched)} modules of '{file}' matches a layer of '{base}' "
                             f"(e.g. {found.unmatched[:3]}); is it for another base model?")
        for name, spec in found.specs.items():
            tensors = {k.partition(".")[2]: v for k, v in found.state_dict.items() if k.partition(".")[0] == name}
            plan.setdefault(name, []).append((float(strength), spec, tensors))
        dora = sum(spec.dora for spec in found.specs.values())
        report.files.append(FileReport(str(file), float(strength), len(found.specs), found.unmatched, dora))
        logger.info("%s (strength %g): %d modules matched (%d DoRA), %d unmatched", file, strength,
                    len(found.specs), dora, len(found.unmatched))
    edits: dict[Path, dict[str, list[tuple[str, _Site]]]] = {}
    for name in plan:
        for site in sites[name]:
            edits.setdefault(site.source, {}).setdefault(site.key, []).append((name, site))
    report.tensors_total = sum(len(_read_header(source)[0].keys() - {"__metadata__"}) for source in sources)
    output.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        if progress:
            from tqdm.auto import tqdm
        with tqdm(total=report.tensors_total, unit="tensor", desc="merging") if progress else nullcontext() as bar:
            built = scratch / output.name
            if layout == "single_file":
                report.tensors_modified = _stream(base, built, edits.get(base, {}), plan, save_dtype, bar)
            for item in sorted(base.rglob("*")) if layout == "diffusers" else []:
                dest = built / item.relative_to(base)
                dest.parent.mkdir(parents=True, exist_ok=True)
                if item.is_dir():
                    dest.mkdir(exist_ok=True)
                elif item in sources:
                    report.tensors_modified += _stream(item, dest, edits.get(item, {}), plan, save_dtype, bar)
                else:
                    shutil.copy2(item, dest)
        old = None
        if output.exists() and (output.is_dir() or built.is_dir()):  # no atomic rename over a folder: swap
            old = scratch / ".old"
            os.replace(output, old)
        os.replace(built, output)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report.seconds = time.perf_counter() - begin
    logger.info("wrote %s: %d of %d tensors modified in %.1f s", output, report.tensors_modified,
                report.tensors_total, report.seconds)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dora-merge",
        description="Bake DoRA/LoRA files (LyCORIS layout) into an SDXL checkpoint: a diffusers folder or an "
                    "SAI single .safetensors. Files are applied in order, each against the weights merged so far.",
        epilog="example:\n  dora-merge --sd_model sd_xl_base_1.0.safetensors --models style.safetensors "
               "detail.safetensors \\\n      --ratios 1.0 0.5 --save_to merged.safetensors --save_precision fp16\n"
               "  dora-merge --sd_model sdxl_diffusers/ --models style.safetensors --save_to merged_diffusers/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd_model", required=True, help="base: diffusers folder or SAI .safetensors")
    parser.add_argument("--models", nargs="+", required=True, help="DoRA/LoRA .safetensors files, applied in order")
    parser.add_argument("--ratios", nargs="+", type=float, default=None, help="one strength per file (default 1.0)")
    parser.add_argument("--save_to", required=True, help="output folder (diffusers) or .safetensors (single file)")
    parser.add_argument("--save_precision", choices=["float", "fp16", "bf16", "none"], default="none",
                        help="cast floating tensors of the rewritten files; none keeps the base's dtypes")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --save_to")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``dora-merge``: see ``--help``. Returns 0 on success."""
    args = build_parser().parse_args(argv)
    ratios = args.ratios if args.ratios is not None else [1.0] * len(args.models)
    if len(ratios) != len(args.models):
        build_parser().error(f"--ratios has {len(ratios)} values for {len(args.models)} --models; give one each")
    from ..smoke import setup_logging

    setup_logging()
    report = merge_into_checkpoint(args.sd_model, list(zip(args.models, ratios)), args.save_to,
                                   SAVE_PRECISIONS.get(args.save_precision), overwrite=args.overwrite, progress=True)
    for item in report.files:
        print(f"{item.path} x {item.strength:g}: {item.matched} modules merged ({item.dora} DoRA), "
              f"{len(item.unmatched)} unmatched{' e.g. ' + ', '.join(item.unmatched[:3]) if item.unmatched else ''}")
    print(f"wrote {report.output} ({report.layout}): {report.tensors_modified}/{report.tensors_total} tensors "
          f"modified in {report.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
