"""KV movement between prefill and decode nodes: NIXL over UCX, ZMQ bootstrap, page-run coalescing.

Engines use ``KVSender`` (prefill) and ``KVReceiver`` (decode); see base.py for the events and
the state machine, docs/transfer.md for the design.
"""

from pdserve.transfer.base import (DestReady, MetricsRing, TransferCancelled, TransferDone,
                                   TransferError, TransferFailed, TransferSent, TransferState)
from pdserve.transfer.protocol import TransferMetrics
from pdserve.transfer.receiver import KVReceiver
from pdserve.transfer.sender import KVSender

__all__ = ["DestReady", "KVReceiver", "KVSender", "MetricsRing", "TransferCancelled", "TransferDone",
           "TransferError", "TransferFailed", "TransferMetrics", "TransferSent", "TransferState"]
