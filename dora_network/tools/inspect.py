"""Inspect a LoRA/DoRA file: what it holds, and how each UI or library will apply it (rules of reference/loaders.md).

``inspect_file`` reads a file (or a state dict) in the LyCORIS/kohya key layout and returns a :class:`FileReport`:
module counts by layer kind and by model part, the UNet and text-encoder name spellings, ranks, alphas, DoRA axis,
1-D ``dora_scale`` count, dtypes, selected sd-scripts metadata and, per loader (ComfyUI, Forge, A1111, InvokeAI,
SD.Next, SD.Next before 2026-07-12, diffusers, diffusers with our helper, LyCORIS), a verdict:

* ``exact``: every module is applied as trained.
* ``approximate``: every module is applied, some with a known small deviation (ComfyUI's ``||W0||`` out-axis norm).
* ``wrong``: the file loads, but some modules come out different from the trained weights (silently, or skipped
  with per-layer errors or "lora key not loaded" warnings).
* ``fails``: the loader refuses the file, or errors on every module.

The verdicts are derived by rules from the file's properties; no UI code runs. With ``model`` (``"tiny"``, a
diffusers folder, a single-file SDXL ``.safetensors`` checkpoint, or a built model) the report also says how many
of the file's modules match a layer of that model (``tools/base_model.py``). The rules themselves are in
``tools/loader_rules.py``; this module gathers the facts, builds the report, and is the ``dora-inspect`` command.

Example::

    dora-inspect my_dora.safetensors --model sd_xl_base_1.0.safetensors
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import torch

from ..io import load_file, safetensors_hashes
from ..keys import DORA_SCALE, ModuleSpec, group_by_module, infer_spec
from ..loading import nonfinite_modules
from ..families import FAMILIES, family_of_file
from .base_model import BaseModel, ModelMatch, load_base_model
from .cli import add_report_flags, make_parser, parse_args, setup_logging
from .file_modules import file_axis
from .loader_rules import (KINDS, LOADERS, PARTS, VERDICTS, LoaderVerdict, ModuleFacts, file_facts, judge, judge_dit,
                           module_facts, naming)

logger = logging.getLogger(__name__)

__all__ = [
    "LOADERS",
    "VERDICTS",
    "BaseModel",
    "FileReport",
    "LoaderVerdict",
    "ModelMatch",
    "inspect_file",
    "load_base_model",
    "main",
    "setup_logging",
]

METADATA_KEYS = (
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version",
    "ss_steps", "sshs_model_hash", "sshs_legacy_hash", "modelspec.architecture",
)


# -- results ------------------------------------------------------------------------------------------------------
@dataclass
class FileReport:
    """Everything :func:`inspect_file` found. Counts are over modules (``<lora_name>`` prefixes) unless noted.

    Attributes:
        source: the path, or ``"<state dict>"``.
        size_bytes: file size (0 for a state dict).
        tensors: number of tensors.
        modules: number of LoRA/DoRA modules.
        unknown_keys: keys that are not ``lora_down``/``lora_up``/``lora_mid``/``alpha``/``dora_scale`` (examples).
        unknown_key_count: how many such keys.
        broken: modules whose tensors do not form a LoRA (name -> error).
        nonfinite: modules holding NaN/Inf.
        base_model: a DiT family's title (FLUX.1, Anima: from its own module names), "SDXL", "SD1/SD2" or "unknown".
        by_kind: modules per kind (:data:`KINDS`).
        by_part: modules per part (:data:`PARTS`).
        unet_naming: "SAI", "diffusers", "mixed" or "none".
        te_naming: "classic" (``text_model_``), "short" (transformers-5 names), "mixed" or "none".
        algo: "DoRA", "LoRA" or "mixed".
        dora_modules / lora_modules: DoRA and plain-LoRA module counts.
        ranks: rank -> modules.
        alphas: alpha -> modules.
        alpha_not_rank: modules whose alpha differs from their rank.
        axis: "in", "out", "mixed", "ambiguous" or "none" (plain LoRA), from ``dora_scale`` shapes.
        axis_counts: "in"/"out"/"ambiguous" -> DoRA modules (ambiguous: 1-D on a square layer).
        axis_hint: the file's axis for ambiguous modules (metadata or the unambiguous modules), or None.
        dora_scale_1d: DoRA modules with a 1-D ``dora_scale``.
        tucker_dora: DoRA modules with ``lora_mid``.
        te2_self_attn_dora: DoRA modules on CLIP-G self-attention (A1111 skips them).
        dtypes: dtype -> tensors.
        dora_scale_dtypes: dtype -> ``dora_scale`` tensors.
        metadata: the selected sd-scripts and ``dora_network.*`` metadata.
        hashes_match: whether ``sshs_model_hash`` matches the tensors (sd-scripts' scheme; None if absent or in
            LyCORIS' "0x" scheme).
        model: the base-model match, when a model was given.
        loaders: loader -> :class:`LoaderVerdict`, in :data:`LOADERS` order.
    """

    source: str
    size_bytes: int
    tensors: int
    modules: int
    unknown_keys: list[str]
    unknown_key_count: int
    broken: dict[str, str]
    nonfinite: list[str]
    base_model: str
    by_kind: dict[str, int]
    by_part: dict[str, int]
    unet_naming: str
    te_naming: str
    algo: str
    dora_modules: int
    lora_modules: int
    ranks: dict[int, int]
    alphas: dict[float, int]
    alpha_not_rank: int
    axis: str
    axis_counts: dict[str, int]
    axis_hint: str | None
    dora_scale_1d: int
    tucker_dora: int
    te2_self_attn_dora: int
    dtypes: dict[str, int]
    dora_scale_dtypes: dict[str, int]
    metadata: dict[str, str]
    hashes_match: bool | None
    model: ModelMatch | None
    loaders: dict[str, LoaderVerdict]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (numeric dict keys become strings)."""
        data = asdict(self)
        for key in ("ranks", "alphas"):
            data[key] = {_number_text(k): v for k, v in data[key].items()}
        return data

    def verdicts(self) -> dict[str, str]:
        """loader -> verdict."""
        return {name: v.verdict for name, v in self.loaders.items()}


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


# -- the report ---------------------------------------------------------------------------------------------------
def inspect_file(path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None, model: Any = None) -> FileReport:
    """Describe a LoRA/DoRA file and judge how every loader of reference/loaders.md applies it.

    Args:
        path_or_state_dict: a ``.safetensors`` (or tensors-only ``.ckpt``/``.pt``) path, or a loaded state dict.
        metadata: the file's metadata; for a path, defaults to the metadata stored in it.
        model: optional base model (see :func:`load_base_model`) to count how many names match it; with one,
            the ComfyUI/Forge out-axis error is measured on its weights.

    Returns:
        The :class:`FileReport`.

    Raises:
        FileNotFoundError / ValueError: unreadable file or model.
    """
    if isinstance(path_or_state_dict, Mapping):
        state_dict, source, size = dict(path_or_state_dict), "<state dict>", 0
        stored: dict[str, str] = {}
    else:
        state_dict, stored = load_file(path_or_state_dict)
        source, size = str(path_or_state_dict), os.path.getsize(path_or_state_dict)
    metadata = dict(stored if metadata is None else metadata)
    groups, unknown = group_by_module(state_dict)
    specs: dict[str, ModuleSpec] = {}
    broken: dict[str, str] = {}
    modules: list[ModuleFacts] = []
    for name, tensors in groups.items():
        try:
            specs[name] = infer_spec(name, tensors)
        except ValueError as error:
            broken[name] = str(error)
            continue
        modules.append(module_facts(name, tensors, specs[name]))
    base = None if model is None else load_base_model(model)
    hint = file_axis(metadata, groups, specs)
    nonfinite = nonfinite_modules(state_dict)
    facts = file_facts(modules, groups, axis_hint=hint, nonfinite=len(nonfinite), broken=len(broken),
                       unknown_keys=len(unknown), base=base)
    dora = facts.dora
    axis_counts = Counter(m.axis for m in dora)
    axis = naming([m.axis for m in dora])
    if axis == "mixed" and set(axis_counts) - {"ambiguous"} and len(set(axis_counts) - {"ambiguous"}) == 1:
        axis = (set(axis_counts) - {"ambiguous"}).pop()  # 1-D square modules follow the others
    hashes_match = None
    # "0x..." is LyCORIS' own per-tensor hash scheme, not sd-scripts'; it is not checked
    if "sshs_model_hash" in metadata and not metadata["sshs_model_hash"].startswith("0x"):
        hashes_match = safetensors_hashes(state_dict, metadata)[0] == metadata["sshs_model_hash"]
    parts = {m.part for m in modules}
    base_version = metadata.get("ss_base_model_version", "")
    dit = family_of_file([m.name for m in modules])
    base_model = (dit.title if dit is not None else
                  "SDXL" if parts & {"TE1", "TE2"} or base_version.startswith("sdxl") else
                  "SD1/SD2" if "TE" in parts or any("blocks_3_" in m.name for m in modules) else "unknown")
    by_kind = Counter(m.kind for m in modules)
    by_part = Counter(m.part for m in modules)
    report = FileReport(
        source=source,
        size_bytes=size,
        tensors=len(state_dict),
        modules=len(modules),
        unknown_keys=sorted(unknown)[:5],
        unknown_key_count=len(unknown),
        broken=broken,
        nonfinite=nonfinite,
        base_model=base_model,
        by_kind={k: by_kind.get(k, 0) for k in KINDS},
        by_part={p: by_part[p] for p in PARTS if by_part.get(p)},
        unet_naming=naming([m.unet_naming for m in modules if m.part == "UNet"]),
        te_naming=naming(["short" if m.te_short else "classic" for m in facts.te]),
        algo="DoRA" if len(dora) == len(modules) and dora else "LoRA" if not dora else "mixed",
        dora_modules=len(dora),
        lora_modules=len(modules) - len(dora),
        ranks=dict(sorted(Counter(m.spec.rank for m in modules).items())),
        alphas=dict(sorted(Counter(m.spec.alpha for m in modules).items())),
        alpha_not_rank=sum(m.spec.alpha != m.spec.rank for m in modules),
        axis=axis,
        axis_counts={k: axis_counts[k] for k in ("in", "out", "ambiguous") if axis_counts.get(k)},
        axis_hint=hint,
        dora_scale_1d=len(facts.scale_1d),
        tucker_dora=len(facts.tucker_dora),
        te2_self_attn_dora=len(facts.te2_self_attn_dora),
        dtypes=dict(Counter(_dtype(t) for t in state_dict.values())),
        dora_scale_dtypes=dict(Counter(_dtype(g[DORA_SCALE]) for g in groups.values() if DORA_SCALE in g)),
        metadata={k: metadata[k] for k in sorted(metadata) if k in METADATA_KEYS or k.startswith("dora_network.")},
        hashes_match=hashes_match,
        model=None if base is None else base.match(specs),
        loaders=judge(facts) if dit is None else judge_dit(facts, dit.name),
    )
    logger.info("%s: %d modules (%s), %s", source, report.modules, report.algo,
                ", ".join(f"{k} {v}" for k, v in report.verdicts().items()))
    return report


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).replace("torch.", "")


# -- command line -------------------------------------------------------------------------------------------------
def _counts(counts: Mapping[Any, int]) -> str:
    return ", ".join(f"{_number_text(k) if isinstance(k, (int, float)) else k} x{v}" for k, v in counts.items()) or "-"


def format_report(report: FileReport) -> str:
    """The human-readable text ``dora-inspect`` prints."""
    r = report
    lines = [
        f"file:       {r.source}" + (f"  ({r.size_bytes / 1e6:.2f} MB)" if r.size_bytes else ""),
        f"content:    {r.modules} modules, {r.tensors} tensors; {r.algo} ({r.dora_modules} DoRA, "
        f"{r.lora_modules} plain LoRA); base model {r.base_model}",
        f"parts:      {_counts(r.by_part)}",
        f"kinds:      {_counts(r.by_kind)}",
        f"names:      UNet {r.unet_naming}; text encoders {r.te_naming}",
        f"ranks:      {_counts(r.ranks)}",
        f"alphas:     {_counts(r.alphas)}  (alpha != rank in {r.alpha_not_rank} modules)",
        f"DoRA axis:  {r.axis} ({_counts(r.axis_counts)}); 1-D dora_scale: {r.dora_scale_1d}; "
        f"lora_mid on DoRA: {r.tucker_dora}; te2 self-attn DoRA: {r.te2_self_attn_dora}",
        f"dtypes:     {_counts(r.dtypes)}; dora_scale {_counts(r.dora_scale_dtypes)}",
    ]
    if r.unknown_key_count:
        lines.append(f"unknown:    {r.unknown_key_count} keys that are not LoRA/DoRA tensors, e.g. {r.unknown_keys[:3]}")
    if r.broken:
        lines.append(f"broken:     {len(r.broken)} modules, e.g. {next(iter(r.broken.values()))}")
    if r.nonfinite:
        lines.append(f"NaN/Inf:    {len(r.nonfinite)} modules, e.g. {r.nonfinite[:3]}")
    lines.append("metadata:" + ("" if r.metadata else "   -"))
    lines += [f"  {k}: {v if len(v) < 100 else v[:97] + '...'}" for k, v in r.metadata.items()]
    if r.hashes_match is not None:
        lines.append(f"  (sshs_model_hash {'matches' if r.hashes_match else 'does NOT match'} the tensors)")
    if r.model is not None:
        m = r.model
        lines.append(f"model:      {m.model}: {m.matched}/{r.modules} modules match its {m.layers} layers; "
                     f"{len(m.unmatched)} unmatched, {len(m.shape_mismatch)} shape mismatches")
        for label, names in (("unmatched", m.unmatched), ("shape mismatch", m.shape_mismatch)):
            if names:
                lines.append(f"  {label}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}")
    family = next((f for f in FAMILIES if f.title == r.base_model), None)
    if not r.loaders:
        lines.append(f"loaders:    not judged: the loader rules were measured on SD/SDXL, FLUX.1, SD3 and "
                     f"HunyuanImage files, not on {r.base_model}")
        return "\n".join(lines)
    lines.append("loaders:")
    width = max(len(name) for name in r.loaders)
    for name, verdict in r.loaders.items():
        lines.append(f"  {name:<{width}}  {verdict.verdict}")
        lines += [f"  {'':<{width}}    - {reason}" for reason in verdict.reasons]
        lines += [f"  {'':<{width}}    (note: {note})" for note in verdict.notes]
    if family is not None:
        lines.append(f"  not judged on {r.base_model} files: "
                     f"{', '.join(name for name in LOADERS if name not in r.loaders)}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "dora-inspect",
        "Describe a LoRA/DoRA .safetensors file (kinds, names, ranks, alphas, DoRA axis, dtypes, metadata) and say "
        "how ComfyUI, Forge, A1111, InvokeAI, SD.Next, diffusers and LyCORIS will apply it: exact / approximate / "
        "wrong / fails, with the reason and the fix.",
        "examples:\n"
        "  dora-inspect my_dora.safetensors\n"
        "  dora-inspect my_dora.safetensors --model sd_xl_base_1.0.safetensors\n"
        "  dora-inspect my_dora.safetensors --model tiny --json > report.json\n\n"
        "--model accepts 'tiny' (the seeded tiny SDXL of dora_network.tiny), a local diffusers folder\n"
        "(read offline) or a .safetensors checkpoint (SAI single-file SDXL/SD1, or a diffusers UNet file;\n"
        "only its header is read).",
    )
    parser.add_argument("file", help="the LoRA/DoRA file (.safetensors, or a tensors-only .ckpt/.pt)")
    parser.add_argument("--model", default=None, help="base model to match names against (see below)")
    add_report_flags(parser, "print the report as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``dora-inspect``: print the report; returns 0, or 2 for an unreadable file or model."""
    args = parse_args(build_parser(), argv)
    try:
        report = inspect_file(args.file, model=args.model)
    except (FileNotFoundError, ValueError) as error:
        logger.error("%s", error)
        return 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
