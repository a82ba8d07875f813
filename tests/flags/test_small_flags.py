"""The small seed flags, each doing what it says: --stream-interval, --enable-nan-detection,
--enable/--disable-mixed-chunk (engine and scheduler, in process) and --watchdog-timeout,
--skip-server-warmup, --base-gpu-id/--gpu-id-step, --num-continuous-decode-steps (real node
processes, a real redis-server)."""

from __future__ import annotations

import time

import pytest
import torch
import zmq

from pdserve.config import SchedulerConfig
from pdserve.protocol import GenerateReq, decode_router_message, encode
from pdserve.runtime.kv_manager import KVManager
from pdserve.runtime.request import Request
from pdserve.runtime.scheduler import Scheduler
from pdserve.sampling_params import SamplingParams
from tests.node_procs import start_serve, stop, wait_ready

GREEDY = {"temperature": 0, "ignore_eos": True}


# -- --enable-mixed-chunk / --disable-mixed-chunk (scheduler, no model) ------------------------

def _scheduler(**cfg) -> Scheduler:
    cfg = {"chunked_prefill_size": 16, "max_prefill_tokens": 64, **cfg}
    return Scheduler(SchedulerConfig(**cfg), KVManager(64, 4), max_running=8, max_seq_len=4096)


def _run(s: Scheduler):
    step = s.schedule()
    s.commit(step, {i: (7, None, None) for i, seq in enumerate(step.seqs) if seq.need_logits})
    return step


def _req(rid: str, n: int) -> Request:
    return Request(rid=rid, prompt_ids=list(range(1, n + 1)), params=SamplingParams(max_new_tokens=8, temperature=0))


@pytest.mark.parametrize("flags", [{}, {"enable_mixed_chunk": True}])
def test_mixed_chunk_is_the_default(flags):
    s = _scheduler(**flags)
    s.add(_req("a", 5))
    _run(s)                      # a prefilled, now decoding
    s.add(_req("b", 5))
    step = _run(s)
    assert [(r.rid, seq.num_new_tokens) for r, seq in zip(step.reqs, step.seqs)] == [("a", 1), ("b", 5)]


def test_disable_mixed_chunk_runs_prefill_alone_first():
    s = _scheduler(disable_mixed_chunk=True)
    s.add(_req("a", 5))
    _run(s)
    s.add(_req("b", 40))         # three chunks of 16
    kinds = [[(r.rid, seq.num_new_tokens) for r, seq in zip(step.reqs, step.seqs)]
             for step in (_run(s), _run(s), _run(s), _run(s))]
    assert kinds == [[("b", 16)], [("b", 16)], [("b", 8)], [("a", 1), ("b", 1)]]


# -- --stream-interval and --enable-nan-detection (the engine, SmolLM2) --------------------------

@pytest.fixture(scope="module")
def runner(smollm2_path):
    from pdserve.config import engine_config
    from pdserve.runtime.model_runner import ModelRunner
    return ModelRunner(engine_config(model_path=smollm2_path, max_total_tokens=1024, cpu_threads=1,
                                     enable_nan_detection=True))


def _core(runner, **flags):
    import dataclasses

    from pdserve.runtime.engine import EngineCore
    cfg = runner.cfg
    cfg = dataclasses.replace(cfg, scheduler=dataclasses.replace(cfg.scheduler, **flags)) if flags else cfg
    return EngineCore(cfg, runner)


def _deltas(core, rids) -> dict[str, list]:
    out = {rid: [] for rid in rids}
    while core.has_work:
        for o in core.step():
            out[o.rid].append(o)
    core.drain()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("interval,sizes", [(1, [1] * 10), (4, [4, 4, 2])])
def test_stream_interval_batches_tokens_per_delta(runner, interval, sizes):
    core = _core(runner, stream_interval=interval)
    core.add_request("r", list(range(1, 9)), SamplingParams(max_new_tokens=10, **GREEDY))
    deltas = _deltas(core, ["r"])["r"]
    assert [len(d.token_ids) for d in deltas] == sizes and deltas[-1].finished


@pytest.mark.slow
def test_nan_logits_fail_the_request_with_an_error(runner):
    """One token's embedding row poisoned with NaN (a copy: SmolLM2 ties it to the LM head, which
    keeps the clean row): the request holding it fails with an error; the engine goes on."""
    embed = runner.model.model.embed_tokens
    clean, poisoned = embed.weight, 4242
    try:
        bad_rows = clean.detach().clone()
        bad_rows[poisoned] = float("nan")
        embed.weight = torch.nn.Parameter(bad_rows, requires_grad=False)
        core = _core(runner)
        core.add_request("bad", [1, 2, poisoned, 3], SamplingParams(max_new_tokens=4, **GREEDY))
        deltas = _deltas(core, ["bad"])
        # the next request (on the pages the failed one gave back) is unharmed
        core.add_request("good", [1, 2, 3, 4], SamplingParams(max_new_tokens=4, **GREEDY))
        deltas.update(_deltas(core, ["good"]))
    finally:
        embed.weight = clean
    bad, good = deltas["bad"][-1], deltas["good"][-1]
    assert bad.finished and "NaN or inf logits" in bad.error and sum(len(d.token_ids) for d in deltas["bad"]) == 0
    assert good.error is None and sum(len(d.token_ids) for d in deltas["good"]) == 4
    assert core.kv.num_free + core.kv.cache.num_pages == core.kv.num_pages   # nothing leaked


# -- node processes: the watchdog, the warm-up, --base-gpu-id, --num-continuous-decode-steps ----

class _Client:
    def __init__(self) -> None:
        self.ctx = zmq.Context.instance()
        self.pull = self.ctx.socket(zmq.PULL)
        self.addr = f"tcp://127.0.0.1:{self.pull.bind_to_random_port('tcp://127.0.0.1')}"
        self.push = self.ctx.socket(zmq.PUSH)

    def generate(self, node: dict, rid: str, ids: list[int], params: SamplingParams) -> None:
        self.push.connect(node["addr"])
        self.push.send(encode(GenerateReq(rid=rid, input_ids=ids, sampling=params, reply_to=self.addr)))

    def collect(self, timeout_s: float = 60) -> list:
        outs = []
        while not outs or outs[-1].finish_reason is None:
            assert self.pull.poll(int(timeout_s * 1000)), "no reply from the node"
            outs.append(decode_router_message(self.pull.recv()))
        return outs

    def close(self) -> None:
        self.push.close(linger=0)
        self.pull.close(linger=0)


@pytest.mark.slow
def test_stuck_step_kills_the_node_and_its_record_goes_at_once(smollm2_path, redis_server):
    """A 600-token prefill takes longer than a 50 ms watchdog on CPU: the node deletes its registry
    record (routers drop it now, not after the TTL) and exits with EXIT_STUCK."""
    from pdserve.registry import RegistryView
    from pdserve.runtime.watchdog import EXIT_STUCK

    proc, log_path = start_serve(smollm2_path, redis_server.url, "--watchdog-timeout", "0.05",
                            "--chunked-prefill-size", "1024", "--max-prefill-tokens", "1024")
    view = RegistryView(redis_server.url, scan_interval_s=0.2).start()
    client = _Client()
    try:
        node = wait_ready(proc, log_path)
        assert view.wait_for(lambda nodes: node["node_id"] in nodes, 10)
        client.generate(node, "stuck", list(range(1, 601)), SamplingParams(max_new_tokens=2, **GREEDY))
        assert proc.wait(30) == EXIT_STUCK
        exited = time.monotonic()
        assert view.wait_for(lambda nodes: node["node_id"] not in nodes, 10)
        assert time.monotonic() - exited < 1.5   # deregistered, not expired (TTL 3 s)
        log = open(log_path).read()
        assert "watchdog: a step has run" in log and "warm-up forward" in log
    finally:
        client.close()
        view.stop()
        stop(proc)


@pytest.mark.slow
def test_node_flags_skip_warmup_gpu_ids_and_continuous_steps(smollm2_path, redis_server):
    proc, log_path = start_serve(smollm2_path, redis_server.url, "--skip-server-warmup", "--base-gpu-id", "1",
                            "--gpu-id-step", "2", "--num-continuous-decode-steps", "4", "--stream-interval", "3")
    client = _Client()
    try:
        node = wait_ready(proc, log_path)
        client.generate(node, "r", list(range(1, 9)), SamplingParams(max_new_tokens=7, **GREEDY))
        outs = client.collect()
        assert [len(o.token_ids) for o in outs] == [3, 3, 1] and outs[-1].finish_reason == "length"
        log = open(log_path).read()
        assert "warm-up forward" not in log
        assert "--base-gpu-id/--gpu-id-step ignored: running on cpu" in log
    finally:
        client.close()
        stop(proc)
