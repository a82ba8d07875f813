"""What the engines see of a KV transfer: states, events, metrics.

Both sides are non-blocking and polled from one scheduler thread; ``poll()`` returns events.
Each transfer ends in exactly one terminal event on each side, after which no write of it is in
flight, so the pages it names may be reused:

- decode (``KVReceiver``): ``TransferDone`` (KV is in the pages; payload = first token...) or
  ``TransferFailed`` (free the pages; the reason says why: cancelled, peer lost, timed out,
  rejected at handshake).
- prefill (``KVSender``): ``TransferSent`` (decode has the KV + payload) or ``TransferCancelled``
  (decode cancelled, the peer died, a write failed, or it timed out); free the source pages then.

State machine (``TRANSITIONS`` is the whole of it; any other move raises)::

    decode:  BOOTSTRAPPING -> TRANSFERRING -> DONE
    prefill: WAITING_DEST  -> TRANSFERRING -> DONE
    any live state -> CANCELLING (stop asked; in-flight writes draining) -> CANCELLED
    any live state -> FAILED (peer lost, rejected, write error)
"""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field

from pdserve.transfer.protocol import TransferMetrics


class TransferState(enum.Enum):
    BOOTSTRAPPING = "bootstrapping"   # decode: handshake with the prefill peer in flight
    WAITING_DEST = "waiting_dest"     # prefill: request known, decode pages not yet
    TRANSFERRING = "transferring"     # pages known on both sides; writes may be in flight
    CANCELLING = "cancelling"         # stop asked; waiting for in-flight writes / the peer's ack
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (TransferState.DONE, TransferState.FAILED, TransferState.CANCELLED)


S = TransferState
TRANSITIONS: dict[TransferState, frozenset[TransferState]] = {
    S.BOOTSTRAPPING: frozenset({S.TRANSFERRING, S.CANCELLING, S.FAILED}),
    S.WAITING_DEST: frozenset({S.TRANSFERRING, S.CANCELLING, S.FAILED}),
    S.TRANSFERRING: frozenset({S.DONE, S.CANCELLING, S.FAILED}),
    S.CANCELLING: frozenset({S.CANCELLED, S.FAILED}),
    S.DONE: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}


class TransferError(RuntimeError):
    """Misuse of the transfer API (unknown transfer id, write after finish, bad page index)."""


# -- events -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TransferDone:
    """Decode: the KV is in the pages; ``payload`` is what the prefill node passed to finish()."""
    transfer_id: str
    payload: bytes
    metrics: TransferMetrics


@dataclass(frozen=True)
class TransferFailed:
    """Decode: no KV will come (and no write is in flight); free the pages."""
    transfer_id: str
    reason: str


@dataclass(frozen=True)
class DestReady:
    """Prefill: the decode pages for ``transfer_id`` are known; writes now go out directly."""
    transfer_id: str
    dst_page_ids: list[int]


@dataclass(frozen=True)
class TransferSent:
    """Prefill: every write is done and the completion went to decode; free the source pages."""
    transfer_id: str
    metrics: TransferMetrics


@dataclass(frozen=True)
class TransferCancelled:
    """Prefill: the transfer stopped (no write in flight); free the source pages, stop its prefill."""
    transfer_id: str
    reason: str


ReceiverEvent = TransferDone | TransferFailed
SenderEvent = DestReady | TransferSent | TransferCancelled


# -- per-transfer bookkeeping shared by both sides ----------------------------------------------
@dataclass
class TransferRecord:
    transfer_id: str
    peer: str                         # channel key of the peer (endpoint or agent name)
    state: TransferState
    created_at: float = field(default_factory=time.monotonic)
    ended_at: float | None = None
    reason: str = ""

    def advance(self, new: TransferState, reason: str = "") -> None:
        if new not in TRANSITIONS[self.state]:
            raise TransferError(f"transfer {self.transfer_id}: illegal move {self.state.value} -> {new.value}")
        self.state = new
        if reason:
            self.reason = reason
        if new.is_terminal:
            self.ended_at = time.monotonic()

    def age_s(self, now: float) -> float:
        return now - self.created_at


class MetricsRing:
    """The last ``maxlen`` finished transfers' metrics (for /metrics and the bench)."""

    def __init__(self, maxlen: int = 1024) -> None:
        self._ring: deque[TransferMetrics] = deque(maxlen=maxlen)
        self.total_bytes = 0
        self.total_transfers = 0

    def add(self, m: TransferMetrics) -> None:
        self._ring.append(m)
        self.total_bytes += m.kv_bytes
        self.total_transfers += 1

    def recent(self) -> list[TransferMetrics]:
        return list(self._ring)

    def __len__(self) -> int:
        return len(self._ring)
