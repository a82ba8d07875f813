"""NIXL (UCX underneath) wrapped for KV pools.

One agent per node process, UCX backend, the whole KV pool registered once (DRAM on CPU, VRAM on
CUDA). A peer is added from the metadata its handshake carries. Writes post page runs:

- ``mode="prepped"`` (default): a per-page descriptor list of the local pool is prepared once and
  one of each peer's pool once per peer (``prep_xfer_dlist``); a write is ``make_prepped_xfer``
  with page indices. NIXL merges index stretches that are contiguous on both sides, so a run
  still moves as one descriptor (checked with telemetry: 4,096 contiguous pages -> descCount 1).
- ``mode="descs"``: build the run descriptors per call (``initialize_xfer``).

Measured per-call setup on the 2-core CPU box (in-process, DRAM): make_prepped_xfer 2 us for 16
indices, 7 us for 256, 133 us for 4,096; initialize_xfer 12 / 19 / 210 us for the same counts;
preparing an 8,192-page list ~0.5 ms, once. Setup is small next to the ~8 us/descriptor wire cost,
which is why coalescing matters more than the mode; ``TransferMetrics.setup_us`` records it.

Completion: a NIXL notification carries the encoded ``TransferComplete``; the sender only sends
it once every write is DONE (DONE for a UCX WRITE means the data is at the target), so it never
overtakes the data. The target does not need the initiator's metadata to receive notifications.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from pdserve.transfer.pools import PoolSet
from pdserve.transfer.protocol import PoolInfo
from pdserve.transfer.tp_map import RegionInfo
from pdserve.transfer.runs import Run, expand, page_descriptors, run_descriptors

log = logging.getLogger(__name__)

XFER_MODES = ("prepped", "descs")


class NixlError(RuntimeError):
    """A NIXL call failed (the binding's own nixl*Error types, translated at this boundary)."""


def _binding_errors(api: ModuleType) -> tuple[type[BaseException], ...]:
    """The exception classes of the NIXL C++ binding next to ``api`` (nixlRemoteDisconnectError...)."""
    try:
        bindings = importlib.import_module(api.__name__.rsplit(".", 1)[0] + "._bindings")
    except ImportError:
        return (NixlError,)
    errors = tuple(o for o in vars(bindings).values()
                   if isinstance(o, type) and issubclass(o, Exception))
    return errors or (NixlError,)


def load_nixl() -> ModuleType:
    """``nixl_cu13._api`` (CUDA 13 machines) or ``nixl_cu12._api``, whichever is installed."""
    errors = []
    for name in ("nixl_cu13._api", "nixl_cu12._api"):
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
            continue
        if not os.environ.get("NIXL_LOG_LEVEL"):
            # nixl logs every agent/backend creation at INFO to stdout; keep node stdout clean.
            logging.getLogger("nixl").setLevel(logging.WARNING)
        return module
    raise ImportError("KV transfer needs NIXL: pip install nixl-cu13 (CUDA 13) or nixl-cu12; "
                      "tried " + "; ".join(errors))


@dataclass(frozen=True)
class PeerPool:
    """A remote node's pools as its handshake describes them: one region per rank."""
    agent_name: str
    metadata: bytes
    num_pages: int
    mem_type: str               # "DRAM" | "VRAM"
    regions: tuple[RegionInfo, ...]

    def region_index(self, rank: int) -> int:
        return next(i for i, r in enumerate(self.regions) if r.rank == rank)


@dataclass
class WriteHandle:
    """One posted WRITE (one prefill chunk's runs)."""
    xfer: Any                   # nixl_xfer_handle
    peer: str
    kv_bytes: int
    num_descriptors: int
    setup_us: float
    posted_at: float            # time.perf_counter()
    staging: tuple[int, int] | None = None   # (offset, nbytes) of staging it reads; freed when done


def mem_type_of(device: torch.device) -> str:
    return "VRAM" if device.type == "cuda" else "DRAM"


def device_id_of(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return device.index if device.index is not None else torch.cuda.current_device()


# NIXL's progress thread spins without pause (its Python API fixes pthrDelay at 0): one core
# gone per process. Beside a GPU that buys latency; on a 2-core CPU box it starves the model,
# so there the thread sleeps this long between progress calls (measured: ~3% of a core).
CPU_PROGRESS_DELAY_US = 1000


def _make_agent(api: ModuleType, name: str, conf: Any, progress_delay_us: int) -> Any:
    """``api.nixl_agent(name, conf)`` with the progress thread's delay set to ``progress_delay_us``.

    The Python wrapper writes ``pthrDelay = 0`` into the binding's config object; for the length
    of the constructor the binding's config class is swapped for a subclass whose ``pthrDelay``
    setter keeps our value instead.
    """
    base = api.nixlBind.nixlAgentConfig
    if progress_delay_us <= 0 or not hasattr(base, "pthrDelay"):
        return api.nixl_agent(name, conf)

    class _DelayedConfig(base):  # type: ignore[misc, valid-type]
        @property
        def pthrDelay(self) -> int:
            return base.pthrDelay.__get__(self)

        @pthrDelay.setter
        def pthrDelay(self, _value: int) -> None:
            base.pthrDelay.__set__(self, progress_delay_us)

    api.nixlBind.nixlAgentConfig = _DelayedConfig
    try:
        return api.nixl_agent(name, conf)
    finally:
        api.nixlBind.nixlAgentConfig = base


@dataclass(frozen=True)
class LocalRegion:
    """One registered pool buffer of this agent (one per tensor-parallel rank)."""
    buffer: torch.Tensor
    page_nbytes: int
    num_pages: int
    device_id: int
    dlist_offset: int           # index of its page 0 in the agent's prepped local list


class NixlAgent:
    """A NIXL agent owning the node's registered KV buffers (one per rank), each paged into its
    own ``page_nbytes`` pages, plus an optional staging buffer for relayouts (``tp_map``)."""

    def __init__(self, name: str, buffers: torch.Tensor | list[torch.Tensor], page_nbytes: int | list[int], *,
                 capture_telemetry: bool = False, progress_delay_us: int | None = None) -> None:
        buffers = [buffers] if isinstance(buffers, torch.Tensor) else list(buffers)
        sizes = [page_nbytes] * len(buffers) if isinstance(page_nbytes, int) else list(page_nbytes)
        api = load_nixl()
        self.name = name
        self.mem_type = mem_type_of(buffers[0].device)
        self.regions = _local_regions(buffers, sizes)
        self.buffer, self.page_nbytes = buffers[0], sizes[0]
        self.num_pages, self.device_id = self.regions[0].num_pages, self.regions[0].device_id
        self.capture_telemetry = capture_telemetry
        try:
            conf = api.nixl_agent_config(backends=["UCX"], capture_telemetry=capture_telemetry)
        except TypeError:   # NIXL releases before telemetry
            conf, self.capture_telemetry = api.nixl_agent_config(backends=["UCX"]), False
        self._errors = _binding_errors(api)
        if progress_delay_us is None:
            progress_delay_us = 0 if buffers[0].device.type == "cuda" else CPU_PROGRESS_DELAY_US
        self._agent = _make_agent(api, name, conf, progress_delay_us)
        if "UCX" not in self._agent.backends:
            raise RuntimeError(f"NIXL has no UCX backend here (plugins: {self._agent.plugin_list})")
        self._regs = [self._agent.register_memory(b) for b in buffers]
        self.metadata: bytes = self._agent.get_agent_metadata()
        local = [t for r in self.regions
                 for t in _tuples(page_descriptors(r.buffer.data_ptr(), r.num_pages, r.page_nbytes, r.device_id))]
        self._local_dlist = self._agent.prep_xfer_dlist("NIXL_INIT_AGENT", local, self.mem_type)
        self._peers: dict[str, tuple[PeerPool, Any, list[int]]] = {}   # name -> (pool, remote dlist, offsets)
        self._stuck: list[Any] = []                          # handles whose release failed
        self.staging: torch.Tensor | None = None             # uint8, registered by register_staging
        self._staging_reg = None

    @property
    def base_addr(self) -> int:
        return self.buffer.data_ptr()

    def register_staging(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """A registered byte buffer for relayouts (prefill side of a TP-mismatched transfer)."""
        if self.staging is None or self.staging.numel() < nbytes:
            if self._staging_reg is not None:
                self._agent.deregister_memory(self._staging_reg)
            self.staging = torch.zeros(nbytes, dtype=torch.uint8, device=device)
            self._staging_reg = self._agent.register_memory(self.staging)
        return self.staging

    # -- peers --------------------------------------------------------------------------------
    def add_peer(self, peer: PeerPool) -> None:
        """Load the peer's metadata and prepare its per-page descriptor list (once per peer)."""
        if peer.agent_name in self._peers:
            self.remove_peer(peer.agent_name)
        remote, offsets = [], []
        for r in peer.regions:
            offsets.append(len(remote))
            remote += _tuples(page_descriptors(r.base_addr, peer.num_pages, r.page_nbytes, r.device_id))
        try:
            loaded = self._agent.add_remote_agent(peer.metadata)
            loaded = loaded.decode() if isinstance(loaded, bytes) else loaded
            if loaded != peer.agent_name:
                self._agent.remove_remote_agent(loaded)
                raise NixlError(f"metadata is for agent {loaded!r}, handshake says {peer.agent_name!r}")
            dlist = self._agent.prep_xfer_dlist(peer.agent_name, remote, peer.mem_type)
            self._peers[peer.agent_name] = (peer, dlist, offsets)
            # Connect now (at handshake), not inside the first transfer's timing.
            self._agent.make_connection(peer.agent_name)
        except self._errors as exc:
            raise NixlError(f"adding peer {peer.agent_name}: {type(exc).__name__}: {exc}") from exc

    def has_peer(self, name: str) -> bool:
        return name in self._peers

    def peer(self, name: str) -> PeerPool:
        return self._peers[name][0]

    def remove_peer(self, name: str) -> None:
        entry = self._peers.pop(name, None)
        if entry is None:
            return
        try:
            self._agent.release_dlist_handle(entry[1])
            self._agent.remove_remote_agent(name)
        except self._errors as exc:   # the peer is gone anyway; nothing left to undo
            log.warning("removing NIXL peer %s: %s: %s", name, type(exc).__name__, exc)

    # -- writes -------------------------------------------------------------------------------
    def post_write(self, peer_name: str, runs: list[Run], *, mode: str = "prepped", notif: bytes = b"",
                   pairs: list[tuple[int, int]] | None = None) -> WriteHandle:
        """Post one WRITE of ``runs`` (local pages -> the peer's pages) for every (local region,
        peer region index) of ``pairs`` (default: region 0 -> 0). Non-blocking."""
        if mode not in XFER_MODES:
            raise ValueError(f"xfer mode must be one of {XFER_MODES}, got {mode!r}")
        if not runs:
            raise ValueError("post_write needs at least one run")
        peer, remote_dlist, offsets = self._peers[peer_name]
        try:
            return self._post(peer, remote_dlist, offsets, runs, mode, notif, pairs or [(0, 0)])
        except self._errors as exc:
            raise NixlError(f"write to {peer_name}: {type(exc).__name__}: {exc}") from exc

    def _post(self, peer: PeerPool, remote_dlist: Any, offsets: list[int], runs: list[Run], mode: str,
              notif: bytes, pairs: list[tuple[int, int]]) -> WriteHandle:
        peer_name = peer.agent_name
        for src, dst in pairs:
            if self.regions[src].page_nbytes != peer.regions[dst].page_nbytes:
                raise ValueError(f"region {src} pages are {self.regions[src].page_nbytes} bytes, peer region "
                                 f"{dst} {peer.regions[dst].page_nbytes}: that pair needs staging")
        t0 = time.perf_counter()
        if mode == "prepped":
            src_idx, dst_idx = expand(runs)
            local = [i for s, _ in pairs for i in (src_idx + self.regions[s].dlist_offset).tolist()]
            remote = [i for _, d in pairs for i in (dst_idx + offsets[d]).tolist()]
            xfer = self._agent.make_prepped_xfer("WRITE", self._local_dlist, local, remote_dlist, remote, notif)
        else:
            src = [t for s, _ in pairs for t in _tuples(run_descriptors(
                runs, self.regions[s].buffer.data_ptr(), self.regions[s].page_nbytes, self.regions[s].device_id,
                side="src"))]
            dst = [t for _, d in pairs for t in _tuples(run_descriptors(
                runs, peer.regions[d].base_addr, peer.regions[d].page_nbytes, peer.regions[d].device_id,
                side="dst"))]
            xfer = self._agent.initialize_xfer("WRITE", self._agent.get_xfer_descs(src, self.mem_type),
                                               self._agent.get_xfer_descs(dst, peer.mem_type), peer_name, notif)
        num_pages = sum(r.num_pages for r in runs)
        kv_bytes = num_pages * sum(self.regions[s].page_nbytes for s, _ in pairs)
        return self._start(xfer, peer_name, kv_bytes, len(runs) * len(pairs), t0, time.perf_counter())

    def post_descs(self, peer_name: str, src: list[tuple[int, int, int]], dst: list[tuple[int, int, int]],
                   staging: tuple[int, int] | None = None) -> WriteHandle:
        """Post one WRITE of explicit (address, nbytes, device) descriptors: local (pools or the
        staging buffer) -> the peer's pools. Used for relayouts staged by ``tp_map``."""
        peer = self._peers[peer_name][0]
        t0 = time.perf_counter()
        try:
            xfer = self._agent.initialize_xfer("WRITE", self._agent.get_xfer_descs(src, self.mem_type),
                                               self._agent.get_xfer_descs(dst, peer.mem_type), peer_name, b"")
            handle = self._start(xfer, peer_name, sum(d[1] for d in src), len(src), t0, time.perf_counter())
        except self._errors as exc:
            raise NixlError(f"write to {peer_name}: {type(exc).__name__}: {exc}") from exc
        handle.staging = staging
        return handle

    def _start(self, xfer: Any, peer_name: str, kv_bytes: int, num_descriptors: int, t0: float,
               t1: float) -> WriteHandle:
        status = self._agent.transfer(xfer)
        if status == "ERR":
            self.release(xfer)
            raise NixlError(f"NIXL refused to post a write to {peer_name}")
        return WriteHandle(xfer=xfer, peer=peer_name, kv_bytes=kv_bytes, num_descriptors=num_descriptors,
                           setup_us=(t1 - t0) * 1e6, posted_at=t0)

    def state(self, handle: WriteHandle) -> str:
        """"DONE" | "PROC" | "ERR" (a raised NIXL error, e.g. the remote disconnected, is "ERR")."""
        try:
            return self._agent.check_xfer_state(handle.xfer)
        except self._errors as exc:
            log.warning("NIXL write to %s: %s: %s", handle.peer, type(exc).__name__, exc)
            return "ERR"

    def desc_count(self, handle: WriteHandle) -> int:
        """Descriptors NIXL actually used (after its merging); -1 without telemetry."""
        if not self.capture_telemetry or not hasattr(self._agent, "get_xfer_telemetry"):
            return -1
        try:
            return int(self._agent.get_xfer_telemetry(handle.xfer).descCount)
        except self._errors as exc:   # telemetry is diagnostics only; never fail a transfer on it
            log.debug("no NIXL telemetry: %s", exc)
            return -1

    def release(self, xfer: Any) -> bool:
        """Free a transfer handle (NIXL cancels it if still active). False if it could not be freed
        yet; it is then kept and retried on the next call."""
        pending, self._stuck = self._stuck + [xfer], []
        ok = True
        for h in pending:
            try:
                self._agent.release_xfer_handle(h)
            except self._errors as exc:
                log.warning("releasing NIXL transfer handle failed (%s); will retry", exc)
                self._stuck.append(h)
                ok = ok and h is not xfer
        return ok

    # -- notifications ------------------------------------------------------------------------
    def send_notif(self, peer_name: str, data: bytes) -> None:
        try:
            self._agent.send_notif(peer_name, data)
        except self._errors as exc:
            raise NixlError(f"notification to {peer_name}: {type(exc).__name__}: {exc}") from exc

    def get_notifs(self) -> dict[str, list[bytes]]:
        """New notifications since the last call: {sender agent name: [message, ...]}."""
        notifs = self._agent.get_new_notifs()
        return {(k.decode() if isinstance(k, bytes) else k): v for k, v in notifs.items()}

    def close(self) -> None:
        for name in list(self._peers):
            self.remove_peer(name)
        self._agent.release_dlist_handle(self._local_dlist)
        for h in self._stuck:
            try:
                self._agent.release_xfer_handle(h)
            except self._errors as exc:
                log.warning("NIXL handle still active at close: %s", exc)
        self._stuck = []
        for reg in self._regs + ([self._staging_reg] if self._staging_reg is not None else []):
            self._agent.deregister_memory(reg)


def _tuples(rows) -> list[tuple[int, int, int]]:
    """``[n, 3]`` uint64 rows -> (address, nbytes, device id) tuples: the form every NIXL release takes."""
    return [tuple(r) for r in rows.tolist()]


def _local_regions(buffers: list[torch.Tensor], page_nbytes: list[int]) -> list[LocalRegion]:
    regions, offset = [], 0
    for buf, size in zip(buffers, page_nbytes):
        if not buf.is_contiguous():
            raise ValueError("a KV pool buffer must be contiguous to be registered")
        nbytes = buf.numel() * buf.element_size()
        if nbytes % size:
            raise ValueError(f"buffer of {nbytes} bytes is not a whole number of {size}-byte pages")
        regions.append(LocalRegion(buf, size, nbytes // size, device_id_of(buf.device), offset))
        offset += nbytes // size
    return regions


def pool_info(agent: NixlAgent, pools: PoolSet) -> PoolInfo:
    """The handshake's description of ``pools`` as ``agent`` registered them."""
    regions = [RegionInfo(rank=m.rank, base_addr=r.buffer.data_ptr(), page_nbytes=r.page_nbytes,
                          device_id=r.device_id, kv_start=m.kv_start, kv_count=m.kv_count, dp_group=m.dp_group)
               for m, r in zip(pools.ranks, agent.regions)]
    return PoolInfo(agent_name=agent.name, num_pages=pools.num_pages, device_kind=pools.device.type,
                    regions=regions)


def agent_name(role: str) -> str:
    return f"{role}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
