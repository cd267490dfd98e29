"""The OMS's read side and bulk actions: the order blotter (`GET /orders`), fills (`GET /fills`),
and `POST /orders/cancel-all`; the request and answer shapes of `POST /orders/batch`.

Everything is an account's own: with accounts, a caller sees and cancels only its orders (each
account has its own indexes in Redis), as `GET /orders/{id}` already does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query
from pydantic import BaseModel, Field

from tradingstack_services.trading.model import SYMBOL, TERMINAL, Fill, Order, OrderStatus, Side, TransitionError
from tradingstack_services.trading.orderstore import ConflictError, OrderStore, UnknownOrderError

MAX_BATCH = 100
MAX_PAGE = 500
# Cursors are opaque to clients: an index entry, `<16 digits>:<order id>`.
CursorQuery = Annotated[str | None, Query(max_length=100, description="`next_cursor` of the previous page")]
LimitQuery = Annotated[int, Query(ge=1, le=MAX_PAGE, description="at most this many per page")]
SymbolQuery = Annotated[str | None, Query(pattern=SYMBOL)]
SinceQuery = Annotated[datetime | None, Query(description="ISO 8601; only what happened at or after it")]


@dataclass
class PageQuery:
    """What a listing is filtered by, and which page of it."""

    symbol: SymbolQuery = None
    side: Annotated[Side | None, Query()] = None
    since: SinceQuery = None
    limit: LimitQuery = 50
    cursor: CursorQuery = None


class OrderPage(BaseModel):
    orders: list[Order]
    next_cursor: str | None = Field(description="pass as `cursor` for older orders; null when none are left")


class FillPage(BaseModel):
    fills: list[Fill]
    next_cursor: str | None = Field(description="pass as `cursor` for older fills; null when none are left")


class BatchRequest(BaseModel):
    # Items are validated one by one (`POST /orders/batch`), so a bad one fails alone, not the batch.
    orders: list[Any] = Field(min_length=1, max_length=MAX_BATCH, description="each an order as `POST /orders` takes")


class BatchItem(BaseModel):
    index: int = Field(description="the order's place in the request")
    status: int = Field(description="the HTTP status `POST /orders` would answer for this order alone")
    order: Order | None = None
    error: Any = None


class BatchResult(BaseModel):
    results: list[BatchItem]


class CancelFailure(BaseModel):
    order_id: str
    error: str


class CancelAllResult(BaseModel):
    cancelled: list[str]
    failed: list[CancelFailure] = Field(description="orders that could not be cancelled, and why (a fill came first)")


Decide = Callable[..., Awaitable[None]]
Cancel = Callable[[str, str | None], Awaitable[Order]]


def utc(ts: datetime | None) -> datetime | None:
    """A time without a zone is UTC, as everywhere in the platform."""
    return ts.replace(tzinfo=UTC) if ts is not None and ts.tzinfo is None else ts


def _page_or_422(error: ValueError) -> HTTPException:
    return HTTPException(422, str(error))


def add_routes(app: FastAPI, store: OrderStore, caller: Any, decide: Decide, cancel: Cancel) -> None:
    @app.get("/orders")
    async def list_orders(
        query: Annotated[PageQuery, Depends()],
        status: OrderStatus | Literal["open"] | None = None,
        account: str | None = caller,
    ) -> OrderPage:
        """The blotter: the caller's orders, newest first, `limit` a page. `status=open` is every order
        not final yet. Final orders are listed as long as they are kept (ORDER_RETENTION_SECONDS)."""
        only_open = status == "open" or (status is not None and status not in TERMINAL)
        symbol, side = query.symbol, query.side

        def wanted(order: Order) -> bool:
            return ((status in (None, "open") or order.status == status) and (symbol is None or order.symbol == symbol)
                    and (side is None or order.side == side))  # fmt: skip

        try:
            page = await store.page(account, wanted, query.limit, query.cursor, utc(query.since), only_open)
        except ValueError as exc:
            raise _page_or_422(exc) from exc
        return OrderPage(orders=page.orders, next_cursor=page.next_cursor)

    @app.get("/fills")
    async def list_fills(query: Annotated[PageQuery, Depends()], account: str | None = caller) -> FillPage:
        """The caller's fills, newest order first and each order's newest fill first. A page holds the
        matching fills of up to `limit` orders: one order's fills are never split between pages."""

        symbol, side, since = query.symbol, query.side, utc(query.since)

        def matches(fill: Fill) -> bool:
            return ((symbol is None or fill.symbol == symbol) and (side is None or fill.side == side)
                    and (since is None or fill.ts >= since))  # fmt: skip

        try:
            page = await store.page(account, lambda o: any(matches(f) for f in o.fills), query.limit, query.cursor)
        except ValueError as exc:
            raise _page_or_422(exc) from exc
        fills = [f for order in page.orders for f in reversed(order.fills) if matches(f)]
        return FillPage(fills=fills, next_cursor=page.next_cursor)

    @app.post("/orders/cancel-all")
    async def cancel_all(symbol: SymbolQuery = None, account: str | None = caller) -> CancelAllResult:
        """Cancel every open order of the caller (of one symbol, with `symbol`). An order that a fill
        finished first is listed under `failed` with the reason; the others are cancelled."""
        await decide("cancel_all", account, symbol=symbol)
        result = CancelAllResult(cancelled=[], failed=[])
        cursor = None
        while True:
            page = await store.page(account, lambda o: symbol is None or o.symbol == symbol, MAX_PAGE, cursor,
                                    only_open=True)  # fmt: skip
            for order in page.orders:
                try:
                    await cancel(order.order_id, account)
                    result.cancelled.append(order.order_id)
                except (TransitionError, ConflictError, UnknownOrderError) as exc:
                    result.failed.append(CancelFailure(order_id=order.order_id, error=str(exc)))
            if page.next_cursor is None:
                return result
            cursor = page.next_cursor
