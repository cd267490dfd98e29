"""exeq: paper execution. Routed orders (`orders.routed.>`) fill against the gateway's latest quotes.

- A market order fills in full at the touch (a buy at the ask, a sell at the bid, the last
  price when the side is unknown). With no quote yet for its symbol it is redelivered later,
  and cancelled (with the reason) after EXEQ_PRICE_ATTEMPTS deliveries.
- A limit order fills when the touch is at or better than its limit, up to the size the tick
  shows, so it can fill in parts; until then it rests (kept in Redis, so a restart keeps it).
- Each fill first moves the order in Redis (compare-and-set: a cancel that got there first
  wins and nothing fills), then goes durably to `fills.{SYMBOL}` with `Nats-Msg-Id` = fill id,
  and is marked published. A crash in between is repaired by publishing the order's recorded
  fills that are not marked (the stream drops one it got just before the crash); the routed
  message is acknowledged only after that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import asdict
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI
from nats.aio.client import Client
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge
from pydantic import ValidationError

from tradingstack_services.marketdata.prices import PriceBook, Quote
from tradingstack_services.marketdata.ticks import InvalidMessageError
from tradingstack_services.platform import auth, bus, rediskv, tracing
from tradingstack_services.platform.settings import ServiceSettings
from tradingstack_services.trading import exposure
from tradingstack_services.trading.model import EPSILON, Fill, Order, OrderStatus, TransitionError, execution_price
from tradingstack_services.trading.orderstore import OrderStore, Stored, UnknownOrderError

log = logging.getLogger(__name__)
RESTING_KEY = "tradingstack:exeq:resting"
# Per order, the fill ids FILLS has stored (publish acknowledged): what a restart need not send again.
PUBLISHED_PREFIX = "tradingstack:exeq:published:"
FILLS = Counter("tradingstack_exeq_fills_total", "Fills published", ["order_type"])
DEAD = Counter("tradingstack_exeq_dead_lettered_total", "Routed messages sent to the dead-letter stream", ["reason"])
RESTING = Gauge("tradingstack_exeq_resting_orders", "Limit orders waiting for a price")
LIVE = (OrderStatus.ROUTED, OrderStatus.PARTIALLY_FILLED)


def fill_quantity(order: Order, quote: Quote) -> float:
    """A market order takes all it wants; a limit order at most what the tick traded."""
    if order.order_type == "limit" and quote.size is not None:
        return min(order.remaining, quote.size)
    return order.remaining


class Exeq:
    def __init__(self, settings: ServiceSettings, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.redis = redis
        self.store = OrderStore(redis, settings.ORDER_RETENTION_SECONDS, settings.DEAD_LETTER_PREFIX)
        self.prices = PriceBook(settings.symbols, on_quote=self.on_quote)
        self.resting: dict[str, dict[str, Order]] = {}  # symbol -> order id -> order
        self.nc: Client | None = None
        self.js: Any = None

    # --- the consumer of routed orders

    async def run(self, nc: Client, stop: Any) -> None:
        self.nc, self.js = nc, nc.jetstream()
        await self.recover()
        await bus.consume(nc, stop, self.settings, self.process, 256, 1.0)

    async def process(self, js: Any, messages: list[Msg]) -> None:
        """A batch of routed orders, with the I/O of the whole batch done together.

        The common case (a routed order that fills now) costs one Redis pipeline of compare-and-sets
        for the batch, fill publishes whose writes coalesce, and acks; anything else (no price,
        resting, cancelled, redelivered, malformed) takes the careful one-by-one path in `handle`.
        """
        fast: list[tuple[Msg, Stored, Order]] = []
        careful: list[Msg] = []
        for msg in messages:
            filled = self._fills_now(msg)
            if filled is None:
                careful.append(msg)
            else:
                fast.append((msg, Stored(filled[0], msg.data), filled[1]))
        swapped = await self.store.replace_many([(current, new) for _, current, new in fast]) if fast else []
        done = [(msg, new) for (msg, _, new), ok in zip(fast, swapped, strict=True) if ok]
        careful += [msg for (msg, _, _), ok in zip(fast, swapped, strict=True) if not ok]
        await asyncio.gather(*(self._publish(new.fills[-1:], msg.headers) for _, new in done))
        await self._confirm([new.fills[-1] for _, new in done], [new for _, new in done])
        for _, new in done:
            FILLS.labels(new.order_type).inc()
            if new.status in LIVE:
                await self.rest(new)  # a limit order filled in part
        for msg in careful:
            await self.handle(js, msg)
        for msg, _ in done:
            await msg.ack()

    def _fills_now(self, msg: Msg) -> tuple[Order, Order] | None:
        """(the routed order, the order after filling it now) when that is all there is to do."""
        try:
            routed = Order.model_validate_json(msg.data)
        except ValidationError:
            return None
        executable = self._executable(routed)
        if executable is None or routed.status is not OrderStatus.ROUTED:
            return None
        quote, price = executable
        try:
            return routed, routed.filled_by(fill_quantity(routed, quote), price)[0]
        except TransitionError:  # nothing it can fill: the careful path says why
            return None

    def _executable(self, order: Order) -> tuple[Quote, float] | None:
        """The quote an order executes against now and its price, or None if it cannot execute yet."""
        quote = self.prices.get(order.symbol)
        price = execution_price(order, quote.bid, quote.ask, quote.last) if quote else None
        return (quote, price) if quote is not None and price is not None else None

    async def handle(self, js: Any, msg: Msg) -> None:
        try:
            routed = Order.model_validate_json(msg.data)
        except ValidationError as exc:
            await self._dead_letter(js, msg, InvalidMessageError("invalid_order", str(exc)))
            return
        # The message holds the order exactly as the OMS stored it: a first compare-and-set against
        # those bytes saves reading it back; if it moved since (cancelled, redelivered), move() rereads.
        current = Stored(routed, msg.data)
        executable = self._executable(routed)
        try:
            if executable is None:
                if routed.order_type == "market":
                    # Give up on the last delivery JetStream will make, if that comes before the attempts.
                    attempts = min(self.settings.EXEQ_PRICE_ATTEMPTS, self.settings.NATS_MAX_DELIVER)
                    if msg.metadata.num_delivered < attempts:
                        await msg.nak(delay=self.settings.EXEQ_RETRY_SECONDS)  # no price yet for this symbol
                        return
                    await self.give_up(routed, f"no price for {routed.symbol} after {msg.metadata.num_delivered} tries")
                else:
                    await self.rest(routed)  # a cancel that came first is found at the first fill attempt
            else:
                quote, price = executable
                filled = await self.execute(routed, fill_quantity(routed, quote), price, current, msg.headers)
                if filled is not None and filled.status in LIVE:
                    await self.rest(filled)
        except UnknownOrderError as exc:
            await self._dead_letter(js, msg, InvalidMessageError("unknown_order", str(exc)))
            return
        await msg.ack()

    async def give_up(self, order: Order, reason: str) -> None:
        """Cancel an order that cannot execute, so it does not wait forever (unless something else moved it)."""
        try:
            stored = await self.store.move(order.order_id, lambda o: o.moved(OrderStatus.CANCELLED, reason=reason))
        except TransitionError:
            return
        # Its unfilled rest is open no more; what it filled leaves exposure as pnl applies the fills.
        await exposure.release(self.redis, order.order_id, stored.order.remaining)
        log.warning("order %s cancelled: %s (%s)", order.order_id, reason, stored.order.status.value)

    async def _dead_letter(self, js: Any, msg: Msg, error: InvalidMessageError) -> None:
        await bus.dead_letter(js, msg, self.settings, error)
        DEAD.labels(error.reason).inc()

    # --- fills

    async def execute(
        self, order: Order, quantity: float, price: float, current: Stored | None = None,
        trace: dict[str, str] | None = None,
    ) -> Order | None:  # fmt: skip
        """Fill up to `quantity` at `price`; the order after it, or None if it could not fill (cancelled, done).

        An order that cannot fill because it is already filled gets its recorded fills republished:
        that finishes the work of an exeq that died between recording a fill and publishing it.
        """
        if quantity <= EPSILON < order.remaining:
            return order  # the tick traded (next to) nothing: no fill now, the order keeps waiting
        try:
            stored = await self.store.move(order.order_id, lambda o: o.filled_by(quantity, price)[0], current)
        except TransitionError as exc:
            current = await self.store.get(order.order_id)
            if current is not None:
                await self.publish_fills(current.order)
                if current.order.status in LIVE and current.order.remaining <= EPSILON:
                    await self.give_up(current.order, f"cannot be filled: {exc}")  # a dust quantity: end it
            await self.unrest(order)
            return None
        filled = stored.order
        await self.publish_fills(filled, only_last=True, trace=trace)
        FILLS.labels(filled.order_type).inc()
        if filled.status not in LIVE:
            await self.unrest(filled)
        return filled

    async def publish_fills(self, order: Order, only_last: bool = False, trace: dict[str, str] | None = None) -> None:
        """Fills to `fills.{SYMBOL}`, each awaited until stored, then marked as published.

        `only_last`: the fill just made. Otherwise every fill of the order not yet marked (what an
        exeq that died between recording a fill and publishing it left undone). The stream drops
        ids it already has within its duplicate window; the marks keep a restart from sending
        fills again long after it, where the stream would store them twice.
        A fill carries the trace context of the order it fills (`trace`: the routed message's headers).
        """
        if only_last or not order.fills:
            fills = order.fills[-1:]
        else:
            marks = await self.redis.smismember(PUBLISHED_PREFIX + order.order_id, [f.fill_id for f in order.fills])
            fills = [f for f, marked in zip(order.fills, marks, strict=True) if not marked]
        await self._publish(fills, trace)
        await self._confirm(fills, [order])
        # The order's new status is recorded with the move itself and published by the event worker.

    async def _publish(self, fills: list[Fill], trace: dict[str, str] | None) -> None:
        for fill in fills:
            headers = {"Nats-Msg-Id": fill.fill_id, **tracing.passthrough(trace)}
            await self.js.publish(f"fills.{fill.symbol}", fill.model_dump_json().encode(), headers=headers)

    async def _confirm(self, fills: list[Fill], orders: list[Order]) -> None:
        """Mark fills as stored by FILLS (one round trip); the marks live as long as their orders."""
        if not fills:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for fill in fills:
                pipe.sadd(PUBLISHED_PREFIX + fill.order_id, fill.fill_id)
            for order_id in {o.order_id for o in orders}:
                pipe.expire(PUBLISHED_PREFIX + order_id, self.settings.ORDER_RETENTION_SECONDS)
            await pipe.execute()

    # --- resting limit orders

    async def rest(self, order: Order) -> None:
        await self.redis.hset(RESTING_KEY, order.order_id, order.symbol)
        self._keep(order)

    async def unrest(self, order: Order) -> None:
        await self.redis.hdel(RESTING_KEY, order.order_id)
        self.resting.get(order.symbol, {}).pop(order.order_id, None)
        self._count_resting()

    def _keep(self, order: Order) -> None:
        self.resting.setdefault(order.symbol, {})[order.order_id] = order
        self._count_resting()

    def _count_resting(self) -> None:
        RESTING.set(sum(len(v) for v in self.resting.values()))

    async def recover(self) -> None:
        """Reload resting orders after a restart; finish what a crash left half done."""
        for raw_id in await self.redis.hkeys(RESTING_KEY):
            order_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            stored = await self.store.get(order_id)
            if stored is not None:
                await self.publish_fills(stored.order)  # fills recorded before a crash reach pnl
            if stored is not None and stored.order.status in LIVE:
                self._keep(stored.order)
            else:
                await self.redis.hdel(RESTING_KEY, order_id)

    async def sweep(self, _: Client, stop: asyncio.Event) -> None:
        """Worker: forget resting orders that ended elsewhere (a cancel at the OMS) without a quote
        ever crossing them, so memory and the resting set hold live orders only."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.EXEQ_SWEEP_SECONDS)
            for order in [o for orders in self.resting.values() for o in orders.values()]:
                try:
                    stored = await self.store.get(order.order_id)
                    if stored is None or stored.order.status not in LIVE:
                        await self.unrest(order)
                except Exception as exc:  # Redis away: the next sweep tries again
                    log.warning("sweep of resting orders: %s", exc)
                    break

    async def on_quote(self, quote: Quote) -> None:
        if self.js is None:
            return
        for order in list(self.resting.get(quote.symbol, {}).values()):
            price = execution_price(order, quote.bid, quote.ask, quote.last)
            if price is None:
                continue
            try:
                filled = await self.execute(order, fill_quantity(order, quote), price)
            except Exception as exc:  # Redis or NATS away: the order still rests and the next quote retries
                log.warning("resting order %s not filled yet: %s", order.order_id, exc)
                continue
            if filled is not None and filled.status in LIVE:
                self._keep(filled)


def create(settings: ServiceSettings) -> FastAPI:
    redis, redis_check = rediskv.connect(settings.REDIS_URL, settings.redis_credentials())
    exeq = Exeq(settings, redis)

    app = bus.worker_app(settings, [exeq.prices.follow, exeq.run, exeq.sweep, exeq.store.publish_events_forever],
                         {"redis": redis_check})  # fmt: skip

    @app.get("/quotes")
    async def quotes() -> list[dict[str, Any]]:
        """The latest quote per symbol: what an order would execute against now."""
        return [asdict(q) for q in exeq.prices.quotes.values()]

    readers = auth.readers(settings)

    @app.get("/resting")
    async def resting(reader: auth.Reader = readers) -> list[Order]:
        """Limit orders waiting for their price: the caller's account's, unless it has role oversight."""
        return [order for orders in exeq.resting.values() for order in orders.values() if reader.sees(order.account)]

    return app
