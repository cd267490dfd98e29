"""normalizer: ticks -> validated, typed ticks and one-minute OHLCV bars, in QuestDB and on NATS.

Restart-safe without keeping state: each batch of ticks is first written to QuestDB's
`ticks` table (deduplicated on ts, symbol, tick_id, so a redelivery rewrites the same row),
then, once QuestDB has applied the write (WAL tables apply asynchronously: `wal_tables()`
shows when), every bar the batch touched is rebuilt from that table with one aggregate query and
upserted into `ohlcv_1m` (deduplicated on ts, symbol), then published on
`market.bar.{SYMBOL}`, and only then are the ticks acknowledged. A crash anywhere before
the ack replays the batch into the same rows.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import datetime, timedelta
from typing import Any

from fastapi import FastAPI
from nats.aio.client import Client
from nats.aio.msg import Msg
from prometheus_client import Counter

from tradingstack_services.marketdata.bars import Bar, minute_of
from tradingstack_services.marketdata.ticks import InvalidMessageError, Tick, parse_tick, require_known_symbol
from tradingstack_services.platform import bus, ilp, questdb
from tradingstack_services.platform.settings import ServiceSettings

log = logging.getLogger(__name__)
# How long a batch waits for QuestDB to make its ticks visible before it is handed back.
WAL_APPLY_TIMEOUT = 30.0
TICKS = Counter("tradingstack_normalizer_ticks_total", "Ticks normalised and stored")
BARS = Counter("tradingstack_normalizer_bar_updates_total", "Bar upserts written and published")
DEAD = Counter("tradingstack_normalizer_dead_lettered_total", "Ticks sent to the dead-letter stream", ["reason"])


def tick_line(tick: Tick) -> str:
    tags = {"symbol": tick.symbol, "exchange": tick.exchange, "venue": tick.venue}
    prices = {"price": tick.price, "size": tick.size, "volume": tick.volume, "bid": tick.bid, "ask": tick.ask}
    fields: dict[str, ilp.Field] = {"tick_id": tick.tick_id}
    fields |= {k: float(v) if v is not None else None for k, v in prices.items()}
    return ilp.line("ticks", tags, fields, tick.event_ts)


def _iso(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Normalizer:
    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.known_symbols = frozenset(settings.symbols)
        self.questdb, self.questdb_check = questdb.connect(settings)

    def rebuild(self, symbol: str, minute: datetime) -> Bar | None:
        sql = (
            "SELECT first(price), max(price), min(price), last(price), sum(size), count() FROM ticks "
            f"WHERE symbol = '{symbol}' AND ts >= '{_iso(minute)}' AND ts < '{_iso(minute + timedelta(minutes=1))}'"
        )
        ((first, high, low, last, volume, count),) = self.questdb.query(sql)["dataset"]
        if not count:
            return None
        return Bar(symbol, minute, first, high, low, last, float(volume or 0.0), int(count))

    def wal_position(self, table: str) -> tuple[int, int]:
        """(applied, committed) WAL transactions of a table: `writerTxn` and `sequencerTxn` of wal_tables()."""
        for name, writer, sequencer in self.questdb.query("SELECT name, writerTxn, sequencerTxn FROM wal_tables()")[
            "dataset"
        ]:
            if name == table:
                return int(writer), int(sequencer)
        return 0, 0  # not a WAL table: writes are visible when acknowledged

    def wait_visible(self, table: str) -> None:
        """Wait until QuestDB applied every transaction committed so far (ours included).

        An acknowledged ILP write to a WAL table is durable but visible to SELECT only once the apply
        job ran (usually milliseconds); a table the apply job suspended never catches up, and the
        batch is handed back (and retried) rather than built from part of its ticks.
        """
        applied, committed = self.wal_position(table)  # one query when QuestDB is already caught up
        deadline = time.monotonic() + WAL_APPLY_TIMEOUT
        delay = 0.005
        while applied < committed:
            if time.monotonic() > deadline:
                raise TimeoutError(f"QuestDB has not applied {table}'s WAL after {WAL_APPLY_TIMEOUT:.0f} s "
                                   "(a suspended table? see wal_tables())")  # fmt: skip
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
            applied = self.wal_position(table)[0]

    def store(self, ticks: list[Tick]) -> list[Bar]:
        """Ticks into QuestDB, then (once QuestDB shows them) the bars they touch rebuilt and upserted."""
        self.questdb.write_ilp([tick_line(t) for t in ticks])
        self.wait_visible("ticks")
        keys = sorted({(t.symbol, minute_of(t.event_ts)) for t in ticks}, key=lambda k: (k[1], k[0]))
        bars = [bar for symbol, minute in keys if (bar := self.rebuild(symbol, minute)) is not None]
        if bars:
            self.questdb.write_ilp([bar.ilp() for bar in bars])
        return bars

    async def process(self, js: Any, messages: list[Msg]) -> list[Bar]:
        ticks, good = [], []
        for msg in messages:
            try:
                tick = parse_tick(msg.data)
                require_known_symbol(tick.symbol, self.known_symbols)
                ticks.append(tick)
                good.append(msg)
            except InvalidMessageError as error:
                await bus.dead_letter(js, msg, self.settings, error)
                DEAD.labels(error.reason).inc()
        if not ticks:
            return []
        bars = await asyncio.to_thread(self.store, ticks)
        for bar in bars:
            fields = ("open", "high", "low", "close", "volume", "trades")
            payload = json.dumps({"symbol": bar.symbol, "ts": _iso(bar.start)} | {f: getattr(bar, f) for f in fields})
            msg_id = f"{bar.symbol}:{bar.start.isoformat()}:{bar.trades}"
            await js.publish(f"market.bar.{bar.symbol}", payload.encode(), headers={"Nats-Msg-Id": msg_id})
        for msg in good:  # only now: ticks and bars are stored
            await msg.ack()
        TICKS.inc(len(ticks))
        BARS.inc(len(bars))
        return bars

    async def run(self, nc: Client, stop: asyncio.Event) -> None:
        await bus.consume(nc, stop, self.settings, self.process, self.settings.SINK_FETCH_BATCH,
                          self.settings.SINK_MAX_AGE_SECONDS)  # fmt: skip


def create(settings: ServiceSettings) -> FastAPI:
    normalizer = Normalizer(settings)

    return bus.worker_app(settings, [normalizer.run], {"questdb": normalizer.questdb_check})
