"""TritonAttention against TorchAttention through the real scheduler->runner contract."""

import pytest
import torch

from kernel_helpers import DEVICE, DTYPES, assert_close
from pdserve.kernels.backend import TritonAttention
from pdserve.kernels.rotary import apply_rotary_ref, build_cos_sin_cache, rope_inv_freq
from pdserve.runtime.attention import TorchAttention, make_attention_backend
from pdserve.runtime.forward import SeqChunk, build_forward_batch
from pdserve.runtime.kv_pool import KVLayout, KVPool

PAGE_SIZE = 4
HQ, HKV, D = 8, 2, 32


def _pools(dtype: torch.dtype) -> tuple[KVPool, KVPool]:
    layout = KVLayout(num_layers=2, num_kv_heads=HKV, head_dim=D, page_size=PAGE_SIZE, dtype=str(dtype).split(".")[1])
    a, b = KVPool(40, layout, DEVICE), KVPool(40, layout, DEVICE)
    a.buffer.copy_(torch.randn(a.buffer.shape, generator=torch.Generator().manual_seed(0)).to(dtype))
    b.buffer.copy_(a.buffer)
    return a, b


def _run_step(seqs, dtype, backend_kwargs=None, fused_rope=False):
    torch_pool, triton_pool = _pools(dtype)
    ref, tri = TorchAttention(torch_pool), TritonAttention(triton_pool, **(backend_kwargs or {}))
    batch = build_forward_batch(seqs, PAGE_SIZE, DEVICE)
    ref.init_batch(batch)
    tri.init_batch(batch)
    g = torch.Generator().manual_seed(5)
    for layer in (0, 1):
        q = torch.randn(batch.num_tokens, HQ, D, generator=g).to(dtype).to(DEVICE)
        k = torch.randn(batch.num_tokens, HKV, D, generator=g).to(dtype).to(DEVICE)
        v = torch.randn(batch.num_tokens, HKV, D, generator=g).to(dtype).to(DEVICE)
        if fused_rope:  # Triton rotates in its store launch; the reference is handed rotated q/k
            rope = (batch.positions, build_cos_sin_cache(rope_inv_freq(D, 10000.0), 64, DEVICE))
            rq, rk = apply_rotary_ref(q, k, *rope)
            out = tri.forward(layer, q, k, v, batch, 0.2, rope=rope)
            assert torch.equal(q, rq) and torch.equal(k, rk)  # rotated in place, as the reference
        else:
            out = tri.forward(layer, q, k, v, batch, 0.2)
        assert_close(out, ref.forward(layer, q, k, v, batch, 0.2))
    assert torch.equal(triton_pool.buffer, torch_pool.buffer)
    return tri, batch


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_batch_matches_torch(dtype):
    seqs = [
        SeqChunk("fresh", list(range(9)), 0, [3, 7, 1]),                  # prefill from scratch
        SeqChunk("chunk", list(range(6)), 5, [10, 2, 30]),                # chunk after a cached prefix
        SeqChunk("decode", [1], 12, [4, 5, 6, 8]),                        # one token, page boundary
        SeqChunk("spare", list(range(3)), 2, [20, 21, 22]),               # more pages than needed
    ]
    tri, batch = _run_step(seqs, dtype)
    assert not batch.extras["triton"].is_decode


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_rope_store_matches_rotate_then_torch(dtype):
    seqs = [SeqChunk("fresh", list(range(9)), 0, [3, 7, 1]), SeqChunk("chunk", list(range(6)), 5, [10, 2, 30]),
            SeqChunk("decode", [1], 12, [4, 5, 6, 8])]
    assert TritonAttention.fuses_rope and not TorchAttention.fuses_rope
    _run_step(seqs, dtype, fused_rope=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_batch_with_rope_rotates_and_stores_inside_attention(dtype):
    """A decode step handed ``rope``: the split kernel rotates q and k and stores k/v itself (q and
    k are left unrotated), the output and pool equal the reference given rotated q/k."""
    seqs = [SeqChunk(f"r{i}", [7], n, pages) for i, (n, pages) in
            enumerate([(0, [0]), (6, [9, 11]), (15, [12, 13, 14, 15]), (3, [39])])]
    torch_pool, triton_pool = _pools(dtype)
    ref, tri = TorchAttention(torch_pool), TritonAttention(triton_pool, num_kv_splits=2)
    batch = build_forward_batch(seqs, PAGE_SIZE, DEVICE)
    ref.init_batch(batch)
    tri.init_batch(batch)
    g = torch.Generator().manual_seed(5)
    rope = (batch.positions, build_cos_sin_cache(rope_inv_freq(D, 10000.0), 64, DEVICE))
    for layer in (0, 1):
        q, k, v = (torch.randn(4, h, D, generator=g).to(dtype).to(DEVICE) for h in (HQ, HKV, HKV))
        q0, k0 = q.clone(), k.clone()
        out = tri.forward(layer, q, k, v, batch, 0.2, rope=rope)
        assert torch.equal(q, q0) and torch.equal(k, k0)
        rq, rk = apply_rotary_ref(q, k, *rope)
        assert_close(out, ref.forward(layer, rq, rk, v, batch, 0.2))
    assert batch.extras["triton"].is_decode
    assert torch.equal(triton_pool.buffer, torch_pool.buffer)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_batch_matches_torch(dtype):
    seqs = [SeqChunk(f"r{i}", [7], n, pages) for i, (n, pages) in
            enumerate([(0, [0]), (6, [9, 11]), (15, [12, 13, 14, 15]), (3, [39])])]
    tri, batch = _run_step(seqs, dtype, {"num_kv_splits": 2})
    meta = batch.extras["triton"]
    assert meta.is_decode and meta.seq_lens.tolist()[:5] == [1, 7, 16, 4, 0]


def test_metadata_buffers_stay_put_for_graph_replay():
    pool = _pools(torch.float32)[0]
    tri = TritonAttention(pool, max_batch_size=4, max_context_len=32)
    first = build_forward_batch([SeqChunk(f"r{i}", [1], 5, [i, 10 + i]) for i in range(3)], PAGE_SIZE, DEVICE)
    tri.init_batch(first)
    table_ptr, lens_ptr = tri.buffers.page_table.data_ptr(), tri.buffers.lens.data_ptr()
    second = build_forward_batch([SeqChunk("r9", [1], 9, [4, 5, 6])], PAGE_SIZE, DEVICE)
    tri.init_batch(second)
    meta = second.extras["triton"]
    assert meta.page_table.data_ptr() == table_ptr and meta.seq_lens.data_ptr() == lens_ptr
    assert meta.seq_lens.tolist() == [10, 0, 0, 0]  # stale rows from the first batch are zeroed
    assert meta.page_table[0, :3].tolist() == [4, 5, 6]


def test_oversized_batch_gets_fresh_buffers_and_still_matches():
    seqs = [SeqChunk(f"r{i}", [1], 6, [2 * i, 2 * i + 1]) for i in range(3)]
    tri, batch = _run_step(seqs, torch.float32, {"max_batch_size": 2})
    assert batch.extras["triton"].page_table.data_ptr() != tri.buffers.page_table.data_ptr()


def test_make_attention_backend_builds_triton():
    backend = make_attention_backend("triton", _pools(torch.float32)[0], num_kv_splits=4)
    assert isinstance(backend, TritonAttention) and backend.num_kv_splits == 4


def test_flashinfer_backend_explains_missing_package():
    try:
        import flashinfer  # noqa: F401
        pytest.skip("flashinfer is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="pip install flashinfer-python"):
        make_attention_backend("flashinfer", _pools(torch.float32)[0])
