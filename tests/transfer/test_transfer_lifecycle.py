"""Sender/receiver state machine over real NIXL (UCX, DRAM) with both ends in this process.

Cheap enough to run unmarked: the cross-process behaviour (checksums, kill -9) is in
test_transfer_two_process.py.
"""

import time
from dataclasses import replace

import pytest
import torch

from pdserve.config import TransferConfig
from pdserve.runtime.kv_pool import KVLayout, KVPool
from pdserve.transfer import (DestReady, KVReceiver, KVSender, TransferCancelled, TransferDone,
                              TransferError, TransferFailed, TransferSent, TransferState)
from pdserve.transfer.base import MetricsRing, TransferRecord
from pdserve.transfer.protocol import TransferMetrics

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, page_size=4, dtype="float32")
FAST = TransferConfig(heartbeat_interval_s=0.1, peer_timeout_s=0.6, transfer_timeout_s=30.0)


def make_pair(sender_cfg: TransferConfig = FAST, receiver_cfg: TransferConfig = FAST):
    src = KVPool(24, LAYOUT)
    src.buffer.normal_()
    return (KVSender(src, "fp", sender_cfg, "127.0.0.1"),
            KVReceiver(KVPool(32, LAYOUT), "fp", receiver_cfg, "127.0.0.1"))


def pump(sender, receiver, want, timeout_s=5.0):
    """Poll both sides until ``want(sender_events, receiver_events)`` holds; return the events."""
    s_ev, r_ev = [], []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sender is not None:
            s_ev += sender.poll()
        if receiver is not None:
            r_ev += receiver.poll()
        if want(s_ev, r_ev):
            return s_ev, r_ev
        time.sleep(0.002)
    raise AssertionError(f"timed out; sender saw {s_ev}, receiver saw {r_ev}")


@pytest.fixture
def pair():
    s, r = make_pair()
    yield s, r
    s.close()
    r.close()


def test_early_dest_and_queued_writes(pair):
    s, r = pair
    r.expect("early", s.bootstrap_endpoint, [9, 10, 11])    # KVDest reaches P before its request
    se, _ = pump(s, r, lambda se, re: se)
    assert se == [DestReady("early", [9, 10, 11])]           # kept, announced
    s.expect("early")                                        # the PrefillReq arrives: claims it
    s.expect("queued")                                       # writes before its KVDest: queued
    assert s.state("queued") is TransferState.WAITING_DEST
    assert s.write("queued", [0, 1], 0) and s.write("queued", [5], 2)
    s.finish("queued", b"q")
    r.expect("queued", s.bootstrap_endpoint, [20, 21, 3])
    s.write("early", [2, 3, 4], 0)
    s.finish("early", b"e")
    se, re = pump(s, r, lambda se, re: len(re) == 2)
    assert {e.transfer_id: e.payload for e in re if isinstance(e, TransferDone)} == {"early": b"e", "queued": b"q"}
    assert {type(e) for e in se} == {DestReady, TransferSent} and len(se) == 3
    for src_page, dst_page in [(2, 9), (3, 10), (4, 11), (0, 20), (1, 21), (5, 3)]:
        assert torch.equal(s.pool.page_view(src_page), r.pool.page_view(dst_page))
    m = s.metrics("queued")
    assert (m.num_pages, m.num_writes, m.num_descriptors) == (3, 2, 2)
    assert m.kv_bytes == 3 * LAYOUT.page_nbytes and m.busy_ms > 0
    assert s.state("queued") is TransferState.DONE and r.state("queued") is TransferState.DONE
    assert len(r.metrics_ring) == 2


def test_abort_from_prefill_fails_decode(pair):
    s, r = pair
    s.expect("t")
    r.expect("t", s.bootstrap_endpoint, [1, 2])
    pump(s, r, lambda se, re: any(isinstance(e, DestReady) for e in se))
    s.write("t", [0], 0)
    s.abort("t")
    se, re = pump(s, r, lambda se, re: re)
    assert re == [TransferFailed("t", "cancelled by prefill: aborted by prefill")]
    assert se == [TransferCancelled("t", "aborted by prefill")]
    assert r.state("t") is TransferState.FAILED and s.state("t") is TransferState.CANCELLED
    assert not s.write("t", [1], 1)                        # no longer live: the caller stops
    assert not s.finish("t", b"")


def test_forget_live_transfer_aborts_quietly(pair):
    s, r = pair
    r.expect("f", s.bootstrap_endpoint, [1, 2])
    pump(s, r, lambda se, re: se)
    s.write("f", [0], 0)
    s.forget("f")                                          # e.g. the prefill request was dropped
    se, re = pump(s, r, lambda se, re: re)
    assert re == [TransferFailed("f", "cancelled by prefill: forgotten by prefill")]
    assert se == [] and s.metrics("f") is None
    with pytest.raises(TransferError, match="unknown transfer"):
        s.state("f")


def test_abort_before_dest_cancels_late_dest_at_once(pair):
    s, r = pair
    s.abort("gone", "router aborted")                      # its KVDest has not come yet
    assert pump(s, r, lambda se, re: se)[0] == [TransferCancelled("gone", "router aborted")]
    s.forget("gone")
    r.expect("gone", s.bootstrap_endpoint, [3])
    _, re = pump(s, r, lambda se, re: re, timeout_s=2.0)   # not after transfer_timeout_s (30 s)
    assert re == [TransferFailed("gone", "cancelled by prefill: transfer gone already cancelled "
                                         "on this prefill node")]


def test_misuse_raises(pair):
    s, r = pair
    with pytest.raises(TransferError, match="unknown transfer"):
        s.write("nope", [0], 0)
    s.expect("t")
    with pytest.raises(TransferError, match="already live"):
        s.expect("t")
    s.finish("t", b"")
    with pytest.raises(TransferError, match="finish\\(\\) called twice"):
        s.finish("t", b"")
    with pytest.raises(TransferError, match="outside the pool"):
        r.expect("u", s.bootstrap_endpoint, [31, 32])
    r.expect("u", s.bootstrap_endpoint, [1])
    s.expect("u")
    pump(s, r, lambda se, re: any(isinstance(e, DestReady) and e.transfer_id == "u" for e in se))
    with pytest.raises(TransferError, match="beyond the 1 decode pages"):
        s.write("u", [0, 1], 0)


def test_prefill_restarted_at_same_endpoint():
    cfg = TransferConfig(heartbeat_interval_s=0.1, peer_timeout_s=5.0)   # restart beats the timeout
    s, r = make_pair(cfg, cfg)
    try:
        r.expect("a", s.bootstrap_endpoint, [1])
        pump(s, r, lambda se, re: se)                 # DestReady
        s.write("a", [0], 0)
        s.finish("a", b"")
        assert isinstance(pump(s, r, lambda se, re: re)[1][0], TransferDone)
        port = int(s.bootstrap_endpoint.rsplit(":", 1)[1])
        s.close()
        s = KVSender(KVPool(4, LAYOUT), "fp", replace(cfg, bootstrap_port=port), "127.0.0.1")
        r.expect("b", s.bootstrap_endpoint, [2])      # same endpoint, new process state
        _, re = pump(s, r, lambda se, re: re)
        assert re[0].transfer_id == "b" and re[0].reason.endswith("(restarted?)")
        r.expect("c", s.bootstrap_endpoint, [3])      # dials afresh: handshake, then works
        pump(s, r, lambda se, re: se)
        s.write("c", [1], 0)
        s.finish("c", b"ok")
        assert pump(s, r, lambda se, re: re)[1][0].payload == b"ok"
    finally:
        s.close()
        r.close()


def test_unclaimed_dest_is_cancelled_after_timeout():
    # the sender's timeout is the shorter one: it drops the KVDest and tells decode why
    s, r = make_pair(TransferConfig(heartbeat_interval_s=0.1, peer_timeout_s=0.6, transfer_timeout_s=0.5))
    try:
        r.expect("orphan", s.bootstrap_endpoint, [4])
        _, re = pump(s, r, lambda se, re: re)
        assert re == [TransferFailed("orphan", "cancelled by prefill: prefill request for orphan "
                                               "did not arrive within 0.5 s")]
    finally:
        s.close()
        r.close()


def test_decode_death_cancels_sender_transfers():
    s, r = make_pair()
    try:
        s.expect("t")
        r.expect("t", s.bootstrap_endpoint, [1, 2])
        pump(s, r, lambda se, re: se)
        r.close()
        t0 = time.monotonic()
        se, _ = pump(s, None, lambda se, re: se)
        assert len(se) == 1 and isinstance(se[0], TransferCancelled)
        assert "silent" in se[0].reason and time.monotonic() - t0 < 3.0
    finally:
        s.close()


def test_unreachable_prefill_fails_fast():
    _, r = None, KVReceiver(KVPool(4, LAYOUT), "fp", FAST, "127.0.0.1")
    try:
        r.expect("t", "tcp://127.0.0.1:9", [0])               # nothing listens on port 9
        _, re = pump(None, r, lambda se, re: re)
        assert re[0].transfer_id == "t" and "did not answer the handshake" in re[0].reason
    finally:
        r.close()


def test_illegal_transition_raises():
    rec = TransferRecord("t", peer="", state=TransferState.WAITING_DEST)
    rec.advance(TransferState.TRANSFERRING)
    rec.advance(TransferState.DONE)
    with pytest.raises(TransferError, match="illegal move done -> transferring"):
        rec.advance(TransferState.TRANSFERRING)


def test_metrics_ring_is_bounded():
    ring = MetricsRing(maxlen=3)
    for i in range(5):
        ring.add(TransferMetrics(transfer_id=str(i), kv_bytes=10))
    assert [m.transfer_id for m in ring.recent()] == ["2", "3", "4"]
    assert (ring.total_transfers, ring.total_bytes) == (5, 50)
