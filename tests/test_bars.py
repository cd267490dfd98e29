"""OHLCV bars from ticks, and their line-protocol encoding."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tradingstack_services.marketdata.bars import BarBook
from tradingstack_services.marketdata.ticks import Tick

T0 = datetime(2026, 1, 2, 9, 30, tzinfo=UTC)


def tick(seconds: float, price: float, size: float = 1.0, symbol: str = "BTCUSDT") -> Tick:
    return Tick(tick_id=f"{symbol}-{seconds}", symbol=symbol, event_ts=T0 + timedelta(seconds=seconds),
                price=price, size=size)  # fmt: skip


def test_a_minute_of_ticks_makes_one_bar() -> None:
    book = BarBook()
    for seconds, price in [(1, 100.0), (20, 105.0), (40, 95.0), (59.5, 101.0)]:
        book.add(tick(seconds, price, size=2.0))
    (bar,) = book.take_dirty()
    assert (bar.open, bar.high, bar.low, bar.close, bar.volume, bar.trades) == (100.0, 105.0, 95.0, 101.0, 8.0, 4)
    assert bar.start == T0
    assert book.take_dirty() == []


def test_out_of_order_ticks_keep_the_latest_as_close() -> None:
    book = BarBook()
    book.add(tick(30, 110.0))
    book.add(tick(10, 90.0))  # late
    (bar,) = book.take_dirty()
    assert bar.close == 110.0
    assert bar.low == 90.0


def test_bars_close_after_the_minute_and_grace_by_the_symbols_clock() -> None:
    book = BarBook(grace=timedelta(seconds=2))
    book.add(tick(5, 100.0))
    book.add(tick(61, 101.0))  # next minute, inside the grace period
    assert book.close_finished() == []
    book.add(tick(62.5, 102.0))
    (closed,) = book.close_finished()
    assert closed.start == T0
    book.add(tick(5, 50.0, symbol="ETHUSDT"))
    assert book.close_finished() == []  # ETH's clock has not moved on


def test_line_protocol() -> None:
    book = BarBook()
    book.add(tick(1, 100.0, size=1.5))
    book.add(tick(2, 100.5, size=0.5))
    (bar,) = book.take_dirty()
    nanos = int(T0.timestamp()) * 1_000_000_000
    assert bar.ilp() == (
        f"ohlcv_1m,symbol=BTCUSDT open=100.0,high=100.5,low=100.0,close=100.5,volume=2.0,trades=2i {nanos}"
    )
