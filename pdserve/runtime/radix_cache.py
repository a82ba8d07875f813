"""Prefix cache over whole pages: a tree whose edges are pages of ``page_size`` token ids.

The cache owns one reference to every page in its tree (see page_allocator.py). A request that
matches a prefix takes its own reference to the matched pages, so eviction never frees a page
somebody still reads: evicting only drops the cache's reference. ``evict`` removes least recently
used leaves whose page nobody else holds until enough pages are free.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from pdserve.runtime.page_allocator import PageAllocator

_clock = itertools.count()


@dataclass(eq=False)
class _Node:
    page: int
    key: tuple[int, ...]
    parent: "_Node | None"
    children: dict[tuple[int, ...], "_Node"] = field(default_factory=dict)
    last_used: int = 0


class RadixCache:
    def __init__(self, allocator: PageAllocator, page_size: int) -> None:
        self.allocator = allocator
        self.page_size = page_size
        self.root = _Node(page=-1, key=(), parent=None)
        self.num_pages = 0

    def _keys(self, tokens: list[int], num_pages: int) -> list[tuple[int, ...]]:
        ps = self.page_size
        return [tuple(tokens[i * ps:(i + 1) * ps]) for i in range(num_pages)]

    def match_prefix(self, tokens: list[int], max_pages: int | None = None) -> list[int]:
        """Pages holding the longest cached prefix of ``tokens`` (whole pages only).

        The caller receives one new reference to each returned page and must ``decref`` them.
        """
        limit = len(tokens) // self.page_size
        if max_pages is not None:
            limit = min(limit, max_pages)
        node, pages, now = self.root, [], next(_clock)
        for key in self._keys(tokens, limit):
            child = node.children.get(key)
            if child is None:
                break
            child.last_used = now
            pages.append(child.page)
            node = child
        self.allocator.incref(pages)
        return pages

    def prefix_len(self, tokens: list[int]) -> int:
        """Tokens of ``tokens`` the cache holds (whole pages), without taking references."""
        node, n = self.root, 0
        for key in self._keys(tokens, len(tokens) // self.page_size):
            node = node.children.get(key)
            if node is None:
                break
            n += self.page_size
        return n

    def insert(self, tokens: list[int], pages: list[int]) -> int:
        """Offer a request's full pages (``pages[i]`` holds tokens of page i) to the cache.

        Pages whose prefix is already cached under another page are not taken. Returns how many
        pages the cache newly took a reference to. The caller keeps its own references.
        """
        num = min(len(tokens) // self.page_size, len(pages))
        node, now, added = self.root, next(_clock), 0
        for key, page in zip(self._keys(tokens, num), pages):
            child = node.children.get(key)
            if child is None:
                child = _Node(page=page, key=key, parent=node)
                node.children[key] = child
                self.allocator.incref([page])
                self.num_pages += 1
                added += 1
            child.last_used = now
            node = child
        return added

    def evictable_pages(self) -> int:
        """Pages that eviction could free now (held by the cache alone, in evictable subtrees)."""
        return sum(1 for n in self._iter_nodes() if self.allocator.refcount[n.page] == 1)

    def evict(self, num_pages: int) -> int:
        """Free at least ``num_pages`` pages if possible (LRU leaves first); returns pages freed."""
        heap = [(n.last_used, id(n), n) for n in self._iter_nodes() if not n.children]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_pages:
            _, _, node = heapq.heappop(heap)
            if self.allocator.refcount[node.page] > 1:
                continue  # a running request holds it: evicting frees nothing
            parent = node.parent
            del parent.children[node.key]
            self.num_pages -= 1
            freed += self.allocator.decref([node.page])
            if parent is not self.root and not parent.children:
                heapq.heappush(heap, (parent.last_used, id(parent), parent))
        return freed

    def clear(self) -> None:
        for node in list(self._iter_nodes()):
            self.allocator.decref([node.page])
        self.root.children.clear()
        self.num_pages = 0

    def _iter_nodes(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())
