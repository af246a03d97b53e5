"""The loaders' rules (reference/loaders.md): from a file's per-module facts to a verdict per UI and library.

:func:`module_facts` classifies one module (part, kind, DoRA axis, name spellings); :func:`file_facts` gathers the
file-level facts the rules read (and, with a base model, measures ComfyUI's out-axis error); :func:`judge` applies
every loader's rules and returns a :class:`LoaderVerdict` per loader, the worst issue deciding:

* ``exact``: every module is applied as trained.
* ``approximate``: every module is applied, some with a known small deviation (ComfyUI's ``||W0||`` out-axis norm).
* ``wrong``: the file loads, but some modules come out different from the trained weights (silently, or skipped
  with per-layer errors or "lora key not loaded" warnings).
* ``fails``: the loader refuses the file, or errors on every module.

No UI code runs; each rule names the affected module count and the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from .. import functional as DF
from ..keys import DORA_SCALE, DOWN, MID, ModuleSpec
from .base_model import BaseModel
from .file_modules import module_delta

__all__ = ["DIT_LOADERS", "KINDS", "LOADERS", "PARTS", "VERDICTS", "FileFacts", "LoaderVerdict", "ModuleFacts",
           "file_facts", "judge", "judge_dit", "module_facts", "naming"]

#: Verdicts from best to worst; a loader's verdict is the worst over its issues.
VERDICTS = ("exact", "approximate", "wrong", "fails")
LOADERS = (
    "ComfyUI",
    "ComfyUI + DoRA Loader node",
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
_PART_PREFIXES = (("lora_unet_", "UNet"), ("lora_te1_", "TE1"), ("lora_te2_", "TE2"), ("lora_te_", "TE"))
_SAI_ROOTS = ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_")
_DIFFUSERS_ROOTS = ("down_blocks_", "mid_block_", "up_blocks_", "conv_in", "conv_out", "conv_norm_out",
                    "time_embedding_", "add_embedding_")


# -- facts --------------------------------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class ModuleFacts:
    """One module as the rules see it: part ("UNet", "TE1", ...), kind (:data:`KINDS`), DoRA axis, spellings."""

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


def module_facts(name: str, tensors: Mapping[str, torch.Tensor], spec: ModuleSpec) -> ModuleFacts:
    """Classify one module from its name, tensors and spec."""
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
    return ModuleFacts(name, part, kind, spec, axis, scale_1d, unet_naming, te_short,
                       part == "TE2" and "_self_attn_" in name)


@dataclass
class FileFacts:
    """The file-level facts the rules read: the modules each rule concerns, and counts."""

    total: int
    dora: list[ModuleFacts]
    out_axis: list[ModuleFacts]  # 2-D/4-D out-axis DoRA
    in_axis: list[ModuleFacts]  # 2-D/4-D in-axis DoRA
    scale_1d: list[ModuleFacts]
    ambiguous_in: list[ModuleFacts]  # 1-D on a square layer with no clue to its axis: our loader guesses "out"
    tucker_dora: list[ModuleFacts]
    any_mid: list[ModuleFacts]
    alpha_not_rank_dora: list[ModuleFacts]
    te: list[ModuleFacts]
    te_short: list[ModuleFacts]
    te2_self_attn_dora: list[ModuleFacts]
    unet_diffusers: int
    unet_mixed: bool
    nonfinite: int
    broken: int
    unknown_keys: int
    axis_hint: str | None
    comfy_error: float | None
    modules: list[ModuleFacts] = field(default_factory=list)


def naming(values: Sequence[str | None]) -> str:
    """"none", "mixed", or the one spelling/axis the values share (None values ignored)."""
    found = {v for v in values if v}
    return "none" if not found else "mixed" if len(found) > 1 else found.pop()


def _comfy_out_axis_error(modules: Sequence[ModuleFacts], groups: Mapping[str, Mapping[str, torch.Tensor]],
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
        delta = module_delta(t, spec)
        m = t[DORA_SCALE].double()
        v = w0 + delta
        correct = DF.dora_weight(w0, delta, m, True)
        comfy = m * v / (DF.weight_norm(w0, True) + DF.EPS)
        update = float((correct - w0).norm())
        if update > 0:
            err = float((comfy - correct).norm()) / update
            worst = err if worst is None else max(worst, err)
    return worst


def file_facts(modules: Sequence[ModuleFacts], groups: Mapping[str, Mapping[str, torch.Tensor]], *,
               axis_hint: str | None, nonfinite: int, broken: int, unknown_keys: int,
               base: BaseModel | None = None) -> FileFacts:
    """The file-level facts the rules read; with ``base``, ComfyUI's out-axis error is measured on its weights."""
    dora = [m for m in modules if m.spec.dora]
    unet_names = [m.unet_naming for m in modules if m.part == "UNet"]
    out_axis = [m for m in dora if m.axis == "out" and not m.scale_1d]
    return FileFacts(
        total=len(modules),
        dora=dora,
        out_axis=out_axis,
        in_axis=[m for m in dora if m.axis == "in" and not m.scale_1d],
        scale_1d=[m for m in dora if m.scale_1d],
        # our loader (helper, ComfyUI node) reads these with the metadata's axis, else the other modules' axis,
        # else as out-axis: only that last guess can be wrong
        ambiguous_in=[m for m in dora if m.axis == "ambiguous" and axis_hint is None
                      and not any(o.axis in ("in", "out") for o in dora)],
        tucker_dora=[m for m in dora if m.spec.tucker],
        any_mid=[m for m in modules if m.spec.tucker],
        alpha_not_rank_dora=[m for m in dora if m.spec.alpha != m.spec.rank],
        te=[m for m in modules if m.part in ("TE1", "TE2", "TE")],
        te_short=[m for m in modules if m.te_short],
        te2_self_attn_dora=[m for m in dora if m.te2_self_attn],
        unet_diffusers=sum(n == "diffusers" for n in unet_names),
        unet_mixed=naming(unet_names) == "mixed",
        nonfinite=nonfinite,
        broken=broken,
        unknown_keys=unknown_keys,
        axis_hint=axis_hint,
        comfy_error=None if base is None or not out_axis else _comfy_out_axis_error(out_axis, groups, base),
        modules=list(modules),
    )


# -- loader rules (reference/loaders.md) --------------------------------------------------------------------------
_Issue = tuple[str, str]


def _partial(affected: int, total: int) -> str:
    """Loaders that skip bad layers and go on: every module skipped means the file does nothing."""
    return "fails" if affected >= total else "wrong"


def _short_te(f: FileFacts, total: int) -> list[_Issue]:
    if not f.te_short:
        return []
    return [(_partial(len(f.te_short), total),
             f"{len(f.te_short)} text-encoder modules use transformers-5 names (lora_te1_encoder_...) that it does "
             f"not map ('lora key not loaded'); fix: dora-convert --te_names classic")]


def _common(f: FileFacts, loader: str) -> list[_Issue]:
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


def _comfy_like(f: FileFacts, name: str) -> tuple[list[_Issue], list[str]]:
    issues, notes = [], []
    node = " or, in ComfyUI, load it with the DoRA Loader node (dora_network, exact)" if name == "ComfyUI" else ""
    if f.out_axis:
        measured = "" if f.comfy_error is None else (
            f"; measured on the given base model: up to {100 * f.comfy_error:.2g}% of the update")
        issues.append(("approximate",
                       f"{len(f.out_axis)} out-axis DoRA modules: {name} divides by ||W0|| instead of ||W0 + dW|| "
                       f"(ComfyUI PR #15458 open), the error grows with training{measured}; fix: train in-axis "
                       f"(wd_on_out=False) or dora-convert --to_axis in{node}"))
    if f.scale_1d:
        issues.append(("wrong", f"{len(f.scale_1d)} modules with a 1-D dora_scale: the axis is guessed from shape[0] "
                                f"and broadcast to (out, out); square layers come out silently wrong, the others "
                                f"error and are skipped; fix: dora-convert --dora_scale_2d{node}"))
    issues += _short_te(f, f.total)
    if f.dora and name == "ComfyUI":
        notes.append("the bypass loader (LoraLoaderBypass) ignores dora_scale; use the regular LoRA loader")
    if f.dora and name == "Forge":
        notes.append("'online LoRA' mode computes the DoRA norm in the weight's dtype (fp16/bf16)")
    return issues, notes


def _a1111(f: FileFacts) -> tuple[list[_Issue], list[str]]:
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


def _invokeai(f: FileFacts) -> tuple[list[_Issue], list[str]]:
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


def _sdnext(f: FileFacts, old: bool) -> tuple[list[_Issue], list[str]]:
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


def _diffusers(f: FileFacts) -> tuple[list[_Issue], list[str]]:
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
                                f"dora_network.integrations.diffusers_loader.apply_dora_to_pipeline"))
    if f.te_short:
        notes.append("transformers-5 text-encoder names: whether diffusers maps them depends on the installed "
                     "transformers (not verified)")
    return issues, notes


def _helper(f: FileFacts) -> tuple[list[_Issue], list[str]]:
    """Our diffusers helper and our ComfyUI node: every layout exact, but a 1-D scale on a square layer is guessed."""
    issues: list[_Issue] = []
    if f.ambiguous_in:
        issues.append(("wrong", f"{len(f.ambiguous_in)} square layers with a 1-D dora_scale and nothing in the file "
                                f"telling their axis are read as out-axis (PEFT's convention): wrong if the file is "
                                f"in-axis; fix: dora-convert --dora_scale_2d --axis in|out"))
    return issues, []


def _lycoris(f: FileFacts) -> tuple[list[_Issue], list[str]]:
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


def judge(f: FileFacts) -> dict[str, LoaderVerdict]:
    """Loader -> :class:`LoaderVerdict`, in :data:`LOADERS` order."""
    rules: dict[str, Callable[[], tuple[list[_Issue], list[str]]]] = {
        "ComfyUI": lambda: _comfy_like(f, "ComfyUI"),
        "ComfyUI + DoRA Loader node": lambda: _helper(f),  # the same loader code (loading.match_file) as the helper
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


# -- DiT families -------------------------------------------------------------------------------------------------
#: the loaders judged for each DiT family's files; the others (A1111, InvokeAI, SD.Next, LyCORIS) were not looked at
DIT_LOADERS = {
    "flux": ("ComfyUI", "ComfyUI + DoRA Loader node", "Forge", "diffusers", "diffusers + dora_network helper"),
    "sd3": ("ComfyUI", "ComfyUI + DoRA Loader node", "diffusers", "diffusers + dora_network helper"),
    "hunyuan_image": ("ComfyUI", "ComfyUI + DoRA Loader node"),
}


def _dit_diffusers(f: FileFacts, family: str) -> tuple[list[_Issue], list[str]]:
    """Measured with diffusers 0.42.1 (tests/test_diffusers_dit.py's models): lora_state_dict drops every dora_scale;
    FLUX.1 kohya names are converted (its converter assumes the 3072 width), SD3 kohya names are not converted at
    all, so load_lora_into_transformer adds no adapter."""
    if family == "sd3":
        return [("fails", f"{f.total} modules with sd-scripts' SD3 names: diffusers does not convert them and loads "
                          f"no adapter (silently; it also drops dora_scale); use "
                          f"dora_network.integrations.diffusers_loader.apply_dora_to_pipeline")], []
    issues, notes = _diffusers(f)
    return issues, notes


def _hunyuan_comfy(f: FileFacts) -> tuple[list[_Issue], list[str]]:
    issues, notes = _comfy_like(f, "ComfyUI")
    renamed = [m for m in f.modules if re.search(r"_(mlp_fc[12]|mod_linear|modulation_linear)$", m.name)]
    if renamed:
        issues.append((_partial(len(renamed), f.total),
                       f"{len(renamed)} modules use sd-scripts' HunyuanImage names (img_mlp_fc1, img_mod_linear, "
                       f"modulation_linear) that ComfyUI's model spells img_mlp_0, img_mod_lin, modulation_lin "
                       f"('lora key not loaded'); fix: dora-convert --unet_names comfy, or the DoRA Loader node"))
    return issues, notes


def judge_dit(f: FileFacts, family: str) -> dict[str, LoaderVerdict]:
    """Loader -> verdict for a DiT family's file (FLUX.1, SD3, HunyuanImage-2.1); empty for families not judged.

    ComfyUI's and Forge's DoRA code is the same for every family (``weight_decompose``: exact in-axis, ||W0|| for
    out-axis), and they place these families' sd-scripts names (but HunyuanImage's four renamed layer types); the
    node and our diffusers helper are tested on each family (tests/test_comfyui_families.py, test_diffusers_dit.py).
    """
    rules: dict[str, Callable[[], tuple[list[_Issue], list[str]]]] = {
        "ComfyUI": (lambda: _hunyuan_comfy(f)) if family == "hunyuan_image" else (lambda: _comfy_like(f, "ComfyUI")),
        "ComfyUI + DoRA Loader node": lambda: _helper(f),
        "Forge": lambda: _comfy_like(f, "Forge"),
        "diffusers": lambda: _dit_diffusers(f, family),
        "diffusers + dora_network helper": lambda: _helper(f),
    }
    out: dict[str, LoaderVerdict] = {}
    for loader in DIT_LOADERS.get(family, ()):
        issues, notes = rules[loader]()
        issues = _common(f, loader) + issues
        verdict = max((severity for severity, _ in issues), key=VERDICTS.index, default="exact")
        out[loader] = LoaderVerdict(verdict, [reason for _, reason in issues], notes)
    return out
