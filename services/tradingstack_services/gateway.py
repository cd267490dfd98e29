"""gateway: market data onto NATS, `market.tick.{SYMBOL}`, from a mock feed or a replay file.

Each tick carries `Nats-Msg-Id: <tick_id>`, so a replay inside the stream's duplicate window
is stored once. `GET /tickers` and `GET /ticker/{symbol}` serve the latest tick per symbol.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from nats.aio.client import Client
from prometheus_client import Counter

from tradingstack_services import bus, tracing
from tradingstack_services.settings import ServiceSettings
from tradingstack_services.ticks import InvalidMessageError, Tick, parse_tick, tick_json

log = logging.getLogger(__name__)
PUBLISHED = Counter("tradingstack_gateway_ticks_published_total", "Ticks published", ["source"])
REJECTED = Counter("tradingstack_gateway_replay_rejected_total", "Replay lines that were not valid ticks")
TRACER = tracing.tracer("tradingstack.gateway")


class MockFeed:
    """A random walk per symbol: realistic enough to exercise the pipeline."""

    def __init__(self, symbols: list[str], seed: int | None = None) -> None:
        self.random = random.Random(seed)
        self.prices = {s: 100.0 + 10 * i for i, s in enumerate(symbols)}
        self.volume = dict.fromkeys(symbols, 0.0)

    def tick(self, symbol: str) -> Tick:
        price = max(0.01, self.prices[symbol] * (1 + self.random.gauss(0, 0.0005)))
        self.prices[symbol] = price
        size = round(self.random.uniform(0.01, 5.0), 4)
        self.volume[symbol] += size
        spread = price * 0.0002
        return Tick(
            tick_id=uuid.uuid4().hex,
            symbol=symbol,
            event_ts=datetime.now(UTC),
            price=round(price, 6),
            exchange="MOCK",
            venue="mock-1",
            size=size,
            volume=round(self.volume[symbol], 4),
            bid=round(price - spread, 6),
            ask=round(price + spread, 6),
        )


class Gateway:
    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.latest: dict[str, Tick] = {}
        self.feed = MockFeed(settings.symbols)

    async def publish(self, nc: Client, tick: Tick, source: str) -> None:
        with TRACER.start_as_current_span("tick.publish"):
            headers = tracing.inject({"Nats-Msg-Id": tick.tick_id})
            await nc.publish(f"market.tick.{tick.symbol}", tick_json(tick), headers=headers)
        self.latest[tick.symbol] = tick
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
            self.latest[tick.symbol] = tick
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

    @app.get("/tickers")
    async def tickers() -> list[dict[str, Any]]:
        return [t.model_dump(mode="json", exclude_none=True) for t in gateway.latest.values()]

    @app.get("/ticker/{symbol}")
    async def ticker(symbol: str) -> dict[str, Any]:
        symbol = symbol.upper()
        if symbol not in settings.symbols:
            raise HTTPException(404, f"unknown symbol {symbol}; known: {', '.join(settings.symbols)}")
        if symbol not in gateway.latest:
            raise HTTPException(404, f"no tick for {symbol} yet")
        return gateway.latest[symbol].model_dump(mode="json", exclude_none=True)

    return app
