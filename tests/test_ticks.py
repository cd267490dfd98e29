"""The tick schema: timestamps in ms or ISO, optional fields None (never ""), clear reasons for bad input."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from tradingstack_services.marketdata.ticks import InvalidMessageError, parse_tick


def raw(**fields: object) -> bytes:
    return json.dumps({"tick_id": "t1", "symbol": "btcusdt", "timestamp": 1_700_000_000_123, "price": 101.5,
                       **fields}).encode()  # fmt: skip


def test_epoch_milliseconds_and_iso_mean_the_same_instant() -> None:
    from_ms = parse_tick(raw())
    from_iso = parse_tick(raw(timestamp="2023-11-14T22:13:20.123Z"))
    assert from_ms.event_ts == from_iso.event_ts == datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)
    assert from_ms.symbol == "BTCUSDT"


def test_empty_strings_and_missing_optionals_are_none() -> None:
    tick = parse_tick(raw(bid="", ask=None, venue=""))
    assert tick.bid is None
    assert tick.ask is None
    assert tick.venue is None
    assert tick.size is None


def test_a_missing_id_is_derived_the_same_way_every_time() -> None:
    body = {"symbol": "ETHUSDT", "timestamp": 1_700_000_000_000, "price": 2000.5, "venue": "x"}
    first, second = parse_tick(json.dumps(body).encode()), parse_tick(json.dumps(body).encode())
    assert first.tick_id == second.tick_id
    assert parse_tick(json.dumps({**body, "price": 2000.6}).encode()).tick_id != first.tick_id


@pytest.mark.parametrize(
    ("payload", "reason", "detail"),
    [
        (b"{not json", "not_json", ""),
        (b"[1, 2]", "invalid_tick", "JSON object"),
        (raw(price=-1), "invalid_tick", "price"),
        (raw(price="NaN"), "invalid_tick", "price"),
        (raw(symbol="BTC.USD"), "invalid_tick", "symbol"),
        (raw(timestamp="yesterday"), "invalid_tick", "event_ts"),
        (raw(size=-3), "invalid_tick", "size"),
    ],
)
def test_bad_ticks_have_a_reason(payload: bytes, reason: str, detail: str) -> None:
    with pytest.raises(InvalidMessageError) as failure:
        parse_tick(payload)
    assert failure.value.reason == reason
    assert detail in failure.value.detail


def test_sequence_ranges_remember_what_was_committed() -> None:
    from tradingstack_services.marketdata.sink import SequenceRanges

    assert SequenceRanges.encode([5, 3, 4, 9, 10, 12]) == "3-5,9-10,12-12"
    ranges = SequenceRanges()
    ranges.add_encoded("3-5,9-10")
    ranges.add_encoded("6-8,12-12")
    assert ranges.ranges == [[3, 10], [12, 12]]
    assert 7 in ranges
    assert 11 not in ranges
    assert 2 not in ranges


@pytest.mark.parametrize(
    "timestamp",
    [1e20, -1e20, "1" * 30, 10**30, 253402300800000, 946684799999, "9999-12-31T23:59:59", "0001-01-01T00:00:00",
     "not a time", True, [1], {"a": 1}],
)  # fmt: skip
def test_timestamps_out_of_range_or_of_the_wrong_type_are_invalid_ticks_never_crashes(timestamp: object) -> None:
    # 1e20 ms overflows datetime (OverflowError), a 30-digit string too, year 9999 is no market time.
    body = json.dumps({"symbol": "BTCUSDT", "price": 1.0, "timestamp": timestamp}).encode()
    with pytest.raises(InvalidMessageError) as caught:
        parse_tick(body)
    assert caught.value.reason == "invalid_tick"
    assert "event_ts" in caught.value.detail


@pytest.mark.parametrize("body", [b"NaN", b"[]", b'"x"', b"1e999", b'{"symbol": 1, "price": 1, "timestamp": 1}',
                                  b'{"symbol": "BTCUSDT", "price": 1e400, "timestamp": 1767346200000}',
                                  b'{"symbol": "BTCUSDT", "price": NaN, "timestamp": 1767346200000}',
                                  b'{"symbol": "BTCUSDT", "price": "abc", "timestamp": 1767346200000}',
                                  b"\xff\xfe"])  # fmt: skip
def test_any_malformed_body_is_an_invalid_message(body: bytes) -> None:
    with pytest.raises(InvalidMessageError):
        parse_tick(body)
