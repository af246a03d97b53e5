#!/usr/bin/env bash
# Train an SDXL DoRA with kohya sd-scripts and dora_network.
# Usage: SD_SCRIPTS=/path/to/sd-scripts bash scripts/train_sdxl_with_sd_scripts.sh [extra sd-scripts flags]
# Run it inside sd-scripts' venv, after scripts/install_into_sd_scripts.sh.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${SD_SCRIPTS:?set SD_SCRIPTS to your sd-scripts checkout}"
cd "$SD_SCRIPTS"
exec accelerate launch --num_cpu_threads_per_process 1 sdxl_train_network.py \
  --config_file "$here/configs/sd_scripts/sdxl_dora.toml" \
  --dataset_config "$here/configs/sd_scripts/dataset.toml" \
  "$@"
