import pytest
import torch

from kernel_helpers import DEVICE, DTYPES, assert_close, page_table_for, random_pool
from pdserve.kernels.decode_attention import DecodeWorkspace, decode_attention, decode_attention_ref
from pdserve.runtime.kv_pool import quantize_kv

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
    # odd lengths, partial last pages, a single token, an empty row, more splits than blocks
    q, kp, vp, table, lens = _case(num_q_heads, num_kv_heads, [1, 7, 0, 13, 37], dtype)
    out = decode_attention(q, kp, vp, table, lens, 0.2, num_kv_splits=3, block_n=16)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert_close(out, decode_attention_ref(q, kp, vp, table, lens, 0.2))


@pytest.mark.parametrize("num_kv_splits", [1, 3, 5, 8])
def test_split_count_does_not_change_result(num_kv_splits):
    # 8 splits of 50 keys in 16-key blocks: 4 splits hold keys, 4 are empty
    q, kp, vp, table, lens = _case(4, 1, [33, 50], torch.float32)
    out = decode_attention(q, kp, vp, table, lens, 0.3, num_kv_splits=num_kv_splits, block_n=16)
    assert_close(out, decode_attention_ref(q, kp, vp, table, lens, 0.3))


def test_reduce_in_fp32_and_reused_workspace():
    q, kp, vp, table, lens = _case(4, 2, [9, 21], torch.bfloat16)
    ws = DecodeWorkspace.allocate(4, 4, HEAD_DIM, 2, q.dtype, q.device, reduce_in_fp32=True)
    out = decode_attention(q, kp, vp, table, lens, 0.25, num_kv_splits=2, reduce_in_fp32=True, workspace=ws)
    assert ws.mid_o.dtype == torch.float32
    assert torch.isfinite(ws.mid_o[:2]).all()  # the given workspace was used, not a fresh one
    assert_close(out, decode_attention_ref(q, kp, vp, table, lens, 0.25))


def test_zero_length_rows_give_zeros_and_padded_table_rows_are_ignored():
    # graph padding: table/seq_lens have more rows than the batch, padding rows have length 0
    q, kp, vp, table, lens = _case(4, 2, [5, 0, 11], torch.float32)
    table = torch.cat([table, torch.full((2, table.shape[1]), 10**6, dtype=torch.int32, device=DEVICE)])
    lens = torch.cat([lens, torch.zeros(2, dtype=torch.int32, device=DEVICE)])
    out = decode_attention(q, kp, vp, table, lens, 0.3, num_kv_splits=2)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert_close(out, decode_attention_ref(q, kp, vp, table[:3], lens[:3], 0.3))


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_pages(fp8):
    k_scale, v_scale = 0.37, 1.9
    lens = [1, 7, 0, 37]
    buf = random_pool(48, 1, PAGE_SIZE, 2, HEAD_DIM, torch.float32) * 3
    kp, vp = quantize_kv(buf[:, 0, 0], fp8, k_scale), quantize_kv(buf[:, 0, 1], fp8, v_scale)
    table = page_table_for(lens, PAGE_SIZE, 48)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(lens), 8, HEAD_DIM, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).to(DEVICE)
    out = decode_attention(q, kp, vp, table, seq_lens, 0.2, k_scale=k_scale, v_scale=v_scale, num_kv_splits=3,
                           block_n=16)
    assert_close(out, decode_attention_ref(q, kp, vp, table, seq_lens, 0.2, k_scale, v_scale))


def test_workspace_for_8_splits_serves_2_and_repeated_calls_agree():
    """Rows of the workspace beyond the batch are left alone; a call reuses it as a graph replay does."""
    q, kp, vp, table, lens = _case(8, 2, [13, 0, 29], torch.float32)
    ws = DecodeWorkspace.allocate(6, 8, HEAD_DIM, 8, q.dtype, q.device)
    assert ws.fits(3, 8, HEAD_DIM, 2, q.dtype) and not ws.fits(7, 8, HEAD_DIM, 2, q.dtype)
    ref = decode_attention_ref(q, kp, vp, table, lens, 0.3)
    outs = []
    for splits in (2, 2, 8, 2):
        out = torch.full_like(q, float("nan"))
        decode_attention(q, kp, vp, table, lens, 0.3, num_kv_splits=splits, block_n=16, workspace=ws, out=out)
        assert_close(out, ref)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[3])


def test_one_split_writes_the_output_directly():
    q, kp, vp, table, lens = _case(8, 2, [3, 22, 41], torch.float32)
    ws = DecodeWorkspace.allocate(3, 8, HEAD_DIM, 1, q.dtype, q.device)
    ws.mid_o.fill_(float("nan"))
    ws.mid_lse.fill_(float("nan"))
    out = decode_attention(q, kp, vp, table, lens, 0.3, num_kv_splits=1, block_n=16, workspace=ws)
    assert ws.mid_o.isnan().all() and ws.mid_lse.isnan().all()  # normalised straight into out
    assert_close(out, decode_attention_ref(q, kp, vp, table, lens, 0.3))


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
