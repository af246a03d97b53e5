# shellcheck shell=bash
# Sourced (not run) by scripts/smoke_train.sh and scripts/run_tests.sh: leaves a Python environment with
# dora_network (editable, from this checkout), its [test] extras and lycoris-lora active in the calling shell.
#
#   - an active virtualenv ($VIRTUAL_ENV) is used as it is; otherwise .venv in the repository root is created
#     (python3 -m venv) or reused, and activated;
#   - if everything already imports and dora-network is installed editable from this checkout, nothing else runs
#     (one quick probe, no pip call), so re-runs are fast and quiet;
#   - torch is installed only when `import torch` fails: $DORA_TORCH_SPEC (pip arguments, default torch==2.13.0).
#     An installed torch (a CUDA build included) is never reinstalled, upgraded or downgraded: the rest is installed
#     with a constraint file pinning the torch version present;
#   - then `pip install -c <that constraint> -e ".[test]"` and `pip install --no-deps lycoris-lora==4.1.3` (its own
#     requirements are already there; --no-deps keeps it from touching anything).

dora_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

_dora_log() { echo "setup_env: $*" >&2; }

# Exit status 0 when every module the trainer and the tests need is present and dora-network is installed editable
# from $dora_root. torch is really imported (a broken build must count as missing); the rest only located.
# Reasons go to stderr; callers silence it for the quick check. Runs from / so that the checkout (and its
# dora_network.egg-info) on sys.path cannot pass for an installed package.
_dora_probe() {
  (cd / && python - "$dora_root") <<'PY'
import importlib.metadata as md
import importlib.util
import json
import pathlib
import sys

import torch  # noqa: F401  (a real import: a broken torch counts as missing)

needed = ["safetensors", "accelerate", "diffusers", "transformers", "toml", "tqdm", "matplotlib", "PIL",
          "pytest", "hypothesis", "peft", "einops", "lycoris"]
missing = [name for name in needed if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(f"missing: {missing}")
if md.version("lycoris-lora") != "4.1.3":
    sys.exit("lycoris-lora is not 4.1.3")
direct = json.loads(md.distribution("dora-network").read_text("direct_url.json") or "{}")
url = direct.get("url", "")
editable = direct.get("dir_info", {}).get("editable", False)
if not (editable and url.startswith("file://") and pathlib.Path(url[7:]).resolve() == pathlib.Path(sys.argv[1])):
    sys.exit(f"dora-network is not installed editable from {sys.argv[1]}")
PY
}

_dora_setup() {
  if [ -n "${VIRTUAL_ENV:-}" ]; then
    :
  else
    if [ ! -x "$dora_root/.venv/bin/python" ]; then
      _dora_log "creating $dora_root/.venv"
      python3 -m venv "$dora_root/.venv" || return 1
    fi
    # shellcheck source=/dev/null
    source "$dora_root/.venv/bin/activate" || return 1
  fi
  if _dora_probe 2>/dev/null; then
    return 0
  fi
  _dora_log "installing into $(python -c 'import sys; print(sys.prefix)')"
  if ! python -c "import torch" >/dev/null 2>&1; then
    local spec="${DORA_TORCH_SPEC:-torch==2.13.0}"
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
      _dora_log "no torch; CUDA present: installing $spec (set DORA_TORCH_SPEC to pick a CUDA build)"
    else
      _dora_log "no torch; no CUDA: installing $spec"
    fi
    # shellcheck disable=SC2086  # DORA_TORCH_SPEC may hold several pip arguments (e.g. --index-url ...)
    python -m pip install --quiet $spec || return 1
  fi
  local torch_version constraint
  torch_version="$(python -c 'import torch; print(torch.__version__)' 2>/dev/null)" || return 1
  constraint="$(mktemp)"
  echo "torch==$torch_version" > "$constraint"
  _dora_log "installing dora-network[test] (editable) with torch kept at $torch_version"
  python -m pip install --quiet -c "$constraint" -e "$dora_root[test]"
  local status=$?
  rm -f "$constraint"
  [ $status -eq 0 ] || return $status
  python -m pip install --quiet --no-deps "lycoris-lora==4.1.3" || return 1
  if ! _dora_probe; then
    _dora_log "the environment is still incomplete after installing (reason above)"
    return 1
  fi
}

if _dora_setup; then
  unset -f _dora_setup _dora_probe _dora_log
else
  _dora_log "failed; see the messages above"
  unset -f _dora_setup _dora_probe _dora_log
  return 1 2>/dev/null || exit 1
fi
