"""A real `pdserve up` for end-to-end tests: start it, wait until it serves, talk to it, stop it
(and check that it left no process behind)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from pdserve.redis_server import free_port

STARTUP_TIMEOUT_S = 400


class Up:
    def __init__(self, proc: subprocess.Popen, url: str, log_dir: Path, out) -> None:
        self.proc, self.url, self.log_dir, self._out = proc, url, log_dir, out
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)

    def pids(self) -> dict[str, int]:
        return json.loads((self.log_dir / "processes.json").read_text())

    def nodes(self) -> dict[str, dict]:
        return {n["node_id"]: n for n in httpx.get(self.url + "/nodes", timeout=5).json()["nodes"]}

    def health(self) -> httpx.Response:
        return httpx.get(self.url + "/health", timeout=5)

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=5).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    def output(self) -> str:
        """What `pdserve up` itself printed."""
        return (self.log_dir / "up.out").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:]
                         for p in sorted(self.log_dir.glob("*.log")) + [self.log_dir / "up.out"])


def start_up(log_dir: Path, *flags: str, num_nodes: int | None = None) -> Up:
    """`pdserve up FLAGS` on a free port, healthy (and listing ``num_nodes`` nodes when given)."""
    port = free_port()
    out = open(log_dir / "up.out", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pdserve", "up", "--port", str(port), "--log-dir", str(log_dir),
                             *flags], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    up = Up(proc, f"http://127.0.0.1:{port}", log_dir, out)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            stop_up(up)
            pytest.fail(f"pdserve up exited with {proc.returncode}\n{up.logs()}")
        try:
            if up.health().status_code == 200 and (num_nodes is None or len(up.nodes()) == num_nodes):
                return up
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            logs = up.logs()
            stop_up(up)
            pytest.fail(f"pdserve up not healthy after {STARTUP_TIMEOUT_S} s\n{logs}")
        time.sleep(0.5)


def stop_up(up: Up) -> None:
    """SIGTERM the launcher's group (it stops everything it started); fail if a child outlived it."""
    os.killpg(up.proc.pid, signal.SIGTERM)
    try:
        up.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(up.proc.pid, signal.SIGKILL)
        up.proc.wait(timeout=10)
    up._out.close()
    if not (up.log_dir / "processes.json").exists():
        return
    for name, pid in up.pids().items():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        pytest.fail(f"{name} (pid {pid}) outlived `pdserve up`")
