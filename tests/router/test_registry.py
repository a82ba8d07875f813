"""The registry against a real redis-server: registration, heartbeat, expiry, joins, restarts."""

from __future__ import annotations

import threading
import time

import redis

from pdserve.registry import NodeRegistrar, RegistryView, load_key, node_key
from .util import make_info, make_load


def _events(view: RegistryView) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    lock = threading.Lock()

    def listener(event, info):
        with lock:
            seen.append((event, info.node_id))
    view.add_listener(listener)
    return seen


def test_registration_heartbeat_and_load(redis_server):
    reports = iter(range(1000))
    reg = NodeRegistrar(redis_server.url, make_info("p0"), ttl_s=1.0, interval_s=0.1,
                        load_fn=lambda: make_load("p0", waiting=next(reports))).start()
    view = RegistryView(redis_server.url, scan_interval_s=0.5).start()
    try:
        assert reg.wait_registered(2.0)
        assert view.wait_for(lambda nodes: "p0" in nodes, 2.0)
        assert view.nodes()["p0"].role == "prefill"
        # The record outlives its 1 s TTL because the heartbeat keeps refreshing it.
        time.sleep(1.5)
        assert "p0" in view.nodes()
        client = redis.Redis.from_url(redis_server.url)
        assert 0 < client.pttl(node_key("pdserve", "p0")) <= 1000
        # Load reports flow in and the newest one wins.
        first = view.loads()["p0"].waiting
        time.sleep(0.4)
        assert view.loads()["p0"].waiting > first
        assert reg.num_registrations == 1
    finally:
        reg.stop()
        view.stop()


def test_stop_deregisters_at_once(redis_server):
    reg = NodeRegistrar(redis_server.url, make_info("d0", "decode"), ttl_s=5.0, interval_s=0.1).start()
    view = RegistryView(redis_server.url, scan_interval_s=10.0).start()
    seen = _events(view)
    try:
        assert view.wait_for(lambda n: "d0" in n, 2.0)
        t0 = time.monotonic()
        reg.stop()
        assert view.wait_for(lambda n: "d0" not in n, 1.0)
        assert time.monotonic() - t0 < 1.0          # long before the 5 s TTL
        assert ("removed", "d0") in seen
        client = redis.Redis.from_url(redis_server.url)
        assert not client.exists(node_key("pdserve", "d0"), load_key("pdserve", "d0"))
    finally:
        view.stop()


def test_dead_node_expires_and_listener_fires(redis_server):
    reg = NodeRegistrar(redis_server.url, make_info("d1", "decode"), ttl_s=0.6, interval_s=0.1,
                        load_fn=lambda: make_load("d1")).start()
    # Scans far apart: the removal must come from the keyspace 'expired' event.
    view = RegistryView(redis_server.url, scan_interval_s=30.0).start()
    seen = _events(view)
    try:
        assert view.wait_for(lambda n: "d1" in n, 2.0)
        reg.stop(deregister=False)                  # a crash: no goodbye, the TTL runs out
        t_dead = time.monotonic()
        assert view.wait_for(lambda n: "d1" not in n, 3.0)
        assert time.monotonic() - t_dead < 1.5
        assert seen[-1] == ("removed", "d1")
        assert "d1" not in view.loads()
    finally:
        view.stop()


def test_expiry_found_by_scan_without_keyspace_events(redis_server):
    redis.Redis.from_url(redis_server.url).config_set("notify-keyspace-events", "")
    reg = NodeRegistrar(redis_server.url, make_info("p1"), ttl_s=0.5, interval_s=0.1).start()
    view = RegistryView(redis_server.url, scan_interval_s=0.3).start()
    try:
        assert view.wait_for(lambda n: "p1" in n, 2.0)   # the join event still arrives at once
        reg.stop(deregister=False)
        assert view.wait_for(lambda n: "p1" not in n, 2.0)
    finally:
        view.stop()


def test_node_joining_later_is_picked_up(redis_server):
    view = RegistryView(redis_server.url, scan_interval_s=30.0).start()
    seen = _events(view)
    regs = []
    try:
        assert view.nodes() == {}
        for i in range(3):
            regs.append(NodeRegistrar(redis_server.url, make_info(f"n{i}", "decode"), ttl_s=2.0,
                                      interval_s=0.1).start())
        assert view.wait_for(lambda n: len(n) == 3, 2.0)
        assert sorted(seen) == [("added", "n0"), ("added", "n1"), ("added", "n2")]
    finally:
        for reg in regs:
            reg.stop()
        view.stop()


def test_same_id_new_process_is_a_remove_then_add(redis_server):
    view = RegistryView(redis_server.url, scan_interval_s=30.0).start()
    seen = _events(view)
    first = NodeRegistrar(redis_server.url, make_info("p2", started_at=1.0), ttl_s=2.0, interval_s=0.1).start()
    try:
        assert view.wait_for(lambda n: "p2" in n, 2.0)
        first.stop(deregister=False)
        second = NodeRegistrar(redis_server.url, make_info("p2", started_at=2.0), ttl_s=2.0, interval_s=0.1).start()
        assert view.wait_for(lambda n: n.get("p2") is not None and n["p2"].started_at == 2.0, 2.0)
        assert seen == [("added", "p2"), ("removed", "p2"), ("added", "p2")]
        second.stop()
    finally:
        view.stop()


def test_redis_restart_view_survives_and_nodes_reregister(redis_server):
    regs = [NodeRegistrar(redis_server.url, make_info(f"r{i}", "prefill"), ttl_s=1.0, interval_s=0.1,
                          load_fn=lambda i=i: make_load(f"r{i}")).start() for i in range(2)]
    view = RegistryView(redis_server.url, scan_interval_s=0.2, resync_grace_s=1.0).start()
    seen = _events(view)
    try:
        assert view.wait_for(lambda n: len(n) == 2, 2.0)
        redis_server.stop()
        time.sleep(1.5)                           # longer than the TTL: Redis is down, not the nodes
        assert set(view.nodes()) == {"r0", "r1"}   # served from the last view
        assert not view.is_connected
        redis_server.start()                      # same port, empty
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and not (view.is_connected and all(r.num_registrations >= 2 for r in regs)):
            time.sleep(0.05)
        assert all(r.num_registrations >= 2 for r in regs)
        time.sleep(1.5)                           # past the resync grace: nothing was dropped
        assert set(view.nodes()) == {"r0", "r1"}
        assert ("removed", "r0") not in seen and ("removed", "r1") not in seen
        client = redis.Redis.from_url(redis_server.url)
        assert client.exists(node_key("pdserve", "r0"), node_key("pdserve", "r1")) == 2
        # And the resynced view still tracks deaths.
        regs[0].stop(deregister=False)
        assert view.wait_for(lambda n: "r0" not in n, 3.0)
    finally:
        for reg in regs:
            reg.stop()
        view.stop()


def test_node_that_died_while_redis_was_down_is_dropped_after_grace(redis_server):
    regs = [NodeRegistrar(redis_server.url, make_info(f"g{i}", "decode"), ttl_s=1.0, interval_s=0.1).start()
            for i in range(2)]
    view = RegistryView(redis_server.url, scan_interval_s=0.2, resync_grace_s=0.8).start()
    try:
        assert view.wait_for(lambda n: len(n) == 2, 2.0)
        redis_server.stop()
        regs[1].stop(deregister=False)            # g1 dies during the outage
        time.sleep(0.5)
        redis_server.start()
        assert view.wait_for(lambda n: set(n) == {"g0"}, 4.0)
    finally:
        regs[0].stop()
        view.stop()
