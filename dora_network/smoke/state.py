"""The smoke train's faults and resumes: the resume state file, the per-step seeding that makes a resumed run a
replay, and the divergence guard.

The resume state holds everything a run needs to continue bit for bit, in one safetensors file.

A periodic save (``--save_every_n_steps``) writes the network file ``<name>-step00000060.safetensors`` (what a
user loads in a UI) and beside it ``<name>-step00000060-state.safetensors``: the adapters in float32 whatever
``--save_precision`` is, AdamW's moments, the step, the loss history and the settings that shaped the run.
``--resume`` reads it back. Together with the per-step seeding in smoke.py (noise, timesteps, dropout and the data
order depend only on the seed and the step), a resumed run repeats the uninterrupted one exactly on CPU.

Tensors only, no pickle: the optimizer's non-tensor state and the progress live in the JSON metadata.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..io import save_file
from .config import SmokeSettings

logger = logging.getLogger(__name__)

__all__ = ["MUST_MATCH", "RATES", "EpochShuffle", "ResumeError", "ResumeState", "TrainingDiverged", "diverged",
           "load_state", "save_state", "state_path", "step_file_name", "step_seed", "weights_finite"]

_FORMAT = "dora_network.smoke_state/1"
_NET, _OPT = "network.", "optimizer."

#: settings that define the model, the data and the math: a resumed run must use the same values.
MUST_MATCH: tuple[str, ...] = (
    "seed", "model_config", "resolution", "train_data_dir", "num_images", "train_batch_size", "network_dim",
    "network_alpha", "network_args", "algo", "network_train_unet_only", "mixed_precision",
)
#: settings a resumed run may change (e.g. a lower rate after a divergence); the run is then no longer a replay.
RATES: tuple[str, ...] = ("learning_rate", "unet_lr", "text_encoder_lr", "max_grad_norm")


class ResumeError(ValueError):
    """A ``--resume`` state that is missing, unreadable, or does not fit this run's settings."""


def step_file_name(output_name: str, step: int) -> str:
    """sd-scripts' name for a step save: ``<output_name>-step00000060.safetensors``."""
    return f"{output_name}-step{step:08d}.safetensors"


def state_path(network_file: str | Path) -> Path:
    """The resume state beside a network file: ``x.safetensors`` -> ``x-state.safetensors``."""
    path = Path(network_file)
    return path.with_name(f"{path.stem}-state.safetensors")


@dataclass
class ResumeState:
    """A loaded resume state.

    Attributes:
        step: optimizer steps done.
        losses: the loss of every step done.
        network: the adapters' ``state_dict`` (float32, the network's own names).
        optimizer: ``optimizer.state_dict()`` as saved.
        scaler: the gradient scaler's ``state_dict()`` (fp16 mixed precision) or None.
        settings: the settings of the run that wrote it.
        num_processes: data-parallel processes of that run.
        path: the file read.
    """

    step: int
    losses: list[float]
    network: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scaler: dict[str, Any] | None
    settings: dict[str, Any]
    num_processes: int
    path: Path

    def check_compatible(self, settings: SmokeSettings, num_processes: int) -> list[str]:
        """Refuse a resume that could not continue this run; return the rate settings that changed.

        Raises:
            ResumeError: a setting of :data:`MUST_MATCH` or the process count differs, or the run is already done.
        """
        current = asdict(settings)
        different = [f"{key}={self.settings.get(key)!r} (now {current[key]!r})"
                     for key in MUST_MATCH if self.settings.get(key) != current[key]]
        if num_processes != self.num_processes:
            different.append(f"num_processes={self.num_processes} (now {num_processes})")
        if different:
            raise ResumeError(
                f"--resume {self.path}: the saved run differs in {', '.join(different)}. Resume with the same "
                f"settings (only {', '.join(RATES)}, max_train_steps, the output and the checks may change)")
        if self.step >= settings.max_train_steps:
            raise ResumeError(
                f"--resume {self.path}: that run already did {self.step} steps; set --max_train_steps above "
                f"{self.step} to train further")
        return [key for key in RATES if self.settings.get(key) != current[key]]


def save_state(network_file: Path, *, step: int, losses: list[float], network: torch.nn.Module,
               optimizer: torch.optim.Optimizer, scaler: Any, settings: SmokeSettings, num_processes: int) -> Path:
    """Write the resume state beside ``network_file`` (atomically, like every save) and return its path."""
    tensors: dict[str, torch.Tensor] = {
        _NET + key: value.detach().float().cpu().contiguous() for key, value in network.state_dict().items()}
    saved = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in saved["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{_OPT}{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    metadata = {
        "format": _FORMAT,
        "step": str(step),
        "losses": json.dumps([float(x) for x in losses]),
        "optimizer_param_groups": json.dumps(saved["param_groups"]),
        "optimizer_scalars": json.dumps(scalars),
        "scaler": json.dumps(scaler.state_dict() if scaler is not None else None),
        "settings": json.dumps(asdict(settings)),
        "num_processes": str(num_processes),
    }
    path = state_path(network_file)
    save_file(path, tensors, metadata)
    return path


def load_state(path: str | Path) -> ResumeState:
    """Read a resume state; ``path`` may also name the network file it sits beside.

    Raises:
        ResumeError: neither the file nor a state beside it exists, or the file is not a smoke resume state (e.g. a plain network file from another trainer).
    """
    from safetensors import safe_open

    source = Path(path)
    if not source.name.endswith("-state.safetensors"):
        source = state_path(source)
    if not source.is_file():
        raise ResumeError(
            f"--resume: no resume state '{source}'. Resume from a '<name>-stepNNNNNNNN-state.safetensors' that "
            f"--save_every_n_steps writes (a network file alone has no optimizer state)")
    try:
        with safe_open(str(source), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # noqa: BLE001 - safetensors raises several types
        raise ResumeError(f"--resume: '{source}' is not a readable safetensors file ({error}); it may be "
                         f"truncated. Use an earlier step's state") from error
    if metadata.get("format") != _FORMAT:
        raise ResumeError(f"--resume: '{source}' is not a dora_network smoke resume state (format "
                         f"{metadata.get('format')!r}, expected {_FORMAT!r})")
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(_OPT):
            index, name = key[len(_OPT):].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    for index, entries in json.loads(metadata["optimizer_scalars"]).items():
        state.setdefault(int(index), {}).update(entries)
    return ResumeState(
        step=int(metadata["step"]),
        losses=[float(x) for x in json.loads(metadata["losses"])],
        network={key[len(_NET):]: value for key, value in tensors.items() if key.startswith(_NET)},
        optimizer={"state": state, "param_groups": json.loads(metadata["optimizer_param_groups"])},
        scaler=json.loads(metadata["scaler"]),
        settings=json.loads(metadata["settings"]),
        num_processes=int(metadata["num_processes"]),
        path=source,
    )


# -- determinism and divergence: what makes a resumed run a replay, and what stops a diverging one ----------

class EpochShuffle(torch.utils.data.Sampler[int]):
    """A shuffle that depends only on (seed, epoch), so a resumed run sees the same batches in the same order.

    Set ``epoch`` before iterating. (Not ``set_epoch``: accelerate would call that with its own counter.)
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, int(seed), 0

    def __len__(self) -> int:
        return self.size

    def __iter__(self):  # type: ignore[override]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


def step_seed(seed: int, step: int, rank: int) -> int:
    """The global torch seed of one step on one process: noise, timesteps and dropout depend on nothing else."""
    return ((int(seed) * 1_000_003 + step) * 1024 + rank) % (2**63)


class TrainingDiverged(RuntimeError):
    """The loss or an adapter weight became NaN/Inf; the message names the step and the last good save."""


def diverged(what: str, step: int, last_good: Path | None, settings: SmokeSettings) -> TrainingDiverged:
    if last_good is not None:
        kept = (f"The last good save is {last_good} (its resume state beside it); nothing newer was written. "
                f"Continue from it with --resume {state_path(last_good)} and a lower --learning_rate "
                f"(now {settings.learning_rate:g})")
    else:
        periodic = "" if settings.save_every_n_steps else " and --save_every_n_steps N to keep good checkpoints"
        kept = (f"Nothing was saved before step {step}; restart with a lower --learning_rate (now "
                f"{settings.learning_rate:g}){periodic}")
    clip = "" if settings.max_grad_norm else " or turn on --max_grad_norm 1.0"
    return TrainingDiverged(f"training diverged at step {step}: {what}. {kept}{clip}")


def weights_finite(params: Sequence[torch.Tensor]) -> bool:
    """One fused norm over every trainable tensor: a NaN or Inf anywhere makes it non-finite."""
    norms = torch._foreach_norm([p.detach() for p in params])
    return bool(torch.stack([n.float() for n in norms]).isfinite().all())
