import pytest
import torch

from kernel_helpers import DEVICE, DTYPES, assert_close, page_table_for, random_pool
from pdserve.kernels.extend_attention import extend_attention, extend_attention_ref

HEAD_DIM = 32
PAGE_SIZE = 4


def _case(num_q_heads: int, num_kv_heads: int, prefix: list[int], new: list[int], dtype: torch.dtype):
    buf = random_pool(40, 2, PAGE_SIZE, num_kv_heads, HEAD_DIM, dtype)
    k_pages, v_pages = buf[:, 0, 0], buf[:, 0, 1]
    table = page_table_for(prefix, PAGE_SIZE, 40)
    g = torch.Generator().manual_seed(2)
    t = sum(new)
    q = torch.randn(t, num_q_heads, HEAD_DIM, generator=g).to(dtype).to(DEVICE)
    k = torch.randn(t, num_kv_heads, HEAD_DIM, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(t, num_kv_heads, HEAD_DIM, generator=g).to(dtype).to(DEVICE)
    q_starts = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32, device=DEVICE)
    prefix_lens = torch.tensor(prefix, dtype=torch.int32, device=DEVICE)
    return q, k, v, k_pages, v_pages, table, q_starts, prefix_lens


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(2, 2), (8, 2), (8, 1)])
def test_matches_reference_ragged_batch(dtype, num_q_heads, num_kv_heads):
    # no prefix / partial-page prefix / decode-like single token / chunks crossing blocks / empty
    prefix, new = [0, 5, 13, 3, 9], [7, 1, 37, 16, 0]
    args = _case(num_q_heads, num_kv_heads, prefix, new, dtype)
    out = extend_attention(*args, max(new), 0.2, block_m=32, block_n=16)  # 2 diagonal blocks per program
    assert_close(out, extend_attention_ref(*args, 0.2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_flat_grid_matches_reference_and_the_batch_grid(dtype):
    prefix, new = [0, 5, 13, 3, 9], [7, 1, 37, 16, 0]
    args = _case(8, 2, prefix, new, dtype)
    flat = extend_attention(*args, max(new), 0.2, block_m=32, block_n=16, flat_grid=True)
    assert_close(flat, extend_attention_ref(*args, 0.2))
    batch = extend_attention(*args, max(new), 0.2, block_m=32, block_n=16)
    assert torch.equal(flat, batch)  # the same programs, numbered differently


def test_flat_grid_as_a_prefill_graph_pads_it():
    # 3 real sequences in a step padded to 96 tokens and 6 sequences: q_starts [.., 61, 0, 0]
    q, k, v, kp, vp, table, q_starts, prefix_lens = _case(4, 2, [6, 0, 2], [11, 40, 10], torch.float32)
    pad = 96 - q.shape[0]
    q_p, k_p, v_p = (torch.cat([x, torch.full((pad, *x.shape[1:]), float("nan"), device=DEVICE)]) for x in (q, k, v))
    zeros = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    table_p = torch.cat([table, torch.zeros(3, table.shape[1], dtype=torch.int32, device=DEVICE)])
    out = torch.full_like(q_p, 7.0)
    extend_attention(q_p, k_p, v_p, kp, vp, table_p, torch.cat([q_starts, zeros]), torch.cat([prefix_lens, zeros]),
                     96, 0.3, block_m=32, block_n=16, out=out, flat_grid=True)
    assert_close(out[:61], extend_attention_ref(q, k, v, kp, vp, table, q_starts, prefix_lens, 0.3))
    assert (out[61:] == 7.0).all()  # padding rows: no program wrote them (their NaN inputs were never read)


def test_default_blocks_and_strided_qkv():
    # q/k/v as column slices of one fused qkv tensor, like the model's projection output
    q, k, v, kp, vp, table, q_starts, prefix_lens = _case(4, 2, [6, 0], [11, 40], torch.float32)
    fused = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)  # [T, (4 + 2 + 2) * D]
    qs, ks, vs = fused.split([4 * HEAD_DIM, 2 * HEAD_DIM, 2 * HEAD_DIM], dim=1)
    qs, ks, vs = qs.view(-1, 4, HEAD_DIM), ks.view(-1, 2, HEAD_DIM), vs.view(-1, 2, HEAD_DIM)
    assert not qs.is_contiguous()
    out = extend_attention(qs, ks, vs, kp, vp, table, q_starts, prefix_lens, 40, 0.3)
    assert_close(out, extend_attention_ref(q, k, v, kp, vp, table, q_starts, prefix_lens, 0.3))


def test_rejects_bad_inputs():
    q, k, v, kp, vp, table, q_starts, prefix_lens = _case(4, 2, [3], [5], torch.float32)
    with pytest.raises(ValueError, match="batch \\+ 1"):
        extend_attention(q, k, v, kp, vp, table, q_starts[:1], prefix_lens, 5, 0.3)
    with pytest.raises(ValueError, match="multiple of block_n"):
        extend_attention(q, k, v, kp, vp, table, q_starts, prefix_lens, 5, 0.3, block_m=24, block_n=16)
    with pytest.raises(ValueError, match="k "):
        extend_attention(q, k[:, :1], v, kp, vp, table, q_starts, prefix_lens, 5, 0.3)
