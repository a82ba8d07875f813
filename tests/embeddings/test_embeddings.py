"""--is-embedding: pooled final hidden states of SmolLM2 against transformers' own, in the engine
and through the real router (real redis-server, a real node process, the official openai client)."""

from __future__ import annotations

import time

import pytest
import torch

from tests.node_procs import start_serve, stop


TEXTS = ["The capital of France is", "Hello!", "Books became cheaper, literacy spread, and ideas travelled faster."]


def hf_embedding(hf_model, ids: list[int], pooling: str) -> torch.Tensor:
    """transformers' final-normed hidden states of ``ids``, pooled and L2-normalized: the oracle."""
    with torch.no_grad():
        hidden = hf_model.model(torch.tensor([ids])).last_hidden_state[0].float()   # [T, H]
    vec = hidden[-1] if pooling == "last" else hidden.mean(dim=0)
    return torch.nn.functional.normalize(vec, dim=-1)


@pytest.fixture(scope="module")
def runner(smollm2_path):
    from pdserve.config import engine_config
    from pdserve.runtime.model_runner import ModelRunner
    return ModelRunner(engine_config(model_path=smollm2_path, is_embedding=True, max_total_tokens=1024,
                                     page_size=16, cpu_threads=1))


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_engine_embeddings_match_transformers(runner, hf_smollm2, pooling):
    from pdserve.protocol import EmbedReq
    from pdserve.runtime.embedding import Embedder
    from pdserve.runtime.kv_manager import KVManager

    kv = KVManager(runner.pool.num_pages, 16, enable_prefix_cache=False)
    inputs = [runner.tokenizer.encode(t) for t in TEXTS]
    # a 10-token forward budget splits the three inputs over several forwards
    out = Embedder(runner, pooling, max_batch_tokens=10).handle(EmbedReq(rid="e", inputs=inputs, reply_to=""), kv)
    assert out.error is None and out.prompt_tokens == sum(map(len, inputs))
    for ids, vec in zip(inputs, out.embeddings):
        ours = torch.tensor(vec)
        assert abs(ours.norm().item() - 1.0) < 1e-5
        assert torch.allclose(ours, hf_embedding(hf_smollm2, ids, pooling), atol=2e-4)
    assert kv.num_free == kv.num_pages   # every page given back


@pytest.mark.slow
def test_engine_refuses_bad_inputs_with_400(runner):
    from pdserve.protocol import EmbedReq
    from pdserve.runtime.embedding import Embedder
    from pdserve.runtime.kv_manager import KVManager

    kv = KVManager(runner.pool.num_pages, 16, enable_prefix_cache=False)
    emb = Embedder(runner, "last", max_batch_tokens=256)
    for inputs, words in (([[]], "at least one token"), ([[runner.vocab_size]], "out of range"),
                          ([[1] * (runner.context_length + 1)], "context length")):
        out = emb.handle(EmbedReq(rid="e", inputs=inputs, reply_to=""), kv)
        assert out.error_code == 400 and words in out.error and not out.embeddings
    assert kv.num_free == kv.num_pages


def wait_for(predicate, timeout_s: float, proc, log_path: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc.poll() is not None:
            raise RuntimeError(f"node exited: {open(log_path).read()[-3000:]}")
        assert time.monotonic() < deadline, open(log_path).read()[-3000:]
        time.sleep(0.1)


@pytest.mark.slow
def test_router_embeddings_through_openai_client(smollm2_path, hf_smollm2, tokenizer, redis_server):
    import openai

    from tests.router.util import RouterHarness, make_router

    node, log_path = start_serve(smollm2_path, redis_server.url, "--is-embedding")
    router = make_router(tokenizer, redis_server.url)
    harness = RouterHarness(router).start()
    try:
        wait_for(lambda: any(n.is_embedding for n in router.nodes().values()), 120, node, log_path)
        client = openai.OpenAI(base_url=harness.url + "/v1", api_key="none", max_retries=0)
        for fmt in (openai.NOT_GIVEN, "float"):   # not given: the client asks for base64 and decodes it
            res = client.embeddings.create(model="smollm2", input=TEXTS, encoding_format=fmt)
            assert [d.index for d in res.data] == [0, 1, 2]
            for text, item in zip(TEXTS, res.data):
                ref = hf_embedding(hf_smollm2, tokenizer.encode(text), "last")
                assert torch.allclose(torch.tensor(item.embedding), ref, atol=2e-4)
        ids = tokenizer.encode(TEXTS[0])
        assert res.usage.prompt_tokens == sum(len(tokenizer.encode(t)) for t in TEXTS)
        by_ids = client.embeddings.create(model="smollm2", input=ids, encoding_format="float")
        assert torch.allclose(torch.tensor(by_ids.data[0].embedding), torch.tensor(res.data[0].embedding), atol=1e-6)
        with pytest.raises(openai.BadRequestError, match="embeddings only"):
            client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=4)
        with pytest.raises(openai.BadRequestError, match="context length"):
            client.embeddings.create(model="smollm2", input=[[1] * 9000])
        with pytest.raises(openai.BadRequestError, match="input"):
            client.embeddings.create(model="smollm2", input=[])
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model="other", input="x")
    finally:
        harness.stop()
        stop(node)
    assert "Traceback" not in open(log_path).read()


def test_embeddings_without_an_embedding_node_is_a_400(tokenizer, redis_server):
    """A registry that only holds a generation node: /v1/embeddings is a 400 naming the flag (the
    node record is real in Redis; the router never needs to reach it)."""
    import openai

    from pdserve.registry import NodeRegistrar
    from tests.router.util import RouterHarness, make_info, make_router

    registrar = NodeRegistrar(redis_server.url, make_info("gen-1", role="colocated", addr="tcp://127.0.0.1:1")).start()
    router = make_router(tokenizer, redis_server.url)
    harness = RouterHarness(router).start()
    try:
        deadline = time.monotonic() + 10
        while not router.nodes():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        client = openai.OpenAI(base_url=harness.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="--is-embedding"):
            client.embeddings.create(model="smollm2", input="Hello")
    finally:
        harness.stop()
        registrar.stop()
