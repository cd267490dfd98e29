"""Orders in Redis: claimed once per client order id, changed only by compare-and-set.

The OMS (create, reject, route, cancel) and exeq (fills) both move orders. Every move reads
the stored order, applies the state machine in `trading`, and writes back only if the stored
order is still the one it read (a Lua compare-and-set, one round trip), so a cancel racing a
fill ends in exactly one of them, never in a mix.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from tradingstack_services.trading import Order, OrderStatus

log = logging.getLogger(__name__)
ORDER_KEY = "tradingstack:order:"
CLIENT_KEY = "tradingstack:client-order:"
# Routed orders whose publish to JetStream is not confirmed yet, scored by claim time: the OMS
# (a retry of the same client id, or its recovery pass) publishes them until one is acknowledged.
UNROUTED_KEY = "tradingstack:oms:unrouted"


def client_key(account: str | None, client_order_id: str) -> str:
    """Client order ids are each account's own: `desk-a/c-1` and `desk-b/c-1` are two orders.
    (Account names and client ids have no `/`; without accounts the key is as it always was.)"""
    return CLIENT_KEY + (f"{account}/{client_order_id}" if account else client_order_id)


# Every status change but "routed" (whose record is the routing message itself) is appended to this
# Redis stream in the same Lua step that makes it, and published from there to JetStream
# (`orders.{status}.{SYMBOL}`) by `publish_events`: a change is never made without its record.
EVENTS_KEY = "tradingstack:order-events"
EVENTS_GROUP = "publishers"
# An event a publisher took but did not acknowledge (it died) is taken over after this long; a
# publisher looks for such events (and its own unacknowledged ones) every EVENT_RECOVER_SECONDS,
# and waits up to EVENT_WAIT_MS for new ones in between.
EVENT_CLAIM_IDLE_MS = 30_000
EVENT_RECOVER_SECONDS = 10.0
EVENT_WAIT_MS = 100
# How often a compare-and-set is retried when another writer moved the order in between.
CAS_ATTEMPTS = 20

# A final order (filled, cancelled, rejected) and its client id expire after the retention
# (ARGV ttl > 0); a live one never does.
_CLAIM = """
local existing = redis.call('GET', KEYS[1])
if existing then return existing end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
if ARGV[4] == '1' then redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1]) end
if tonumber(ARGV[5]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end
if ARGV[6] == '1' then redis.call('XADD', KEYS[4], '*', 'order', ARGV[2]) end
return false
"""
_CAS = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  if tonumber(ARGV[3]) > 0 then
    redis.call('EXPIRE', KEYS[1], ARGV[3])
    redis.call('EXPIRE', KEYS[2], ARGV[3])
  end
  if ARGV[4] == '1' then redis.call('XADD', KEYS[3], '*', 'order', ARGV[2]) end
  return 1
end
return 0
"""


class ConflictError(RuntimeError):
    """The order kept changing under us: the move was not made."""


class UnknownOrderError(LookupError):
    """No order has that id."""


class ExpiredOrderError(ConflictError):
    """A client order id whose order expired (final, older than the retention): the id cannot be reused yet."""


@dataclass(frozen=True)
class Stored:
    """An order and the exact bytes it was stored as (the compare-and-set compares those)."""

    order: Order
    raw: bytes

    @classmethod
    def of(cls, order: Order) -> Stored:
        return cls(order, order.model_dump_json().encode())


class OrderStore:
    def __init__(self, redis: aioredis.Redis, retention_seconds: int = 7 * 24 * 3600) -> None:
        self.redis = redis
        self.retention = retention_seconds
        self._claim = redis.register_script(_CLAIM)
        self._cas = redis.register_script(_CAS)
        self._cas_loaded = False

    async def claim(self, order: Order, unrouted: bool = False) -> tuple[Stored, bool]:
        """Store an order under its client order id, atomically; if that id is taken, the order it names.

        `unrouted` also records, in the same step, that the order still has to reach JetStream
        (`routed()` clears that), so a crash right after the claim cannot strand it.
        Returns (stored order, created). One round trip when the id is new.
        """
        stored = Stored.of(order)
        claim = client_key(order.account, order.client_order_id)
        existing = await self._claim(
            keys=[claim, ORDER_KEY + order.order_id, UNROUTED_KEY, EVENTS_KEY],
            args=[order.order_id, stored.raw, time.time(), "1" if unrouted else "0", self._ttl(order),
                  _recorded(order)],
        )  # fmt: skip
        if existing is None:
            return stored, True
        order_id = existing.decode() if isinstance(existing, bytes) else str(existing)
        found = await self.get(order_id)
        if found is None:
            raise ExpiredOrderError(
                f"client_order_id {order.client_order_id} named order {order_id}, which has expired; use a new id"
            )
        return found, False

    def _ttl(self, order: Order) -> int:
        return self.retention if order.terminal else 0

    async def find(self, client_order_id: str, account: str | None = None) -> Stored | None:
        """The order an account's client order id names, if any."""
        order_id = await self.redis.get(client_key(account, client_order_id))
        if order_id is None:
            return None
        return await self.get(order_id.decode() if isinstance(order_id, bytes) else str(order_id))

    async def routed(self, order_id: str) -> None:
        """JetStream acknowledged the order's routing message."""
        await self.redis.zrem(UNROUTED_KEY, order_id)

    async def is_unrouted(self, order_id: str) -> bool:
        return await self.redis.zscore(UNROUTED_KEY, order_id) is not None

    async def unrouted(self, older_than: float) -> list[str]:
        """Orders claimed more than `older_than` seconds ago whose routing is still unconfirmed."""
        ids = await self.redis.zrangebyscore(UNROUTED_KEY, "-inf", time.time() - older_than)
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]

    async def publish_events(self, js: Any, consumer: str, count: int = 256, recover: bool = False) -> int:
        """Publish recorded status changes to JetStream, each acknowledged there before it leaves Redis.

        New events are waited for up to EVENT_WAIT_MS. With `recover` (at start and now and then),
        first this publisher's own unacknowledged events (a failed publish, or this pod before a
        restart) and those another publisher left idle (it died). Deduplicated by `Nats-Msg-Id`
        (order id, status, filled quantity): an event published twice is stored once. A batch is
        published concurrently and acknowledged in one round trip. Returns how many were published.
        """
        if recover:
            with contextlib.suppress(aioredis.ResponseError):  # BUSYGROUP: it exists
                await self.redis.xgroup_create(EVENTS_KEY, EVENTS_GROUP, id="0", mkstream=True)
            mine: Any = await self.redis.xreadgroup(EVENTS_GROUP, consumer, {EVENTS_KEY: "0"}, count=count)
            taken: Any = await self.redis.xautoclaim(EVENTS_KEY, EVENTS_GROUP, consumer, EVENT_CLAIM_IDLE_MS,
                                                     count=count)  # fmt: skip
            entries: list[Any] = [e for _, got in mine for e in got] + list(taken[1])  # [next, entries, ...]
        else:
            fresh: Any = await self.redis.xreadgroup(EVENTS_GROUP, consumer, {EVENTS_KEY: ">"}, count=count,
                                                     block=EVENT_WAIT_MS)  # fmt: skip
            entries = [e for _, got in fresh or [] for e in got]
        entries = list({entry[0]: entry for entry in entries}.values())  # an id may come twice
        if not entries:
            return 0
        publishes = []
        for _, fields in entries:
            raw = fields.get(b"order") or fields.get("order") or b"{}"
            data = raw if isinstance(raw, bytes) else str(raw).encode()
            order = Order.model_validate_json(data)
            msg_id = f"{order.order_id}:{order.status.value}:{order.filled_quantity}"
            subject = f"orders.{order.status.value}.{order.symbol}"
            publishes.append(js.publish(subject, data, headers={"Nats-Msg-Id": msg_id}))
        await asyncio.gather(*publishes)  # any failure: none is acknowledged, all come back
        ids = [entry_id for entry_id, _ in entries]
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(EVENTS_KEY, EVENTS_GROUP, *ids)
            pipe.xdel(EVENTS_KEY, *ids)
            await pipe.execute()
        return len(entries)

    async def publish_events_forever(self, nc: Any, stop: asyncio.Event) -> None:
        """Worker: publish recorded status changes as they come until stopped."""
        js = nc.jetstream()
        consumer = f"{socket.gethostname()}-{os.getpid()}"
        recovered_at = 0.0
        while not stop.is_set():
            recover = time.monotonic() - recovered_at >= EVENT_RECOVER_SECONDS
            try:
                await self.publish_events(js, consumer, recover=recover)
                if recover:
                    recovered_at = time.monotonic()
            except Exception as exc:  # NATS or Redis away: the events wait in Redis
                log.warning("order events not published yet: %s", exc)
                recovered_at = 0.0  # what failed is ours and unacknowledged: take it up again first
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)

    async def get(self, order_id: str) -> Stored | None:
        raw = await self.redis.get(ORDER_KEY + order_id)
        if raw is None:
            return None
        data = raw if isinstance(raw, bytes) else raw.encode()
        return Stored(Order.model_validate_json(data), data)

    async def replace(self, current: Stored, new: Order) -> Stored | None:
        """Write `new` if the order is still `current`; None if someone moved it first."""
        stored = Stored.of(new)
        swapped = await self._cas(
            keys=[ORDER_KEY + new.order_id, client_key(new.account, new.client_order_id), EVENTS_KEY],
            args=[current.raw, stored.raw, self._ttl(new), _recorded(new)],
        )
        return stored if swapped else None

    async def replace_many(self, pairs: list[tuple[Stored, Order]]) -> list[bool]:
        """`replace` for many orders in one pipeline (one round trip for the batch); which of them stuck.

        EVALSHA directly: redis-py would first ask whether the script exists, a second round trip.
        A failure (NOSCRIPT after a Redis restart, say) counts as not stuck: the caller's careful
        path (`move`) reloads the script.
        """
        if not self._cas_loaded:
            await self.redis.script_load(_CAS)
            self._cas_loaded = True
        async with self.redis.pipeline(transaction=False) as pipe:
            for current, new in pairs:
                pipe.evalsha(self._cas.sha, 3, ORDER_KEY + new.order_id, client_key(new.account, new.client_order_id),
                             EVENTS_KEY, current.raw, Stored.of(new).raw, self._ttl(new), _recorded(new))  # fmt: skip
            results = await pipe.execute(raise_on_error=False)
        if any(isinstance(r, Exception) for r in results):
            self._cas_loaded = False
        return [r == 1 for r in results]

    async def move(self, order_id: str, change: Callable[[Order], Order], current: Stored | None = None) -> Stored:
        """Apply `change` (which may raise TransitionError) to the stored order until it sticks."""
        for _ in range(CAS_ATTEMPTS):
            current = current or await self.get(order_id)
            if current is None:
                raise UnknownOrderError(f"no order {order_id}")
            stored = await self.replace(current, change(current.order))
            if stored is not None:
                return stored
            current = None
        raise ConflictError(f"order {order_id} kept changing; gave up after {CAS_ATTEMPTS} attempts")


def _recorded(order: Order) -> str:
    """'1' when this status change is recorded as an event ('routed' is recorded by its routing message)."""
    return "0" if order.status is OrderStatus.ROUTED else "1"
