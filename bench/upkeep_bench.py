"""Reading one day of one symbol from a sink-shaped Delta table (one small commit a second) before
and after the operator's upkeep, against the same rows written once as a single file (the floor)."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
from deltalake import DeltaTable, write_deltalake

from bench.report import Measure
from bench.servers import s3_server
from tradingstack import upkeep
from tradingstack.backends import S3Credentials
from tradingstack.backends.s3 import S3Provisioner
from tradingstack.lake import MARKET_TICKS, storage_options
from tradingstack.plan import StackRef, build_plan, parse_spec

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
DAY = datetime(2026, 1, 2, tzinfo=UTC)
DAY_FILTER: list[tuple[str, str, Any]] = [("symbol", "=", "BTCUSDT"), ("dt", "=", "2026-01-02")]


def _commit(second: int, ticks_per_symbol: int) -> pa.Table:
    rows = []
    for symbol in SYMBOLS:
        for i in range(ticks_per_symbol):
            ts = DAY + timedelta(seconds=second, microseconds=i)
            rows.append({"tick_id": f"{symbol}-{second}-{i}", "event_ts": ts, "ingest_ts": ts, "symbol": symbol,
                         "price": 100.0 + i, "size": 1.0, "stream_seq": second * 1000 + i,
                         "dt": "2026-01-02"})  # fmt: skip
    return pa.Table.from_pylist(rows, schema=MARKET_TICKS.schema)


def _read(uri: str, options: dict[str, str]) -> tuple[float, int, int]:
    """(seconds, files opened, rows) to read one symbol's day, from opening the table on."""
    started = time.perf_counter()
    table = DeltaTable(uri, storage_options=options)
    files = len(table.file_uris(partition_filters=DAY_FILTER))
    rows = table.to_pyarrow_table(partitions=DAY_FILTER).num_rows
    return time.perf_counter() - started, files, rows


def run(quick: bool, duration: float | None = None) -> list[Measure]:
    commits = 200 if quick else 1_000  # a sink's commits over that many seconds
    with s3_server() as s3:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        spec = parse_spec({"infrastructure": {"s3": {"endpoint": s3, "allowHttp": True, "bucket": bucket}}})
        S3Provisioner(spec.infrastructure.s3, S3Credentials("bench", "bench-secret")).reconcile(
            build_plan(StackRef("bench", "bench"), spec)
        )
        options = storage_options(s3, "us-east-1", True, "bench", "bench-secret")
        uri = MARKET_TICKS.uri(bucket)
        batches = [_commit(second, 20) for second in range(commits)]
        for batch in batches:
            write_deltalake(uri, batch, mode="append", storage_options=options)
        floor_uri = f"s3://{bucket}/bench/single-file"
        write_deltalake(floor_uri, pa.concat_tables(batches), partition_by=list(MARKET_TICKS.partition_by),
                        storage_options=options)  # fmt: skip
        floor, _, floor_rows = _read(floor_uri, options)
        before, files_before, rows_before = _read(uri, options)
        started = time.perf_counter()
        report = upkeep.run(uri, options, target_size=128 * 1024 * 1024, vacuum_retention_hours=168)
        upkeep_seconds = time.perf_counter() - started
        after, files_after, rows_after = _read(uri, options)
    assert rows_before == rows_after == floor_rows, (rows_before, rows_after, floor_rows)
    note = f"{commits} commits, {rows_after} rows of BTCUSDT"
    return [
        Measure("1 symbol-day read, small files", before, "s", floor, lower_is_better=True,
                note=f"{files_before} files opened; {note}"),
        Measure("1 symbol-day read, compacted", after, "s", floor, lower_is_better=True,
                note=f"{files_after} file(s) opened; floor: the same rows written as one file"),
        Measure("upkeep of the table", upkeep_seconds, "s", None, lower_is_better=True,
                note=f"{report.files_before} -> {report.files_after} files"),
    ]  # fmt: skip
