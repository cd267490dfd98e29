"""sink-ticks and sink-alt: a durable pull consumer into a Delta table, at least once, without duplicates.

- Messages are acknowledged only after the Delta commit that holds them succeeded.
- Each commit records the stream sequences it holds, as ranges, in its commit metadata, with
  the stream they are of: stack, stream name and the stream's creation time. Sequences of another
  stack writing the same table, or of an earlier incarnation of the stream (deleted and made
  again, so numbered from 1 again), are never taken for this one's. Commits made before the
  identity was recorded are not trusted either: a restart just after an upgrade may write the
  messages of its last uncommitted window twice, never skip one.
  After a crash between commit and ack, a redelivered message whose sequence a recent
  commit already holds is acknowledged and skipped: nothing lost, nothing written twice.
  A single high-water mark would not do: redeliveries of a dead sink's uncommitted
  messages arrive after newer ones. One sink replica per consumer: the CRD allows no more, and
  its Deployment rolls with Recreate, so an old and a new pod never commit side by side.
- On start the sink reads commits back until they reach the consumer's ack floor: nothing at or
  below it can come again, anything above it may, however long ago it was committed (a consumer
  deleted and made again by the operator delivers the whole stream anew; nats-server can also
  reset a durable's ack floor to 1 when it rebuilds a stream's state after a power loss,
  nats-io/nats-server#8036, and here Debian's 2.9 kept it at 1 for minutes after a restart).
- Flushes on size (SINK_MAX_ROWS) or age (SINK_MAX_AGE_SECONDS, default 1 s): about one
  commit per second per table at most under load.
- A malformed message goes to `{DEAD_LETTER_PREFIX}.{stream}.{reason}` with the reason in
  its headers, durably (JetStream publish ack), and only then is it acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError
from fastapi import FastAPI
from nats.aio.client import Client
from nats.aio.msg import Msg
from prometheus_client import Counter, Histogram

from tradingstack.lake import ALT_DATA, MARKET_TICKS, LakeTable
from tradingstack_services.marketdata.ticks import (
    SYMBOL_PATTERN,
    InvalidMessageError,
    parse_tick,
    require_known_symbol,
    to_datetime,
)
from tradingstack_services.platform import bus
from tradingstack_services.platform.settings import ServiceSettings

log = logging.getLogger(__name__)

SEQ_KEY = "tradingstack.stream_seqs"
# Commits read back on start, at first: redeliveries usually come from the last few seconds.
# The window grows (x4) until its oldest commit holds nothing above the consumer's ack floor.
LOOKBACK_COMMITS = 1000
ROWS = Counter("tradingstack_sink_rows_total", "Rows committed to Delta", ["table"])
COMMITS = Counter("tradingstack_sink_commits_total", "Delta commits", ["table"])
DEAD = Counter("tradingstack_sink_dead_lettered_total", "Messages sent to the dead-letter stream", ["table", "reason"])
SKIPPED = Counter("tradingstack_sink_duplicates_skipped_total", "Redelivered messages already committed", ["table"])
COMMIT_FAILURES = Counter("tradingstack_sink_commit_failures_total", "Delta commits that failed and were retried",
                          ["table"])  # fmt: skip
# A failed commit is tried again after a delay doubling up to the maximum. A stalled one ends with
# delta-rs's own request timeouts (S3_RETRY_TIMEOUT_SECONDS); it is never abandoned while it may
# still land, since a second attempt beside it could commit the same rows twice.
COMMIT_RETRY_DELAY = 0.5
COMMIT_RETRY_DELAY_MAX = 15.0
COMMIT_SECONDS = Histogram("tradingstack_sink_commit_seconds", "Time to commit one batch to Delta", ["table"])

RowMaker = Callable[[Msg, int], dict[str, Any]]


def same_stream(recorded: Any, current: str) -> bool:
    """Whether a commit's recorded stream identity is the current stream's (stack, stream and creation
    time). A commit without one (an older sink's) is no one's.

    nats-server 2.9 reports a stream's creation time as its first message's after a restart that
    follows a config update (2.10 and later keep it): there the sink takes the stream for a new one,
    and a restart may write its last uncommitted window again; it never skips a message.
    """
    return isinstance(recorded, str) and recorded == current


MAX_SOURCE_LENGTH = 128
# A batch whose commit fails this many times in a row with the same error while the table answers
# reads is split in two; a single row that does so is dead-lettered ("uncommittable").
SAME_FAILURES_BEFORE_SPLIT = 2


class SequenceRanges:
    """A set of stream sequences kept as merged [low, high] ranges (contiguous runs stay tiny).

    Only the newest `limit` ranges are kept: a gap (a dead-lettered or foreign sequence) starts a
    new range, and redeliveries come from the last few seconds, not from days ago.
    """

    def __init__(self, limit: int = 10_000) -> None:
        self.ranges: list[list[int]] = []
        self.limit = limit

    def add_run(self, low: int, high: int) -> None:
        self.ranges.append([low, high])
        self.ranges.sort()
        merged: list[list[int]] = []
        for lo, hi in self.ranges:
            if merged and lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self.ranges = merged[-self.limit :]

    def __contains__(self, seq: int) -> bool:
        return any(lo <= seq <= hi for lo, hi in self.ranges)

    def drop_through(self, floor: int) -> None:
        """Forget sequences at or below `floor`: the consumer has them all acknowledged."""
        self.ranges = [[max(lo, floor + 1), hi] for lo, hi in self.ranges if hi > floor]

    @staticmethod
    def encode(seqs: list[int]) -> str:
        runs: list[list[int]] = []
        for seq in sorted(seqs):
            if runs and seq == runs[-1][1] + 1:
                runs[-1][1] = seq
            else:
                runs.append([seq, seq])
        return ",".join(f"{lo}-{hi}" for lo, hi in runs)

    def add_encoded(self, text: str) -> None:
        for run in filter(None, text.split(",")):
            lo, _, hi = run.partition("-")
            self.add_run(int(lo), int(hi or lo))


def tick_row(msg: Msg, seq: int) -> dict[str, Any]:
    tick = parse_tick(msg.data)
    return {
        **tick.model_dump(exclude={"event_ts"}),
        "event_ts": tick.event_ts,
        "ingest_ts": datetime.now(UTC),
        "stream_seq": seq,
        "dt": tick.event_ts.strftime("%Y-%m-%d"),
    }


def _finite_or_none(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(f"value must be a number, not {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"value must be finite, not {value!r}")
    return number


def alt_row(msg: Msg, seq: int) -> dict[str, Any]:
    try:
        data = json.loads(msg.data)
        if not isinstance(data, dict):
            raise TypeError("an alt-data record is a JSON object")
        event_ts = to_datetime(data["event_ts"])
        symbol, source = str(data["symbol"]).upper(), str(data["source"])
        # The symbol names a partition directory: bounded and plain, as a tick's symbol is.
        if not re.fullmatch(SYMBOL_PATTERN, symbol):
            raise ValueError(f"symbol {symbol[:40]!r} does not match {SYMBOL_PATTERN} (at most 32 characters)")
        if not 0 < len(source) <= MAX_SOURCE_LENGTH:
            raise ValueError(f"source must be 1 to {MAX_SOURCE_LENGTH} characters, not {len(source)}")
        value = _finite_or_none(data.get("value"))
        payload = json.dumps(data.get("payload")) if data.get("payload") is not None else None
    except (ValueError, KeyError, TypeError) as exc:  # JSON, UTF-8 and number errors are ValueErrors
        raise InvalidMessageError("invalid_alt", f"{type(exc).__name__}: {exc}") from None
    return {
        "record_id": str(data.get("record_id") or f"{msg.subject}:{seq}"),
        "event_ts": event_ts,
        "ingest_ts": datetime.now(UTC),
        "source": source,
        "symbol": symbol,
        "kind": str(data["kind"]) if data.get("kind") else None,
        "value": value,
        "payload": payload,
        "stream_seq": seq,
        "dt": event_ts.strftime("%Y-%m-%d"),
    }


@dataclass
class LakeSink:
    settings: ServiceSettings
    table: LakeTable
    make_row: RowMaker
    # The stream and durable read (the service's NATS_STREAM and NATS_DURABLE unless given), and the
    # commit metadata key its sequences go under: one key per stream when several sinks share a table.
    stream: str | None = None
    durable: str | None = None
    seq_key: str = SEQ_KEY
    committed: SequenceRanges = field(default_factory=SequenceRanges)
    # Which stream the sequences are of: this stack's stream, and which incarnation of it (its
    # creation time), known once `run` has asked the server. Commits of any other are not ours.
    source: str = ""
    # The highest sequence delivered for the first time in this run: a first delivery at or below it
    # means the consumer was made again (a replay: the committed ranges say what to skip) or the
    # stream was (new sequences under old numbers): `_check_incarnation` tells which.
    first_seen: int = 0
    rows: dict[int, dict[str, Any]] = field(default_factory=dict)  # by stream sequence
    pending: dict[int, Msg] = field(default_factory=dict)  # the latest delivery of each
    oldest: float | None = None
    rows_committed: int = 0
    # One commit runs in the background while the next batch is fetched; these are its messages.
    committing: dict[int, Msg] = field(default_factory=dict)
    commit_task: asyncio.Task[None] | None = None
    commit_started: float | None = None  # monotonic time the running commit began (liveness)
    # Ticks only: alt data is about whatever its sources cover (news on any company), not the symbols traded.
    known_symbols: frozenset[str] | None = field(init=False)

    def __post_init__(self) -> None:
        self.known_symbols = frozenset(self.settings.symbols) if self.table == MARKET_TICKS else None
        self.stream = self.stream or self.settings.NATS_STREAM
        self.durable = self.durable or self.settings.NATS_DURABLE or ""

    @property
    def worker_label(self) -> str:
        """How `/readyz` and the restart counter name this sink's worker: by the stream it reads."""
        return f"LakeSink.run[{self.stream}]"

    @property
    def uri(self) -> str:
        return self.table.uri(self.settings.S3_BUCKET)

    @property
    def name(self) -> str:
        return self.table.path.rsplit("/", 1)[-1]

    def read_committed(self, ack_floor: int = 0) -> SequenceRanges:
        """The stream sequences above `ack_floor` that commits hold, from the table's commit history.

        Commits are read back, newest first, in growing windows until the oldest one read holds
        nothing above the floor (commits follow the stream closely, older ones only less so).
        """
        ranges = SequenceRanges()
        try:
            table = DeltaTable(self.uri, storage_options=self.settings.storage_options())
        except TableNotFoundError:
            return ranges
        window = LOOKBACK_COMMITS
        while True:
            read = table.history(window)
            # Other writers' commits (compaction) lack the key; another stack's, or an earlier
            # incarnation of this stream's, hold sequences that say nothing of this one's messages.
            history = [c for c in read if self.seq_key in c and same_stream(c.get(self.source_key), self.source)]
            oldest = SequenceRanges()
            if history:
                oldest.add_encoded(str(history[-1][self.seq_key]))
            if len(read) < window or not oldest.ranges or oldest.ranges[-1][1] <= ack_floor:
                break
            window *= 4
        for commit in history:
            ranges.add_encoded(str(commit[self.seq_key]))
        ranges.drop_through(ack_floor)
        return ranges

    @property
    def source_key(self) -> str:
        return f"{self.seq_key}.source"

    async def ack_floor(self, js: Any) -> int:
        """The highest stream sequence the consumer will never deliver again (acknowledged, or gone).

        Also learns the stream's identity (`source`): a stream deleted and made again starts its
        sequences at 1 again under a new creation time.
        """
        stream = self.stream or ""
        consumer = await bus.require_consumer(js, stream, self.durable or "")
        info = await js.stream_info(stream)
        self.source = self._source_of(info)
        first = info.state.first_seq or 1
        return max(consumer.ack_floor.stream_seq if consumer.ack_floor else 0, first - 1)

    def _source_of(self, info: Any) -> str:
        created = info.created.isoformat() if info.created else "unknown"
        return f"{self.settings.STACK_NAMESPACE}/{self.settings.STACK_NAME}/{self.stream}@{created}"

    async def _check_incarnation(self, js: Any, messages: list[Msg]) -> None:
        """Before a batch that goes back in the stream: if the stream itself was made again under the
        running sink, what is buffered (the old incarnation's) is committed, and the new one starts
        with nothing committed; a consumer made again (a replay of the same stream) changes nothing."""
        firsts = [m.metadata.sequence.stream for m in messages if m.metadata.num_delivered == 1]
        if not firsts or (self.first_seen and min(firsts) > self.first_seen):
            return  # in order after what this run has seen: nothing went back
        source = self._source_of(await js.stream_info(self.stream))
        if same_stream(source, self.source):
            return
        log.warning("stream %s was made again (%s, was %s): its sequences start anew", self.stream, source,
                    self.source)  # fmt: skip
        # The old incarnation's rows are committed (their stream is gone: nothing would bring them back),
        # but never acknowledged: an ack names a sequence, which now is a new message's.
        self.pending.clear()
        self.committing.clear()
        await self.flush(js)
        self.source, self.committed, self.first_seen = source, SequenceRanges(), 0

    def _commit(self, batch: pa.Table, seqs: str) -> None:
        for attempt in range(5):
            try:
                write_deltalake(
                    self.uri,
                    batch,
                    mode="append",
                    partition_by=list(self.table.partition_by),
                    storage_options=self.settings.storage_options(),
                    commit_properties=CommitProperties(
                        custom_metadata={self.seq_key: seqs, self.source_key: self.source}
                    ),
                )
                return
            except CommitFailedError:
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))  # another writer committed first: try again

    async def _commit_until_done(self, rows: dict[int, dict[str, Any]]) -> dict[int, str]:
        """Commit the rows, trying again with backoff while S3 fails or stalls: never given up.

        Its messages stay unacknowledged meanwhile (redeliveries only replace the message to ack),
        and fetching pauses at the next flush, so memory stays bounded by one batch in flight.
        A batch whose rows cannot all take the table's schema is split in halves, each committed alone,
        until the row at fault is alone. Returns those rows (sequence -> the error), committed by no
        one, for the dead-letter stream.
        """
        parts: list[dict[int, dict[str, Any]]] = [rows]
        poison: dict[int, str] = {}
        while parts:
            part = parts.pop()
            error = await self._commit_part(part)
            if error is None:
                continue
            if len(part) == 1:
                poison |= dict.fromkeys(part, error)
            else:
                seqs = list(part)
                half = len(seqs) // 2
                log.warning("%d rows for %s do not make a batch of its schema: splitting to find the row at "
                            "fault (%s)", len(seqs), self.name, error)  # fmt: skip
                parts += [{q: part[q] for q in seqs[half:]}, {q: part[q] for q in seqs[:half]}]
        return poison

    async def _commit_part(self, rows: dict[int, dict[str, Any]]) -> str | None:
        """Commit until done (None), or why the rows cannot become a batch of the table's schema at all.

        That is the rows' fault and the same on every try (no I/O is involved), so it is answered at
        once, for `_commit_until_done` to split on. Anything the commit itself meets (S3 away, refusing,
        stalling, a competing writer) is retried with backoff for as long as it lasts: the data is
        never given up on the lake's account.
        """
        try:
            batch = await asyncio.to_thread(pa.Table.from_pylist, list(rows.values()), schema=self.table.schema)
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
            return f"{type(exc).__name__}: {exc}"[:512]
        seqs = SequenceRanges.encode(list(rows))
        delay = COMMIT_RETRY_DELAY
        retry = False
        while True:
            try:
                # A failed attempt may have committed all the same (the answer was lost): look first.
                if not (retry and await asyncio.to_thread(self._holds, seqs)):
                    await asyncio.to_thread(self._commit, batch, seqs)
                return None
            except Exception as exc:  # S3 away, 5xx, stalled: the same rows again after a delay
                COMMIT_FAILURES.labels(self.name).inc()
                log.warning("commit of %d rows to %s failed, trying again in %.1f s: %s",
                            len(rows), self.name, delay, f"{type(exc).__name__}: {exc}")  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, COMMIT_RETRY_DELAY_MAX)
                retry = True

    def _holds(self, seqs: str) -> bool:
        """Whether one of the table's latest commits is the one recording exactly these sequences."""
        table = DeltaTable(self.uri, storage_options=self.settings.storage_options())
        return any(commit.get(self.seq_key) == seqs and same_stream(commit.get(self.source_key), self.source)
                   for commit in table.history(20))  # fmt: skip

    async def flush(self, js: Any) -> None:
        """Commit what is buffered and wait for it (and for a commit already running)."""
        await self.start_flush(js)
        await self.wait_flush()

    async def start_flush(self, js: Any) -> None:
        """Hand the buffered rows to a background commit, after the previous commit ended (commits stay in order)."""
        if not self.rows:
            return
        await self.wait_flush()
        rows, self.committing = self.rows, self.pending
        self.rows, self.pending, self.oldest = {}, {}, None
        self.commit_task = asyncio.create_task(self._commit_and_ack(js, rows, self.committing))

    async def wait_flush(self) -> None:
        if self.commit_task is not None:
            task, self.commit_task = self.commit_task, None
            await task  # a failed commit raises here: its messages stay unacknowledged and come back

    async def _commit_and_ack(self, js: Any, rows: dict[int, dict[str, Any]], messages: dict[int, Msg]) -> None:
        started = self.commit_started = time.monotonic()
        try:
            poison = await self._commit_until_done(rows)
        finally:
            self.commit_started = None
        seqs = [q for q in rows if q not in poison]
        COMMIT_SECONDS.labels(self.name).observe(time.monotonic() - started)
        COMMITS.labels(self.name).inc()
        ROWS.labels(self.name).inc(len(seqs))
        self.rows_committed += len(seqs)
        self.committed.add_encoded(SequenceRanges.encode(seqs))
        for seq, error in poison.items():  # parked durably before the ack, like any message that cannot be used
            if seq in messages:  # else of a stream made again since: its message is gone with it
                await bus.dead_letter(js, messages[seq], self.settings, InvalidMessageError("uncommittable", error))
                DEAD.labels(self.name, "uncommittable").inc()
        for seq, msg in messages.items():  # only now: the rows are durable
            if seq not in poison:
                await msg.ack()
        self.committing = {}

    async def handle(self, js: Any, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        if msg.metadata.num_delivered == 1:
            self.first_seen = max(self.first_seen, seq)
        if seq in self.committed:
            SKIPPED.labels(self.name).inc()
            await msg.ack()  # committed before a crash, redelivered after it
            return
        if seq in self.rows:
            self.pending[seq] = msg  # redelivered while its batch is still open: ack the latest
            return
        if seq in self.committing:
            self.committing[seq] = msg  # redelivered while its batch is being committed
            return
        try:
            row = self.make_row(msg, seq)
            if self.known_symbols is not None:
                require_known_symbol(row["symbol"], self.known_symbols)
        except Exception as exc:  # one message that cannot become a row never stops the others
            error = exc if isinstance(exc, InvalidMessageError) else bus.unprocessable(exc)
            await bus.dead_letter(js, msg, self.settings, error)
            DEAD.labels(self.name, error.reason).inc()
            return
        self.rows[seq] = row
        self.pending[seq] = msg
        if self.oldest is None:
            self.oldest = time.monotonic()

    def due(self) -> bool:
        if not self.rows:
            return False
        aged = self.oldest is not None and time.monotonic() - self.oldest >= self.settings.SINK_MAX_AGE_SECONDS
        return len(self.rows) >= self.settings.SINK_MAX_ROWS or aged

    async def run(self, nc: Client, stop: asyncio.Event) -> None:
        # Started again after a failure: what was buffered but not committed is unacknowledged and
        # comes back from JetStream, so start from nothing rather than from half a batch.
        self.rows, self.pending, self.committing, self.oldest, self.commit_task = {}, {}, {}, None, None
        self.first_seen = 0
        js = nc.jetstream()
        # Reading the log back is a delta-rs call like a commit, and can hang behind a stalled S3 the
        # same way: the liveness check watches it too.
        self.commit_started = time.monotonic()
        try:
            self.committed = await asyncio.to_thread(self.read_committed, await self.ack_floor(js))
        finally:
            self.commit_started = None
        log.info("sink %s (%s) starts; recent commits hold sequences %s", self.name, self.stream,
                 self.committed.ranges[-3:])  # fmt: skip
        sub = await js.pull_subscribe_bind(durable=self.durable, stream=self.stream)
        lag = bus.ConsumerLag(self.stream or "", self.durable or "")
        while not stop.is_set():
            try:
                messages = await sub.fetch(self.settings.SINK_FETCH_BATCH, timeout=self.settings.SINK_MAX_AGE_SECONDS)
            except TimeoutError:  # an empty fetch: nothing new this interval
                messages = []
            except Exception as exc:  # NATS is away: keep the batch, wait for the reconnect
                log.warning("fetch failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            lag.fetched(messages)
            await self._check_incarnation(js, messages)
            for msg in messages:
                await self.handle(js, msg)
            if self.due():
                await self.start_flush(js)
        await self.flush(js)


def _filesystem(settings: ServiceSettings) -> pafs.S3FileSystem:
    """The lake's S3 for the readiness probe; without keys in the settings, the standard AWS chain
    (environment, web identity, instance profile), as delta-rs uses it."""
    scheme, _, host = settings.S3_ENDPOINT_URL.partition("://")
    return pafs.S3FileSystem(access_key=settings.AWS_ACCESS_KEY_ID, secret_key=settings.AWS_SECRET_ACCESS_KEY,
                             endpoint_override=host.rstrip("/"), scheme=scheme, region=settings.AWS_REGION,
                             connect_timeout=1, request_timeout=1)  # fmt: skip


def create(settings: ServiceSettings, table: LakeTable, make_row: RowMaker) -> FastAPI:
    return serve(settings, [LakeSink(settings, table, make_row)])


def serve(settings: ServiceSettings, sinks: list[LakeSink]) -> FastAPI:
    """The app of one or more sinks (one per stream read), each a supervised worker."""
    s3 = _filesystem(settings)

    async def commit_check() -> None:
        """Liveness: delta-rs was seen blocked in one call for minutes behind a faulty S3, the sink alive and
        ready but nothing moving; only a restart ended it (the messages come back unacknowledged)."""
        for sink in sinks:
            began = sink.commit_started
            if began is not None and time.monotonic() - began > settings.SINK_COMMIT_DEADLINE_SECONDS:
                raise TimeoutError(f"a Delta commit of {sink.stream} has run {time.monotonic() - began:.0f} s")

    async def s3_check() -> None:
        # One request (HEAD of the bucket), not a read of the Delta log: that costs a request per
        # commit since the last checkpoint and timed the probe out on a busy table.
        info = await asyncio.to_thread(s3.get_file_info, settings.S3_BUCKET)
        if info.type == pafs.FileType.NotFound:
            raise LookupError(f"bucket {settings.S3_BUCKET} does not exist")

    return bus.worker_app(settings, [sink.run for sink in sinks], {"s3": s3_check}, live={"commit": commit_check})


def create_ticks(settings: ServiceSettings) -> FastAPI:
    return create(settings, MARKET_TICKS, tick_row)


def create_alt(settings: ServiceSettings) -> FastAPI:
    return create(settings, ALT_DATA, alt_row)
