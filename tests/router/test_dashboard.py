"""The live cluster page in a real headless browser (Debian's chromium; `make test` installs it).

A real router (uvicorn, real redis-server) over loopback nodes serves ``/dashboard``; chromium
loads it, its script polls ``/dashboard/data``, and the DOM it built must list the nodes that are
up (and not one that left); the screenshot must be a real rendering, not a blank page.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest

from pdserve.config import DispatchConfig

from .test_flow import Cluster

pytestmark = pytest.mark.slow


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("chromium is not installed and could not be (`make test` runs `apt-get install -y chromium`)")


def run_chromium(url: str, *args: str) -> subprocess.CompletedProcess:
    # --virtual-time-budget: the page's timers and fetches run until 4 s of virtual time have passed.
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--virtual-time-budget=4000", "--window-size=1280,1000", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def cluster(tokenizer, redis_server):
    c = Cluster(tokenizer, redis_server.url, prefill=("p0", "p1"), decode=("d0",),
                dispatch=DispatchConfig(slo="ttft=1.0,tpot=0.05"))
    yield c
    c.close()


def test_data_endpoint_reports_pools_nodes_latency_and_plan(cluster):
    r = cluster.http.post("/v1/completions", json={"prompt": "word " * 20, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200
    data = cluster.http.get("/dashboard/data").json()
    assert {n["node_id"] for n in data["nodes"]} == {"p0", "p1", "d0"}
    assert data["pools"]["prefill"]["nodes"] == 2 and data["pools"]["decode"]["nodes"] == 1
    assert data["latency"]["ttft"]["count"] == 1 and data["latency"]["itl"]["count"] == 5
    assert data["transfers"]["count"] == 1 and data["transfers"]["kv_bytes"] > 0
    assert data["paths"] == {"disagg": 1}
    assert data["plan"]["prefill_nodes"] >= 1 and data["slo"] == {"ttft": 1.0, "tpot": 0.05}


def test_dashboard_in_headless_chromium_shows_the_nodes_that_are_up(cluster, tmp_path):
    cluster.http.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 4, "temperature": 0})
    cluster.nodes["p1"].stop()                                 # left: must not be shown
    deadline = time.monotonic() + 5
    while "p1" in cluster.router.nodes() and time.monotonic() < deadline:
        time.sleep(0.05)
    url = cluster.harness.url + "/dashboard"
    dom = run_chromium(url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert 'id="node-p0"' in html and 'id="node-d0"' in html, html[-3000:]
    assert 'id="node-p1"' not in html
    assert "HTTP " not in html.split('id="error"')[1][:40]    # the poll succeeded
    assert "decode nodes needed" in html                       # the planner panel rendered

    shot = tmp_path / "dashboard.png"
    res = run_chromium(url, f"--screenshot={shot}")
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    from PIL import Image
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 1000)
    colors = img.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50              # text, tables, bars: not a blank page
    assert shot.stat().st_size > 20_000
    print(json.dumps({"screenshot_bytes": shot.stat().st_size, "colors": len(colors)}))


def test_pdserve_plan_reads_the_routers_window(cluster):
    import sys
    for _ in range(3):
        cluster.http.post("/v1/completions", json={"prompt": "word " * 20, "max_tokens": 6, "temperature": 0})
    cmd = [sys.executable, "-m", "pdserve", "plan", "--base-url", cluster.harness.url]
    out = subprocess.run([*cmd, "--slo", "ttft=1.0,tpot=0.05"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "prefill nodes: need 1 (have 2)" in out.stdout and "decode nodes:  need 1 (have 1)" in out.stdout
    plan = json.loads(subprocess.run([*cmd, "--slo", "ttft=0.0001,tpot=0.05", "--json"], capture_output=True,
                                     text=True, timeout=60).stdout)
    assert plan["prefill_nodes"] is None and "no node count meets it" in plan["notes"][0]
    bad = subprocess.run([*cmd, "--slo", "ttft=1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--slo: give both ttft and tpot" in bad.stderr
