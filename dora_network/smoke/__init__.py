"""The smoke trainer (``dora-smoke-train``, ``python -m dora_network.smoke``): DoRA on the tiny SDXL model, end to end.

One file per part: settings (config.py), data (data.py), the tiny model and its noise prediction (model.py), the
training loop (train.py), resume state and divergence (state.py), self-checks (checks.py), report (report.py).
"""

from .train import SMOKE_COMMAND, TrainResult, TrainingDiverged, main, setup_logging, train

__all__ = ["SMOKE_COMMAND", "TrainResult", "TrainingDiverged", "main", "setup_logging", "train"]
