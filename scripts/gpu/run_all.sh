#!/usr/bin/env bash
# The GPU run, in one command (from the repository root; 2 GPUs under 9 minutes, 1 GPU under 10;
# H100 or H200: every ratio is against floors measured on the card, scripts/gpu/floors.py):
#     bash scripts/gpu/run_all.sh
# CPU smoke test of the same sequence (tiny shapes, Triton interpreter, DRAM-to-DRAM NIXL):
#     bash scripts/gpu/run_all.sh --tiny
#
#  0. wheelhouse: .device/*.whl (or $WHEEL_DIR) into /tmp/site, PYTHONPATH=/tmp/site:$PWD
#  1. in parallel, one GPU each:
#       GPU0: scripts/gpu/engine_bench.py  (ModelRunner + CUDA graphs vs transformers; <= 5.5 min)
#       GPU1: scripts/gpu/kernels_check.py (every kernel vs its reference, kernel benchmarks)
#             then scripts/gpu/gpu_parity.py (Llama-3.1-8B / Qwen3-8B shapes vs transformers, bf16
#             and the fp32 greedy check)
#     (one GPU: the same, one after another, engine_bench with a shorter budget)
#  2. scripts/gpu/transfer_bench.py (NIXL WRITE GPU0 -> GPU1; skipped with one GPU)
# Everything goes to $OUT (default ./gpu-out): one .log per step, the scripts' JSON, summary.txt.
set -uo pipefail

TINY=0
[ "${1:-}" = "--tiny" ] && TINY=1
OUT=${OUT:-$PWD/gpu-out}
export OUT
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
START=$(date +%s)
log() { echo "[run_all +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"; }

# -- 0. wheels ----------------------------------------------------------------------------------
WHEEL_DIR=${WHEEL_DIR:-.device}
if ls "$WHEEL_DIR"/*.whl >/dev/null 2>&1; then
    log "installing $(ls "$WHEEL_DIR"/*.whl | wc -l) wheels from $WHEEL_DIR into /tmp/site"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEEL_DIR"/*.whl > "$OUT/pip.log" 2>&1 || log "pip install failed (see pip.log); going on"
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    log "no wheels in $WHEEL_DIR; using what is installed"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
python3 - > "$OUT/env.log" 2>&1 <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    print(" ", i, torch.cuda.get_device_name(i), round(torch.cuda.mem_get_info(i)[0] / 2**30, 1), "GiB free")
for mod in ("triton", "transformers", "msgspec", "zmq", "nixl_cu13._api", "nixl_cu12._api"):
    try:
        m = importlib.import_module(mod)
        print(mod, getattr(m, "__version__", "ok"))
    except Exception as e:
        print(mod, "MISSING:", e)
EOF
cat "$OUT/env.log" | tee -a "$OUT/summary.txt"

if [ "$TINY" = 1 ]; then
    NGPU=0
else
    NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
fi

# step NAME TIMEOUT_S GPU CMD... : run with a timeout, tee into $OUT/NAME.log, record the status
step() {
    local name=$1 limit=$2 gpu=$3
    shift 3
    log "start $name (timeout ${limit}s${gpu:+, GPU $gpu})"
    local t0=$(date +%s)
    if [ -n "$gpu" ]; then
        CUDA_VISIBLE_DEVICES=$gpu timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    else
        timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    fi
    local rc=$?
    local verdict=ok
    [ $rc = 124 ] || [ $rc = 137 ] && verdict="TIMEOUT"
    [ $rc != 0 ] && [ "$verdict" = ok ] && verdict="FAILED"
    log "end   $name: rc=$rc $verdict in $(( $(date +%s) - t0 ))s"
    return $rc
}

if [ "$TINY" = 1 ]; then
    step kernels_check 300 "" python3 scripts/gpu/kernels_check.py --tiny
    step gpu_parity 300 "" python3 scripts/gpu/gpu_parity.py --tiny
    step engine_bench 300 "" python3 scripts/gpu/engine_bench.py --tiny
    step transfer_bench 120 "" python3 scripts/gpu/transfer_bench.py --device cpu --tokens 256 --layers 4 \
        --reps 2 --warmup 1 --json "$OUT/transfer_bench.json" --timeout-s 100
elif [ "$NGPU" -ge 2 ]; then
    step engine_bench 330 0 python3 scripts/gpu/engine_bench.py --budget-s 300 &
    ENGINE_PID=$!
    ( step kernels_check 180 1 python3 scripts/gpu/kernels_check.py
      step gpu_parity 220 1 python3 scripts/gpu/gpu_parity.py ) &
    CHECKS_PID=$!
    wait $ENGINE_PID
    wait $CHECKS_PID
    step transfer_bench 100 "" python3 scripts/gpu/transfer_bench.py --src-gpu 0 --dst-gpu 1 \
        --json "$OUT/transfer_bench.json" --timeout-s 90
else
    step kernels_check 150 "" python3 scripts/gpu/kernels_check.py
    step gpu_parity 200 "" python3 scripts/gpu/gpu_parity.py
    step engine_bench 240 "" python3 scripts/gpu/engine_bench.py --budget-s 200 --compile-models llama-3.2-1b
    log "transfer_bench skipped: it needs 2 GPUs"
fi

# -- summary: the tables and verdicts, in one place ----------------------------------------------
{
    echo; echo "== kernels_check (failures) =="; grep -E "FAIL|ERROR|Traceback" "$OUT/kernels_check.log" | head -20
    echo; echo "== gpu_parity =="; grep -E "^\||PASS|FAIL|layers" "$OUT/gpu_parity.log" | tail -30
    echo; echo "== engine_bench =="; sed -n '/^| model/,$p' "$OUT/engine_bench.log"
    echo; echo "== transfer_bench (tail) =="; tail -25 "$OUT/transfer_bench.log" 2>/dev/null
} >> "$OUT/summary.txt" 2>/dev/null
log "done; logs and JSON in $OUT"
