"""`pdserve bench` against a real `pdserve up` (Redis, 1 prefill + 1 decode node, router; SmolLM2 on CPU)."""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from pdserve.bench.cli import main as bench_main
from pdserve.bench.sweep import load_run

from .checks import check_output_dir

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log_path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"pdserve up exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"pdserve up not healthy after {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)          # the group this test started (start_new_session)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture
def pdserve_up(tmp_path):
    try:
        importlib.import_module("pdserve.launch")
    except ImportError as e:
        pytest.skip(f"pdserve.launch cannot be imported ({e}); `pdserve up` is not built yet")
    port = _free_port()
    log_path = tmp_path / "pdserve_up.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pdserve", "up", "--port", str(port), "--prefill", "1",
                                 "--decode", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log_path)
        yield url, log_path
    finally:
        _stop(proc)


def test_bench_against_pdserve_up(pdserve_up, tmp_path, capsys):
    url, log_path = pdserve_up
    out = tmp_path / "bench"
    rc = bench_main(["--base-url", url, "--request-rate", "4,inf", "--num-prompts", "4",
                     "--random-input-len", "16", "--random-output-len", "6", "--warmup-requests", "1",
                     "--slo", "ttft=20000,tpot=5000", "--output-dir", str(out), "--disable-progress"])
    printed = capsys.readouterr().out
    assert rc == 0, f"{printed}\n--- pdserve up log (tail) ---\n{log_path.read_text()[-3000:]}"
    summary = check_output_dir(out, ["main"], 2)       # TPOT = (E2E-TTFT)/(out-1), percentiles ordered
    for run in summary["runs"]:
        assert run["failed"] == 0, f"{run['errors']}\n--- pdserve up log ---\n{log_path.read_text()[-3000:]}"
        assert run["total_output_tokens"] == 4 * 6     # ignore_eos: exactly max_tokens each
        assert 0 < run["itl_ms"]["count"] <= 4 * 5     # fewer when a chunk carried several tokens
    rec = load_run(out / "main_rate-inf_conc-none.json")
    assert all(r.prompt_len == 16 for r in rec.requests)          # usage.prompt_tokens: ids went in as-is
    moved = [run["server"].get("kv_transfer_gb", 0.0) for run in summary["runs"]]
    assert max(moved) > 0, f"router /metrics showed no KV transfer: {[r['server'] for r in summary['runs']]}"
    assert "recommendation" in printed
