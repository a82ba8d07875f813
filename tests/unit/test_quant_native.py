"""The native int8 CPU kernels give the torch path's bits: quantize, dequantize, and the packed
VNNI GEMV (which quantizes, multiplies and dequantizes in one call)."""

from __future__ import annotations

import pytest
import torch

from pdserve.models import quant_native
from pdserve.models.quant import int8_linear, int8_matmul, quantize_tokens, quantize_weight

pytestmark = pytest.mark.skipif(quant_native.native() is None,
                                reason="native int8 kernels unavailable here (no AVX-512 VNNI or no C compiler)")


def _torch_path(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    codes, x_scale = quantize_tokens(x)
    return int8_matmul(codes, qweight).to(torch.float32).mul_(scale).mul_(x_scale)


def _case(m: int, k: int, n: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 8).to(dtype)
    if m > 2:
        x[1] = 0.0  # an all-zero row
    return x, *quantize_weight(torch.randn(n, k, generator=gen))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,n", [(1, 576, 960), (3, 68, 32), (8, 576, 3072), (13, 1536, 576), (32, 96, 64)])
def test_gemv_is_bit_identical_to_the_torch_path(m, k, n, dtype):
    x, qweight, scale = _case(m, k, n, dtype, seed=m)
    assert quant_native.can_pack(qweight)
    packed = quant_native.pack_weight(qweight)
    expected = _torch_path(x, qweight, scale)
    assert torch.equal(quant_native.gemv(x, *packed, scale), expected)
    assert torch.equal(int8_linear(x, qweight, scale, out_dtype=torch.float32, packed=packed), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_rows_quantize_and_dequantize_natively_with_the_same_bits(dtype):
    x, qweight, scale = _case(300, 100, 48, dtype, seed=7)  # 100 and 48: not packable, not multiples of 16
    codes, x_scale = quantize_tokens(x)
    got_codes, got_scale = quant_native.quantize_rows(x)
    assert torch.equal(got_codes, codes) and torch.equal(got_scale, x_scale)
    acc = int8_matmul(codes, qweight)
    assert torch.equal(quant_native.dequantize(acc, x_scale, scale), acc.to(torch.float32).mul_(scale).mul_(x_scale))
    assert torch.equal(int8_linear(x, qweight, scale, out_dtype=torch.float32), _torch_path(x, qweight, scale))


def test_strided_rows_and_empty_batches():
    x, qweight, scale = _case(6, 64, 32, torch.float32, seed=3)
    packed = quant_native.pack_weight(qweight)
    wide = torch.zeros(6, 100)
    wide[:, 10:74] = x
    view = wide[:, 10:74]  # row stride 100, not 64
    assert torch.equal(quant_native.gemv(view, *packed, scale), _torch_path(x, qweight, scale))
    assert quant_native.gemv(x[:0], *packed, scale).shape == (0, 32)


def test_packing_layout():
    qweight = torch.arange(64 * 8, dtype=torch.int32).remainder(255).sub(127).to(torch.int8).view(64, 8)
    packed, comp = quant_native.pack_weight(qweight)
    assert packed.shape == (2, 2, 32, 4)  # [N/32, K/4, 32, 4]
    assert torch.equal(packed[1, 1, 5], qweight[32 + 5, 4:8])
    assert torch.equal(comp, qweight.sum(1, dtype=torch.int32) * 128)
    assert not quant_native.can_pack(qweight[:48]) and not quant_native.can_pack(torch.zeros(32, 6, dtype=torch.int8))


def test_without_native_kernels_the_torch_path_gives_the_same_bits(monkeypatch):
    x, qweight, scale = _case(5, 64, 32, torch.float32, seed=9)
    packed = quant_native.pack_weight(qweight)
    fast = int8_linear(x, qweight, scale, packed=packed)
    monkeypatch.setattr(quant_native, "native", lambda: None)  # as on a machine without AVX-512 VNNI
    assert torch.equal(int8_linear(x, qweight, scale, packed=packed), fast)
