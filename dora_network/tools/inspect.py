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
of the file's modules match a layer of that model (:class:`BaseModel`, also used by ``tools/convert.py`` for the
base weights).

Example::

    dora-inspect my_dora.safetensors --model sd_xl_base_1.0.safetensors
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .. import functional as DF
from ..io import load_file, safetensors_hashes
from ..keys import DORA_SCALE, DOWN, MID, UP, ModuleSpec, group_by_module, infer_spec
from ..loading import name_aliases, nonfinite_modules
from ..unet_names import diffusers_to_sai, sai_to_diffusers

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

#: Verdicts from best to worst; a loader's verdict is the worst over its issues.
VERDICTS = ("exact", "approximate", "wrong", "fails")
LOADERS = (
    "ComfyUI",
    "Forge",
    "A1111",
    "InvokeAI",
    "SD.Next",
    "SD.Next (before 2026-07-12)",
    "diffusers",
    "diffusers + dora_network helper",
    "LyCORIS",
)
KINDS = ("Linear", "Conv 1x1", "Conv kxk", "Tucker")
PARTS = ("UNet", "TE1", "TE2", "TE", "other")
METADATA_KEYS = (
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version",
    "ss_steps", "sshs_model_hash", "sshs_legacy_hash", "modelspec.architecture",
)
_PART_PREFIXES = (("lora_unet_", "UNet"), ("lora_te1_", "TE1"), ("lora_te2_", "TE2"), ("lora_te_", "TE"))
_SAI_ROOTS = ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_")
_DIFFUSERS_ROOTS = ("down_blocks_", "mid_block_", "up_blocks_", "conv_in", "conv_out", "conv_norm_out",
                    "time_embedding_", "add_embedding_")
_DIFFUSERS_UNET_PATHS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "conv_norm_out.",
                         "time_embedding.", "add_embedding.")


# -- results ------------------------------------------------------------------------------------------------------
@dataclass
class LoaderVerdict:
    """How one loader applies the file.

    Attributes:
        verdict: one of :data:`VERDICTS`.
        reasons: why it is not ``exact`` (empty when it is), each with the affected module count and the fix.
        notes: caveats that do not change the verdict (settings, code paths not exercised).
    """

    verdict: str
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class ModelMatch:
    """How the file's module names fit a base model.

    Attributes:
        model: what was loaded (``"tiny"``, a path).
        layers: adaptable layers the model has.
        matched: file modules that name one of them (in any accepted spelling) with matching shapes.
        unmatched: file modules that name no layer.
        shape_mismatch: file modules whose tensors do not fit the named layer.
    """

    model: str
    layers: int
    matched: int
    unmatched: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)


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
        base_model: "SDXL", "SD1/SD2" or "unknown" (guessed from the prefixes and metadata).
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


# -- base models --------------------------------------------------------------------------------------------------
class BaseModel:
    """A base model's adaptable layers by canonical ``lora_name``: shapes, other spellings, weights on demand.

    Args:
        description: what was loaded (for reports).
        shapes: canonical ``lora_name`` -> weight shape (out, in[, kh, kw]).
        aliases: other spellings (SAI/diffusers UNet names, short text-encoder names) -> canonical name.
        fetch: canonical name -> the layer's weight tensor (read lazily; checkpoints are not loaded whole).
    """

    def __init__(self, description: str, shapes: Mapping[str, tuple[int, ...]], aliases: Mapping[str, str],
                 fetch: Callable[[str], torch.Tensor]) -> None:
        self.description = description
        self.shapes = dict(shapes)
        self.aliases = {k: v for k, v in aliases.items() if k not in self.shapes}
        self._fetch = fetch

    def resolve(self, file_name: str) -> str | None:
        """The canonical name of the layer a file module names, or None."""
        return file_name if file_name in self.shapes else self.aliases.get(file_name)

    def weight(self, lora_name: str) -> torch.Tensor:
        """W0 of a layer (canonical or alias name), detached, on CPU.

        Raises:
            KeyError: no such layer (use :meth:`resolve` first).
        """
        canonical = self.resolve(lora_name)
        if canonical is None:
            raise KeyError(f"the base model '{self.description}' has no layer '{lora_name}'")
        return self._fetch(canonical).detach().cpu()

    def match(self, specs: Mapping[str, ModuleSpec]) -> ModelMatch:
        """Which of a file's modules (name -> spec) name a layer of this model, with fitting shapes."""
        unmatched, mismatch = [], []
        for name, spec in specs.items():
            canonical = self.resolve(name)
            if canonical is None:
                unmatched.append(name)
                continue
            shape = self.shapes[canonical]
            kernel = None if len(shape) == 2 else tuple(shape[2:])
            if (spec.out_dim, spec.in_dim, spec.kernel) != (shape[0], shape[1], kernel):
                mismatch.append(name)
        matched = len(specs) - len(unmatched) - len(mismatch)
        return ModelMatch(self.description, len(self.shapes), matched, sorted(unmatched), sorted(mismatch))


def _from_modules(description: str, text_encoders: Sequence[Any], unet: Any) -> BaseModel:
    from ..targets import find_targets

    targets = find_targets(list(text_encoders), unet, unet_scope="all", include_text_encoders=True,
                           with_conv_blocks=True)
    by_name = {t.lora_name: t for t in targets}
    return BaseModel(description, {t.lora_name: tuple(t.module.weight.shape) for t in targets},
                     name_aliases(targets), lambda name: by_name[name].module.weight)


def _from_diffusers_folder(folder: Path) -> BaseModel:
    """A diffusers pipeline folder (``unet/``, ``text_encoder/``, ``text_encoder_2/``) or a bare UNet folder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if (folder / "unet").is_dir():
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
        encoders = [cls.from_pretrained(folder / sub, local_files_only=True)
                    for sub, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection))
                    if (folder / sub).is_dir()]
    elif (folder / "config.json").is_file():
        unet, encoders = UNet2DConditionModel.from_pretrained(folder, local_files_only=True), []
    else:
        raise ValueError(f"--model '{folder}' is a folder but neither a diffusers pipeline (no unet/) nor a UNet "
                         f"folder (no config.json)")
    return _from_modules(str(folder), encoders, unet)


_TE2_OPENCLIP = {"attn.out_proj.weight": "self_attn_out_proj", "mlp.c_fc.weight": "mlp_fc1",
                 "mlp.c_proj.weight": "mlp_fc2"}


def _checkpoint_layers(key: str, shape: tuple[int, ...]) -> list[tuple[str, str | None, tuple[int, int] | None,
                                                                        tuple[int, ...]]]:
    """(canonical lora_name, alias, row slice, shape) for each adaptable layer a checkpoint key holds."""
    if len(shape) not in (2, 4):
        return []
    te2 = "conditioner.embedders.1.model.transformer.resblocks."
    if key.startswith(te2):  # OpenCLIP-G: fused q/k/v in_proj, c_fc/c_proj MLP
        index, _, rest = key[len(te2):].partition(".")
        stem = f"lora_te2_text_model_encoder_layers_{index}_"
        if rest == "attn.in_proj_weight":
            d = shape[0] // 3
            return [(stem + f"self_attn_{p}_proj", None, (i * d, (i + 1) * d), (d,) + tuple(shape[1:]))
                    for i, p in enumerate("qkv")]
        if rest in _TE2_OPENCLIP:
            return [(stem + _TE2_OPENCLIP[rest], None, None, shape)]
        return []
    if not key.endswith(".weight"):
        return []
    path = key[: -len(".weight")]
    for prefix, lora_prefix in (("conditioner.embedders.0.transformer.", "lora_te1"),
                                ("cond_stage_model.transformer.", "lora_te")):
        if path.startswith(prefix):
            path = path[len(prefix):]
            path = path if path.startswith("text_model.") else "text_model." + path
            return [(f"{lora_prefix}.{path}".replace(".", "_"), None, None, shape)]
    if path.startswith("model.diffusion_model."):
        path = path[len("model.diffusion_model."):]
        alias = sai_to_diffusers(path)
        return [(("lora_unet." + path).replace(".", "_"), alias and ("lora_unet." + alias).replace(".", "_"),
                 None, shape)]
    path = path[len("unet."):] if path.startswith("unet.") else path
    if path.startswith(_DIFFUSERS_UNET_PATHS) or path + "." in _DIFFUSERS_UNET_PATHS:
        alias = diffusers_to_sai(path)
        return [(("lora_unet." + path).replace(".", "_"), alias and ("lora_unet." + alias).replace(".", "_"),
                 None, shape)]
    return []


def _from_checkpoint(path: Path) -> BaseModel:
    """Layers of a single-file SD checkpoint (SAI keys) or a diffusers UNet safetensors, from its header only."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    aliases: dict[str, str] = {}
    sources: dict[str, tuple[str, tuple[int, int] | None]] = {}
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        for key in handle.keys():
            shape = tuple(handle.get_slice(key).get_shape())
            for name, alias, rows, layer_shape in _checkpoint_layers(key, shape):
                shapes[name] = layer_shape
                sources[name] = (key, rows)
                if alias:
                    aliases[alias] = name
    if not shapes:
        raise ValueError(f"--model '{path}': no UNet or text-encoder weights found (expected SAI keys "
                         f"'model.diffusion_model.*' / 'conditioner.embedders.*' or diffusers UNet keys)")
    for name in list(shapes):  # text encoders: the transformers-5 spelling without text_model_
        for prefix in ("lora_te1_", "lora_te2_", "lora_te_"):
            if name.startswith(prefix + "text_model_"):
                aliases[prefix + name[len(prefix + "text_model_"):]] = name

    def fetch(name: str) -> torch.Tensor:
        key, rows = sources[name]
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            if rows is None:
                return handle.get_tensor(key)
            return handle.get_slice(key)[rows[0]:rows[1]]

    return BaseModel(str(path), shapes, aliases, fetch)


def load_base_model(model: Any) -> BaseModel:
    """Resolve ``--model``: ``"tiny"`` (our seeded tiny SDXL), a diffusers folder (offline, ``local_files_only``),
    a ``.safetensors`` checkpoint (SAI single-file SDXL/SD1 or a diffusers UNet file; header read, weights lazily),
    a built model with ``.unet`` and ``.text_encoders`` (``TinySDXL``) or ``.text_encoder[_2]`` (a pipeline), or a
    :class:`BaseModel`.

    Raises:
        ValueError / FileNotFoundError: anything else.
    """
    if isinstance(model, BaseModel):
        return model
    if hasattr(model, "unet"):
        encoders = getattr(model, "text_encoders", None)
        if encoders is None:
            encoders = [te for te in (getattr(model, "text_encoder", None), getattr(model, "text_encoder_2", None))
                        if te is not None]
        return _from_modules(type(model).__name__, encoders, model.unet)
    text = str(model)
    if text == "tiny":
        from ..tiny import build_tiny_sdxl

        built = build_tiny_sdxl(seed=0)
        return _from_modules("tiny", built.text_encoders, built.unet)
    path = Path(text)
    if path.is_dir():
        return _from_diffusers_folder(path)
    if path.is_file() and path.suffix.lower() == ".safetensors":
        return _from_checkpoint(path)
    if not path.exists():
        raise FileNotFoundError(f"--model '{text}' not found; pass 'tiny', a diffusers folder or a .safetensors "
                                f"checkpoint")
    raise ValueError(f"--model '{text}': only 'tiny', a diffusers folder or a .safetensors checkpoint are supported")


# -- per-module facts ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Module:
    name: str
    part: str
    kind: str
    spec: ModuleSpec
    axis: str | None  # "in" / "out" / "ambiguous" / None (plain LoRA)
    scale_1d: bool
    unet_naming: str | None
    te_short: bool
    te2_self_attn: bool


def _part(name: str) -> str:
    return next((part for prefix, part in _PART_PREFIXES if name.startswith(prefix)), "other")


def _module_facts(name: str, tensors: Mapping[str, torch.Tensor], spec: ModuleSpec) -> _Module:
    part = _part(name)
    down = tensors[DOWN]
    if MID in tensors:
        kind = "Tucker"
    elif down.ndim == 2:
        kind = "Linear"
    else:
        kind = "Conv 1x1" if tuple(down.shape[2:]) == (1, 1) else "Conv kxk"
    scale = tensors.get(DORA_SCALE)
    scale_1d = scale is not None and scale.ndim == 1
    axis = None
    if scale is not None:
        if scale_1d and spec.in_dim == spec.out_dim:
            axis = "ambiguous"
        else:
            axis = "out" if spec.wd_on_out else "in"
    unet_naming = None
    if part == "UNet":
        rest = name[len("lora_unet_"):]
        unet_naming = ("SAI" if rest.startswith(_SAI_ROOTS) else "diffusers" if rest.startswith(_DIFFUSERS_ROOTS)
                       else None)
    rest = name.split("_", 2)[2] if part in ("TE1", "TE2", "TE") else ""
    te_short = rest.startswith("encoder_")
    return _Module(name, part, kind, spec, axis, scale_1d, unet_naming, te_short,
                   part == "TE2" and "_self_attn_" in name)


# -- loader rules (reference/loaders.md) --------------------------------------------------------------------------
_Issue = tuple[str, str]


def _partial(affected: int, total: int) -> str:
    """Loaders that skip bad layers and go on: every module skipped means the file does nothing."""
    return "fails" if affected >= total else "wrong"


@dataclass
class _Facts:
    total: int
    dora: list[_Module]
    out_axis: list[_Module]  # 2-D/4-D out-axis DoRA
    in_axis: list[_Module]  # 2-D/4-D in-axis DoRA
    scale_1d: list[_Module]
    ambiguous_in: list[_Module]  # 1-D on a square layer whose file axis is (or may be) "in"
    tucker_dora: list[_Module]
    any_mid: list[_Module]
    alpha_not_rank_dora: list[_Module]
    te: list[_Module]
    te_short: list[_Module]
    te2_self_attn_dora: list[_Module]
    unet_diffusers: int
    unet_mixed: bool
    nonfinite: int
    broken: int
    unknown_keys: int
    axis_hint: str | None
    comfy_error: float | None


def _short_te(f: _Facts, total: int) -> list[_Issue]:
    if not f.te_short:
        return []
    return [(_partial(len(f.te_short), total),
             f"{len(f.te_short)} text-encoder modules use transformers-5 names (lora_te1_encoder_...) that it does "
             f"not map ('lora key not loaded'); fix: dora-convert --te_names classic")]


def _common(f: _Facts, loader: str) -> list[_Issue]:
    issues: list[_Issue] = []
    if not f.total:
        issues.append(("fails", "the file holds no LoRA/DoRA module (lora_down/lora_up pairs)"))
    if f.nonfinite:
        issues.append(("fails" if loader == "diffusers + dora_network helper" else "wrong",
                       f"{f.nonfinite} modules hold NaN/Inf (a diverged run): use an earlier checkpoint"))
    if f.broken:
        issues.append((_partial(f.broken, f.total + f.broken),
                       f"{f.broken} modules have lora_down/lora_up shapes that do not pair up"))
    return issues


def _comfy_like(f: _Facts, name: str) -> tuple[list[_Issue], list[str]]:
    issues, notes = [], []
    if f.out_axis:
        measured = "" if f.comfy_error is None else (
            f"; measured on the given base model: up to {100 * f.comfy_error:.2g}% of the update")
        issues.append(("approximate",
                       f"{len(f.out_axis)} out-axis DoRA modules: {name} divides by ||W0|| instead of ||W0 + dW|| "
                       f"(ComfyUI PR #15458 open), the error grows with training{measured}; fix: train in-axis "
                       f"(wd_on_out=False) or dora-convert --to_axis in"))
    if f.scale_1d:
        issues.append(("wrong", f"{len(f.scale_1d)} modules with a 1-D dora_scale: the axis is guessed from shape[0] "
                                f"and broadcast to (out, out); square layers come out silently wrong, the others "
                                f"error and are skipped; fix: dora-convert --dora_scale_2d"))
    issues += _short_te(f, f.total)
    if f.dora and name == "ComfyUI":
        notes.append("the bypass loader (LoraLoaderBypass) ignores dora_scale; use the regular LoRA loader")
    if f.dora and name == "Forge":
        notes.append("'online LoRA' mode computes the DoRA norm in the weight's dtype (fp16/bf16)")
    return issues, notes


def _a1111(f: _Facts) -> tuple[list[_Issue], list[str]]:
    issues, notes = [], []
    if f.out_axis:
        issues.append(("wrong", f"{len(f.out_axis)} out-axis DoRA modules: A1111 implements the in-axis only; "
                                f"(out, 1) broadcasts against (1, in), silently wrong; fix: dora-convert --to_axis in"))
    if f.scale_1d:
        issues.append((_partial(len(f.scale_1d), f.total),
                       f"{len(f.scale_1d)} modules with a 1-D dora_scale raise and are skipped ('Networks with "
                       f"errors'); fix: dora-convert --dora_scale_2d"))
    if f.te2_self_attn_dora:
        issues.append((_partial(len(f.te2_self_attn_dora), f.total),
                       f"{len(f.te2_self_attn_dora)} DoRA modules on CLIP-G self-attention (lora_te2_..._self_attn_"
                       f"*): A1111 passes the fused in_proj weight as W0, the DoRA add fails and each layer's "
                       f"q/k/v/out group is skipped ('Networks with errors'); keep te2 self-attention non-DoRA"))
    issues += _short_te(f, f.total)
    if f.unet_diffusers:
        notes.append("diffusers-style UNet names are mapped by a regex that loaders.md did not exercise")
    if f.dora:
        notes.append("on GPU the DoRA norm is computed in fp16 (devices.dtype)")
    return issues, notes


def _invokeai(f: _Facts) -> tuple[list[_Issue], list[str]]:
    issues: list[_Issue] = []
    if f.out_axis:
        issues.append(("wrong", f"{len(f.out_axis)} out-axis DoRA modules: InvokeAI reads .dora_scale as in-axis "
                                f"only, silently wrong; fix: dora-convert --to_axis in"))
    if f.scale_1d:
        issues.append(("fails", f"{len(f.scale_1d)} modules with a 1-D dora_scale: InvokeAI raises; "
                                f"fix: dora-convert --dora_scale_2d"))
    if f.tucker_dora:
        issues.append(("fails", f"{len(f.tucker_dora)} DoRA modules with lora_mid (Tucker): InvokeAI's DoRA layer "
                                f"ignores lora_mid and fails with a reshape error; train without use_tucker"))
    if f.unet_mixed:
        issues.append(("fails", "the file mixes SAI and diffusers UNet names: InvokeAI raises ValueError; fix: "
                                "dora-convert --unet_names sai"))
    issues += _short_te(f, f.total)
    return issues, []


def _sdnext(f: _Facts, old: bool) -> tuple[list[_Issue], list[str]]:
    issues, notes = [], []
    if f.scale_1d:
        issues.append(("wrong", f"{len(f.scale_1d)} modules with a 1-D dora_scale: the axis is guessed from the "
                                f"length and most layers come out wrong; fix: dora-convert --dora_scale_2d"))
    if old:
        if f.out_axis:
            issues.append(("wrong", f"{len(f.out_axis)} out-axis DoRA modules: builds before 2026-07-12 are "
                                    f"in-axis only; fix: dora-convert --to_axis in"))
        bad_alpha = [m for m in f.alpha_not_rank_dora if m.axis == "in"]
        if bad_alpha:
            issues.append(("wrong", f"{len(bad_alpha)} DoRA modules with alpha != rank: builds before 2026-07-12 "
                                    f"apply alpha/rank after the normalisation (right only when alpha == rank); "
                                    f"fix: dora-convert --fold_alpha"))
    elif f.te:
        notes.append("native LoRA skips text encoders by default since 2026-01 (enable 'LoRA native apply to text "
                     "encoder')")
    issues += _short_te(f, f.total)
    if f.dora:
        notes.append("'LoRA load using Diffusers method', OpenVINO and non-native paths fall back to diffusers "
                     "(DoRA dropped)")
    if f.unet_diffusers:
        notes.append("diffusers-style UNet names go through SD.Next's own converter (not exercised in loaders.md)")
    return issues, notes


def _diffusers(f: _Facts) -> tuple[list[_Issue], list[str]]:
    issues, notes = [], []
    if f.any_mid:
        issues.append(("fails", f"{len(f.any_mid)} modules with lora_mid: diffusers rejects the file ('keys have "
                                f"not been correctly renamed')"))
    if f.unknown_keys:
        issues.append(("fails", f"{f.unknown_keys} keys that are not LoRA/DoRA tensors: diffusers requires every "
                                f"key to be consumed"))
    if f.dora:
        issues.append(("wrong", f"{len(f.dora)} DoRA modules: diffusers deletes dora_scale (one warning, PR #9547) "
                                f"and loads them as plain LoRA; use "
                                f"dora_network.diffusers_loader.apply_dora_to_pipeline"))
    if f.te_short:
        notes.append("transformers-5 text-encoder names: whether diffusers maps them depends on the installed "
                     "transformers (not verified)")
    return issues, notes


def _helper(f: _Facts) -> tuple[list[_Issue], list[str]]:
    issues: list[_Issue] = []
    if f.ambiguous_in:
        known = f.axis_hint == "in"
        issues.append(("wrong", f"{len(f.ambiguous_in)} square layers with a 1-D dora_scale are read as out-axis "
                                f"(PEFT's convention), {'but this file is in-axis' if known else 'wrong if the file is in-axis'}; "
                                f"fix: dora-convert --dora_scale_2d"))
    return issues, []


def _lycoris(f: _Facts) -> tuple[list[_Issue], list[str]]:
    issues, notes = [], []
    if f.in_axis:
        issues.append(("fails", f"{len(f.in_axis)} in-axis DoRA modules: create_network_from_weights rebuilds with "
                                f"wd_on_output=True and cannot reload them (shape error) unless wd_on_output=False is "
                                f"passed"))
    if f.scale_1d:
        issues.append(("fails", f"{len(f.scale_1d)} modules with a 1-D dora_scale do not load (shape error); "
                                f"fix: dora-convert --dora_scale_2d"))
    if f.te_short:  # LyCORIS names modules from the model it runs on, so this depends on transformers
        notes.append(f"{len(f.te_short)} transformers-5 text-encoder names only match a transformers-5 model "
                     f"(sd-scripts runs transformers 4); fix: dora-convert --te_names classic")
    if f.out_axis:
        notes.append("LyCORIS' own strength formula V*(1 + s(m/||V|| - 1)) differs from the UIs' at s != 1")
    if f.unet_diffusers:
        notes.append("diffusers-style UNet names only match a diffusers UNet (sd-scripts' SDXL UNet uses SAI names)")
    return issues, notes


def _verdicts(f: _Facts) -> dict[str, LoaderVerdict]:
    rules: dict[str, Callable[[], tuple[list[_Issue], list[str]]]] = {
        "ComfyUI": lambda: _comfy_like(f, "ComfyUI"),
        "Forge": lambda: _comfy_like(f, "Forge"),
        "A1111": lambda: _a1111(f),
        "InvokeAI": lambda: _invokeai(f),
        "SD.Next": lambda: _sdnext(f, old=False),
        "SD.Next (before 2026-07-12)": lambda: _sdnext(f, old=True),
        "diffusers": lambda: _diffusers(f),
        "diffusers + dora_network helper": lambda: _helper(f),
        "LyCORIS": lambda: _lycoris(f),
    }
    out: dict[str, LoaderVerdict] = {}
    for loader in LOADERS:
        issues, notes = rules[loader]()
        issues = _common(f, loader) + issues
        if f.unknown_keys and loader != "diffusers":
            notes.append(f"{f.unknown_keys} keys are not LoRA/DoRA tensors (LoHa/LoKr/other): not judged here")
        verdict = max((severity for severity, _ in issues), key=VERDICTS.index, default="exact")
        out[loader] = LoaderVerdict(verdict, [reason for _, reason in issues], notes)
    return out


def _comfy_out_axis_error(modules: Sequence[_Module], groups: Mapping[str, Mapping[str, torch.Tensor]],
                          base: BaseModel) -> float | None:
    """Worst ||m V/||W0|| - m V/||V|| || / ||W' - W0|| over out-axis modules the base model has (ComfyUI's bug)."""
    worst = None
    for module in modules:
        if base.resolve(module.name) is None:
            continue
        t, spec = groups[module.name], module.spec
        w0 = base.weight(module.name).double()
        if tuple(w0.shape[:2]) != (spec.out_dim, spec.in_dim):
            continue
        delta = DF.lowrank_delta(t[UP].double(), t[DOWN].double(), spec.alpha / spec.rank,
                                 None if MID not in t else t[MID].double())
        m = t[DORA_SCALE].double()
        v = w0 + delta
        correct = DF.dora_weight(w0, delta, m, True)
        comfy = m * v / (DF.weight_norm(w0, True) + DF.EPS)
        update = float((correct - w0).norm())
        if update > 0:
            err = float((comfy - correct).norm()) / update
            worst = err if worst is None else max(worst, err)
    return worst


# -- the report ---------------------------------------------------------------------------------------------------
def _naming(values: Sequence[str | None]) -> str:
    found = {v for v in values if v}
    return "none" if not found else "mixed" if len(found) > 1 else found.pop()


def _axis_hint(metadata: Mapping[str, str], modules: Sequence[_Module]) -> str | None:
    stored = metadata.get("dora_network.wd_on_out")
    if stored in ("True", "False"):
        return "out" if stored == "True" else "in"
    axes = {m.axis for m in modules if m.axis in ("in", "out")}
    return axes.pop() if len(axes) == 1 else None


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
    modules: list[_Module] = []
    for name, tensors in groups.items():
        try:
            specs[name] = infer_spec(name, tensors)
        except ValueError as error:
            broken[name] = str(error)
            continue
        modules.append(_module_facts(name, tensors, specs[name]))
    base = None if model is None else load_base_model(model)
    hint = _axis_hint(metadata, modules)
    dora = [m for m in modules if m.spec.dora]
    unet_names = [m.unet_naming for m in modules if m.part == "UNet"]
    out_axis = [m for m in dora if m.axis == "out" and not m.scale_1d]
    facts = _Facts(
        total=len(modules),
        dora=dora,
        out_axis=out_axis,
        in_axis=[m for m in dora if m.axis == "in" and not m.scale_1d],
        scale_1d=[m for m in dora if m.scale_1d],
        ambiguous_in=[m for m in dora if m.axis == "ambiguous" and hint != "out"],
        tucker_dora=[m for m in dora if m.spec.tucker],
        any_mid=[m for m in modules if m.spec.tucker],
        alpha_not_rank_dora=[m for m in dora if m.spec.alpha != m.spec.rank],
        te=[m for m in modules if m.part in ("TE1", "TE2", "TE")],
        te_short=[m for m in modules if m.te_short],
        te2_self_attn_dora=[m for m in dora if m.te2_self_attn],
        unet_diffusers=sum(n == "diffusers" for n in unet_names),
        unet_mixed=_naming(unet_names) == "mixed",
        nonfinite=len(nonfinite_modules(state_dict)),
        broken=len(broken),
        unknown_keys=len(unknown),
        axis_hint=hint,
        comfy_error=None if base is None or not out_axis else _comfy_out_axis_error(out_axis, groups, base),
    )
    axis_counts = Counter(m.axis for m in dora)
    axis = _naming([m.axis for m in dora])
    if axis == "mixed" and set(axis_counts) - {"ambiguous"} and len(set(axis_counts) - {"ambiguous"}) == 1:
        axis = (set(axis_counts) - {"ambiguous"}).pop()  # 1-D square modules follow the others
    hashes_match = None
    # "0x..." is LyCORIS' own per-tensor hash scheme, not sd-scripts'; it is not checked
    if "sshs_model_hash" in metadata and not metadata["sshs_model_hash"].startswith("0x"):
        hashes_match = safetensors_hashes(state_dict, metadata)[0] == metadata["sshs_model_hash"]
    parts = {m.part for m in modules}
    base_version = metadata.get("ss_base_model_version", "")
    base_model = ("SDXL" if parts & {"TE1", "TE2"} or base_version.startswith("sdxl") else
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
        nonfinite=nonfinite_modules(state_dict),
        base_model=base_model,
        by_kind={k: by_kind.get(k, 0) for k in KINDS},
        by_part={p: by_part[p] for p in PARTS if by_part.get(p)},
        unet_naming=_naming(unet_names),
        te_naming=_naming(["short" if m.te_short else "classic" for m in facts.te]),
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
        loaders=_verdicts(facts),
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
    lines.append("loaders:")
    width = max(len(name) for name in r.loaders)
    for name, verdict in r.loaders.items():
        lines.append(f"  {name:<{width}}  {verdict.verdict}")
        lines += [f"  {'':<{width}}    - {reason}" for reason in verdict.reasons]
        lines += [f"  {'':<{width}}    (note: {note})" for note in verdict.notes]
    return "\n".join(lines)


def setup_logging(verbose: bool = False) -> None:
    """Root logging for the tools: rich if importable, plain otherwise; left alone if already configured."""
    root = logging.getLogger()
    level = logging.INFO if verbose else logging.WARNING
    if root.handlers:
        return
    try:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    except ImportError:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dora-inspect",
        description="Describe a LoRA/DoRA .safetensors file (kinds, names, ranks, alphas, DoRA axis, dtypes, "
                    "metadata) and say how ComfyUI, Forge, A1111, InvokeAI, SD.Next, diffusers and LyCORIS will "
                    "apply it: exact / approximate / wrong / fails, with the reason and the fix.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  dora-inspect my_dora.safetensors\n"
               "  dora-inspect my_dora.safetensors --model sd_xl_base_1.0.safetensors\n"
               "  dora-inspect my_dora.safetensors --model tiny --json > report.json\n\n"
               "--model accepts 'tiny' (the seeded tiny SDXL of dora_network.tiny), a local diffusers folder\n"
               "(read offline) or a .safetensors checkpoint (SAI single-file SDXL/SD1, or a diffusers UNet file;\n"
               "only its header is read).",
    )
    parser.add_argument("file", help="the LoRA/DoRA file (.safetensors, or a tensors-only .ckpt/.pt)")
    parser.add_argument("--model", default=None, help="base model to match names against (see below)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--verbose", action="store_true", help="log progress at INFO level")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``dora-inspect``: print the report; returns 0, or 2 for an unreadable file or model."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        report = inspect_file(args.file, model=args.model)
    except (FileNotFoundError, ValueError) as error:
        logger.error("%s", error)
        return 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
