"""Parse sd-scripts' ``--network_args`` (all strings) into one frozen, typed :class:`NetworkArgs`, strictly.

sd-scripts hands every ``k=v`` token over as a string, injects ``dropout`` (float or None) when the user did not
set it, and passes ``network_dim`` / ``network_alpha`` positionally (``None`` / int / float). LyCORIS' spellings
are accepted through one alias table and logged; unknown keys and bad values raise ``ValueError`` naming the key,
the value, what is allowed and the closest valid key.
"""

from __future__ import annotations

import difflib
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .families import FAMILIES, Family
from .families.base import parse_optional_rank
from .families.sd import PRESETS
from .families.sdxl import SDXL

logger = logging.getLogger(__name__)

__all__ = ["PRESETS", "NetworkArgs", "parse_bool", "parse_network_args"]

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@dataclass(frozen=True)
class NetworkArgs:
    """Every option of a DoRA network, after parsing. Defaults live here and nowhere else.

    Attributes:
        rank: rank of Linear and 1x1 Conv adapters (``network_dim``; None means 4).
        alpha: their alpha (``network_alpha``; None or 0 means alpha = rank).
        algo: "dora" or "lora" (plain LoRA, for A/B runs and LyCORIS ``algo=lora`` without ``dora_wd``).
        conv_dim: rank of kxk Conv adapters; None leaves kxk convs (and the resnet blocks) out.
        conv_alpha: their alpha; None means ``alpha`` (LyCORIS' default).
        wd_on_out: True = one magnitude per output row; False (default) = per input column, the axis
            every UI applies exactly.
        use_tucker: factor kxk conv adapters as down 1x1 -> mid kxk -> up 1x1 (``lora_mid``).
        detach_norm: treat ||W0 + sBA|| as a constant in backward (paper section 4.3).
        dropout: dropout on the rank-r activations (kohya's neuron dropout).
        rank_dropout: drop whole rank channels (training only), rescaled by 1/(1-p).
        module_dropout: skip the whole adapter with this probability (training only).
        rs_lora: scale by alpha/sqrt(rank) instead of alpha/rank (the file stores alpha*sqrt(rank)).
        preset: which layers get adapters, see :data:`PRESETS`.
        loraplus_lr_ratio / loraplus_unet_lr_ratio / loraplus_text_encoder_lr_ratio: LoRA+ lr multipliers
            for ``lora_up`` (None = off).
        allow_partial_load: load a file of which some modules name no layer of the model (they are skipped);
            by default such a file is refused, since it is usually for another base model.
        reg_dims: ``network_reg_dims``: (regex, rank) pairs, first match wins; rank 0 skips the layer.
        reg_lrs: ``network_reg_lrs``: (regex, learning rate) pairs, first match wins.
        verbose: log every adapter with its rank and alpha.
        family_options: the model family's own keys (``train_t5xxl``, ``train_blocks``, ...), parsed by the family.
    """

    rank: int = 4
    alpha: float = 4.0
    algo: str = "dora"
    conv_dim: int | None = None
    conv_alpha: float | None = None
    wd_on_out: bool = False
    use_tucker: bool = False
    detach_norm: bool = True
    dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    rs_lora: bool = False
    preset: str = "full"
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    allow_partial_load: bool = False
    reg_dims: tuple[tuple[str, int], ...] = ()
    reg_lrs: tuple[tuple[str, float], ...] = ()
    verbose: bool = False
    family_options: Mapping[str, Any] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def dora(self) -> bool:
        return self.algo == "dora"

    @property
    def effective_conv_alpha(self) -> float:
        return self.alpha if self.conv_alpha is None else self.conv_alpha


def parse_bool(key: str, value: Any) -> bool:
    """Strict boolean: true/false/1/0/yes/no/on/off in any case, or a real bool.

    Raises:
        ValueError: for anything else (LyCORIS would silently read "0" or "no" as True).
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(
        f"network_args: {key}={value!r} is not a boolean. Use one of true/false, 1/0, yes/no, on/off "
        f"(any case), e.g. {key}=True"
    )


def _parse_positive_int(key: str, value: Any) -> int:
    try:
        number = float(str(value).strip())
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number != int(number) or number < 1:
        raise ValueError(f"network_args: {key}={value!r} must be a positive integer, e.g. {key}=8")
    return int(number)


def _parse_float(key: str, value: Any, low: float, high: float, high_inclusive: bool, example: str) -> float:
    try:
        number = float(str(value).strip())
    except ValueError:
        number = math.nan
    upper_ok = number <= high if high_inclusive else number < high
    if not math.isfinite(number) or number < low or not upper_ok:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(
            f"network_args: {key}={value!r} must be a number in [{low:g}, {high:g}{bracket}, e.g. {key}={example}"
        )
    return number


def _probability(key: str, value: Any) -> float:
    return _parse_float(key, value, 0.0, 1.0, False, "0.1")


def _alpha(key: str, value: Any) -> float:
    return _parse_float(key, value, 0.0, math.inf, False, "4")


def _lr_ratio(key: str, value: Any) -> float:
    ratio = _parse_float(key, value, 0.0, math.inf, False, "16")
    if ratio == 0:
        raise ValueError(f"network_args: {key}={value!r} must be greater than 0, e.g. {key}=16")
    return ratio


def _algo(key: str, value: Any) -> str:
    text = str(value).strip().lower()
    if text in ("dora", "lora", "locon"):
        return "lora" if text == "locon" else text
    raise ValueError(
        f"network_args: {key}={value!r} is not supported. dora_network trains 'dora' (default) or plain "
        f"'lora'/'locon'; for LoHa/LoKr/other LyCORIS algorithms use --network_module=lycoris.kohya"
    )


def _preset(key: str, value: Any) -> str:
    text = str(value).strip().lower()
    if text not in PRESETS:
        closest = difflib.get_close_matches(text, PRESETS, n=1)
        hint = f" Did you mean '{closest[0]}'?" if closest else ""
        raise ValueError(
            f"network_args: preset={value!r} is not a preset.{hint} Allowed: {', '.join(PRESETS)} "
            f"(preset files are not supported)"
        )
    return text


def _regex_pairs(parse_value: Callable[[str, str], Any]) -> Callable[[str, Any], tuple[tuple[str, Any], ...]]:
    """``regex=value,regex=value`` (sd-scripts' ``network_reg_dims`` / ``network_reg_lrs``), checked strictly."""

    def parse(key: str, value: Any) -> tuple[tuple[str, Any], ...]:
        pairs = []
        for item in str(value).split(","):
            item = item.strip()
            if not item:
                continue
            pattern, sep, number = item.rpartition("=")
            if not sep or not pattern.strip():
                raise ValueError(f"network_args: {key}: {item!r} is not 'regex=value'; write e.g. "
                                 f"{key}=double_blocks.*attn=8,single_blocks=4")
            try:
                re.compile(pattern.strip())
            except re.error as error:
                raise ValueError(f"network_args: {key}: {pattern.strip()!r} is not a valid regex ({error})") from None
            pairs.append((pattern.strip(), parse_value(f"{key}[{pattern.strip()}]", number.strip())))
        return tuple(pairs)

    return parse


def _learning_rate(key: str, value: Any) -> float:
    return _parse_float(key, value, 0.0, math.inf, False, "1e-4")


def _must_be_false(reason: str) -> Callable[[str, Any], bool]:
    def check(key: str, value: Any) -> bool:
        if parse_bool(key, value):
            raise ValueError(f"network_args: {key}={value!r} is not supported by dora_network: {reason}")
        return False

    return check


# canonical key -> parser. ``None`` values are "not set" for every optional key.
_PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "algo": _algo,
    "conv_dim": _parse_positive_int,
    "conv_alpha": _alpha,
    "wd_on_out": parse_bool,
    "dora_wd": parse_bool,
    "use_tucker": parse_bool,
    "detach_norm": parse_bool,
    "dropout": _probability,
    "rank_dropout": _probability,
    "module_dropout": _probability,
    "rs_lora": parse_bool,
    "preset": _preset,
    "loraplus_lr_ratio": _lr_ratio,
    "loraplus_unet_lr_ratio": _lr_ratio,
    "loraplus_text_encoder_lr_ratio": _lr_ratio,
    "enable_conv": parse_bool,
    "allow_partial_load": parse_bool,
    "network_reg_dims": _regex_pairs(parse_optional_rank),
    "network_reg_lrs": _regex_pairs(_learning_rate),
    "verbose": parse_bool,
    # LyCORIS keys that GUIs emit with harmless values; anything else is refused with the reason.
    "bypass_mode": parse_bool,
    "use_scalar": _must_be_false("use_scalar is a LyCORIS-only option; leave it out"),
    "train_norm": _must_be_false("norm layers are never trained; leave it out"),
}

# LyCORIS / older spellings -> (canonical key, transform of the parsed value)
_ALIASES: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "wd_on_output": ("wd_on_out", lambda v: v),
    "use_cp": ("use_tucker", lambda v: v),
    "use_conv_cp": ("use_tucker", lambda v: v),
    # LyCORIS maps disable_conv_cp=True to Tucker *on* by mistake; the name means the opposite.
    "disable_conv_cp": ("use_tucker", lambda v: not v),
    "dora_simple": ("detach_norm", lambda v: v),
    "constrain": ("constraint", lambda v: v),
}

# Keys that exist in sd-scripts' networks/lora.py or LyCORIS but that we do not implement: named, not "unknown".
_UNSUPPORTED: dict[str, str] = {
    "block_dims": "block-wise ranks are not supported; use preset= to choose layers",
    "block_alphas": "block-wise alphas are not supported",
    "conv_block_dims": "block-wise conv ranks are not supported; use conv_dim",
    "conv_block_alphas": "block-wise conv alphas are not supported; use conv_alpha",
    "down_lr_weight": "block-wise learning rates are not supported",
    "mid_lr_weight": "block-wise learning rates are not supported",
    "up_lr_weight": "block-wise learning rates are not supported",
    "block_lr_zero_threshold": "block-wise learning rates are not supported",
    "factor": "it belongs to LoKr (use lycoris.kohya)",
    "decompose_both": "it belongs to LoKr (use lycoris.kohya)",
    "full_matrix": "it belongs to LoKr (use lycoris.kohya)",
    "unbalanced_factorization": "it belongs to LoKr (use lycoris.kohya)",
    "block_size": "it belongs to DyLoRA (use lycoris.kohya)",
    "constraint": "it belongs to Diag-OFT/BOFT (use lycoris.kohya)",
    "rescaled": "it belongs to Diag-OFT/BOFT (use lycoris.kohya)",
    "rank_dropout_scale": "rank dropout is always rescaled by 1/(1-p)",
}


def _closest(key: str, family: Family) -> str:
    candidates = list(_PARSERS) + list(_ALIASES) + list(family.options)
    found = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    return f" Did you mean '{found[0]}'?" if found else ""


def parse_network_args(
    network_dim: int | str | None = None,
    network_alpha: float | int | str | None = None,
    neuron_dropout: float | None = None,
    *,
    family: Family | None = None,
    **network_args: Any,
) -> NetworkArgs:
    """Turn sd-scripts' arguments into a :class:`NetworkArgs`.

    Args:
        network_dim: ``--network_dim`` (None means 4).
        network_alpha: ``--network_alpha`` (None or 0 means alpha = rank).
        neuron_dropout: ``--network_dropout``; a ``dropout`` in ``network_args`` takes precedence.
        family: the model family, whose own keys are accepted too (default SDXL, whose rules SD1.x shares).
        **network_args: the ``--network_args`` dict; values are strings, or float/None for the injected
            ``dropout``.

    Returns:
        The parsed, frozen options.

    Raises:
        ValueError: unknown key, unsupported key, bad value, or contradictory keys.
    """
    family = family or SDXL
    rank = 4 if network_dim in (None, "None", "") else _parse_positive_int("network_dim", network_dim)
    if network_alpha in (None, "None", ""):
        alpha = float(rank)
    else:
        alpha = _alpha("network_alpha", network_alpha)
        alpha = float(rank) if alpha == 0 else alpha

    parsed: dict[str, Any] = {}
    for raw_key, value in network_args.items():
        key = str(raw_key).strip().lower()
        transform: Callable[[Any], Any] = lambda v: v  # noqa: E731
        if key in _ALIASES:
            canonical, transform = _ALIASES[key]
            logger.warning("network_args: '%s' is LyCORIS' spelling; read as '%s'", raw_key, canonical)
            key = canonical
        if key in _UNSUPPORTED:
            raise ValueError(f"network_args: '{raw_key}' is not supported by dora_network: {_UNSUPPORTED[key]}")
        parser = _PARSERS.get(key) or family.options.get(key)
        if parser is None:
            owners = [f.title for f in FAMILIES if key in f.options]
            if owners:
                raise ValueError(
                    f"network_args: '{raw_key}' is an option of {' and '.join(owners)} models; this model is "
                    f"{family.title}. Leave it out (the {family.title} options are: "
                    f"{', '.join(sorted(family.options)) or 'none'})"
                )
            raise ValueError(
                f"network_args: unknown key '{raw_key}' (value {value!r}).{_closest(key, family)} "
                f"Valid keys: {', '.join(sorted(set(_PARSERS) | set(family.options)))}"
            )
        unset = isinstance(value, str) and value.strip().lower() in ("", "none") and key in _PARSERS
        if value is None or unset:
            continue  # sd-scripts injects dropout=None; "None" means not set (a family's "none" is a value)
        new = transform(parser(raw_key, value))
        if key in parsed and parsed[key] != new:
            raise ValueError(
                f"network_args: '{key}' is given twice with different values ({parsed[key]!r} and {new!r}); "
                f"keep one"
            )
        parsed[key] = new

    algo = parsed.pop("algo", "dora")
    dora_wd = parsed.pop("dora_wd", None)
    if algo == "lora" and dora_wd:
        algo = "dora"  # LyCORIS: algo=lora + dora_wd=True is DoRA
    elif algo == "dora" and dora_wd is False:
        raise ValueError(
            "network_args: algo=dora contradicts dora_wd=False. For plain LoRA write algo=lora; for DoRA drop "
            "dora_wd or set dora_wd=True"
        )
    if parsed.pop("bypass_mode", False):
        logger.info("network_args: bypass_mode=True ignored: dora_network always runs in activation space and "
                    "keeps DoRA active (LyCORIS' bypass mode silently drops it)")
    parsed.pop("use_scalar", None)  # only False gets this far
    parsed.pop("train_norm", None)
    if parsed.pop("enable_conv", True) is False:
        parsed.pop("conv_dim", None)
    if "dropout" not in parsed and neuron_dropout is not None:
        parsed["dropout"] = _probability("network_dropout", neuron_dropout)
    elif "dropout" in parsed and neuron_dropout not in (None, parsed["dropout"]):
        logger.warning("network_args: dropout=%s overrides --network_dropout=%s", parsed["dropout"], neuron_dropout)
    for key in ("dropout", "rank_dropout", "module_dropout"):
        if parsed.get(key) == 0:
            parsed.pop(key)
    if parsed.get("use_tucker") and "conv_dim" not in parsed:
        logger.warning("network_args: use_tucker=True has no effect without conv_dim (only kxk convs use Tucker)")
    if "conv_alpha" in parsed and "conv_dim" not in parsed:
        logger.warning("network_args: conv_alpha has no effect without conv_dim")
    family_options = {key: parsed.pop(key) for key in list(parsed) if key in family.options}
    if not family.has_convs and parsed.get("conv_dim") is not None:
        raise ValueError(
            f"network_args: conv_dim is meaningless on {family.title}: its blocks have no kxk convolution, so it "
            f"would train nothing. Leave conv_dim/conv_alpha out"
        )
    if parsed.get("preset", "full") != "full" and not family.has_presets:
        raise ValueError(
            f"network_args: preset={parsed['preset']!r} describes SD/SDXL UNet layers; on {family.title} choose "
            f"layers with {', '.join(sorted(family.options)) or 'network_reg_dims'} instead"
        )
    if family_options.get("split_qkv") and parsed.get("rs_lora"):
        raise ValueError("network_args: split_qkv=True with rs_lora=True is not supported; choose one")
    for key, field_name in (("network_reg_dims", "reg_dims"), ("network_reg_lrs", "reg_lrs")):
        if key in parsed:
            parsed[field_name] = parsed.pop(key)
    return NetworkArgs(rank=rank, alpha=alpha, algo=algo, raw=dict(network_args), family_options=family_options,
                       **parsed)
