import pytest
import torch

from kernel_helpers import DEVICE, DTYPES, assert_close, page_table_for, random_pool
from pdserve.kernels.decode_attention import DecodeWorkspace, decode_attention, decode_attention_ref

HEAD_DIM = 32
PAGE_SIZE = 4


def _case(num_q_heads: int, num_kv_heads: int, lens: list[int], dtype: torch.dtype, layer: int = 1):
    buf = random_pool(48, 2, PAGE_SIZE, num_kv_heads, HEAD_DIM, dtype)
    k_pages, v_pages = buf[:, layer, 0], buf[:, layer, 1]  # strided views, as KVPool.k(layer)
    table = page_table_for(lens, PAGE_SIZE, 48)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(lens), num_q_heads, HEAD_DIM, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    return q, k_pages, v_pages, table, seq_lens


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(2, 2), (8, 2), (8, 1)])
def test_matches_reference_gqa(dtype, num_q_heads, num_kv_heads):
    # odd lengths, partial last pages, a single token, more splits than blocks
    q, kp, vp, table, lens = _case(num_q_heads, num_kv_heads, [1, 7, 13, 37], dtype)
    out = decode_attention(q, kp, vp, table, lens, 0.2, num_kv_splits=3, block_n=16)
    assert_close(out, decode_attention_ref(q, kp, vp, table, lens, 0.2))


@pytest.mark.parametrize("num_kv_splits", [1, 2, 5])
def test_split_count_does_not_change_result(num_kv_splits):
    q, kp, vp, table, lens = _case(4, 1, [33, 50], torch.float32)
    out = decode_attention(q, kp, vp, table, lens, 0.3, num_kv_splits=num_kv_splits, block_n=16)
    assert_close(out, decode_attention_ref(q, kp, vp, table, lens, 0.3))


def test_reduce_in_fp32_and_reused_workspace():
    q, kp, vp, table, lens = _case(4, 2, [9, 21], torch.bfloat16)
    ws = DecodeWorkspace.allocate(4, 4, HEAD_DIM, 2, q.dtype, q.device, reduce_in_fp32=True)
    out = decode_attention(q, kp, vp, table, lens, 0.25, num_kv_splits=2, reduce_in_fp32=True, workspace=ws)
    assert ws.mid_o.dtype == torch.float32
    assert_close(out, decode_attention_ref(q, kp, vp, table, lens, 0.25))


def test_zero_length_rows_give_zeros_and_padded_table_rows_are_ignored():
    # graph padding: table/seq_lens have more rows than the batch, padding rows have length 0
    q, kp, vp, table, lens = _case(4, 2, [5, 0, 11], torch.float32)
    table = torch.cat([table, torch.full((2, table.shape[1]), 10**6, dtype=torch.int32, device=DEVICE)])
    lens = torch.cat([lens, torch.zeros(2, dtype=torch.int32, device=DEVICE)])
    out = decode_attention(q, kp, vp, table, lens, 0.3, num_kv_splits=2)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert_close(out, decode_attention_ref(q, kp, vp, table[:3], lens[:3], 0.3))


def test_rejects_bad_inputs():
    q, kp, vp, table, lens = _case(4, 2, [5], torch.float32)
    with pytest.raises(ValueError, match="not a multiple"):
        decode_attention(q[:, :3], kp, vp, table, lens, 0.3)
    with pytest.raises(ValueError, match="int32"):
        decode_attention(q, kp, vp, table.long(), lens, 0.3)
    with pytest.raises(ValueError, match="dtype"):
        decode_attention(q.to(torch.bfloat16), kp, vp, table, lens, 0.3)
    with pytest.raises(ValueError, match="contiguous"):
        decode_attention(q.transpose(1, 2).contiguous().transpose(1, 2), kp, vp, table, lens, 0.3)
