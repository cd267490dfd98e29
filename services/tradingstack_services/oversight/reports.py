"""ptrc: position tracking, end-of-day reports and compliance records, from every fill (`fills.>`).

Each fill is applied once (Redis keeps each applied fill id per fill day) to the account and
symbol's running position (average cost, as pnl keeps it) and to that day's ledger, which
remembers the position the day opened with, the trades, quantities and notionals; position,
ledger and the applied mark change in one transaction (WATCHed: another pod's commit in between
makes it run again on the newer state), before the fill is acknowledged. One pod, rolling with
Recreate: a ledger's opening position depends on the order fills are applied in. A report
of a day has one row per account and symbol that traded: opening and closing position, trades,
bought and sold, realized P&L over the day, unrealized P&L at the mark (today: the last tick; a
past day: its last fill), fees (none: paper execution). For the latest day, each closing position
is reconciled against pnl's own position of the account and symbol: a mismatch is an alert
(`tradingstack_ptrc_reconciliation_mismatches`, the chart's `TradingStackPositionsMismatch`).
Reports are written to the Delta table `lake/reports` (partitioned by date; writing a day again
replaces it) for every ended UTC day once the FILLS consumer has applied every fill the stream held
just after its end (after an outage, each day it missed; again when a late fill of it comes), and on
`POST /reports/{date}`; `GET /reports?date=` serves a day
as JSON or CSV (`format=csv`).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import logging
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pyarrow as pa
import redis.asyncio as aioredis
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import TableNotFoundError
from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import Response
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge
from pydantic import BaseModel
from redis.asyncio.client import Pipeline

from tradingstack.lake import REPORTS
from tradingstack_services.marketdata.prices import PriceBook
from tradingstack_services.platform import auth, bus, rediskv
from tradingstack_services.platform.settings import ServiceSettings
from tradingstack_services.trading.model import EPSILON, Fill, Position, position_key
from tradingstack_services.trading.pnl import DETAILS_KEY

log = logging.getLogger(__name__)
PREFIX = "tradingstack:ptrc:"
POSITIONS_KEY = PREFIX + "positions"
# Ledgers and applied fills outlive the FILLS stream's retention (168h) and a month of reports.
TTL_SECONDS = 40 * 24 * 3600
CLOSE_CHECK_SECONDS = 60.0
CLOSE_GRACE_SECONDS = 60.0
FILLS = Counter("tradingstack_ptrc_fills_applied_total", "Fills applied to positions and day ledgers")
DEAD = Counter("tradingstack_ptrc_dead_lettered_total", "Fill messages sent to the dead-letter stream", ["reason"])
MISMATCHES = Gauge("tradingstack_ptrc_reconciliation_mismatches",
                   "Positions whose closing quantity differs from pnl's, at the latest report")  # fmt: skip
REPORTS_WRITTEN = Counter("tradingstack_ptrc_reports_written_total", "Day reports written to the lake")


def ledger_key(day: str) -> str:
    return f"{PREFIX}day:{day}"


def written_key(day: str) -> str:
    return f"{PREFIX}written:{day}"


def day_end_key(day: str) -> str:
    """The FILLS stream's last sequence when the day had ended CLOSE_GRACE_SECONDS ago (set once)."""
    return f"{PREFIX}day-end:{day}"


def closable(day: str, now: datetime, day_end_seq: int | None, ack_floor: int) -> bool:
    """Whether a day's report can be written: the day ended CLOSE_GRACE_SECONDS ago (a fill made at
    its last instant has reached the stream by then), and the FILLS consumer has acknowledged, so
    applied, every fill the stream held at that moment (`day_end_seq`, recorded once after it)."""
    closed = datetime.fromisoformat(day).replace(tzinfo=UTC) + timedelta(days=1, seconds=CLOSE_GRACE_SECONDS)
    return now >= closed and day_end_seq is not None and ack_floor >= day_end_seq


def applied_key(day: str) -> str:
    return f"{PREFIX}applied:{day}"


class Ledger(BaseModel):
    """One account and symbol on one day."""

    opening: Position
    closing: Position
    trades: int = 0
    bought: float = 0.0
    sold: float = 0.0
    buy_notional: float = 0.0
    sell_notional: float = 0.0
    last_price: float | None = None


def apply(ledger: Ledger | None, running: Position, fill: Fill) -> tuple[Ledger, Position]:
    """The day's ledger and the running position after one fill (pure)."""
    after = running.apply(fill)
    ledger = ledger or Ledger(opening=running, closing=running)
    buy = fill.side == "buy"
    return ledger.model_copy(update={
        "closing": after, "trades": ledger.trades + 1, "last_price": fill.price,
        "bought": ledger.bought + (fill.quantity if buy else 0.0),
        "sold": ledger.sold + (0.0 if buy else fill.quantity),
        "buy_notional": ledger.buy_notional + (fill.quantity * fill.price if buy else 0.0),
        "sell_notional": ledger.sell_notional + (0.0 if buy else fill.quantity * fill.price),
    }), after  # fmt: skip


class ReportRow(BaseModel):
    date: str
    account: str | None
    symbol: str
    opening_quantity: float
    opening_avg_price: float
    trades: int
    bought: float
    sold: float
    buy_notional: float
    sell_notional: float
    fees: float = 0.0
    realized_pnl: float
    unrealized_pnl: float
    mark_price: float | None
    closing_quantity: float
    closing_avg_price: float
    pnl_quantity: float | None = None
    reconciled: bool | None = None
    generated_at: datetime


def report(day: str, ledgers: list[Ledger], marks: dict[str, float], pnl: dict[str, float] | None) -> list[ReportRow]:
    """A day's rows (pure). `marks` price the open quantity; `pnl` (pnl's quantities by position
    key, for the latest day only) reconciles each closing position."""
    now = datetime.now(UTC)
    rows = []
    for ledger in sorted(ledgers, key=lambda x: (x.closing.account or "", x.closing.symbol)):
        close, key = ledger.closing, ledger.closing.key
        mark = marks.get(close.symbol, ledger.last_price)
        theirs = None if pnl is None else pnl.get(key, 0.0)
        rows.append(ReportRow(
            date=day, account=close.account, symbol=close.symbol, opening_quantity=ledger.opening.quantity,
            opening_avg_price=ledger.opening.avg_price, trades=ledger.trades, bought=ledger.bought, sold=ledger.sold,
            buy_notional=ledger.buy_notional, sell_notional=ledger.sell_notional,
            realized_pnl=close.realized_pnl - ledger.opening.realized_pnl, unrealized_pnl=close.unrealized(mark),
            mark_price=mark, closing_quantity=close.quantity, closing_avg_price=close.avg_price,
            pnl_quantity=theirs, reconciled=None if theirs is None else abs(theirs - close.quantity) <= EPSILON,
            generated_at=now,
        ))  # fmt: skip
    return rows


def as_csv(rows: list[ReportRow]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(ReportRow.model_fields))
    writer.writeheader()
    for row in rows:
        writer.writerow(row.model_dump(mode="json"))
    return out.getvalue()


def day_of(text: str) -> str:
    """A report date as YYYY-MM-DD, or ValueError."""
    return date.fromisoformat(text).isoformat()


class Ptrc:
    def __init__(self, settings: ServiceSettings, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.redis = redis
        self.prices = PriceBook(settings.symbols)

    async def run(self, nc: Any, stop: asyncio.Event) -> None:
        await bus.consume(nc, stop, self.settings, self.process, 500, 1.0)

    async def process(self, js: Any, messages: list[Msg]) -> None:
        await bus.apply_then_ack(js, messages, self.settings, Fill, "invalid_fill", DEAD, lambda f: f.fill_id,
                                 self.apply)  # fmt: skip

    async def apply(self, fills: list[Fill]) -> None:
        if not fills:
            return
        days = sorted({f"{f.ts:%Y-%m-%d}" for f in fills})
        keys = sorted({position_key(f.account, f.symbol) for f in fills})

        async def step(tx: Pipeline) -> int:
            # Under WATCH: another ptrc (a rollout's second pod) that commits first makes this run again.
            running = {k: Position.model_validate_json(v)
                       for k, v in zip(keys, await tx.hmget(POSITIONS_KEY, keys), strict=True) if v}  # fmt: skip
            ledgers: dict[tuple[str, str], Ledger] = {}
            applied: set[str] = set()
            for day in days:
                ledger_raw = await tx.hmget(ledger_key(day), keys)
                ledgers |= {(day, k): Ledger.model_validate_json(v) for k, v in zip(keys, ledger_raw, strict=True) if v}
                ids = [f.fill_id for f in fills if f"{f.ts:%Y-%m-%d}" == day]
                applied |= {i for i, v in zip(ids, await tx.hmget(applied_key(day), ids), strict=True) if v}
            new = [f for f in fills if f.fill_id not in applied]
            for fill in sorted(new, key=lambda f: f.ts):
                key, day = position_key(fill.account, fill.symbol), f"{fill.ts:%Y-%m-%d}"
                position = running.get(key) or Position(symbol=fill.symbol, account=fill.account)
                ledgers[(day, key)], running[key] = apply(ledgers.get((day, key)), position, fill)
            rediskv.begin_writes(tx)
            if not new:
                return 0
            tx.hset(POSITIONS_KEY, mapping={k: running[k].model_dump_json() for k in keys if k in running})
            for day in days:
                touched: dict[Any, Any] = {k: v.model_dump_json() for (d, k), v in ledgers.items() if d == day}
                if touched:
                    tx.hset(ledger_key(day), mapping=touched)
                    tx.expire(ledger_key(day), TTL_SECONDS)
                marks: dict[Any, Any] = {f.fill_id: 1 for f in new if f"{f.ts:%Y-%m-%d}" == day}
                if marks:
                    tx.hset(applied_key(day), mapping=marks)
                    tx.expire(applied_key(day), TTL_SECONDS)
            for day in {f"{f.ts:%Y-%m-%d}" for f in new} - {today()}:
                tx.delete(written_key(day))  # a late fill of a reported day: that day is written again
            return len(new)

        watched = [POSITIONS_KEY, *(ledger_key(d) for d in days), *(applied_key(d) for d in days)]
        FILLS.inc(await rediskv.compare_and_set(self.redis, watched, step))

    async def rows(self, day: str) -> list[ReportRow] | None:
        """The day's report from the ledgers, or None when Redis holds no ledger of that day."""
        raw = await self.redis.hgetall(ledger_key(day))
        if not raw:
            return None
        ledgers = [Ledger.model_validate_json(v) for v in raw.values()]
        latest = await self.latest_day()
        pnl = None
        if day == latest:  # pnl keeps current positions only: the latest day's closing must match them
            pnl = {k.decode() if isinstance(k, bytes) else k: Position.model_validate_json(v).quantity
                   for k, v in (await self.redis.hgetall(DETAILS_KEY)).items()}  # fmt: skip
        marks = {s: q.last for s in self.settings.symbols if (q := self.prices.get(s))} if day == today() else {}
        found = report(day, ledgers, marks, pnl)
        if pnl is not None:
            mismatched = [r for r in found if r.reconciled is False]
            MISMATCHES.set(len(mismatched))
            for row in mismatched:
                log.warning("reconciliation: %s/%s closes at %s, pnl holds %s", row.account, row.symbol,
                            row.closing_quantity, row.pnl_quantity)  # fmt: skip
        return found

    async def ledger_days(self) -> list[str]:
        keys = [k.decode() if isinstance(k, bytes) else k async for k in self.redis.scan_iter(ledger_key("*"))]
        return [k.rsplit(":", 1)[1] for k in keys]

    async def latest_day(self) -> str | None:
        return max(await self.ledger_days(), default=None)

    def uri(self) -> str:
        return REPORTS.uri(self.settings.S3_BUCKET)

    def write(self, day: str, rows: list[ReportRow]) -> None:
        """The day's rows in place of any written before (one Delta commit)."""
        table = pa.Table.from_pylist([r.model_dump() for r in rows], schema=REPORTS.schema)
        write_deltalake(self.uri(), table, mode="overwrite", predicate=f"date = '{day}'",
                        partition_by=list(REPORTS.partition_by),
                        storage_options=self.settings.storage_options())  # fmt: skip
        REPORTS_WRITTEN.inc()

    def read(self, day: str) -> list[ReportRow]:
        try:
            table = DeltaTable(self.uri(), storage_options=self.settings.storage_options())
        except TableNotFoundError:
            return []
        found = table.to_pyarrow_table(partitions=[("date", "=", day)]).to_pylist()
        return [ReportRow.model_validate(r) for r in found]

    async def close_days(self, nc: Any, stop: asyncio.Event) -> None:
        """Worker: every CLOSE_CHECK_SECONDS, reconcile the latest day against pnl (the mismatch gauge
        stays current without anyone asking), and write the report of every ended day not written yet
        (however many an outage skipped) once its fills are all applied (`closable`)."""
        js = nc.jetstream()
        while not stop.is_set():
            try:
                if (latest := await self.latest_day()) is not None:
                    await self.rows(latest)  # sets the reconciliation gauge
                for day in await self.closable_days(js):
                    rows = await self.rows(day)
                    if rows is not None:
                        await asyncio.to_thread(self.write, day, rows)
                        log.info("report of %s written: %d rows", day, len(rows))
                    await self.redis.set(written_key(day), "1", ex=TTL_SECONDS)
            except Exception as exc:  # Redis, NATS or the lake away: the next check tries again
                log.warning("end-of-day check: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), CLOSE_CHECK_SECONDS)

    async def closable_days(self, js: Any) -> list[str]:
        """Ended days with ledgers and no written report whose fills have all been applied."""
        days = sorted(d for d in await self.ledger_days() if d < today())
        if not days:
            return []
        marks = await self.redis.mget([written_key(d) for d in days])
        unwritten = [d for d, mark in zip(days, marks, strict=True) if mark is None]
        if not unwritten:
            return []
        now = datetime.now(UTC)
        ended = [d for d in unwritten if closable(d, now, 0, 0)]  # past its end and the grace
        if not ended:
            return []
        last_seq = (await js.stream_info(self.settings.NATS_STREAM)).state.last_seq
        for day in ended:  # the first check after a day's end records where the stream stood
            await self.redis.set(day_end_key(day), last_seq, nx=True, ex=TTL_SECONDS)
        marks = await self.redis.mget([day_end_key(d) for d in ended])
        consumer = await js.consumer_info(self.settings.NATS_STREAM, self.settings.NATS_DURABLE)
        floor = consumer.ack_floor.stream_seq if consumer.ack_floor else 0
        return [
            d
            for d, mark in zip(ended, marks, strict=True)
            if closable(d, now, int(mark) if mark is not None else None, floor)
        ]


def today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


def create(settings: ServiceSettings) -> FastAPI:
    redis, redis_check = rediskv.connect(settings.REDIS_URL, settings.redis_credentials())
    ptrc = Ptrc(settings, redis)
    app = bus.worker_app(settings, [ptrc.prices.follow, ptrc.run, ptrc.close_days], {"redis": redis_check})

    readers = auth.readers(settings)

    def parsed(day: str) -> str:
        try:
            return day_of(day)
        except ValueError:
            raise HTTPException(422, "date: expected YYYY-MM-DD") from None

    @app.get("/reports", response_model=None)
    async def get_report(day: str = Query(alias="date"), format: str = Query("json", pattern="^(json|csv)$"),
                         reader: auth.Reader = readers) -> Any:  # fmt: skip
        """A day's report: from the ledgers while Redis has them, else as written to the lake; the
        caller's account's rows only, unless it has role oversight."""
        wanted = parsed(day)
        rows = await ptrc.rows(wanted)
        if rows is None:
            rows = await asyncio.to_thread(ptrc.read, wanted)
        rows = [r for r in rows if reader.sees(r.account)]
        if format == "csv":
            return Response(as_csv(rows), media_type="text/csv")
        return rows

    @app.post("/reports/{day}")
    async def write_report(day: str, reader: auth.Reader = readers) -> list[ReportRow]:
        """Write a day's report to the lake now (replacing one written before) and return it: every
        account's rows, so for role oversight only when accounts are configured."""
        reader.require_everything("writing a day's report")
        wanted = parsed(day)
        rows = await ptrc.rows(wanted)
        if rows is None:
            raise HTTPException(404, f"no fills recorded for {wanted}")
        try:
            await asyncio.to_thread(ptrc.write, wanted, rows)
        except Exception as exc:  # S3 away or refusing: nothing half-written (one Delta commit), try again
            log.warning("report of %s not written: %s", wanted, exc)
            raise HTTPException(503, "the lake did not take the report; try again", {"Retry-After": "5"}) from None
        return rows

    return app
