"""A write-behind buffer of QuestDB rows, for history that must not slow the hot path (OMS order events).

Lines are appended in memory and written once a second in one ILP request from a worker
thread. While QuestDB is unreachable they wait (up to MAX_BUFFERED lines, then the oldest
are dropped and counted: history, unlike positions, is not worth an outage of the OMS).
A batch QuestDB refuses (4xx) is split in halves until the lines it refuses are alone: those
are logged with QuestDB's reason, counted and dropped, and every other line is written. Every
history table has dedup keys, so writing a line again (a half QuestDB half-applied, across
tables) changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from prometheus_client import Counter, Gauge

from tradingstack.backends.questdb import QuestDBError, QuestDBProvisioner
from tradingstack.credentials import ServerCredentials

log = logging.getLogger(__name__)
MAX_BUFFERED = 200_000
WRITTEN = Counter("tradingstack_history_lines_written_total", "History rows written to QuestDB")
DROPPED = Counter("tradingstack_history_lines_dropped_total", "History rows dropped", ["reason"])
BUFFERED = Gauge("tradingstack_history_lines_buffered", "History rows waiting for QuestDB")


class History:
    def __init__(self, questdb_url: str, credentials: ServerCredentials | None = None, interval: float = 1.0) -> None:
        self.questdb = QuestDBProvisioner(questdb_url, credentials=credentials or ServerCredentials())
        self.interval = interval
        self.lines: deque[str] = deque()

    def add(self, line: str) -> None:
        if len(self.lines) >= MAX_BUFFERED:
            self.lines.popleft()
            DROPPED.labels("buffer_full").inc()
        self.lines.append(line)

    async def flush(self) -> None:
        if not self.lines:
            return
        batch, self.lines = self.lines, deque()  # rows added while writing wait for the next flush
        try:
            await asyncio.to_thread(self._write, list(batch))
        except Exception as exc:  # unreachable: keep them, oldest first, for the next try
            batch.extend(self.lines)
            self.lines = batch
            while len(self.lines) > MAX_BUFFERED:
                self.lines.popleft()
                DROPPED.labels("buffer_full").inc()
            log.warning("history not written yet (%d rows buffered): %s", len(self.lines), exc)
        BUFFERED.set(len(self.lines))

    def _write(self, lines: list[str]) -> None:
        """Write the lines; a refused group is split until each refused line is alone, and dropped.

        Raises only when QuestDB cannot be reached: what was written stays written (dedup keys make
        the retry harmless) and the caller keeps the whole batch for the next flush.
        """
        try:
            self.questdb.write_ilp(lines)
        except QuestDBError as exc:
            if len(lines) == 1:
                log.error("QuestDB refused a history row, dropped: %s; row: %s", exc.message, lines[0][:512])
                DROPPED.labels("refused").inc()
                return
            middle = len(lines) // 2
            self._write(lines[:middle])
            self._write(lines[middle:])
            return
        WRITTEN.inc(len(lines))

    async def run(self, _nc: object, stop: asyncio.Event) -> None:
        """A service worker: flush every interval, and once more on the way out."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)
            await self.flush()
