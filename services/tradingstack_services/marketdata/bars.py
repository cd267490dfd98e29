"""One-minute OHLCV bars from ticks, and their QuestDB line-protocol (ILP) form.

Bars are upserted (the ohlcv_1m table deduplicates on ts and symbol), so writing an open
bar every second and again when it closes is idempotent, and a replay rewrites the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from tradingstack_services.marketdata.ticks import Tick
from tradingstack_services.platform import ilp

BAR_TABLE = "ohlcv_1m"


def minute_of(ts: datetime) -> datetime:
    return ts.replace(second=0, microsecond=0)


@dataclass
class Bar:
    symbol: str
    start: datetime
    open: float
    high: float
    low: float
    close: float
    volume: float = 0.0
    trades: int = 0
    last_ts: datetime | None = None

    @classmethod
    def first(cls, tick: Tick) -> Bar:
        bar = cls(tick.symbol, minute_of(tick.event_ts), tick.price, tick.price, tick.price, tick.price)
        bar.add(tick)
        return bar

    def add(self, tick: Tick) -> None:
        self.high = max(self.high, tick.price)
        self.low = min(self.low, tick.price)
        # Ticks can arrive out of order: the close is the price of the latest tick, not the last seen.
        if self.last_ts is None or tick.event_ts >= self.last_ts:
            self.close, self.last_ts = tick.price, tick.event_ts
        if self.trades == 0:
            self.open = tick.price
        self.volume += tick.size or 0.0
        self.trades += 1

    def ilp(self) -> str:
        fields = {"open": self.open, "high": self.high, "low": self.low, "close": self.close,
                  "volume": float(self.volume), "trades": self.trades}  # fmt: skip
        return ilp.line(BAR_TABLE, {"symbol": self.symbol}, fields, self.start)


@dataclass
class BarBook:
    """Open bars per symbol; a bar closes once a tick of a later minute (plus grace) is seen."""

    grace: timedelta = timedelta(seconds=2)
    open_bars: dict[tuple[str, datetime], Bar] = field(default_factory=dict)
    dirty: set[tuple[str, datetime]] = field(default_factory=set)
    latest: dict[str, datetime] = field(default_factory=dict)

    def add(self, tick: Tick) -> None:
        key = (tick.symbol, minute_of(tick.event_ts))
        bar = self.open_bars.get(key)
        if bar is None:
            self.open_bars[key] = Bar.first(tick)
        else:
            bar.add(tick)
        self.dirty.add(key)
        self.latest[tick.symbol] = max(self.latest.get(tick.symbol, tick.event_ts), tick.event_ts)

    def take_dirty(self) -> list[Bar]:
        bars = [self.open_bars[k] for k in sorted(self.dirty, key=lambda k: (k[1], k[0]))]
        self.dirty.clear()
        return bars

    def close_finished(self) -> list[Bar]:
        """Bars whose minute ended (by the symbol's own clock) more than `grace` ago."""
        closed = []
        for key, bar in list(self.open_bars.items()):
            end = bar.start + timedelta(minutes=1)
            if self.latest.get(bar.symbol, bar.start) >= end + self.grace:
                closed.append(self.open_bars.pop(key))
        return closed
