"""Consistency checks on a finished `pdserve bench` output folder (shared by the CLI and e2e tests)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pdserve.bench.sweep import load_run

PNGS = ("ttft_vs_load.png", "itl_vs_load.png", "tpot_vs_load.png", "goodput_vs_load.png")


def _ordered(stats) -> bool:
    return stats.count == 0 or stats.median <= stats.p90 + 1e-9 <= stats.p99 + 2e-9 <= stats.max + 3e-9


def check_run(path: Path) -> None:
    """The summary in one run file agrees with its raw per-request timelines."""
    rec = load_run(path)
    s, reqs = rec.summary, rec.requests
    ok = [r for r in reqs if r.success]
    assert (s.completed, s.failed) == (len(ok), len(reqs) - len(ok))
    tpots = []
    for r in ok:
        assert r.chunk_times_s == sorted(r.chunk_times_s) and r.chunk_times_s[0] > 0
        assert r.ttft_s == r.chunk_times_s[0] and r.e2e_s == r.chunk_times_s[-1]
        if r.output_tokens > 1:
            tpots.append((r.e2e_s - r.ttft_s) / (r.output_tokens - 1) * 1e3)
    assert s.tpot_ms.count == len(tpots)
    if tpots:
        assert s.tpot_ms.mean == pytest.approx(float(np.mean(tpots)))
    if ok:
        assert s.ttft_ms.median == pytest.approx(float(np.median([r.ttft_s for r in ok])) * 1e3)
        assert s.e2e_ms.p99 == pytest.approx(float(np.percentile([r.e2e_s for r in ok], 99)) * 1e3)
        assert s.total_output_tokens == sum(r.output_tokens for r in ok)
        assert s.request_throughput == pytest.approx(len(ok) / s.duration_s)
    for stats in (s.ttft_ms, s.tpot_ms, s.itl_ms, s.e2e_ms):
        assert _ordered(stats), stats


def check_output_dir(out: Path, labels: list[str], num_runs_per_label: int) -> dict:
    """Every run file, summary.json, table.txt and the PNGs exist and agree; returns summary.json."""
    summary = json.loads((out / "summary.json").read_text())
    runs = summary["runs"]
    assert len(runs) == len(labels) * num_runs_per_label
    for label in labels:
        files = sorted(out.glob(f"{label}_rate-*_conc-*.json"))
        assert len(files) == num_runs_per_label, files
        for f in files:
            check_run(f)
            own = load_run(f).summary
            in_summary = [r for r in runs if r["label"] == label and r["request_rate"] == own.request_rate
                          and r["max_concurrency"] == own.max_concurrency]
            assert in_summary and in_summary[0]["ttft_ms"] == json.loads(f.read_text())["summary"]["ttft_ms"]
    for png in PNGS:
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert len((out / "table.txt").read_text().splitlines()) == 2 + len(runs)
    return summary
