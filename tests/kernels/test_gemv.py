"""The fused batch-1 GEMV (kernels/gemv.py) against the unfused ops it replaces, rounded as
transformers' modules, with ragged shapes (columns and K not multiples of the tiles)."""

import pytest
import torch

from kernel_helpers import DEVICE, DTYPES, assert_close
from pdserve.kernels.gemv import GemvConfig, fused_gemv, fused_gemv_ref, pick_config

SMALL = GemvConfig(16, 32, 4, 2)  # several programs and K steps at test sizes


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(40, 72), (7, 100), (64, 32)])
def test_plain_and_bias(dtype, n, k):
    x, w, b = _randn(1, k, dtype=dtype), _randn(n, k, dtype=dtype, seed=1), _randn(n, dtype=dtype, seed=2)
    assert_close(fused_gemv(x, w, config=SMALL), fused_gemv_ref(x, w))
    assert_close(fused_gemv(x, w, b, config=SMALL), fused_gemv_ref(x, w, b))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_prologue(dtype):
    """1/RMS is applied to the sums, the normed row is not rounded first: within bf16 ulps."""
    x, w = _randn(1, 72, dtype=dtype, scale=3.0), _randn(40, 72, dtype=dtype, seed=1)
    g = _randn(72, dtype=dtype, seed=2, scale=0.1) + 1
    b = _randn(40, dtype=dtype, seed=3)
    assert_close(fused_gemv(x, w, norm_weight=g, eps=1e-5, config=SMALL), fused_gemv_ref(x, w, norm_weight=g, eps=1e-5))
    assert_close(fused_gemv(x, w, b, norm_weight=g, eps=1e-5, config=SMALL),
                 fused_gemv_ref(x, w, b, norm_weight=g, eps=1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block,n,cfg", [(4, 44, SMALL), (8, 40, GemvConfig(32, 32, 4, 2))])
def test_silu_out_pairs_gate_and_up_blocks(dtype, block, n, cfg):
    """w in MergedColumnParallelLinear's layout: blocks of gate rows, each followed by its up rows;
    the last program holds fewer (gate, up) block pairs than the others."""
    x, w = _randn(1, 72, dtype=dtype), _randn(2 * n, 72, dtype=dtype, seed=1)
    g = _randn(72, dtype=dtype, seed=2, scale=0.1) + 1
    kw = {"silu_out": True, "gate_up_block": block}
    out = fused_gemv(x, w, config=cfg, **kw)
    assert out.shape == (1, n)
    assert_close(out, fused_gemv_ref(x, w, **kw))
    if dtype == torch.bfloat16:  # no norm: the same roundings as the unfused ops, bit for bit
        assert torch.equal(out, fused_gemv_ref(x, w, **kw))
    halves = w.view(n // block, 2, block, 72).transpose(0, 1).reshape(2 * n, 72)  # gate rows, then up rows
    plain = fused_gemv_ref(x, halves).float()
    assert_close(out, (torch.nn.functional.silu(plain[:, :n]) * plain[:, n:]).to(dtype))  # blocks pair as claimed
    ref = fused_gemv_ref(x, w, norm_weight=g, **kw).float()  # 2 bf16 ulps of the largest output
    torch.testing.assert_close(fused_gemv(x, w, norm_weight=g, config=cfg, **kw).float(), ref,
                               atol=ref.abs().max().item() * (2**-6 if dtype == torch.bfloat16 else 1e-6), rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_is_updated_in_place(dtype):
    x, w, res = _randn(1, 100, dtype=dtype), _randn(40, 100, dtype=dtype, seed=1), _randn(1, 40, dtype=dtype, seed=2)
    expected = fused_gemv_ref(x, w, residual=res)
    before = res.clone()
    out = fused_gemv(x, w, residual=res, config=SMALL)
    assert out.data_ptr() == res.data_ptr() and not torch.equal(res, before)
    assert_close(res, expected)


def test_float32_out_holds_the_rounded_product():
    """The LM head's form: logits rounded as a bf16 linear rounds them, stored as fp32."""
    x, w = _randn(1, 72, dtype=torch.bfloat16), _randn(40, 72, dtype=torch.bfloat16, seed=1)
    out = torch.empty(1, 40, dtype=torch.float32, device=DEVICE)
    assert fused_gemv(x, w, out=out, config=SMALL) is out
    assert torch.equal(out, fused_gemv(x, w, config=SMALL).float())
    with pytest.raises(ValueError, match="residual"):
        fused_gemv(x, w, residual=out)


def test_default_tiling_covers_the_shape():
    x, w = _randn(1, 600), _randn(300, 600, seed=1)  # K not a multiple of the default 512-wide step
    assert_close(fused_gemv(x, w), fused_gemv_ref(x, w))
    assert pick_config(4096, 4096, False).block_n == 8 and pick_config(128256, 4096, False).block_k == 256


@pytest.mark.parametrize("kwargs,match", [
    ({"x": (2, 8)}, "one row"),
    ({"x": (1, 9)}, "one row"),
    ({"w": (7, 8), "silu_out": True}, "gate | up"),
    ({"w": (12, 8), "silu_out": True}, "gate_up_block"),
    ({"norm_weight": (9,)}, "norm_weight"),
    ({"bias": (5,)}, "bias"),
    ({"residual": (1, 3)}, "output"),
])
def test_rejects_bad_shapes(kwargs, match):
    x = _randn(*kwargs.pop("x", (1, 8)))
    w = _randn(*kwargs.pop("w", (6, 8)), seed=1)
    args = {name: _randn(*shape, seed=2) for name, shape in kwargs.items() if isinstance(shape, tuple)}
    args.update({name: v for name, v in kwargs.items() if not isinstance(v, tuple)})
    bias = args.pop("bias", None)
    with pytest.raises(ValueError, match=match):
        fused_gemv(x, w, bias, **args)


def test_rejects_residual_and_out_together():
    x, w = _randn(1, 8), _randn(6, 8, seed=1)
    with pytest.raises(ValueError, match="residual"):
        fused_gemv(x, w, residual=_randn(1, 6), out=_randn(1, 6))
