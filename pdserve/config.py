"""One configuration tree for every pdserve process.

Each concern is a frozen dataclass; a server's config composes them. The CLI is generated from
the fields (flag name, default and help live on the field), never mirrored by hand. Flag names
follow SGLang's where they exist so that operators' habits carry over. Validation happens at
construction and raises ``ValueError`` naming the flag. Constructing a config touches neither a
GPU nor the network.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any



CLUSTER_SECRET_ENV = "PDSERVE_CLUSTER_SECRET"
MIN_CLUSTER_SECRET_CHARS = 16


def opt(default: Any, help: str, *, choices: tuple | None = None, flag: str | None = None,
        cli: bool = True) -> Any:
    """A config field that carries its CLI flag's help text (and optional choices / name)."""
    meta = {"help": help, "choices": choices, "flag": flag, "cli": cli}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _check(cond: bool, flag: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{flag}: {msg}")


def _check_choices(obj: Any) -> None:
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        value = getattr(obj, f.name)
        if choices and value not in choices:
            raise ValueError(f"{flag_name(f)}: {value!r} is not one of {', '.join(map(str, choices))}")


@dataclass(frozen=True)
class ModelConfig:
    model_path: str = opt("smollm2", "Model: 'smollm2' (default, fetched on first use), a local "
                          "folder (config.json + safetensors/.bin), a .gguf file, or a hub id.")
    tokenizer_path: str | None = opt(None, "Tokenizer folder or file; defaults to the model's.")
    tokenizer_mode: str = opt("auto", "Tokenizer implementation.", choices=("auto", "slow"))
    load_format: str = opt("auto", "Weight format.", choices=("auto", "safetensors", "pt", "gguf", "dummy"))
    dtype: str = opt("auto", "Weights and activations dtype; auto = bfloat16 on GPU, float32 on CPU.",
                     choices=("auto", "float32", "bfloat16", "float16"))
    quantization: str | None = opt(None, "w8a8_int8: linear layers (and the LM head) with int8 weights (per "
                                   "output channel) and int8 activations (per token) through int8 GEMMs; "
                                   "other ops stay in --dtype. Default: none.", choices=(None, "w8a8_int8"))
    context_length: int | None = opt(None, "Maximum context length; defaults to the model's.")
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) for hub ids.")
    download_dir: str | None = opt(None, "Where models are cached; defaults to ~/.cache/pdserve.")
    device: str = opt("auto", "Device to run on.", choices=("auto", "cpu", "cuda"))
    random_seed: int = opt(0, "Seed for dummy weights and for requests without a seed.")
    cpu_threads: int | None = opt(None, "torch intra-op threads (CPU); give each node its share of the "
                                  "cores when several share a machine. Default: torch's choice.")
    is_embedding: bool = opt(False, "Serve embeddings (/v1/embeddings through the router) from the base model's "
                                    "final hidden states instead of generating (colocated and decode nodes).")
    embedding_pooling: str = opt("last", "How --is-embedding pools a prompt's final hidden states: the last "
                                 "token's, or the mean over tokens (then L2-normalized).", choices=("last", "mean"))
    base_gpu_id: int = opt(0, "First CUDA device of this node (rank r uses base + r * --gpu-id-step); on CPU "
                              "checked and ignored.")
    gpu_id_step: int = opt(1, "Device id step between this node's ranks (see --base-gpu-id).")

    def __post_init__(self) -> None:
        _check_choices(self)
        _check(bool(self.model_path), "--model-path", "must not be empty")
        _check(self.cpu_threads is None or self.cpu_threads >= 1, "--cpu-threads",
               f"must be >= 1, got {self.cpu_threads}")
        _check(self.context_length is None or self.context_length > 0, "--context-length",
               f"must be positive, got {self.context_length}")
        _check(self.base_gpu_id >= 0, "--base-gpu-id", f"must be >= 0, got {self.base_gpu_id}")
        _check(self.gpu_id_step >= 1, "--gpu-id-step", f"must be >= 1, got {self.gpu_id_step}")


@dataclass(frozen=True)
class CacheConfig:
    page_size: int = opt(16, "Tokens per KV page.")
    mem_fraction_static: float | None = opt(None, "Fraction of device memory for weights + KV pool "
                                            "(GPU default 0.88); on CPU, of free RAM (default 0.25).")
    max_total_tokens: int | None = opt(None, "KV pool size in tokens; overrides --mem-fraction-static.")
    kv_cache_dtype: str = opt("auto", "KV cache dtype: auto = the model dtype; fp8 halves the pages "
                              "(per-tensor scale 1.0), prefill and decode must match.",
                              choices=("auto", "fp8_e4m3", "fp8_e5m2"))
    disable_radix_cache: bool = opt(False, "Turn the prefix (radix) cache off.")

    def __post_init__(self) -> None:
        _check_choices(self)
        _check(self.page_size > 0 and (self.page_size & (self.page_size - 1)) == 0, "--page-size",
               f"must be a positive power of two, got {self.page_size}")
        _check(self.mem_fraction_static is None or 0.0 < self.mem_fraction_static < 1.0,
               "--mem-fraction-static", f"must be in (0, 1), got {self.mem_fraction_static}")
        _check(self.max_total_tokens is None or self.max_total_tokens >= self.page_size,
               "--max-total-tokens", f"must be at least one page ({self.page_size}), got {self.max_total_tokens}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_running_requests: int | None = opt(None, "Most requests in the running batch (default: by pool size).")
    chunked_prefill_size: int = opt(512, "Most prompt tokens of one request per forward step.")
    max_prefill_tokens: int = opt(4096, "Most prompt tokens (all requests) per forward step.")
    schedule_policy: str = opt("fcfs", "Waiting-queue order: first come, or longest prefix match.",
                               choices=("fcfs", "lpm"))
    schedule_conservativeness: float = opt(1.0, "How much output space to reserve when admitting; "
                                           "higher admits fewer requests and retracts less.")
    max_queued_requests: int = opt(4096, "Requests waiting beyond this are refused (overload).")
    stream_interval: int = opt(1, "Stream a request's tokens to the router every this many tokens (the last "
                                  "ones at once when it finishes); larger means fewer, bigger chunks.")
    enable_mixed_chunk: bool = opt(False, "Mix prefill chunks into decode steps: the default already (kept for "
                                          "SGLang command lines; --disable-mixed-chunk turns it off).")
    disable_mixed_chunk: bool = opt(False, "Steps are prefill-only or decode-only; waiting prompts go first.")
    num_continuous_decode_steps: int = opt(1, "Engine steps a node runs back to back before it reads new "
                                              "requests off its socket (while it has work).")

    def __post_init__(self) -> None:
        _check_choices(self)
        _check(self.chunked_prefill_size > 0, "--chunked-prefill-size",
               f"must be positive, got {self.chunked_prefill_size}")
        _check(self.max_prefill_tokens > 0, "--max-prefill-tokens", f"must be positive, got {self.max_prefill_tokens}")
        _check(self.max_running_requests is None or self.max_running_requests > 0, "--max-running-requests",
               f"must be positive, got {self.max_running_requests}")
        _check(self.schedule_conservativeness > 0, "--schedule-conservativeness",
               f"must be positive, got {self.schedule_conservativeness}")
        _check(self.max_queued_requests > 0, "--max-queued-requests", "must be positive")
        _check(self.stream_interval >= 1, "--stream-interval", f"must be >= 1, got {self.stream_interval}")
        _check(not (self.enable_mixed_chunk and self.disable_mixed_chunk), "--disable-mixed-chunk",
               "contradicts --enable-mixed-chunk")
        _check(self.num_continuous_decode_steps >= 1, "--num-continuous-decode-steps",
               f"must be >= 1, got {self.num_continuous_decode_steps}")


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = opt(1, "Tensor-parallel size: ranks of this node (one process and one device each; rank 0 "
                     "owns the sockets and the scheduler). With --enable-dp-attention, all ranks split the MLP.",
                  flag="--tp")
    dp: int = opt(1, "Attention data-parallel groups (with --enable-dp-attention; must divide --tp). Plain "
                     "data parallelism is more nodes behind the router.", flag="--dp")
    enable_dp_attention: bool = opt(False, "Attention data-parallel over --dp groups (each its own requests and "
                                           "KV pages), MLP tensor-parallel over all --tp ranks (decode nodes).")
    dist_init_addr: str | None = opt(None, "host:port for the node's torch.distributed rendezvous "
                                           "(default: a free port on 127.0.0.1).")
    dist_timeout: float = opt(120.0, "Seconds a collective may wait for a silent rank before the node fails.")
    nnodes: int = opt(1, "Hosts one node's ranks span (only 1: rank 0 registers every rank's KV pool with "
                         "its transfer agent, which needs the pools on its host).")
    node_rank: int = opt(0, "This host's index among --nnodes (only 0, see --nnodes).")

    def __post_init__(self) -> None:
        _check(self.tp >= 1, "--tp", f"must be >= 1, got {self.tp}")
        _check(self.dp >= 1, "--dp", f"must be >= 1, got {self.dp}")
        _check(self.dp == 1 or self.enable_dp_attention, "--dp",
               f"{self.dp} without --enable-dp-attention: for data-parallel replicas start more nodes "
               f"(pdserve up --decode {self.dp}); the router spreads requests over them")
        _check(not self.enable_dp_attention or self.dp > 1, "--enable-dp-attention", "needs --dp > 1")
        _check(self.tp % self.dp == 0, "--dp", f"{self.dp} attention groups must divide --tp {self.tp}")
        _check(self.dist_timeout > 0, "--dist-timeout", f"must be positive, got {self.dist_timeout}")
        _check(self.nnodes == 1, "--nnodes", "a node's ranks must share one host (its KV pools are registered "
                                             "by rank 0's transfer agent); span hosts with more nodes instead")
        _check(self.node_rank == 0, "--node-rank", "only 0 (see --nnodes)")
        if self.dist_init_addr is not None:
            host, _, port = self.dist_init_addr.rpartition(":")
            _check(bool(host) and port.isdigit() and 0 < int(port) < 65536, "--dist-init-addr",
                   f"expected host:port, got {self.dist_init_addr!r}")

    @property
    def attn_dp(self) -> int:
        """Attention groups (1 without --enable-dp-attention)."""
        return self.dp if self.enable_dp_attention else 1


MAX_PREFILL_GRAPH_SEQS = 64  # = kernels.extend_attention.MAX_FLAT_SEQS (its sequence scan is unrolled)


@dataclass(frozen=True)
class KernelConfig:
    attention_backend: str = opt("auto", "Attention backend (auto: triton on GPU, torch on CPU).",
                                 choices=("auto", "torch", "triton", "flashinfer"))
    prefill_attention_backend: str | None = opt(None, "Override --attention-backend for prefill.",
                                                choices=(None, "torch", "triton", "flashinfer"))
    decode_attention_backend: str | None = opt(None, "Override --attention-backend for decode.",
                                               choices=(None, "torch", "triton", "flashinfer"))
    triton_attention_num_kv_splits: int = opt(32, "Most splits over the context in Triton decode attention "
                                                  "(fewer as the batch fills the GPU).")
    triton_attention_reduce_in_fp32: bool = opt(False, "Reduce split attention outputs in fp32.")
    cuda_graph_max_bs: int = opt(256, "Largest decode batch captured in a CUDA graph.")
    disable_cuda_graph: bool = opt(False, "Run decode and prefill eagerly (no CUDA graphs).")
    cuda_graph_max_prefill_tokens: int = opt(4096, "Largest prefill or mixed step (tokens) replayed from a "
                                                   "CUDA graph; 0 runs prefill eagerly.")
    cuda_graph_max_prefill_seqs: int = opt(16, "Most sequences in a prefill step replayed from a CUDA graph.")
    disable_overlap_schedule: bool = opt(False, "Do not overlap CPU scheduling with GPU work.")
    disable_fused_gemv: bool = opt(False, "Run batch-1 steps through cuBLAS and separate RMSNorm/SiLU kernels "
                                          "instead of the fused GEMV kernels (GPU).")
    enable_torch_compile: bool = opt(False, "torch.compile the decode step.")
    torch_compile_max_bs: int = opt(32, "Largest batch run through torch.compile.")

    def __post_init__(self) -> None:
        _check_choices(self)
        _check(self.triton_attention_num_kv_splits >= 1, "--triton-attention-num-kv-splits", "must be >= 1")
        _check(self.cuda_graph_max_bs >= 1, "--cuda-graph-max-bs", "must be >= 1")
        _check(self.cuda_graph_max_prefill_tokens >= 0, "--cuda-graph-max-prefill-tokens", "must be >= 0 (0 disables)")
        _check(1 <= self.cuda_graph_max_prefill_seqs <= MAX_PREFILL_GRAPH_SEQS, "--cuda-graph-max-prefill-seqs",
               f"must be in [1, {MAX_PREFILL_GRAPH_SEQS}], got {self.cuda_graph_max_prefill_seqs}")


@dataclass(frozen=True)
class TransferConfig:
    transfer_backend: str = opt("nixl", "KV transfer backend.", choices=("nixl",))
    bootstrap_port: int = opt(0, "Port of this node's bootstrap (handshake) socket; 0 = any free port.")
    heartbeat_interval_s: float = opt(0.5, "Seconds between liveness pings to transfer peers.")
    peer_timeout_s: float = opt(3.0, "A peer silent this long is dead: its transfers fail, pages freed.")
    transfer_timeout_s: float = opt(60.0, "Longest a reserved transfer may wait before it is failed.")

    def __post_init__(self) -> None:
        _check_choices(self)
        _check(0 <= self.bootstrap_port < 65536, "--bootstrap-port", f"must be a port, got {self.bootstrap_port}")
        _check(self.heartbeat_interval_s > 0, "--heartbeat-interval-s", "must be positive")
        _check(self.peer_timeout_s > self.heartbeat_interval_s, "--peer-timeout-s",
               "must exceed --heartbeat-interval-s")


@dataclass(frozen=True)
class NodeConfig:
    """Where a prefill/decode/colocated node listens and registers."""
    host: str = opt("127.0.0.1", "Address this node binds and advertises.")
    port: int = opt(0, "Port of the node's request socket; 0 = any free port.")
    registry_url: str | None = opt(None, "Redis URL of the registry (redis://host:port/db).")
    node_id: str | None = opt(None, "Name in the registry; default role-host-port.")
    load_report_interval_s: float = opt(0.25, "Seconds between load reports to the registry.")
    registry_ttl_s: float = opt(3.0, "Registry record TTL; refreshed by heartbeat.")
    drain_timeout_s: float = opt(30.0, "On SIGTERM the node takes no new requests and finishes the ones it holds "
                                       "for at most this long; what is left then ends with a retryable 503. "
                                       "0 = stop at once. A second SIGTERM stops at once.")
    metrics_port: int = opt(0, "Port of this node's Prometheus /metrics (HTTP); 0 = any free port (its URL is "
                               "in the registry record and the router's /nodes), -1 = no metrics server.")

    def __post_init__(self) -> None:
        _check(0 <= self.port < 65536, "--port", f"must be a port, got {self.port}")
        _check(self.registry_ttl_s > self.load_report_interval_s, "--registry-ttl-s",
               "must exceed --load-report-interval-s")
        _check(self.drain_timeout_s >= 0, "--drain-timeout-s", f"must be >= 0, got {self.drain_timeout_s:g}")
        _check(-1 <= self.metrics_port < 65536, "--metrics-port",
               f"must be a port, 0 (any free port) or -1 (off), got {self.metrics_port}")


@dataclass(frozen=True)
class SecurityConfig:
    """Data-plane authentication shared by every process of one cluster (docs/security.md)."""
    cluster_secret: str | None = opt(None, "Shared secret of the cluster: every ZMQ socket between pdserve processes "
                                     "(node sockets, the KV bootstrap channel, the router's node connections) is "
                                     "CURVE-authenticated and encrypted with keys derived from it, and peers without "
                                     "it are refused. At least 16 characters. Default: $PDSERVE_CLUSTER_SECRET, else "
                                     "none (no authentication).")

    def __post_init__(self) -> None:
        flag = "--cluster-secret"
        if self.cluster_secret is None and os.environ.get(CLUSTER_SECRET_ENV) is not None:
            object.__setattr__(self, "cluster_secret", os.environ[CLUSTER_SECRET_ENV])
            flag = f"${CLUSTER_SECRET_ENV}"
        _check(self.cluster_secret is None or len(self.cluster_secret) >= MIN_CLUSTER_SECRET_CHARS, flag,
               f"must be at least {MIN_CLUSTER_SECRET_CHARS} characters (e.g. `openssl rand -hex 32`), "
               f"got {len(self.cluster_secret or '')}")

    def __repr__(self) -> str:   # configs get logged; the secret must not be
        return f"SecurityConfig(cluster_secret={'***' if self.cluster_secret else None})"


@dataclass(frozen=True)
class DispatchConfig:
    """Where the router sends a request (conditional disaggregation) and when it sheds load (docs/router.md)."""
    disagg_min_prefill_tokens: int = opt(0, "Prompts shorter than this many tokens skip the prefill pool: a decode "
                                            "node prefills them itself (no KV transfer). 0 = always disaggregate.")
    disagg_max_prefill_queue: int = opt(0, "When every prefill node holds more than this many requests (waiting + "
                                           "running), requests go straight to a decode node. 0 = never.")
    slo: str | None = opt(None, "Latency targets in seconds, e.g. 'ttft=1.0,tpot=0.05': the dashboard's planner "
                                "panel and --admission-control's limit.")
    admission_control: bool = opt(False, "Refuse requests with 429 + Retry-After while the --slo cannot be met at "
                                         "the current load (needs --slo).")
    slo_window_s: float = opt(60.0, "Seconds of recent TTFT/ITL samples behind the dashboard, the planner and "
                                    "admission control.")

    def __post_init__(self) -> None:
        _check(self.disagg_min_prefill_tokens >= 0, "--disagg-min-prefill-tokens", "must be >= 0")
        _check(self.disagg_max_prefill_queue >= 0, "--disagg-max-prefill-queue", "must be >= 0")
        _check(self.slo_window_s > 0, "--slo-window-s", "must be positive")
        _check(not self.admission_control or self.slo is not None, "--admission-control", "needs --slo")
        if self.slo is not None:
            from pdserve.planner import parse_slo
            parse_slo(self.slo)   # ValueError naming --slo


@dataclass(frozen=True)
class RouterConfig:
    host: str = opt("127.0.0.1", "HTTP bind address.")
    port: int = opt(8000, "HTTP port.")
    registry_url: str | None = opt(None, "Redis URL of the registry.")
    policy: str = opt("least_load", "How to pick a (prefill, decode) pair.",
                      choices=("round_robin", "least_load", "power_of_two", "cache_aware"))
    api_key: str | None = opt(None, "Require 'Authorization: Bearer KEY'.")
    served_model_name: str | None = opt(None, "Model name in the API; defaults to the model path's name.")
    chat_template: str | None = opt(None, "Jinja chat template (file or inline) overriding the tokenizer's.")
    max_request_bytes: int = opt(4 << 20, "Largest request body accepted.")
    allow_auto_truncate: bool = opt(False, "Cut prompts beyond the context length instead of refusing them.")
    max_prefill_retries: int = opt(2, "Times a request is re-prefilled on another node after a prefill failure.")
    request_timeout_s: float = opt(600.0, "Longest a request may run.")
    metrics_no_auth: bool = opt(False, "Serve /metrics without --api-key (a scraper that cannot send a bearer token).")
    security: SecurityConfig = field(default_factory=SecurityConfig)
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)

    def __post_init__(self) -> None:
        _check_choices(self)
        _check(0 < self.port < 65536, "--port", f"must be a port, got {self.port}")
        _check(self.max_request_bytes > 0, "--max-request-bytes", "must be positive")
        _check(self.max_prefill_retries >= 0, "--max-prefill-retries", "must be >= 0")


@dataclass(frozen=True)
class ServingConfig:
    """A node's own health: warm-up, the step watchdog, NaN checks."""
    skip_server_warmup: bool = opt(False, "Skip the warm-up forward a node runs before it registers.")
    watchdog_timeout: float = opt(300.0, "Seconds one engine step may take; a step stuck longer kills the node "
                                         "(its registry record is deleted first, so routers drop it at once).")
    enable_nan_detection: bool = opt(False, "Check every step's logits: a request whose logits hold NaN or inf "
                                            "fails with an error instead of sampling garbage.")

    def __post_init__(self) -> None:
        _check(self.watchdog_timeout > 0, "--watchdog-timeout", f"must be positive, got {self.watchdog_timeout}")


@dataclass(frozen=True)
class GrammarConfig:
    """Structured output: response_format / tools / regex / ebnf through a token mask."""
    grammar_backend: str = opt("xgrammar", "Library that compiles grammars and masks logits; none refuses "
                                           "structured-output requests.", choices=("xgrammar", "none"))
    constrained_json_whitespace_pattern: str | None = opt(
        None, "Regex for the whitespace allowed between JSON tokens (e.g. '[\\n\\t ]*'); default: compact "
              "JSON with ', ' and ': ' separators.")

    def __post_init__(self) -> None:
        if self.grammar_backend not in ("xgrammar", "none"):
            raise ValueError(f"--grammar-backend: {self.grammar_backend!r} is not built (xgrammar or none; "
                             f"outlines and llguidance are not installed)")
        pattern = self.constrained_json_whitespace_pattern
        if pattern is not None:
            import re
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"--constrained-json-whitespace-pattern: not a regex: {exc}") from None
            _check(self.grammar_backend != "none", "--constrained-json-whitespace-pattern",
                   "needs a grammar backend (not --grammar-backend none)")


SPECULATIVE_ALGORITHMS_REFUSED = ("EAGLE", "EAGLE3", "NEXTN", "MTP", "STANDALONE")
DEFAULT_NGRAM_STEPS = 4


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding without a draft model: n-gram (prompt-lookup) drafts verified in one forward
    (docs/speculative.md)."""
    speculative_algorithm: str | None = opt(None, "NGRAM: draft each greedy request's next tokens by matching its "
                                            "last tokens against its prompt and output so far, verify them in one "
                                            "forward. Draft-model algorithms (EAGLE, EAGLE3, STANDALONE) are refused.")
    speculative_num_steps: int | None = opt(None, f"Most tokens drafted per request per step (default "
                                                  f"{DEFAULT_NGRAM_STEPS}, or --speculative-num-draft-tokens - 1); "
                                                  f"a request drafts one more than it had accepted last step, or "
                                                  f"twice as many when all were.")
    speculative_num_draft_tokens: int | None = opt(None, "Most tokens per request in a verify forward: the last "
                                                         "accepted one plus the drafted ones (= steps + 1).")
    speculative_eagle_topk: int | None = opt(None, "Draft branches per step: only 1 (NGRAM drafts one chain).")
    speculative_draft_model_path: str | None = opt(None, "Refused: no draft model can be downloaded here; "
                                                         "--speculative-algorithm NGRAM needs none.")
    speculative_token_map: str | None = opt(None, "Refused: an EAGLE hot-token map (no EAGLE here).")
    speculative_ngram_min_match_window_size: int = opt(1, "Shortest suffix of a request's tokens matched to draft.")
    speculative_ngram_max_match_window_size: int = opt(12, "Longest suffix matched (the longest match wins).")

    def __post_init__(self) -> None:
        algo = self.speculative_algorithm
        if algo is not None:
            object.__setattr__(self, "speculative_algorithm", algo := algo.upper())
            _check(algo not in SPECULATIVE_ALGORITHMS_REFUSED, "--speculative-algorithm",
                   f"{algo} needs a draft model and none can be downloaded here; use NGRAM (no draft model)")
            _check(algo == "NGRAM", "--speculative-algorithm", f"{algo!r} is not one of NGRAM")
        _check(self.speculative_draft_model_path is None, "--speculative-draft-model-path",
               "no draft model can be downloaded here; --speculative-algorithm NGRAM needs none")
        _check(self.speculative_token_map is None, "--speculative-token-map", "EAGLE only; pdserve has no EAGLE")
        _check(self.speculative_eagle_topk in (None, 1), "--speculative-eagle-topk",
               f"NGRAM drafts one chain, so only 1, got {self.speculative_eagle_topk}")
        steps, tokens = self.speculative_num_steps, self.speculative_num_draft_tokens
        for flag, value in (("--speculative-num-steps", steps), ("--speculative-num-draft-tokens", tokens)):
            _check(value is None or algo is not None, flag, "needs --speculative-algorithm NGRAM")
        _check(steps is None or 1 <= steps <= 64, "--speculative-num-steps", f"must be in [1, 64], got {steps}")
        _check(tokens is None or 2 <= tokens <= 65, "--speculative-num-draft-tokens",
               f"must be in [2, 65], got {tokens}")
        _check(steps is None or tokens is None or tokens == steps + 1, "--speculative-num-draft-tokens",
               f"must be --speculative-num-steps + 1 = {steps and steps + 1} (one chain), got {tokens}")
        lo, hi = self.speculative_ngram_min_match_window_size, self.speculative_ngram_max_match_window_size
        _check(lo >= 1, "--speculative-ngram-min-match-window-size", f"must be >= 1, got {lo}")
        _check(hi >= lo, "--speculative-ngram-max-match-window-size",
               f"must be >= --speculative-ngram-min-match-window-size ({lo}), got {hi}")

    @property
    def is_enabled(self) -> bool:
        return self.speculative_algorithm is not None

    @property
    def num_draft(self) -> int:
        """The most tokens drafted per request per step."""
        if self.speculative_num_steps is not None:
            return self.speculative_num_steps
        if self.speculative_num_draft_tokens is not None:
            return self.speculative_num_draft_tokens - 1
        return DEFAULT_NGRAM_STEPS


@dataclass(frozen=True)
class EngineConfig:
    """Everything one engine (colocated, prefill or decode) needs."""
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    grammar: GrammarConfig = field(default_factory=GrammarConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    def __post_init__(self) -> None:
        _check(not (self.speculative.is_enabled and self.parallel.enable_dp_attention), "--speculative-algorithm",
               "not with --enable-dp-attention (its joint steps verify no drafts)")


@dataclass(frozen=True)
class ServerConfig:
    """A node process: its engine, its transfer settings and where it lives."""
    role: str = opt("colocated", "Node role.", choices=("prefill", "decode", "colocated"), cli=False)
    engine: EngineConfig = field(default_factory=EngineConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    node: NodeConfig = field(default_factory=NodeConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def __post_init__(self) -> None:
        _check(not (self.role == "prefill" and self.engine.model.is_embedding), "--is-embedding",
               "colocated and decode nodes only (an embedding is one forward on the node that serves it)")


# The CLI generation lives in config_cli.py; re-exported here, where callers have always found it.
from pdserve.config_cli import (_build, _leaf_fields, accepted_flags, add_config_args,  # noqa: E402,F401
                                config_from_args)


def engine_config(**flags: Any) -> EngineConfig:
    """Python-API form: ``engine_config(model_path=..., page_size=16)``; unknown names are errors."""
    known = {f.name for f in _leaf_fields(EngineConfig)}
    unknown = sorted(set(flags) - known)
    if unknown:
        raise ValueError(f"unknown engine option(s): {', '.join(unknown)}")
    return _build(EngineConfig, flags)
