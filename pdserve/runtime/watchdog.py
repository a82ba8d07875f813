"""A node's own health: the warm-up forward at start and the step watchdog.

``warm_up``: one short forward through the node's real step path (``ModelRunner.forward``, so
CUDA graphs, Triton autotuning and lazy allocations happen before the node registers rather than
inside the first user request); ``--skip-server-warmup`` skips it.

``Watchdog``: a daemon thread that watches the step the node's loop is running. A step running
longer than ``--watchdog-timeout`` means the node is stuck (a hung collective, a wedged device):
the thread calls ``on_stuck`` (the node deletes its registry record, so routers drop it at once
and fail or retry what was bound to it) and then ends the process with ``EXIT_STUCK``. The main
thread is the one that is stuck, so nothing gentler can run.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch

from pdserve.runtime.forward import SeqChunk
from pdserve.runtime.kv_manager import KVManager, pages_for

log = logging.getLogger(__name__)

EXIT_STUCK = 3
WARMUP_TOKENS = 8


class Watchdog:
    def __init__(self, timeout_s: float, on_stuck: Callable[[float], None] | None = None,
                 exit_fn: Callable[[int], None] = os._exit) -> None:
        self.timeout_s = timeout_s
        self.on_stuck = on_stuck
        self.exit_fn = exit_fn
        self.fired = threading.Event()
        self._step_started: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @contextmanager
    def step(self):
        """Wrap one engine step: the watchdog fires if it is still inside after the timeout."""
        self._step_started = time.monotonic()
        try:
            yield
        finally:
            self._step_started = None

    def _run(self) -> None:
        poll_s = min(1.0, self.timeout_s / 4)
        while not self._stop.wait(poll_s):
            started = self._step_started
            if started is None:
                continue
            elapsed = time.monotonic() - started
            if elapsed > self.timeout_s:
                self._fire(elapsed)
                return

    def _fire(self, elapsed: float) -> None:
        log.critical("watchdog: a step has run %.1fs (--watchdog-timeout %gs); stopping the node",
                     elapsed, self.timeout_s)
        self.fired.set()
        try:
            if self.on_stuck is not None:
                self.on_stuck(elapsed)
        except Exception:  # the exit below must happen whatever the cleanup does
            log.exception("watchdog: cleanup failed")
        finally:
            logging.shutdown()
            self.exit_fn(EXIT_STUCK)


@torch.inference_mode()
def warm_up(runner, kv: KVManager) -> float:
    """One ``WARMUP_TOKENS``-token forward with logits through ``runner``'s step path, over pages
    taken from ``kv`` and given back; returns its seconds."""
    start = time.perf_counter()
    num_tokens = min(WARMUP_TOKENS, runner.context_length - 1)
    pages = kv.alloc(pages_for(num_tokens, kv.page_size))
    if pages is None:
        raise RuntimeError("warm-up: no free KV pages")
    try:
        seq = SeqChunk(rid="warmup", input_ids=list(range(1, num_tokens + 1)), start_pos=0, page_ids=pages)
        logits = runner.forward([seq])
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)
        if logits.shape[0] != 1:
            raise RuntimeError(f"warm-up: expected one row of logits, got {tuple(logits.shape)}")
    finally:
        kv.allocator.decref(pages)
    seconds = time.perf_counter() - start
    log.info("warm-up forward: %d tokens in %.3fs", num_tokens, seconds)
    return seconds
