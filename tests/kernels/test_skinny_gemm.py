"""Skinny decode GEMM against torch: odd sizes, every row count it takes, bad input refused."""

import pytest
import torch

from kernel_helpers import DEVICE, DTYPES, assert_close
from pdserve.kernels.skinny_gemm import pick_block_n, skinny_gemm, skinny_gemm_ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", [(1, 64, 48), (3, 100, 33), (8, 256, 96), (16, 40, 17)])
def test_matches_torch(dtype, m, k, n):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    w = torch.randn(n, k, generator=g).to(dtype).to(DEVICE)
    out = skinny_gemm(x, w, block_n=16, block_k=32)
    assert out.shape == (m, n) and out.dtype == dtype
    assert_close(out, skinny_gemm_ref(x, w))


def test_rejects_what_it_cannot_do():
    x = torch.randn(17, 32).to(DEVICE)
    with pytest.raises(ValueError, match="1..16 rows"):
        skinny_gemm(x, torch.randn(8, 32).to(DEVICE))
    with pytest.raises(ValueError, match="does not match"):
        skinny_gemm(x[:2], torch.randn(8, 31).to(DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        skinny_gemm(x[:2], torch.randn(8, 32).to(torch.float16).to(DEVICE))


def test_block_choice_fills_the_gpu():
    assert pick_block_n(4096, 132) == 16          # 256 programs
    assert pick_block_n(28672, 132) == 64         # 448 programs
    assert pick_block_n(128256, 132) == 128
