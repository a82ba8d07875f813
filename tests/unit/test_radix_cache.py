from pdserve.runtime.page_allocator import PageAllocator
from pdserve.runtime.radix_cache import RadixCache

PS = 4


def make(num_pages=16):
    a = PageAllocator(num_pages)
    return a, RadixCache(a, PS)


def test_match_returns_whole_cached_pages_with_a_reference():
    a, c = make()
    tokens = list(range(10))            # 2 full pages + 2 tokens
    pages = a.alloc(3)
    assert c.insert(tokens, pages) == 2
    a.decref(pages)                     # the request finishes
    assert a.num_free == 16 - 2         # cache keeps the 2 full pages
    got = c.match_prefix(list(range(8)) + [99, 98])
    assert got == pages[:2]
    assert a.refcount[got].tolist() == [2, 2]
    assert c.match_prefix([0, 1, 2, 3, 7, 7, 7, 7]) == pages[:1]
    assert c.prefix_len(list(range(12))) == 8


def test_insert_keeps_existing_pages_for_duplicate_prefixes():
    a, c = make()
    p1 = a.alloc(2)
    c.insert(list(range(8)), p1)
    p2 = a.alloc(2)
    assert c.insert(list(range(8)), p2) == 0
    a.decref(p2)
    a.decref(p1)
    assert a.num_free == 16 - 2
    assert c.num_pages == 2


def test_evict_never_frees_pages_a_request_holds():
    a, c = make(8)
    old, new = a.alloc(2), a.alloc(2)
    c.insert([1] * 8, old)
    c.insert([2] * 8, new)
    a.decref(old)
    a.decref(new)                       # only the cache holds them now
    held = c.match_prefix([2] * 8)      # a running request reads `new`
    assert c.evictable_pages() == 2
    assert c.evict(4) == 2              # only old's pages can be freed
    assert a.refcount[held].tolist() == [2, 2]
    assert c.match_prefix([1] * 8) == []


def test_evict_takes_least_recently_used_first():
    a, c = make(8)
    p1, p2 = a.alloc(1), a.alloc(1)
    c.insert([1] * 4, p1)
    c.insert([2] * 4, p2)
    a.decref(p1)
    a.decref(p2)
    a.decref(c.match_prefix([1] * 4))   # touch p1: p2 is now least recently used
    assert c.evict(1) == 1
    assert c.prefix_len([1] * 4) == 4 and c.prefix_len([2] * 4) == 0


def test_evict_walks_up_to_parents():
    a, c = make(8)
    pages = a.alloc(3)
    c.insert(list(range(12)), pages)
    a.decref(pages)
    assert c.evictable_pages() == 3
    assert c.evict(3) == 3
    assert a.num_free == 8 and c.num_pages == 0
