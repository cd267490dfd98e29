"""`GET /stream`: live order, fill, position and ticker updates for a UI, as Server-Sent Events.

Orders and fills come from their JetStream streams (ORDERS `orders.>`, FILLS `fills.>`) through
ordered consumers, so they arrive complete and in order. Each order or fill event's id is
`<ORDERS sequence>-<FILLS sequence>` of the newest message sent from each stream; a client that
reconnects with `Last-Event-ID` (browsers' EventSource does so by itself) resumes right after
both: no gap, no repeat. The first event, `hello`, carries the position the stream starts from,
so a UI opens the stream, then loads the blotter (`GET /orders`): whatever changes after the
load comes on the stream.

Positions and tickers are state, not history: the current positions (pnl's record in Redis) and
quotes are sent when the stream opens, then each change (pnl's `positions.>` events; quotes at
most TICKER_INTERVAL apart per symbol). A client that falls too far behind gets a `reset` event
and the stream ends; it reconnects with its Last-Event-ID and catches up from JetStream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api as js_api
from prometheus_client import Gauge
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tradingstack_services.marketdata.prices import PriceBook, Quote
from tradingstack_services.trading.pnl import DETAILS_KEY

log = logging.getLogger(__name__)
CLIENTS = Gauge("tradingstack_oms_stream_clients", "Clients following GET /stream")
SOURCES = (("orders", "ORDERS", "orders.>"), ("fills", "FILLS", "fills.>"))
EVENT_ID = re.compile(r"^(\d{1,19})-(\d{1,19})$")
TICKER_INTERVAL = 0.25
KEEPALIVE_SECONDS = 15.0
# Events held for one slow client before it is told to reconnect (it loses nothing: it resumes).
MAX_BACKLOG = 10_000


class BadEventIdError(ValueError):
    """A Last-Event-ID this stream did not give out."""


def parse_event_id(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    match = EVENT_ID.match(text.strip())
    if match is None:
        raise BadEventIdError("Last-Event-ID: not an id this stream gave out (`<orders seq>-<fills seq>`)")
    return int(match[1]), int(match[2])


def sse(event: str, data: Any, event_id: str | None = None) -> bytes:
    """One Server-Sent Event (html.spec.whatwg.org/multipage/server-sent-events.html): JSON data on one line."""
    head = f"id: {event_id}\n" if event_id else ""
    body = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"{head}event: {event}\ndata: {body}\n\n".encode()


def ticker_data(quote: Quote) -> dict[str, Any]:
    return {"symbol": quote.symbol, "last_price": quote.last, "bid": quote.bid, "ask": quote.ask}


@dataclass
class Follower:
    """One client's stream: a bounded queue its sources fill and its response drains."""

    account: str | None
    queue: asyncio.Queue[tuple[str, Any, str | None]]
    last: dict[str, int]
    overflowed: bool = False

    def visible(self, data: dict[str, Any]) -> bool:
        return self.account is None or data.get("account") == self.account

    def put(self, event: str, data: Any, event_id: str | None = None) -> None:
        if self.overflowed:
            return
        try:
            self.queue.put_nowait((event, data, event_id))
        except asyncio.QueueFull:
            self.overflowed = True


class StreamsFullError(Exception):
    """Every stream slot is taken."""


class Slot:
    """One client's place among STREAM_MAX_CLIENTS; `release` gives it back (once, however often called)."""

    def __init__(self, stream: LiveStream) -> None:
        self.stream = stream
        self.held = True
        stream.clients += 1
        CLIENTS.inc()

    def release(self) -> None:
        if self.held:
            self.held = False
            self.stream.clients -= 1
            CLIENTS.dec()


class SlotResponse(StreamingResponse):
    """A live stream's response: its slot is given back when the response ends, even one whose
    events never started (the client left before the first byte)."""

    def __init__(self, content: AsyncIterator[bytes], slot: Slot, **options: Any) -> None:
        super().__init__(content, **options)
        self.slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()


class LiveStream:
    def __init__(self, nats: Callable[[], Client], redis: aioredis.Redis, prices: PriceBook, max_clients: int) -> None:
        self.nats = nats  # raises when not connected: the endpoint answers 503
        self.redis = redis
        self.prices = prices
        # Each client costs two consumers on the NATS server: a bound, so clients cannot exhaust it.
        self.max_clients = max_clients
        self.clients = 0

    def reserve(self) -> Slot:
        """A client's slot, taken at once (before anything is awaited, so concurrent connects cannot
        all pass the check); StreamsFullError when every slot is taken."""
        if self.clients >= self.max_clients:
            raise StreamsFullError(f"{self.max_clients} streams are open already (STREAM_MAX_CLIENTS)")
        return Slot(self)

    async def start_positions(self, nc: Client) -> dict[str, int]:
        """Where each source's stream stands now (its last sequence)."""
        js = nc.jetstream()
        return {name: (await js.stream_info(stream)).state.last_seq for name, stream, _ in SOURCES}

    async def events(self, account: str | None, last_event_id: str | None, slot: Slot) -> AsyncIterator[bytes]:
        """The client's events; `slot` (from `reserve`) is given back when the stream ends."""
        subscriptions: list[Any] = []
        try:
            resume = parse_event_id(last_event_id)
            nc = self.nats()
            js = nc.jetstream()
            follower = Follower(account, asyncio.Queue(MAX_BACKLOG), {})
            now = await self.start_positions(nc)
            follower.last = dict(zip((s[0] for s in SOURCES), resume, strict=True)) if resume else dict(now)
            begins = dict(follower.last)  # the sources' callbacks move `last` on from here
            for name, stream, subject in SOURCES:
                first = (await js.stream_info(stream)).state.first_seq
                start = follower.last[name] + 1
                if resume and start < first:  # what it missed has aged out of the stream: it must reload
                    yield sse("reset", {"reason": f"{stream} no longer holds sequence {start}; reload and reconnect"})
                    return
                subscriptions.append(await js.subscribe(
                    subject, stream=stream, ordered_consumer=True, cb=self._source(follower, name),
                    config=js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
                                                 opt_start_seq=start),
                ))  # fmt: skip

            async def on_position(msg: Msg) -> None:
                with contextlib.suppress(ValueError):
                    data = json.loads(msg.data)
                    if isinstance(data, dict) and follower.visible(data):
                        data.pop("fill", None)
                        follower.put("position", data)

            subscriptions.append(await nc.subscribe("positions.>", cb=on_position))
            yield sse("hello", {"orders_seq": begins["orders"], "fills_seq": begins["fills"]}, self._id(begins))
            for raw in (await self.redis.hgetall(DETAILS_KEY)).values():
                position = json.loads(raw)
                if follower.visible(position):
                    yield sse("position", position)
            async for chunk in self._drain(follower):
                yield chunk
        finally:
            slot.release()
            for sub in subscriptions:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    def _source(self, follower: Follower, name: str) -> Callable[[Msg], Any]:
        event = name.removesuffix("s")  # orders -> order, fills -> fill

        async def receive(msg: Msg) -> None:
            seq = msg.metadata.sequence.stream
            try:
                data = json.loads(msg.data)
            except ValueError:
                data = None
            follower.last[name] = seq  # seen, shown or not: a resume starts after it
            event_id = self._id(follower.last)
            if isinstance(data, dict) and follower.visible(data):
                follower.put(event, data, event_id)
            else:
                follower.put("skip", None, event_id)  # moves the client's Last-Event-ID past it

        return receive

    @staticmethod
    def _id(last: dict[str, int]) -> str:
        return f"{last['orders']}-{last['fills']}"

    async def _drain(self, follower: Follower) -> AsyncIterator[bytes]:
        sent_quotes: dict[str, Quote] = {}
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        while True:
            for symbol, quote in list(self.prices.quotes.items()):
                if sent_quotes.get(symbol) is not quote:
                    sent_quotes[symbol] = quote
                    yield sse("ticker", ticker_data(quote))
            try:
                event, data, event_id = await asyncio.wait_for(follower.queue.get(), TICKER_INTERVAL)
            except TimeoutError:
                if loop.time() - quiet_since >= KEEPALIVE_SECONDS:
                    quiet_since = loop.time()
                    yield b": keepalive\n\n"  # keeps proxies from closing an idle stream
                if follower.overflowed and follower.queue.empty():
                    yield sse("reset", {"reason": "too far behind; reconnect with Last-Event-ID to catch up"})
                    return
                continue
            quiet_since = loop.time()
            if event == "skip":
                # Another account's order or fill: nothing to show, but the id moves on (an SSE comment
                # would not carry it), so a resume never replays what this client may not see.
                yield f"id: {event_id}\nevent: skip\ndata: {{}}\n\n".encode()
            else:
                yield sse(event, data, event_id)
