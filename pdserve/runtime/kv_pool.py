"""The paged KV pool.

Layout: one tensor ``[num_pages, num_layers, 2, page_size, num_kv_heads, head_dim]`` — page-major.
A page holds every layer's K and V for ``page_size`` tokens in one contiguous block, so a run of
consecutive page ids is one contiguous byte range: a request whose pages form r runs moves as r
transfer descriptors, whatever the layer count (design.md: ~8 us per descriptor over NIXL).
Attention reads one layer through a strided view (``k(layer)``: ``[num_pages, page_size, H, D]``).

A token's slot is ``page * page_size + offset``; ``loc`` tensors hold slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    """What a transfer peer must agree on, byte for byte."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: str  # torch dtype name, e.g. "float32"
    order: str = "page,layer,kv,slot,head,dim"

    @property
    def page_nbytes(self) -> int:
        return self.num_layers * 2 * self.page_size * self.num_kv_heads * self.head_dim * _itemsize(self.dtype)

    @property
    def token_nbytes(self) -> int:
        return self.page_nbytes // self.page_size


def _itemsize(dtype_name: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype_name)).element_size()


class KVPool:
    def __init__(self, num_pages: int, layout: KVLayout, device: torch.device | str = "cpu") -> None:
        if num_pages < 1:
            raise ValueError(f"KV pool needs at least one page, got {num_pages}")
        self.layout = layout
        self.num_pages = num_pages
        self.page_size = layout.page_size
        dtype = getattr(torch, layout.dtype)
        # [num_pages, num_layers, 2, page_size, num_kv_heads, head_dim]
        self.buffer = torch.zeros(num_pages, layout.num_layers, 2, layout.page_size,
                                  layout.num_kv_heads, layout.head_dim, dtype=dtype, device=device)

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

    def write(self, layer: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new K/V ``[T, num_kv_heads, head_dim]`` at slots ``loc`` ``[T]``."""
        pages, offsets = loc // self.page_size, loc % self.page_size
        self.buffer[pages, layer, 0, offsets] = k.to(self.buffer.dtype)
        self.buffer[pages, layer, 1, offsets] = v.to(self.buffer.dtype)

    def gather(self, layer: int, loc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at slots ``loc`` ``[T]`` -> two ``[T, num_kv_heads, head_dim]`` tensors."""
        pages, offsets = loc // self.page_size, loc % self.page_size
        return self.buffer[pages, layer, 0, offsets], self.buffer[pages, layer, 1, offsets]

    def page_view(self, page: int) -> torch.Tensor:
        """One page as flat bytes (checksums, tests)."""
        return self.buffer[page].reshape(-1).view(torch.uint8)

    def page_address(self, page: int) -> int:
        return self.buffer.data_ptr() + page * self.layout.page_nbytes
