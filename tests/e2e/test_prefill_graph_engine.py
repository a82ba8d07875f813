"""The engine loop through the CUDA-graph paths (decode and prefill graphs' padded static steps,
run eagerly on CPU through the Triton interpreter) gives the tokens of the plain eager engine.
Chunked prompts arriving while others decode make mixed steps; overlap scheduling makes their
decode rows FUTURE_TOKEN inputs, filled on the device inside the prefill graph's buffers."""

from __future__ import annotations

import json

import pytest

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": 512, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32", "tie_word_embeddings": False}
PROMPTS = [list(range(3, 26)), list(range(40, 49)), list(range(60, 97))]  # 23, 9 and 37 tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    (folder / "config.json").write_text(json.dumps(TINY))
    return folder


def _runner(model_dir, graphs: bool):
    from pdserve.config import engine_config
    from pdserve.runtime.cuda_graph import CudaGraphRunner
    from pdserve.runtime.model_runner import ModelRunner
    from pdserve.runtime.prefill_graph import PrefillGraphRunner

    cfg = engine_config(model_path=str(model_dir), load_format="dummy", dtype="float32", device="cpu",
                        attention_backend="triton", max_total_tokens=1024, page_size=4, context_length=256,
                        chunked_prefill_size=16, max_prefill_tokens=24, disable_radix_cache=True)
    runner = ModelRunner(cfg)
    if graphs:
        runner.graphs = CudaGraphRunner(runner, 4, emulate=True)
        runner.prefill_graphs = PrefillGraphRunner(runner, 32, 4, emulate=True)
        runner.graphs.capture()
        runner.prefill_graphs.capture()
    return runner


def _generate(runner) -> list[list[int]]:
    from pdserve.runtime.engine import EngineCore
    from pdserve.sampling_params import SamplingParams

    core = EngineCore(runner.cfg, runner, overlap=True)
    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    reqs = [core.add_request("r0", PROMPTS[0], params)]
    for _ in range(3):  # r0's chunks, then its first decode step; the others arrive while it decodes
        core.step()
    reqs += [core.add_request(f"r{i}", p, params) for i, p in enumerate(PROMPTS[1:], start=1)]
    while core.has_work:
        core.step()
    core.drain()
    assert core.kv.num_free == core.kv.num_pages  # nothing leaked
    return [r.output_ids for r in reqs]


def test_engine_through_graph_paths_matches_eager(model_dir):
    graphed = _runner(model_dir, graphs=True)
    calls = {"prefill": 0, "prefill_future": 0, "decode": 0}
    prefill_run, decode_run = graphed.prefill_graphs.run, graphed.graphs.run

    def count_prefill(seqs, future=None, tokens=None):
        calls["prefill"] += 1
        calls["prefill_future"] += bool(future)
        return prefill_run(seqs, future, tokens)

    def count_decode(*args, **kwargs):
        calls["decode"] += 1
        return decode_run(*args, **kwargs)

    graphed.prefill_graphs.run, graphed.graphs.run = count_prefill, count_decode
    got = _generate(graphed)
    expected = _generate(_runner(model_dir, graphs=False))
    assert got == expected and all(len(out) == 6 for out in got)
    assert calls["prefill"] >= 3 and calls["decode"] >= 3
    assert calls["prefill_future"] >= 1  # a mixed step whose decode row was still being sampled
