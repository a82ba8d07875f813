"""FP8 KV pool (--kv-cache-dtype): cast/clamp semantics, page sizes and pool sizing, the torch
attention path over fp8 pages, and the flag checks."""

import pytest
import torch

from pdserve.config import CacheConfig, EngineConfig, KernelConfig
from pdserve.runtime.kv_pool import KVLayout, KVPool, cache_dtype_name, dequantize_kv, quantize_kv
from pdserve.runtime.model_runner import check_kernel_flags, pool_pages
from tests.unit.attention_scenario import check_mixed_batch

FP8 = [(torch.float8_e4m3fn, 3), (torch.float8_e5m2, 2)]  # (dtype, mantissa bits)


def _layout(dtype: str, **kw) -> KVLayout:
    return KVLayout(num_layers=3, num_kv_heads=2, head_dim=8, page_size=4, dtype=dtype, **kw)


@pytest.mark.parametrize("fp8,_", FP8)
def test_values_above_the_fp8_max_saturate_instead_of_inf(fp8, _):
    fmax = torch.finfo(fp8).max
    x = torch.tensor([fmax * 1.01, -fmax * 1.01, 1e30, -1e30, float("inf")])
    q = quantize_kv(x, fp8).float()
    assert q.isfinite().all() and q.tolist() == [fmax, -fmax, fmax, -fmax, fmax]
    # with a scale the limit moves: stored x / scale saturates, so the read-back limit is fmax * scale
    assert dequantize_kv(quantize_kv(torch.tensor([1e9]), fp8, 0.5), torch.float32, 0.5).item() == fmax * 0.5
    if fp8 == torch.float8_e5m2:  # a plain cast would overflow: the clamp is what keeps it finite
        assert torch.tensor([1e30]).to(fp8).float().isinf().all()


@pytest.mark.parametrize("fp8,mantissa_bits", FP8)
@pytest.mark.parametrize("scale", [1.0, 0.37, 8.0])
def test_round_trip_error_is_at_most_half_an_ulp(fp8, mantissa_bits, scale):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * torch.logspace(-1, 2, 4096)
    stored = (x / scale).abs()
    x = x[(stored >= torch.finfo(fp8).tiny) & (stored <= torch.finfo(fp8).max)]  # normal range: bound holds
    back = dequantize_kv(quantize_kv(x, fp8, scale), torch.float32, scale)
    rel = ((back - x).abs() / x.abs()).max().item()
    assert 0 < rel <= 2.0 ** -(mantissa_bits + 1) * 1.0001


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_dequantize_matches_torch_cast_on_every_finite_code(fp8, dtype, scale):
    codes = torch.arange(256, dtype=torch.uint8).view(fp8)  # [256], every bit pattern
    finite = codes.float().isfinite()                     # e4m3fn: 2 NaN codes; e5m2: +-inf and NaNs
    want = codes.to(dtype) * scale if scale != 1.0 else codes.to(dtype)
    got = dequantize_kv(codes.reshape(16, 16), dtype, scale).reshape(-1)
    assert got.dtype == dtype and torch.equal(got[finite], want[finite])


def test_page_bytes_halve_vs_bf16_and_quarter_vs_fp32():
    fp32, bf16 = _layout("float32"), _layout("bfloat16")
    for name in ("float8_e4m3fn", "float8_e5m2"):
        fp8 = _layout(name)
        assert fp8.is_fp8 and fp8.page_nbytes * 2 == bf16.page_nbytes and fp8.page_nbytes * 4 == fp32.page_nbytes
        assert KVPool(5, fp8).buffer.untyped_storage().nbytes() == 5 * fp8.page_nbytes
    assert not bf16.is_fp8


def test_cache_dtype_name_and_scale_validation():
    assert cache_dtype_name("auto", torch.bfloat16) == "bfloat16"
    assert cache_dtype_name("fp8_e4m3", torch.bfloat16) == "float8_e4m3fn"
    assert cache_dtype_name("fp8_e5m2", torch.float32) == "float8_e5m2"
    with pytest.raises(ValueError, match="--kv-cache-dtype"):
        cache_dtype_name("int8", torch.float32)
    with pytest.raises(ValueError, match="k_scale"):
        _layout("float8_e4m3fn", k_scale=0.0)
    with pytest.raises(ValueError, match="needs an fp8 cache"):
        _layout("bfloat16", v_scale=2.0)


@pytest.mark.parametrize("fp8,mantissa_bits", FP8)
def test_pool_write_quantizes_with_the_layout_scales(fp8, mantissa_bits):
    pool = KVPool(6, _layout(str(fp8).removeprefix("torch."), k_scale=2.0, v_scale=0.5))
    loc = torch.tensor([0, 5, 9, 23])
    k, v = torch.randn(4, 2, 8) * 3, torch.randn(4, 2, 8)
    pool.write(1, loc, k, v)
    raw_k, raw_v = pool.gather(1, loc)
    assert raw_k.dtype == fp8
    assert torch.equal(raw_k.view(torch.uint8), quantize_kv(k, fp8, 2.0).view(torch.uint8))
    assert torch.equal(raw_v.view(torch.uint8), quantize_kv(v, fp8, 0.5).view(torch.uint8))
    k_back, v_back = pool.gather(1, loc, torch.float32)
    torch.testing.assert_close(k_back, k, rtol=2.0 ** -(mantissa_bits + 1), atol=2.0 * torch.finfo(fp8).tiny)
    torch.testing.assert_close(v_back, v, rtol=2.0 ** -(mantissa_bits + 1), atol=0.5 * torch.finfo(fp8).tiny)


@pytest.mark.parametrize("fp8", ["float8_e4m3fn", "float8_e5m2"])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1)])
def test_torch_attention_over_fp8_pool_matches_reference_on_dequantized_kv(fp8, hq, hkv):
    """The torch backend (CPU path) reads fp8 pages back as ``fp8 * scale``: the same as exact
    attention over the dequantized K/V, mixed prefill/decode batch, odd lengths, partial pages."""
    pool = KVPool(32, KVLayout(num_layers=2, num_kv_heads=hkv, head_dim=8, page_size=4, dtype=fp8,
                               k_scale=0.7, v_scale=1.3))
    check_mixed_batch(pool, hq, k_history_gain=4.0)


def test_mem_fraction_gives_twice_the_tokens_with_fp8():
    cache = CacheConfig(mem_fraction_static=0.01)
    bf16 = pool_pages(cache, _layout("bfloat16"), torch.device("cpu"), 16)
    fp8 = pool_pages(cache, _layout("float8_e4m3fn"), torch.device("cpu"), 16)
    fp32 = pool_pages(cache, _layout("float32"), torch.device("cpu"), 16)
    # the budget is re-read from /proc/meminfo on each call: allow 2% drift between the calls
    assert fp8 / bf16 == pytest.approx(2.0, rel=0.02) and fp8 / fp32 == pytest.approx(4.0, rel=0.02)
    assert pool_pages(CacheConfig(max_total_tokens=100), _layout("float8_e5m2"), torch.device("cpu"), 16) == 25


def test_fp8_flag_passes_the_kernel_checks_except_with_flashinfer():
    for backend in ("auto", "torch", "triton"):
        check_kernel_flags(EngineConfig(cache=CacheConfig(kv_cache_dtype="fp8_e5m2"),
                                        kernel=KernelConfig(attention_backend=backend)))
    with pytest.raises(ValueError, match="--kv-cache-dtype fp8_e4m3 with --attention-backend flashinfer"):
        check_kernel_flags(EngineConfig(cache=CacheConfig(kv_cache_dtype="fp8_e4m3"),
                                        kernel=KernelConfig(attention_backend="flashinfer")))


def test_flashinfer_backend_refuses_fp8_pages():
    from pdserve.kernels.flashinfer_backend import check_kv_dtype
    check_kv_dtype("bfloat16")
    with pytest.raises(ValueError, match="--kv-cache-dtype"):
        check_kv_dtype("float8_e4m3fn")
