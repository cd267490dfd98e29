"""audit-log: every order event, fill, position change, compliance alert and operator action,
appended to the Delta table `lake/audit` (partitioned by event date), exactly once.

One lake sink per stream read (ORDERS, FILLS, POSITIONS, COMPLIANCE when the scanner runs, AUDIT
for the operator's actions), each on its own durable consumer, each recording the stream
sequences of its commits under a key of its own: a redelivery after a crash finds its sequence
committed and is skipped (see `marketdata.sink`). The record keeps the message as published
(`payload`) with what a reader filters on pulled out (kind, account, symbol, order id, status,
event time). A message that is not UTF-8 cannot be kept as text and is dead-lettered with its
reason; anything else is recorded, even what other services refuse: the log says what was said.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI
from nats.aio.msg import Msg

from tradingstack.lake import AUDIT
from tradingstack_services.marketdata.sink import SEQ_KEY, LakeSink, serve
from tradingstack_services.marketdata.ticks import InvalidMessageError, to_datetime
from tradingstack_services.platform.settings import ServiceSettings

KINDS = {"ORDERS": "order", "FILLS": "fill", "POSITIONS": "position", "COMPLIANCE": "compliance_alert",
         "AUDIT": "operator_action"}  # fmt: skip
# Where each kind keeps the time the event happened (else the stream's own timestamp).
TIME_FIELDS = ("updated_at", "ts")


def _text(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) and value else None


def _event_time(data: dict[str, Any], msg: Msg) -> datetime:
    for key in TIME_FIELDS:
        try:
            return to_datetime(data[key])
        except (KeyError, ValueError, TypeError, InvalidMessageError):
            continue
    fill = data.get("fill")
    if isinstance(fill, dict):  # a position carries the fill that moved it
        return _event_time(fill, msg)
    stamped = msg.metadata.timestamp
    return stamped if stamped.tzinfo else stamped.replace(tzinfo=UTC)


def audit_row(msg: Msg, seq: int) -> dict[str, Any]:
    stream = msg.metadata.stream
    try:
        text = msg.data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidMessageError("not_utf8", f"an audit record is kept as text: {exc}") from None
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    data = parsed if isinstance(parsed, dict) else {}
    event_ts = _event_time(data, msg)
    fill: dict[str, Any] = data["fill"] if isinstance(data.get("fill"), dict) else {}
    return {
        "event_id": f"{stream}:{seq}",
        "kind": KINDS.get(stream, stream.lower()),
        "subject": msg.subject,
        "event_ts": event_ts,
        "ingest_ts": datetime.now(UTC),
        "account": _text(data, "account"),
        "symbol": _text(data, "symbol"),
        "order_id": _text(data, "order_id") or _text(fill, "order_id"),
        "status": _text(data, "status") or _text(data, "reason"),
        "payload": text,
        "stream": stream,
        "stream_seq": seq,
        "dt": event_ts.strftime("%Y-%m-%d"),
    }


def sinks(settings: ServiceSettings) -> list[LakeSink]:
    reads = [(settings.NATS_STREAM or "ORDERS", settings.NATS_DURABLE or ""), *((stream, durable)
             for stream, durable, _ in settings.audit_sources())]  # fmt: skip
    return [LakeSink(settings, AUDIT, audit_row, stream=stream, durable=durable, seq_key=f"{SEQ_KEY}.{stream}")
            for stream, durable in reads]  # fmt: skip


def create(settings: ServiceSettings) -> FastAPI:
    return serve(settings, sinks(settings))
