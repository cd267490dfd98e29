"""execution-quality: how well orders were executed, from every order event (`orders.>`).

Each fill an event reports (a partially_filled or filled event reports the order's newest fill)
is measured against the order's arrival price (the mid the OMS saw when it accepted the order):
slippage in basis points, positive when the fill is worse than arrival (a buy above it, a sell
below it), and latency from acceptance to the fill. Each order that ends (filled or cancelled)
gives its fill ratio. Rows go to QuestDB `execution_quality` (deduplicated on `ts, fill_id`)
before the events are acknowledged; rolling aggregates per symbol, side and order type (the last
ROLLING fills or orders of each) are on `GET /quality` and the measures are Prometheus histograms.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Query
from nats.aio.msg import Msg
from prometheus_client import Counter, Histogram
from pydantic import BaseModel

from tradingstack_services.platform import auth, bus, ilp, questdb
from tradingstack_services.platform.settings import ServiceSettings
from tradingstack_services.trading.model import Fill, Order, OrderStatus

ROLLING = 1_000
# Event ids already measured by this process: a redelivery (QuestDB away) is written again, not counted again.
SEEN_EVENTS = 100_000
LABELS = ["symbol", "side", "order_type"]
SLIPPAGE = Histogram("tradingstack_execution_slippage_bps", "Fill price against the arrival price, basis points "
                     "(positive: worse)", LABELS,
                     buckets=(-50, -10, -5, -1, 0, 1, 5, 10, 25, 50, 100, 250))  # fmt: skip
LATENCY = Histogram("tradingstack_execution_fill_latency_seconds", "Order accepted to fill", LABELS,
                    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 300))  # fmt: skip
FILL_RATIO = Histogram("tradingstack_execution_fill_ratio", "Filled share of each order that ended", LABELS,
                       buckets=(0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1))  # fmt: skip
DEAD = Counter("tradingstack_execution_dead_lettered_total", "Order events sent to the dead-letter stream",
               ["reason"])  # fmt: skip


class Measured(BaseModel):
    """One fill, measured."""

    fill_id: str
    order_id: str
    symbol: str
    side: str
    order_type: str
    account: str | None
    quantity: float
    price: float
    arrival_price: float | None
    slippage_bps: float | None  # None: the OMS had no quote when it accepted the order
    latency_ms: float
    ts: Any


def slippage_bps(side: str, price: float, arrival: float | None) -> float | None:
    if arrival is None or arrival <= 0:
        return None
    worse = price - arrival if side == "buy" else arrival - price
    return worse / arrival * 10_000


def measure(order: Order, fill: Fill) -> Measured:
    return Measured(
        fill_id=fill.fill_id, order_id=order.order_id, symbol=order.symbol, side=order.side,
        order_type=order.order_type, account=order.account, quantity=fill.quantity, price=fill.price,
        arrival_price=order.arrival_price, slippage_bps=slippage_bps(order.side, fill.price, order.arrival_price),
        latency_ms=(fill.ts - order.created_at).total_seconds() * 1000,
        ts=fill.ts,
    )  # fmt: skip


def reported_fill(order: Order) -> Fill | None:
    """The fill an event announces: each fill moves the order, and its event lists it last."""
    if order.status in (OrderStatus.PARTIALLY_FILLED, OrderStatus.FILLED):
        return order.new_fill
    return None


def fill_ratio(order: Order) -> float | None:
    """The filled share of an order that ended having reached the market (filled or cancelled)."""
    if order.status not in (OrderStatus.FILLED, OrderStatus.CANCELLED) or order.quantity <= 0:
        return None
    return min(order.filled_quantity / order.quantity, 1.0)


def row(m: Measured) -> str:
    tags = {"symbol": m.symbol, "side": m.side, "order_type": m.order_type, **({"account": m.account}
            if m.account else {})}  # fmt: skip
    fields: dict[str, ilp.Field] = {"fill_id": m.fill_id, "order_id": m.order_id, "quantity": m.quantity,
                                    "price": m.price, "arrival_price": m.arrival_price,
                                    "slippage_bps": m.slippage_bps, "latency_ms": m.latency_ms}  # fmt: skip
    return ilp.line("execution_quality", tags, fields, m.ts)


class Summary(BaseModel):
    count: int
    mean: float | None
    p50: float | None
    p95: float | None


def summarize(values: list[float]) -> Summary:
    if not values:
        return Summary(count=0, mean=None, p50=None, p95=None)
    ordered = sorted(values)

    def at(q: float) -> float:  # nearest rank
        return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]

    return Summary(count=len(values), mean=sum(values) / len(values), p50=at(0.5), p95=at(0.95))


class Quality(BaseModel):
    symbol: str
    side: str
    order_type: str
    slippage_bps: Summary
    latency_ms: Summary
    fill_ratio: Summary


@dataclass
class Rolling:
    slippage: deque[float] = field(default_factory=lambda: deque(maxlen=ROLLING))
    latency: deque[float] = field(default_factory=lambda: deque(maxlen=ROLLING))
    ratio: deque[float] = field(default_factory=lambda: deque(maxlen=ROLLING))


class ExecutionQuality:
    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.questdb, self.questdb_check = questdb.connect(settings)
        self.rolling: dict[tuple[str, str, str], Rolling] = {}
        self.seen: OrderedDict[str, None] = OrderedDict()

    async def run(self, nc: Any, stop: asyncio.Event) -> None:
        await bus.consume(nc, stop, self.settings, self.process, 500, 1.0)

    async def process(self, js: Any, messages: list[Msg]) -> None:
        orders = await bus.parse_each(js, messages, self.settings, Order, "invalid_order", DEAD)
        measured = [(msg, order, measure(order, fill) if (fill := reported_fill(order)) else None)
                    for msg, order in orders]  # fmt: skip
        lines = [row(m) for _, _, m in measured if m is not None]
        if lines:  # the rows first: an event is acknowledged once QuestDB has its row
            await asyncio.to_thread(self.questdb.write_ilp, lines)
        for msg, order, m in measured:
            self.count(bus.event_id(msg), order, m)
            await msg.ack()

    def count(self, event: str, order: Order, m: Measured | None) -> None:
        """The event's fill (`m`, measured) and fill ratio into the rolling windows and histograms, once."""
        if event in self.seen:
            return
        self.seen[event] = None
        if len(self.seen) > SEEN_EVENTS:
            self.seen.popitem(last=False)
        key = (order.symbol, order.side, order.order_type)
        rolling = self.rolling.setdefault(key, Rolling())
        if m is not None:
            if m.slippage_bps is not None:
                rolling.slippage.append(m.slippage_bps)
                SLIPPAGE.labels(*key).observe(m.slippage_bps)
            rolling.latency.append(m.latency_ms)
            LATENCY.labels(*key).observe(m.latency_ms / 1000)
        if (ratio := fill_ratio(order)) is not None:
            rolling.ratio.append(ratio)
            FILL_RATIO.labels(*key).observe(ratio)

    def report(self, symbol: str | None, side: str | None, order_type: str | None) -> list[Quality]:
        return [
            Quality(symbol=k[0], side=k[1], order_type=k[2], slippage_bps=summarize(list(r.slippage)),
                    latency_ms=summarize(list(r.latency)), fill_ratio=summarize(list(r.ratio)))
            for k, r in sorted(self.rolling.items())
            if (symbol is None or k[0] == symbol) and (side is None or k[1] == side)
            and (order_type is None or k[2] == order_type)
        ]  # fmt: skip


def create(settings: ServiceSettings) -> FastAPI:
    quality = ExecutionQuality(settings)

    app = bus.worker_app(settings, [quality.run], {"questdb": quality.questdb_check})
    readers = auth.readers(settings)

    @app.get("/quality")
    async def report(
        symbol: str | None = Query(None, max_length=32),
        side: str | None = Query(None, pattern="^(buy|sell)$"),
        order_type: str | None = Query(None, pattern="^(market|limit)$"),
        reader: auth.Reader = readers,
    ) -> list[Quality]:
        """Rolling slippage (bps), fill latency (ms) and fill ratio per symbol, side and order type, over
        every account's fills (so for role oversight only, when accounts are configured)."""
        reader.require_everything("execution quality across accounts")
        return quality.report(symbol, side, order_type)

    return app
