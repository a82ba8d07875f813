"""``pdserve bench``: TTFT, ITL, TPOT and goodput of an OpenAI-compatible server, over a load sweep.

    pdserve bench --base-url http://127.0.0.1:8000 --request-rate 1,2,4,8,inf \\
        --random-input-len 1024 --random-output-len 128 --slo ttft=1000,tpot=50 \\
        --compare http://127.0.0.1:8001 --label pd --compare-label colocated

For each server (the main one, then ``--compare``): warm up, run every rate x concurrency point
with the same seeded prompts, write per-run JSON, then plots, a table and a recommendation.
Metric definitions: ``pdserve/bench/metrics.py`` (those of vllm bench serve / sglang.bench_serving).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec

from pdserve.bench import server_stats
from pdserve.bench.client import auth_headers, first_model
from pdserve.bench.datasets import BenchRequest, jsonl_requests, random_requests, sharegpt_synthetic_requests
from pdserve.bench.metrics import SLO, Summary
from pdserve.bench.plots import plot_all
from pdserve.bench.report import Recommendation, final_summary, format_table, progress_line, recommend
from pdserve.bench.runner import make_client
from pdserve.bench.sweep import Target, run_sweep, sweep_points, warmup
from pdserve.config import _check, _check_choices, add_config_args, config_from_args, opt

DEFAULT_VOCAB_SIZE = 32000
DEFAULT_CHUNK_SIZE = 512   # SchedulerConfig's default, when /nodes does not say


def parse_rates(text: str) -> list[float]:
    """``"1,2.5,inf"`` -> [1.0, 2.5, inf]."""
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--request-rate: {text!r} is not a comma list of numbers or inf") from None
    if not rates or any(r <= 0 or math.isnan(r) for r in rates):
        raise ValueError(f"--request-rate: rates must be positive, got {text!r}")
    return rates


def parse_concurrencies(text: str | None) -> list[int | None]:
    """``None`` -> [None] (no cap); ``"8,32"`` -> [8, 32]."""
    if not text:
        return [None]
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--max-concurrency: {text!r} is not a comma list of integers") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"--max-concurrency: must be positive, got {text!r}")
    return values


@dataclass(frozen=True)
class BenchConfig:
    base_url: str = opt("http://127.0.0.1:8000", "Server to measure (router or any OpenAI-compatible server).")
    model: str | None = opt(None, "Model name in requests; default: the first of GET /v1/models.")
    endpoint: str = opt("completions", "API to call: token-id prompts need completions.",
                        choices=("completions", "chat"))
    request_rate: str = opt("inf", "Requests/s: a number, inf (all at t=0), or a comma list to sweep.")
    burstiness: float = opt(1.0, "Gamma shape of inter-arrival gaps: 1 = Poisson, <1 burstier, >1 more even.")
    max_concurrency: str | None = opt(None, "Most requests in flight: an integer or a comma list to sweep.")
    num_prompts: int = opt(200, "Requests per run (each rate/concurrency point).")
    dataset: str = opt("random", "Prompts: random token ids, a ShareGPT-shaped length mix, or a JSONL file.",
                       choices=("random", "sharegpt-synthetic", "jsonl"))
    dataset_path: str | None = opt(None, "JSONL file for --dataset jsonl: {\"prompt\": str | [ids], \"output_len\"?}.")
    random_input_len: int = opt(1024, "Prompt tokens (random); median prompt tokens (sharegpt-synthetic).")
    random_output_len: int = opt(128, "Output tokens (random); median output tokens (sharegpt-synthetic).")
    random_range_ratio: float = opt(0.0, "Random lengths uniform in len*(1-r)..len*(1+r); 0 = fixed.")
    vocab_size: int | None = opt(None, "Vocabulary for random ids; default: the router's /nodes, else 32000.")
    warmup_requests: int = opt(1, "Requests sent (all at once) and discarded before measuring each server.")
    seed: int = opt(0, "Seed for prompts and arrival times.")
    slo: str | None = opt(None, "Per-request SLOs in ms, e.g. ttft=1000,tpot=50[,itl=200][,e2e=...].")
    output_dir: str = opt("bench-out", "Where JSON results and PNG plots go.")
    label: str = opt("main", "Name of the --base-url server in tables and plots.")
    compare: str | None = opt(None, "A second server's URL (e.g. a colocated baseline) run with the same load.")
    compare_label: str = opt("compare", "Name of the --compare server.")
    api_key: str | None = opt(None, "Sent as 'Authorization: Bearer KEY'.")
    chunked_prefill_size: int | None = opt(None, "The servers' chunk size, for the tuning advice; "
                                           "default: from /nodes, else 512.")
    request_timeout_s: float = opt(600.0, "Longest wait for a response chunk before a request fails.")
    disable_progress: bool = opt(False, "No progress bar.")

    def __post_init__(self) -> None:
        _check_choices(self)
        parse_rates(self.request_rate)
        parse_concurrencies(self.max_concurrency)
        SLO.parse(self.slo)
        _check(self.burstiness > 0 and math.isfinite(self.burstiness), "--burstiness", "must be positive")
        _check(self.num_prompts > 0, "--num-prompts", "must be positive")
        _check(self.random_input_len > 0, "--random-input-len", "must be positive")
        _check(self.random_output_len > 0, "--random-output-len", "must be positive")
        _check(0.0 <= self.random_range_ratio < 1.0, "--random-range-ratio", "must be in [0, 1)")
        _check(self.warmup_requests >= 0, "--warmup-requests", "must be >= 0")
        _check(self.dataset != "jsonl" or bool(self.dataset_path), "--dataset-path", "needed with --dataset jsonl")
        _check(self.label != self.compare_label, "--compare-label", "must differ from --label")
        _check(self.request_timeout_s > 0, "--request-timeout-s", "must be positive")

    @property
    def rates(self) -> list[float]:
        return parse_rates(self.request_rate)

    @property
    def concurrencies(self) -> list[int | None]:
        return parse_concurrencies(self.max_concurrency)


def build_requests(cfg: BenchConfig, vocab_size: int, content_seed: int = 0) -> list[BenchRequest]:
    """The prompts of one sweep point (content_seed = point number; 0 = warmup)."""
    as_text = cfg.endpoint == "chat"
    if cfg.dataset == "jsonl":
        return jsonl_requests(cfg.dataset_path, cfg.num_prompts, cfg.random_output_len, seed=cfg.seed)
    if cfg.dataset == "sharegpt-synthetic":
        return sharegpt_synthetic_requests(cfg.num_prompts, cfg.random_input_len, cfg.random_output_len,
                                           vocab_size=vocab_size, seed=cfg.seed, content_seed=content_seed,
                                           as_text=as_text)
    return random_requests(cfg.num_prompts, cfg.random_input_len, cfg.random_output_len,
                           range_ratio=cfg.random_range_ratio, vocab_size=vocab_size, seed=cfg.seed,
                           content_seed=content_seed, as_text=as_text)


async def _probe(cfg: BenchConfig, base_url: str) -> tuple[str, object]:
    """(model name, /nodes JSON or None) of one server."""
    headers = auth_headers(cfg.api_key)
    async with make_client(4, 30.0) as client:
        model = cfg.model or await first_model(client, base_url, headers)
        nodes = await server_stats.fetch_json(client, base_url.rstrip("/") + "/nodes", headers)
    return model, nodes


def _print_row(s: Summary) -> None:
    print(progress_line(s), flush=True)


async def bench(cfg: BenchConfig, on_server_done=None) -> tuple[dict[str, list[Summary]],
                                                               dict[str, Recommendation | None]]:
    """Run the whole benchmark; returns summaries and recommendations per server label.

    ``on_server_done(by_label, recs)`` runs after each server's sweep, so a run cut short (a
    time limit) still leaves the finished servers' summary, table and plots behind.
    """
    slo = SLO.parse(cfg.slo)
    servers = [(cfg.label, cfg.base_url)] + ([(cfg.compare_label, cfg.compare)] if cfg.compare else [])
    probes = [await _probe(cfg, url) for _, url in servers]
    vocab = cfg.vocab_size or server_stats.vocab_size(probes[0][1]) or DEFAULT_VOCAB_SIZE
    points = sweep_points(cfg.rates, cfg.concurrencies)
    warm = build_requests(cfg, vocab, content_seed=0)
    per_point = [build_requests(cfg, vocab, content_seed=k + 1) for k in range(len(points))]
    by_label: dict[str, list[Summary]] = {}
    recs: dict[str, Recommendation | None] = {}
    for (label, url), (model, nodes) in zip(servers, probes):
        target = Target(label, url, model)
        failed = await warmup(target, warm, cfg)
        print(f"[{label}] {url} model={model} roles={server_stats.role_counts(nodes) or '?'} "
              f"warmup failures={failed}", flush=True)
        by_label[label] = await run_sweep(target, per_point, points, cfg, slo, on_summary=_print_row)
        recs[label] = recommend(by_label[label], slo, server_stats.role_counts(nodes),
                                cfg.chunked_prefill_size or server_stats.chunk_size(nodes) or DEFAULT_CHUNK_SIZE)
        if on_server_done is not None:
            on_server_done(by_label, recs)
    return by_label, recs


def write_outputs(cfg: BenchConfig, by_label: dict[str, list[Summary]],
                  recs: dict[str, Recommendation | None]) -> list[str]:
    """summary.json, table.txt and the PNGs; returns the file names."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    everything = [s for ss in by_label.values() for s in ss]
    doc = {"config": vars_of(cfg), "runs": everything,
           "recommendations": {k: (vars(r) if r else None) for k, r in recs.items()}}
    (out / "summary.json").write_bytes(msgspec.json.format(msgspec.json.encode(doc)))
    (out / "table.txt").write_text(format_table(everything) + "\n")
    pngs = plot_all(everything, out, SLO.parse(cfg.slo))
    return ["summary.json", "table.txt"] + [p.name for p in pngs]


def vars_of(cfg: BenchConfig) -> dict:
    d = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    d["api_key"] = "***" if cfg.api_key else None
    return d


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve bench", description=__doc__.split("\n\n")[0])
    add_config_args(parser, BenchConfig)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(BenchConfig, args)
    except ValueError as e:
        parser.error(str(e))
    files: list[str] = []

    def save(by_label: dict[str, list[Summary]], recs: dict[str, Recommendation | None]) -> None:
        files[:] = write_outputs(cfg, by_label, recs)

    try:
        by_label, recs = asyncio.run(bench(cfg, save))
    except (httpx.HTTPError, RuntimeError) as e:   # server down or listing no model: before any run
        print(f"pdserve bench: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print()
    print(format_table([s for ss in by_label.values() for s in ss]))
    print()
    print(final_summary(by_label, recs, SLO.parse(cfg.slo), [f"{cfg.output_dir}/{f}" for f in files]))
    total = sum(s.num_prompts for ss in by_label.values() for s in ss)
    failed = sum(s.failed for ss in by_label.values() for s in ss)
    return 1 if total and failed == total else 0
