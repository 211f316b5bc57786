#!/usr/bin/env bash
# GPU checks in one command, on a bare CUDA machine (python3 with pip, an NVIDIA driver), in under 8 minutes:
#
#   bash scripts/gpu_check.sh            # from anywhere; runs in the repository root
#
# 1. Installs what is missing: torch from PyPI (its Linux wheels are CUDA builds) when no CUDA-enabled torch
#    is importable, then this package (editable, with lightning and its other dependencies) and pytest.
#    CI (.ci/run) never runs this: it installs the CPU build of torch.
# 2. Runs tests/test_cuda.py (FSDP1 names, AMP with a real GradScaler, fused optimizers, bf16, the monitor).
# 3. Runs the CUDA benchmark rows (benchmarks/run.py --device cuda --size large): the monitor against
#    Lightning's grad_norm-style per-parameter `.item()` loop (target >= 10x), WeightDecay / WeightPenalty
#    against the fused and foreach built-in decay (target <= 1.05x), and the memory rows.
# 4. Prints a summary; exits non-zero if a part failed or timed out (a missed benchmark target is reported,
#    not a failure). Logs and the benchmark table go to $GPU_CHECK_LOGS (default: a new temporary folder).
#
# Environment: PYTHON (default python3), GPU_CHECK_LOGS, GPU_CHECK_SKIP_INSTALL=1 (use what is installed).
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
PY="${PYTHON:-python3}"
log_dir="${GPU_CHECK_LOGS:-$(mktemp -d)}"
mkdir -p "$log_dir"
declare -A status seconds
parts=(install cuda_tests benchmarks)
start_all=$SECONDS

record() {  # record NAME RC START LIMIT
    seconds[$1]=$((SECONDS - $3))
    if [ "$2" -eq 0 ]; then
        status[$1]=ok
    elif [ "$2" -eq 124 ]; then
        status[$1]="timeout (${4}s)"
    else
        status[$1]="FAILED (rc=$2)"
    fi
}

run() {  # run NAME LIMIT_S COMMAND...: logged to $log_dir/NAME.log, last lines shown
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "=== $name: $*"
    timeout "$limit" "$@" >"$log_dir/$name.log" 2>&1
    rc=$?
    record "$name" "$rc" "$start" "$limit"
    tail -n 15 "$log_dir/$name.log"
}

install() {
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "no CUDA-enabled torch: installing torch from PyPI (a CUDA build on Linux)"
        "$PY" -m pip install -q torch || return 1
    fi
    "$PY" -m pip install -q pytest -e . || return 1
    verify
}

verify() {  # torch sees a GPU, and the package and lightning import
    "$PY" - <<'PY'
import torch, lightning, lightning_decay
assert torch.cuda.is_available(), "torch is installed but sees no CUDA device (driver?)"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), lightning {lightning.__version__}, "
      f"{torch.cuda.get_device_name(0)}, lightning_decay from {lightning_decay.__file__}")
PY
}

if [ "${GPU_CHECK_SKIP_INSTALL:-0}" = 1 ]; then
    start=$SECONDS
    echo "=== install: skipped (GPU_CHECK_SKIP_INSTALL=1), checking what is installed"
    verify >"$log_dir/install.log" 2>&1
    record install $? "$start" 0
    [ "${status[install]}" = ok ] && status[install]=skipped
    tail -n 5 "$log_dir/install.log"
else
    start=$SECONDS
    echo "=== install"
    install >"$log_dir/install.log" 2>&1
    record install $? "$start" 0
    tail -n 5 "$log_dir/install.log"
fi

if [ "${status[install]}" = ok ] || [ "${status[install]}" = skipped ]; then
    run cuda_tests 200 "$PY" -m pytest tests/test_cuda.py tests/test_host_sync.py -q -p no:cacheprovider -rxXs
    run benchmarks 240 "$PY" benchmarks/run.py --device cuda --size large --only 1,2,4,6 \
        --note "scripts/gpu_check.sh" --out "$log_dir/benchmarks.md"
else
    for name in cuda_tests benchmarks; do status[$name]="not run (install failed)"; seconds[$name]=0; done
fi

echo
echo "=== summary ($((SECONDS - start_all)) s; logs in $log_dir)"
failed=0
for name in "${parts[@]}"; do
    printf '%-12s %-28s %4ss\n' "$name" "${status[$name]}" "${seconds[$name]}"
    case "${status[$name]}" in ok | skipped) ;; *) failed=1 ;; esac
done
grep -hE "[0-9]+ (passed|failed|skipped|error)" "$log_dir/cuda_tests.log" 2>/dev/null | tail -n 1
if [ -f "$log_dir/benchmarks.md" ]; then
    echo "--- CUDA benchmark rows (target and result in the last two columns)"
    grep -E '^\| `(1\.(wd|l2adam|l2sgd|wd_fused|l2_fused|extra_wd|extra_l2)|2\.(bare|lightning|amortized)|6\.mem)/' \
        "$log_dir/benchmarks.md"
    tail -n 1 "$log_dir/benchmarks.md"
fi
exit $failed
