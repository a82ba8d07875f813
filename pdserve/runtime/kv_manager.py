"""Page tables of requests on top of the allocator and the prefix cache.

Every engine role uses it: a request's ``page_ids`` grow as its tokens need room (evicting cached
prefixes under pressure), and on release its full pages are offered to the prefix cache before
the request's own references are dropped.
"""

from __future__ import annotations

from pdserve.runtime.page_allocator import PageAllocator
from pdserve.runtime.radix_cache import RadixCache
from pdserve.runtime.request import Request


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class KVManager:
    def __init__(self, num_pages: int, page_size: int, *, enable_prefix_cache: bool = True) -> None:
        self.page_size = page_size
        self.allocator = PageAllocator(num_pages)
        self.cache = RadixCache(self.allocator, page_size) if enable_prefix_cache else None

    @property
    def num_pages(self) -> int:
        return self.allocator.num_pages

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    def available_pages(self) -> int:
        """Free pages plus those eviction could free now."""
        return self.allocator.num_free + (self.cache.evictable_pages() if self.cache else 0)

    def prefix_len(self, tokens: list[int]) -> int:
        return self.cache.prefix_len(tokens) if self.cache else 0

    def match_prefix(self, req: Request) -> None:
        """Give a request without pages the cached pages of its tokens (>= 1 token left to compute)."""
        if self.cache is None or req.page_ids:
            return
        max_pages = (req.seq_len - 1) // self.page_size
        pages = self.cache.match_prefix(req.all_ids, max_pages=max_pages)
        req.page_ids = pages
        req.num_cached = req.num_computed = len(pages) * self.page_size

    def alloc(self, n: int) -> list[int] | None:
        """``n`` fresh pages, evicting cached prefixes if needed; None if they cannot be had."""
        pages = self.allocator.alloc(n)
        if pages is None and self.cache is not None:
            self.cache.evict(n - self.allocator.num_free)
            pages = self.allocator.alloc(n)
        return pages

    def ensure_capacity(self, req: Request, num_tokens: int) -> bool:
        """Grow ``req.page_ids`` to hold ``num_tokens`` tokens. False (nothing taken) if impossible."""
        need = pages_for(num_tokens, self.page_size) - len(req.page_ids)
        if need <= 0:
            return True
        pages = self.alloc(need)
        if pages is None:
            return False
        req.page_ids.extend(pages)
        return True

    def release(self, req: Request, *, cache: bool = True) -> None:
        """Drop the request's pages; with ``cache``, offer its computed full pages to the cache first."""
        if cache and self.cache is not None and req.num_computed:
            tokens = req.all_ids[:req.num_computed]
            self.cache.insert(tokens, req.page_ids)
        self.allocator.decref(req.page_ids)
        req.page_ids = []
        req.num_computed = 0
