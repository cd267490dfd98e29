"""Upkeep of one Delta table: compaction, a checkpoint, old log entries and replaced files removed.

A sink commits about once a second, so a table gains ~86,000 small files and log entries a day;
readers list and open every one. Compaction rewrites them into files near a target size
(`dataChange=false`: the rows are the same rows), a checkpoint lets a reader start from one
Parquet file instead of replaying the log, and vacuum deletes the files compaction replaced once
they are older than the retention (readers of an older version still open them until then).

Never two at once on one table: delta-rs lets two compactions of the same version both commit,
and the table then holds every compacted row twice (tests/test_upkeep.py shows it). The operator
runs one replica (Recreate) and a stack owns its tables; within the process a lock per table
keeps a slow upkeep and the next one apart.

Safe beside a writer: an append is a blind append and never conflicts with a compaction in the
Delta protocol, but delta-rs can still refuse the compaction's commit when appends land during it
(delta-io/delta-rs#2700); a refused compaction wrote no commit, so it is simply run again on the
newer version, a few times with backoff. An append is never what gives way.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError

_TABLE_LOCKS: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
COMPACT_ATTEMPTS = 5
COMPACT_RETRY_SECONDS = 1.0


@dataclass(frozen=True)
class UpkeepReport:
    files_before: int
    files_after: int
    size_bytes: int
    version: int
    files_removed: int  # by compaction, from the current version
    files_added: int
    vacuumed: int  # files deleted from storage
    compact_attempts: int

    def summary(self) -> str:
        return (f"compacted {self.files_removed} file(s) into {self.files_added}, {self.files_before} -> "
                f"{self.files_after} file(s), {self.size_bytes} bytes; vacuumed {self.vacuumed} file(s); "
                f"version {self.version}")  # fmt: skip


def _files(table: DeltaTable) -> tuple[int, int]:
    actions = table.get_add_actions(flatten=True)
    sizes = actions.column("size_bytes").to_pylist() if actions.num_rows else []
    return len(sizes), int(sum(sizes))


def compact(table: DeltaTable, target_size: int, sleep: Any = time.sleep) -> tuple[dict[str, Any], int]:
    """Compact, run again on the newest version when a concurrent commit refused it; (metrics, attempts)."""
    for attempt in range(1, COMPACT_ATTEMPTS + 1):
        try:
            metrics = table.optimize.compact(target_size=target_size, max_concurrent_tasks=1)
            return metrics, attempt
        except CommitFailedError:
            if attempt == COMPACT_ATTEMPTS:
                raise
            sleep(COMPACT_RETRY_SECONDS * attempt)
            table.update_incremental()
    raise AssertionError("unreachable")


def run(uri: str, storage_options: dict[str, str], target_size: int, vacuum_retention_hours: int) -> UpkeepReport:
    """One upkeep pass on the table at `uri`, after any other pass on it has finished. Blocking
    (minutes on a big table): run it in a thread."""
    with _TABLE_LOCKS[uri.rstrip("/")]:
        return _run(uri, storage_options, target_size, vacuum_retention_hours)


def _run(uri: str, storage_options: dict[str, str], target_size: int, vacuum_retention_hours: int) -> UpkeepReport:
    table = DeltaTable(uri, storage_options=storage_options)
    files_before, _ = _files(table)
    metrics, attempts = compact(table, target_size)
    table.create_checkpoint()
    table.cleanup_metadata()  # log entries older than the log retention, now that a checkpoint covers them
    # The minimum is the spec's (at least an hour, CRD-enforced), not delta-rs's 7-day default check.
    # `full`: also files no version refers to, older than the retention: what a refused compaction (or a
    # writer that died before its commit) wrote. A writer's files still on their way to a commit are
    # seconds old, far younger than the retention.
    vacuumed = table.vacuum(retention_hours=vacuum_retention_hours, dry_run=False, enforce_retention_duration=False,
                            full=True)  # fmt: skip
    table.update_incremental()
    files_after, size = _files(table)
    return UpkeepReport(
        files_before=files_before, files_after=files_after, size_bytes=size, version=table.version(),
        files_removed=int(metrics.get("numFilesRemoved", 0)), files_added=int(metrics.get("numFilesAdded", 0)),
        vacuumed=len(vacuumed), compact_attempts=attempts,
    )  # fmt: skip
