"""The Redis registry: nodes announce themselves, routers keep a live local view.

Keys (``ns`` = namespace, default ``pdserve``; values are msgpack of ``pdserve.protocol`` structs):
  ``{ns}:node:{node_id}``  NodeInfo, TTL ``ttl_s``, kept alive by the node's heartbeat (PEXPIRE)
  ``{ns}:load:{node_id}``  LoadReport, same TTL, rewritten every heartbeat
Channels: ``{ns}:load`` (every LoadReport), ``{ns}:events`` (RegistryEvent join / leave).

A node runs a ``NodeRegistrar`` thread. Each tick is one pipelined round trip: PEXPIRE its record,
SET + PUBLISH its load. PEXPIRE answering 0 means the record is gone (first tick, expiry after a
stall, or a Redis restart, which starts empty), so the registrar writes it again: re-registration
after a restart needs no special case.

A router runs a ``RegistryView`` thread: subscribe (keyspace events on node keys when the server
has them enabled, plus the two channels), then SCAN to resync, then apply events as they come and
re-SCAN every ``scan_interval_s``. A node leaves the view when its record is deleted or expires
(event) or is missing from a scan. While Redis is unreachable the view keeps its last state; after
reconnecting it waits ``resync_grace_s`` before dropping nodes missing from a scan, so that nodes
have time to re-register into a restarted (empty) Redis.

Liveness does not hang on the registry alone: a router also watches each node's socket
(``pdserve.router.liveness``) and ``evict``s a node it cannot reach, at once, whether Redis is up or
not. An evicted instance stays out of the view (scans do not bring it back) for ``evict_hold_s``;
a new process under the same id is admitted at once.

A draining node (SIGTERM, ``NodeRegistrar.mark_draining``) keeps its record, with ``draining`` set,
until its in-flight requests are done: ``nodes()`` (where new work goes) leaves it out at once,
``draining_nodes()`` lists it, and it leaves the view only when it deregisters, so the requests it
is finishing are not ended as if it had died.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import msgspec
import redis

from pdserve.protocol import LoadReport, NodeInfo
from pdserve.security import redact_url

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "pdserve"


class RegistryEvent(msgspec.Struct, kw_only=True):
    kind: str        # "join" | "leave"
    node_id: str


def node_key(ns: str, node_id: str) -> str:
    return f"{ns}:node:{node_id}"


def load_key(ns: str, node_id: str) -> str:
    return f"{ns}:load:{node_id}"


def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=1.0)


class NodeRegistrar:
    """Keeps one node's record alive in the registry and publishes its load."""

    def __init__(self, url: str, info: NodeInfo, ttl_s: float = 3.0, interval_s: float = 0.25,
                 load_fn: Callable[[], LoadReport] | None = None, namespace: str = DEFAULT_NAMESPACE) -> None:
        if ttl_s <= interval_s:
            raise ValueError(f"ttl_s ({ttl_s}) must exceed interval_s ({interval_s})")
        self.url, self.info, self.ttl_s, self.interval_s = url, info, ttl_s, interval_s
        self.load_fn = load_fn
        self.ns = namespace
        self._client = _client(url)
        self._stop = threading.Event()
        self._registered = threading.Event()
        self._thread: threading.Thread | None = None
        self._is_reachable = True
        self.num_registrations = 0   # how many times the record was (re)written

    def start(self) -> "NodeRegistrar":
        self._thread = threading.Thread(target=self._run, name=f"registrar-{self.info.node_id}", daemon=True)
        self._thread.start()
        return self

    def wait_registered(self, timeout_s: float) -> bool:
        return self._registered.wait(timeout_s)

    def update_info(self, info: NodeInfo) -> None:
        """Replace the record (written on the next tick)."""
        self.info = info
        self._registered.clear()

    def mark_draining(self) -> None:
        """Rewrite the record with ``draining`` set, now (routers stop sending new work)."""
        self.info = msgspec.structs.replace(self.info, draining=True)
        try:
            self._register(int(self.ttl_s * 1000))
        except redis.RedisError as exc:   # the heartbeat thread writes it when Redis is back
            self._registered.clear()
            log.warning("registry: could not mark %s draining now (%s); retrying", self.info.node_id, exc)

    def stop(self, deregister: bool = True) -> None:
        """Stop heartbeating; with ``deregister`` delete the record now instead of letting it expire."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.ttl_s)
        if deregister:
            node_id = self.info.node_id
            try:
                pipe = self._client.pipeline(transaction=False)
                pipe.delete(node_key(self.ns, node_id), load_key(self.ns, node_id))
                pipe.publish(f"{self.ns}:events", msgspec.msgpack.encode(RegistryEvent(kind="leave", node_id=node_id)))
                pipe.execute()
            except redis.RedisError as exc:
                log.warning("registry: could not deregister %s: %s", node_id, exc)
        self._client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
                if not self._is_reachable:
                    log.info("registry: %s reachable again", redact_url(self.url))
                self._is_reachable = True
            except redis.RedisError as exc:
                if self._is_reachable:
                    log.warning("registry: %s unreachable (%s); retrying every %.2fs", redact_url(self.url), exc,
                                self.interval_s)
                self._is_reachable = False
            self._stop.wait(self.interval_s)

    def _load_report(self) -> bytes | None:
        if self.load_fn is None:
            return None
        try:
            return msgspec.msgpack.encode(self.load_fn())
        except Exception:  # a broken load_fn must not stop the heartbeat that keeps the node listed
            log.exception("registry: load_fn failed for %s", self.info.node_id)
            return None

    def _tick(self) -> None:
        ttl_ms = int(self.ttl_s * 1000)
        node_id = self.info.node_id
        report = self._load_report()
        pipe = self._client.pipeline(transaction=False)
        pipe.pexpire(node_key(self.ns, node_id), ttl_ms)
        if report is not None:
            pipe.set(load_key(self.ns, node_id), report, px=ttl_ms)
            pipe.publish(f"{self.ns}:load", report)
        is_alive = pipe.execute()[0]
        if not is_alive or not self._registered.is_set():
            self._register(ttl_ms)

    def _register(self, ttl_ms: int) -> None:
        node_id = self.info.node_id
        pipe = self._client.pipeline(transaction=False)
        pipe.set(node_key(self.ns, node_id), msgspec.msgpack.encode(self.info), px=ttl_ms)
        pipe.publish(f"{self.ns}:events", msgspec.msgpack.encode(RegistryEvent(kind="join", node_id=node_id)))
        pipe.execute()
        self.num_registrations += 1
        self._registered.set()
        if self.num_registrations > 1:
            log.info("registry: re-registered %s", node_id)


Listener = Callable[[str, NodeInfo], None]   # (event: "added" | "removed", node)

_node_decoder = msgspec.msgpack.Decoder(NodeInfo)
_load_decoder = msgspec.msgpack.Decoder(LoadReport)
_event_decoder = msgspec.msgpack.Decoder(RegistryEvent)


def _decode_or_none(decoder: msgspec.msgpack.Decoder, data: bytes | None):
    if data is None:
        return None
    try:
        return decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("registry: skipping undecodable record (%s)", exc)
        return None


def _is_same_instance(a: NodeInfo, b: NodeInfo) -> bool:
    return a.addr == b.addr and a.started_at == b.started_at and a.bootstrap == b.bootstrap


class RegistryView:
    """A router's live, thread-safe copy of the registry; ``add_listener`` hears joins and leaves."""

    def __init__(self, url: str, namespace: str = DEFAULT_NAMESPACE, scan_interval_s: float = 1.0,
                 resync_grace_s: float = 2.0, evict_hold_s: float = 10.0) -> None:
        self.url, self.ns = url, namespace
        self.scan_interval_s, self.resync_grace_s, self.evict_hold_s = scan_interval_s, resync_grace_s, evict_hold_s
        self._db = int(redis.connection.parse_url(url).get("db", 0) or 0)
        self._lock = threading.Lock()
        self._nodes: dict[str, NodeInfo] = {}
        self._loads: dict[str, LoadReport] = {}
        self._load_seen: dict[str, float] = {}       # node_id -> monotonic time its latest report arrived
        self._evicted: dict[str, tuple[str, float, float]] = {}   # node_id -> (addr, started_at, hold until)
        self._last_sync: float | None = None         # monotonic time of the last successful scan
        self._listeners: list[Listener] = []
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._thread: threading.Thread | None = None
        self._grace_until = 0.0
        self.is_connected = False
        self.num_resyncs = 0

    # -- public ------------------------------------------------------------------------------
    def start(self, wait_s: float = 2.0) -> "RegistryView":
        """Start the watcher; wait up to ``wait_s`` for the first sync (not an error if Redis is down)."""
        self._thread = threading.Thread(target=self._run, name="registry-view", daemon=True)
        self._thread.start()
        self._synced.wait(wait_s)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def add_listener(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def nodes(self) -> dict[str, NodeInfo]:
        """The nodes that take new work (draining ones are left out)."""
        with self._lock:
            return {k: v for k, v in self._nodes.items() if not v.draining}

    def draining_nodes(self) -> dict[str, NodeInfo]:
        with self._lock:
            return {k: v for k, v in self._nodes.items() if v.draining}

    def load_ages(self) -> dict[str, float]:
        """Seconds since each node's latest load report reached this view."""
        now = time.monotonic()
        with self._lock:
            return {k: now - t for k, t in self._load_seen.items()}

    @property
    def registry_age_s(self) -> float | None:
        """Seconds since the last successful scan of the registry (None before the first)."""
        return None if self._last_sync is None else time.monotonic() - self._last_sync

    def evict(self, node_id: str, reason: str) -> None:
        """Drop a node this router found dead on its own (listeners hear "removed"); the same
        instance is kept out for ``evict_hold_s`` even if its record is still in the registry."""
        with self._lock:
            info = self._nodes.get(node_id)
            if info is None:
                return
            self._evicted[node_id] = (info.addr, info.started_at, time.monotonic() + self.evict_hold_s)
        log.warning("registry view: evicting %s (%s): %s", node_id, info.role, reason)
        self._remove(node_id)

    def loads(self) -> dict[str, LoadReport]:
        with self._lock:
            return dict(self._loads)

    def wait_for(self, predicate: Callable[[dict[str, NodeInfo]], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate(self.nodes()):
                return True
            time.sleep(0.02)
        return predicate(self.nodes())

    # -- watcher thread ----------------------------------------------------------------------
    def _run(self) -> None:
        backoff_s = 0.1
        while not self._stop.is_set():
            try:
                self._session()
                backoff_s = 0.1
            except (redis.RedisError, OSError) as exc:
                if self.is_connected:
                    log.warning("registry view: lost %s (%s); serving from the last view", redact_url(self.url), exc)
                self.is_connected = False
                self._stop.wait(backoff_s)
                backoff_s = min(1.0, backoff_s * 2)

    def _session(self) -> None:
        client = _client(self.url)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.psubscribe(f"__keyspace@{self._db}__:{self.ns}:node:*")
            pubsub.subscribe(f"{self.ns}:events", f"{self.ns}:load")
            if self.num_resyncs > 0:  # a reconnect: give nodes time to re-register into an empty Redis
                self._grace_until = time.monotonic() + self.resync_grace_s
            self._resync(client)
            if not self.is_connected and self.num_resyncs > 1:
                log.info("registry view: reconnected to %s", redact_url(self.url))
            self.is_connected = True
            next_scan = time.monotonic() + self.scan_interval_s
            while not self._stop.is_set():
                msg = pubsub.get_message(timeout=0.05)
                if msg is not None:
                    self._on_message(client, msg)
                if time.monotonic() >= next_scan:
                    self._resync(client)
                    next_scan = time.monotonic() + self.scan_interval_s
        finally:
            pubsub.close()
            client.close()

    def _resync(self, client: redis.Redis) -> None:
        records = self._scan(client, f"{self.ns}:node:*", _node_decoder)
        loads = self._scan(client, f"{self.ns}:load:*", _load_decoder)
        seen = {info.node_id: info for info in records}
        is_in_grace = time.monotonic() < self._grace_until
        with self._lock:
            gone = [] if is_in_grace else [n for n in self._nodes if n not in seen]
        for node_id in gone:
            self._remove(node_id)
        for info in records:
            self._upsert(info)
        with self._lock:
            for report in loads:
                if report.node_id in self._nodes:
                    self._keep_newer_load(report)
            now = time.monotonic()
            self._evicted = {k: v for k, v in self._evicted.items() if v[2] > now and k in seen}
        self._last_sync = time.monotonic()
        self.num_resyncs += 1
        self._synced.set()

    @staticmethod
    def _scan(client: redis.Redis, pattern: str, decoder: msgspec.msgpack.Decoder) -> list:
        keys = list(client.scan_iter(match=pattern, count=1000))
        if not keys:
            return []
        values = client.mget(keys)
        return [obj for obj in (_decode_or_none(decoder, v) for v in values) if obj is not None]

    def _on_message(self, client: redis.Redis, msg: dict) -> None:
        channel = msg["channel"].decode() if isinstance(msg["channel"], bytes) else msg["channel"]
        data = msg["data"]
        if channel == f"{self.ns}:load":
            report = _decode_or_none(_load_decoder, data)
            if report is not None:
                with self._lock:
                    if report.node_id in self._nodes:
                        self._keep_newer_load(report)
            return
        if channel == f"{self.ns}:events":
            event = _decode_or_none(_event_decoder, data)
            if event is None:
                return
            node_id, kind = event.node_id, ("set" if event.kind == "join" else "del")
        else:  # __keyspace@db__:{ns}:node:{id}
            node_id = channel.split(f"{self.ns}:node:", 1)[1]
            kind = data.decode() if isinstance(data, bytes) else str(data)
        if kind == "set":
            info = _decode_or_none(_node_decoder, client.get(node_key(self.ns, node_id)))
            if info is not None:
                self._upsert(info)
        elif kind in ("del", "expired"):
            self._remove(node_id)

    def _keep_newer_load(self, report: LoadReport) -> None:
        old = self._loads.get(report.node_id)
        if old is None or report.timestamp >= old.timestamp:
            self._loads[report.node_id] = report
            if old is None or report.timestamp > old.timestamp:
                self._load_seen[report.node_id] = time.monotonic()

    def _upsert(self, info: NodeInfo) -> None:
        with self._lock:
            if self._is_evicted(info):
                return
            old = self._nodes.get(info.node_id)
            if old is not None and _is_same_instance(old, info):
                self._nodes[info.node_id] = info
                return
        if old is not None:   # the same id came back as a new process: its old requests are lost
            self._remove(info.node_id)
        with self._lock:
            self._nodes[info.node_id] = info
        log.info("registry view: + %s (%s at %s)", info.node_id, info.role, info.addr)
        self._notify("added", info)

    def _is_evicted(self, info: NodeInfo) -> bool:
        """Lock held. The instance this router evicted, still within its hold?"""
        entry = self._evicted.get(info.node_id)
        if entry is None:
            return False
        if (entry[0], entry[1]) == (info.addr, info.started_at) and entry[2] > time.monotonic():
            return True
        del self._evicted[info.node_id]   # a new process under that id, or the hold is over
        return False

    def _remove(self, node_id: str) -> None:
        with self._lock:
            info = self._nodes.pop(node_id, None)
            self._loads.pop(node_id, None)
            self._load_seen.pop(node_id, None)
        if info is not None:
            log.info("registry view: - %s (%s)", node_id, info.role)
            self._notify("removed", info)

    def _notify(self, event: str, info: NodeInfo) -> None:
        for fn in list(self._listeners):
            try:
                fn(event, info)
            except Exception:  # one broken listener must not stop the view
                log.exception("registry view: listener failed on %s %s", event, info.node_id)
