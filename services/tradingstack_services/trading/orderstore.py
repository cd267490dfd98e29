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
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import nats.errors
import redis.asyncio as aioredis

from tradingstack_services.trading.model import Order, OrderStatus

log = logging.getLogger(__name__)
ORDER_KEY = "tradingstack:order:"
CLIENT_KEY = "tradingstack:client-order:"
# Routed orders whose publish to JetStream is not confirmed yet, scored by claim time: the OMS
# (a retry of the same client id, or its recovery pass) publishes them until one is acknowledged.
UNROUTED_KEY = "tradingstack:oms:unrouted"
# How long acknowledged routings gather before their marks are cleared in one call.
ROUTED_FLUSH_SECONDS = 0.005


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
redis.call('ZADD', KEYS[5], 0, ARGV[7])
redis.call('ZREMRANGEBYLEX', KEYS[5], '-', '(' .. ARGV[9])
if ARGV[8] == '1' then redis.call('ZADD', KEYS[6], 0, ARGV[7]) end
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
  if ARGV[5] == '1' then redis.call('ZREM', KEYS[4], ARGV[6]) end
  return 1
end
return 0
"""


def _scope(account: str | None) -> str:
    return f":{account}" if account else ""


def timeline_key(account: str | None) -> str:
    """Every order of an account (or of open order entry) by creation time, for the blotter."""
    return "tradingstack:orders:by-time" + _scope(account)


def open_key(account: str | None) -> str:
    """The orders of an account that are not final yet, by creation time (cancel-all, `status=open`)."""
    return "tradingstack:orders:open" + _scope(account)


def index_entry(order: Order) -> str:
    """`<creation time, 16-digit microseconds>:<order id>`: the indexes hold these at one score, so
    they sort by time (then id) and a page ends at an exact entry (the cursor): no gaps, no repeats."""
    return f"{_micros(order.created_at):016d}:{order.order_id}"


def _micros(ts: datetime) -> int:
    return int(ts.timestamp() * 1_000_000)


CURSOR = re.compile(r"^\d{16}:[0-9a-f]{1,64}$")
SCAN_BATCH = 200
# The most index entries one request reads: a filter that matches rarely ends a page early (with a
# cursor to go on from) rather than read a week of orders in one request.
MAX_SCAN = 5_000


@dataclass(frozen=True)
class Page:
    orders: list[Order]
    next_cursor: str | None  # None: nothing older is left


class ConflictError(RuntimeError):
    """The order kept changing under us: the move was not made."""


class EventsNotPublishedError(RuntimeError):
    """Some recorded order events could not be published now (NATS away); they stay in Redis."""


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
    def __init__(self, redis: aioredis.Redis, retention_seconds: int = 7 * 24 * 3600,
                 dead_letter_prefix: str = "dlq") -> None:  # fmt: skip
        self.redis = redis
        self.dead_letter_prefix = dead_letter_prefix
        self.retention = retention_seconds
        self._claim = redis.register_script(_CLAIM)
        self._cas = redis.register_script(_CAS)
        self._cas_loaded = False
        self._routed: set[str] = set()  # acknowledged by JetStream, mark not yet cleared
        self._routed_flusher: asyncio.Task[None] | None = None

    async def claim(self, order: Order, unrouted: bool = False) -> tuple[Stored, bool]:
        """Store an order under its client order id, atomically; if that id is taken, the order it names.

        `unrouted` also records, in the same step, that the order still has to reach JetStream
        (`routed()` clears that), so a crash right after the claim cannot strand it.
        Returns (stored order, created). One round trip when the id is new.
        """
        stored = Stored.of(order)
        claim = client_key(order.account, order.client_order_id)
        # The blotter keeps orders as long as final orders are kept (older entries are trimmed here);
        # the open set keeps a live order until it is final.
        horizon = f"{_micros(order.created_at) - self.retention * 1_000_000:016d}"
        existing = await self._claim(
            keys=[claim, ORDER_KEY + order.order_id, UNROUTED_KEY, EVENTS_KEY, timeline_key(order.account),
                  open_key(order.account)],
            args=[order.order_id, stored.raw, time.time(), "1" if unrouted else "0", self._ttl(order),
                  _recorded(order), index_entry(order), "0" if order.terminal else "1", horizon],
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

    def mark_routed(self, order_id: str) -> None:
        """JetStream acknowledged the order's routing message: its mark is cleared shortly after, with
        the marks of every order acknowledged meanwhile, in one call (a round trip per burst, not per
        order). Until then a retry or the recovery pass may publish the order again, which JetStream
        stores once (deduplicated by order id): a late clear costs a duplicate publish, never an order."""
        self._routed.add(order_id)
        if self._routed_flusher is None or self._routed_flusher.done():
            self._routed_flusher = asyncio.create_task(self._flush_routed())

    async def routed_flushed(self) -> None:
        """Wait until every mark given to `mark_routed` so far is cleared."""
        while self._routed_flusher is not None and not self._routed_flusher.done():
            await asyncio.shield(self._routed_flusher)

    async def _flush_routed(self) -> None:
        while self._routed:
            await asyncio.sleep(ROUTED_FLUSH_SECONDS)  # the rest of the burst adds theirs
            batch, self._routed = self._routed, set()
            try:
                await self.redis.zrem(UNROUTED_KEY, *batch)
            except Exception as exc:  # Redis away: keep them; no new order is claimed meanwhile anyway
                self._routed |= batch
                log.warning("%d routing mark(s) not cleared yet: %s", len(batch), exc)
                await asyncio.sleep(1.0)

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
        outcomes = await asyncio.gather(*(self._publish_event(js, fields) for _, fields in entries),
                                        return_exceptions=True)  # fmt: skip
        # Published, or parked in the dead-letter stream: done. Anything else (NATS away) stays pending
        # and comes back with the next recovery, without holding back the events after it.
        done = [entry_id for (entry_id, _), outcome in zip(entries, outcomes, strict=True) if outcome is None]
        failed = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if done:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xack(EVENTS_KEY, EVENTS_GROUP, *done)
                pipe.xdel(EVENTS_KEY, *done)
                await pipe.execute()
        if failed:
            raise EventsNotPublishedError(f"{len(failed)} of {len(entries)} order events not published yet: "
                                          f"{type(failed[0]).__name__}: {failed[0]}")  # fmt: skip
        return len(done)

    async def _publish_event(self, js: Any, fields: Any) -> None:
        """One recorded status change to `orders.{status}.{SYMBOL}` as a bounded event (`Order.event`).

        One that cannot be an event (unreadable, or over the server's max_payload) goes to
        `{dead letter prefix}.ORDERS.{reason}` with the reason, instead of blocking every event behind it.
        """
        raw = fields.get(b"order") or fields.get("order") or b"{}"
        data = raw if isinstance(raw, bytes) else str(raw).encode()
        try:
            order = Order.model_validate_json(data)
        except ValueError as exc:
            await self._dead_letter(js, "invalid_order_event", str(exc), data[:4096])
            return
        event = order.event()
        msg_id = f"{order.order_id}:{order.status.value}:{order.filled_quantity}"
        try:
            await js.publish(f"orders.{order.status.value}.{order.symbol}", event, headers={"Nats-Msg-Id": msg_id})
        except nats.errors.MaxPayloadError as exc:
            await self._dead_letter(js, "too_large", f"{len(event)} bytes: {exc}", event[:4096], msg_id)

    async def _dead_letter(self, js: Any, reason: str, detail: str, data: bytes, msg_id: str | None = None) -> None:
        headers = {"Tradingstack-Reason": reason, "Tradingstack-Detail": detail[:512],
                   "Tradingstack-Stream": "ORDERS", **({"Nats-Msg-Id": f"dlq:{msg_id}"} if msg_id else {})}  # fmt: skip
        await js.publish(f"{self.dead_letter_prefix}.ORDERS.{reason}", data, headers=headers)
        log.warning("order event dead-lettered (%s): %s", reason, detail[:200])

    async def publish_events_forever(self, nc: Any, stop: asyncio.Event) -> None:
        """Worker: publish recorded status changes as they come until stopped."""
        js = nc.jetstream()
        consumer = f"{socket.gethostname()}-{os.getpid()}"
        recovered_at = 0.0
        while not stop.is_set():
            recover = time.monotonic() - recovered_at >= EVENT_RECOVER_SECONDS
            try:
                if recover:
                    recovered_at = time.monotonic()  # even if some fail again: newer events go on meanwhile
                await self.publish_events(js, consumer, recover=recover)
            except Exception as exc:  # NATS or Redis away: the events wait in Redis, taken up at the next recovery
                log.warning("order events not published yet: %s", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)

    async def page(
        self,
        account: str | None,
        wanted: Callable[[Order], bool],
        limit: int,
        cursor: str | None = None,
        since: datetime | None = None,
        only_open: bool = False,
    ) -> Page:
        """Orders of an account that `wanted` accepts, newest first, after `cursor` (an index entry
        a previous page ended at) and created at or after `since`. Entries whose order has expired
        are dropped from the index on the way."""
        if cursor is not None and not CURSOR.match(cursor):
            raise ValueError("cursor: not one this API gave out")
        key = open_key(account) if only_open else timeline_key(account)
        top = f"({cursor}" if cursor else "+"
        bottom = f"[{_micros(since):016d}" if since else "-"
        found: list[Order] = []
        scanned = 0
        last: str | None = None
        while scanned < MAX_SCAN:
            entries = [e.decode() if isinstance(e, bytes) else str(e) for e in
                       await self.redis.zrevrangebylex(key, top, bottom, start=0, num=SCAN_BATCH)]  # fmt: skip
            if not entries:
                return Page(found, None)
            raws = await self.redis.mget([ORDER_KEY + e.partition(":")[2] for e in entries])
            gone = []
            for entry, raw in zip(entries, raws, strict=True):
                scanned += 1
                last = entry
                if raw is None:
                    gone.append(entry)
                    continue
                order = Order.model_validate_json(raw)
                if wanted(order):
                    found.append(order)
                    if len(found) >= limit:
                        break
            if gone:
                await self.redis.zrem(key, *gone)
            if len(found) >= limit:
                break
            top = f"({last}"
        return Page(found, last)

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
            keys=[ORDER_KEY + new.order_id, client_key(new.account, new.client_order_id), EVENTS_KEY,
                  open_key(new.account)],
            args=[current.raw, stored.raw, self._ttl(new), _recorded(new), "1" if new.terminal else "0",
                  index_entry(new)],
        )  # fmt: skip
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
                pipe.evalsha(self._cas.sha, 4, ORDER_KEY + new.order_id, client_key(new.account, new.client_order_id),
                             EVENTS_KEY, open_key(new.account), current.raw, Stored.of(new).raw, self._ttl(new),
                             _recorded(new), "1" if new.terminal else "0", index_entry(new))  # fmt: skip
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
