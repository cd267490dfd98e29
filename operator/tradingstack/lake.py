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
