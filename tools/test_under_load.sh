#!/usr/bin/env bash
# The test command, several times in a row, while CPU hogs keep part of the machine busy: the check that the suite
# holds on a loaded laptop or a shared node, not only on a quiet machine.
#   bash tools/test_under_load.sh                 # 2 runs of tools/test.sh beside nproc/2 hogs (at least 1)
#   RUNS=3 HOGS=2 bash tools/test_under_load.sh -m "not slow"
# Extra arguments go to pytest. A hog is a busy shell loop at normal priority, so it takes a full core from the
# suite's processes. Each run's log is kept in LOG_DIR (default: a new directory under /tmp); the last lines
# printed are a table and a JSON line with each run's exit status and minutes. Exits non-zero if any run failed.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
runs=${RUNS:-2}
hogs=${HOGS:-$(($(nproc) / 2 > 0 ? $(nproc) / 2 : 1))}
log_dir=${LOG_DIR:-$(mktemp -d /tmp/test_under_load.XXXXXX)}
mkdir -p "$log_dir"

hog_pids=()
stop_hogs() { [ ${#hog_pids[@]} -eq 0 ] || kill "${hog_pids[@]}" 2>/dev/null; }
trap stop_hogs EXIT
for _ in $(seq "$hogs"); do
    bash -c 'while :; do :; done' &
    hog_pids+=($!)
done
echo "[load] $hogs CPU hog(s) on $(nproc) cores (pids ${hog_pids[*]}); logs in $log_dir"

statuses=() minutes=()
for run in $(seq "$runs"); do
    start=$(date +%s)
    bash "$repo/tools/test.sh" "$@" >"$log_dir/run$run.log" 2>&1
    statuses+=($?)
    minutes+=("$(awk -v s="$(($(date +%s) - start))" 'BEGIN { printf "%.1f", s / 60 }')")
    echo "[load] run $run: exit ${statuses[-1]} after ${minutes[-1]} min: $(grep -E '^=+ .*(passed|failed|error)' "$log_dir/run$run.log" | tail -1)"
done

echo "| run | exit | minutes | pytest summary |"
echo "|---|---|---|---|"
json="" failed=0
for i in "${!statuses[@]}"; do
    summary=$(grep -E '^=+ .*(passed|failed|error)' "$log_dir/run$((i + 1)).log" | tail -1 | tr -d '=' | xargs)
    echo "| $((i + 1)) | ${statuses[i]} | ${minutes[i]} | $summary |"
    json+="${json:+, }{\"run\": $((i + 1)), \"exit\": ${statuses[i]}, \"minutes\": ${minutes[i]}, \"summary\": \"$summary\"}"
    [ "${statuses[i]}" -eq 0 ] || failed=1
done
echo "{\"hogs\": $hogs, \"cores\": $(nproc), \"runs\": [$json]}"
exit $failed
