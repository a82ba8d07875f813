"""The paged KV pool.

Layout: one tensor ``[num_pages, num_layers, 2, page_size, num_kv_heads, head_dim]`` — page-major.
A page holds every layer's K and V for ``page_size`` tokens in one contiguous block, so a run of
consecutive page ids is one contiguous byte range: a request whose pages form r runs moves as r
transfer descriptors, whatever the layer count (design.md: ~8 us per descriptor over NIXL).
Attention reads one layer through a strided view (``k(layer)``: ``[num_pages, page_size, H, D]``).

A token's slot is ``page * page_size + offset``; ``loc`` tensors hold slots.

FP8 (``--kv-cache-dtype fp8_e4m3 | fp8_e5m2``): the pool holds ``float8_e4m3fn`` / ``float8_e5m2``
and a page is half a bf16 page (a quarter of fp32). Scaling is per tensor, as vLLM/SGLang do by
default: one ``k_scale`` and one ``v_scale`` (1.0 unless set), stored ``(x / scale)`` clamped to the
format's finite range, read back as ``fp8 * scale``. The scales are part of the layout, so two
transfer peers agree on what the bytes mean, not only on their size.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass

import torch

# --kv-cache-dtype -> torch dtype name of the pool
KV_CACHE_DTYPES = {"fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class KVLayout:
    """What a transfer peer must agree on, byte for byte."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: str  # torch dtype name of the pool, e.g. "bfloat16", "float8_e4m3fn"
    order: str = "page,layer,kv,slot,head,dim"
    k_scale: float = 1.0  # stored K = K / k_scale (fp8 only; 1.0 otherwise)
    v_scale: float = 1.0

    def __post_init__(self) -> None:
        for name, scale in (("k_scale", self.k_scale), ("v_scale", self.v_scale)):
            if not (0.0 < scale < float("inf")):
                raise ValueError(f"--kv-cache-dtype: {name} must be positive and finite, got {scale}")
            if scale != 1.0 and not self.is_fp8:
                raise ValueError(f"--kv-cache-dtype: {name} {scale} needs an fp8 cache, not {self.dtype}")

    @property
    def is_fp8(self) -> bool:
        return self.dtype in KV_CACHE_DTYPES.values()

    @property
    def page_nbytes(self) -> int:
        return self.num_layers * 2 * self.page_size * self.num_kv_heads * self.head_dim * _itemsize(self.dtype)

    @property
    def token_nbytes(self) -> int:
        return self.page_nbytes // self.page_size


def _map_shm(path: str, shape: tuple[int, ...], dtype_name: str, *, create: bool) -> torch.Tensor:
    """A CPU tensor over a shared file in /dev/shm (zero-filled when created)."""
    nbytes = _itemsize(dtype_name)
    for n in shape:
        nbytes *= n
    if create:
        with open(path, "wb") as f:
            f.truncate(nbytes)
    raw = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
    return raw.view(getattr(torch, dtype_name)).view(shape)


def _itemsize(dtype_name: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype_name)).element_size()


def cache_dtype_name(kv_cache_dtype: str, model_dtype: torch.dtype) -> str:
    """``--kv-cache-dtype`` -> the pool's torch dtype name (``auto``: the model dtype)."""
    if kv_cache_dtype == "auto":
        return str(model_dtype).removeprefix("torch.")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"--kv-cache-dtype: unknown {kv_cache_dtype!r}, expected auto or {sorted(KV_CACHE_DTYPES)}")
    return KV_CACHE_DTYPES[kv_cache_dtype]


def quantize_kv(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """``x`` -> ``dtype``; for fp8, ``x * (1 / scale)`` in fp32 clamped to the finite range (never inf/nan
    from overflow), rounded to nearest even. The kernels' store does the same arithmetic."""
    if dtype not in FP8_DTYPES:
        return x.to(dtype)
    fmax = torch.finfo(dtype).max
    x = x.float()
    if scale != 1.0:
        x = x * (1.0 / scale)
    return x.clamp(-fmax, fmax).to(dtype)


def dequantize_kv(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """Stored K or V -> ``dtype`` (the compute dtype): ``x * scale`` for fp8, a plain cast otherwise."""
    if x.dtype in FP8_DTYPES and x.device.type == "cpu":
        x, factor = fp8_as_fp16(x)
        scale *= factor
    x = x.to(dtype)
    return x * scale if scale != 1.0 else x


def fp8_as_fp16(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """fp8 -> (fp16 holding ``x / factor``, factor), exactly (subnormals included), by moving bits.

    torch's own fp8 casts are scalar code on CPU; these 2-3 vector integer ops are 2.5-4x faster.
    The byte is sign-extended to int16, so a left shift puts the sign in bit 15:
    - e5m2 is the top byte of an fp16 (same exponent bias): shift 8, factor 1 (inf/nan kept);
    - e4m3fn shifted 7 puts exponent and mantissa under fp16's (bias 15 vs 7: factor 2^8) and
      leaves a stray sign copy in bit 14, which the mask clears. Its NaN codes (never written:
      stores saturate) would read as 480.
    """
    bits = x.view(torch.int8).to(torch.int16)
    if x.dtype == torch.float8_e5m2:
        return (bits << 8).view(torch.float16), 1.0
    return ((bits << 7) & ~0x4000).view(torch.float16), 256.0


class KVPool:
    def __init__(self, num_pages: int, layout: KVLayout, device: torch.device | str = "cpu", *,
                 shared: bool = False) -> None:
        """``shared``: a CPU buffer in shared memory, so another process (a tensor-parallel rank)
        can map it (a CUDA buffer is shared through CUDA IPC as it is)."""
        if num_pages < 1:
            raise ValueError(f"KV pool needs at least one page, got {num_pages}")
        self.layout = layout
        self.num_pages = num_pages
        self.page_size = layout.page_size
        self.shm_path: str | None = None  # shared CPU pools: the /dev/shm file behind the buffer
        shape = (num_pages, layout.num_layers, 2, layout.page_size, layout.num_kv_heads, layout.head_dim)
        if shared and torch.device(device).type == "cpu":
            self.shm_path = f"/dev/shm/pdserve-kv-{os.getpid()}-{uuid.uuid4().hex[:12]}"
            self.buffer = _map_shm(self.shm_path, shape, layout.dtype, create=True)
        else:
            # [num_pages, num_layers, 2, page_size, num_kv_heads, head_dim]
            self.buffer = torch.zeros(shape, dtype=getattr(torch, layout.dtype), device=device)

    @classmethod
    def from_buffer(cls, buffer: torch.Tensor | str, layout: KVLayout, num_pages: int) -> "KVPool":
        """A pool over rank 0's allocation (a tensor-parallel rank's): a CUDA tensor opened from
        its IPC handle, or the path of a shared CPU pool."""
        shape = (num_pages, layout.num_layers, 2, layout.page_size, layout.num_kv_heads, layout.head_dim)
        if isinstance(buffer, str):
            buffer = _map_shm(buffer, shape, layout.dtype, create=False)
        if tuple(buffer.shape) != shape or str(buffer.dtype).removeprefix("torch.") != layout.dtype:
            raise ValueError(f"KV buffer {tuple(buffer.shape)} {buffer.dtype} does not match {shape} {layout.dtype}")
        pool = cls.__new__(cls)
        pool.layout, pool.num_pages, pool.page_size, pool.shm_path = layout, num_pages, layout.page_size, None
        pool.buffer = buffer
        return pool

    def unlink_shm(self) -> None:
        """Remove the /dev/shm name once every process has mapped it (the memory lives on)."""
        if self.shm_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.shm_path)
            self.shm_path = None

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    def k(self, layer: int) -> torch.Tensor:
        """[num_pages, page_size, num_kv_heads, head_dim], strided."""
        return self.buffer[:, layer, 0]

    def v(self, layer: int) -> torch.Tensor:
        return self.buffer[:, layer, 1]

    @property
    def is_fp8(self) -> bool:
        return self.layout.is_fp8

    def scales(self, layer: int) -> tuple[float, float]:
        """(k_scale, v_scale) of ``layer``: stored = x / scale. Per tensor today (the same for every
        layer); per-layer scales from a checkpoint would be returned here."""
        return self.layout.k_scale, self.layout.v_scale

    def write(self, layer: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new K/V ``[T, num_kv_heads, head_dim]`` at slots ``loc`` ``[T]`` (quantized for fp8)."""
        pages, offsets = loc // self.page_size, loc % self.page_size
        k_scale, v_scale = self.scales(layer)
        self.buffer[pages, layer, 0, offsets] = quantize_kv(k, self.buffer.dtype, k_scale)
        self.buffer[pages, layer, 1, offsets] = quantize_kv(v, self.buffer.dtype, v_scale)

    def gather(self, layer: int, loc: torch.Tensor,
               dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at slots ``loc`` ``[T]`` -> two ``[T, num_kv_heads, head_dim]`` tensors, as stored, or
        dequantized to ``dtype`` when given."""
        pages, offsets = loc // self.page_size, loc % self.page_size
        k, v = self.buffer[pages, layer, 0, offsets], self.buffer[pages, layer, 1, offsets]
        if dtype is None:
            return k, v
        k_scale, v_scale = self.scales(layer)
        return dequantize_kv(k, dtype, k_scale), dequantize_kv(v, dtype, v_scale)

    def page_view(self, page: int) -> torch.Tensor:
        """One page as flat bytes (checksums, tests)."""
        return self.buffer[page].reshape(-1).view(torch.uint8)

    def page_address(self, page: int) -> int:
        return self.buffer.data_ptr() + page * self.layout.page_nbytes
