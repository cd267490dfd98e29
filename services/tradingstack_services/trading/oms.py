"""oms: order entry. `POST /orders` -> risk check -> routed to exeq (or rejected), state in Redis.

The hot path is three round trips on connections opened once: ask risk (NATS request-reply
on `risk.check`), store the decided order under its client order id (Redis, one Lua call
that also makes a repeated id return the first order), publish it durably on
`orders.routed.{SYMBOL}` (JetStream ack, deduplicated by order id). The order is stored as
routed before it is published, so exeq never sees an order that Redis does not know as routed;
until JetStream acknowledges it, it is marked unrouted and published again by a retry of its
client order id or by the recovery pass, so an accepted order is routed exactly once.
History goes to QuestDB's `orders` table behind the hot path; every status change is also an
event on `orders.{status}.{SYMBOL}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.responses import Response, StreamingResponse
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from prometheus_client import Counter, Histogram
from pydantic import ValidationError

from tradingstack_services.marketdata.prices import PriceBook
from tradingstack_services.platform import auth, bus, ilp, rediskv, tracing
from tradingstack_services.platform.history import History
from tradingstack_services.platform.settings import ServiceSettings
from tradingstack_services.trading import blotter, exposure, livestream
from tradingstack_services.trading.model import Order, OrderRequest, OrderStatus, TransitionError, mid, touch
from tradingstack_services.trading.orderstore import ConflictError, OrderStore, Stored, UnknownOrderError
from tradingstack_services.trading.risk import CheckRequest, CheckResult

log = logging.getLogger(__name__)
ORDERS = Counter("tradingstack_oms_orders_total", "Orders by the status POST /orders answered", ["status"])
LATENCY = Histogram(
    "tradingstack_oms_order_seconds", "POST /orders, decision to answer",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)  # fmt: skip


# The recovery pass runs every REROUTE_INTERVAL seconds and routes orders whose routing has been
# unconfirmed for REROUTE_AFTER seconds (longer than any request takes, so it never races one).
REROUTE_INTERVAL = 2.0
REROUTE_AFTER = 5.0


class ForeignOrderError(Exception):
    """The order exists, and belongs to another account than the caller's."""


class UnavailableError(RuntimeError):
    """A dependency the order needs (risk, NATS) did not answer: nothing was decided."""


def history_line(order: Order) -> str:
    tags = {"symbol": order.symbol, "side": order.side, "order_type": order.order_type, "status": order.status.value}
    fields: dict[str, ilp.Field] = {
        "order_id": order.order_id, "client_order_id": order.client_order_id, "quantity": order.quantity,
        "limit_price": order.limit_price,
    }  # fmt: skip
    return ilp.line("orders", tags, fields, order.updated_at)


class Oms:
    def __init__(self, settings: ServiceSettings, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.store = OrderStore(redis, settings.ORDER_RETENTION_SECONDS, settings.DEAD_LETTER_PREFIX)
        self.prices = PriceBook(settings.symbols)
        self.history = History(settings.QUESTDB_URL, settings.questdb_credentials())
        self.nc: Client | None = None

    async def attach(self, nc: Client, stop: Any) -> None:
        """Worker: keep the connection for the request handlers and follow prices until stopped."""
        self.nc = nc
        await self.prices.follow(nc, stop)

    def _nats(self) -> Client:
        if self.nc is None or not self.nc.is_connected:
            raise UnavailableError("not connected to NATS")
        return self.nc

    async def _event(self, order: Order) -> None:
        """A history row for a status change. Its event on `orders.{status}.{SYMBOL}` was recorded in
        Redis with the change itself and is published by the event worker (the routed event is the
        routing message, `_route`)."""
        self.history.add(history_line(order))

    def price_for(self, request: OrderRequest) -> float | None:
        if request.limit_price is not None:
            return request.limit_price
        quote = self.prices.get(request.symbol)
        return touch(request.side, quote.bid, quote.ask, quote.last) if quote else None

    async def risk_check(self, request: OrderRequest, account: str | None = None,
                         order_id: str | None = None) -> CheckResult:  # fmt: skip
        check = CheckRequest(symbol=request.symbol, quantity=request.quantity, side=request.side,
                             price=self.price_for(request), account=account, order_id=order_id)  # fmt: skip
        try:
            reply = await self._nats().request(
                "risk.check", check.model_dump_json().encode(), timeout=self.settings.RISK_TIMEOUT_SECONDS,
                headers=tracing.inject(),
            )  # fmt: skip
            return CheckResult.model_validate_json(reply.data)
        except (NatsTimeoutError, NoRespondersError, TimeoutError) as exc:
            raise UnavailableError(f"risk did not answer: {type(exc).__name__}") from exc
        except ValidationError as exc:
            raise UnavailableError(f"risk answered something else: {exc}") from exc

    async def place(self, request: OrderRequest, account: str | None = None) -> tuple[Stored, bool]:
        """The order for this request and whether it is new; a retry of a known client id gets the same order.

        Risk decides first and the decided order is then claimed under its client order id in one
        step, so nothing is stored for a request that got no decision (the client retries the same
        id), and two racing requests with one id end with one order. A routed order is claimed with
        a mark that it still has to reach JetStream; the mark goes when JetStream acknowledges it, and
        until then a retry of the same id (or the recovery pass) publishes it again, deduplicated by
        order id. The order is serialised once: the same bytes are stored, routed and answered.
        """
        quote = self.prices.get(request.symbol)
        arrival = mid(quote.bid, quote.ask, quote.last) if quote else None
        order = Order.new(uuid.uuid4().hex, request, account, arrival)
        try:
            result = await self.risk_check(request, account, order.order_id)
        except UnavailableError:
            known = await self.store.find(request.client_order_id, account)  # a retry needs no new decision
            if known is None:
                raise
            return await self._known(known, request), False
        if result.approved:
            decided = order.moved(OrderStatus.RISK_CHECKED, risk_level=result.risk_level).moved(OrderStatus.ROUTED)
        else:
            decided = order.moved(OrderStatus.REJECTED, reason=result.reason, risk_level=result.risk_level)
        routed = decided.status is OrderStatus.ROUTED
        # A claim that fails may still have stored the order (the answer lost): its reservation is left to
        # risk's sweep, which releases it only if no live order of that id exists.
        stored, created = await self.store.claim(decided, unrouted=routed)
        if not created:
            if routed and stored.order.order_id != order.order_id:  # this approval's order is not stored
                await self._release_quietly(order.order_id)
            return await self._known(stored, request), False
        await self._event(decided)
        if routed:
            await self._route(stored)
        return stored, True

    async def _release_quietly(self, order_id: str, quantity: float | None = None) -> None:
        """Give back an approval's open quantity (`quantity` of it, else all); if Redis is away, risk's
        sweep does it later."""
        try:
            await exposure.release(self.store.redis, order_id, quantity)
        except aioredis.RedisError as exc:
            log.warning("open quantity of %s not released now (the sweep will): %s", order_id, exc)

    async def _known(self, stored: Stored, request: OrderRequest) -> Stored:
        """A retry: the same terms get the order (routed now if its first routing did not finish)."""
        if not stored.order.same_request(request):
            raise ConflictError(
                f"client_order_id {request.client_order_id} already names order {stored.order.order_id}, "
                "with different terms"
            )
        if await self.store.is_unrouted(stored.order.order_id):
            await self._route(stored)
        return stored

    async def _route(self, stored: Stored) -> None:
        """Publish the routing message and wait for JetStream's ack; only then is the order routed for sure."""
        order = stored.order
        headers = tracing.inject({"Nats-Msg-Id": order.order_id})  # the trace of the HTTP request goes along
        try:
            await self._nats().jetstream().publish(f"orders.routed.{order.symbol}", stored.raw, headers=headers)
        except Exception as exc:
            # Kept, marked unrouted: a retry of the same client id or the recovery pass routes it.
            raise UnavailableError(
                f"order {order.order_id} accepted but not routed yet ({type(exc).__name__}: {exc}); "
                "retry with the same client_order_id"
            ) from exc
        self.store.mark_routed(order.order_id)

    async def reroute(self, _: Client, stop: asyncio.Event) -> None:
        """Worker: route orders whose routing was never confirmed (a failed publish, a crash after the claim)."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), REROUTE_INTERVAL)
            try:
                for order_id in await self.store.unrouted(older_than=REROUTE_AFTER):
                    stored = await self.store.get(order_id)
                    if stored is None or stored.order.status is not OrderStatus.ROUTED:
                        await self.store.routed(order_id)  # gone, or moved on (cancelled): nothing to send
                        continue
                    await self._route(stored)
                    log.warning("order %s routed by the recovery pass", order_id)
            except Exception as exc:  # NATS or Redis away: the next pass tries again
                log.warning("recovery pass: %s", exc)

    async def cancel(self, order_id: str, account: str | None = None) -> Order:
        def cancelled(order: Order) -> Order:
            if account is not None and order.account != account:
                raise ForeignOrderError(f"order {order_id} belongs to another account")
            return order.moved(OrderStatus.CANCELLED, reason="cancelled by client")

        stored = await self.store.move(order_id, cancelled)
        await self._release_quietly(order_id, stored.order.remaining)  # fills on their way, pnl releases
        await self._event(stored.order)
        return stored.order


def create(settings: ServiceSettings) -> FastAPI:
    redis, redis_check = rediskv.connect(settings.REDIS_URL, settings.redis_credentials())
    oms = Oms(settings, redis)
    # A dependency default, not an Annotated alias: this module's annotations are strings FastAPI
    # resolves at module level, where a local alias does not exist.
    caller = Depends(auth.Accounts.from_environment(settings.AUTH_ACCOUNTS).dependency())
    policy = auth.Policy(settings.AUTHZ_URL, settings.AUTHZ_DECISION_PATH, settings.AUTHZ_TIMEOUT_SECONDS)

    async def decide(action: str, account: str | None, **facts: Any) -> None:
        """403 when the policy says no (or nothing), 503 when it cannot be asked: nothing happens either way."""
        try:
            allowed = await policy.allows(action, account, **facts)
        except auth.PolicyUnavailableError as exc:
            ORDERS.labels("unavailable").inc()
            raise HTTPException(503, f"{exc}; retry with the same client_order_id",
                                headers={"Retry-After": "1"}) from exc  # fmt: skip
        if not allowed:
            raise HTTPException(403, f"{action} refused by the authorization policy")

    async def risk_check() -> None:
        # Any answer proves a risk responder is subscribed; an empty request is refused without side effects.
        await oms._nats().request("risk.check", b"{}", timeout=0.5)

    app = bus.worker_app(settings, [oms.attach, oms.history.run, oms.reroute, oms.store.publish_events_forever],
                         {"redis": redis_check, "risk": risk_check})  # fmt: skip

    async def place_one(request: OrderRequest, account: str | None) -> Response:
        """One order, decided: 201 new, 200 a retry; HTTPException for everything else."""
        started = time.perf_counter()
        await decide("place", account, order=request.model_dump(mode="json"))
        try:
            stored, created = await oms.place(request, account)
        except ConflictError as exc:
            ORDERS.labels("conflict").inc()
            raise HTTPException(409, str(exc)) from exc
        except (UnavailableError, aioredis.RedisError) as exc:
            ORDERS.labels("unavailable").inc()
            raise HTTPException(503, f"retry with the same client_order_id: {exc}",
                                headers={"Retry-After": "1"}) from exc  # fmt: skip
        LATENCY.observe(time.perf_counter() - started)
        ORDERS.labels(stored.order.status.value if created else "retry").inc()
        # The stored bytes: FastAPI's generic encoder would cost ~0.1 ms an order.
        return Response(stored.raw, status_code=201 if created else 200, media_type="application/json")

    @app.post("/orders", status_code=201, response_model=Order, responses={200: {"model": Order}})
    async def place_order(request: OrderRequest, account: str | None = caller) -> Response:
        """201 with a new order; 200 with the first order for a repeated client_order_id and the same terms."""
        return await place_one(request, account)

    @app.post("/orders/batch")
    async def place_batch(batch: blotter.BatchRequest, account: str | None = caller) -> blotter.BatchResult:
        """Each order answered on its own, in the request's order, with the status `POST /orders` would
        give it: one bad order fails alone. Idempotent per client_order_id, as `POST /orders` is."""

        async def one(index: int, raw: Any) -> blotter.BatchItem:
            try:
                request = OrderRequest.model_validate(raw)
            except ValidationError as exc:
                problems = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
                return blotter.BatchItem(index=index, status=422, error=problems)
            try:
                answer = await place_one(request, account)
            except HTTPException as exc:
                return blotter.BatchItem(index=index, status=exc.status_code, error=exc.detail)
            return blotter.BatchItem(index=index, status=answer.status_code,
                                     order=Order.model_validate_json(bytes(answer.body)))  # fmt: skip

        # Orders with different client ids are placed at once; repeats of one id in request order, so
        # the first occurrence decides (the others are its retries or conflicts), as if sent one by one.
        by_client_id: dict[Any, list[int]] = {}
        for index, raw in enumerate(batch.orders):
            key = raw.get("client_order_id") if isinstance(raw, dict) else None
            by_client_id.setdefault(key if isinstance(key, str) else index, []).append(index)

        async def in_order(indexes: list[int]) -> list[blotter.BatchItem]:
            return [await one(i, batch.orders[i]) for i in indexes]

        answered = [item for group in await asyncio.gather(*map(in_order, by_client_id.values())) for item in group]
        return blotter.BatchResult(results=sorted(answered, key=lambda item: item.index))

    blotter.add_routes(app, oms.store, caller, decide, oms.cancel)
    live = livestream.LiveStream(oms._nats, redis, oms.prices, settings.STREAM_MAX_CLIENTS)

    @app.get("/stream", response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}})  # fmt: skip
    async def stream(
        account: str | None = caller,
        last_event_id: str | None = Header(None, max_length=64, description="resume after this event"),
    ) -> StreamingResponse:
        """Live order, fill, position and ticker events of the caller's account (module `livestream`)."""
        try:
            livestream.parse_event_id(last_event_id)
            oms._nats()
        except livestream.BadEventIdError as exc:
            raise HTTPException(422, str(exc)) from exc
        except UnavailableError as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": "1"}) from exc
        try:
            slot = live.reserve()
        except livestream.StreamsFullError as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": "5"}) from exc
        return livestream.SlotResponse(live.events(account, last_event_id, slot), slot,
                                       media_type="text/event-stream",
                                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip

    @app.get("/orders/{order_id}")
    async def get_order(order_id: str, account: str | None = caller) -> Order:
        stored = await oms.store.get(order_id)
        if stored is None:
            raise HTTPException(404, f"no order {order_id}")
        if account is not None and stored.order.account != account:
            raise HTTPException(403, f"order {order_id} belongs to another account")
        return stored.order

    @app.post("/orders/{order_id}/cancel")
    async def cancel_order(order_id: str, account: str | None = caller) -> Order:
        await decide("cancel", account, order_id=order_id)
        try:
            return await oms.cancel(order_id, account)
        except ForeignOrderError as exc:
            raise HTTPException(403, str(exc)) from exc
        except TransitionError as exc:
            raise HTTPException(409, str(exc)) from exc
        except UnknownOrderError as exc:
            raise HTTPException(404, str(exc)) from exc
        except ConflictError as exc:
            raise HTTPException(409, str(exc)) from exc

    return app
