"""KV transfer between two real processes over NIXL/UCX (DRAM to DRAM on this CPU box).

This process plays the decode node (KVReceiver); a spawned child plays the prefill node
(KVSender, see transfer_workers.py). No UCX environment variables are needed: UCX picks shared
memory / TCP between two local processes by itself.
"""

import hashlib
import multiprocessing as mp
import os
import signal
import time

import pytest

from pdserve.config import TransferConfig
from pdserve.runtime.kv_pool import KVLayout, KVPool
from pdserve.transfer import KVReceiver, TransferDone, TransferFailed, TransferState
from pdserve.transfer.runs import coalesce
from transfer_workers import prefill_node

pytestmark = pytest.mark.slow

LAYOUT = dict(num_layers=3, num_kv_heads=2, head_dim=16, page_size=4, dtype="float32")
CFG = dict(heartbeat_interval_s=0.2, peer_timeout_s=1.0, transfer_timeout_s=30.0)
FINGERPRINT = "llama-test-fp"
LAYOUT_PAGE_NBYTES = KVLayout(**LAYOUT).page_nbytes


class PrefillChild:
    def __init__(self, num_pages: int = 32):
        ctx = mp.get_context("spawn")
        self.commands, self.events = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=prefill_node, args=(LAYOUT, num_pages, FINGERPRINT, CFG,
                                                           self.commands, self.events), daemon=True)
        self.proc.start()
        ready = self.events.get(timeout=60)
        assert ready[0] == "ready"
        self.endpoint, self.checksums = ready[1], ready[2]
        self.seen: list[tuple] = []

    def call(self, *cmd):
        self.commands.put(cmd)

    def wait_event(self, kind: str, transfer_id: str, timeout_s: float = 10.0) -> tuple:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for e in self.seen:
                if e[0] == kind and e[1] == transfer_id:
                    return e
            try:
                self.seen.append(self.events.get(timeout=0.05))
            except Exception:   # queue.Empty
                pass
        raise AssertionError(f"no {kind} for {transfer_id}; saw {self.seen}")

    def stop(self):
        if self.proc.is_alive():
            self.call("stop")
            self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()


@pytest.fixture(scope="module")
def prefill():
    child = PrefillChild()
    yield child
    child.stop()


def make_receiver(page_size=4, fingerprint=FINGERPRINT, num_pages=40):
    layout = KVLayout(**{**LAYOUT, "page_size": page_size})
    return KVReceiver(KVPool(num_pages, layout), fingerprint, TransferConfig(**CFG), "127.0.0.1")


def wait_receiver(r, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        events = r.poll()
        if events:
            return events
        time.sleep(0.002)
    raise AssertionError("receiver saw no event")


def sha(pool, page):
    return hashlib.sha1(pool.page_view(page).numpy().tobytes()).hexdigest()


def test_chunked_transfer_to_scattered_pages(prefill):
    r = make_receiver()
    try:
        src = [2, 3, 4, 5, 9, 10, 11, 20, 21]
        dst = [30, 31, 7, 8, 9, 1, 2, 3, 12]              # non-contiguous decode pages
        chunks = [(0, 3), (3, 6), (6, 9)]
        prefill.call("expect", "t1")
        prefill.call("write", "t1", src[0:3], 0)          # before decode's KVDest: queued
        prefill.wait_event("called", "write")
        r.expect("t1", prefill.endpoint, dst)
        prefill.wait_event("DestReady", "t1")
        for a, b in chunks[1:]:                           # later chunks, as prefill finishes them
            prefill.call("write", "t1", src[a:b], a)
        prefill.call("finish", "t1", b"first-token:42")
        (done,) = wait_receiver(r)
        assert isinstance(done, TransferDone) and done.payload == b"first-token:42"
        for s, d in zip(src, dst):
            assert sha(r.pool, d) == prefill.checksums[s], f"decode page {d} != prefill page {s}"
        untouched = set(range(r.pool.num_pages)) - set(dst)
        zero = hashlib.sha1(bytes(LAYOUT_PAGE_NBYTES)).hexdigest()
        assert all(sha(r.pool, p) == zero for p in untouched)
        m = done.metrics
        assert m.num_pages == 9 and m.num_writes == 3 and m.kv_bytes == 9 * LAYOUT_PAGE_NBYTES
        assert m.num_descriptors == sum(len(coalesce(src[a:b], dst[a:b])) for a, b in chunks)
        assert m.busy_ms > 0 and m.gbps > 0
        assert r.state("t1") is TransferState.DONE
        prefill.wait_event("TransferSent", "t1")
    finally:
        r.close()



def test_page_size_mismatch_rejected(prefill):
    r = make_receiver(page_size=8)
    try:
        r.expect("ps", prefill.endpoint, [0, 1])
        (failed,) = wait_receiver(r)
        assert isinstance(failed, TransferFailed)
        assert failed.reason.endswith("page size mismatch: prefill 4, decode 8")
    finally:
        r.close()


def test_fingerprint_mismatch_rejected(prefill):
    r = make_receiver(fingerprint="qwen-other-fp")
    try:
        r.expect("fp", prefill.endpoint, [0])
        (failed,) = wait_receiver(r)
        assert isinstance(failed, TransferFailed)
        assert failed.reason.endswith(f"model fingerprint mismatch: prefill {FINGERPRINT}, decode qwen-other-fp")
    finally:
        r.close()


def test_cancel_from_decode(prefill):
    r = make_receiver()
    try:
        prefill.call("expect", "c1")
        r.expect("c1", prefill.endpoint, [5, 6])
        prefill.wait_event("DestReady", "c1")
        prefill.call("write", "c1", [0], 0)
        r.cancel("c1", "client went away")
        cancelled = prefill.wait_event("TransferCancelled", "c1")
        assert cancelled[2] == "cancelled by decode: client went away"
        (failed,) = wait_receiver(r)
        assert failed == TransferFailed("c1", "client went away")
        assert r.state("c1") is TransferState.CANCELLED
    finally:
        r.close()


def test_sender_killed_mid_transfer(prefill):
    # Last in the file on purpose: it kills the module's prefill child (spawning a second one
    # would cost seconds); the fixture's stop() copes with a dead child.
    r = make_receiver()
    try:
        prefill.call("expect", "k1")
        r.expect("k1", prefill.endpoint, [1, 2, 3, 4])
        prefill.wait_event("DestReady", "k1")
        prefill.call("write", "k1", [0, 1], 0)            # first chunk out, the rest never comes
        prefill.seen.clear()
        prefill.wait_event("called", "write")
        os.kill(prefill.proc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        (failed,) = wait_receiver(r, timeout_s=10.0)
        elapsed = time.monotonic() - t0
        assert isinstance(failed, TransferFailed) and "silent" in failed.reason
        assert elapsed < 5.0, f"took {elapsed:.1f} s"
        assert r.state("k1") is TransferState.FAILED
    finally:
        r.close()
