"""live-gateway: live market data from an exchange's public WebSocket, as ticks on `market.tick.{SYMBOL}`.

An `Adapter` knows one venue: the connections to open for the traded symbols (within the venue's
streams-per-connection limit) and how each frame becomes ticks. The gateway keeps every
connection open: it reconnects with exponential backoff and jitter, never more often than the
venue allows (connection attempts per 5 minutes), resubscribes (the streams are in the URL), and
reconnects a connection that stays silent. Each trade is published with the venue's trade id
(`trade_id`, `source_seq`), the venue's time (`event_ts`) and the receive time (`receive_ts`),
deduplicated by `Nats-Msg-Id`; while NATS is away publishing is retried and reading waits, so
nothing read is dropped. A frame that is not what the venue documents goes to
`{DEAD_LETTER_PREFIX}.{VENUE}.{reason}` with the reason in its headers. A jump in a symbol's trade
ids is a gap (counted, logged); a symbol with no message for LIVE_STALE_SECONDS makes `/readyz`
fail and shows in `tradingstack_live_stale_symbols`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import websockets
from fastapi import FastAPI
from nats.aio.client import Client
from prometheus_client import Counter, Gauge

from tradingstack_services.marketdata.ticks import InvalidMessageError, Tick, tick_json
from tradingstack_services.platform import bus, tracing
from tradingstack_services.platform.settings import ServiceSettings

log = logging.getLogger(__name__)
FRAMES = Counter("tradingstack_live_frames_total", "WebSocket frames received", ["venue", "outcome"])
PUBLISHED = Counter("tradingstack_live_ticks_published_total", "Live trades published", ["venue"])
GAPS = Counter("tradingstack_live_sequence_gaps_total", "Jumps in a symbol's trade ids", ["venue", "symbol"])
MISSED = Counter("tradingstack_live_missed_trades_total", "Trade ids skipped by those jumps", ["venue", "symbol"])
RECONNECTS = Counter("tradingstack_live_reconnects_total", "Connections opened again", ["venue"])
STALE = Gauge("tradingstack_live_stale_symbols", "Symbols with no message for LIVE_STALE_SECONDS", ["venue"])
LAST_MESSAGE = Gauge("tradingstack_live_last_message_timestamp_seconds", "When a symbol's last message came",
                     ["venue", "symbol"])  # fmt: skip
# Reconnect delays: doubling from this, capped at LIVE_RECONNECT_MAX_SECONDS, each scaled by a
# random factor in [0.5, 1) so that many gateways do not come back in step.
RECONNECT_BASE_SECONDS = 0.5
STABLE_SECONDS = 60.0  # a connection that lasted this long resets the backoff


@dataclass
class Frame:
    """What one frame said: the symbol it was about (for staleness) and the trades it carried."""

    symbol: str | None = None
    ticks: list[Tick] = field(default_factory=list)


class Adapter(Protocol):
    venue: str
    # The venue's limits: streams one connection may carry; connection attempts per 5 minutes.
    streams_per_connection: int
    connects_per_5_minutes: int

    def connections(self, symbols: list[str]) -> list[str]: ...

    def parse(self, frame: str | bytes, received: datetime) -> Frame: ...


def _number(payload: dict[str, Any], key: str, positive: bool = True) -> float:
    """A decimal string or number the venue sends; finite, and positive unless said otherwise."""
    value = payload.get(key)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidMessageError("invalid_field", f"{key}: not a number")
    try:
        number = float(value)
    except ValueError:
        raise InvalidMessageError("invalid_field", f"{key}: not a number") from None
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise InvalidMessageError("invalid_field", f"{key}: {number} out of range")
    return number


def _integer(payload: dict[str, Any], key: str) -> int:
    value = payload.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise InvalidMessageError("invalid_field", f"{key}: not a non-negative integer")
    return value


class BinanceSpot:
    """Binance spot public market data: `<symbol>@trade` and `<symbol>@bookTicker` on combined streams.

    From github.com/binance/binance-spot-api-docs, web-socket-streams.md: combined streams are at
    `/stream?streams=a/b/c` and wrap each event as `{"stream": ..., "data": ...}`; stream names are
    lowercase; a connection carries at most 1024 streams and is closed after 24 hours; at most 300
    connection attempts per 5 minutes per IP; the server pings and expects pongs (the websockets
    library answers them). A trade: `{"e": "trade", "E", "s", "t" (trade id), "p", "q", "T" (trade
    time, ms), "m" (buyer is the maker: the seller took), ...}`; a book ticker: `{"u", "s", "b",
    "B", "a", "A"}`.
    """

    venue = "binance"
    streams_per_connection = 1024
    connects_per_5_minutes = 300

    def __init__(self, base_url: str = "wss://stream.binance.com:9443") -> None:
        self.base_url = base_url.rstrip("/")
        self.books: dict[str, tuple[float, float]] = {}

    def connections(self, symbols: list[str]) -> list[str]:
        streams = [f"{s.lower()}@{kind}" for s in symbols for kind in ("trade", "bookTicker")]
        size = self.streams_per_connection
        return [f"{self.base_url}/stream?streams=" + "/".join(streams[i : i + size])
                for i in range(0, len(streams), size)]  # fmt: skip

    def parse(self, frame: str | bytes, received: datetime) -> Frame:
        try:
            data = json.loads(frame)
        except ValueError:  # not JSON, or not UTF-8
            raise InvalidMessageError("malformed_frame", "not a JSON document") from None
        if not isinstance(data, dict):
            raise InvalidMessageError("malformed_frame", "not a JSON object")
        if "id" in data and ("result" in data or "error" in data or "code" in data):
            return Frame()  # the answer to a control message
        payload = data.get("data", data) if "stream" in data else data
        if not isinstance(payload, dict):
            raise InvalidMessageError("malformed_frame", "data is not a JSON object")
        if payload.get("e") == "serverShutdown":
            return Frame()  # the close follows; the gateway reconnects
        symbol = payload.get("s")
        if not isinstance(symbol, str) or not symbol:
            raise InvalidMessageError("invalid_field", "s: no symbol")
        symbol = symbol.upper()
        if payload.get("e") == "trade":
            trade_id = _integer(payload, "t")
            bid, ask = self.books.get(symbol, (None, None))
            tick = Tick(
                tick_id=f"{self.venue}:{symbol}:{trade_id}", symbol=symbol, event_ts=_integer(payload, "T"),
                price=_number(payload, "p"), size=_number(payload, "q", positive=False), bid=bid, ask=ask,
                side="sell" if payload.get("m") is True else "buy", trade_id=str(trade_id), source_seq=trade_id,
                exchange=self.venue, venue=self.venue, receive_ts=received,
            )  # fmt: skip
            return Frame(symbol, [tick])
        if {"u", "b", "a"} <= payload.keys():
            self.books[symbol] = (_number(payload, "b"), _number(payload, "a"))
            return Frame(symbol)
        raise InvalidMessageError("unknown_event", f"event {str(payload.get('e'))[:32]!r}")


ADAPTERS = {"binance": BinanceSpot}


class ConnectLimiter:
    """At most `limit` connection attempts in any 300 s (the venue's per-IP allowance)."""

    def __init__(self, limit: int, window: float = 300.0) -> None:
        self.limit, self.window = limit, window
        self.attempts: deque[float] = deque()

    async def wait(self, stop: asyncio.Event) -> None:
        while len(self.attempts) >= self.limit and not stop.is_set():
            wait = self.window - (time.monotonic() - self.attempts[0])
            if wait <= 0:
                self.attempts.popleft()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
        self.attempts.append(time.monotonic())


class LiveGateway:
    def __init__(self, settings: ServiceSettings, adapter: Adapter) -> None:
        self.settings = settings
        self.adapter = adapter
        self.traded = frozenset(settings.symbols)
        self.last_seq: dict[str, int] = {}
        self.last_message: dict[str, float] = {}
        self.started = time.monotonic()
        self.limiter = ConnectLimiter(adapter.connects_per_5_minutes)
        self.connected: dict[str, bool] = {}

    def headers(self) -> dict[str, str]:
        key = self.settings.LIVE_API_KEY
        return {"X-MBX-APIKEY": key} if key else {}  # never logged: only the header carries it

    async def run(self, nc: Client, stop: asyncio.Event) -> None:
        js = nc.jetstream()
        urls = self.adapter.connections(self.settings.symbols)
        await asyncio.gather(*(self.follow(js, url, stop) for url in urls))

    async def follow(self, js: Any, url: str, stop: asyncio.Event) -> None:
        """Keep one connection open until stopped, reading every frame it brings."""
        failures = 0
        silent_after = self.settings.LIVE_STALE_SECONDS * 2
        while not stop.is_set():
            await self.limiter.wait(stop)
            opened = time.monotonic()
            try:
                async with websockets.connect(url, additional_headers=self.headers(), open_timeout=10,
                                              ping_interval=20, ping_timeout=20, max_size=2**20) as ws:  # fmt: skip
                    self.connected[url] = True
                    log.info("%s: connected (%d streams)", self.adapter.venue, url.count("/") - 2)
                    while not stop.is_set():
                        frame = await self.next_frame(ws, stop, silent_after)
                        if frame is None:
                            if not stop.is_set():
                                log.warning("%s: no frame for %.0f s, reconnecting", self.adapter.venue, silent_after)
                            break
                        await self.handle(js, frame, stop)
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                log.warning("%s: connection lost: %s", self.adapter.venue, f"{type(exc).__name__}: {exc}")
            finally:
                self.connected[url] = False
            if stop.is_set():
                return
            failures = 1 if time.monotonic() - opened >= STABLE_SECONDS else failures + 1
            RECONNECTS.labels(self.adapter.venue).inc()
            delay = min(RECONNECT_BASE_SECONDS * 2 ** (failures - 1), self.settings.LIVE_RECONNECT_MAX_SECONDS)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay * random.uniform(0.5, 1.0))

    @staticmethod
    async def next_frame(ws: Any, stop: asyncio.Event, silent_after: float) -> str | bytes | None:
        """The next frame; None when the connection stayed silent for `silent_after` s or the gateway is
        stopping (a silent feed must not hold up a shutdown: recv is cancelled, which is safe)."""
        receiving = asyncio.ensure_future(ws.recv())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({receiving, stopping}, timeout=silent_after, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not receiving.done():
            receiving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiving
            return None
        frame: str | bytes = receiving.result()  # a closed connection raises here, as recv would
        return frame

    async def handle(self, js: Any, frame: str | bytes, stop: asyncio.Event) -> None:
        venue = self.adapter.venue
        try:
            parsed = self.adapter.parse(frame, datetime.now(UTC))
            for tick in parsed.ticks:
                if tick.symbol not in self.traded:
                    raise InvalidMessageError("unknown_symbol", f"{tick.symbol} is not in SYMBOLS")
        except InvalidMessageError as error:
            FRAMES.labels(venue, error.reason).inc()
            await self.park(js, frame, error, stop)
            return
        except ValueError as exc:  # the tick model refused what the adapter read (pydantic)
            FRAMES.labels(venue, "invalid_tick").inc()
            await self.park(js, frame, InvalidMessageError("invalid_tick", str(exc).splitlines()[0]), stop)
            return
        FRAMES.labels(venue, "ok").inc()
        if parsed.symbol in self.traded:
            self.last_message[parsed.symbol] = time.monotonic()
            LAST_MESSAGE.labels(venue, parsed.symbol).set_to_current_time()
        for tick in parsed.ticks:
            if self.in_sequence(tick):
                await self.publish(js, f"market.tick.{tick.symbol}", tick_json(tick),
                                   tracing.inject({"Nats-Msg-Id": tick.tick_id}), stop)  # fmt: skip
                PUBLISHED.labels(venue).inc()

    def in_sequence(self, tick: Tick) -> bool:
        """False for a trade id already seen; counts a jump past the next one as a gap."""
        seq, last = tick.source_seq, self.last_seq.get(tick.symbol)
        if seq is None:
            return True
        if last is not None and seq <= last:
            return False  # a repeat (a venue resending, or two connections)
        if last is not None and seq > last + 1:
            GAPS.labels(self.adapter.venue, tick.symbol).inc()
            MISSED.labels(self.adapter.venue, tick.symbol).inc(seq - last - 1)
            log.warning("%s %s: trade ids jumped from %d to %d (%d missed)", self.adapter.venue, tick.symbol, last,
                        seq, seq - last - 1)  # fmt: skip
        self.last_seq[tick.symbol] = seq
        return True

    async def publish(self, js: Any, subject: str, data: bytes, headers: dict[str, str], stop: asyncio.Event) -> None:
        """Publish with a JetStream ack, trying again while NATS is away (reading waits meanwhile)."""
        delay = 0.2
        while True:
            try:
                await js.publish(subject, data, headers=headers)
                return
            except Exception as exc:
                if stop.is_set():
                    raise
                log.warning("publish to %s failed, trying again in %.1f s: %s", subject, delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def park(self, js: Any, frame: str | bytes, error: InvalidMessageError, stop: asyncio.Event) -> None:
        data = frame.encode() if isinstance(frame, str) else frame
        headers = {**bus.reason_headers(error, self.settings), "Tradingstack-Venue": self.adapter.venue,
                   "Nats-Msg-Id": "dlq:live:" + hashlib.sha256(data).hexdigest()[:32]}  # fmt: skip
        subject = f"{self.settings.DEAD_LETTER_PREFIX}.{self.adapter.venue.upper()}.{error.reason}"
        log.warning("%s: frame dead-lettered: %s", self.adapter.venue, error)
        await self.publish(js, subject, data, headers, stop)

    def stale(self, now: float | None = None) -> list[str]:
        """Traded symbols with no message for LIVE_STALE_SECONDS (counted from start for those never seen)."""
        now = time.monotonic() if now is None else now
        limit = self.settings.LIVE_STALE_SECONDS
        quiet = sorted(s for s in self.traded if now - self.last_message.get(s, self.started) > limit)
        STALE.labels(self.adapter.venue).set(len(quiet))
        return quiet


def adapter_for(settings: ServiceSettings) -> Adapter:
    venue = ADAPTERS[settings.LIVE_VENUE]
    return venue(settings.LIVE_WS_URL) if settings.LIVE_WS_URL else venue()


def create(settings: ServiceSettings) -> FastAPI:
    gateway = LiveGateway(settings, adapter_for(settings))

    async def feed_check() -> None:
        if not any(gateway.connected.values()):
            raise ConnectionError(f"not connected to {gateway.adapter.venue}")
        quiet = gateway.stale()
        if quiet:
            raise TimeoutError(f"no message for {settings.LIVE_STALE_SECONDS:g} s: {', '.join(quiet)}")

    return bus.worker_app(settings, [gateway.run], {"feed": feed_check})
