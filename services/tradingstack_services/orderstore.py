"""Orders in Redis: claimed once per client order id, changed only by compare-and-set.

The OMS (create, reject, route, cancel) and exeq (fills) both move orders. Every move reads
the stored order, applies the state machine in `trading`, and writes back only if the stored
order is still the one it read (a Lua compare-and-set, one round trip), so a cancel racing a
fill ends in exactly one of them, never in a mix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

from tradingstack_services.trading import Order

ORDER_KEY = "tradingstack:order:"
CLIENT_KEY = "tradingstack:client-order:"
# How often a compare-and-set is retried when another writer moved the order in between.
CAS_ATTEMPTS = 20

_CLAIM = """
local existing = redis.call('GET', KEYS[1])
if existing then return existing end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
return false
"""
_CAS = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


class ConflictError(RuntimeError):
    """The order kept changing under us: the move was not made."""


class UnknownOrderError(LookupError):
    """No order has that id."""


@dataclass(frozen=True)
class Stored:
    """An order and the exact bytes it was stored as (the compare-and-set compares those)."""

    order: Order
    raw: bytes

    @classmethod
    def of(cls, order: Order) -> Stored:
        return cls(order, order.model_dump_json().encode())


class OrderStore:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._claim = redis.register_script(_CLAIM)
        self._cas = redis.register_script(_CAS)
        self._cas_loaded = False

    async def claim(self, order: Order) -> tuple[Stored, bool]:
        """Store an order under its client order id, atomically; if that id is taken, the order it names.

        Returns (stored order, created). One round trip when the id is new.
        """
        stored = Stored.of(order)
        existing = await self._claim(
            keys=[CLIENT_KEY + order.client_order_id, ORDER_KEY + order.order_id], args=[order.order_id, stored.raw]
        )
        if existing is None:
            return stored, True
        order_id = existing.decode() if isinstance(existing, bytes) else str(existing)
        found = await self.get(order_id)
        if found is None:
            raise UnknownOrderError(f"client order id {order.client_order_id} names order {order_id}, which is gone")
        return found, False

    async def get(self, order_id: str) -> Stored | None:
        raw = await self.redis.get(ORDER_KEY + order_id)
        if raw is None:
            return None
        data = raw if isinstance(raw, bytes) else raw.encode()
        return Stored(Order.model_validate_json(data), data)

    async def replace(self, current: Stored, new: Order) -> Stored | None:
        """Write `new` if the order is still `current`; None if someone moved it first."""
        stored = Stored.of(new)
        swapped = await self._cas(keys=[ORDER_KEY + new.order_id], args=[current.raw, stored.raw])
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
                pipe.evalsha(self._cas.sha, 1, ORDER_KEY + new.order_id, current.raw, Stored.of(new).raw)
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
