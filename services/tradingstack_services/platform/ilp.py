"""QuestDB's InfluxDB line protocol (ILP): one builder for every table a service writes."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime

Field = float | int | str | bool | None


def tag(value: str) -> str:
    # Tag values escape comma, equals and space (and the escape itself).
    return value.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


def _field(value: float | int | str | bool) -> str:
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, int):
        return f"{value}i"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"not a finite number: {value}")
        return repr(value)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def line(table: str, tags: Mapping[str, str | None], fields: Mapping[str, Field], ts: datetime) -> str:
    """`table,tag=v field=v nanos`; None tags and fields are left out (QuestDB stores NULL)."""
    tag_text = "".join(f",{k}={tag(v)}" for k, v in tags.items() if v)
    field_text = ",".join(f"{k}={_field(v)}" for k, v in fields.items() if v is not None)
    if not field_text:
        raise ValueError(f"an ILP line for {table} needs at least one field")
    nanos = int(ts.timestamp() * 1_000_000) * 1_000  # microsecond resolution, as QuestDB stores it
    return f"{table}{tag_text} {field_text} {nanos}"
