"""A `pdserve serve` node as a real process for tests: start it (stderr to a log file), wait for its
READY line, stop its whole process group."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time


def start_serve(model: str, redis_url: str, *extra: str) -> tuple[subprocess.Popen, str]:
    """``pdserve serve`` registered at ``redis_url`` (small pool, one CPU thread); (process, log path)."""
    log_path = tempfile.mktemp(suffix=".log")
    cmd = [sys.executable, "-m", "pdserve", "serve", "--model-path", model, "--registry-url", redis_url,
           "--max-total-tokens", "2048", "--cpu-threads", "1", "--registry-ttl-s", "3", *extra]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    return proc, log_path


def wait_ready(proc: subprocess.Popen, log_path: str, timeout_s: float = 120) -> dict:
    """The node's READY record (its NodeInfo as JSON); RuntimeError with the log's tail if it died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("READY "):
            return json.loads(line[len("READY "):])
        if not line and proc.poll() is not None:
            break
    raise RuntimeError(f"node did not start: {open(log_path).read()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
