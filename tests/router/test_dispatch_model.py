"""Conditional disaggregation and n > 1 with the real SmolLM2: one real `pdserve up` (Redis, a prefill
and a decode node, the router), the official openai client, greedy outputs compared with the
colocated engine's on the same token ids."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from pdserve.redis_server import free_port

from .test_dispatch_paths import dispatch_counts as parse_dispatch_counts

pytestmark = pytest.mark.slow

MIN_PREFILL_TOKENS = 48
NEW_TOKENS = 12
TEXT = ("The history of the city begins with a small settlement on the river, where traders met to exchange "
        "grain, salt and wool. Over the centuries the market grew into a town with walls, a cathedral and a "
        "university, and its bridges carried travellers between the northern and southern provinces. ")


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("up")
    port = free_port()
    with open(log_dir / "up.out", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pdserve", "up", "--prefill", "1", "--decode", "1",
                                 "--port", str(port), "--log-dir", str(log_dir), "--max-total-tokens", "4096",
                                 "--disagg-min-prefill-tokens", str(MIN_PREFILL_TOKENS)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"pdserve up exited with {proc.returncode}: {(log_dir / 'up.out').read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("pdserve up not healthy after 300 s")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def prompts(smollm2_path):
    from pdserve.tokenizer import load_tokenizer
    ids = load_tokenizer(smollm2_path).encode(TEXT * 4)
    short, long, fresh = ids[:20], ids[:200], ids[7:207]    # fresh: no node has seen it before the n=3 test
    assert len(short) < MIN_PREFILL_TOKENS and len(long) == len(fresh) == 200
    return short, long, fresh


@pytest.fixture(scope="module")
def colocated(smollm2_path, prompts):
    """The colocated engine's greedy text for each prompt (the oracle)."""
    from pdserve.runtime.engine import Engine
    engine = Engine(model_path=smollm2_path, max_total_tokens=4096, cpu_threads=1)
    try:
        results = engine.generate(list(prompts), {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True})
    finally:
        engine.close()
    return [r["text"] for r in results]


def dispatch_counts(url: str) -> dict[tuple[str, str], float]:
    return parse_dispatch_counts(httpx.get(url + "/metrics", timeout=5).text)


def complete(client: openai.OpenAI, ids: list[int], n: int = 1):
    return client.completions.create(model="smollm2", prompt=ids, n=n, max_tokens=NEW_TOKENS, temperature=0,
                                     extra_body={"ignore_eos": True})


def test_short_prompt_direct_long_prompt_disaggregated_same_tokens_as_colocated(up, prompts, colocated):
    client = openai.OpenAI(base_url=up + "/v1", api_key="none", max_retries=0, timeout=120)
    before = dispatch_counts(up)
    short = complete(client, prompts[0])
    after_short = dispatch_counts(up)
    long = complete(client, prompts[1])
    after_long = dispatch_counts(up)
    assert [short.choices[0].text, long.choices[0].text] == colocated[:2]
    assert after_short.get(("direct", "short_prompt"), 0) - before.get(("direct", "short_prompt"), 0) == 1
    assert after_long.get(("disagg", "prefill_pool"), 0) - after_short.get(("disagg", "prefill_pool"), 0) == 1


def test_n3_prefills_once_and_the_others_reuse_the_decode_nodes_cache(up, prompts, colocated):
    client = openai.OpenAI(base_url=up + "/v1", api_key="none", max_retries=0, timeout=120)
    before = dispatch_counts(up)
    resp = complete(client, prompts[2], n=3)
    after = dispatch_counts(up)
    assert sorted(c.index for c in resp.choices) == [0, 1, 2]
    assert [c.text for c in sorted(resp.choices, key=lambda c: c.index)] == [colocated[2]] * 3
    assert after.get(("disagg", "prefill_pool"), 0) - before.get(("disagg", "prefill_pool"), 0) == 1
    assert after.get(("direct", "shared_prefix"), 0) - before.get(("direct", "shared_prefix"), 0) == 2
    # a follower's prompt came from the decode node's prefix cache: all 12 full pages of 16 tokens
    assert resp.usage.prompt_tokens == 200 and resp.usage.prompt_tokens_details.cached_tokens == 192
