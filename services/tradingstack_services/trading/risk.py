"""risk: pre-trade checks against per-symbol limits, over HTTP (`POST /check`) and NATS (`risk.check`).

A request without `price` is valued at the market: the touch for its side (a buy at the ask, a
sell at the bid, the last trade when that side is unknown), from the ticks risk follows on
`market.tick.>`; the OMS values its orders the same way (`trading.touch`).

The check itself is a pure function (microseconds): positions are kept in memory, loaded from
Redis (hash `tradingstack:positions`, which pnl maintains) on start and every
POSITIONS_RESYNC_SECONDS, and updated between loads from pnl's `positions.>` events. An order
being placed (`order_id` given) is then held to its position limit once more on the server,
counting every open order of its account on its side, and its quantity reserved in the same
step (module `exposure`): one Redis call per order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from enum import StrEnum
from typing import Any, Literal

import redis.asyncio as aioredis
from fastapi import FastAPI, HTTPException
from nats.aio.client import Client
from nats.aio.msg import Msg
from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tradingstack.api import RiskLimit
from tradingstack_services.marketdata.prices import PriceBook, Quote
from tradingstack_services.platform import bus, rediskv
from tradingstack_services.platform.settings import ServiceSettings
from tradingstack_services.trading import exposure
from tradingstack_services.trading.model import Order, position_key, touch
from tradingstack_services.trading.orderstore import ORDER_KEY

log = logging.getLogger(__name__)
POSITIONS_KEY = "tradingstack:positions"
CHECKS = Counter("tradingstack_risk_checks_total", "Risk checks", ["approved", "level"])
# Above this share of a limit an approved order is reported HIGH, so humans notice the trend.
WARN_SHARE = 0.8
POSITIONS_RESYNC_SECONDS = 5.0
RESERVATION_SWEEP_SECONDS = 10.0
DEFAULT_MAX_OPEN_ORDERS = 1_000  # spec.maxOpenOrders' default
RESERVATION_GRACE_SECONDS = 30.0
ENDED_GRACE_SECONDS = 600.0
# How long a check waits for the first load of positions before it answers "not ready".
POSITIONS_WAIT_SECONDS = 2.0


class NotReadyError(RuntimeError):
    """Risk cannot decide yet (positions not loaded): the caller should retry, nothing was decided."""


class RiskLevel(StrEnum):
    LOW = "LOW"
    HIGH = "HIGH"
    CRITICAL = "CRITICAL"


class CheckRequest(BaseModel):
    # JSON's NaN and Infinity (and literals that overflow to it) are refused: NaN passes every limit.
    model_config = ConfigDict(allow_inf_nan=False)

    symbol: str = Field(pattern=r"^[A-Z0-9][A-Z0-9_-]{0,31}$")
    quantity: float
    side: Literal["buy", "sell"]
    price: float | None = Field(
        None, gt=0, description="limit price; without it the order is valued at the market (the touch for its side)"
    )
    account: str | None = Field(None, max_length=63, description="whose position and limits apply")
    order_id: str | None = Field(
        None,
        max_length=64,
        description="the order being placed: approved, its quantity is reserved as open "
        "exposure until it fills or ends; without it the check only reads the open orders",
    )


class CheckResult(BaseModel):
    approved: bool
    risk_level: RiskLevel
    reason: str


def load_limits(text: str | None) -> dict[str, RiskLimit]:
    """RISK_LIMITS as the operator renders it (a JSON list of spec.riskLimits)."""
    return by_symbol(json.loads(text or "[]"))


def by_symbol(limits: list[Any]) -> dict[str, RiskLimit]:
    return {limit.symbol: limit for limit in (RiskLimit.model_validate(x) for x in limits)}


class Limits:
    """spec.riskLimits and each account's own, as the operator renders them (RISK_LIMITS,
    RISK_ACCOUNT_LIMITS): risk enforces them, the compliance-scanner reports (near) breaches."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.stack = load_limits(settings.RISK_LIMITS)
        by_account = json.loads(settings.RISK_ACCOUNT_LIMITS or "{}")
        self.accounts = {account: by_symbol(limits) for account, limits in by_account.items()}
        # {"": the stack's maxOpenOrders, account: its own}: RISK_MAX_OPEN_ORDERS as the operator renders it
        self.open_orders: dict[str, int] = json.loads(settings.RISK_MAX_OPEN_ORDERS or "{}")

    def max_open_orders(self, account: str | None) -> int:
        return self.open_orders.get(account or "", self.open_orders.get("", DEFAULT_MAX_OPEN_ORDERS))

    def of(self, symbol: str, account: str | None = None) -> RiskLimit:
        """The account's own limit for the symbol, else the stack's, else the defaults."""
        own = self.accounts.get(account or "", {}).get(symbol)
        return own or self.stack.get(symbol) or RiskLimit(symbol=symbol)


def check(request: CheckRequest, limit: RiskLimit, position: float) -> CheckResult:
    """The decision, pure: same inputs, same answer. `position`: the worst case before this order, the
    position plus the open quantity of the account's live orders on the order's side."""

    def reject(level: RiskLevel, reason: str) -> CheckResult:
        return CheckResult(approved=False, risk_level=level, reason=reason)

    if not math.isfinite(request.quantity) or (request.price is not None and not math.isfinite(request.price)):
        return reject(RiskLevel.CRITICAL, "quantity and price must be finite numbers")
    if request.quantity <= 0:
        return reject(RiskLevel.CRITICAL, "quantity must be positive")
    if request.quantity < limit.min_quantity:
        return reject(RiskLevel.HIGH, f"quantity {request.quantity} below the minimum {limit.min_quantity}")
    if request.quantity > limit.max_quantity:
        return reject(RiskLevel.HIGH, f"quantity {request.quantity} above the maximum {limit.max_quantity}")
    if request.price is None:
        return reject(RiskLevel.CRITICAL, "no price to value the order")
    notional = request.quantity * request.price
    if notional > limit.max_notional:
        return reject(RiskLevel.HIGH, f"notional {notional:.2f} above the maximum {limit.max_notional:.2f}")
    after = position + (request.quantity if request.side == "buy" else -request.quantity)
    if abs(after) > limit.max_position:
        return reject(RiskLevel.CRITICAL, f"position would be {after}, beyond the maximum {limit.max_position}")
    share = max(notional / limit.max_notional, abs(after) / limit.max_position)
    level = RiskLevel.HIGH if share > WARN_SHARE else RiskLevel.LOW
    return CheckResult(approved=True, risk_level=level, reason=f"within limits ({share:.0%} of the tightest)")


def no_market_price(symbol: str) -> CheckResult:
    reason = f"no market price for {symbol} yet (no tick seen); send a price to value the order"
    return CheckResult(approved=False, risk_level=RiskLevel.CRITICAL, reason=reason)


def at_market(request: CheckRequest, quote: Quote | None) -> CheckRequest | None:
    """The request with its price: its own, else the touch for its side; None when there is neither."""
    if request.price is not None:
        return request
    price = touch(request.side, quote.bid, quote.ask, quote.last) if quote else None
    return request.model_copy(update={"price": price}) if price is not None else None


class RiskService:
    def __init__(self, settings: ServiceSettings, redis: aioredis.Redis) -> None:
        self.prices = PriceBook(settings.symbols)
        self.limits = Limits(settings)
        self.redis = redis
        self.positions: dict[str, float] = {}
        self.loaded = asyncio.Event()

    async def evaluate(self, request: CheckRequest) -> CheckResult:
        if not self.loaded.is_set():  # never decide on positions we have not read yet
            try:
                await asyncio.wait_for(self.loaded.wait(), POSITIONS_WAIT_SECONDS)
            except TimeoutError:
                raise NotReadyError("positions not loaded yet (Redis unreachable?); no decision made") from None
        key = position_key(request.account, request.symbol)
        position = self.positions.get(key, 0.0)
        if request.order_id is None:  # a question only: judged with the open orders as they stand
            buys, sells = await exposure.open_quantities(self.redis, key)
            position += buys if request.side == "buy" else -sells
        limit = self.limits.of(request.symbol, request.account)
        valued = at_market(request, self.prices.get(request.symbol))
        if valued is None and math.isfinite(request.quantity) and request.quantity > 0:
            result = no_market_price(request.symbol)
        else:  # a quantity that is refused anyway is refused for that, priced or not
            result = check(valued or request, limit, position)
        if result.approved and request.order_id is not None:
            # The position limit again, on the server, with every open order on the order's side: the
            # reservation and the check are one step, so concurrent approvals cannot pass it together.
            most = self.limits.max_open_orders(request.account)
            held = await exposure.reserve(self.redis, POSITIONS_KEY, key, request.side, request.quantity,
                                          limit.max_position, request.order_id, request.account, most)  # fmt: skip
            if held.too_many_orders is not None:
                result = CheckResult(approved=False, risk_level=RiskLevel.HIGH,
                                     reason=f"{held.too_many_orders} open orders already, the account's maximum "
                                     f"(maxOpenOrders {most})")  # fmt: skip
            elif not held.reserved:
                result = CheckResult(approved=False, risk_level=RiskLevel.CRITICAL,
                                     reason=f"position would be {held.worst:g} with the open orders on its side, "
                                     f"beyond the maximum {limit.max_position:g}")  # fmt: skip
        CHECKS.labels(str(result.approved).lower(), result.risk_level.value).inc()
        return result

    async def sweep_reservations(self, _: Client, stop: asyncio.Event) -> None:
        """Worker: release what no live order holds any more (an approval whose order was never stored,
        an order that ended without its release, as after a crash in between). Only reservations older
        than RESERVATION_GRACE_SECONDS: an order is stored, and a fill applied, within milliseconds."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RESERVATION_SWEEP_SECONDS)
            try:
                await self._sweep(time.time() - RESERVATION_GRACE_SECONDS)
            except Exception as exc:  # Redis away: the next sweep tries again
                log.warning("reservation sweep: %s", exc)

    async def _sweep(self, before: float) -> None:
        old = {order_id: r for order_id, r in (await exposure.reservations(self.redis)).items() if r[2] < before}
        if not old:
            return
        raws = await self.redis.mget([ORDER_KEY + order_id for order_id in old])
        for order_id, raw in zip(old, raws, strict=True):
            order = Order.model_validate_json(raw) if raw else None
            if order is None:  # never stored (or expired long after it ended): nothing holds it
                await exposure.release(self.redis, order_id)
                log.info("released the open quantity of order %s, never stored", order_id)
            elif order.terminal and old[order_id][2] < before - ENDED_GRACE_SECONDS:
                # Ended long ago and still holding: its ending release was lost (a crash between the move and
                # the release), or pnl has not applied its fills for that long. Holding more than is open
                # errs the safe way, so only now.
                await exposure.release(self.redis, order_id)
                log.warning("released the open quantity of order %s, %s long ago", order_id, order.status.value)

    async def load_positions(self) -> None:
        raw = await self.redis.hgetall(POSITIONS_KEY)
        self.positions = {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in raw.items()}
        self.loaded.set()

    async def on_position(self, msg: Msg) -> None:
        try:
            event = json.loads(msg.data)
            self.positions[position_key(event.get("account"), str(event["symbol"]))] = float(event["quantity"])
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("position event ignored: %s", exc)

    async def follow_positions(self, nc: Client, stop: asyncio.Event) -> None:
        """Worker: subscribe to pnl's events first, then load from Redis, and reload now and then
        (core NATS events can be missed across a reconnect; Redis is the record)."""
        sub = await nc.subscribe("positions.>", cb=self.on_position)
        while not stop.is_set():
            try:
                await self.load_positions()
            except Exception as exc:  # Redis away: keep the positions we have, readiness says so
                log.warning("positions not reloaded: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POSITIONS_RESYNC_SECONDS)
        await sub.unsubscribe()

    async def serve_nats(self, nc: Client, stop: Any) -> None:
        async def on_request(msg: Msg) -> None:
            try:
                answer = (await self.evaluate(CheckRequest.model_validate_json(msg.data))).model_dump_json()
            except ValidationError as exc:
                reason = f"invalid request: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"
                answer = CheckResult(approved=False, risk_level=RiskLevel.CRITICAL, reason=reason).model_dump_json()
            except NotReadyError as exc:  # not a decision: the OMS answers its client 503
                answer = json.dumps({"error": str(exc)})
            await msg.respond(answer.encode())

        sub = await nc.subscribe("risk.check", queue="risk", cb=on_request)
        await stop.wait()
        await sub.unsubscribe()


def create(settings: ServiceSettings) -> FastAPI:
    redis, redis_check = rediskv.connect(settings.REDIS_URL, settings.redis_credentials())
    service = RiskService(settings, redis)

    workers: list[bus.Worker] = [
        service.prices.follow,
        service.follow_positions,
        service.serve_nats,
        service.sweep_reservations,
    ]
    app = bus.worker_app(settings, workers, {"redis": redis_check})

    @app.post("/check", responses={503: {"description": "positions not loaded yet; retry after Retry-After"}})
    async def check_order(request: CheckRequest) -> CheckResult:
        """A question only: over HTTP nothing is reserved (orders are checked by the OMS, over NATS)."""
        try:
            return await service.evaluate(request.model_copy(update={"order_id": None}))
        except NotReadyError as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": "2"}) from exc

    return app
