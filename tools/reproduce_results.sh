#!/usr/bin/env bash
# Redoes docs/results.md: five launcher runs on the memorize task, one on detect and one on reason, their accuracy by
# length to 1M tokens, the plots, and the evaluation of the four reference checkpoints at 1M tokens. About 65 minutes
# on 2 cores with RMT_REFERENCE_SAMPLES=4 (the default); the page's 64-sample rows take about 35 minutes more per
# checkpoint on one core each (RMT_REFERENCE_SAMPLES=64).
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
# the RMT with the gated memory update (exact retention where the gate shuts) and a curriculum to 32 segments
[ -f "$out/rmt-gated/results.json" ] || "$python" launchers/train.py --memory rmt --memory_gate \
    --curriculum 1,2,4,8,16,32 --promote_accuracy 1.1 --max_steps 1500 --eval_every 250 \
    --eval_segments 1,4,16,32,64,256,1024,4096,31250 --out_dir "$out/rmt-gated"
# the same RMT without the gate
[ -f "$out/rmt-32/results.json" ] || "$python" launchers/train.py --memory rmt --no-baseline \
    --curriculum 1,2,4,8,16,32 --promote_accuracy 1.1 --max_steps 1500 --eval_every 250 \
    --eval_segments 1,4,16,32,64,256,1024,4096,31250 --out_dir "$out/rmt-32"
# the ARMT with the delta rule
[ -f "$out/armt-delta/results.json" ] || "$python" launchers/train.py --correction --no-baseline \
    --eval_segments 1,2,4,256,1024 --out_dir "$out/armt-delta"

# detect: the fact anywhere; a curriculum to 64 segments, equal steps per stage
[ -f "$out/detect-armt/results.json" ] || "$python" launchers/train.py --task detect --curriculum 1,4,16,64 \
    --promote_accuracy 1.1 --max_steps 800 --eval_every 100 --eval_segments 1,4,16,64,256,1024,31250 \
    --out_dir "$out/detect-armt"
# detect with a curriculum to 256 segments (the reference checkpoint armt-detect); checkpoint mode gives bptt's
# gradients and holds one segment's activations at a time
[ -f "$out/detect-armt-256/results.json" ] || "$python" launchers/train.py --task detect --curriculum 1,4,16,64,256 \
    --promote_accuracy 1.1 --max_steps 1000 --eval_every 100 --eval_segments 1,4,16,64,256,1024 --no-baseline \
    --backprop checkpoint --out_dir "$out/detect-armt-256"
# detect with the RMT recipe of rmt-gated, without the gate
[ -f "$out/detect-rmt/results.json" ] || "$python" launchers/train.py --task detect --memory rmt \
    --curriculum 1,2,4,8,16,32 --promote_accuracy 1.1 --max_steps 1500 --eval_every 250 \
    --eval_segments 1,4,16,32,64,256,1024,31250 --out_dir "$out/detect-rmt"
# reason: two supporting facts (bAbI qa2), the same recipe
[ -f "$out/reason-armt/results.json" ] || "$python" launchers/train.py --task reason --curriculum 1,4,16,64 \
    --promote_accuracy 1.1 --max_steps 800 --eval_every 100 --eval_segments 1,4,16,64,256,1024,31250 \
    --out_dir "$out/reason-armt"
# the encoder RMT (a BERT sequence classifier): the short curriculum, then the RMT recipe above
[ -f "$out/encoder-rmt/results.json" ] || "$python" launchers/train.py --backbone tiny-bert --memory rmt \
    --curriculum 1,2,4,8 --max_steps 400 --eval_every 50 --eval_segments 1,2,4,8,16,64,256 --out_dir "$out/encoder-rmt"
[ -f "$out/encoder-rmt-32/results.json" ] || "$python" launchers/train.py --backbone tiny-bert --memory rmt \
    --curriculum 1,2,4,8,16,32 --promote_accuracy 1.1 --max_steps 1500 --eval_every 250 \
    --eval_segments 1,4,16,32,64,256,1024,31250 --out_dir "$out/encoder-rmt-32"

"$python" tools/plot_results.py "$out/armt" "$out/rmt" "$out/rmt-gated" "$out/armt-delta" --out "$out"
"$python" tools/plot_results.py "$out/detect-armt" "$out/detect-armt-256" "$out/detect-rmt" --out "$out"
"$python" tools/plot_results.py "$out/reason-armt" --out "$out"
# the checkpoints kept in the repository, at 1,000,000 tokens (31,250 segments of 32 tokens), in parallel
samples=${RMT_REFERENCE_SAMPLES:-4}
pids=()
for reference in armt-memorize armt-detect armt-reason rmt-memorize; do
    OMP_NUM_THREADS=1 "$python" launchers/eval.py --model "docs/results/$reference" --task "${reference#*-}" \
        --eval_segments 31250 --eval_samples "$samples" --batch_size "$samples" --out "$out/reference-$reference" &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done   # fails if either evaluation failed
