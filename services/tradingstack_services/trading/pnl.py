"""pnl: positions and P&L from fills (`fills.>`), current in Redis, history in QuestDB.

Per batch of fills: the fills not applied yet (Redis keeps each applied fill id with the
position right after it, in one hash per fill day that outlives the FILLS stream's
retention) are applied in order to the symbols' positions (average cost); the positions,
the quantities risk reads (`tradingstack:positions`) and the applied fills go to Redis in
one transaction, committed only if no other pnl changed them meanwhile (WATCH: should two pods
ever run at once, neither loses the other's fills); the positions are announced on
`positions.{SYMBOL}`; then every fill of
the batch and the position after it go to QuestDB (`fills`, `positions`, both deduplicated
on their keys), and only then are the fills acknowledged. A redelivery (crash, QuestDB
away) finds its fills applied and rewrites the same history rows from what Redis kept.
One pod (the CRD allows no more, and it rolls with Recreate): average cost depends on the order
fills are applied in, which two pods sharing the consumer would not keep; the compare-and-set makes
even that case lose no fill.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI
from nats.aio.client import Client
from nats.aio.msg import Msg
from prometheus_client import Counter
from pydantic import BaseModel
from redis.asyncio.client import Pipeline

from tradingstack_services.marketdata.prices import PriceBook
from tradingstack_services.platform import bus, ilp, questdb, rediskv
from tradingstack_services.platform.settings import ServiceSettings
from tradingstack_services.trading import exposure
from tradingstack_services.trading.model import Fill, Position, PositionView, position_key
from tradingstack_services.trading.risk import POSITIONS_KEY

log = logging.getLogger(__name__)
DETAILS_KEY = "tradingstack:position-details"
APPLIED_PREFIX = "tradingstack:pnl:applied:"
ANNOUNCED_PREFIX = "tradingstack:pnl:announced:"
# Applied fills are remembered per fill day, each day's hash for longer than the FILLS stream
# keeps messages (168h by default): a redelivery always finds its fill, and the memory is bounded.
APPLIED_TTL_SECONDS = 8 * 24 * 3600


def applied_key(fill: Fill) -> str:
    return f"{APPLIED_PREFIX}{fill.ts:%Y-%m-%d}"


def announced_key(applied: str) -> str:
    """The fills of one day whose position the POSITIONS stream has stored (audit log on)."""
    return applied.replace(APPLIED_PREFIX, ANNOUNCED_PREFIX, 1)


FILLS = Counter("tradingstack_pnl_fills_applied_total", "Fills applied to positions")
SKIPPED = Counter("tradingstack_pnl_fills_skipped_total", "Redelivered fills that were already applied")
DEAD = Counter("tradingstack_pnl_dead_lettered_total", "Fill messages sent to the dead-letter stream", ["reason"])


class PositionEvent(Position):
    """A position right after a fill: published on `positions.{SYMBOL}`, kept per applied fill id
    (so its history row can be written again), written to QuestDB `positions`."""

    fill: Fill
    unrealized_pnl: float


class Totals(BaseModel):
    realized_pnl: float
    unrealized_pnl: float
    total_pnl: float
    positions: int


def fill_line(fill: Fill) -> str:
    fields: dict[str, ilp.Field] = {"fill_id": fill.fill_id, "order_id": fill.order_id, "quantity": fill.quantity,
                                    "price": fill.price}  # fmt: skip
    return ilp.line("fills", _tags(fill.symbol, fill.account, side=fill.side), fields, fill.ts)


def _tags(symbol: str, account: str | None, **more: str) -> dict[str, str]:
    """SYMBOL columns; `account` only when there is one (null otherwise, as before accounts)."""
    return {"symbol": symbol, **more, **({"account": account} if account else {})}


def position_line(event: PositionEvent) -> str:
    fields = {"quantity": event.quantity, "avg_price": event.avg_price, "realized_pnl": event.realized_pnl,
              "unrealized_pnl": event.unrealized_pnl}  # fmt: skip
    return ilp.line("positions", _tags(event.symbol, event.account), fields, event.fill.ts)


class Pnl:
    def __init__(self, settings: ServiceSettings, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.redis = redis
        self.questdb, self.questdb_check = questdb.connect(settings)
        self.prices = PriceBook(settings.symbols)
        self.nc: Client | None = None

    async def run(self, nc: Client, stop: asyncio.Event) -> None:
        self.nc = nc
        await bus.consume(nc, stop, self.settings, self.process, 1_000, 1.0)

    async def process(self, js: Any, messages: list[Msg]) -> None:
        await bus.apply_then_ack(js, messages, self.settings, Fill, "invalid_fill", DEAD, lambda f: f.fill_id,
                                 self.apply)  # fmt: skip

    async def apply(self, fills: list[Fill]) -> None:
        """Apply the fills not applied yet, announce the positions, then write every fill's history."""
        if not fills:
            return
        keys = sorted({position_key(f.account, f.symbol) for f in fills})
        days: dict[str, list[str]] = {}
        for fill in fills:
            days.setdefault(applied_key(fill), []).append(fill.fill_id)

        async def step(tx: Pipeline) -> tuple[list[PositionEvent], list[PositionEvent], set[str]]:
            # Under WATCH: another pnl (a rollout's second pod) that commits first makes this run again.
            details = await tx.hmget(DETAILS_KEY, keys)
            found: dict[str, Any] = {}
            announced: set[str] = set()
            for key, ids in days.items():
                found.update(zip(ids, await tx.hmget(key, ids), strict=True))
                marks = await tx.hmget(announced_key(key), ids)
                announced |= {i for i, mark in zip(ids, marks, strict=True) if mark is not None}
            positions = {k: Position.model_validate_json(v) for k, v in zip(keys, details, strict=True) if v}
            history: list[PositionEvent] = []
            new: list[PositionEvent] = []
            for fill in fills:
                snapshot = found[fill.fill_id]
                if snapshot is not None:  # applied before (its history may not have been written): same rows again
                    history.append(PositionEvent.model_validate_json(snapshot))
                    continue
                key = position_key(fill.account, fill.symbol)
                position = (positions.get(key) or Position(symbol=fill.symbol, account=fill.account)).apply(fill)
                positions[key] = position
                mark = self.prices.mark(fill.symbol) or fill.price
                event = PositionEvent(**position.model_dump(), fill=fill, unrealized_pnl=position.unrealized(mark))
                new.append(event)
                history.append(event)
            rediskv.begin_writes(tx)
            if new:
                touched = {e.key: positions[e.key] for e in new}
                tx.hset(DETAILS_KEY, mapping={s: p.model_dump_json() for s, p in touched.items()})
                tx.hset(POSITIONS_KEY, mapping={s: repr(p.quantity) for s, p in touched.items()})
                by_day: dict[str, dict[Any, Any]] = {}
                for event in new:
                    by_day.setdefault(applied_key(event.fill), {})[event.fill.fill_id] = event.model_dump_json()
                for key, snapshots in by_day.items():
                    tx.hset(key, mapping=snapshots)
                    tx.expire(key, APPLIED_TTL_SECONDS)
                for event in new:  # the fill's quantity moves from open exposure to the position at once
                    exposure.release_command(tx, event.fill.order_id, event.fill.quantity)
            return history, new, announced

        history, new, announced = await rediskv.compare_and_set(self.redis, [DETAILS_KEY, *days], step)
        SKIPPED.inc(len(fills) - len(new))
        FILLS.inc(len(new))
        if self.nc is not None and self.settings.POSITIONS_JETSTREAM:
            await self.announce_durably([e for e in history if e.fill.fill_id not in announced])
        elif self.nc is not None:  # news for risk and dashboards: the position after each fill
            for event in new:
                await self.nc.publish(f"positions.{event.symbol}", event.model_dump_json().encode())
        # History last, off the path to a visible position; if QuestDB is away the batch is not
        # acknowledged, and its redelivery finds the fills applied and rewrites the same rows.
        lines = [line for e in history for line in (fill_line(e.fill), position_line(e))]
        await asyncio.to_thread(self.questdb.write_ilp, lines)

    async def announce_durably(self, events: list[PositionEvent]) -> None:
        """For the audit log: each position as committed, stored by the POSITIONS stream, then marked.

        Published only after the commit (a position computed by a run that lost the compare-and-set
        is never announced); a crash before the mark publishes the same snapshot again on the
        redelivery, which the stream drops by its message id.
        """
        if not events or self.nc is None:
            return
        js = self.nc.jetstream()
        await asyncio.gather(*(js.publish(f"positions.{e.symbol}", e.model_dump_json().encode(),
                                          headers={"Nats-Msg-Id": f"position:{e.fill.fill_id}"})
                               for e in events))  # fmt: skip
        async with self.redis.pipeline(transaction=False) as pipe:
            by_day: dict[str, dict[Any, Any]] = {}
            for event in events:
                by_day.setdefault(announced_key(applied_key(event.fill)), {})[event.fill.fill_id] = 1
            for key, marks in by_day.items():
                pipe.hset(key, mapping=marks)
                pipe.expire(key, APPLIED_TTL_SECONDS)
            await pipe.execute()

    async def positions(self) -> dict[str, Position]:
        raw = await self.redis.hgetall(DETAILS_KEY)
        return {p.key: p for p in (Position.model_validate_json(v) for v in raw.values())}

    async def views(self) -> list[PositionView]:
        return [
            PositionView(symbol=p.symbol, account=p.account, quantity=p.quantity, avg_price=p.avg_price,
                         realized_pnl=p.realized_pnl, unrealized_pnl=p.unrealized(self.prices.mark(p.symbol)),
                         mark_price=self.prices.mark(p.symbol))
            for p in sorted((await self.positions()).values(), key=lambda p: (p.symbol, p.account or ""))
        ]  # fmt: skip


def create(settings: ServiceSettings) -> FastAPI:
    redis, redis_check = rediskv.connect(settings.REDIS_URL, settings.redis_credentials())
    pnl = Pnl(settings, redis)

    # Positions and P&L need Redis only; QuestDB away delays history, so it does not take pnl out of service.
    app = bus.worker_app(settings, [pnl.prices.follow, pnl.run], {"redis": redis_check}, {"questdb": pnl.questdb_check})

    @app.get("/positions")
    async def positions() -> list[PositionView]:
        return await pnl.views()

    @app.get("/pnl")
    async def totals() -> Totals:
        views = await pnl.views()
        realized = sum(v.realized_pnl for v in views)
        unrealized = sum(v.unrealized_pnl for v in views)
        return Totals(realized_pnl=realized, unrealized_pnl=unrealized, total_pnl=realized + unrealized,
                      positions=sum(1 for v in views if v.quantity != 0))  # fmt: skip

    return app
