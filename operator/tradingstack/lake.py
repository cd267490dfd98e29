"""The Delta Lake tables the platform writes, declared once.

The operator creates them with these schemas (so the first writer never guesses types,
and a null never decides a column's type); the sinks write with the same schemas.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

TIMESTAMP = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True)
class LakeTable:
    path: str  # key prefix inside the lake bucket
    schema: pa.Schema
    partition_by: tuple[str, ...]

    def uri(self, bucket: str) -> str:
        return f"s3://{bucket}/{self.path}"


def storage_options(
    endpoint: str,
    region: str,
    allow_http: bool,
    access_key_id: str | None,
    secret_access_key: str | None,
    max_retries: int | None = None,
    retry_timeout_seconds: float | None = None,
) -> dict[str, str]:
    """deltalake's S3 options, built in one place for the operator and the sinks.

    deltalake accepts unknown keys silently, so the set of keys is fixed here, not assembled by callers.
    """
    options = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_REGION": region,
        "AWS_ALLOW_HTTP": "true" if allow_http else "false",
    }
    if access_key_id and secret_access_key:
        options |= {"AWS_ACCESS_KEY_ID": access_key_id, "AWS_SECRET_ACCESS_KEY": secret_access_key}
    # delta-rs retries reads inside one call for up to 3 minutes by default; a caller that retries
    # whole commits itself (and says so in readiness) may want it to give up sooner.
    if max_retries is not None:
        options["max_retries"] = str(max_retries)
    if retry_timeout_seconds is not None:
        options["retry_timeout"] = f"{retry_timeout_seconds}s"
    return options


MARKET_TICKS = LakeTable(
    path="lake/market_ticks",
    schema=pa.schema(
        [
            pa.field("tick_id", pa.string(), nullable=False),
            pa.field("event_ts", TIMESTAMP, nullable=False),
            pa.field("ingest_ts", TIMESTAMP, nullable=False),
            pa.field("symbol", pa.string(), nullable=False),
            pa.field("exchange", pa.string()),
            pa.field("venue", pa.string()),
            pa.field("price", pa.float64(), nullable=False),
            pa.field("size", pa.float64()),
            pa.field("volume", pa.float64()),
            pa.field("bid", pa.float64()),
            pa.field("ask", pa.float64()),
            pa.field("stream_seq", pa.int64(), nullable=False),
            # Added after the first release, so nullable: the operator adds them to an older table.
            pa.field("side", pa.string()),
            pa.field("trade_id", pa.string()),
            pa.field("source_seq", pa.int64()),
            pa.field("receive_ts", TIMESTAMP),  # when a live gateway received it (issue 14)
            pa.field("dt", pa.string(), nullable=False),
        ]
    ),
    partition_by=("symbol", "dt"),
)

ALT_DATA = LakeTable(
    path="lake/alt_data",
    schema=pa.schema(
        [
            pa.field("record_id", pa.string(), nullable=False),
            pa.field("event_ts", TIMESTAMP, nullable=False),
            pa.field("ingest_ts", TIMESTAMP, nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("symbol", pa.string(), nullable=False),
            pa.field("kind", pa.string()),
            pa.field("value", pa.float64()),
            pa.field("payload", pa.string()),
            pa.field("stream_seq", pa.int64(), nullable=False),
            pa.field("dt", pa.string(), nullable=False),
        ]
    ),
    partition_by=("symbol", "dt"),
)

LAKE_TABLES = (MARKET_TICKS, ALT_DATA)

# The audit-log service's table (made while it is enabled): every order event, fill, position
# change, compliance alert and operator action, appended once each, never updated.
AUDIT = LakeTable(
    path="lake/audit",
    schema=pa.schema(
        [
            pa.field("event_id", pa.string(), nullable=False),  # STREAM:sequence, unique per record
            pa.field("kind", pa.string(), nullable=False),  # order, fill, position, compliance_alert, operator_action
            pa.field("subject", pa.string(), nullable=False),
            pa.field("event_ts", TIMESTAMP, nullable=False),
            pa.field("ingest_ts", TIMESTAMP, nullable=False),
            pa.field("account", pa.string()),
            pa.field("symbol", pa.string()),
            pa.field("order_id", pa.string()),
            pa.field("status", pa.string()),
            pa.field("payload", pa.string(), nullable=False),  # the message as it was published
            pa.field("stream", pa.string(), nullable=False),
            pa.field("stream_seq", pa.int64(), nullable=False),
            pa.field("dt", pa.string(), nullable=False),
        ]
    ),
    partition_by=("dt",),
)
# ptrc's end-of-day (and on-demand) reports: one row per account and symbol traded that day.
REPORTS = LakeTable(
    path="lake/reports",
    schema=pa.schema(
        [
            pa.field("account", pa.string()),
            pa.field("symbol", pa.string(), nullable=False),
            pa.field("opening_quantity", pa.float64(), nullable=False),
            pa.field("opening_avg_price", pa.float64(), nullable=False),
            pa.field("trades", pa.int64(), nullable=False),
            pa.field("bought", pa.float64(), nullable=False),
            pa.field("sold", pa.float64(), nullable=False),
            pa.field("buy_notional", pa.float64(), nullable=False),
            pa.field("sell_notional", pa.float64(), nullable=False),
            pa.field("fees", pa.float64(), nullable=False),
            pa.field("realized_pnl", pa.float64(), nullable=False),
            pa.field("unrealized_pnl", pa.float64(), nullable=False),
            pa.field("mark_price", pa.float64()),
            pa.field("closing_quantity", pa.float64(), nullable=False),
            pa.field("closing_avg_price", pa.float64(), nullable=False),
            pa.field("pnl_quantity", pa.float64()),  # pnl's position when the report was made (today only)
            pa.field("reconciled", pa.bool_()),  # None: not checked (a past day)
            pa.field("generated_at", TIMESTAMP, nullable=False),
            pa.field("date", pa.string(), nullable=False),
        ]
    ),
    partition_by=("date",),
)
# Every Delta table the operator may make, by path.
ALL_TABLES = (*LAKE_TABLES, AUDIT, REPORTS)


def tables_at(paths: list[str]) -> list[LakeTable]:
    """The tables a plan names (`Plan.lake_tables`, paths: the plan itself never loads pyarrow)."""
    return [table for table in ALL_TABLES if table.path in paths]
