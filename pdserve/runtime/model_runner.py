"""Loads the model, sizes and allocates the KV pool, and executes scheduled steps.

Every engine role (colocated, prefill, decode) owns one ``ModelRunner``; the scheduler hands it
plain ``SeqChunk`` lists and gets logits back.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import torch

from pdserve.config import CacheConfig, EngineConfig
from pdserve.models.layers import HeadShard, head_shard
from pdserve.runtime.attention import make_attention_backend
from pdserve.runtime.forward import FUTURE_TOKEN, SeqChunk, build_forward_batch
from pdserve.runtime.kv_pool import KVLayout, KVPool, cache_dtype_name
from pdserve.runtime.grammar import make_grammar_backend
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


def check_kernel_flags(cfg: EngineConfig, role: str = "colocated") -> None:
    """Flags the config tree accepts but this engine cannot honour: a clear error, never silence."""
    if cfg.parallel.enable_dp_attention and role == "prefill":
        raise ValueError("--enable-dp-attention: decode and colocated nodes only (a prefill node's chunks are "
                         "long enough to keep every rank's attention busy under plain --tp)")
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
    def __init__(self, cfg: EngineConfig, role: str = "colocated", *, rank: int = 0,
                 init_method: str | None = None) -> None:
        """``role``: which steps this engine will run, so which CUDA graphs are worth capturing
        (a decode node never prefills, a prefill node never decodes; colocated: both).

        ``--tp N``: rank 0 (this constructor, called by the node) starts ranks 1..N-1, each of which
        builds its own ``ModelRunner(rank=r)`` and then serves rank 0's steps (``serve_rank``)."""
        from pdserve.loader import load_model  # heavy imports stay out of config-only paths
        from pdserve.runtime.parallel import RankLayout, init_groups
        from pdserve.runtime.tp_worker import RankGroup, cpu_threads_per_rank, free_init_method

        self.cfg = cfg
        check_kernel_flags(cfg, role)  # before the (slow) load
        par = cfg.parallel
        self.rank_layout = RankLayout(par.tp, par.attn_dp, rank)
        self.device = self.rank_device(rank)
        torch.manual_seed(cfg.model.random_seed)
        if cfg.model.cpu_threads is not None or par.tp > 1:
            torch.set_num_threads(cfg.model.cpu_threads or cpu_threads_per_rank(par.tp))
        self.ranks = None  # rank 0 of a TP node: its handle on the other ranks
        if par.tp > 1 and rank == 0:
            init_method = free_init_method(par.dist_init_addr)
            self.ranks = RankGroup(cfg, role, par.tp, init_method)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        backend_name = "nccl" if self.device.type == "cuda" else "gloo"
        self.groups = init_groups(self.rank_layout, backend_name, init_method or "", par.dist_timeout)
        if self.ranks is not None:
            self.ranks.control = self.groups.control
        self.loaded = load_model(cfg.model, self.device, parallel=self.groups)
        self.model = self.loaded.model
        self.fused_gemv = self._enable_fused_gemv(cfg)
        arch = self.loaded.arch
        self.context_length = self.loaded.context_length
        self.vocab_size = arch.vocab_size
        self.layout = KVLayout(num_layers=arch.num_layers, num_kv_heads=self.model.num_local_kv_heads,
                               head_dim=arch.head_dim, page_size=cfg.cache.page_size,
                               dtype=cache_dtype_name(cfg.cache.kv_cache_dtype, self.loaded.dtype))
        num_pages = self._agree_min(pool_pages(cfg.cache, self.layout, self.device, self.context_length))
        self.pool, self.rank_pools = self._make_pools(num_pages)
        backend = resolve_attention_backend(cfg, self.device)
        self.attn = make_attention_backend(backend, self.pool, **attention_options(cfg, backend, self.context_length))
        grammar = make_grammar_backend(cfg.grammar.grammar_backend, lambda: self.tokenizer, self.vocab_size,
                                       cfg.grammar.constrained_json_whitespace_pattern)
        self.sampler = Sampler(self.vocab_size, self.device, seed=cfg.model.random_seed, grammar=grammar)
        self.graphs = None  # CudaGraphRunner once captured (CUDA + triton, unless --disable-cuda-graph)
        self.prefill_graphs = None  # PrefillGraphRunner (the same conditions, --cuda-graph-max-prefill-tokens > 0)
        if self.device.type == "cuda" and backend == "triton" and not cfg.kernel.disable_cuda_graph:
            if self.rank_layout.dp_size > 1:
                log.info("CUDA graphs off: DP attention steps run eagerly (groups differ in batch size)")
            else:
                self._capture_graphs(cfg, role)
        log.info("model %s: %d layers, rank %d of %d, KV pool %d pages x %d tokens (%.1f MiB), attention %s",
                 cfg.model.model_path, arch.num_layers, rank, par.tp, num_pages, self.layout.page_size,
                 num_pages * self.layout.page_nbytes / 2**20, backend)

    def _agree_min(self, num_pages: int) -> int:
        """Every rank's pool gets the same page count (page ids mean the same tokens on all ranks)."""
        if self.rank_layout.world_size == 1:
            return num_pages
        import torch.distributed as dist
        t = torch.tensor([num_pages], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.groups.control)
        return int(t.item())

    def _make_pools(self, num_pages: int) -> tuple[KVPool, list[KVPool]]:
        """This rank's pool, and (rank 0 of a TP node) every rank's: rank 0 allocates them all, in
        shared memory on CPU or on each rank's device, and hands each worker its own."""
        import torch.distributed as dist
        from pdserve.runtime.tp_worker import take_pool

        world, rank = self.rank_layout.world_size, self.rank_layout.rank
        if world == 1:
            pool = KVPool(num_pages, self.layout, self.device)
            return pool, [pool]
        if rank > 0:
            pool = KVPool.from_buffer(take_pool(self.groups.control, rank), self.layout, num_pages)
            dist.barrier(group=self.groups.control)
            return pool, []
        pools = [KVPool(num_pages, layout, self.rank_device(r), shared=True)
                 for r, layout in enumerate(self.rank_kv_layouts())]
        self.ranks.hand_over([p.buffer for p in pools[1:]], [p.shm_path for p in pools[1:]])
        dist.barrier(group=self.groups.control)   # every rank has mapped its pool
        for p in pools:
            p.unlink_shm()
        return pools[0], pools

    def rank_device(self, rank: int) -> torch.device:
        """Rank r's device: CUDA device --base-gpu-id + r x --gpu-id-step of the visible ones, or the CPU."""
        m = self.cfg.model
        return gpu_for_rank(resolve_device(m.device), m.base_gpu_id, m.gpu_id_step, rank)

    @property
    def is_parallel(self) -> bool:
        return self.rank_layout.world_size > 1

    def rank_heads(self) -> list[HeadShard]:
        """The attention heads each rank of this node holds (``head_shard`` over its attention group)."""
        arch, lay = self.loaded.arch, self.rank_layout
        return [head_shard(arch.num_heads, arch.num_kv_heads, lay.attn_tp_size, lay.with_rank(r).attn_tp_rank)
                for r in range(lay.world_size)]

    def rank_kv_layouts(self) -> list[KVLayout]:
        """Each rank's pool layout (ranks may hold different KV head counts: ``head_shard``)."""
        return [dataclasses.replace(self.layout, num_kv_heads=h.kv_count) for h in self.rank_heads()]

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
        On a TP node, rank 0 first broadcasts the step (and those tokens) to the other ranks.
        """
        if self.rank_layout.dp_size > 1:
            return self.forward_groups([seqs] + [[] for _ in range(self.rank_layout.dp_size - 1)])
        future = future_rows(seqs, prev)
        tokens = prev.sample.tokens if future else None
        if self.ranks is not None:
            from pdserve.runtime.tp_worker import RankStep
            self.ranks.broadcast(RankStep(groups=[seqs], future=future,
                                          future_len=0 if tokens is None else int(tokens.shape[0])))
            with self.ranks.fatal("step"):
                if tokens is not None:
                    import torch.distributed as dist
                    dist.broadcast(tokens, src=0, group=self.groups.world)
                return self._forward_local(seqs, future, tokens)
        return self._forward_local(seqs, future, tokens)

    def _forward_local(self, seqs: list[SeqChunk], future: list[tuple[int, int]],
                       tokens: torch.Tensor | None) -> torch.Tensor:
        """This rank's share of the step (every rank of a TP node runs it with the same seqs)."""
        if self.graphs is not None and self.graphs.can_run(seqs):
            return self.graphs.run(seqs, future, tokens)
        has_drafts = any(s.num_draft for s in seqs)   # verify steps run eagerly (every draft row's logits)
        if self.prefill_graphs is not None and not has_drafts and self.prefill_graphs.can_run(seqs):
            return self.prefill_graphs.run(seqs, future, tokens)
        batch = build_forward_batch(seqs, self.layout.page_size, self.device)
        if future:
            resolve_future(batch.input_ids, future, tokens)
        self.attn.init_batch(batch)
        hidden = self.model.forward(batch.input_ids, batch.positions, batch, self.attn)
        return self.model.compute_logits(hidden[batch.logits_idx])

    @torch.inference_mode()
    def forward_groups(self, groups: list[list[SeqChunk]]) -> torch.Tensor:
        """DP attention: one step of every attention group (``groups[g]``: group g's seqs, each
        over its own pages); logits of every group's rows, in group order (eager: no CUDA graphs,
        no overlap)."""
        if len(groups) != self.rank_layout.dp_size:
            raise ValueError(f"{len(groups)} step groups for {self.rank_layout.dp_size} DP attention groups")
        if self.ranks is None:
            return self._forward_group_local(groups)
        from pdserve.runtime.tp_worker import RankStep
        self.ranks.broadcast(RankStep(groups=groups))
        with self.ranks.fatal("DP attention step"):
            return self._forward_group_local(groups)

    def _forward_group_local(self, groups: list[list[SeqChunk]]) -> torch.Tensor:
        own = groups[self.rank_layout.dp_rank]
        batch = build_forward_batch(own, self.layout.page_size, self.device)
        batch.dp_tokens = [sum(s.num_new_tokens for s in g) for g in groups]
        if own:
            self.attn.init_batch(batch)
        hidden = self.model.forward(batch.input_ids, batch.positions, batch, self.attn)
        rows = [sum(s.need_logits for s in g) for g in groups]
        return self.model.compute_logits(hidden[batch.logits_idx], rows)

    def serve_rank(self) -> None:
        """Ranks 1..N-1: run rank 0's steps until it says stop."""
        import torch.distributed as dist
        from pdserve.runtime.tp_worker import RankShutdown, receive_step

        while True:
            msg = receive_step(self.groups.control)
            if isinstance(msg, RankShutdown):
                log.info("rank %d: %s", self.rank_layout.rank, msg.reason)
                return
            with torch.inference_mode():
                if self.rank_layout.dp_size > 1:
                    self._forward_group_local(msg.groups)
                    continue
                tokens = None
                if msg.future_len:
                    tokens = torch.empty(msg.future_len, dtype=torch.int64, device=self.device)
                    dist.broadcast(tokens, src=0, group=self.groups.world)
                self._forward_local(msg.groups[0], [tuple(f) for f in msg.future], tokens)

    def check_ranks(self) -> None:
        """Raise ``RankLost`` if another rank of this TP node has exited."""
        if self.ranks is not None:
            self.ranks.check()

    def close(self) -> None:
        """Stop the other ranks of a TP node and leave the process group (rank 0; idempotent), so
        the process can build another TP engine."""
        if self.ranks is None or self.ranks.closed:
            return
        self.ranks.close()
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()

    def launch(self, seqs: list[SeqChunk], reqs: list, prev: LaunchedStep | None = None) -> LaunchedStep:
        """Queue forward + sampling of ``seqs`` (``reqs[i]`` owns ``seqs[i]``) on the device."""
        return self._sample(self.forward(seqs, prev), seqs, reqs)

    def launch_groups(self, steps: list[tuple[list[SeqChunk], list]]) -> list[LaunchedStep]:
        """DP attention: ``steps[g] = (seqs, reqs)`` of attention group g, run as one forward;
        one ``LaunchedStep`` per group (sampled on rank 0 from that group's logits rows)."""
        logits = self.forward_groups([seqs for seqs, _ in steps])
        out, row = [], 0
        for seqs, reqs in steps:
            rows = sum(s.need_logits for s in seqs)
            out.append(self._sample(logits[row:row + rows], seqs, reqs))
            row += rows
        return out

    def _sample(self, logits: torch.Tensor, seqs: list[SeqChunk], reqs: list) -> LaunchedStep:
        """Queue sampling of ``logits`` (the rows of ``seqs`` that need logits)."""
        idx = [i for i, s in enumerate(seqs) if s.need_logits]
        if not idx:
            return LaunchedStep(None, [], {})
        sample = self.sampler.launch(logits, [reqs[i] for i in idx])
        nonfinite = nonfinite_rows(logits, idx) if self.cfg.serving.enable_nan_detection else []
        return LaunchedStep(sample, idx, {seqs[i].rid: row for row, i in enumerate(idx)}, nonfinite)

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
    nonfinite: list[int] = dataclasses.field(default_factory=list)  # seqs whose logits hold NaN/inf

    def result(self) -> dict[int, tuple]:
        if self.sample is None:
            return {}
        out = self.sample.result()
        return {i: (t, lp, top) for i, t, lp, top in zip(self.idx, out.token_ids, out.logprobs, out.top_logprobs)}


def nonfinite_rows(logits: torch.Tensor, idx: list[int]) -> list[int]:
    """``idx[r]`` for every logits row r holding NaN or inf (waits for the device: opt-in)."""
    bad = (~torch.isfinite(logits).all(dim=-1)).nonzero().flatten().tolist()
    return [idx[r] for r in bad]


def gpu_for_rank(device: torch.device, base_gpu_id: int, gpu_id_step: int, rank: int) -> torch.device:
    """--base-gpu-id / --gpu-id-step: rank r on CUDA device base + r * step; on CPU, ignored."""
    if device.type != "cuda":
        if (base_gpu_id, gpu_id_step) != (0, 1):
            log.info("--base-gpu-id/--gpu-id-step ignored: running on %s", device.type)
        return device
    gpu = base_gpu_id + rank * gpu_id_step
    if gpu >= torch.cuda.device_count():
        raise ValueError(f"--base-gpu-id: rank {rank} needs CUDA device {gpu} (base {base_gpu_id} + rank x step "
                         f"{gpu_id_step}), only {torch.cuda.device_count()} visible")
    return torch.device("cuda", gpu)


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
