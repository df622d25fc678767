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

# 2. the contract on the device against the batch-1 loop, a plain pass and the CPU,
#    at most 4.5 min (8 min in all)
timeout 270 "$py" benchmarks/bench_device.py "${bench[@]}" --out "$out" > /dev/null
rc=$?
if [ "$rc" != 0 ]; then
    status=1
    note="bench_device.py failed (exit $rc); the rows above are those finished"
    [ "$rc" = 124 ] && note="bench_device.py timed out after 270 s; the rows above are those finished"
    printf '\n%s.\n' "$note" >> "$out"
fi
# 3. the study's retrains in ensembles on the device against rl.train, at most 1.5 minutes
timeout 90 "$py" benchmarks/bench_ensemble.py "${ensemble[@]}" --out "$out" > /dev/null
rc=$?
if [ "$rc" != 0 ]; then
    status=1
    note="bench_ensemble.py failed (exit $rc)"
    [ "$rc" = 124 ] && note="bench_ensemble.py timed out after 90 s"
    printf '\n%s.\n' "$note" >> "$out"
fi
files="tests/test_device.py, tests/test_grads.py, tests/test_ensemble.py"
printf '\nCUDA tests (%s, -k "cuda or gpu"): %s\n' "$files" "$summary" >> "$out"
echo
cat "$out"
exit "$status"
