"""Open-order exposure: what an account's live orders could still add to its position.

Risk judges an order against the position plus the open quantity of the account's live orders on
the same side (routed, resting, partially filled), so a hundred resting orders that are each
within `maxPosition` cannot together fill past it. The open quantity is reserved when risk
approves an order and released as the order stops being open:

- a fill: by pnl, in the same transaction that adds the fill to the position (the quantity moves
  from open to position at one instant);
- the unfilled rest of an order that ends (cancelled, given up): by whoever ended it;
- an approval whose order was never stored (a retry that found its first order, a crash in
  between): by the OMS, or by risk's sweep, which releases what belongs to no live order.

An account also has at most `maxOpenOrders` orders holding a reservation at once, so one client
cannot open a million orders (each costs risk, exeq and the compliance-scanner's account state).

Every change is one Lua script, atomic on the server, so concurrent approvals (any number of risk
replicas) never reserve past the limit together. Reservations are per order id: releasing twice
releases once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

OPEN_KEY = "tradingstack:risk:open"  # "{position key}|{side}" -> open quantity
RESERVATIONS_KEY = "tradingstack:risk:reservations"  # order id -> "{position key}|{side}|{open}|{reserved at}"
OPEN_ORDERS_KEY = "tradingstack:risk:open-orders"  # account ("-": open order entry) -> orders holding a reservation

_RESERVE = """
local pos = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') or 0
local q, limit = tonumber(ARGV[3]), tonumber(ARGV[4])
local field = ARGV[1] .. '|' .. ARGV[2]
local open = tonumber(redis.call('HGET', KEYS[2], field) or '0') or 0
local worst = pos - open - q
if ARGV[2] == 'buy' then worst = pos + open + q end
if redis.call('HEXISTS', KEYS[3], ARGV[5]) == 1 then return {1, tostring(worst)} end
local orders = tonumber(redis.call('HGET', KEYS[4], ARGV[7]) or '0') or 0
if orders >= tonumber(ARGV[8]) then return {2, tostring(orders)} end
if math.abs(worst) > limit + 1e-9 then return {0, tostring(worst)} end
redis.call('HINCRBYFLOAT', KEYS[2], field, q)
redis.call('HSET', KEYS[3], ARGV[5], field .. '|' .. ARGV[3] .. '|' .. ARGV[6])
redis.call('HINCRBY', KEYS[4], ARGV[7], 1)
return {1, tostring(worst)}
"""

_RELEASE = """
local r = redis.call('HGET', KEYS[2], ARGV[1])
if not r then return 0 end
local field, left, at = string.match(r, '^(.*)|([^|]+)|([^|]+)$')
left = tonumber(left)
local take = left
if ARGV[2] ~= 'all' then take = math.min(left, tonumber(ARGV[2])) end
local now = tonumber(redis.call('HINCRBYFLOAT', KEYS[1], field, -take))
if math.abs(now) < 1e-9 then redis.call('HDEL', KEYS[1], field) end
left = left - take
if left <= 1e-9 then
  redis.call('HDEL', KEYS[2], ARGV[1])
  local account = string.match(field, '^([^/]*)/') or '-'
  if redis.call('HINCRBY', KEYS[3], account, -1) <= 0 then redis.call('HDEL', KEYS[3], account) end
else
  redis.call('HSET', KEYS[2], ARGV[1], field .. '|' .. string.format('%.17g', left) .. '|' .. at)
end
return 1
"""


@dataclass(frozen=True)
class Reservation:
    reserved: bool
    worst: float = 0.0  # the worst-case position with every open order on the side, this one included
    too_many_orders: int | None = None  # refused for the account's open orders: how many it has


async def reserve(redis: aioredis.Redis, positions_key: str, position: str, side: str, quantity: float,
                  max_position: float, order_id: str, account: str | None,
                  max_open_orders: int) -> Reservation:  # fmt: skip
    """Reserve an approved order's quantity if its account has fewer than `max_open_orders` orders
    holding a reservation and the position plus every open order on its side, plus this one, stays
    within `max_position`."""
    answer: Any = await redis.eval(_RESERVE, 4, positions_key, OPEN_KEY, RESERVATIONS_KEY, OPEN_ORDERS_KEY,
                                   position, side, repr(quantity), repr(max_position), order_id, repr(time.time()),
                                   account or "-", str(max_open_orders))  # fmt: skip
    code, value = int(answer[0]), float(answer[1])
    if code == 2:
        return Reservation(False, too_many_orders=int(value))
    return Reservation(code == 1, worst=value)


def release_command(target: Any, order_id: str, quantity: float | None = None) -> Any:
    """Queue (on a pipeline) or run (on a client) the release of an order's open quantity: `quantity`
    of it (a fill), or all that is left (None: the order ended)."""
    amount = "all" if quantity is None else repr(quantity)
    return target.eval(_RELEASE, 3, OPEN_KEY, RESERVATIONS_KEY, OPEN_ORDERS_KEY, order_id, amount)


async def release(redis: aioredis.Redis, order_id: str, quantity: float | None = None) -> None:
    await release_command(redis, order_id, quantity)


async def open_quantities(redis: aioredis.Redis, position: str) -> tuple[float, float]:
    """The open buy and sell quantity of a position key now."""
    buys, sells = await redis.hmget(OPEN_KEY, [f"{position}|buy", f"{position}|sell"])
    return float(buys or 0.0), float(sells or 0.0)


async def reservations(redis: aioredis.Redis) -> dict[str, tuple[str, float, float]]:
    """Every reservation: order id -> (field, open quantity, reserved at)."""
    found = {}
    for raw_id, raw in (await redis.hgetall(RESERVATIONS_KEY)).items():
        order_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
        field, left, at = (raw.decode() if isinstance(raw, bytes) else str(raw)).rsplit("|", 2)
        found[order_id] = (field, float(left), float(at))
    return found
