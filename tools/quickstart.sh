#!/usr/bin/env bash
# The main job on its embedded default: sets up .venv, trains a small RMT on CPU, prints accuracy by length.
# Extra arguments go to launchers/train.py (see `python launchers/train.py --help`).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bash tools/setup_env.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${RMT_VENV:-$repo/.venv}/bin/python" launchers/train.py "$@"
