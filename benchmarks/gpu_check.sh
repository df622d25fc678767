#!/usr/bin/env bash
# One prepared GPU check (issue 24), under 9.5 minutes on one GPU: the CUDA tests, then
# bench_device.py on the paper's contract (both methods and engines), then bench_ensemble.py
# (the study's retrains, M at once, against rl.train); writes the markdown tables to --out
# (default benchmarks/results/gpu_check.md) and prints them.
#
#   bash benchmarks/gpu_check.sh [--out FILE]             # needs a CUDA GPU; exits 3 without one
#   bash benchmarks/gpu_check.sh --dry-run [--out FILE]   # the same steps on the CPU, tiny sizes
#
# Exit status: 0 when every step passed, 3 without a GPU, 1 when a step failed or timed out.
set -uo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/gpu_check.md
dry=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry=1 ;;
        --out) out="$2"; shift ;;
        *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run] [--out FILE]" >&2; exit 2 ;;
    esac
    shift
done
py=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" RETRAC_CACHE="${RETRAC_CACHE:-/tmp/rcache}"

if [ "$dry" = 1 ]; then
    bench=(--device cpu --tiny)
    ensemble=(--device cpu --tiny)
else
    why=$(timeout 60 "$py" -c 'import torch; print("ok" if torch.cuda.is_available() else
        f"torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no device")' 2>&1)
    if [ "$(tail -n 1 <<< "$why")" != ok ]; then
        echo "no CUDA GPU found: $(tail -n 1 <<< "$why"); use --dry-run to check on the CPU" >&2
        exit 3
    fi
    bench=(--device cuda)
    ensemble=(--device cuda --sizes 1,4,16,32,64 --steps 8)
fi
mkdir -p "$(dirname "$out")"
rm -f "$out"
status=0

# 1. the CUDA tests (they skip without a GPU), at most 2.5 minutes
tests=$(timeout 150 "$py" -m pytest -q -p no:xdist -k "cuda or gpu" \
    tests/test_device.py tests/test_grads.py tests/test_ensemble.py 2>&1)
rc=$?
echo "$tests" | tail -n 30
summary=$(tail -n 1 <<< "$tests")
[ "$rc" = 124 ] && summary="timed out after 150 s"
[ "$rc" = 0 ] || status=1

# run_bench SECONDS SCRIPT ARGS...: run a benchmark with a time limit, its table appended to $out
# (bench_device.py rewrites the file, so it runs first); a failure or time-out is noted there
run_bench() {
    local limit=$1 script=$2
    shift 2
    timeout "$limit" "$py" "benchmarks/$script" "$@" --out "$out" > /dev/null
    local rc=$? note
    if [ "$rc" != 0 ]; then
        status=1
        note="$script failed (exit $rc)"
        [ "$rc" = 124 ] && note="$script timed out after $limit s"
        printf '\n%s; the rows above are those finished.\n' "$note" >> "$out"
    fi
}

# 2. the contract on the device against the batch-1 loop, a plain pass and the CPU,
#    at most 4.5 min
run_bench 270 bench_device.py "${bench[@]}"
# 3. the study's retrains in ensembles on the device against rl.train, at most 1.5 minutes
#    (9.5 min in all)
run_bench 90 bench_ensemble.py "${ensemble[@]}"
files="tests/test_device.py, tests/test_grads.py, tests/test_ensemble.py"
printf '\nCUDA tests (%s, -k "cuda or gpu"): %s\n' "$files" "$summary" >> "$out"
echo
cat "$out"
exit "$status"
