"""The ranks of a tensor-parallel node, as rank 0 drives them.

Rank 0 (the node process) spawns ranks 1..N-1 (``worker_main``), each of which loads its shard
of the weights on its own device and joins the node's process group. Each step, rank 0
broadcasts a typed ``RankStep`` over the gloo control group and every rank runs the same forward
(the layers' collectives meet inside it); only rank 0 samples. A rank that dies takes the node
down: rank 0 raises ``RankLost`` (a ``SystemExit``, so no ``except Exception`` swallows it), the
node deregisters and exits, and the others' collectives fail on the closed connection.

KV pools: rank 0 allocates every rank's pool (a /dev/shm file on CPU, each rank's own device on
GPU) and hands each worker its own (``PoolHandOver``: the file's path, or a CUDA IPC handle).
Rank 0 can then register all of them with its one NIXL agent, so a transfer reaches every rank's
KV heads without an agent per rank (``transfer/tp_map.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import subprocess
import sys

import msgspec
import torch

from pdserve.config import EngineConfig
from pdserve.runtime.forward import SeqChunk

log = logging.getLogger(__name__)


class RankStep(msgspec.Struct, tag="step", kw_only=True):
    """One forward, as every rank must run it."""
    groups: list[list[SeqChunk]]            # one list per DP attention group (one without DP)
    future: list[tuple[int, int]] = []      # (token index, row of the previous step's samples)
    future_len: int = 0                     # rows of those samples, broadcast right after this


class RankShutdown(msgspec.Struct, tag="shutdown", kw_only=True):
    reason: str




class RankLost(SystemExit):
    """A rank of this node died: the node cannot run another step and must stop."""


def free_init_method(addr: str | None) -> str:
    """``tcp://host:port`` for the rendezvous: ``--dist-init-addr`` or a free local port."""
    if addr:
        return f"tcp://{addr}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def cpu_threads_per_rank(world_size: int) -> int:
    """Each rank's share of the cores when --cpu-threads is not given (CPU ranks share one box)."""
    return max(1, (os.cpu_count() or 1) // world_size)


class WorkerSpec(msgspec.Struct, kw_only=True):
    """What a rank process is started with (JSON on its command line)."""
    cfg: EngineConfig
    role: str
    rank: int
    init_method: str


class PoolHandOver(msgspec.Struct, tag="pools", kw_only=True):
    """Rank 0 -> every rank, once: where each rank's KV pool buffer lives. ``shm``: a file in
    /dev/shm per rank (unlinked by rank 0 once mapped); ``cuda_ipc``: torch's IPC rebuild args."""
    kind: str
    handles: list[bytes]    # per rank 1..N-1


RankMessage = RankStep | RankShutdown | PoolHandOver
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(RankMessage)


class RankGroup:
    """Rank 0's handle on ranks 1..N-1: start, hand over pools, broadcast steps, watch liveness.

    Ranks are plain subprocesses (``python -m pdserve.runtime.tp_worker``), not multiprocessing
    children, so a user script that builds ``Engine(tp=2)`` needs no ``__main__`` guard."""

    def __init__(self, cfg: EngineConfig, role: str, world_size: int, init_method: str) -> None:
        from pdserve.redis_server import die_with_parent

        self.procs: list[subprocess.Popen] = []
        for rank in range(1, world_size):
            spec = WorkerSpec(cfg=cfg, role=role, rank=rank, init_method=init_method)
            self.procs.append(subprocess.Popen([sys.executable, "-m", "pdserve.runtime.tp_worker",
                                                msgspec.json.encode(spec).decode()], preexec_fn=die_with_parent))
        self.control = None   # the gloo group, once joined
        self.closed = False

    def hand_over(self, buffers: list[torch.Tensor], paths: list[str | None]) -> None:
        """Give rank r its pool: ``buffers[r - 1]`` through CUDA IPC, or the shared CPU file
        ``paths[r - 1]`` (collective with ``take_pool``)."""
        from pdserve.runtime.parallel import broadcast_bytes

        if buffers[0].device.type == "cuda":
            from torch.multiprocessing.reductions import reduce_tensor
            msg = PoolHandOver(kind="cuda_ipc", handles=[pickle.dumps(reduce_tensor(b)[1]) for b in buffers])
            broadcast_bytes(_encoder.encode(msg), self.control)
            return
        msg = PoolHandOver(kind="shm", handles=[path.encode() for path in paths])
        broadcast_bytes(_encoder.encode(msg), self.control)

    def check(self) -> None:
        for rank, proc in enumerate(self.procs, start=1):
            if proc.poll() is not None:
                raise RankLost(f"pdserve: error: tensor-parallel rank {rank} (pid {proc.pid}) exited with "
                               f"code {proc.returncode}; stopping the node")

    def broadcast(self, msg: msgspec.Struct) -> None:
        from pdserve.runtime.parallel import broadcast_bytes

        self.check()
        try:
            broadcast_bytes(_encoder.encode(msg), self.control)
        except RuntimeError as exc:  # gloo: a peer closed its connection
            self.check()
            raise RankLost(f"pdserve: error: a tensor-parallel rank stopped answering ({exc}); stopping the node")

    @contextlib.contextmanager
    def fatal(self, what: str):
        """Errors inside a step that the other ranks run too are the node's end: after a failed
        collective the ranks no longer agree on what comes next."""
        try:
            yield
        except RankLost:
            raise
        except Exception as exc:
            self.check()
            raise RankLost(f"pdserve: error: tensor-parallel {what} failed on rank 0 "
                           f"({type(exc).__name__}: {exc}); stopping the node") from exc

    def close(self, reason: str = "node stopping") -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self.control is not None and all(p.poll() is None for p in self.procs):
                self.broadcast(RankShutdown(reason=reason))
        except (RankLost, RuntimeError):
            pass  # a rank is already gone: the others are stopped below
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait(timeout=5)


def take_pool(control, rank: int) -> torch.Tensor:
    """Ranks 1..N-1: the buffer rank 0 allocated for this rank (collective with ``hand_over``)."""
    from pdserve.runtime.parallel import broadcast_bytes

    msg = _decoder.decode(broadcast_bytes(None, control))
    if not isinstance(msg, PoolHandOver):
        raise RuntimeError(f"rank {rank}: expected the KV pool hand-over, got {type(msg).__name__}")
    handle = msg.handles[rank - 1]
    if msg.kind == "cuda_ipc":
        from torch.multiprocessing.reductions import rebuild_cuda_tensor
        return rebuild_cuda_tensor(*pickle.loads(handle))
    return handle.decode()


def receive_step(control) -> RankMessage:
    from pdserve.runtime.parallel import broadcast_bytes

    return _decoder.decode(broadcast_bytes(None, control))


def worker_main(spec: WorkerSpec) -> None:
    """Process entry of ranks 1..N-1: load the shard, take the pool, run steps until shutdown."""
    from pdserve.runtime.model_runner import ModelRunner

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{spec.rank} %(levelname)s %(name)s: %(message)s")
    runner = ModelRunner(spec.cfg, spec.role, rank=spec.rank, init_method=spec.init_method)
    try:
        runner.serve_rank()
    except RuntimeError as exc:  # rank 0 went away mid-collective
        log.error("rank %d stopping: %s", spec.rank, exc)
        os._exit(1)
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    worker_main(msgspec.json.decode(sys.argv[1], type=WorkerSpec))
