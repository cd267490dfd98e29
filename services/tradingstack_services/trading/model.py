"""The trading schema every trading service shares: orders and their state machine, fills, positions.

Pure: no I/O here. The OMS, exeq and pnl keep these objects in Redis and carry them on NATS,
but every decision (which transition is allowed, what a fill does to an order, what a fill
does to a position and its P&L) is made by the functions below, so it is tested once.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

SYMBOL = r"^[A-Z0-9][A-Z0-9_-]{0,31}$"
# Quantities are floats; anything closer to zero than this is zero (no 1e-17 leftovers).
EPSILON = 1e-9
# What an order may ask for: at least ten times EPSILON (smaller could never be filled), at most
# amounts no market trades; prices likewise. Out of range is a 422, never a stuck order.
MIN_QUANTITY = 1e-8
MAX_QUANTITY = 1e9
MAX_PRICE = 1e12

Side = Literal["buy", "sell"]


def now() -> datetime:
    return datetime.now(UTC)


class OrderStatus(StrEnum):
    NEW = "new"
    RISK_CHECKED = "risk_checked"
    ROUTED = "routed"
    PARTIALLY_FILLED = "partially_filled"
    FILLED = "filled"
    REJECTED = "rejected"
    CANCELLED = "cancelled"


TERMINAL = frozenset({OrderStatus.FILLED, OrderStatus.REJECTED, OrderStatus.CANCELLED})
# The only moves an order can make. Anything else is a bug or a race, and is refused.
TRANSITIONS: dict[OrderStatus, frozenset[OrderStatus]] = {
    OrderStatus.NEW: frozenset({OrderStatus.RISK_CHECKED, OrderStatus.REJECTED, OrderStatus.CANCELLED}),
    OrderStatus.RISK_CHECKED: frozenset({OrderStatus.ROUTED, OrderStatus.REJECTED, OrderStatus.CANCELLED}),
    OrderStatus.ROUTED: frozenset({OrderStatus.PARTIALLY_FILLED, OrderStatus.FILLED, OrderStatus.CANCELLED}),
    OrderStatus.PARTIALLY_FILLED: frozenset({OrderStatus.PARTIALLY_FILLED, OrderStatus.FILLED, OrderStatus.CANCELLED}),
    OrderStatus.FILLED: frozenset(),
    OrderStatus.REJECTED: frozenset(),
    OrderStatus.CANCELLED: frozenset(),
}


class TransitionError(ValueError):
    """An order was asked to move where the state machine does not go (e.g. cancel a filled order)."""


class Strict(BaseModel):
    # NaN and infinities are refused everywhere: one in a position or an order would make every
    # later comparison with it false, silently (JSON's NaN, Infinity, and 1e999 all parse to them).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class OrderRequest(Strict):
    """What a client sends to `POST /orders`."""

    client_order_id: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$", description="the client's idempotency key")
    symbol: str = Field(pattern=SYMBOL)
    side: Side
    quantity: float = Field(ge=MIN_QUANTITY, le=MAX_QUANTITY, allow_inf_nan=False)
    order_type: Literal["market", "limit"] = "market"
    limit_price: float | None = Field(None, gt=0, le=MAX_PRICE, allow_inf_nan=False)

    @model_validator(mode="after")
    def _limit_price_iff_limit(self) -> Self:
        if self.order_type == "limit" and self.limit_price is None:
            raise ValueError("a limit order needs limit_price")
        if self.order_type == "market" and self.limit_price is not None:
            raise ValueError("a market order takes no limit_price")
        return self


def position_key(account: str | None, symbol: str) -> str:
    """Positions are an account's own: `desk-a/BTCUSDT`; without accounts, the symbol as always."""
    return f"{account}/{symbol}" if account else symbol


class Fill(Strict):
    fill_id: str
    order_id: str
    account: str | None = None  # the order's
    symbol: str = Field(pattern=SYMBOL)
    side: Side
    quantity: float = Field(gt=0, allow_inf_nan=False)
    price: float = Field(gt=0, allow_inf_nan=False)
    ts: datetime


class Order(Strict):
    order_id: str
    client_order_id: str
    account: str | None = None  # the account whose API key placed it (None: order entry is open)
    symbol: str
    side: Side
    quantity: float
    order_type: Literal["market", "limit"]
    limit_price: float | None = None
    status: OrderStatus = OrderStatus.NEW
    filled_quantity: float = 0.0
    avg_fill_price: float | None = None
    reason: str | None = None
    risk_level: str | None = None
    fills: list[Fill] = Field(default_factory=list)
    # What an order event carries instead of the list (`event`): how many fills, and the newest.
    fill_count: int = Field(0, ge=0)
    last_fill: Fill | None = None
    # The mid (else the last trade) when the OMS accepted the order: execution-quality's benchmark.
    arrival_price: float | None = None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def new(
        cls, order_id: str, request: OrderRequest, account: str | None = None, arrival_price: float | None = None
    ) -> Order:
        ts = now()
        return cls(order_id=order_id, account=account, arrival_price=arrival_price, created_at=ts, updated_at=ts,
                   **request.model_dump())  # fmt: skip

    @property
    def remaining(self) -> float:
        return max(0.0, self.quantity - self.filled_quantity)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def same_request(self, request: OrderRequest) -> bool:
        """Whether a repeated client_order_id carries the same order (a retry) or a different one."""
        return request.model_dump() == {k: getattr(self, k) for k in OrderRequest.model_fields}

    def moved(self, status: OrderStatus, **changes: object) -> Order:
        """A copy in `status`; raises TransitionError if the state machine has no such move."""
        if status not in TRANSITIONS[self.status]:
            raise TransitionError(f"order {self.order_id} is {self.status.value}; it cannot become {status.value}")
        return self.model_copy(update={"status": status, "updated_at": now(), **changes})

    def filled_by(self, quantity: float, price: float, ts: datetime | None = None) -> tuple[Order, Fill]:
        """The order after a fill of up to `quantity` at `price`, and that fill (ids follow the fill count)."""
        quantity = min(quantity, self.remaining)
        if quantity <= EPSILON:
            raise TransitionError(f"order {self.order_id} has nothing left to fill")
        fill = Fill(
            fill_id=f"{self.order_id}-{self.fill_total + 1}", order_id=self.order_id, account=self.account,
            symbol=self.symbol, side=self.side, quantity=quantity, price=price, ts=ts or now(),
        )  # fmt: skip
        filled = self.filled_quantity + quantity
        average = ((self.avg_fill_price or 0.0) * self.filled_quantity + price * quantity) / filled
        done = self.quantity - filled <= EPSILON
        status = OrderStatus.FILLED if done else OrderStatus.PARTIALLY_FILLED
        order = self.moved(
            status, filled_quantity=self.quantity if done else filled, avg_fill_price=average,
            fills=[*self.fills, fill], fill_count=self.fill_total + 1, last_fill=fill,
        )  # fmt: skip
        return order, fill

    @property
    def fill_total(self) -> int:
        """How many fills the order has had (an event's `fill_count`; a stored order's list, for orders
        stored before the count was kept)."""
        return max(self.fill_count, len(self.fills))

    @property
    def new_fill(self) -> Fill | None:
        """The newest fill: the list's last, or an event's `last_fill`."""
        return self.fills[-1] if self.fills else self.last_fill

    def event(self) -> bytes:
        """The order as its status events carry it: bounded, whatever its fills (the list stays with
        the stored order; `fill_count`, `filled_quantity`, `avg_fill_price` and `last_fill` go)."""
        return (
            self.model_copy(update={"fill_count": self.fill_total, "last_fill": self.new_fill})
            .model_dump_json(exclude={"fills"})
            .encode()
        )


def touch(side: Side, bid: float | None, ask: float | None, last: float | None) -> float | None:
    """What a market order pays now: a buy the ask, a sell the bid, the last trade when that side is unknown."""
    return (ask if side == "buy" else bid) or last


def mid(bid: float | None, ask: float | None, last: float | None) -> float | None:
    """The middle of the touch when both sides are known, else the last trade."""
    return (bid + ask) / 2 if bid is not None and ask is not None else last


def execution_price(order: Order, bid: float | None, ask: float | None, last: float | None) -> float | None:
    """The paper price an order gets now (its `touch`), or None if it cannot execute yet.

    A limit order executes only when the touch is at or better than its limit.
    """
    price = touch(order.side, bid, ask, last)
    if price is None:
        return None
    if order.limit_price is not None:
        marketable = price <= order.limit_price if order.side == "buy" else price >= order.limit_price
        if not marketable:
            return None
    return price


class Position(Strict):
    """One symbol's position under average-cost accounting."""

    symbol: str
    account: str | None = None
    quantity: float = 0.0
    avg_price: float = 0.0
    realized_pnl: float = 0.0
    updated_at: datetime | None = None

    @property
    def key(self) -> str:
        return position_key(self.account, self.symbol)

    def apply(self, fill: Fill) -> Position:
        """The position after a fill: adding averages the price, reducing realises P&L, crossing zero re-opens."""
        signed = fill.quantity if fill.side == "buy" else -fill.quantity
        quantity, avg, realized = self.quantity, self.avg_price, self.realized_pnl
        if abs(quantity) <= EPSILON or math.copysign(1, quantity) == math.copysign(1, signed):
            total = abs(quantity) + fill.quantity
            avg = (abs(quantity) * avg + fill.quantity * fill.price) / total
            quantity += signed
        else:
            closed = min(fill.quantity, abs(quantity))
            realized += closed * (fill.price - avg) * math.copysign(1, quantity)
            quantity += signed
            if abs(quantity) <= EPSILON:
                quantity, avg = 0.0, 0.0
            elif fill.quantity > closed:  # went through zero: the rest opens at the fill price
                avg = fill.price
        return Position(symbol=self.symbol, account=self.account, quantity=quantity, avg_price=avg,
                        realized_pnl=realized, updated_at=fill.ts)  # fmt: skip

    def unrealized(self, mark: float | None) -> float:
        """P&L of the open quantity at `mark` (the last price); zero without a mark or a position."""
        if mark is None or abs(self.quantity) <= EPSILON:
            return 0.0
        return self.quantity * (mark - self.avg_price)


class PositionView(BaseModel):
    """One row of `GET /positions`."""

    symbol: str
    account: str | None = None
    quantity: float
    avg_price: float
    realized_pnl: float
    unrealized_pnl: float
    mark_price: float | None = None
