"""Delta table upkeep on moto's S3 server under real deltalake: a table of many small commits is
compacted to a few files holding the same rows (checked by value) while a writer keeps appending;
vacuum deletes only the replaced files older than the retention."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError

from tradingstack import upkeep
from tradingstack.api import LAKE_TABLE_NAMES
from tradingstack.backends import S3Credentials
from tradingstack.backends.s3 import S3Provisioner
from tradingstack.lake import ALL_TABLES, ALT_DATA, MARKET_TICKS, storage_options
from tradingstack.plan import StackRef, build_plan, parse_spec

COMMITS, ROWS_PER_COMMIT, CONCURRENT_COMMITS = 40, 5, 10
DAY = datetime(2026, 1, 2, tzinfo=UTC)


@pytest.fixture
def table(s3_url: str) -> tuple[str, dict[str, str]]:
    bucket = f"upkeep-{uuid.uuid4().hex[:8]}"
    spec = parse_spec({"infrastructure": {"s3": {"endpoint": s3_url, "allowHttp": True, "bucket": bucket}}})
    S3Provisioner(spec.infrastructure.s3, S3Credentials("testing", "testing-secret")).reconcile(
        build_plan(StackRef("upkeep", "ns"), spec)
    )
    return MARKET_TICKS.uri(bucket), storage_options(s3_url, "us-east-1", True, "testing", "testing-secret")


def ticks(commit: int, writer: str) -> pa.Table:
    rows: list[dict[str, Any]] = []
    for i in range(ROWS_PER_COMMIT):
        ts = DAY + timedelta(seconds=commit, milliseconds=i)
        rows.append({"tick_id": f"{writer}-{commit}-{i}", "event_ts": ts, "ingest_ts": ts, "symbol": "BTCUSDT" if i % 2
                     else "ETHUSDT", "price": 100.0 + commit + i / 10, "size": float(i), "stream_seq": commit * 10 + i,
                     "dt": ts.strftime("%Y-%m-%d"), "side": "buy" if i % 2 else None})  # fmt: skip
    return pa.Table.from_pylist(rows, schema=MARKET_TICKS.schema)


def append(uri: str, options: dict[str, str], commits: range, writer: str) -> None:
    for commit in commits:
        write_deltalake(uri, ticks(commit, writer), mode="append", storage_options=options)


def rows(uri: str, options: dict[str, str]) -> list[tuple[Any, ...]]:
    data = DeltaTable(uri, storage_options=options).to_pyarrow_table().to_pylist()
    return sorted((r["tick_id"], r["price"], r["symbol"], r["size"], r["side"], r["stream_seq"]) for r in data)


def parquet_objects(uri: str, options: dict[str, str]) -> int:
    return len(parquet_paths(uri, options))


def parquet_paths(uri: str, options: dict[str, str]) -> list[str]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    fs = pafs.S3FileSystem(endpoint_override=options["AWS_ENDPOINT_URL"], scheme="http", region="us-east-1",
                           access_key=options["AWS_ACCESS_KEY_ID"],
                           secret_key=options["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
    found = fs.get_file_info(pafs.FileSelector(f"{bucket}/{prefix}", recursive=True))
    return sorted(f.path for f in found if f.path.endswith(".parquet") and "/_delta_log/" not in f.path)  # data only


def test_compaction_keeps_every_row_while_a_writer_appends_and_vacuum_waits_for_the_retention(
    table: tuple[str, dict[str, str]],
) -> None:
    uri, options = table
    append(uri, options, range(COMMITS), "sink")
    before = rows(uri, options)
    assert len(before) == COMMITS * ROWS_PER_COMMIT
    files_before = len(DeltaTable(uri, storage_options=options).file_uris())
    assert files_before >= COMMITS  # one file per partition per commit

    # A writer keeps appending the whole time compaction runs.
    writer = threading.Thread(target=append, args=(uri, options, range(COMMITS, COMMITS + CONCURRENT_COMMITS), "late"))
    writer.start()
    report = upkeep.run(uri, options, target_size=128 * 1024 * 1024, vacuum_retention_hours=1)
    writer.join()

    after = rows(uri, options)
    assert len(after) == (COMMITS + CONCURRENT_COMMITS) * ROWS_PER_COMMIT  # every append kept
    assert set(before) <= set(after)  # the same rows, value for value
    assert len(set(after)) == len(after)  # none twice
    assert report.files_removed >= COMMITS
    assert report.files_added <= 2 * report.compact_attempts  # a file per partition (BTC, ETH) per compaction
    live_files = len(DeltaTable(uri, storage_options=options).file_uris())
    assert live_files <= 2 + 2 * CONCURRENT_COMMITS  # the compacted files and what came during compaction
    # Just replaced: younger than the hour's retention, so still on S3 for readers of older versions.
    assert report.vacuumed == 0
    assert parquet_objects(uri, options) >= files_before

    # Past the retention (0 hours here, below what the CRD allows): only the replaced files go.
    second = upkeep.run(uri, options, target_size=128 * 1024 * 1024, vacuum_retention_hours=0)
    assert second.vacuumed >= files_before
    assert rows(uri, options) == after
    live = {u.removeprefix("s3://") for u in DeltaTable(uri, storage_options=options).file_uris()}
    assert [p for p in parquet_paths(uri, options) if p not in live] == [], second
    assert len(live) == second.files_after
    assert second.files_after <= 2


def test_two_upkeeps_of_one_table_at_once_never_write_its_rows_twice(table: tuple[str, dict[str, str]]) -> None:
    """delta-rs lets two compactions of one version both commit: every row twice (shown first, on a
    table of the test's own). upkeep.run takes its table's lock, so the second waits for the first."""
    uri, options = table
    append(uri, options, range(6), "sink")
    stale = DeltaTable(uri, storage_options=options)
    DeltaTable(uri, storage_options=options).optimize.compact()
    stale.optimize.compact()  # the hazard, bare: a second compaction of the same version also commits
    assert len(rows(uri, options)) == 2 * 6 * ROWS_PER_COMMIT

    other_uri = uri.replace("market_ticks", "market_ticks_copy")
    append(other_uri, options, range(6), "sink")
    runs = [threading.Thread(target=upkeep.run, args=(other_uri, options, 128 * 1024 * 1024, 1)) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    found = rows(other_uri, options)
    assert len(found) == len(set(found)) == 6 * ROWS_PER_COMMIT


class RefusingOptimizer:
    """delta-rs's optimizer refusing the first commit, as it does when appends land during a
    compaction (delta-io/delta-rs#2700), which is hard to time on purpose."""

    def __init__(self, table: DeltaTable, refusals: int) -> None:
        self.table, self.refusals = table, refusals

    def compact(self, **options: Any) -> dict[str, Any]:
        if self.refusals:
            self.refusals -= 1
            raise CommitFailedError("Failed to commit transaction: 15")
        return dict(self.table.optimize.compact(**options))


class TableWithRefusals:
    def __init__(self, table: DeltaTable, refusals: int) -> None:
        self.optimize, self.table, self.updates = RefusingOptimizer(table, refusals), table, 0

    def update_incremental(self) -> None:
        self.updates += 1
        self.table.update_incremental()


def test_a_refused_compaction_runs_again_on_the_newest_version_then_gives_up(table: tuple[str, dict[str, str]]) -> None:
    uri, options = table
    append(uri, options, range(6), "sink")
    refused = TableWithRefusals(DeltaTable(uri, storage_options=options), refusals=2)
    naps: list[float] = []
    metrics, attempts = upkeep.compact(refused, 128 * 1024 * 1024, sleep=naps.append)  # type: ignore[arg-type]
    assert (attempts, refused.updates) == (3, 2)
    assert naps == [upkeep.COMPACT_RETRY_SECONDS, 2 * upkeep.COMPACT_RETRY_SECONDS]
    assert metrics["numFilesRemoved"] == 2 * 6
    assert len(rows(uri, options)) == 6 * ROWS_PER_COMMIT
    stubborn = TableWithRefusals(DeltaTable(uri, storage_options=options), refusals=upkeep.COMPACT_ATTEMPTS)
    with pytest.raises(CommitFailedError):
        upkeep.compact(stubborn, 128 * 1024 * 1024, sleep=naps.append)  # type: ignore[arg-type]


def test_each_lake_table_has_its_policy_by_name() -> None:
    assert tuple(t.path.removeprefix("lake/") for t in ALL_TABLES) == LAKE_TABLE_NAMES
    lake = parse_spec({"lake": {"upkeep": {"intervalSeconds": 600}, "tables": {"alt_data": {"enabled": False}}}}).lake
    assert lake is not None
    assert lake.upkeep_for(MARKET_TICKS.path).interval_seconds == 600
    assert lake.upkeep_for(ALT_DATA.path).enabled is False
    assert lake.upkeep_for(ALT_DATA.path).interval_seconds == 3600  # the table's own policy, defaults and all
