"""Tensor-parallel-aware building blocks.

Every parameter-holding layer knows its shard (``TPInfo``) and has a ``weight_loader`` that takes
the *full* HF tensor and copies in its slice, so a checkpoint loads the same way at any TP size.
At ``tp.size == 1`` the layers are plain matmuls; no collective runs.

Fusion: q/k/v are one matmul (``QKVParallelLinear``) and gate/up are one
(``MergedColumnParallelLinear``). On CPU this halves the number of GEMM calls per layer, which
matters at small batch where per-call overhead dominates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pdserve.models import quant_native
from pdserve.models.quant import check_int8_shape, check_quantization, int8_linear, quantize_weight


@dataclass(frozen=True)
class TPInfo:
    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed process group; None = the default group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's ``x`` along the last dim."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


def _param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"--tp: {what} ({n}) is not divisible by the TP size {d}")
    return n // d


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"weight {name}: checkpoint shard has shape {tuple(src.shape)}, model expects {tuple(dst.shape)}")
    dst.copy_(src)


def _check_full(loaded: torch.Tensor, dim: int, size: int, name: str) -> None:
    """The checkpoint tensor must have the full (unsharded) size along the split dim."""
    if loaded.dim() <= dim or loaded.shape[dim] != size:
        raise ValueError(f"weight {name}: checkpoint tensor has shape {tuple(loaded.shape)}, expected size "
                         f"{size} along dim {dim}")


class QuantizableLinear(nn.Module):
    """A layer whose ``weight`` ([out, in]) can be swapped for int8 codes + per-row scales.

    ``quantize_(method)`` runs once, after loading (the weight loaders fill the float weight, so
    TP sharding is unchanged); from then on ``matmul`` runs the int8 GEMM. A tied weight shared
    with the embedding stays in place for the embedding; only this layer's reference is dropped.
    """

    def _init_quant(self) -> None:
        self.register_buffer("qweight", None)        # [out, in] int8 after quantize_
        self.register_buffer("weight_scale", None)   # [out] float32 after quantize_
        self.packed_weight: tuple[torch.Tensor, torch.Tensor] | None = None  # for the native CPU kernel

    def quantize_(self, method: str) -> None:
        check_quantization(method)
        codes, scale = quantize_weight(self.weight)
        check_int8_shape(codes, type(self).__name__)
        del self.weight
        self.qweight, self.weight_scale = codes, scale
        if quant_native.can_pack(codes):
            self.packed_weight = quant_native.pack_weight(codes)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """x W^T (+ bias) -> ``out_dtype`` (default: x's dtype)."""
        if self.qweight is not None:
            return int8_linear(x, self.qweight, self.weight_scale, bias, out_dtype, self.packed_weight)
        out = F.linear(x, self.weight, bias)
        return out if out_dtype is None else out.to(out_dtype)


class ColumnParallelLinear(QuantizableLinear):
    """y = x W^T (+ b) with W's output rows split over TP ranks; ``output_sizes`` lists fused parts.

    The weight holds each part's shard back to back: ``[sum(output_sizes) / tp, in]``. A part is
    loaded by ``weight_loader(param, full_tensor, shard_id=index)``.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool, tp: TPInfo,
                 dtype: torch.dtype, device: torch.device | str, shard_sizes: list[int] | None = None) -> None:
        super().__init__()
        self.tp = tp
        self.input_size = input_size
        self.full_sizes = list(output_sizes)
        self.shard_sizes = shard_sizes or [_divide(s, tp.size, "output size") for s in output_sizes]
        out = sum(self.shard_sizes)
        self.weight = _param((out, input_size), dtype, device)  # [out / tp, in]
        self.bias = _param((out,), dtype, device) if bias else None
        for p in self.parameters():
            p.weight_loader = self.weight_loader
        self._init_quant()

    def shard_range(self, shard_id: int) -> tuple[int, int, int]:
        """(offset in this rank's output, rows in this rank's shard, start row in the full part)."""
        offset = sum(self.shard_sizes[:shard_id])
        size = self.shard_sizes[shard_id]
        return offset, size, self.tp.rank * size

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int = 0) -> None:
        offset, size, start = self.shard_range(shard_id)
        _check_full(loaded, 0, self.full_sizes[shard_id], "column part")
        _copy(param.data.narrow(0, offset, size), loaded.narrow(0, start, size), "column shard")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


GATE_UP_BLOCK = 8  # gate/up rows stored in blocks of this many gate rows, then the same up rows


class MergedColumnParallelLinear(ColumnParallelLinear):
    """gate_up: two column-parallel outputs of the same size in one matmul, stored interleaved in
    blocks: ``block`` gate rows, then the same ``block`` up rows, and so on. Then the rows one
    program of the fused batch-1 GEMV needs for ``silu(gate) * up`` are contiguous, one weight
    stream instead of two (kernels/gemv.py; 56.0 vs 59.7 us for Llama-3.1-8B on an H200), and every
    consumer of the output (``silu_and_mul``) takes the same ``block``."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool, tp: TPInfo,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        if len(output_sizes) != 2 or output_sizes[0] != output_sizes[1]:
            raise ValueError(f"gate/up parts must be two of one size, got {output_sizes}")
        super().__init__(input_size, output_sizes, bias, tp, dtype, device)
        self.block = math.gcd(self.shard_sizes[0], GATE_UP_BLOCK)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int = 0) -> None:
        _, size, start = self.shard_range(shard_id)
        _check_full(loaded, 0, self.full_sizes[shard_id], "column part")
        blocks = param.data.view(size // self.block, 2, self.block, *param.shape[1:])
        _copy(blocks[:, shard_id], loaded.narrow(0, start, size).reshape(blocks[:, shard_id].shape), "column shard")


@dataclass(frozen=True)
class HeadShard:
    """The attention heads one TP rank holds: query heads ``[q_start, q_start + q_count)`` and KV
    heads ``[kv_start, kv_start + kv_count)``."""
    q_start: int
    q_count: int
    kv_start: int
    kv_count: int


def head_shard(num_heads: int, num_kv_heads: int, tp_size: int, tp_rank: int) -> HeadShard:
    """Split attention heads over TP ranks by whole KV-head groups (a KV head with its query heads).

    At least as many KV heads as ranks: each rank gets ``num_kv_heads // tp`` groups and the first
    ``num_kv_heads % tp`` ranks one more (SmolLM2's 3 KV heads over 2 ranks: 2 + 1), so no head is
    cut. Fewer KV heads than ranks: query heads split evenly and each rank keeps the one KV head
    its query heads use (replicated; ``tp`` must be a multiple of the KV heads)."""
    group = num_heads // num_kv_heads
    if num_heads % num_kv_heads:
        raise ValueError(f"--model-path: {num_heads} attention heads are not a multiple of {num_kv_heads} KV heads")
    if num_kv_heads >= tp_size:
        base, extra = divmod(num_kv_heads, tp_size)
        kv_count = base + (tp_rank < extra)
        kv_start = tp_rank * base + min(tp_rank, extra)
        return HeadShard(kv_start * group, kv_count * group, kv_start, kv_count)
    if tp_size % num_kv_heads:
        raise ValueError(f"--tp: {tp_size} ranks for {num_kv_heads} KV heads: with fewer KV heads than ranks, "
                         f"--tp must be a multiple of num_key_value_heads")
    q_count = _divide(num_heads, tp_size, "num_attention_heads")
    return HeadShard(tp_rank * q_count, q_count, tp_rank // (tp_size // num_kv_heads), 1)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k, v in one matmul, split over ranks by whole KV-head groups (``head_shard``): KV heads
    split (unevenly when the count does not divide), or replicated when there are fewer KV heads
    than ranks (each rank keeps the one its query heads use)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 tp: TPInfo, dtype: torch.dtype, device: torch.device | str) -> None:
        self.head_dim = head_dim
        self.heads = head_shard(num_heads, num_kv_heads, tp.size, tp.rank)
        self.num_heads, self.num_kv_heads = self.heads.q_count, self.heads.kv_count
        self.kv_head_start = self.heads.kv_start
        q, kv = self.num_heads * head_dim, self.num_kv_heads * head_dim
        super().__init__(hidden_size, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim],
                         bias, tp, dtype, device, shard_sizes=[q, kv, kv])

    def shard_range(self, shard_id: int) -> tuple[int, int, int]:
        offset, size, _ = super().shard_range(shard_id)
        first_head = self.heads.q_start if shard_id == 0 else self.kv_head_start
        return offset, size, first_head * self.head_dim


class RowParallelLinear(QuantizableLinear):
    """y = x W^T (+ b) with W's input columns split over ranks; partial sums all-reduced."""

    def __init__(self, input_size: int, output_size: int, bias: bool, tp: TPInfo,
                 dtype: torch.dtype, device: torch.device | str,
                 input_range: tuple[int, int] | None = None) -> None:
        """``input_range``: (first input column, columns) of this rank, where the split is not
        even (attention heads split by ``head_shard``); default ``input_size / tp`` each."""
        super().__init__()
        self.tp = tp
        self.input_size = input_size
        if input_range is None:
            shard = _divide(input_size, tp.size, "input size")
            input_range = (tp.rank * shard, shard)
        self.input_start, self.input_shard = input_range
        self.weight = _param((output_size, self.input_shard), dtype, device)  # [out, in / tp]
        self.bias = _param((output_size,), dtype, device) if bias else None
        self.weight.weight_loader = self.weight_loader
        if self.bias is not None:
            self.bias.weight_loader = self.bias_loader
        self._init_quant()

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        _check_full(loaded, 1, self.input_size, "row")
        _copy(param.data, loaded.narrow(1, self.input_start, self.input_shard), "row shard")

    def bias_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        _copy(param.data, loaded, "row bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.tp.rank == 0 else None  # added once, before the reduce
        return self.tp.all_reduce(self.matmul(x, bias))


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over ranks (vocab padded to a multiple of tp); lookups outside this
    rank's range give zeros and the all-reduce fills them in."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPInfo, dtype: torch.dtype,
                 device: torch.device | str, shared: nn.Parameter | None = None) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.shard_rows = math.ceil(vocab_size / tp.size)
        self.start = tp.rank * self.shard_rows
        if shared is not None:  # tied embeddings: the same storage, loaded once
            self.weight = shared
            return
        self.weight = _param((self.shard_rows, hidden_size), dtype, device)  # [vocab / tp, hidden]
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        _check_full(loaded, 0, self.vocab_size, "vocab")
        rows = max(0, min(self.shard_rows, loaded.shape[0] - self.start))
        param.data[rows:].zero_()
        _copy(param.data[:rows], loaded[self.start:self.start + rows], "vocab shard")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.shard_rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside[:, None], 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding, QuantizableLinear):
    """Output projection, vocab split over ranks; logits gathered to the full vocab."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPInfo, dtype: torch.dtype,
                 device: torch.device | str, shared: nn.Parameter | None = None) -> None:
        super().__init__(vocab_size, hidden_size, tp, dtype, device, shared)
        self._init_quant()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32 (int8: straight from the int32 accumulators)."""
        local = self.matmul(hidden, None, torch.float32)  # [N, vocab / tp]
        return self.tp.all_gather_last(local)[:, :self.vocab_size]


class RMSNorm(nn.Module):
    """x / rms(x) * w, computed in float32 as HF does; ``forward(x, residual)`` first adds the
    residual and returns (normed, new residual)."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _param((size,), dtype, device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.is_cuda:
            return self._forward_triton(x, residual)
        if residual is not None:
            x = x + residual
            residual = x
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * normed.to(x.dtype)
        return out if residual is None else (out, residual)

    def _forward_triton(self, x: torch.Tensor, residual: torch.Tensor | None):
        """The fused Triton kernels (same roundings as above); any leading dims, e.g. [T, heads, D]."""
        from pdserve.kernels.rmsnorm import fused_add_rmsnorm, rmsnorm

        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [rows, size]
        if residual is None:
            return rmsnorm(x2, self.weight, self.eps).view(shape)
        out, new_residual = fused_add_rmsnorm(x2, residual.reshape(-1, shape[-1]), self.weight, self.eps)
        return out.view(shape), new_residual.view(shape)


def silu_and_mul(x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """[T, 2 * I] -> [T, I] = silu(gate) * up; gate and up come in blocks of ``block`` columns
    each (``MergedColumnParallelLinear``), or as halves (``None``)."""
    if x.is_cuda:
        from pdserve.kernels.activation import silu_and_mul as silu_and_mul_triton
        return silu_and_mul_triton(x, block=block)
    gate, up = split_gate_up(x, block)
    return F.silu(gate) * up


def split_gate_up(x: torch.Tensor, block: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, 2 * I] in blocks of ``block`` gate then ``block`` up columns -> (gate, up), each [T, I]."""
    t, inter = x.shape[0], x.shape[1] // 2
    blocks = x.view(t, inter // (block or inter), 2, block or inter)
    return blocks[:, :, 0].reshape(t, inter), blocks[:, :, 1].reshape(t, inter)


class RotaryEmbedding(nn.Module):
    """Neox-style (rotate-half) RoPE with a precomputed cos/sin cache indexed by position.

    ``scaling``: None (default), ``linear`` (positions / factor), ``llama3`` (per-frequency
    wavelength-dependent scaling, as in Llama 3.1) or ``freq_factors`` (a GGUF's rope_freqs tensor).
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None,
                 device: torch.device | str) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        inv_freq = _scale_inv_freq(inv_freq, scaling or {})
        t = torch.arange(max_positions, dtype=torch.int64).float()
        freqs = torch.outer(t, inv_freq)  # [max_positions, head_dim / 2]
        self.register_buffer("cos", freqs.cos().to(device), persistent=False)
        self.register_buffer("sin", freqs.sin().to(device), persistent=False)
        self.cos_sin = None  # [max_positions, D] fp32 = cat(cos, sin), for the Triton kernel on CUDA
        if torch.device(device).type == "cuda":
            self.cos_sin = torch.cat([self.cos, self.sin], dim=-1).contiguous()
        self._gathered: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (positions, cos, sin)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T]; q [T, Hq, D], k [T, Hkv, D] -> rotated (same shapes and dtype).

        On CUDA the Triton kernel rotates q and k in place (the same roundings as below) and returns them."""
        if q.is_cuda and self.cos_sin is not None:
            from pdserve.kernels.rotary import apply_rotary
            return apply_rotary(q, k, positions, self.cos_sin)
        return self.rotate(positions, q), self.rotate(positions, k)

    def rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """positions [T]; x [T, H, D] -> rotated copy (the torch path; q and k may go in together)."""
        if self._gathered is None or self._gathered[0] is not positions:
            # every layer of a step passes the same positions tensor: gather cos/sin once per step
            self._gathered = (positions, self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1))
        return _rotate(x, self._gathered[1], self._gathered[2])  # cos, sin: [T, 1, D / 2]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's roundings: cos/sin in x's dtype, each op in x's dtype (kernels/rotary.py says why)."""
    c, s = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def _scale_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return inv_freq
    if kind == "freq_factors":  # GGUF rope_freqs: llama.cpp divides each frequency by its factor
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32)
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind != "llama3":
        raise ValueError(f"--model-path: RoPE scaling type {kind!r} is not supported")
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled)
