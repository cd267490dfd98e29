"""The latest price per symbol, from the gateway's ticks (`market.tick.>`), for the trading services.

A plain (non-JetStream) subscription: prices are only useful while fresh, so nothing is
replayed and nothing is acknowledged. Malformed ticks are skipped here and counted; the
durable consumers of the tick stream (normalizer, sink) dead-letter them with their reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.aio.client import Client
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge

log = logging.getLogger(__name__)
TICKS = Counter("tradingstack_price_ticks_total", "Ticks seen by a price book", ["accepted"])
# A feed gone quiet shows here (the chart's TradingStackFeedStale alert): Unix time of the last tick.
LAST_TICK = Gauge("tradingstack_price_last_tick_timestamp_seconds", "When a price book last took a tick",
                  ["symbol"])  # fmt: skip


@dataclass(frozen=True, slots=True)
class Quote:
    symbol: str
    last: float
    bid: float | None = None
    ask: float | None = None
    size: float | None = None


def _positive(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    return None


def parse_quote(payload: bytes) -> Quote | None:
    try:
        data = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("symbol"), str):
        return None
    last = _positive(data.get("price"))
    if last is None:
        return None
    bid, ask, size = (_positive(data.get(k)) for k in ("bid", "ask", "size"))
    return Quote(data["symbol"], last, bid, ask, size)


class PriceBook:
    """Quotes by symbol; `on_quote` (if given) runs for each new quote, in arrival order.

    On start it subscribes, then seeds each configured symbol from the last tick the tick
    stream holds, so a service that (re)starts between ticks has prices at once. Only the
    configured symbols are kept: anyone who can publish on `market.tick.>` could otherwise
    grow the book without bound with made-up symbols.
    """

    def __init__(
        self,
        symbols: list[str],
        stream: str = "MARKET_TICKS",
        on_quote: Callable[[Quote], Awaitable[None]] | None = None,
    ) -> None:
        self.symbols = symbols
        self.traded = frozenset(symbols)
        self.stream = stream
        self.quotes: dict[str, Quote] = {}
        self.on_quote = on_quote

    def get(self, symbol: str) -> Quote | None:
        return self.quotes.get(symbol)

    def mark(self, symbol: str) -> float | None:
        quote = self.quotes.get(symbol)
        return quote.last if quote else None

    async def receive(self, msg: Msg) -> None:
        quote = parse_quote(msg.data)
        if quote is None or quote.symbol not in self.traded:
            TICKS.labels("false").inc()
            return
        TICKS.labels("true").inc()
        LAST_TICK.labels(quote.symbol).set_to_current_time()
        self.quotes[quote.symbol] = quote
        if self.on_quote is not None:
            await self.on_quote(quote)

    async def seed(self, nc: Client) -> None:
        js = nc.jetstream()
        for symbol in self.symbols:
            if symbol in self.quotes:
                continue  # a live tick came first
            try:
                last = await js.get_last_msg(self.stream, f"market.tick.{symbol}")
            except Exception as exc:  # no tick yet for it, or no such stream: live ticks will come
                log.debug("no stored tick for %s: %s", symbol, exc)
                continue
            quote = parse_quote(last.data or b"")
            if quote is not None and quote.symbol not in self.quotes:
                self.quotes[quote.symbol] = quote

    async def follow(self, nc: Client, stop: asyncio.Event) -> None:
        """A service worker: keep the book current until stopped."""
        sub = await nc.subscribe("market.tick.>", cb=self.receive)
        await self.seed(nc)
        await stop.wait()
        await sub.unsubscribe()
