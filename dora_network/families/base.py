"""What dora_network knows about one model family, in one object that every part reads.

A :class:`Family` says how to recognise the family's models from the objects sd-scripts passes (class names and
structure, never an import of sd-scripts), which containers hold the layers its sd-scripts module adapts, how
adapters are named (prefixes per text-encoder position), the family's own ``network_args`` with their sd-scripts
meaning, and the other spellings files use for its layers. targets.py, args.py, network.py and the loaders only
ask these questions; adding a family is adding one file under ``families/``.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from torch import nn

if TYPE_CHECKING:
    from ..args import NetworkArgs

__all__ = [
    "Family",
    "OptionParser",
    "TextEncoderSlot",
    "class_names",
    "diffusers_joint_block",
    "type_dim",
    "parse_block_selection",
    "parse_flag",
    "parse_int_list",
    "parse_optional_rank",
    "parse_pattern_list",
    "refused_option",
]

#: parses one ``network_args`` value (a string from sd-scripts) for the key named in the first argument
OptionParser = Callable[[str, Any], Any]


@dataclass(frozen=True)
class TextEncoderSlot:
    """One position in the text-encoder list a trainer passes.

    Attributes:
        prefix: adapter-name prefix (``lora_te1``); ``component`` is the part after ``lora_``.
        classes: container classes whose Linear children get adapters (sd-scripts' TEXT_ENCODER_TARGET_REPLACE_MODULE).
        enabled_by: the family option that turns adapters on for this encoder (FLUX's T5: ``train_t5xxl``);
            None means always on.
        clip_paths: CLIP encoders are named in the classic ``text_model.`` form on every transformers version.
    """

    prefix: str
    classes: tuple[str, ...]
    enabled_by: str | None = None
    clip_paths: bool = False

    @property
    def component(self) -> str:
        return self.prefix[len("lora_"):]


def class_names(module: nn.Module | None) -> set[str]:
    """Every class name in a module tree (empty for None); how families are recognised without importing them."""
    return set() if module is None else {type(m).__name__ for m in module.modules()}


class Family:
    """Base description; each family file defines one subclass instance. Defaults describe sd-scripts' conventions.

    Attributes:
        name: short key (``flux``), used in messages, metadata and tests.
        title: what users call it (``FLUX.1``).
        trainers: the sd-scripts scripts that train it.
        sd_scripts_module: sd-scripts' own LoRA module for it (whose names and targets we reproduce).
        has_convs: whether ``conv_dim`` can mean anything (kxk convs inside the adapted blocks).
        has_presets: whether the SD-style ``preset`` choices (attn-only, unet-only, ...) mean anything.
        options: the family's own ``network_args`` -> parser; every other family's keys are refused by name.
        file_pattern: tells this family's files from the module names alone (tools that see only a file).
    """

    name: str = ""
    title: str = ""
    trainers: str = ""
    sd_scripts_module: str = ""
    unet_prefix: str = "lora_unet"
    has_convs: bool = False
    has_presets: bool = False
    #: a regex that a module name of this family's files matches (and no other family's do); None: none of its own
    file_pattern: str | None = None
    options: Mapping[str, OptionParser] = {}
    #: top-level denoiser modules of the family's original single file when stored without a prefix (BFL FLUX.1)
    checkpoint_roots: tuple[str, ...] = ()
    #: where each denoiser layer lives in the family's diffusers transformer: (regex fully matching the lora_name
    #: without ``lora_unet_``, diffusers module paths that hold its rows in order, ``{0}`` = the block index); a
    #: fused weight (FLUX's qkv) lists several modules
    diffusers_transformer: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: class names of that diffusers transformer
    diffusers_classes: tuple[str, ...] = ()

    # -- recognition ---------------------------------------------------------------------------------------------
    def recognizes(self, unet: nn.Module | None, text_encoders: Sequence[nn.Module | None]) -> bool:
        raise NotImplementedError

    # -- text encoders -------------------------------------------------------------------------------------------
    def text_encoder_slots(self, count: int) -> tuple[TextEncoderSlot, ...]:
        """One slot per position of the trainer's text-encoder list (``count`` positions, None ones included)."""
        raise NotImplementedError

    # -- the denoiser --------------------------------------------------------------------------------------------
    def unet_containers(self, args: NetworkArgs) -> tuple[str, ...]:
        """Container class names whose Linear/Conv2d descendants get adapters (kxk convs only with conv_dim)."""
        raise NotImplementedError

    def extra_unet_layers(self, args: NetworkArgs) -> tuple[tuple[str, int], ...]:
        """(substring of the lora_name, rank) of layers outside the containers that options add (FLUX ``in_dims``)."""
        return ()

    def selects(self, lora_name: str, path: str, component: str, args: NetworkArgs) -> bool:
        """Whether a layer found in a container gets an adapter (presets, Anima's include/exclude patterns)."""
        return True

    def type_rank(self, lora_name: str, path: str, args: NetworkArgs) -> int | None:
        """A rank an option sets for this layer (0 skips it), or None for the network's rank."""
        return None

    def reg_matches(self, pattern: str, lora_name: str, path: str) -> bool:
        """Whether a ``network_reg_dims``/``network_reg_lrs`` pattern picks this layer.

        sd-scripts' FLUX module searches the lora_name anywhere; Anima's fully matches the dotted module path.
        """
        return re.search(pattern, lora_name) is not None

    def fused_parts(self, path: str, in_features: int, out_features: int) -> tuple[int, ...] | None:
        """Output rows of each part of a fused projection that ``split_qkv`` trains as separate parts, or None."""
        return None

    # -- names in files ------------------------------------------------------------------------------------------
    def unet_aliases(self, path: str) -> tuple[str, ...]:
        """Other dotted paths that files written for other tools use for this denoiser layer."""
        return ()

    def comfy_name(self, lora_name: str) -> str:
        """The name ComfyUI's model for this family gives this module (most read sd-scripts' names as saved)."""
        return lora_name

    # -- messages ------------------------------------------------------------------------------------------------
    def describe(self) -> str:
        return f"{self.title} ({self.trainers}, like {self.sd_scripts_module})"


# -- option parsers shared by several families (sd-scripts' spellings) --------------------------------------------
def parse_flag(key: str, value: Any) -> bool:
    """args.parse_bool's strict booleans (imported when called: args imports the families)."""
    from ..args import parse_bool

    return parse_bool(key, value)


def type_dim(lora_name: str, options: Mapping[str, Any], type_dims: Sequence[tuple[str, tuple[str, ...]]]
             ) -> int | None:
    """The rank the first per-type option whose name parts all occur in ``lora_name`` sets (sd-scripts' rule for
    FLUX's img_attn_dim, SD3's x_mlp_dim, Lumina's attn_dim, ...), or None."""
    for key, parts in type_dims:
        if options.get(key) is not None and all(part in lora_name for part in parts):
            return options[key]
    return None


def diffusers_joint_block(img: str, txt: str, qkv: str, proj: str, fc1: str, fc2: str,
                          mod: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``diffusers_transformer`` rows for an MM-DiT double block as diffusers names it (FLUX.1 and SD3 alike):
    ``img``/``txt`` are the two streams' lora_name stems with the block index as a group, the other arguments the
    family's names of the fused qkv, attention output, MLP in/out and modulation layers."""
    block = "transformer_blocks.{0}."
    return (
        (img + qkv, tuple(block + f"attn.to_{p}" for p in "qkv")),
        (img + proj, (block + "attn.to_out.0",)),
        (img + fc1, (block + "ff.net.0.proj",)),
        (img + fc2, (block + "ff.net.2",)),
        (img + mod, (block + "norm1.linear",)),
        (txt + qkv, tuple(block + f"attn.add_{p}_proj" for p in "qkv")),
        (txt + proj, (block + "attn.to_add_out",)),
        (txt + fc1, (block + "ff_context.net.0.proj",)),
        (txt + fc2, (block + "ff_context.net.2",)),
        (txt + mod, (block + "norm1_context.linear",)),
    )


NO_GGPO = "LoRA-GGPO perturbs the plain-LoRA product and has no DoRA form; leave it out"


def refused_option(reason: str) -> OptionParser:
    """A key sd-scripts' module accepts that dora_network cannot honour: refused with the reason."""

    def parse(key: str, value: Any) -> Any:
        raise ValueError(f"network_args: '{key}' is not supported by dora_network: {reason}")

    return parse


def parse_block_selection(total: int) -> OptionParser:
    """``all``, ``none``, or comma-separated indices and inclusive ranges (``0,2-5``), as sd-scripts' FLUX module."""

    def parse(key: str, value: Any) -> tuple[bool, ...]:
        text = str(value).strip().lower()
        if text == "all":
            return (True,) * total
        if text in ("none", ""):
            return (False,) * total
        selected = [False] * total
        for part in text.split(","):
            part = part.strip()
            try:
                low, _, high = part.partition("-")
                start, end = int(low), int(high) if high else int(low)
            except ValueError:
                start, end = -1, -1
            if not (0 <= start <= end < total):
                raise ValueError(
                    f"network_args: {key}={value!r}: '{part}' is not a block index or range within 0-{total - 1}. "
                    f"Write e.g. {key}=0-{total // 2} or {key}=0,2,4 or {key}=all"
                )
            for index in range(start, end + 1):
                selected[index] = True
        return tuple(selected)

    return parse


def parse_optional_rank(key: str, value: Any) -> int:
    """A per-type rank: a non-negative integer; 0 leaves that layer type untrained (sd-scripts' meaning)."""
    try:
        number = float(str(value).strip())
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number != int(number) or number < 0:
        raise ValueError(f"network_args: {key}={value!r} must be a rank >= 0 (0 skips those layers), e.g. {key}=8")
    return int(number)


def parse_int_list(length: int, names: str) -> OptionParser:
    """``[a,b,...]`` or ``a,b,...`` with exactly ``length`` non-negative integers (FLUX ``in_dims``)."""

    def parse(key: str, value: Any) -> tuple[int, ...]:
        text = str(value).strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if len(parts) != length:
            raise ValueError(f"network_args: {key}={value!r} needs {length} ranks ({names}), e.g. "
                             f"{key}=[{','.join(['4'] * length)}]")
        return tuple(parse_optional_rank(f"{key}[{i}]", p) for i, p in enumerate(parts))

    return parse


def parse_pattern_list(key: str, value: Any) -> tuple[str, ...]:
    """A Python-literal regex or list of regexes (``['.*mlp.*']``), as sd-scripts' Anima module reads them."""
    try:
        parsed = ast.literal_eval(str(value).strip())
    except (ValueError, SyntaxError):
        raise ValueError(
            f"network_args: {key}={value!r} is not a quoted regex or a list of them; write e.g. "
            f"{key}=\"['.*self_attn.*']\" (a Python list of strings)"
        ) from None
    patterns = [parsed] if isinstance(parsed, str) else parsed
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"network_args: {key}={value!r} must be a string or a list of strings")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"network_args: {key}: {pattern!r} is not a valid regular expression ({error})") from None
    return tuple(patterns)
