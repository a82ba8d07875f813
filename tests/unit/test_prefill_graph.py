"""Prefill CUDA graphs: token buckets and packed inputs (plain functions), and the padded static
step run eagerly (CPU has no graphs; Triton kernels through the interpreter) against the eager
step: same logits, same pool, padding writes no page, FUTURE_TOKEN inputs filled on the device."""

from __future__ import annotations

import pytest
import torch

from pdserve.runtime.cuda_graph import PAD_SLOT, bucket_for
from pdserve.runtime.forward import FUTURE_TOKEN, SeqChunk, build_forward_batch
from pdserve.runtime.prefill_graph import PrefillGraphRunner, prefill_buckets, prefill_inputs
from test_cuda_graph_logic import _tiny_runner

MIXED = [SeqChunk("fresh", [3, 1, 4, 1, 5, 9, 2, 6, 5], 0, [0, 1, 2]),       # prompt, no prefix
         SeqChunk("chunk", [8, 9, 7, 9, 3], 6, [3, 4, 5]),                   # after 6 cached tokens
         SeqChunk("mid", [2, 7, 1, 8], 0, [6], need_logits=False),          # a prompt's first chunk
         SeqChunk("decode", [11], 13, [7, 8, 9, 10])]                      # a decode row


def test_buckets():
    assert prefill_buckets(4096) == [128 * i for i in range(1, 9)] + [256 * i for i in range(5, 16)] + [4096]
    assert prefill_buckets(100) == [100]
    assert prefill_buckets(1000) == [128 * i for i in range(1, 8)] + [1000]
    with pytest.raises(ValueError, match="--cuda-graph-max-prefill-tokens"):
        prefill_buckets(0)
    buckets = prefill_buckets(2048)
    assert bucket_for(1, buckets) == 128 and bucket_for(129, buckets) == 256 and bucket_for(2049, buckets) is None


def test_packed_inputs_match_build_forward_batch_and_pad():
    packed, n_logits = prefill_inputs(MIXED, 32, 6, 4)
    ref = build_forward_batch(MIXED, 4)
    t = ref.num_tokens  # 19
    assert packed.shape == (3 * 32 + 6,) and n_logits == 3
    assert packed[:t].tolist() == ref.input_ids.tolist() and not packed[t:32].any()
    assert packed[32:32 + t].tolist() == ref.positions.tolist() and not packed[32 + t:64].any()
    assert packed[64:64 + t].tolist() == ref.out_loc.tolist() and (packed[64 + t:96] == PAD_SLOT).all()
    assert packed[96:].tolist() == ref.logits_idx.tolist() + [0, 0, 0] == [8, 13, 18, 0, 0, 0]
    with pytest.raises(ValueError, match="do not fit"):
        prefill_inputs(MIXED, 16, 6, 4)   # 19 tokens
    with pytest.raises(ValueError, match="do not fit"):
        prefill_inputs(MIXED, 32, 3, 4)   # 4 sequences


def _eager(runner, seqs):
    batch = build_forward_batch(seqs, 4)
    runner.attn.init_batch(batch)
    with torch.inference_mode():
        hidden = runner.model.forward(batch.input_ids, batch.positions, batch, runner.attn)
        return runner.model.compute_logits(hidden[batch.logits_idx])


def test_padded_static_step_matches_eager_and_padding_writes_no_page():
    torch.manual_seed(0)
    runner = _tiny_runner(max_bs=8)
    runner.pool.buffer.normal_()  # the cached prefixes
    before = runner.pool.buffer.clone()
    eager = _eager(runner, MIXED)
    eager_pool = runner.pool.buffer.clone()

    runner.pool.buffer.copy_(before)
    graphs = PrefillGraphRunner(runner, 64, 6, emulate=True)
    assert not graphs.can_run(MIXED)  # nothing captured yet
    graphs.capture()
    assert graphs.can_run(MIXED) and bucket_for(19, graphs.buckets) == 64  # 45 padding tokens
    padded = graphs.run(MIXED)
    assert padded.shape == (3, 96)
    torch.testing.assert_close(padded, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runner.pool.buffer, eager_pool, rtol=1e-5, atol=1e-6)
    changed = (runner.pool.buffer != before).flatten(1).any(dim=1).nonzero().flatten().tolist()
    assert changed == [0, 1, 2, 4, 5, 6, 10]  # pages the step's tokens land on, nothing else


def test_future_token_is_filled_on_the_device():
    torch.manual_seed(1)
    runner = _tiny_runner(max_bs=8)
    runner.pool.buffer.normal_()
    before = runner.pool.buffer.clone()
    expected = _eager(runner, MIXED)
    runner.pool.buffer.copy_(before)
    graphs = PrefillGraphRunner(runner, 64, 6, emulate=True)
    graphs.capture()
    pending = MIXED[:3] + [SeqChunk("decode", [FUTURE_TOKEN], 13, [7, 8, 9, 10])]
    sampled = torch.tensor([5, 11, 7])  # the step in flight sampled 11 for "decode" (its row 1)
    got = graphs.run(pending, future=[(18, 1)], tokens=sampled)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_can_run_refuses_what_a_graph_cannot_hold():
    runner = _tiny_runner(max_bs=8)
    graphs = PrefillGraphRunner(runner, 64, 3, emulate=True)
    graphs.capture()
    assert graphs.can_run(MIXED[:3])
    assert not graphs.can_run(MIXED)                                            # 4 sequences > 3
    assert not graphs.can_run([SeqChunk("long", list(range(65)), 0, list(range(17)))])  # 65 tokens > 64
    assert not graphs.can_run([SeqChunk("wide", [1], 32, list(range(9)))])     # past the page-table width
    assert not graphs.can_run([])
    with pytest.raises(ValueError, match="--cuda-graph-max-prefill-seqs"):
        PrefillGraphRunner(runner, 64, 9, emulate=True)  # more than the metadata buffers hold


def test_prefill_graph_flags_are_checked():
    from pdserve.config import KernelConfig

    with pytest.raises(ValueError, match="--cuda-graph-max-prefill-tokens"):
        KernelConfig(cuda_graph_max_prefill_tokens=-1)
    with pytest.raises(ValueError, match="--cuda-graph-max-prefill-seqs"):
        KernelConfig(cuda_graph_max_prefill_seqs=0)
    assert KernelConfig(cuda_graph_max_prefill_tokens=0).cuda_graph_max_prefill_tokens == 0
    from pdserve.config import MAX_PREFILL_GRAPH_SEQS
    from pdserve.kernels.extend_attention import MAX_FLAT_SEQS
    assert MAX_PREFILL_GRAPH_SEQS == MAX_FLAT_SEQS  # the flag's bound is the kernel's
    with pytest.raises(ValueError, match="--cuda-graph-max-prefill-seqs"):
        KernelConfig(cuda_graph_max_prefill_seqs=MAX_FLAT_SEQS + 1)


def test_each_role_captures_only_the_graphs_it_runs():
    from pdserve.config import EngineConfig, KernelConfig
    from pdserve.runtime.model_runner import graphs_for_role

    cfg = EngineConfig()
    assert graphs_for_role(cfg, "colocated") == (True, True)
    assert graphs_for_role(cfg, "decode") == (True, False)
    assert graphs_for_role(cfg, "prefill") == (False, True)
    off = EngineConfig(kernel=KernelConfig(cuda_graph_max_prefill_tokens=0))
    assert graphs_for_role(off, "colocated") == (True, False) and graphs_for_role(off, "prefill") == (False, False)
    with pytest.raises(ValueError, match="role"):
        graphs_for_role(cfg, "router")
