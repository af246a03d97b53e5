#!/usr/bin/env bash
# The README's test command: set up the environment (scripts/setup_env.sh), then run the whole suite on CPU.
# Extra arguments go to pytest, e.g. bash scripts/run_tests.sh -k args
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=scripts/setup_env.sh
source scripts/setup_env.sh
python -m pytest -q -p no:cacheprovider "$@"
