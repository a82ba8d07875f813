"""Pairing policies: compatibility, load, rotation, prefix affinity, colocated fallback."""

from __future__ import annotations

from collections import Counter

import pytest

from pdserve.protocol import PROTOCOL_VERSION
from pdserve.router.pairing import Pairing, has_capacity

from .util import make_info, make_load


def cluster(*specs):
    return {spec[0]: make_info(spec[0], spec[1], **(spec[2] if len(spec) > 2 else {})) for spec in specs}


def test_pairs_only_compatible_nodes():
    nodes = cluster(("p0", "prefill", {"fingerprint": "A"}), ("d0", "decode", {"fingerprint": "B"}),
                    ("d1", "decode", {"fingerprint": "A", "page_size": 32}),
                    ("d2", "decode", {"fingerprint": "A", "protocol_version": PROTOCOL_VERSION + 1}),
                    ("d4", "decode", {"fingerprint": "A", "dtype": "float8_e4m3fn"}))  # KV dtype differs
    assert not has_capacity(nodes.values())
    assert Pairing("least_load").pick(nodes, {}, {}, [1] * 40) is None
    nodes.update(cluster(("d3", "decode", {"fingerprint": "A"})))
    assert has_capacity(nodes.values())
    target = Pairing("least_load").pick(nodes, {}, {}, [1] * 40)
    assert (target.prefill.node_id, target.decode.node_id) == ("p0", "d3")


def test_round_robin_rotates_both_pools():
    nodes = cluster(("p0", "prefill"), ("p1", "prefill"), ("d0", "decode"), ("d1", "decode"), ("d2", "decode"))
    pairing = Pairing("round_robin")
    picks = [pairing.pick(nodes, {}, {}, [1]) for _ in range(6)]
    assert [t.prefill.node_id for t in picks] == ["p0", "p1"] * 3
    assert [t.decode.node_id for t in picks] == ["d0", "d1", "d2"] * 2


def test_least_load_uses_reports_and_router_inflight():
    nodes = cluster(("p0", "prefill"), ("p1", "prefill"), ("d0", "decode"), ("d1", "decode"))
    loads = {"p0": make_load("p0", waiting=5), "p1": make_load("p1", waiting=1),
             "d0": make_load("d0", running=2, free_pages=10), "d1": make_load("d1", running=2, free_pages=200)}
    t = Pairing("least_load").pick(nodes, loads, {}, [1])
    assert (t.prefill.node_id, t.decode.node_id) == ("p1", "d1")   # fewer waiting; same running, more free pages
    # A burst this router just sent outweighs a stale report.
    t = Pairing("least_load").pick(nodes, loads, {"p1": 9}, [1])
    assert t.prefill.node_id == "p0"


def test_exclude_skips_failed_nodes_and_colocated_is_the_fallback():
    nodes = cluster(("p0", "prefill"), ("d0", "decode"), ("c0", "colocated"))
    pairing = Pairing("least_load")
    assert not pairing.pick(nodes, {}, {}, [1]).is_colocated
    fallback = pairing.pick(nodes, {}, {}, [1], exclude={"p0"})
    assert fallback.is_colocated and fallback.decode.node_id == "c0"
    assert pairing.pick(nodes, {}, {}, [1], exclude={"p0", "c0"}) is None


def test_power_of_two_prefers_the_less_loaded_of_two():
    nodes = cluster(("p0", "prefill"), ("p1", "prefill"), ("p2", "prefill"), ("d0", "decode"))
    loads = {"p0": make_load("p0", waiting=50), "p1": make_load("p1", waiting=50), "p2": make_load("p2", waiting=0)}
    pairing = Pairing("power_of_two", seed=1)
    picks = Counter(pairing.pick(nodes, loads, {}, [1]).prefill.node_id for _ in range(300))
    assert picks["p2"] > 150 and picks["p0"] + picks["p1"] > 0   # p2 whenever it is one of the two (2/3)


def test_cache_aware_prefix_affinity_and_load_fallback():
    nodes = cluster(*[(f"p{i}", "prefill") for i in range(4)], ("d0", "decode"))
    pairing = Pairing("cache_aware", affinity_pages=2)
    system = list(range(100, 132))                        # two full 16-token pages shared
    homes = {pairing.pick(nodes, {}, {}, system + [i, i + 1]).prefill.node_id for i in range(20)}
    assert len(homes) == 1                                # same prefix -> same prefill node
    spread = {pairing.pick(nodes, {}, {}, [i] * 40).prefill.node_id for i in range(40)}
    assert len(spread) >= 3                               # different prefixes spread out
    home = homes.pop()
    # A node joining moves only some prefixes (rendezvous hashing), and never away from a still-present home
    # to another old node.
    bigger = {**nodes, **cluster(("p9", "prefill"))}
    assert pairing.pick(bigger, {}, {}, system).prefill.node_id in (home, "p9")
    # Overloaded home: load wins.
    loads = {home: make_load(home, waiting=40)}
    assert pairing.pick(nodes, loads, {}, system).prefill.node_id != home
    # Shorter than a page: no affinity, least load.
    assert pairing.pick(nodes, loads, {}, [1, 2, 3]).prefill.node_id != home


def test_unknown_policy_is_a_value_error_naming_the_flag():
    with pytest.raises(ValueError, match="--policy"):
        Pairing("random")
