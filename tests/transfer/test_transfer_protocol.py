"""Wire messages round-trip, and the handshake check names both sides' values."""

import msgspec
import pytest

from pdserve.runtime.kv_pool import KVLayout
from pdserve.transfer.protocol import (TRANSFER_PROTOCOL_VERSION, Cancel, Handshake, HandshakeAccept,
                                       Heartbeat, KVDest, LayoutSpec, PoolInfo, TransferComplete,
                                       TransferMetrics, check_compatible, decode_message, encode)
from pdserve.transfer.tp_map import RegionInfo

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=16, page_size=16, dtype="float32")


def hello(layout=LAYOUT, fingerprint="fp-a", version=TRANSFER_PROTOCOL_VERSION, heads=((0, 2),)) -> Handshake:
    """A handshake of a node whose ranks hold KV heads ``heads`` ((start, count) per rank)."""
    page = layout.page_nbytes // layout.num_kv_heads
    regions = [RegionInfo(rank=r, base_addr=(1 << 40) + r * (1 << 30), page_nbytes=page * n, device_id=0,
                          kv_start=start, kv_count=n) for r, (start, n) in enumerate(heads)]
    pool = PoolInfo(agent_name="a", num_pages=8, device_kind="cpu", regions=regions)
    return Handshake(pool=pool, agent_metadata=b"\x00md", layout=LayoutSpec.of(layout),
                     fingerprint=fingerprint, protocol_version=version)


@pytest.mark.parametrize("msg", [
    hello(),
    HandshakeAccept(pool=hello().pool),
    KVDest(transfer_id="t", page_ids=[3, 1, 2]),
    TransferComplete(transfer_id="t", payload=b"\x01\x02", metrics=TransferMetrics(transfer_id="t", kv_bytes=9)),
    Cancel(transfer_id="t", reason="r"),
    Heartbeat(sent_at=1.5),
])
def test_round_trip(msg):
    assert decode_message(encode(msg)) == msg


def test_layout_spec_round_trip():
    assert LayoutSpec.of(LAYOUT).to_layout() == LAYOUT


def test_garbage_is_an_error():
    with pytest.raises(msgspec.DecodeError):
        decode_message(b"\xc1not msgpack")


def test_compatible():
    assert check_compatible(hello(), hello()) is None


def test_page_size_mismatch_names_both():
    other = KVLayout(num_layers=4, num_kv_heads=2, head_dim=16, page_size=32, dtype="float32")
    assert check_compatible(hello(), hello(other)) == "page size mismatch: prefill 16, decode 32"


def test_fingerprint_and_version_mismatch():
    assert check_compatible(hello(), hello(fingerprint="fp-b")) == \
        "model fingerprint mismatch: prefill fp-a, decode fp-b"
    v = TRANSFER_PROTOCOL_VERSION
    assert check_compatible(hello(), hello(version=v + 1)) == \
        f"protocol version mismatch: prefill {v}, decode {v + 1}"


def test_tp_layouts_map_and_refuse():
    one, two = ((0, 2),), ((0, 1), (1, 1))
    assert check_compatible(hello(heads=one), hello(heads=two)) is None      # TP 1 -> 2
    assert check_compatible(hello(heads=two), hello(heads=one)) is None      # TP 2 -> 1
    partial = ((0, 1),)                                                      # a prefill node missing head 1
    assert check_compatible(hello(heads=partial), hello(heads=one)) == (
        "tensor-parallel layouts cannot be mapped: prefill ranks hold KV heads [(0, 1)], "
        "decode rank 0 needs head 1 (of [0, 2))")


def test_dtype_mismatch():
    bf16 = KVLayout(num_layers=4, num_kv_heads=2, head_dim=16, page_size=16, dtype="bfloat16")
    assert check_compatible(hello(), hello(bf16)) == \
        "KV cache dtype mismatch: prefill float32, decode bfloat16 (start both with the same --kv-cache-dtype)"


def test_fp8_prefill_bf16_decode_is_refused_before_page_bytes():
    # prefill --kv-cache-dtype fp8_e4m3 against a bf16 decode: pages are 1 vs 2 bytes per element,
    # and the dtype (with the flag to fix) is reported, not the byte count it implies
    fp8 = KVLayout(num_layers=4, num_kv_heads=2, head_dim=16, page_size=16, dtype="float8_e4m3fn")
    bf16 = KVLayout(num_layers=4, num_kv_heads=2, head_dim=16, page_size=16, dtype="bfloat16")
    assert fp8.page_nbytes * 2 == bf16.page_nbytes
    reason = check_compatible(hello(fp8), hello(bf16))
    assert reason.startswith("KV cache dtype mismatch: prefill float8_e4m3fn, decode bfloat16")
    assert "--kv-cache-dtype" in reason
    e5m2 = KVLayout(num_layers=4, num_kv_heads=2, head_dim=16, page_size=16, dtype="float8_e5m2")
    assert check_compatible(hello(fp8), hello(e5m2)).startswith("KV cache dtype mismatch")


def test_fp8_scales_travel_and_must_agree():
    fp8 = KVLayout(num_layers=4, num_kv_heads=2, head_dim=16, page_size=16, dtype="float8_e4m3fn")
    scaled = KVLayout(num_layers=4, num_kv_heads=2, head_dim=16, page_size=16, dtype="float8_e4m3fn",
                      k_scale=0.5, v_scale=2.0)
    assert LayoutSpec.of(scaled).to_layout() == scaled
    assert decode_message(encode(hello(scaled))).layout.v_scale == 2.0
    assert check_compatible(hello(fp8), hello(fp8)) is None
    assert check_compatible(hello(fp8), hello(scaled)).startswith("KV k_scale mismatch: prefill 1.0, decode 0.5")


def test_gbps():
    m = TransferMetrics(transfer_id="t", kv_bytes=2_000_000_000, busy_ms=500.0)
    assert m.gbps == pytest.approx(4.0)
