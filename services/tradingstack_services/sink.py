"""sink-ticks and sink-alt: a durable pull consumer into a Delta table, at least once, without duplicates.

- Messages are acknowledged only after the Delta commit that holds them succeeded.
- Each commit records the highest stream sequence it holds (commit metadata). After a
  crash between commit and ack, the redelivered messages at or below that mark are
  acknowledged and skipped: nothing lost, nothing written twice. This relies on one sink
  replica per consumer (the default), which receives the stream in order.
- Flushes on size (SINK_MAX_ROWS) or age (SINK_MAX_AGE_SECONDS, default 1 s): about one
  commit per second per table at most under load.
- A malformed message goes to `{DEAD_LETTER_PREFIX}.{stream}.{reason}` with the reason in
  its headers, durably (JetStream publish ack), and only then is it acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError
from fastapi import FastAPI
from nats.aio.client import Client
from nats.aio.msg import Msg
from prometheus_client import Counter, Histogram

from tradingstack.lake import ALT_DATA, MARKET_TICKS, LakeTable
from tradingstack_services import bus
from tradingstack_services.app import create_app
from tradingstack_services.settings import ServiceSettings
from tradingstack_services.ticks import InvalidMessageError, parse_tick

log = logging.getLogger(__name__)

SEQ_KEY = "tradingstack.stream_seq"
ROWS = Counter("tradingstack_sink_rows_total", "Rows committed to Delta", ["table"])
COMMITS = Counter("tradingstack_sink_commits_total", "Delta commits", ["table"])
DEAD = Counter("tradingstack_sink_dead_lettered_total", "Messages sent to the dead-letter stream", ["table", "reason"])
SKIPPED = Counter("tradingstack_sink_duplicates_skipped_total", "Redelivered messages already committed", ["table"])
COMMIT_SECONDS = Histogram("tradingstack_sink_commit_seconds", "Time to commit one batch to Delta", ["table"])

RowMaker = Callable[[Msg, int], dict[str, Any]]


def tick_row(msg: Msg, seq: int) -> dict[str, Any]:
    tick = parse_tick(msg.data)
    return {
        **tick.model_dump(exclude={"event_ts"}),
        "event_ts": tick.event_ts,
        "ingest_ts": datetime.now(UTC),
        "stream_seq": seq,
        "dt": tick.event_ts.strftime("%Y-%m-%d"),
    }


def alt_row(msg: Msg, seq: int) -> dict[str, Any]:
    import json

    try:
        data = json.loads(msg.data)
        event_ts = datetime.fromisoformat(str(data["event_ts"]).replace("Z", "+00:00"))
        symbol, source = str(data["symbol"]).upper(), str(data["source"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidMessageError("invalid_alt", f"{type(exc).__name__}: {exc}") from None
    value = data.get("value")
    return {
        "record_id": str(data.get("record_id") or f"{msg.subject}:{seq}"),
        "event_ts": event_ts if event_ts.tzinfo else event_ts.replace(tzinfo=UTC),
        "ingest_ts": datetime.now(UTC),
        "source": source,
        "symbol": symbol,
        "kind": data.get("kind") or None,
        "value": float(value) if value not in (None, "") else None,
        "payload": json.dumps(data.get("payload")) if data.get("payload") is not None else None,
        "stream_seq": seq,
        "dt": event_ts.strftime("%Y-%m-%d"),
    }


@dataclass
class LakeSink:
    settings: ServiceSettings
    table: LakeTable
    make_row: RowMaker
    high_water: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    pending: list[Msg] = field(default_factory=list)
    oldest: float | None = None

    @property
    def uri(self) -> str:
        return f"s3://{self.settings.S3_BUCKET}/{self.table.path}"

    @property
    def name(self) -> str:
        return self.table.path.rsplit("/", 1)[-1]

    def read_high_water(self) -> int:
        """The highest stream sequence already committed, from the table's commit history."""
        try:
            table = DeltaTable(self.uri, storage_options=self.settings.storage_options())
        except TableNotFoundError:
            return 0
        for commit in table.history(100):  # newest first; other writers' commits lack the key
            if SEQ_KEY in commit:
                return int(commit[SEQ_KEY])
        return 0

    def _commit(self, batch: pa.Table, max_seq: int) -> None:
        for attempt in range(5):
            try:
                write_deltalake(
                    self.uri,
                    batch,
                    mode="append",
                    partition_by=list(self.table.partition_by),
                    storage_options=self.settings.storage_options(),
                    commit_properties=CommitProperties(custom_metadata={SEQ_KEY: str(max_seq)}),
                )
                return
            except CommitFailedError:
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))  # another writer committed first: try again

    async def flush(self) -> None:
        if not self.rows:
            return
        max_seq = max(row["stream_seq"] for row in self.rows)
        batch = pa.Table.from_pylist(self.rows, schema=self.table.schema)
        started = time.monotonic()
        await asyncio.to_thread(self._commit, batch, max_seq)
        COMMIT_SECONDS.labels(self.name).observe(time.monotonic() - started)
        COMMITS.labels(self.name).inc()
        ROWS.labels(self.name).inc(len(self.rows))
        self.high_water = max_seq
        for msg in self.pending:  # only now: the rows are durable
            await msg.ack()
        self.rows, self.pending, self.oldest = [], [], None

    async def dead_letter(self, js: Any, msg: Msg, seq: int, error: InvalidMessageError) -> None:
        stream = self.settings.NATS_STREAM or "unknown"
        headers = {
            "Tradingstack-Reason": error.reason,
            "Tradingstack-Detail": error.detail[:512],
            "Tradingstack-Subject": msg.subject,
            "Tradingstack-Stream-Seq": str(seq),
        }
        await js.publish(f"{self.settings.DEAD_LETTER_PREFIX}.{stream}.{error.reason}", msg.data, headers=headers)
        DEAD.labels(self.name, error.reason).inc()
        log.warning("dead-lettered seq %d: %s", seq, error, extra={"reason": error.reason, "subject": msg.subject})
        await msg.ack()

    async def handle(self, js: Any, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        if seq <= self.high_water:
            SKIPPED.labels(self.name).inc()
            await msg.ack()  # committed before a crash, redelivered after it
            return
        try:
            row = self.make_row(msg, seq)
        except InvalidMessageError as error:
            await self.dead_letter(js, msg, seq, error)
            return
        self.rows.append(row)
        self.pending.append(msg)
        if self.oldest is None:
            self.oldest = time.monotonic()

    def due(self) -> bool:
        if not self.rows:
            return False
        aged = self.oldest is not None and time.monotonic() - self.oldest >= self.settings.SINK_MAX_AGE_SECONDS
        return len(self.rows) >= self.settings.SINK_MAX_ROWS or aged

    async def run(self, nc: Client, stop: asyncio.Event) -> None:
        js = nc.jetstream()
        self.high_water = await asyncio.to_thread(self.read_high_water)
        log.info("sink %s starts after stream sequence %d", self.name, self.high_water)
        sub = await js.pull_subscribe_bind(durable=self.settings.NATS_DURABLE or "", stream=self.settings.NATS_STREAM)
        while not stop.is_set():
            try:
                messages = await sub.fetch(self.settings.SINK_FETCH_BATCH, timeout=self.settings.SINK_MAX_AGE_SECONDS)
            except TimeoutError:  # an empty fetch: nothing new this interval
                messages = []
            except Exception as exc:  # NATS is away: keep the batch, wait for the reconnect
                log.warning("fetch failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            for msg in messages:
                await self.handle(js, msg)
            if self.due():
                await self.flush()
        await self.flush()


def create(settings: ServiceSettings, table: LakeTable, make_row: RowMaker) -> FastAPI:
    state: dict[str, Any] = {}

    async def s3_check() -> None:
        await asyncio.to_thread(lambda: DeltaTable(sink.uri, storage_options=settings.storage_options()).version())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        nc = await bus.connect(settings.NATS_URL, settings.SERVICE_NAME)
        state["nc"] = nc
        stop = asyncio.Event()
        task = asyncio.create_task(sink.run(nc, stop))
        try:
            yield
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            await nc.close()

    sink = LakeSink(settings, table, make_row)

    async def nats_check() -> None:
        if "nc" not in state:
            raise ConnectionError("not connected yet")
        await bus.readiness(state["nc"])()

    return create_app(settings.SERVICE_NAME, {"nats": nats_check, "s3": s3_check}, lifespan=lifespan)


def create_ticks(settings: ServiceSettings) -> FastAPI:
    return create(settings, MARKET_TICKS, tick_row)


def create_alt(settings: ServiceSettings) -> FastAPI:
    return create(settings, ALT_DATA, alt_row)
