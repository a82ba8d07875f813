"""Loads the model, sizes and allocates the KV pool, and executes scheduled steps.

Every engine role (colocated, prefill, decode) owns one ``ModelRunner``; the scheduler hands it
plain ``SeqChunk`` lists and gets logits back.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from pdserve.config import CacheConfig, EngineConfig
from pdserve.runtime.attention import make_attention_backend
from pdserve.runtime.forward import FUTURE_TOKEN, SeqChunk, build_forward_batch
from pdserve.runtime.kv_pool import KVLayout, KVPool, cache_dtype_name
from pdserve.runtime.sampler import PendingSample, Sampler, to_device

log = logging.getLogger(__name__)

CPU_DEFAULT_MEM_FRACTION = 0.05   # of available RAM: several nodes share one CPU box
GPU_DEFAULT_MEM_FRACTION = 0.88
GPU_HEADROOM_BYTES = 2 << 30      # activations and CUDA graphs of a step, beyond the static budget


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda requested but no CUDA device is available")
    return torch.device(name)


def _available_ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def pool_pages(cache: CacheConfig, layout: KVLayout, device: torch.device, context_length: int) -> int:
    """How many pages the KV pool gets, from --max-total-tokens or --mem-fraction-static."""
    if cache.max_total_tokens is not None:
        return -(-cache.max_total_tokens // layout.page_size)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        frac = cache.mem_fraction_static or GPU_DEFAULT_MEM_FRACTION
        # This process's share is frac x total, of which its weights already took `used`; when
        # several nodes share a GPU, what the others hold is respected through `free`.
        used = torch.cuda.memory_reserved(device)
        budget = min(total * frac - used, free - GPU_HEADROOM_BYTES)
        flag = "--mem-fraction-static"
        if budget < layout.page_nbytes * -(-context_length // layout.page_size):
            raise ValueError(f"{flag}: {frac} of {total / 2**30:.1f} GiB leaves {max(budget, 0) / 2**30:.2f} GiB for "
                             f"the KV cache after {used / 2**30:.1f} GiB of weights ({free / 2**30:.1f} GiB free on the device); "
                             f"one full context ({context_length} tokens) needs "
                             f"{layout.page_nbytes * -(-context_length // layout.page_size) / 2**30:.2f} GiB: raise it, "
                             f"lower --context-length, or use a GPU with more free memory")
    else:
        frac = cache.mem_fraction_static or CPU_DEFAULT_MEM_FRACTION
        budget = _available_ram_bytes() * frac
        flag = "--mem-fraction-static"
    num_pages = int(budget // layout.page_nbytes)
    min_pages = -(-context_length // layout.page_size)
    if num_pages < min_pages:
        raise ValueError(f"{flag}: {frac} leaves room for {max(num_pages, 0) * layout.page_size} KV tokens, "
                         f"less than one full context ({context_length}); raise it, lower --context-length, "
                         f"or give --max-total-tokens")
    return num_pages


def check_kernel_flags(cfg: EngineConfig) -> None:
    """Flags the config tree accepts but this engine cannot honour: a clear error, never silence."""
    if cfg.kernel.enable_torch_compile:
        raise ValueError("--enable-torch-compile is not supported: decode runs under CUDA graphs, and at batch 1 "
                         "is ~91% fused weight GEMVs at 93% of the copy rate (docs/benchmarks.md); drop the flag")
    if cfg.cache.kv_cache_dtype != "auto" and cfg.kernel.attention_backend == "flashinfer":
        raise ValueError(f"--kv-cache-dtype {cfg.cache.kv_cache_dtype} with --attention-backend flashinfer is not "
                         f"supported (its fp8 path is unverified); use --attention-backend triton or auto")
    base = cfg.kernel.attention_backend
    for flag, value in (("--prefill-attention-backend", cfg.kernel.prefill_attention_backend),
                        ("--decode-attention-backend", cfg.kernel.decode_attention_backend)):
        if value is not None and value != base:
            raise ValueError(f"{flag} {value}: separate prefill/decode backends are not supported yet; "
                             f"set --attention-backend instead")


def graphs_for_role(cfg: EngineConfig, role: str) -> tuple[bool, bool]:
    """(capture decode graphs, capture prefill graphs) for a node of ``role``, before the device
    checks: a decode node never prefills (a retracted request's recompute runs eagerly), a prefill
    node never decodes; ``--cuda-graph-max-prefill-tokens 0`` turns prefill graphs off."""
    if role not in ("colocated", "prefill", "decode"):
        raise ValueError(f"unknown node role {role!r}")
    return role != "prefill", role != "decode" and cfg.kernel.cuda_graph_max_prefill_tokens > 0


def resolve_attention_backend(cfg: EngineConfig, device: torch.device) -> str:
    backend = cfg.kernel.attention_backend
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    return backend


def attention_options(cfg: EngineConfig, backend: str, context_length: int) -> dict:
    """Constructor options of the chosen attention backend, from --triton-attention-* and
    --cuda-graph-max-bs (the fixed metadata buffers must hold the largest captured batch)."""
    if backend != "triton":
        return {}
    return {"num_kv_splits": cfg.kernel.triton_attention_num_kv_splits,
            "reduce_in_fp32": cfg.kernel.triton_attention_reduce_in_fp32,
            "max_batch_size": max(256, cfg.kernel.cuda_graph_max_bs),
            "max_context_len": context_length}


class ModelRunner:
    def __init__(self, cfg: EngineConfig, role: str = "colocated") -> None:
        """``role``: which steps this engine will run, so which CUDA graphs are worth capturing
        (a decode node never prefills, a prefill node never decodes; colocated: both)."""
        from pdserve.loader import load_model  # heavy imports stay out of config-only paths

        self.cfg = cfg
        check_kernel_flags(cfg)  # before the (slow) load
        self.device = resolve_device(cfg.model.device)
        torch.manual_seed(cfg.model.random_seed)
        if cfg.model.cpu_threads is not None:
            torch.set_num_threads(cfg.model.cpu_threads)
        self.loaded = load_model(cfg.model, self.device)
        self.model = self.loaded.model
        self.fused_gemv = self._enable_fused_gemv(cfg)
        arch = self.loaded.arch
        self.context_length = self.loaded.context_length
        self.vocab_size = arch.vocab_size
        self.layout = KVLayout(num_layers=arch.num_layers, num_kv_heads=self.model.num_local_kv_heads,
                               head_dim=arch.head_dim, page_size=cfg.cache.page_size,
                               dtype=cache_dtype_name(cfg.cache.kv_cache_dtype, self.loaded.dtype))
        num_pages = pool_pages(cfg.cache, self.layout, self.device, self.context_length)
        self.pool = KVPool(num_pages, self.layout, self.device)
        backend = resolve_attention_backend(cfg, self.device)
        self.attn = make_attention_backend(backend, self.pool, **attention_options(cfg, backend, self.context_length))
        self.sampler = Sampler(self.vocab_size, self.device, seed=cfg.model.random_seed)
        self.graphs = None  # CudaGraphRunner once captured (CUDA + triton, unless --disable-cuda-graph)
        self.prefill_graphs = None  # PrefillGraphRunner (the same conditions, --cuda-graph-max-prefill-tokens > 0)
        if self.device.type == "cuda" and backend == "triton" and not cfg.kernel.disable_cuda_graph:
            self._capture_graphs(cfg, role)
        log.info("model %s: %d layers, KV pool %d pages x %d tokens (%.1f MiB), attention %s",
                 cfg.model.model_path, arch.num_layers, num_pages, self.layout.page_size,
                 num_pages * self.layout.page_nbytes / 2**20, backend)

    def _enable_fused_gemv(self, cfg: EngineConfig) -> bool:
        """Batch-1 steps through the fused GEMV kernels on a GPU, unless --disable-fused-gemv."""
        if self.device.type != "cuda" or cfg.kernel.disable_fused_gemv:
            return False
        why_not = self.model.enable_fused_gemv()
        if why_not is not None:
            log.info("fused batch-1 GEMV off: %s", why_not)
        return why_not is None

    def _capture_graphs(self, cfg: EngineConfig, role: str) -> None:
        from pdserve.runtime.cuda_graph import CudaGraphRunner
        from pdserve.runtime.prefill_graph import PrefillGraphRunner

        decode, prefill = graphs_for_role(cfg, role)
        if decode:
            self.graphs = CudaGraphRunner(self, cfg.kernel.cuda_graph_max_bs)
        if prefill:
            self.prefill_graphs = PrefillGraphRunner(self, cfg.kernel.cuda_graph_max_prefill_tokens,
                                                     cfg.kernel.cuda_graph_max_prefill_seqs)
        for graphs in (self.graphs, self.prefill_graphs):
            try:
                if graphs is not None:
                    graphs.capture()
            except Exception as e:
                what = "decode" if graphs is self.graphs else "prefill (--cuda-graph-max-prefill-tokens 0 skips it)"
                raise RuntimeError(f"CUDA graph capture failed, {what} ({type(e).__name__}: {e}); "
                                   f"run with --disable-cuda-graph to run eagerly") from e

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def fingerprint(self) -> str:
        return self.loaded.fingerprint

    @torch.inference_mode()
    def forward(self, seqs: list[SeqChunk], prev: LaunchedStep | None = None) -> torch.Tensor:
        """Run one step; returns logits ``[N, vocab]`` for the seqs with ``need_logits``.

        Input ids equal to ``FUTURE_TOKEN`` are the tokens ``prev`` (still in flight) is sampling
        for the same request: they are read from its device tensor, without waiting for it.
        """
        future = future_rows(seqs, prev)
        if self.graphs is not None and self.graphs.can_run(seqs):
            return self.graphs.run(seqs, future, prev.sample.tokens if future else None)
        if self.prefill_graphs is not None and self.prefill_graphs.can_run(seqs):
            return self.prefill_graphs.run(seqs, future, prev.sample.tokens if future else None)
        batch = build_forward_batch(seqs, self.layout.page_size, self.device)
        if future:
            resolve_future(batch.input_ids, future, prev.sample.tokens)
        self.attn.init_batch(batch)
        hidden = self.model.forward(batch.input_ids, batch.positions, batch, self.attn)
        return self.model.compute_logits(hidden[batch.logits_idx])

    def launch(self, seqs: list[SeqChunk], reqs: list, prev: LaunchedStep | None = None) -> LaunchedStep:
        """Queue forward + sampling of ``seqs`` (``reqs[i]`` owns ``seqs[i]``) on the device."""
        logits = self.forward(seqs, prev)
        idx = [i for i, s in enumerate(seqs) if s.need_logits]
        if not idx:
            return LaunchedStep(None, [], {})
        sample = self.sampler.launch(logits, [reqs[i] for i in idx])
        return LaunchedStep(sample, idx, {seqs[i].rid: row for row, i in enumerate(idx)})

    def step(self, seqs: list[SeqChunk], reqs: list) -> dict[int, tuple]:
        """Forward ``seqs`` and sample, waiting for the result: ``{i: (token_id, logprob, top)}``
        keyed by position in ``seqs``."""
        return self.launch(seqs, reqs).result()


@dataclass
class LaunchedStep:
    """A step queued on the device. ``rows[rid]`` is the request's row in ``sample.tokens``."""
    sample: PendingSample | None
    idx: list[int]
    rows: dict[str, int]

    def result(self) -> dict[int, tuple]:
        if self.sample is None:
            return {}
        out = self.sample.result()
        return {i: (t, lp, top) for i, t, lp, top in zip(self.idx, out.token_ids, out.logprobs, out.top_logprobs)}


def future_rows(seqs: list[SeqChunk], prev: LaunchedStep | None) -> list[tuple[int, int]]:
    """``(token index in the step, row of prev's samples)`` for every ``FUTURE_TOKEN`` input."""
    out, t = [], 0
    for s in seqs:
        for j, tok in enumerate(s.input_ids):
            if tok == FUTURE_TOKEN:
                if prev is None or prev.sample is None or s.rid not in prev.rows or j != len(s.input_ids) - 1:
                    raise RuntimeError(f"request {s.rid}: input token {s.start_pos + j} is not being sampled "
                                       f"by the step in flight")
                out.append((t + j, prev.rows[s.rid]))
        t += len(s.input_ids)
    return out


def resolve_future(input_ids: torch.Tensor, future: list[tuple[int, int]], tokens: torch.Tensor) -> None:
    """Fill the future positions of ``input_ids`` from ``tokens`` on the device (no host wait)."""
    pos, rows = zip(*future)
    dev = input_ids.device
    input_ids[to_device(list(pos), torch.int64, dev)] = tokens[to_device(list(rows), torch.int64, dev)]
