#!/usr/bin/env bash
# The test command: installs what the tests use (virtualenv, Debian packages), lints and format-checks the code
# with ruff (the config is in pyproject.toml), then runs the whole suite.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -m "not slow"` for the quick suite (under 5 minutes on 2 cores).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bash tools/setup_env.sh
bash tools/install_system_packages.sh
venv=${RMT_VENV:-$repo/.venv}
# DeepSpeed's CPU ops (Adam, shared-memory collectives) compile on first use, behind a lock file; built once here,
# no test waits on the compiler, and no timed-out test can leave a half-built op whose lock stops every launcher
# (locks that a killed build left are removed first)
"$venv/bin/python" tools/build_cpu_ops.py
"$venv/bin/ruff" check --quiet .
"$venv/bin/ruff" format --check --quiet .
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$venv/bin/python" -m pytest "$@"
