"""Child-process side of test_transfer_two_process.py: a prefill node's KVSender driven over queues.

Spawned with multiprocessing "spawn" (a fresh interpreter, as a real node would be). Commands are
``(method_name, *args)`` tuples called on the sender; its events come back as plain tuples.
"""

import hashlib
import queue

import torch


def page_checksums(pool) -> list[str]:
    return [hashlib.sha1(pool.page_view(p).numpy().tobytes()).hexdigest() for p in range(pool.num_pages)]


def prefill_node(layout_kwargs: dict, num_pages: int, fingerprint: str, cfg_kwargs: dict,
                 commands, events) -> None:
    from pdserve.config import TransferConfig
    from pdserve.runtime.kv_pool import KVLayout, KVPool
    from pdserve.transfer import KVSender

    torch.manual_seed(1234)
    pool = KVPool(num_pages, KVLayout(**layout_kwargs))
    pool.buffer.normal_()                                  # random page content
    sender = KVSender(pool, fingerprint, TransferConfig(**cfg_kwargs), "127.0.0.1")
    events.put(("ready", sender.bootstrap_endpoint, page_checksums(pool)))
    while True:
        for e in sender.poll():
            events.put((type(e).__name__, e.transfer_id, getattr(e, "reason", None)))
        try:
            cmd = commands.get(timeout=0.002)
        except queue.Empty:
            continue
        if cmd[0] == "stop":
            sender.close()
            return
        result = getattr(sender, cmd[0])(*cmd[1:])
        events.put(("called", cmd[0], result))
