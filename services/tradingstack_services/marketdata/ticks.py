"""The tick: one schema for the gateway, the normaliser and the lake sink.

Timestamps arrive as epoch milliseconds or ISO 8601; optional fields arrive missing, null or
as empty strings and all become None (never ""), so a null can never decide a column's type.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SYMBOL_PATTERN = r"^[A-Z0-9][A-Z0-9_-]{0,31}$"


class InvalidMessageError(ValueError):
    """A message that cannot be used; `reason` is a short code for the dead-letter subject."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# Market data from before 2000 or after 2100 is a unit mistake (seconds for milliseconds) or garbage.
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
LATEST = datetime(2100, 1, 1, tzinfo=UTC)


def _parse_datetime(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, bool):
        raise ValueError("a timestamp cannot be a boolean")
    if isinstance(value, int | float):
        return datetime.fromtimestamp(float(value) / 1000.0, UTC)  # epoch milliseconds
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return datetime.fromtimestamp(int(text) / 1000.0, UTC)
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    raise ValueError(f"not a timestamp: {value!r}")


def to_datetime(value: Any) -> datetime:
    """A UTC datetime within [2000, 2100), or ValueError: never OverflowError or OSError (huge numbers)."""
    try:
        parsed = _parse_datetime(value)
    except (OverflowError, OSError) as exc:
        raise ValueError(f"timestamp out of range: {str(value)[:40]}") from exc
    if not EARLIEST <= parsed < LATEST:
        raise ValueError(f"timestamp {parsed.isoformat()} outside {EARLIEST.year}-{LATEST.year}")
    return parsed


class Tick(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    tick_id: str = Field(min_length=1, max_length=128)
    symbol: str = Field(pattern=SYMBOL_PATTERN)
    event_ts: datetime
    price: float = Field(gt=0)
    exchange: str | None = None
    venue: str | None = None
    size: float | None = Field(None, ge=0)
    volume: float | None = Field(None, ge=0)
    bid: float | None = Field(None, gt=0)
    ask: float | None = Field(None, gt=0)
    # What a venue's trade feed adds (the seeds' columns): the aggressor's side, the venue's trade id,
    # and the venue's own sequence number, by which a gap in its feed shows.
    side: Literal["buy", "sell"] | None = None
    trade_id: str | None = Field(None, max_length=128)
    source_seq: int | None = Field(None, ge=0, le=2**63 - 1)
    # When a live gateway received it from the venue (event_ts is the venue's own time).
    receive_ts: datetime | None = None

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError("a tick is a JSON object")
        data = {k: (None if v == "" else v) for k, v in data.items()}
        if "event_ts" not in data and "timestamp" in data:
            data["event_ts"] = data.pop("timestamp")
        if isinstance(data.get("symbol"), str):
            data["symbol"] = data["symbol"].strip().upper()
        if isinstance(data.get("side"), str):
            data["side"] = data["side"].strip().lower()
        if isinstance(data.get("trade_id"), int) and not isinstance(data["trade_id"], bool):
            data["trade_id"] = str(data["trade_id"])  # venues number their trades
        if not data.get("tick_id") and data.get("symbol") and data.get("event_ts") is not None:
            # A replayed file may lack ids: derive one, so a replay deduplicates against itself.
            key = json.dumps([data.get(k) for k in ("symbol", "event_ts", "venue", "price", "size")], default=str)
            data["tick_id"] = hashlib.sha1(key.encode()).hexdigest()[:20]
        return data

    @field_validator("event_ts", mode="before")
    @classmethod
    def _timestamp(cls, value: Any) -> datetime:
        return to_datetime(value)

    @field_validator("receive_ts", mode="before")
    @classmethod
    def _received(cls, value: Any) -> datetime | None:
        return None if value is None else to_datetime(value)

    @field_validator("price", "size", "volume", "bid", "ask")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


def parse_tick(payload: bytes) -> Tick:
    """A Tick from a message body, or InvalidMessageError with a reason code."""
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidMessageError("not_json", str(exc)) from None
    try:
        return Tick.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "tick"
        raise InvalidMessageError("invalid_tick", f"{field}: {first['msg']}") from None


def require_known_symbol(symbol: str, known: frozenset[str]) -> None:
    """Ticks are stored per symbol (a Delta partition, a QuestDB bar per minute): a symbol the stack
    does not list would add a file to every sink commit and a bar rebuild to every normalizer batch,
    and a flood of made-up ones starved both. Such a tick is refused with a reason."""
    if symbol not in known:
        raise InvalidMessageError("unknown_symbol", f"{symbol} is not one of the stack's symbols (spec.symbols)")


def epoch_ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


def tick_json(tick: Tick) -> bytes:
    """The wire form: every field set, and `timestamp` in epoch milliseconds beside `event_ts` (what the
    seeds' producers and consumers used; a reader takes `event_ts` first, so the two never disagree)."""
    body = tick.model_dump(mode="json", exclude_none=True)
    body["timestamp"] = epoch_ms(tick.event_ts)
    return json.dumps(body, separators=(",", ":")).encode()
