"""gateway: market data onto NATS, `market.tick.{SYMBOL}`, from a mock feed or a replay file.

Each tick carries `Nats-Msg-Id: <tick_id>`, so a replay inside the stream's duplicate window
is stored once. `GET /tickers` and `GET /ticker/{symbol}` serve each configured symbol's last
price, touch, and 24-hour volume and change, in the seeds' shape.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import uuid
from collections import deque
from datetime import UTC, datetime
from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from nats.aio.client import Client
from prometheus_client import Counter
from pydantic import BaseModel, Field

from tradingstack_services.marketdata import webproxy
from tradingstack_services.marketdata.ticks import InvalidMessageError, Tick, epoch_ms, parse_tick, tick_json
from tradingstack_services.platform import bus, tracing
from tradingstack_services.platform.settings import ServiceSettings, parse_prices

log = logging.getLogger(__name__)
PUBLISHED = Counter("tradingstack_gateway_ticks_published_total", "Ticks published", ["source"])
REJECTED = Counter("tradingstack_gateway_replay_rejected_total", "Replay lines that were not valid ticks")
TRACER = tracing.tracer("tradingstack.gateway")
DASHBOARD = Path(__file__).parent / "dashboard"  # static files: no build step, nothing to run


# Where the mock walk starts: near where these markets traded when the seeds were written, so a
# dashboard, a notional limit or a risk check sees realistic numbers. Others start at 100.
SEED_PRICES = {
    "BTCUSDT": 45_000.0, "ETHUSDT": 2_500.0, "SOLUSDT": 100.0, "BNBUSDT": 300.0, "XRPUSDT": 0.6,
    "ADAUSDT": 0.5, "DOGEUSDT": 0.08, "AVAXUSDT": 35.0, "DOTUSDT": 7.0, "LINKUSDT": 15.0,
}  # fmt: skip
DEFAULT_START_PRICE = 100.0


def start_prices(symbols: list[str], overrides: str | None) -> dict[str, float]:
    """Each symbol's first mock price: MOCK_START_PRICES (`BTCUSDT=45000,ETHUSDT=2500`), else the seeds'."""
    return {s: SEED_PRICES.get(s, DEFAULT_START_PRICE) for s in symbols} | parse_prices(overrides)


class MockFeed:
    """A random walk per symbol: realistic enough to exercise the pipeline."""

    def __init__(self, symbols: list[str], seed: int | None = None, prices: dict[str, float] | None = None) -> None:
        self.random = random.Random(seed)
        self.prices = {s: (prices or {}).get(s, SEED_PRICES.get(s, DEFAULT_START_PRICE)) for s in symbols}
        self.volume = dict.fromkeys(symbols, 0.0)
        self.trades = dict.fromkeys(symbols, 0)

    def tick(self, symbol: str) -> Tick:
        price = max(0.01, self.prices[symbol] * (1 + self.random.gauss(0, 0.0005)))
        self.prices[symbol] = price
        size = round(self.random.uniform(0.01, 5.0), 4)
        self.volume[symbol] += size
        self.trades[symbol] += 1
        spread = price * 0.0002
        digits = max(2, 6 - int(math.log10(price)))  # significant digits, as a venue quotes
        return Tick(
            tick_id=uuid.uuid4().hex,
            symbol=symbol,
            event_ts=datetime.now(UTC),
            price=round(price, digits),
            exchange="MOCK",
            venue="mock-1",
            size=size,
            volume=round(self.volume[symbol], 4),
            bid=round(price - spread, digits),
            ask=round(price + spread, digits),
            side="buy" if self.random.random() < 0.5 else "sell",
            trade_id=str(self.trades[symbol]),
            source_seq=self.trades[symbol],
        )


class Rolling24h:
    """A symbol's traded volume and price change over the last 24 hours, in one-minute buckets.

    1,440 buckets a symbol whatever the tick rate (a tick list would hold 864,000 at 10/s); the
    window's edge is therefore a minute wide: the change is against the first price of the oldest
    minute still in the window.
    """

    BUCKET_SECONDS = 60
    WINDOW_SECONDS = 24 * 3600

    def __init__(self) -> None:
        self.buckets: deque[tuple[int, float, float]] = deque()  # (minute, first price, volume)

    def add(self, ts: float, price: float, size: float | None) -> None:
        minute = int(ts // self.BUCKET_SECONDS)
        if self.buckets and self.buckets[-1][0] == minute:
            _, first, volume = self.buckets[-1]
            self.buckets[-1] = (minute, first, volume + (size or 0.0))
        elif not self.buckets or minute > self.buckets[-1][0]:
            self.buckets.append((minute, price, size or 0.0))
        # a tick older than the newest minute (a late replay line) counts in no bucket
        self._expire(ts)

    def _expire(self, now: float) -> None:
        oldest = int((now - self.WINDOW_SECONDS) // self.BUCKET_SECONDS)
        while self.buckets and self.buckets[0][0] <= oldest:
            self.buckets.popleft()

    def summary(self, now: float, last: float) -> tuple[float, float]:
        """(volume, change in percent) over the window ending `now`, for a last price of `last`."""
        self._expire(now)
        if not self.buckets:
            return 0.0, 0.0
        opening = self.buckets[0][1]
        return sum(b[2] for b in self.buckets), (last - opening) / opening * 100.0


class TickerView(BaseModel):
    """One row of `GET /tickers`: the seeds' shape. Null prices for a symbol that has not ticked yet."""

    symbol: str
    last_price: float | None
    bid: float | None
    ask: float | None
    volume_24h: float
    change_24h: float = Field(description="percent change of the last price over 24 hours")
    timestamp: int | None = Field(description="the last tick's time, epoch milliseconds")


class Gateway:
    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.latest: dict[str, Tick] = {}
        self.windows = {symbol: Rolling24h() for symbol in settings.symbols}
        self.feed = MockFeed(settings.symbols, prices=start_prices(settings.symbols, settings.MOCK_START_PRICES))

    def seen(self, tick: Tick) -> None:
        self.latest[tick.symbol] = tick
        if (window := self.windows.get(tick.symbol)) is not None:
            window.add(tick.event_ts.timestamp(), tick.price, tick.size)

    def ticker(self, symbol: str, now: float) -> TickerView:
        tick = self.latest.get(symbol)
        if tick is None:
            return TickerView(symbol=symbol, last_price=None, bid=None, ask=None, volume_24h=0.0, change_24h=0.0,
                              timestamp=None)  # fmt: skip
        volume, change = self.windows[symbol].summary(now, tick.price)
        return TickerView(symbol=symbol, last_price=tick.price, bid=tick.bid, ask=tick.ask, volume_24h=round(volume, 8),
                          change_24h=round(change, 4), timestamp=epoch_ms(tick.event_ts))  # fmt: skip

    async def publish(self, nc: Client, tick: Tick, source: str) -> None:
        with TRACER.start_as_current_span("tick.publish"):
            headers = tracing.inject({"Nats-Msg-Id": tick.tick_id})
            await nc.publish(f"market.tick.{tick.symbol}", tick_json(tick), headers=headers)
        self.seen(tick)
        PUBLISHED.labels(source).inc()

    async def mock(self, nc: Client, stop: asyncio.Event) -> None:
        if self.settings.TICK_RATE <= 0:
            return
        interval = 1.0 / self.settings.TICK_RATE
        next_at = time.monotonic()
        while not stop.is_set():
            for symbol in self.settings.symbols:
                await self.publish(nc, self.feed.tick(symbol), "mock")
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def replay(self, nc: Client, path: Path) -> int:
        """Publish every valid line of a JSON-lines file; invalid lines are counted and logged."""
        sent = 0
        js = nc.jetstream()
        content = await asyncio.to_thread(path.read_bytes)
        for number, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                tick = parse_tick(line)
            except InvalidMessageError as exc:
                REJECTED.inc()
                log.warning("replay line %d rejected: %s", number, exc)
                continue
            # Stored for sure (publish ack), and deduplicated by the stream on its tick id.
            await js.publish(f"market.tick.{tick.symbol}", tick_json(tick), headers={"Nats-Msg-Id": tick.tick_id})
            self.seen(tick)
            PUBLISHED.labels("replay").inc()
            sent += 1
        return sent


def create(settings: ServiceSettings) -> FastAPI:
    gateway = Gateway(settings)
    workers: list[bus.Worker] = [gateway.mock]
    if settings.REPLAY_FILE:
        replay_file = Path(settings.REPLAY_FILE)
        workers.append(lambda nc, _stop: gateway.replay(nc, replay_file))
    app = bus.worker_app(settings, workers)

    webproxy.add_routes(app, settings.TRADING_API_URL, settings.STREAM_MAX_CLIENTS)
    app.mount("/dashboard", StaticFiles(directory=DASHBOARD, html=True), name="dashboard")

    @app.get("/", include_in_schema=False)
    async def home() -> RedirectResponse:
        return RedirectResponse("/dashboard/")

    @app.get("/tickers")
    async def tickers() -> list[TickerView]:
        """Every configured symbol, in the seeds' shape."""
        now = time.time()
        return [gateway.ticker(symbol, now) for symbol in settings.symbols]

    @app.get("/ticker/{symbol}", responses={404: {"description": "not a configured symbol"}})
    async def ticker(symbol: str) -> TickerView:
        symbol = symbol.upper()
        if symbol not in gateway.windows:
            raise HTTPException(404, f"unknown symbol {symbol[:40]}; known: {', '.join(settings.symbols)}")
        return gateway.ticker(symbol, time.time())

    return app
