#!/usr/bin/env bash
# GPU checks in one go (under 5 minutes on one GPU): the CUDA tests, the distributed tests, the benchmarks.
#
#   bash scripts/gpu_check.sh            # from the repository root, on a machine with CUDA
#
# Installs nothing big: torch and lightning must be there; the package itself is installed editable
# without dependencies if it is not importable. Prints a summary; exits non-zero if a part failed.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
log_dir="${GPU_CHECK_LOGS:-$(mktemp -d)}"
declare -A status
declare -A seconds

python - <<'PY' || { echo "torch with CUDA is required"; exit 2; }
import torch, lightning
assert torch.cuda.is_available(), "no CUDA device"
print(f"torch {torch.__version__}, lightning {lightning.__version__}, {torch.cuda.get_device_name(0)}")
PY
python -c "import lightning_decay" 2>/dev/null || pip install -q -e . --no-deps

run() {  # run NAME LIMIT_S COMMAND...
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    echo "=== $name: $*"
    timeout "$limit" "$@" >"$log_dir/$name.log" 2>&1
    local rc=$?
    seconds[$name]=$((SECONDS - start))
    if [ $rc -eq 0 ]; then status[$name]=ok; elif [ $rc -eq 124 ]; then status[$name]="timeout (${limit}s)"; else status[$name]="FAILED (rc=$rc)"; fi
    tail -n 15 "$log_dir/$name.log"
}

run cuda_tests 150 python -m pytest tests/test_cuda.py -q -p no:cacheprovider -rxXs
run distributed_tests 150 python -m pytest tests/test_distributed.py -q -p no:cacheprovider -rxX
if [ -f benchmarks/run.py ]; then
    run benchmarks 120 python benchmarks/run.py --device cuda --size small --out "$log_dir/benchmarks.md"
else
    status[benchmarks]="skipped (no benchmarks/run.py)"; seconds[benchmarks]=0
fi

echo
echo "=== summary (logs in $log_dir)"
failed=0
for name in cuda_tests distributed_tests benchmarks; do
    printf '%-18s %-28s %4ss\n' "$name" "${status[$name]}" "${seconds[$name]}"
    case "${status[$name]}" in ok|skipped*) ;; *) failed=1 ;; esac
done
grep -hE "passed|failed|error" "$log_dir/cuda_tests.log" "$log_dir/distributed_tests.log" 2>/dev/null | tail -n 2
[ -f "$log_dir/benchmarks.md" ] && tail -n 3 "$log_dir/benchmarks.md"
exit $failed
