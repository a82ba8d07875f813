"""How scripts/gpu/engine_bench.py times pdserve: a ``ModelRunner`` from a dummy-weight folder,
runner-level decode and prefill steps, and the whole engine loop (``EngineCore.step``) with or
without overlap scheduling. Also used by decode_profile.py and host_profile.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_runner(model_dir: Path, device: str, dtype: str, total_tokens: int, context_length: int,
                cuda_graph_max_bs: int, disable_cuda_graph: bool = False, attention_backend: str = "auto",
                disable_fused_gemv: bool = False):
    from pdserve.config import CacheConfig, EngineConfig, KernelConfig, ModelConfig
    from pdserve.runtime.model_runner import ModelRunner

    cfg = EngineConfig(model=ModelConfig(model_path=str(model_dir), load_format="dummy", dtype=dtype, device=device,
                                         context_length=context_length),
                       cache=CacheConfig(max_total_tokens=total_tokens),
                       kernel=KernelConfig(cuda_graph_max_bs=cuda_graph_max_bs, attention_backend=attention_backend,
                                           disable_cuda_graph=disable_cuda_graph or device == "cpu",
                                           disable_fused_gemv=disable_fused_gemv))
    return ModelRunner(cfg)


def page_tables(batch: int, pages_per_seq: int) -> list[list[int]]:
    return [list(range(i * pages_per_seq, (i + 1) * pages_per_seq)) for i in range(batch)]


def pdserve_decode_ms(runner, batch: int, ctx: int, steps: int, warmup: int) -> float:
    """Mean ms per steady decode step (forward + argmax to the host) at ``ctx`` cached tokens."""
    from pdserve.runtime.forward import SeqChunk

    page = runner.layout.page_size
    tables = page_tables(batch, -(-(ctx + warmup + steps + 1) // page))
    tokens = [1] * batch
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            sync(runner.device)
            start = time.perf_counter()
        seqs = [SeqChunk(f"r{i}", [tokens[i]], ctx + step, tables[i]) for i in range(batch)]
        tokens = runner.forward(seqs).argmax(dim=-1).tolist()
    sync(runner.device)
    return (time.perf_counter() - start) / steps * 1e3


def pdserve_engine_decode_ms(runner, batch: int, ctx: int, steps: int, warmup: int, overlap: bool) -> float:
    """Mean ms per decode step of the whole engine loop (``EngineCore.step``: schedule, forward,
    sample, commit, outputs), ``batch`` requests entering with ``ctx`` tokens already in the pool
    (as after a KV transfer on a decode node), with or without overlap scheduling."""
    from pdserve.runtime.engine import EngineCore
    from pdserve.sampling_params import SamplingParams

    core = EngineCore(runner.cfg, runner, overlap=overlap)
    params = SamplingParams(temperature=0, max_new_tokens=warmup + steps + 4, ignore_eos=True)
    for i in range(batch):
        req = core.add_request(f"r{i}", [1] * ctx, params)
        core.scheduler.waiting.remove(req)
        if not core.kv.ensure_capacity(req, ctx + 1):
            raise RuntimeError(f"pool too small for {batch} x {ctx} tokens")
        req.num_computed = ctx
        req.append_token(1, None, None)
        core.scheduler.add_running(req)
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            sync(runner.device)
            start = time.perf_counter()
        core.step()
    sync(runner.device)
    ms = (time.perf_counter() - start) / steps * 1e3
    while core.has_work:
        core.step()
    core.drain()
    return ms


def pdserve_prefill_ms(runner, tokens: int, reps: int) -> tuple[float, str]:
    """Median wall ms of one prefill forward (+ argmax to the host), and a note with the host's
    enqueue time (until ``forward`` returns) beside the GPU's time (events): when the first is not
    well below the second, the step is host-bound."""
    from pdserve.runtime.forward import SeqChunk

    pages = list(range(-(-tokens // runner.layout.page_size)))
    ids = torch.randint(0, runner.vocab_size, (tokens,)).tolist()
    seq = [SeqChunk("p", ids, 0, pages)]
    runner.forward(seq)  # warm-up (compiles the extend kernel for this shape class)
    times, host, gpu = [], [], []
    for _ in range(reps):
        sync(runner.device)
        t0 = time.perf_counter()
        events = _record(runner.device)
        logits = runner.forward(seq)
        host.append((time.perf_counter() - t0) * 1e3)
        end = _record(runner.device)
        logits.argmax(dim=-1).tolist()
        sync(runner.device)
        times.append((time.perf_counter() - t0) * 1e3)
        if events is not None:
            gpu.append(events.elapsed_time(end))
    note = f"host enqueue {_median(host):.1f} ms" + (f", GPU {_median(gpu):.1f} ms" if gpu else "")
    return _median(times), note


def _record(device: torch.device):
    if device.type != "cuda":
        return None
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]
