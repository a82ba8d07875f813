"""`pdserve bench` end to end against scripted servers: flags, files, table, summary, compare."""

from __future__ import annotations

import json

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from pdserve.bench.cli import BenchConfig, main
from pdserve.bench.sweep import load_run
from pdserve.cli import main as pdserve_main

from .checks import check_output_dir

NODES = [{"node_id": "p0", "role": "prefill", "vocab_size": 1000, "chunked_prefill_size": 256},
         {"node_id": "d0", "role": "decode", "vocab_size": 1000},
         {"node_id": "d1", "role": "decode", "vocab_size": 1000}]


def _metrics_text() -> str:
    reg = CollectorRegistry()
    Counter("pdserve_kv_transfer_bytes", "KV bytes", registry=reg).inc(2e9)
    return generate_latest(reg).decode()


def test_sweep_with_compare_writes_consistent_json_pngs_and_table(make_server, tmp_path, capsys):
    pd = make_server(ttft_s=0.01, itl_s=0.003, prefill_s_per_token=0.001, serial_prefill=True,
                     nodes_json=NODES, metrics_text=_metrics_text())
    colocated = make_server(ttft_s=0.02, itl_s=0.006)
    out = tmp_path / "out"
    rc = main(["--base-url", pd.url, "--compare", colocated.url, "--label", "pd",
               "--compare-label", "colocated", "--request-rate", "40,inf", "--num-prompts", "6",
               "--random-input-len", "16", "--random-output-len", "5", "--warmup-requests", "2",
               "--slo", "ttft=20,tpot=50", "--output-dir", str(out), "--disable-progress"])
    assert rc == 0
    summary = check_output_dir(out, ["pd", "colocated"], 2)
    # prompts came from the /nodes vocabulary (ids below 0.9 x 1000), identical for both servers
    pd_rec = load_run(out / "pd_rate-40_conc-none.json")
    co_rec = load_run(out / "colocated_rate-40_conc-none.json")
    ids = [t for body in pd.bodies for t in body["prompt"]]
    assert max(ids) < 900 and len(pd.bodies) == len(colocated.bodies) == 2 + 2 * 6
    assert [r.prompt_len for r in pd_rec.requests] == [r.prompt_len for r in co_rec.requests] == [16] * 6
    # both servers got the same prompts; each point (and the warmup) fresh ones: no cache carry-over
    assert sorted(b["prompt"] for b in pd.bodies) == sorted(b["prompt"] for b in colocated.bodies)
    assert len({tuple(b["prompt"]) for b in pd.bodies}) == len(pd.bodies)
    assert all(r.output_tokens == 5 for r in pd_rec.requests)
    # /metrics was scraped (counter unchanged over the run: 0 GB moved), per-request KV figures kept
    assert pd_rec.summary.server == {"kv_transfer_gb": 0.0}
    assert pd_rec.summary.kv.requests == 6 and pd_rec.summary.kv.mean_kv_bytes == 16 * 1024
    assert co_rec.summary.server == {}
    pd_rec_text = summary["recommendations"]["pd"]["reasons"]   # every prefill takes >= 26 ms > 20
    assert any("P:D 1:2 ->" in r for r in pd_rec_text)               # the layout came from /nodes
    assert summary["recommendations"]["pd"]["chunk_size"] in (128, 256)  # /nodes: chunk 256
    assert summary["config"]["slo"] == "ttft=20,tpot=50"
    printed = capsys.readouterr().out
    assert "pdserve bench" in printed and "[pd] recommendation" in printed
    assert "compare at rate" in printed


def test_concurrency_sweep_and_chat(sse_server, tmp_path):
    out = tmp_path / "chat"
    rc = main(["--base-url", sse_server.url, "--endpoint", "chat", "--max-concurrency", "1,3",
               "--num-prompts", "4", "--random-input-len", "8", "--random-output-len", "3",
               "--warmup-requests", "0", "--output-dir", str(out), "--disable-progress"])
    assert rc == 0
    check_output_dir(out, ["main"], 2)
    assert sse_server.max_inflight == 3
    assert all(isinstance(b["messages"][0]["content"], str) for b in sse_server.bodies)


def test_all_requests_failing_returns_1(make_server, tmp_path):
    server = make_server()
    rc = main(["--base-url", server.url, "--model", "fail-500", "--num-prompts", "3",
               "--random-input-len", "4", "--random-output-len", "2", "--output-dir", str(tmp_path),
               "--disable-progress"])
    assert rc == 1
    s = json.loads((tmp_path / "summary.json").read_text())["runs"][0]
    assert s["failed"] == 3 and "HTTP 500" in s["errors"][0]


def test_unreachable_server_is_a_clean_error(tmp_path, capsys):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["--base-url", f"http://127.0.0.1:{port}", "--output-dir", str(tmp_path)]) == 2
    assert "pdserve bench: error: ConnectError" in capsys.readouterr().err


def test_dispatch_and_flag_validation(capsys):
    with pytest.raises(SystemExit):
        pdserve_main(["bench", "--help"])
    assert "--request-rate" in capsys.readouterr().out
    for argv in (["--request-rate", "0"], ["--max-concurrency", "x"], ["--slo", "ttft"],
                 ["--dataset", "jsonl"], ["--burstiness", "-1"]):
        with pytest.raises(SystemExit):
            main(argv)
    assert BenchConfig(request_rate="1,inf", max_concurrency="4").rates == [1.0, float("inf")]
    with pytest.raises(ValueError, match="--request-rate"):
        BenchConfig(request_rate="fast")
