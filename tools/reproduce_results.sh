#!/usr/bin/env bash
# Redoes docs/results.md: three launcher runs on the memorize task, their accuracy by length to 1M tokens,
# the plot, and the evaluation of the reference checkpoint at 1M tokens. About 10 minutes on 2 cores.
#   bash tools/reproduce_results.sh [OUT]        (default OUT: runs/results)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bash tools/setup_env.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python="${RMT_VENV:-$repo/.venv}/bin/python"
out=${1:-runs/results}
mkdir -p "$out"

# the quick start's default: ARMT (gated writes, no delta rule) and its no-memory twin
[ -f "$out/armt/results.json" ] || "$python" launchers/train.py --out_dir "$out/armt"
# the same model as an RMT
[ -f "$out/rmt/results.json" ] || "$python" launchers/train.py --memory rmt --no-baseline \
    --eval_segments 1,2,4,8,16,256 --out_dir "$out/rmt"
# the ARMT with the delta rule
[ -f "$out/armt-delta/results.json" ] || "$python" launchers/train.py --correction --no-baseline \
    --eval_segments 1,2,4,256,1024 --out_dir "$out/armt-delta"

"$python" tools/plot_results.py "$out/armt" "$out/rmt" "$out/armt-delta" --out "$out"
# the checkpoint kept in the repository, at 1,000,000 tokens (31,250 segments of 32 tokens)
"$python" launchers/eval.py --model docs/results/armt-memorize --eval_segments 1 256 31250 --eval_samples 4 \
    --out "$out/reference"
