"""Settings of the smoke trainer: one typed dataclass, read from a TOML file and overridden on the command line.

Precedence is sd-scripts': command line > ``--config_file`` > the defaults below (which ``configs/smoke.toml``
spells out). Flags use sd-scripts' underscore names. A TOML file may group keys in ``[sections]``; as in sd-scripts
they are only for the reader and are flattened. Unknown keys and values of the wrong type are refused, naming the
closest valid key.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

__all__ = ["CHECKS", "DEFAULT_CONFIG", "SAVE_DTYPES", "SmokeSettings", "build_parser", "load_settings", "read_toml"]

_REPO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "smoke.toml"
DEFAULT_CONFIG: Path | None = _REPO_CONFIG if _REPO_CONFIG.is_file() else None
"""``configs/smoke.toml`` in a checkout; None when installed without the repo (the dataclass defaults apply)."""

#: the self-checks, in the order they run (checks.py)
CHECKS: tuple[str, ...] = ("trained", "reload", "merge", "loss", "diffusers")

#: ``--save_precision`` -> torch dtype name (None: the network's own dtype, float32 here), as sd-scripts.
SAVE_DTYPES: dict[str, str | None] = {"float": "float32", "fp16": "float16", "bf16": "bfloat16", "none": None}


@dataclass
class SmokeSettings:
    """Every setting of a smoke run. Defaults live here; ``configs/smoke.toml`` mirrors them (a test pins that).

    Attributes:
        seed: seeds the tiny model, the synthetic data, the adapters' init and the noise.
        model_config: tiny SDXL TOML (``""``: ``configs/tiny_sdxl.toml`` or the packaged copy).
        resolution: image side in pixels; a multiple of 32 (VAE 8x, UNet 4x).
        train_data_dir: kohya-style image folder (``""``: the synthetic shapes).
        num_images: how many synthetic images (repeated every epoch, so the adapters can memorise them).
        train_batch_size: images per step (per process).
        max_train_steps: optimizer steps.
        learning_rate: default rate (sd-scripts' ``--learning_rate``).
        unet_lr: UNet adapters' rate (None: ``learning_rate``).
        text_encoder_lr: text-encoder adapters' rates, ``[]``, ``[both]`` or ``[te1, te2]`` (empty: ``learning_rate``).
        max_grad_norm: gradient clipping (0: off).
        network_dim: rank of Linear / 1x1 adapters.
        network_alpha: their alpha.
        network_args: ``key=value`` strings, passed to ``create_network`` as strings as sd-scripts does.
        algo: "dora", or "lora" to train plain LoRA with the same settings (adds ``algo=lora`` to network_args).
        network_train_unet_only: no text-encoder adapters.
        gradient_checkpointing: checkpoint the UNet (and the text encoders when they are trained).
        mixed_precision: accelerate's "no", "fp16" or "bf16".
        save_precision: "float", "fp16", "bf16" or "none" (the network's dtype).
        output_dir: folder for the file, ``loss.png`` and ``summary.json``.
        output_name: file stem of the saved network.
        num_cpu_threads: torch CPU threads per process (0: torch's default). 1 is fastest for this tiny model
            on a small or busy machine: multi-threaded kernels spin-wait when another process holds a core.
        loss_window: steps averaged for the first/last moving-average loss.
        min_loss_drop: the loss check passes when last/first moving average <= 1 - this.
        skip_checks: self-checks not to run (see :data:`CHECKS`).
        save_every_n_steps: also save ``<output_name>-stepNNNNNNNN.safetensors`` and its resume state every N
            steps (0: only at the end). A run that diverges keeps these and stops.
        resume: a resume state (``...-state.safetensors``, or the network file it sits beside) to continue from;
            the continued run repeats the uninterrupted one bit for bit on CPU.
        rank_digests: each process writes ``rank<N>_digest.json`` (a hash of its adapter weights); hidden flag.
        fault: ``nan_loss@N`` or ``nan_weight@N`` makes step N's loss or an adapter weight NaN (tests of the
            divergence guard); hidden flag.
    """

    seed: int = 0
    model_config: str = ""
    resolution: int = 128
    train_data_dir: str = ""
    num_images: int = 8
    train_batch_size: int = 4
    max_train_steps: int = 120
    learning_rate: float = 3e-3
    unet_lr: float | None = None
    text_encoder_lr: list[float] = field(default_factory=list)
    max_grad_norm: float = 1.0
    network_dim: int = 4
    network_alpha: float = 4.0
    network_args: list[str] = field(default_factory=lambda: ["conv_dim=4", "conv_alpha=4"])
    algo: str = "dora"
    network_train_unet_only: bool = False
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    save_precision: str = "float"
    output_dir: str = "outputs/smoke"
    output_name: str = "smoke_dora"
    num_cpu_threads: int = 1
    loss_window: int = 20
    min_loss_drop: float = 0.3
    skip_checks: list[str] = field(default_factory=list)
    save_every_n_steps: int = 0
    resume: str = ""
    rank_digests: bool = False
    fault: str = ""

    def network_kwargs(self) -> dict[str, str | None]:
        """``--network_args`` as sd-scripts hands them to ``create_network``: string values, ``dropout`` injected.

        ``algo`` from the setting replaces any ``algo=`` in ``network_args`` when it is "lora"; sd-scripts adds
        ``dropout=None`` when the user did not set one (its "LyCORIS workaround").
        """
        kwargs: dict[str, str | None] = {}
        for token in self.network_args:
            key, sep, value = token.partition("=")
            if not sep:
                raise ValueError(f"network_args: '{token}' is not key=value, e.g. conv_dim=4")
            kwargs[key.strip()] = value.strip()
        if self.algo == "lora":
            kwargs["algo"] = "lora"
        kwargs.setdefault("dropout", None)
        return kwargs

    def validate(self) -> None:
        """Refuse settings that cannot run.

        Raises:
            ValueError: naming the setting, the value and what is allowed.
        """
        problems = []
        if self.resolution < 32 or self.resolution % 32:
            problems.append(f"resolution={self.resolution} must be a positive multiple of 32")
        for name in ("num_images", "train_batch_size", "max_train_steps", "network_dim", "loss_window"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.algo not in ("dora", "lora"):
            problems.append(f"algo={self.algo!r} must be 'dora' or 'lora'")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            problems.append(f"mixed_precision={self.mixed_precision!r} must be 'no', 'fp16' or 'bf16'")
        if self.save_precision not in SAVE_DTYPES:
            problems.append(f"save_precision={self.save_precision!r} must be one of {', '.join(SAVE_DTYPES)}")
        unknown = sorted(set(self.skip_checks) - set(CHECKS))
        if unknown:
            problems.append(f"skip_checks={unknown} must be among {', '.join(CHECKS)}")
        if self.save_every_n_steps < 0:
            problems.append(f"save_every_n_steps={self.save_every_n_steps} must be >= 0 (0: save only at the end)")
        if self.fault and not re.fullmatch(r"(nan_loss|nan_weight)@[1-9][0-9]*", self.fault):
            problems.append(f"fault={self.fault!r} must be nan_loss@N or nan_weight@N")
        if self.num_cpu_threads < 0:
            problems.append(f"num_cpu_threads={self.num_cpu_threads} must be >= 0")
        if not 0 <= self.min_loss_drop < 1:
            problems.append(f"min_loss_drop={self.min_loss_drop} must be in [0, 1)")
        if problems:
            raise ValueError("smoke settings: " + "; ".join(problems))


_FIELDS = {f.name: f for f in dataclasses.fields(SmokeSettings)}
_HIDDEN = {"rank_digests", "fault"}


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a settings TOML (``.toml`` appended if missing, as sd-scripts), sections flattened.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unknown key, a key given twice, or a value of the wrong type.
    """
    import toml

    source = Path(path)
    if not source.is_file() and source.suffix != ".toml" and Path(f"{source}.toml").is_file():
        source = Path(f"{source}.toml")
    if not source.is_file():
        raise FileNotFoundError(f"--config_file '{path}' not found")
    flat: dict[str, Any] = {}
    for key, value in toml.load(source).items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for name, item in items:
            if name in flat:
                raise ValueError(f"{source}: '{name}' is set twice")
            flat[name] = item
    for name, value in flat.items():
        if name not in _FIELDS:
            closest = difflib.get_close_matches(name, _FIELDS, n=1)
            hint = f" Did you mean '{closest[0]}'?" if closest else ""
            raise ValueError(f"{source}: unknown setting '{name}'.{hint} Known: {', '.join(sorted(_FIELDS))}")
        flat[name] = _coerce(name, value, source)
    return flat


def _coerce(name: str, value: Any, source: Path) -> Any:
    """Check a TOML value against the field's type (int accepted for float, a number for a float list)."""
    kind = str(_FIELDS[name].type)
    if name == "text_encoder_lr" and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "float | None": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
        "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value),
        "list[float]": isinstance(value, list) and all(isinstance(v, (int, float)) for v in value),
    }[kind]
    if not ok:
        raise ValueError(f"{source}: '{name}' = {value!r} must be of type {kind}")
    if kind in ("float", "float | None"):
        return float(value)
    if kind == "list[float]":
        return [float(v) for v in value]
    return value


EXAMPLE = """\
example:
  bash scripts/smoke_train.sh                                  # configs/smoke.toml, ~1-2 min on 2 CPU cores
  python -m dora_network.smoke --max_train_steps 50 --network_dim 8 --network_alpha 4 \\
      --network_args "conv_dim=4" "conv_alpha=2" "wd_on_out=True" --output_dir outputs/try
  python -m dora_network.smoke --algo lora --output_dir outputs/lora   # plain LoRA, same settings (A/B)
  accelerate launch --multi_gpu --num_processes 2 -m dora_network.smoke   # data parallel (CPU: gloo)
  python -m dora_network.smoke --train_data_dir my_images/ --resolution 256   # kohya-style folder
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``--config_file`` plus one flag per setting, all defaulting to "not given"."""
    parser = argparse.ArgumentParser(
        prog="dora-smoke-train",
        description="Train DoRA end to end on the tiny SDXL model through sd-scripts' network API, save the file "
                    "and verify it (reload, merge, loss, diffusers). Exits non-zero when a check fails.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=None,
    )
    add = parser.add_argument
    add("--config_file", help="settings TOML (default: configs/smoke.toml); flags override it")
    add("--seed", type=int)
    add("--model_config", help="tiny SDXL TOML (default: configs/tiny_sdxl.toml)")
    add("--resolution", type=int, help="image side in pixels, a multiple of 32")
    add("--train_data_dir", help="kohya-style folder of images with .txt captions (default: synthetic shapes)")
    add("--num_images", type=int, help="number of synthetic images")
    add("--train_batch_size", type=int)
    add("--max_train_steps", type=int)
    add("--learning_rate", type=float)
    add("--unet_lr", type=float)
    add("--text_encoder_lr", type=float, nargs="*", help="one rate for both encoders, or te1 te2")
    add("--max_grad_norm", type=float, help="gradient clipping; 0 turns it off")
    add("--network_dim", type=int)
    add("--network_alpha", type=float)
    add("--network_args", nargs="*", metavar="KEY=VALUE", help='e.g. "conv_dim=4" "wd_on_out=True"')
    add("--algo", choices=("dora", "lora"), help="lora: plain LoRA with the same settings, for A/B runs")
    add("--network_train_unet_only", action=argparse.BooleanOptionalAction)
    add("--gradient_checkpointing", action=argparse.BooleanOptionalAction)
    add("--mixed_precision", choices=("no", "fp16", "bf16"))
    add("--save_precision", choices=tuple(SAVE_DTYPES))
    add("--output_dir")
    add("--output_name")
    add("--num_cpu_threads", type=int, help="torch CPU threads per process; 0 = torch's default")
    add("--loss_window", type=int, help="steps in the first/last moving average of the loss check")
    add("--min_loss_drop", type=float, help="required relative fall of the moving-average loss, e.g. 0.1")
    add("--skip_checks", nargs="*", choices=CHECKS, help="self-checks not to run")
    add("--save_every_n_steps", type=int, help="also save a step file and its resume state every N steps")
    add("--resume", metavar="STATE", help="continue from a ...-state.safetensors (or the network file beside it)")
    add("--rank_digests", action="store_true", default=None, help=argparse.SUPPRESS)
    add("--fault", help=argparse.SUPPRESS)
    return parser


def load_settings(argv: Sequence[str] | None = None) -> SmokeSettings:
    """Parse the command line and the config file into validated settings.

    Args:
        argv: arguments without the program name (None: ``sys.argv[1:]``).

    Returns:
        The settings.

    Raises:
        SystemExit: bad flags (argparse).
        FileNotFoundError / ValueError: a missing or invalid config file, or invalid settings.
    """
    namespace = vars(build_parser().parse_args(argv))
    config_file = namespace.pop("config_file")
    values: dict[str, Any] = {}
    source = config_file or DEFAULT_CONFIG
    if source is not None:
        values.update(read_toml(source))
    values.update({k: v for k, v in namespace.items() if v is not None})
    settings = SmokeSettings(**values)
    settings.validate()
    return settings
