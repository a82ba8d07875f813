"""CUDA-graph bucketing and padding (plain functions, CPU), and the kernel flags the engine refuses."""

from __future__ import annotations

import pytest
import torch

from pdserve.runtime.cuda_graph import PAD_SLOT, bucket_for, decode_rows, graph_buckets, is_decode_batch
from pdserve.runtime.forward import SeqChunk, build_forward_batch


def test_buckets_default_and_small():
    assert graph_buckets(256) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256]
    assert graph_buckets(1) == [1]
    assert graph_buckets(5) == [1, 2, 4, 5]
    assert graph_buckets(100) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 100]
    with pytest.raises(ValueError, match="--cuda-graph-max-bs"):
        graph_buckets(0)


@pytest.mark.parametrize("max_bs", [1, 3, 7, 33, 64, 200, 256, 512])
def test_every_batch_size_gets_the_smallest_bucket_that_holds_it(max_bs):
    buckets = graph_buckets(max_bs)
    assert buckets == sorted(set(buckets)) and buckets[-1] == max_bs
    for b in range(1, max_bs + 1):
        got = bucket_for(b, buckets)
        assert got >= b and not any(b <= other < got for other in buckets)
    assert bucket_for(max_bs + 1, buckets) is None
    assert bucket_for(0, buckets) is None


def test_decode_rows_match_build_forward_batch_and_pad():
    page_size = 4
    seqs = [SeqChunk("a", [11], 0, [7]), SeqChunk("b", [12], 5, [3, 9]), SeqChunk("c", [13], 8, [1, 2, 6])]
    packed = decode_rows(seqs, 8, page_size)
    ref = build_forward_batch(seqs, page_size)
    assert packed.shape == (3, 8) and packed.dtype == torch.int64
    assert packed[0, :3].tolist() == ref.input_ids.tolist() == [11, 12, 13]
    assert packed[1, :3].tolist() == ref.positions.tolist() == [0, 5, 8]
    assert packed[2, :3].tolist() == ref.out_loc.tolist() == [28, 37, 24]
    assert packed[0, 3:].tolist() == [0] * 5 and packed[1, 3:].tolist() == [0] * 5
    assert packed[2, 3:].tolist() == [PAD_SLOT] * 5


def test_decode_rows_rejects_what_a_graph_cannot_run():
    with pytest.raises(ValueError, match="do not fit"):
        decode_rows([SeqChunk("a", [1], 0, [0])] * 3, 2, 4)
    with pytest.raises(ValueError, match="2 new tokens"):
        decode_rows([SeqChunk("a", [1, 2], 0, [0])], 2, 4)
    with pytest.raises(ValueError, match="page table covers 4 tokens"):
        decode_rows([SeqChunk("a", [1], 4, [0])], 1, 4)


def test_is_decode_batch():
    assert is_decode_batch([SeqChunk("a", [1], 3, [0]), SeqChunk("b", [2], 0, [1])])
    assert not is_decode_batch([])
    assert not is_decode_batch([SeqChunk("a", [1, 2], 0, [0])])
    assert not is_decode_batch([SeqChunk("a", [1], 0, [0], need_logits=False)])


@pytest.mark.parametrize("flags, match", [
    ({"enable_torch_compile": True}, "--enable-torch-compile"),
    ({"kv_cache_dtype": "fp8_e4m3"}, "--kv-cache-dtype"),
    ({"decode_attention_backend": "triton"}, "--decode-attention-backend"),
])
def test_unsupported_kernel_flags_fail_loudly(flags, match):
    from pdserve.config import CacheConfig, EngineConfig, KernelConfig
    from pdserve.runtime.model_runner import ModelRunner

    cache = {k: v for k, v in flags.items() if k == "kv_cache_dtype"}
    kernel = {k: v for k, v in flags.items() if k != "kv_cache_dtype"}
    cfg = EngineConfig(cache=CacheConfig(**cache), kernel=KernelConfig(**kernel))
    with pytest.raises(ValueError, match=match):
        ModelRunner(cfg)  # refused before the model loads


def test_triton_options_follow_the_flags():
    from pdserve.config import EngineConfig, KernelConfig
    from pdserve.runtime.model_runner import attention_options

    cfg = EngineConfig(kernel=KernelConfig(triton_attention_num_kv_splits=4, triton_attention_reduce_in_fp32=True,
                                           cuda_graph_max_bs=512))
    assert attention_options(cfg, "triton", 8192) == {"num_kv_splits": 4, "reduce_in_fp32": True,
                                                      "max_batch_size": 512, "max_context_len": 8192}
    assert attention_options(cfg, "torch", 8192) == {}
