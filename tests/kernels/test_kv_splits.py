"""Decode split count per batch size, and a workspace made for the most splits serving fewer."""

import pytest
import torch

from kernel_helpers import DEVICE, assert_close
from pdserve.kernels.backend import kv_splits_for
from pdserve.kernels.decode_attention import DecodeWorkspace, decode_attention, decode_attention_ref


@pytest.mark.parametrize("batch,expected", [(1, 32), (2, 32), (4, 16), (8, 8), (64, 2), (256, 1)])
def test_split_policy_on_an_h200(batch, expected):
    assert kv_splits_for(batch, num_kv_heads=8, max_splits=32, num_sms=132) == expected


def test_split_policy_respects_the_flag_and_cpu():
    assert kv_splits_for(1, 8, max_splits=4, num_sms=132) == 4     # the flag is a ceiling
    assert kv_splits_for(256, 8, max_splits=4, num_sms=132) == 1
    assert kv_splits_for(1, 1, max_splits=1, num_sms=132) == 1
    assert kv_splits_for(1, 8, max_splits=32, num_sms=None) == 32  # no SM count: the flag's value


def test_workspace_for_more_splits_serves_fewer():
    g = torch.Generator().manual_seed(3)
    b, hq, hkv, d, page = 3, 8, 2, 32, 4
    k_pages = torch.randn(12, page, hkv, d, generator=g).to(DEVICE)
    v_pages = torch.randn(12, page, hkv, d, generator=g).to(DEVICE)
    table = torch.arange(12, dtype=torch.int32).reshape(3, 4).to(DEVICE)
    lens = torch.tensor([13, 5, 16], dtype=torch.int32).to(DEVICE)
    q = torch.randn(b, hq, d, generator=g).to(DEVICE)
    ws = DecodeWorkspace.allocate(8, hq, d, 8, q.dtype, DEVICE)
    assert ws.fits(b, hq, d, 2, q.dtype) and not ws.fits(b, hq, d, 16, q.dtype)
    ref = decode_attention_ref(q, k_pages, v_pages, table, lens, 0.3)
    for splits in (1, 2, 8):
        out = decode_attention(q, k_pages, v_pages, table, lens, 0.3, num_kv_splits=splits, workspace=ws,
                               block_n=16)
        assert_close(out, ref.to(out.dtype))
