"""The card's own floors, measured in the same run, and what the GPU scripts derive from them.

    python scripts/gpu/floors.py                          # measure and print (JSON with --json)
    python scripts/gpu/floors.py pd-mem --model-dir DIR --nodes-per-gpu 4 --context 8192  # -> MEM CONTEXT

Every GPU script divides by these instead of one card's datasheet: ``copy_bytes_per_s`` is a
large device-to-device ``copy_`` counting bytes read plus bytes written (the HBM floor of a
decode step divides the bytes it must read by it), ``matmul_flops`` a large square bf16 GEMM on
random data (the MFU of a prefill divides its FLOPs by it). Beside them: the device's name and
memory, from which ``plan_batches`` sizes the decode batches (a batch whose KV pool, weights and
runtime reserve do not fit is run at the largest graph bucket that does, and the note says so)
and ``pd_sizing`` the ``--mem-fraction-static`` and context of nodes that share a card.
``classify_failure`` tells an out-of-memory from a graph-capture failure (the engine wraps the
first in the second), ``Budget`` and ``alarm`` bound each section of a run by time.
The arithmetic is plain Python (no GPU): tests/unit/test_gpu_floors.py covers it on CPU.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

GiB = 2**30


# -- the floors, measured --------------------------------------------------------------------------
@dataclass(frozen=True)
class Floors:
    device_name: str            # as the driver names it ("NVIDIA H100 80GB HBM3"), or "cpu"
    total_bytes: int            # device memory (host RAM available on CPU)
    free_bytes: int             # free when measured
    copy_bytes_per_s: float     # device-to-device copy, bytes read + bytes written
    matmul_flops: float         # square GEMM at ``matmul_dtype`` on random data
    matmul_dtype: str
    matmul_n: int
    copy_nbytes: int

    @property
    def copy_tb_s(self) -> float:
        return self.copy_bytes_per_s / 1e12

    @property
    def matmul_tflops(self) -> float:
        return self.matmul_flops / 1e12

    def meta(self) -> dict:
        """For a script's JSON (``hbm_tb_s`` / ``peak_tflops``: the keys plot_engine_bench.py reads)."""
        return {**asdict(self), "gpu": self.device_name, "hbm_tb_s": round(self.copy_tb_s, 3),
                "peak_tflops": round(self.matmul_tflops, 1), "total_gib": round(self.total_bytes / GiB, 1)}

    def line(self) -> str:
        return (f"{self.device_name}: {self.total_bytes / GiB:.1f} GiB ({self.free_bytes / GiB:.1f} free), copy "
                f"{self.copy_tb_s:.3f} TB/s (read+write, {self.copy_nbytes / GiB:.2f} GiB buffer), "
                f"{self.matmul_dtype} matmul {self.matmul_tflops:.1f} TFLOP/s (n={self.matmul_n})")


def _median_seconds(fn, reps: int, device) -> float:
    """Median seconds of ``fn()`` after two warm-up calls: CUDA events on a GPU, the host clock on CPU."""
    import torch

    fn()
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_copy(device, nbytes: int, reps: int = 20) -> float:
    """Bytes per second of ``dst.copy_(src)`` over ``nbytes`` of random bf16, read + write counted."""
    import torch

    src = torch.rand(nbytes // 2, device=device).to(torch.bfloat16)
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), reps, device)
    del src, dst
    return 2 * nbytes / seconds


def measure_matmul(device, n: int, dtype, reps: int = 10) -> float:
    """FLOP/s of an ``n x n x n`` product on random (never zero) inputs."""
    import torch

    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    seconds = _median_seconds(lambda: torch.mm(a, b, out=out), reps, device)
    del a, b, out
    return 2 * n**3 / seconds


def device_memory(device) -> tuple[str, int, int]:
    """(name, total bytes, free bytes) of a GPU; of the host's RAM on CPU."""
    import torch

    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return torch.cuda.get_device_name(device), total, free
    from pdserve.runtime.model_runner import _available_ram_bytes
    free = _available_ram_bytes()
    return "cpu", free, free


def measure_floors(device=None, quick: bool = False) -> Floors:
    """Measure the card as found: a copy of min(2 GiB, free / 8) (64 MiB on CPU or ``quick``), an
    8192^3 bf16 GEMM (512^3 fp32 on CPU). Takes ~1 s on an H100/H200."""
    import torch

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name, total, free = device_memory(device)
    on_gpu = device.type == "cuda" and not quick
    nbytes = min(2 * GiB, free // 8) if on_gpu else 64 * 2**20
    n, dtype = (8192, torch.bfloat16) if on_gpu else (512, torch.float32)
    copy = measure_copy(device, nbytes, reps=20 if on_gpu else 3)
    flops = measure_matmul(device, n, dtype, reps=10 if on_gpu else 3)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Floors(name, total, free, copy, flops, str(dtype).removeprefix("torch."), n, nbytes)


_MEASURED: dict[str, Floors] = {}


def floors_for(device=None, quick: bool = False) -> Floors:
    """``measure_floors`` once per process and device (kernels_bench asks per section)."""
    key = f"{device}/{quick}"
    if key not in _MEASURED:
        _MEASURED[key] = measure_floors(device, quick)
        print(f"floors: {_MEASURED[key].line()}", flush=True)
    return _MEASURED[key]


# -- model arithmetic: bytes a decode step reads, FLOPs a prefill does ------------------------------
def kv_bytes_per_token(cfg: dict, dtype_bytes: int) -> int:
    return cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * cfg["head_dim"] * dtype_bytes


def param_counts(cfg: dict) -> tuple[int, int, int]:
    """(matmul params of the layers, embedding params, lm_head params or 0 if tied)."""
    h, d, inter = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * inter
    embed = cfg["vocab_size"] * h
    return cfg["num_hidden_layers"] * per_layer, embed, 0 if cfg["tie_word_embeddings"] else embed


def step_weight_bytes(cfg: dict, dtype_bytes: int) -> int:
    """Weight bytes one decode step reads: every layer matrix and the LM head (norms ignored)."""
    layers, embed, head = param_counts(cfg)
    return (layers + (head or embed)) * dtype_bytes


def resident_weight_bytes(cfg: dict, dtype_bytes: int) -> int:
    """Weight bytes the model holds on the card: the embedding too when the head is untied."""
    layers, embed, head = param_counts(cfg)
    return (layers + embed + head) * dtype_bytes


def decode_floor_ms(cfg: dict, dtype_bytes: int, batch: int, ctx: int, floors: Floors) -> float:
    """Bytes a decode step must read (weights + every sequence's KV) over the measured copy rate."""
    kv = batch * ctx * kv_bytes_per_token(cfg, dtype_bytes)
    return (step_weight_bytes(cfg, dtype_bytes) + kv) / floors.copy_bytes_per_s * 1e3


def prefill_flops(cfg: dict, tokens: int) -> float:
    """2 x tokens x layer matmul params + causal attention (QK and PV) + the last token's logits."""
    layers, _, _ = param_counts(cfg)
    attn = 2 * tokens * tokens * cfg["num_attention_heads"] * cfg["head_dim"] * cfg["num_hidden_layers"]
    return 2 * tokens * layers + attn + 2 * cfg["vocab_size"] * cfg["hidden_size"]


def prefill_floor_ms(cfg: dict, tokens: int, floors: Floors) -> float:
    return prefill_flops(cfg, tokens) / floors.matmul_flops * 1e3


def fraction_of_floor(ms: float | None, floor_ms: float | None) -> float | None:
    """floor / measured: 1.0 runs at the floor; a decode step's 'x the floor' is the inverse."""
    if not ms or floor_ms is None:
        return None
    return floor_ms / ms


# -- sizing from the card's memory -------------------------------------------------------------------
USABLE_FRACTION = 0.90       # of total memory: the rest is the CUDA context, allocator slack, other users
RESERVE_BYTES = 2 * GiB      # activations of a 4k prefill, graph pools, workspace (Llama-8B: ~1 GiB seen)


@dataclass(frozen=True)
class BatchPlan:
    asked: int
    batch: int | None        # what runs: ``asked`` if it fits, else the largest bucket that does (None: none)
    note: str                # empty when ``asked`` runs as asked


def graph_bucket_floor(batch: int) -> int:
    """The largest decode graph bucket <= ``batch`` (buckets: 1, 2, 4, 8, steps of 8 to 32, of 16 to
    128, of 32 beyond: docs/gpu.md), so a sized-down batch replays its graph without padding."""
    if batch < 8:
        return 1 << (batch.bit_length() - 1) if batch > 0 else 0
    step = 8 if batch <= 32 else 16 if batch <= 128 else 32
    return batch // step * step


def batch_bytes(cfg: dict, dtype_bytes: int, batch: int, tokens_per_seq: int) -> int:
    """Card memory a decode run at ``batch`` needs: resident weights, the KV pool, fp32 + bf16 logits
    of the largest graph, and the fixed reserve."""
    kv = batch * tokens_per_seq * kv_bytes_per_token(cfg, dtype_bytes)
    logits = batch * cfg["vocab_size"] * 6
    return resident_weight_bytes(cfg, dtype_bytes) + kv + logits + RESERVE_BYTES


def plan_batches(cfg: dict, dtype_bytes: int, batches: list[int], tokens_per_seq: int, total_bytes: int,
                 usable_fraction: float = USABLE_FRACTION) -> list[BatchPlan]:
    """Each asked batch, or the largest graph bucket under it whose run fits ``usable_fraction`` of
    the card (an H100's 79 GiB cannot hold Llama-8B's batch-256 x 2k pool, 65.5 GiB, beside its
    15 GiB of weights: that row runs at 192 and says so). Duplicates are dropped."""
    usable = total_bytes * usable_fraction
    plans, seen = [], set()
    for asked in batches:
        need = batch_bytes(cfg, dtype_bytes, asked, tokens_per_seq)
        if need <= usable:
            batch, note = asked, ""
        else:
            fits = asked
            while fits > 0 and batch_bytes(cfg, dtype_bytes, fits, tokens_per_seq) > usable:
                fits = graph_bucket_floor(fits - 1)
            batch = fits or None
            note = (f"bs={asked} needs {need / GiB:.1f} GiB (KV {tokens_per_seq} tok/seq + weights + reserve) > "
                    f"{usable / GiB:.1f} GiB usable of {total_bytes / GiB:.1f}: "
                    + (f"ran bs={batch}" if batch else "nothing fits"))
        if batch is not None and batch in seen:
            continue
        seen.add(batch)
        plans.append(BatchPlan(asked, batch, note))
    return plans


def pd_sizing(weight_bytes: int, kv_token_bytes: int, context: int, min_context: int, nodes_per_gpu: int,
              total_bytes: int, min_contexts: int = 2,
              usable_fraction: float = USABLE_FRACTION) -> tuple[float, int, str]:
    """(``--mem-fraction-static``, ``--context-length``, note) for ``nodes_per_gpu`` nodes sharing
    one card: an equal share of the usable memory each, and the context cut (to a multiple of 1024)
    until ``min_contexts`` full contexts fit in a share's KV. Raises ValueError naming the knob when
    even ``min_context`` (what the load's longest request needs) does not fit."""
    share = usable_fraction / nodes_per_gpu
    kv_bytes = share * total_bytes - weight_bytes - RESERVE_BYTES
    fit = int(max(kv_bytes, 0) // kv_token_bytes // min_contexts) // 1024 * 1024
    if fit < min_context:
        raise ValueError(f"CONTEXT: {nodes_per_gpu} node(s) on a {total_bytes / GiB:.0f} GiB card get "
                         f"--mem-fraction-static {share:.3f} each = {max(kv_bytes, 0) / GiB:.1f} GiB of KV after "
                         f"{weight_bytes / GiB:.1f} GiB of weights: {min_contexts} contexts of {fit} tokens, under "
                         f"the {min_context} the load needs; use fewer nodes per GPU, a smaller ARCH, or shorter "
                         f"INPUT_LEN/OUTPUT_LEN")
    ctx = min(context, fit)
    note = "" if ctx == context else (f"CONTEXT {context} -> {ctx}: {max(kv_bytes, 0) / GiB:.1f} GiB of KV per node "
                                      f"holds {min_contexts} contexts of {fit} tokens")
    return round(share, 3), ctx, note


# -- failures and time ---------------------------------------------------------------------------------
def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory anywhere in the chain: torch's OutOfMemoryError, a MemoryError, or a CUDA/
    Triton error that says so (a capture failure wraps the allocator's error)."""
    import torch

    for e in _chain(exc):
        if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
            return True
        text = str(e).lower()
        if "out of memory" in text or "cudaerrormemoryallocation" in text or "out_of_memory" in text:
            return True
    return False


def is_capture_failure(exc: BaseException) -> bool:
    """The engine's graph capture failed (``ModelRunner`` wraps the cause, an OOM or not)."""
    return any("CUDA graph capture failed" in str(e) for e in _chain(exc))


def classify_failure(exc: BaseException) -> str:
    """'OOM' (during graph capture or not), 'capture failed' (graph capture, not memory), 'error'."""
    if is_oom(exc):
        return "OOM"
    return "capture failed" if is_capture_failure(exc) else "error"


def failure_note(exc: BaseException) -> str:
    """One line for a row's note: the class and the innermost message, shortened."""
    kind = classify_failure(exc)
    root = list(_chain(exc))[-1]
    where = " during CUDA graph capture" if kind == "OOM" and is_capture_failure(exc) else ""
    return f"{kind}{where}: {type(root).__name__}: {str(root).splitlines()[0][:160] if str(root) else ''}"


class Deadline(BaseException):
    """A section's time is up. A BaseException, so the per-row ``except Exception`` guards inside a
    section let it through to the section's own handler (the alarm fires only once)."""


class Budget:
    """The run's total time (--budget-s), shared out by section."""

    def __init__(self, total_s: float, clock=time.monotonic) -> None:
        self.total_s, self.clock = total_s, clock
        self.start = clock()

    def left(self) -> float:
        return max(0.0, self.total_s - (self.clock() - self.start))

    def section_s(self, share: float, at_least: float = 0.0) -> int:
        """Seconds for a section: ``share`` of the total, never more than is left; 0 when less than
        ``at_least`` is left (the section is skipped and says so)."""
        left = self.left()
        if left < max(at_least, 1.0):
            return 0
        return int(min(left, max(share * self.total_s, at_least)))


@contextmanager
def alarm(seconds: int):
    """Raise Deadline in this (main) thread after ``seconds`` (POSIX; 0 or less: no limit)."""
    def fire(signum, frame):
        raise Deadline(f"over its {seconds} s budget")
    if seconds <= 0:
        yield
        return
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# -- command line ------------------------------------------------------------------------------------
def _pd_mem_main(args) -> int:
    """Print 'MEM CONTEXT' for the PD-vs-colocated script (a note on stderr when CONTEXT was cut),
    or its refusal in one line (exit 2)."""
    import torch

    cfg = json.loads((Path(args.model_dir) / "config.json").read_text())
    dtype_bytes = 2 if cfg.get("torch_dtype", "bfloat16") in ("bfloat16", "float16") else 4
    if args.total_gib:
        total = int(args.total_gib * GiB)
    elif torch.cuda.is_available():
        total = torch.cuda.mem_get_info()[1]
    else:
        print("pd-mem: no GPU; give --total-gib", file=sys.stderr)
        return 2
    try:
        frac, ctx, note = pd_sizing(resident_weight_bytes(cfg, dtype_bytes), kv_bytes_per_token(cfg, dtype_bytes),
                                    args.context, args.min_context, args.nodes_per_gpu, total)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    if note:
        print(note, file=sys.stderr)
    print(frac, ctx)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", nargs="?", default="measure", choices=("measure", "pd-mem"))
    p.add_argument("--json", default=None, help="measure: also write the floors here")
    p.add_argument("--model-dir", help="pd-mem: a folder with config.json")
    p.add_argument("--nodes-per-gpu", type=int, default=2)
    p.add_argument("--context", type=int, default=8192, help="pd-mem: the context wanted (cut to fit)")
    p.add_argument("--min-context", type=int, default=4096, help="pd-mem: the least the load needs")
    p.add_argument("--total-gib", type=float, default=None, help="pd-mem: card memory (default: this GPU's)")
    args = p.parse_args(argv)
    if args.what == "pd-mem":
        return _pd_mem_main(args)
    floors = measure_floors()
    print(floors.line())
    if args.json:
        Path(args.json).write_text(json.dumps(floors.meta(), indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
