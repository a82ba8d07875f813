"""Shared factories for the kernel tests: a device, tolerances, a page-major pool with random pages."""

from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]


def tolerances(dtype: torch.dtype) -> dict:
    # bf16: a couple of ulps (kernels and references sum in different orders)
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 2e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), **tolerances(expected.dtype))


def random_pool(num_pages: int, num_layers: int, page_size: int, num_kv_heads: int, head_dim: int,
                dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """[num_pages, num_layers, 2, page_size, Hkv, D] filled with N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    shape = (num_pages, num_layers, 2, page_size, num_kv_heads, head_dim)
    return torch.randn(shape, generator=g).to(dtype).to(DEVICE)


def page_table_for(lens: list[int], page_size: int, num_pages: int, seed: int = 0) -> torch.Tensor:
    """Each sequence gets distinct, shuffled pages: [B, W] int32 (W = max pages needed, >= 1)."""
    need = [-(-n // page_size) for n in lens]
    width = max(max(need, default=1), 1)
    perm = torch.randperm(num_pages, generator=torch.Generator().manual_seed(seed))
    assert sum(need) <= num_pages, "pool too small for the test"
    table = torch.zeros(len(lens), width, dtype=torch.int32)
    used = 0
    for i, n in enumerate(need):
        table[i, :n] = perm[used:used + n].to(torch.int32)
        used += n
    return table.to(DEVICE)


def fused_qkv(tokens: int, hq: int, hkv: int, head_dim: int, dtype: torch.dtype, g: torch.Generator):
    """A fused qkv output ``[T, (Hq + 2 Hkv) D]`` (values N(0, 4)) and its q/k/v views, sliced as
    the model slices it -> (qkv, (q, k, v))."""
    qkv = torch.randn(tokens, (hq + 2 * hkv) * head_dim, generator=g).mul(2).to(dtype).to(DEVICE)
    q = qkv[:, :hq * head_dim].view(tokens, hq, head_dim)
    k = qkv[:, hq * head_dim:(hq + hkv) * head_dim].view(tokens, hkv, head_dim)
    v = qkv[:, (hq + hkv) * head_dim:].view(tokens, hkv, head_dim)
    return qkv, (q, k, v)
