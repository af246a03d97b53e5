#!/usr/bin/env bash
# The README's main command: set up the environment (scripts/setup_env.sh), then train DoRA end to end on the
# tiny SDXL model and verify the file (python -m dora_network.smoke). Exit status 0 means every check passed.
# Extra arguments go to the trainer, e.g. bash scripts/smoke_train.sh --max_train_steps 50 --algo lora
# Settings: configs/smoke.toml; python -m dora_network.smoke --help lists every flag.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=scripts/setup_env.sh
source scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DIFFUSERS_OFFLINE=1  # everything is built locally; never download
exec python -m dora_network.smoke "$@"
