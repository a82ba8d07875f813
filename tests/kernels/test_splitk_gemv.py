"""Split-K decode GEMV against torch: odd sizes, one row and several, every split count."""

import pytest
import torch

from kernel_helpers import DEVICE, DTYPES, assert_close
from pdserve.kernels.splitk_gemv import GemvTiling, pick_tiling, splitk_gemv, splitk_gemv_ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n,split", [(1, 64, 48, 1), (1, 100, 33, 2), (3, 200, 70, 4), (16, 96, 17, 3)])
def test_matches_torch(dtype, m, k, n, split):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    w = torch.randn(n, k, generator=g).to(dtype).to(DEVICE)
    out = splitk_gemv(x, w, GemvTiling(block_n=16, block_k=16, split_k=split))
    assert out.shape == (m, n) and out.dtype == dtype
    assert_close(out, splitk_gemv_ref(x, w))


def test_deterministic_and_default_tiling():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 512, generator=g).to(DEVICE)
    w = torch.randn(40, 512, generator=g).to(DEVICE)
    t = GemvTiling(block_n=16, block_k=32, split_k=4)
    assert torch.equal(splitk_gemv(x, w, t), splitk_gemv(x, w, t))
    assert_close(splitk_gemv(x, w, num_sms=1), splitk_gemv_ref(x, w))


def test_rejects_what_it_cannot_do():
    x = torch.randn(17, 32).to(DEVICE)
    with pytest.raises(ValueError, match="1..16 rows"):
        splitk_gemv(x, torch.randn(8, 32).to(DEVICE))
    with pytest.raises(ValueError, match="does not match"):
        splitk_gemv(x[:2], torch.randn(8, 31).to(DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        splitk_gemv(x[:2], torch.randn(8, 32).to(torch.float16).to(DEVICE))


def test_tiling_fills_an_h200():
    assert pick_tiling(1, 4096, 4096, 132) == GemvTiling(64, 256, 16)     # 64 blocks x 16 >= 4 x 132
    assert pick_tiling(1, 28672, 4096, 132).split_k == 2                  # 448 blocks x 2
    assert pick_tiling(1, 4096, 14336, 132).split_k == 16
    assert pick_tiling(1, 4096, 256, 132).split_k == 1                    # K too short to split
