"""A strict test double of QuestDB's REST API (`/exec`), since QuestDB cannot run here.

It parses the statements tradingstack sends and refuses what QuestDB refuses, with
QuestDB-shaped errors (HTTP 400, `{"query", "error", "position"}`): unknown column types,
a designated timestamp that is missing or not a TIMESTAMP, partitioning without one, WAL on
an unpartitioned table, dedup on a non-WAL table or without the designated timestamp, an
unknown table, a duplicate column. Anything it does not understand is refused too, so a
query the real server would need to be checked against cannot pass by accident.
"""

from __future__ import annotations

import json
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

TYPES = {
    "BOOLEAN", "BYTE", "SHORT", "CHAR", "INT", "LONG", "FLOAT", "DOUBLE", "STRING", "VARCHAR",
    "SYMBOL", "DATE", "TIMESTAMP", "UUID", "LONG256", "IPV4", "BINARY",
}  # fmt: skip
PARTITIONS = {"NONE", "HOUR", "DAY", "WEEK", "MONTH", "YEAR"}
IDENT = r"[A-Za-z_][A-Za-z0-9_]*"

CREATE = re.compile(
    rf"^CREATE TABLE (?P<ine>IF NOT EXISTS )?(?P<name>{IDENT}) \((?P<cols>[^)]*)\)"
    rf"(?: TIMESTAMP\((?P<ts>{IDENT})\))?(?: PARTITION BY (?P<part>\w+))?(?P<wal> WAL| BYPASS WAL)?"
    rf"(?: DEDUP UPSERT KEYS\((?P<dedup>[^)]*)\))?$",
    re.IGNORECASE,
)
ALTER_ADD = re.compile(rf"^ALTER TABLE (?P<name>{IDENT}) ADD COLUMN (?P<col>{IDENT}) (?P<type>\w+)$", re.IGNORECASE)
DROP = re.compile(rf"^DROP TABLE (?P<ie>IF EXISTS )?(?P<name>{IDENT})$", re.IGNORECASE)
SELECT_TABLES = re.compile(r"^SELECT (?P<cols>.+) FROM tables\(\)$", re.IGNORECASE)
SELECT_WAL = re.compile(r"^SELECT (?P<cols>.+) FROM wal_tables\(\)$", re.IGNORECASE)
# INSERT of string literals ('' escapes a quote), the one form tradingstack sends over /exec.
INSERT = re.compile(
    rf"^INSERT INTO (?P<name>{IDENT}) VALUES ?\((?P<values>(?:'(?:[^']|'')*'(?:, ?)?)+)\)$", re.IGNORECASE
)
LITERAL = re.compile(r"'((?:[^']|'')*)'")
SELECT_ALL = re.compile(rf"^SELECT (?P<cols>[A-Za-z_, ]+) FROM (?P<name>{IDENT})$", re.IGNORECASE)
SELECT_PARTITIONS = re.compile(rf"^SELECT (?P<cols>.+) FROM table_partitions\('(?P<name>{IDENT})'\)$", re.IGNORECASE)
DROP_PARTITION = re.compile(
    rf"^ALTER TABLE (?P<name>{IDENT}) DROP PARTITION WHERE (?P<col>{IDENT}) < '(?P<ts>[^']+)'$", re.IGNORECASE
)
SELECT_COLUMNS = re.compile(rf"^SELECT (?P<cols>.+) FROM table_columns\('(?P<name>{IDENT})'\)$", re.IGNORECASE)
# The one aggregate the normaliser runs: a bar rebuilt from the ticks of one symbol and minute.
SELECT_BAR = re.compile(
    rf"^SELECT first\((?P<p>{IDENT})\), max\((?P=p)\), min\((?P=p)\), last\((?P=p)\), sum\((?P<s>{IDENT})\), count\(\) "
    rf"FROM (?P<name>{IDENT}) WHERE symbol = '(?P<symbol>[A-Z0-9_-]+)' AND ts >= '(?P<start>[^']+)' "
    rf"AND ts < '(?P<end>[^']+)'$",
    re.IGNORECASE,
)


class RejectedError(Exception):
    pass


@dataclass
class Table:
    columns: dict[str, str]
    designated: str | None
    partition_by: str
    wal: bool
    dedup: list[str] = field(default_factory=list)
    # Rows by dedup key (a table without dedup keys numbers them): an upsert is a dict write.
    stored: dict[tuple[Any, ...], dict[str, Any]] = field(default_factory=dict)
    # WAL tables: committed transactions wait here, (visible at, apply), until the apply job runs.
    pending: list[tuple[float, Callable[[], None]]] = field(default_factory=list)
    sequencer_txn: int = 0  # transactions committed to the WAL
    writer_txn: int = 0  # transactions applied to the table (visible to SELECT)

    @property
    def rows(self) -> list[dict[str, Any]]:
        return list(self.stored.values())

    def upsert(self, row: dict[str, Any]) -> None:
        """Insert, or replace the row with the same dedup key values (DEDUP UPSERT KEYS)."""
        key = tuple(row.get(k) for k in self.dedup) if self.dedup else (len(self.stored),)
        self.stored.pop(key, None)  # a replaced row moves to the end, as a new write would
        self.stored[key] = row

    def commit(self, rows: list[dict[str, Any]]) -> Callable[[], None]:
        """What the apply job does with one transaction of rows."""

        def apply() -> None:
            for row in rows:
                self.upsert(row)

        return apply

    def partitions(self) -> dict[str, list[dict[str, Any]]]:
        """Visible rows by partition name, oldest partition first."""
        found: dict[tuple[datetime, str], list[dict[str, Any]]] = {}
        for row in self.rows:
            found.setdefault(partition_of(self.partition_by, row[self.designated or ""]), []).append(row)
        return {name: rows for (_, name), rows in sorted(found.items())}


@dataclass
class QuestDBState:
    tables: dict[str, Table] = field(default_factory=dict)
    mutations: list[str] = field(default_factory=list)  # DDL that changed something
    statements: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    unavailable: bool = False  # every request answers 503 while set
    # QuestDB open source can require HTTP basic auth on /exec and /write (server.conf `http.user`,
    # `http.password`; questdb/documentation#255, operations/basic-auth); Enterprise takes a bearer
    # token too. A request without the expected Authorization header gets 401.
    authorization: str | None = None
    # QuestDB acknowledges an ILP write to a WAL table once it is in the WAL; the rows become visible
    # to SELECT only when the apply job has run, "usually milliseconds, longer under load"
    # (questdb.com/docs/concept/write-ahead-log; wal_tables() shows writerTxn behind sequencerTxn
    # meanwhile, questdb.com/docs/reference/function/meta/#wal_tables). 0 applies at once.
    apply_delay: float = 0.0

    def apply_due(self) -> None:
        """The WAL apply job: make visible every transaction whose time has come, in order."""
        now = time.monotonic()
        for table in self.tables.values():
            while table.pending and table.pending[0][0] <= now:
                _, apply = table.pending.pop(0)
                apply()
                table.writer_txn += 1

    def execute(self, sql: str) -> dict[str, Any]:
        sql = " ".join(sql.strip().rstrip(";").split())
        with self.lock:
            self.apply_due()
            self.statements.append(sql)
            for pattern, handler in (
                (CREATE, self._create), (ALTER_ADD, self._alter), (DROP, self._drop),
                (SELECT_TABLES, self._tables), (SELECT_COLUMNS, self._columns), (SELECT_BAR, self._bar),
                (SELECT_WAL, self._wal_tables), (SELECT_PARTITIONS, self._partitions),
                (DROP_PARTITION, self._drop_partition), (INSERT, self._insert), (SELECT_ALL, self._select_all),
            ):  # fmt: skip
                match = pattern.match(sql)
                if match:
                    return handler(match)
        raise RejectedError("unsupported statement (the test double only knows what tradingstack sends)")

    def _create(self, m: re.Match[str]) -> dict[str, Any]:
        name = m["name"].lower()
        if name in self.tables:
            if m["ine"]:
                return {"ddl": "OK"}
            raise RejectedError(f"table already exists [table={name}]")
        columns: dict[str, str] = {}
        for part in m["cols"].split(","):
            words = part.split()
            if len(words) != 2:
                raise RejectedError(f"invalid column definition: {part.strip()!r}")
            col, type_ = words[0].lower(), words[1].upper()
            if type_ not in TYPES:
                raise RejectedError(f"invalid type: {words[1]}")
            if col in columns:
                raise RejectedError(f"Duplicate column [name={col}]")
            columns[col] = type_
        ts = m["ts"].lower() if m["ts"] else None
        if ts is not None:
            if ts not in columns:
                raise RejectedError(f"Invalid column: {ts}")
            if columns[ts] != "TIMESTAMP":
                raise RejectedError(f"TIMESTAMP column expected [actual={columns[ts]}]")
        part = (m["part"] or "NONE").upper()
        if part not in PARTITIONS:
            raise RejectedError(f"'NONE', 'HOUR', 'DAY', 'WEEK', 'MONTH' or 'YEAR' expected, found {m['part']}")
        if part != "NONE" and ts is None:
            raise RejectedError("partitioning is possible only on tables with designated timestamps")
        wal = (m["wal"] or "").strip().upper() == "WAL" or (m["wal"] is None and part != "NONE")
        if (m["wal"] or "").strip().upper() == "WAL" and part == "NONE":
            raise RejectedError("WAL Write Mode can only be used on partitioned tables")
        dedup = [k.strip().lower() for k in m["dedup"].split(",")] if m["dedup"] else []
        if dedup:
            if not wal:
                raise RejectedError("deduplication is possible only on WAL tables")
            for key in dedup:
                if key not in columns:
                    raise RejectedError(f"deduplicate key column not found [column={key}]")
            if ts not in dedup:
                raise RejectedError("deduplicate key list must include dedicated timestamp column")
            for key in dedup:
                # Variable-size STRING and BINARY cannot be upsert keys (VARCHAR and SYMBOL can):
                # "deduplicate key column can only be fixed size column [column=device_id, type=STRING]",
                # github.com/questdb/questdb-connect/issues/14; questdb.com/docs/concept/deduplication/
                if columns[key] in ("STRING", "BINARY"):
                    raise RejectedError(f"deduplicate key column can only be fixed size column "
                                        f"[column={key}, type={columns[key]}]")  # fmt: skip
        self.tables[name] = Table(columns, ts, part, wal, dedup)
        self.mutations.append(f"create {name}")
        return {"ddl": "OK"}

    def _alter(self, m: re.Match[str]) -> dict[str, Any]:
        table = self._table(m["name"])
        col, type_ = m["col"].lower(), m["type"].upper()
        if type_ not in TYPES:
            raise RejectedError(f"invalid type: {m['type']}")
        if col in table.columns:
            raise RejectedError(f"column '{col}' already exists")
        table.columns[col] = type_
        self.mutations.append(f"alter {m['name'].lower()} add {col}")
        return {"ddl": "OK"}

    def _drop(self, m: re.Match[str]) -> dict[str, Any]:
        name = m["name"].lower()
        if name not in self.tables:
            if m["ie"]:
                return {"ddl": "OK"}
            raise RejectedError(f"table does not exist [table={name}]")
        del self.tables[name]
        self.mutations.append(f"drop {name}")
        return {"ddl": "OK"}

    def _tables(self, m: re.Match[str]) -> dict[str, Any]:
        rows = {
            name: {
                "table_name": name, "designatedTimestamp": t.designated, "partitionBy": t.partition_by,
                "walEnabled": t.wal, "dedup": bool(t.dedup),
            }
            for name, t in sorted(self.tables.items())
        }  # fmt: skip
        return _select(m["cols"], list(rows.values()), {"table_name", "designatedTimestamp", "partitionBy",
                                                         "walEnabled", "dedup"})  # fmt: skip

    def _wal_tables(self, m: re.Match[str]) -> dict[str, Any]:
        rows = [{"name": name, "suspended": False, "writerTxn": t.writer_txn, "sequencerTxn": t.sequencer_txn}
                for name, t in sorted(self.tables.items()) if t.wal]  # fmt: skip
        return _select(m["cols"], rows, {"name", "suspended", "writerTxn", "sequencerTxn"})

    def _insert(self, m: re.Match[str]) -> dict[str, Any]:
        """`INSERT INTO t VALUES ('..', ..)`: into a non-WAL table the row is committed and visible when
        the call returns; into a WAL table it waits for the apply job like an ILP write
        (questdb.com/docs/reference/sql/insert/, questdb.com/docs/concept/write-ahead-log/)."""
        table = self._table(m["name"])
        values = [v.replace("''", "'") for v in LITERAL.findall(m["values"])]
        if len(values) != len(table.columns):
            raise RejectedError(f"not enough values [expected={len(table.columns)}, actual={len(values)}]")
        for (col, type_), value in zip(table.columns.items(), values, strict=True):
            if type_ not in ("VARCHAR", "STRING", "SYMBOL"):
                raise RejectedError(f"inconvertible value: '{value}' [STRING -> {type_}] (column {col})")
        row = dict(zip(table.columns, values, strict=True))
        table.sequencer_txn += 1
        if table.wal:
            table.pending.append((time.monotonic() + self.apply_delay, table.commit([row])))
        else:
            table.writer_txn += 1
            table.upsert(row)
        self.mutations.append(f"insert {m['name'].lower()}")
        return {"dml": "OK"}

    def _select_all(self, m: re.Match[str]) -> dict[str, Any]:
        """Every visible row of a table, in the order written (a table without a designated
        timestamp keeps insertion order)."""
        table = self._table(m["name"])
        return _select(m["cols"], table.rows, set(table.columns))

    def _partitions(self, m: re.Match[str]) -> dict[str, Any]:
        """table_partitions('t') (questdb.com/docs/reference/function/meta/#table_partitions): one row per
        partition holding visible rows, timestamps as QuestDB prints them in JSON."""
        table = self._table(m["name"])
        rows = [
            {"name": name, "numRows": len(found),
             "minTimestamp": _iso(min(r[table.designated or ""] for r in found)),
             "maxTimestamp": _iso(max(r[table.designated or ""] for r in found))}
            for name, found in table.partitions().items()
        ]  # fmt: skip
        return _select(m["cols"], rows, {"name", "numRows", "minTimestamp", "maxTimestamp"})

    def _drop_partition(self, m: re.Match[str]) -> dict[str, Any]:
        """`ALTER TABLE t DROP PARTITION WHERE ts < '...'`
        (questdb.com/docs/reference/sql/alter-table-drop-partition/):
        - only on a partitioned table, and the expression is on the designated timestamp (the doc:
          "drops partitions based on a boolean expression on the designated timestamp column");
        - the expression is evaluated on each partition's own timestamp, its start: a partition is
          dropped whole or not at all, and `ts = <a time inside a partition>` matches nothing
          (questdb/questdb#2879);
        - matching no partition is an error, "no partitions matched WHERE clause" (questdb/questdb#5363);
        - on a WAL table the drop is a WAL transaction: the partitions disappear when the apply job
          runs, like a write (questdb.com/docs/concept/write-ahead-log/).
        """
        table = self._table(m["name"])
        if table.partition_by == "NONE" or table.designated is None:
            raise RejectedError("table is not partitioned")
        if m["col"].lower() != table.designated:
            raise RejectedError(f"Invalid column: {m['col']} (the designated timestamp is expected)")
        cutoff = datetime.fromisoformat(m["ts"].replace("Z", "+00:00"))
        cutoff = cutoff if cutoff.tzinfo else cutoff.replace(tzinfo=UTC)  # QuestDB reads a bare time as UTC
        doomed = {
            name for name, rows in table.partitions().items()
            if partition_of(table.partition_by, rows[0][table.designated])[0] < cutoff
        }  # fmt: skip
        if not doomed:
            raise RejectedError("no partitions matched WHERE clause")

        def drop() -> None:
            for key, row in list(table.stored.items()):
                if partition_of(table.partition_by, row[table.designated or ""])[1] in doomed:
                    del table.stored[key]

        table.sequencer_txn += 1
        if table.wal:
            table.pending.append((time.monotonic() + self.apply_delay, drop))
        else:
            table.writer_txn += 1
            drop()
        self.mutations.append(f"drop partitions {m['name'].lower()} {','.join(sorted(doomed))}")
        return {"ddl": "OK"}

    def _columns(self, m: re.Match[str]) -> dict[str, Any]:
        table = self._table(m["name"])
        rows = [
            {"column": c, "type": t, "designated": c == table.designated, "upsertKey": c in table.dedup}
            for c, t in table.columns.items()
        ]
        return _select(m["cols"], rows, {"column", "type", "designated", "upsertKey"})

    def _bar(self, m: re.Match[str]) -> dict[str, Any]:
        table = self._table(m["name"])
        for col in (m["p"], m["s"], "symbol", "ts"):
            if col not in table.columns:
                raise RejectedError(f"Invalid column: {col}")
        start, end = _micros(m["start"]), _micros(m["end"])
        rows = sorted(
            (r for r in table.rows if r.get("symbol") == m["symbol"] and start <= r["ts"] < end),
            key=lambda r: r["ts"],
        )
        prices = [r[m["p"]] for r in rows if r.get(m["p"]) is not None]
        sizes = [r[m["s"]] for r in rows if r.get(m["s"]) is not None]
        row = [prices[0], max(prices), min(prices), prices[-1], sum(sizes), len(rows)] if rows else [None] * 5 + [0]
        return {"columns": [{"name": n} for n in ("first", "max", "min", "last", "sum", "count")],
                "dataset": [row], "count": 1}  # fmt: skip

    def write_ilp(self, body: str) -> None:
        """ILP over HTTP, with auto-creation of tables and columns off (as the chart configures it).

        A request is one transaction per table, not across tables: a bad line refuses its table's
        rows and the request answers 400, while the other tables' rows may be committed all the
        same ("ILP over HTTP is transactional per table", questdb.com/docs/ingestion/ilp/overview/,
        transactionality). The double takes that worst case: it commits every table without a bad
        line. Committed rows of a WAL table wait for the apply job (`apply_delay`).
        """
        with self.lock:
            self.apply_due()
            by_table: dict[str, list[dict[str, Any]]] = {}
            refused: set[str] = set()
            first_error: RejectedError | None = None
            for number, line in enumerate(body.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    name, row = _parse_line(number, line, self.tables)
                except RejectedError as exc:
                    refused.add(line.split(",", 1)[0].split(" ", 1)[0])
                    first_error = first_error or exc
                    continue
                by_table.setdefault(name, []).append(row)
            for name, rows in by_table.items():
                if name in refused:
                    continue
                table = self.tables[name]
                table.sequencer_txn += 1
                if table.wal:
                    table.pending.append((time.monotonic() + self.apply_delay, table.commit(rows)))
                else:
                    table.writer_txn += 1
                    for row in rows:
                        table.upsert(row)
                self.mutations.append(f"write {name}")
            self.apply_due()
            if first_error is not None:
                raise first_error

    def _table(self, name: str) -> Table:
        table = self.tables.get(name.lower())
        if table is None:
            raise RejectedError(f"table does not exist [table={name}]")
        return table


def _micros(text: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1_000_000)


def _iso(micros: int) -> str:
    return datetime.fromtimestamp(micros / 1_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def partition_of(partition_by: str, micros: int) -> tuple[datetime, str]:
    """The start and the directory name of the partition a timestamp falls in
    (questdb.com/docs/concept/partitions/: YYYY, YYYY-MM, YYYY-Www from Monday, YYYY-MM-DD, YYYY-MM-DDTHH)."""
    at = datetime.fromtimestamp(micros / 1_000_000, UTC)
    if partition_by == "HOUR":
        start = at.replace(minute=0, second=0, microsecond=0)
        return start, start.strftime("%Y-%m-%dT%H")
    day = at.replace(hour=0, minute=0, second=0, microsecond=0)
    if partition_by == "DAY":
        return day, day.strftime("%Y-%m-%d")
    if partition_by == "WEEK":
        start = day - timedelta(days=day.weekday())
        year, week, _ = start.isocalendar()
        return start, f"{year}-W{week:02d}"
    if partition_by == "MONTH":
        start = day.replace(day=1)
        return start, start.strftime("%Y-%m")
    if partition_by == "YEAR":
        start = day.replace(month=1, day=1)
        return start, start.strftime("%Y")
    return datetime.fromtimestamp(0, UTC), "default"


def _split_unescaped(text: str, sep: str) -> list[str]:
    """Split on `sep` where it is neither escaped nor inside a double-quoted string field: a string
    field may hold spaces and commas as they are, only `"`, `\\` and newlines are escaped in it
    (questdb.io/docs/reference/api/ilp/columnset-types/#string). Outside quotes `\\<sep>` is `sep`."""
    parts, current, quoted, i = [], [], False, 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            current.append(nxt if (nxt == sep and not quoted) else char + nxt)
            i += 2
            continue
        if char == '"':
            quoted = not quoted
        if char == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    parts.append("".join(current))
    return parts


def _ilp_string(value: str) -> str:
    """A quoted ILP string field's text: quotes off, `\\"`, `\\\\` and `\\n` decoded."""
    inner, out, i = value[1:-1], [], 0
    while i < len(inner):
        if inner[i] == "\\" and i + 1 < len(inner):
            out.append({"n": "\n"}.get(inner[i + 1], inner[i + 1]))
            i += 2
        else:
            out.append(inner[i])
            i += 1
    return "".join(out)


def _parse_line(number: int, line: str, tables: dict[str, Table]) -> tuple[str, dict[str, Any]]:
    def fail(message: str) -> RejectedError:
        return RejectedError(f"line {number}: {message}")

    parts = _split_unescaped(line.strip(), " ")
    if len(parts) != 3:
        raise fail("expected 'table,tags fields timestamp' (the double requires the timestamp)")
    head, fields, stamp = parts
    name, *tags = _split_unescaped(head, ",")
    table = tables.get(name)
    if table is None:
        raise fail(f"table does not exist [table={name}] (auto-creation is off)")
    row: dict[str, Any] = {}
    for tag in tags:
        col, _, value = tag.partition("=")
        if table.columns.get(col) != "SYMBOL":
            raise fail(f"tag {col} must be a SYMBOL column, is {table.columns.get(col)}")
        row[col] = value
    for item in _split_unescaped(fields, ","):
        col, _, value = item.partition("=")
        kind = table.columns.get(col)
        if kind is None:
            raise fail(f"column {col} does not exist (auto-creation is off)")
        if value.endswith("i") and value[:-1].lstrip("-").isdigit():
            # An ILP integer is cast into byte, short, int, long, float, double, date and timestamp
            # columns (questdb.com/docs/ingestion/ilp/columnset-types, "Cast table"); nothing else.
            if kind not in ("LONG", "INT", "SHORT", "BYTE", "FLOAT", "DOUBLE", "DATE", "TIMESTAMP"):
                raise fail(f"cast error: integer into {kind} column {col}")
            row[col] = float(value[:-1]) if kind in ("FLOAT", "DOUBLE") else int(value[:-1])
        elif value.startswith('"'):
            if kind not in ("STRING", "VARCHAR"):
                raise fail(f"cast error: string into {kind} column {col}")
            row[col] = _ilp_string(value)
        else:
            if kind not in ("DOUBLE", "FLOAT"):
                raise fail(f"cast error: float into {kind} column {col}")
            try:
                row[col] = float(value)
            except ValueError:
                raise fail(f"invalid number {value!r} for column {col}") from None
    if not stamp.isdigit() or table.designated is None:
        raise fail("invalid timestamp")
    row[table.designated] = int(stamp) // 1000  # nanoseconds -> microseconds, QuestDB's resolution
    return name, row


def _select(projection: str, rows: list[dict[str, Any]], known: set[str]) -> dict[str, Any]:
    names = [p.strip().strip('"') for p in projection.split(",")]
    for name in names:
        if name not in known:
            raise RejectedError(f"Invalid column: {name}")
    return {
        "columns": [{"name": n, "type": "STRING"} for n in names],
        "dataset": [[row[n] for n in names] for row in rows],
        "count": len(rows),
    }


class QuestDBDouble:
    """`with QuestDBDouble() as qdb:` serves on 127.0.0.1:<free port>; `qdb.url`, `qdb.state`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls  # HTTPS, as QuestDB Enterprise serves it (open source QuestDB is put behind a TLS proxy)
        self.state = QuestDBState()
        state = self.state

        class Handler(BaseHTTPRequestHandler):
            def _refused(self) -> bool:
                if state.unavailable:  # as a QuestDB that is restarting: the client must retry later
                    self._reply(503, {"error": "unavailable"})
                    return True
                if state.authorization and self.headers.get("Authorization") != state.authorization:
                    self._reply(401, {"error": "Unauthorized"})
                    return True
                return False

            def do_POST(self) -> None:
                if self._refused():
                    return
                url = urlparse(self.path)
                if url.path != "/write":
                    self._reply(404, {"error": "not found"})
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                try:
                    state.write_ilp(body)
                except RejectedError as exc:
                    self._reply(400, {"code": "invalid", "message": str(exc), "line": 0, "errorId": "double"})
                    return
                self.send_response(204)
                self.end_headers()

            def do_GET(self) -> None:
                if self._refused():
                    return
                url = urlparse(self.path)
                if url.path != "/exec":
                    self._reply(404, {"error": "not found"})
                    return
                sql = parse_qs(url.query).get("query", [""])[0]
                try:
                    self._reply(200, {"query": sql, **state.execute(sql)})
                except RejectedError as exc:
                    self._reply(400, {"query": sql, "error": str(exc), "position": 0})

            def _reply(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_: Any) -> None:
                return None

        self.handler = Handler
        self.server = self._serve((host, port))
        self.url = f"{'https' if tls else 'http'}://{host}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> QuestDBDouble:
        self.thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def restart(self, down_seconds: float) -> None:
        """Stop listening (connections refused, as a dead QuestDB), then serve again on the same port
        with the same tables: committed WAL transactions survive a restart and are applied after it."""
        self.__exit__()
        time.sleep(down_seconds)
        self.server = self._serve(self.server.server_address[:2])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _serve(self, address: tuple[Any, ...]) -> ThreadingHTTPServer:
        server = ThreadingHTTPServer((str(address[0]), int(address[1])), self.handler)
        if self.tls is not None:
            server.socket = self.tls.wrap_socket(server.socket, server_side=True)
        return server


if __name__ == "__main__":  # `python tests/questdb_double.py [HOST [PORT]]`: serve until killed, the URL first
    import sys

    double = QuestDBDouble(*sys.argv[1:2], *(int(p) for p in sys.argv[2:3]))
    print(double.url, flush=True)
    double.server.serve_forever()
