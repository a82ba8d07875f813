"""`pdserve up` with a tensor-parallel decode node (prefill tp=1, decode tp=2): the router's answers
are transformers' tokens, /nodes shows the real layout, and killing one rank of the decode node
takes the node down cleanly: it leaves the registry, the router stops using it, nothing hangs."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.up_procs import start_up, stop_up

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    handle = start_up(tmp_path_factory.mktemp("up-tp"), "--prefill", "1", "--decode", "1", "--decode-tp", "2",
                      "--max-total-tokens", "8192", "--registry-ttl-s", "2", "--load-report-interval-s", "0.25",
                      num_nodes=2)
    yield handle
    stop_up(handle)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _rank_pids(node_pid: int) -> list[int]:
    """The tensor-parallel rank processes a node started (its children running tp_worker)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == node_pid and b"pdserve.runtime.tp_worker" in cmd:
            pids.append(int(stat.parent.name))
    return pids


def test_answers_are_transformers_tokens(up, parity_prompts, parity_expected, tokenizer):
    for i in (0, 3):                           # 5 and 100 prompt tokens
        reply = up.client.completions.create(model="smollm2", prompt=parity_prompts[i], temperature=0,
                                             max_tokens=len(parity_expected[i][0]), extra_body={"ignore_eos": True})
        assert reply.choices[0].text == tokenizer.decode(parity_expected[i][0])
    decode = up.nodes()["decode-0"]
    assert (decode["tp"], decode["dp"]) == (2, 1) and up.nodes()["prefill-0"]["tp"] == 1


def test_a_killed_rank_takes_its_node_down_cleanly(up):
    node_pid = up.pids()["decode-0"]
    (rank1,) = _rank_pids(node_pid)
    os.kill(rank1, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while "decode-0" in up.nodes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "decode-0" not in up.nodes(), "the router still lists the decode node"
    while _alive(node_pid) and time.monotonic() < deadline + 10:
        time.sleep(0.2)
    assert not _alive(node_pid)                # rank 0 exited too (no orphan serving half a model)
    assert "tensor-parallel rank 1" in (up.log_dir / "decode-0.log").read_text(errors="replace")
    assert httpx.get(up.url + "/health", timeout=5).status_code != 200   # no usable pair left
    start = time.monotonic()
    resp = httpx.post(up.url + "/v1/completions", json={"model": "smollm2", "prompt": "Hi", "max_tokens": 2},
                      timeout=30)
    assert resp.status_code >= 500 and "error" in resp.json() and time.monotonic() - start < 15
