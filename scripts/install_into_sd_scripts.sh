#!/usr/bin/env bash
# Install dora_network into an existing sd-scripts (or kohya_ss) venv without touching anything installed there.
# Usage: source /path/to/sd-scripts/venv/bin/activate && bash scripts/install_into_sd_scripts.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${VIRTUAL_ENV:-}" ]; then
  echo "activate sd-scripts' venv first (source venv/bin/activate, or venv\\Scripts\\activate on Windows)" >&2
  exit 1
fi
# --no-deps: the venv already has torch and safetensors, the only things the network module imports.
python -m pip install --no-deps -e "$here"
python -c "import dora_network, torch; print('dora_network', dora_network.__version__, 'with torch', torch.__version__)"
