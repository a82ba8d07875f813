"""``--quantization w8a8_int8``: the int8 linear against a float64 reference built from the same
codes, per-token independence, the TP-aware layers and the flag."""

from __future__ import annotations

import pytest
import torch

from pdserve.config import engine_config
from pdserve.models.layers import ParallelLMHead, QKVParallelLinear, RowParallelLinear, TPInfo, VocabParallelEmbedding
from pdserve.models.quant import dequantize_weight, int8_linear, quantize_tokens, quantize_weight


def _reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What the int8 path must compute: the integer product of the codes, scaled per token and per
    output channel, all in float64 (the fast path may differ only by float32 rounding of the scaling)."""
    codes, x_scale = quantize_tokens(x)
    return (codes.double() @ qweight.double().T) * x_scale.double() * scale.double()


@pytest.mark.parametrize("m,k,n", [(1, 64, 48), (8, 576, 960), (33, 1536, 576)])
def test_int8_linear_matches_dequantized_reference(m, k, n):
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 10  # rows of different scale
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen)
    qweight, scale = quantize_weight(w)
    got = int8_linear(x, qweight, scale)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    torch.testing.assert_close(got.double(), _reference(x, qweight, scale), rtol=1e-6, atol=1e-6)


def test_quantization_error_is_within_half_a_step():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(40, 96, generator=gen)
    w[3] = 0.0  # an all-zero channel must not give nan
    qweight, scale = quantize_weight(w)
    assert qweight.dtype == torch.int8 and qweight.abs().max() <= 127
    err = (dequantize_weight(qweight, scale) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all() and torch.equal(dequantize_weight(qweight, scale)[3], w[3])
    x = torch.randn(5, 96, generator=gen)
    x[2] = 0.0
    codes, x_scale = quantize_tokens(x)
    assert codes.abs().max() == 127 and torch.isfinite(x_scale).all()
    assert ((codes.float() * x_scale - x).abs() <= x_scale / 2 + 1e-7).all()


def test_a_row_does_not_depend_on_its_batch_mates():
    """Per-token activation scales: a request's output is bit-identical alone or in any batch
    (a per-tensor scale would change it with a batch-mate of larger magnitude)."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(256, 576, generator=gen)
    qweight, scale = quantize_weight(w)
    row = torch.randn(1, 576, generator=gen)
    alone = int8_linear(row, qweight, scale)
    for mates in (7, 40):
        others = torch.randn(mates, 576, generator=gen) * 100  # much larger activations
        batch = torch.cat([others[: mates // 2], row, others[mates // 2:]])
        assert torch.equal(int8_linear(batch, qweight, scale)[mates // 2], alone[0])


def test_bf16_activations_come_back_in_bf16():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 64, generator=gen).bfloat16()
    qweight, scale = quantize_weight(torch.randn(32, 64, generator=gen))
    bias = torch.randn(32, generator=gen)
    got = int8_linear(x, qweight, scale, bias)
    assert got.dtype == torch.bfloat16
    ref = _reference(x.float(), qweight, scale) + bias.double()
    torch.testing.assert_close(got.double(), ref, rtol=1e-2, atol=1e-2)  # bf16 output rounding
    assert int8_linear(x, qweight, scale, out_dtype=torch.float32).dtype == torch.float32


def test_layers_quantize_after_loading_and_keep_their_shards():
    gen = torch.Generator().manual_seed(5)
    h, d = 64, 16
    qkv = QKVParallelLinear(h, d, num_heads=4, num_kv_heads=2, bias=True, tp=TPInfo(), dtype=torch.float32,
                            device="cpu")
    full = {i: torch.randn(size, h, generator=gen) for i, size in enumerate((64, 32, 32))}
    for i, t in full.items():
        qkv.weight_loader(qkv.weight, t, i)
    qkv.bias.copy_(torch.randn(128, generator=gen))
    weight = qkv.weight.detach().clone()
    x = torch.randn(3, h, generator=gen)
    float_out = qkv(x)
    qkv.quantize_("w8a8_int8")
    assert "weight" not in dict(qkv.named_parameters()) and qkv.qweight.dtype == torch.int8
    codes, scale = quantize_weight(weight)
    assert torch.equal(qkv.qweight, codes) and torch.equal(qkv.weight_scale, scale)
    got = qkv(x)
    torch.testing.assert_close(got.double(), _reference(x, codes, scale) + qkv.bias.double(), rtol=1e-6, atol=1e-5)
    assert (got - float_out).abs().max() < 0.05 * float_out.abs().max()  # and close to the float layer

    row = RowParallelLinear(h, 24, bias=False, tp=TPInfo(), dtype=torch.float32, device="cpu")
    row.weight_loader(row.weight, torch.randn(24, h, generator=gen))
    row.quantize_("w8a8_int8")
    assert row(x).shape == (3, 24) and row.qweight.shape == (24, h)
    with pytest.raises(ValueError, match="^--quantization"):
        row.quantize_("int4")


def test_tied_lm_head_quantizes_a_copy_and_the_embedding_stays_float():
    gen = torch.Generator().manual_seed(6)
    embed = VocabParallelEmbedding(50, 32, TPInfo(), torch.float32, "cpu")
    embed.weight_loader(embed.weight, torch.randn(50, 32, generator=gen))
    head = ParallelLMHead(50, 32, TPInfo(), torch.float32, "cpu", shared=embed.weight)
    table = embed.weight.detach().clone()
    head.quantize_("w8a8_int8")
    ids = torch.tensor([0, 7, 49])
    assert torch.equal(embed(ids), table[ids])  # lookups still read the float table
    hidden = torch.randn(4, 32, generator=gen)
    logits = head.logits(hidden)
    assert logits.dtype == torch.float32 and logits.shape == (4, 50)
    torch.testing.assert_close(logits.double(), _reference(hidden, *quantize_weight(table)), rtol=1e-6, atol=1e-5)


def test_flag_is_validated_and_default_off():
    assert engine_config().model.quantization is None
    assert engine_config(quantization="w8a8_int8").model.quantization == "w8a8_int8"
    with pytest.raises(ValueError, match="^--quantization"):
        engine_config(quantization="fp4")
