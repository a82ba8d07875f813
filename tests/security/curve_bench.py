"""PUSH -> PULL over loopback TCP, plain against CURVE (``pdserve.security``): messages per second
and round-trip latency of 96-byte messages (a streamed chunk's size).

Run: ``python -m tests.security.curve_bench`` (figures in docs/security.md).
"""

from __future__ import annotations

import threading
import time

import zmq

from pdserve.security import ClusterAuth

SECRET = "correct-horse-battery-staple"
MESSAGE = b"x" * 96


def _pair(ctx: zmq.Context, auth: ClusterAuth) -> tuple[zmq.Socket, zmq.Socket]:
    pull = ctx.socket(zmq.PULL)
    auth.serve(pull, "bench")
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    auth.dial(push, "bench")
    push.connect(f"tcp://127.0.0.1:{port}")
    push.send(MESSAGE)
    pull.recv()   # handshake done
    return push, pull


def throughput(ctx: zmq.Context, auth: ClusterAuth, n: int = 50_000) -> float:
    push, pull = _pair(ctx, auth)
    sender = threading.Thread(target=lambda: [push.send(MESSAGE) for _ in range(n)])
    t0 = time.perf_counter()
    sender.start()
    for _ in range(n):
        pull.recv()
    sender.join()
    return n / (time.perf_counter() - t0)


def round_trip_us(ctx: zmq.Context, auth: ClusterAuth, n: int = 2000) -> tuple[float, float]:
    there_push, there_pull = _pair(ctx, auth)
    back_push, back_pull = _pair(ctx, auth)
    echo = threading.Thread(target=lambda: [back_push.send(there_pull.recv()) for _ in range(n)])
    echo.start()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        there_push.send(MESSAGE)
        back_pull.recv()
        samples.append((time.perf_counter() - t0) * 1e6)
    echo.join()
    samples.sort()
    return samples[n // 2], samples[int(n * 0.99)]


def main() -> None:
    for secret in (None, SECRET, None, SECRET):
        ctx = zmq.Context()
        auth = ClusterAuth(secret)
        rate, (p50, p99) = throughput(ctx, auth), round_trip_us(ctx, auth)
        ctx.destroy(linger=0)
        print(f"{'curve' if secret else 'plain'}: {rate / 1e3:.0f}k msg/s, round trip p50 {p50:.0f} us "
              f"p99 {p99:.0f} us", flush=True)


if __name__ == "__main__":
    main()
