"""What DoRA buys, measured on a base that has learned something (``scripts/evidence_lora_vs_dora.py``).

A tiny SDXL-shaped model is pretrained fully on one part of a synthetic domain (data.py, train.py), then fine-tuned on
a held-out concept with full fine-tuning, LoRA and DoRA (both axes) at several ranks and seeds (train.py); the
paper's weight-decomposition analysis follows the query matrices across checkpoints (analysis.py); run.py writes the
table, figure and JSON.
"""

from .run import QUICK, Plan, run_evidence
from .train import METHODS, Settings

__all__ = ["METHODS", "Plan", "QUICK", "Settings", "run_evidence"]
