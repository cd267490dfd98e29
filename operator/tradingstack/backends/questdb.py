"""QuestDB provisioner: tables over the REST API (`GET /exec?query=`).

Tables are created with `CREATE TABLE IF NOT EXISTS ... TIMESTAMP(ts) PARTITION BY ... WAL
DEDUP UPSERT KEYS(...)`; a missing column is added with `ALTER TABLE ... ADD COLUMN`. A
column of another type, another designated timestamp or partitioning is reported
(ImmutableFieldChanged), never altered: that would rewrite or drop data.

QuestDB keeps no comment on a table, so who made which table is recorded in a table of its
own, OWNERS_TABLE: a plain (unpartitioned, hence non-WAL) table, whose INSERTs are visible
as soon as they return. The owner is recorded before the table is made, so a crash between
the two leaves a record the next reconcile completes, never a table nobody owns. The last
record of a name wins (a table dropped by one stack and made again by another).

Retention (`retentionDays`) drops whole partitions that end before the cutoff, the start of the
partition `now - retentionDays` falls in, with `ALTER TABLE ... DROP PARTITION WHERE ts < cutoff`
(QuestDB compares each partition's start). It is sent only when `table_partitions()` shows such a
partition: matching none is an error in QuestDB. On a WAL table the drop applies asynchronously,
so a pass in between may ask again and be told nothing matched, which is then nothing to do.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from tradingstack.api import OWNERS_TABLE, TableSpec
from tradingstack.changes import BackendResult, Change, ItemStatus, Problem, UnreachableError
from tradingstack.credentials import ServerCredentials, redact_url
from tradingstack.plan import OWNER_PREFIX, Plan

IMMUTABLE = "ImmutableFieldChanged"
NOTHING_MATCHED = "no partitions matched"  # questdb/questdb#5363


def partition_start(partition_by: str, at: datetime) -> datetime:
    """The start of the partition `at` falls in (weeks start on Monday, as QuestDB's do)."""
    if partition_by == "HOUR":
        return at.replace(minute=0, second=0, microsecond=0)
    day = at.replace(hour=0, minute=0, second=0, microsecond=0)
    if partition_by == "WEEK":
        return day - timedelta(days=day.weekday())
    if partition_by == "MONTH":
        return day.replace(day=1)
    if partition_by == "YEAR":
        return day.replace(month=1, day=1)
    return day


def retention_cutoff(table: TableSpec, now: datetime) -> datetime:
    """Partitions that start before this end at or before it: wholly older than the retention."""
    assert table.retention_days is not None
    return partition_start(table.partition_by, now - timedelta(days=table.retention_days))


def questdb_time(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class QuestDBError(Exception):
    def __init__(self, query: str, message: str) -> None:
        super().__init__(f"QuestDB rejected {query!r}: {message}")
        self.message = message


def create_table_sql(table: TableSpec) -> str:
    columns = ", ".join(f"{c.name} {c.type}" for c in table.columns)
    sql = f"CREATE TABLE IF NOT EXISTS {table.name} ({columns}) TIMESTAMP({table.timestamp})"
    sql += f" PARTITION BY {table.partition_by}"
    sql += " WAL" if table.wal else " BYPASS WAL"
    if table.dedup_keys:
        sql += f" DEDUP UPSERT KEYS({', '.join(table.dedup_keys)})"
    return sql


@dataclass
class LiveTable:
    columns: dict[str, str]  # name -> type
    designated: str | None
    partition_by: str
    wal: bool


@dataclass
class QuestDBProvisioner:
    url: str
    timeout: float = 5.0
    credentials: ServerCredentials = field(default_factory=ServerCredentials)
    backend = "tables"

    def _send(self, request: urllib.request.Request | str, what: str, error_key: str) -> bytes:
        """One HTTP call; 5xx, refused credentials and transport failures are UnreachableError, 4xx a QuestDBError."""
        if isinstance(request, str):
            request = urllib.request.Request(request)
        authorization = self.credentials.authorization()
        if authorization:
            request.add_unredirected_header("Authorization", authorization)
        where = f"QuestDB at {redact_url(self.url)}"
        try:
            with urllib.request.urlopen(
                request, timeout=self.timeout, context=self.credentials.ssl_context()
            ) as response:
                body: bytes = response.read()
                return body
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            try:
                message = json.loads(detail).get(error_key, detail)
            except ValueError:
                message = detail
            if exc.code in (401, 403):  # not the statement's fault: the credentials (secretRef) are wrong or missing
                raise UnreachableError(f"{where}: HTTP {exc.code}: credentials refused (questdb.secretRef)") from exc
            if exc.code >= 500:
                raise UnreachableError(f"{where}: HTTP {exc.code}: {message}") from exc
            raise QuestDBError(what, message) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise UnreachableError(f"{where}: {getattr(exc, 'reason', exc)}") from exc

    def query(self, sql: str) -> dict[str, Any]:
        """SQL over REST (`GET /exec`); errors come back as {"error": ...}."""
        target = f"{self.url.rstrip('/')}/exec?{urllib.parse.urlencode({'query': sql})}"
        body: dict[str, Any] = json.loads(self._send(target, sql, "error"))
        return body

    def write_ilp(self, lines: list[str]) -> None:
        """Line protocol over HTTP (`POST /write`): all lines are stored, or none and QuestDBError says why."""
        request = urllib.request.Request(
            f"{self.url.rstrip('/')}/write?precision=n",
            data=("\n".join(lines) + "\n").encode(),
            method="POST",
            headers={"Content-Type": "text/plain; charset=utf-8"},
        )
        self._send(request, f"{len(lines)} ILP line(s)", "message")

    def observe(self) -> dict[str, LiveTable]:
        tables = self.query("SELECT table_name, designatedTimestamp, partitionBy, walEnabled FROM tables()")
        live = {}
        for name, designated, partition_by, wal in tables.get("dataset", []):
            columns = self.query(f"SELECT \"column\", type FROM table_columns('{name}')")
            live[name] = LiveTable(
                columns={c: t for c, t in columns.get("dataset", [])},
                designated=designated,
                partition_by=partition_by,
                wal=bool(wal),
            )
        return live

    def owners(self, live: dict[str, LiveTable]) -> dict[str, str]:
        """table name -> the stack that made it, from OWNERS_TABLE (the last record of a name wins)."""
        if OWNERS_TABLE not in live:
            return {}
        return {name: owner for name, owner in self.query(f"SELECT table_name, owner FROM {OWNERS_TABLE}")["dataset"]}

    def _record_owner(self, table: str, owner: str) -> None:
        # Only when a table is about to be made: one idempotent CREATE more is cheap there.
        self.query(f"CREATE TABLE IF NOT EXISTS {OWNERS_TABLE} (table_name VARCHAR, owner VARCHAR)")
        quoted = owner.replace("'", "''")  # names are Kubernetes names, but never trust a string in SQL
        self.query(f"INSERT INTO {OWNERS_TABLE} VALUES ('{table}', '{quoted}')")

    def reconcile(self, plan: Plan, dry_run: bool = False) -> BackendResult:
        result = BackendResult(self.backend, dry_run=dry_run)
        live = self.observe()
        owners = self.owners(live)
        owner = plan.stack.owner
        for table in plan.tables:
            holder = owners.get(table.name, "")
            if table.name in live and holder.startswith(OWNER_PREFIX) and holder != owner:
                message = (f"table {table.name} was made by {holder.removeprefix(OWNER_PREFIX)}; two stacks on one "
                           "QuestDB need tables of their own names (spec.tables)")  # fmt: skip
                result.problems.append(Problem("Table", table.name, "OwnedByAnotherStack", message))
                result.items.append(ItemStatus(table.name, False, "OwnedByAnotherStack", message))
                continue
            try:
                if table.name not in live and not dry_run and holder != owner:
                    self._record_owner(table.name, owner)
                self._table(table, live.get(table.name), result)
            except QuestDBError as exc:
                result.problems.append(Problem("Table", table.name, "Rejected", exc.message))
                result.items.append(ItemStatus(table.name, False, "Rejected", exc.message))
        return result

    def _table(self, table: TableSpec, live: LiveTable | None, result: BackendResult) -> None:
        if live is None:
            result.changes.append(Change("create", "Table", table.name))
            if not result.dry_run:
                self.query(create_table_sql(table))
            result.items.append(
                ItemStatus(table.name, not result.dry_run, "InSync" if not result.dry_run else "Missing")
            )
            return
        differences = []
        if live.designated != table.timestamp:
            differences.append(f"designated timestamp is {live.designated}, spec says {table.timestamp}")
        if live.partition_by != table.partition_by:
            differences.append(f"partitioned by {live.partition_by}, spec says {table.partition_by}")
        if live.wal != table.wal:
            differences.append(f"wal is {live.wal}, spec says {table.wal}")
        for column in table.columns:
            found = live.columns.get(column.name)
            if found is not None and found != column.type:
                differences.append(f"column {column.name} is {found}, spec says {column.type}")
        if differences:
            message = "; ".join(differences) + " (not altered: it would rewrite data)"
            result.problems.append(Problem("Table", table.name, IMMUTABLE, message))
            result.items.append(ItemStatus(table.name, False, IMMUTABLE, message))
            return
        missing = [c for c in table.columns if c.name not in live.columns]
        for column in missing:
            result.changes.append(Change("update", "Table", table.name, f"add column {column.name} {column.type}"))
            if not result.dry_run:
                self.query(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {column.type}")
        if missing:
            names = ", ".join(c.name for c in missing)
            reason, message = ("InSync", "") if not result.dry_run else ("Drifted", f"missing {names}")
            result.items.append(ItemStatus(table.name, not result.dry_run, reason, message))
        elif not self._retention(table, result):
            result.items.append(ItemStatus(table.name, True, "InSync"))

    def _retention(self, table: TableSpec, result: BackendResult) -> bool:
        """Drop the partitions past the table's retention; True when some were (or, dry, would be)."""
        if table.retention_days is None:
            return False
        cutoff = questdb_time(retention_cutoff(table, datetime.now(UTC)))
        partitions = self.query(f"SELECT name, maxTimestamp FROM table_partitions('{table.name}')")["dataset"]
        # Timestamps print as fixed-width UTC text, so text order is time order.
        expired = [name for name, newest in partitions if newest < cutoff]
        if not expired:
            return False
        detail = f"dropped {len(expired)} partition(s) older than {table.retention_days} day(s): {', '.join(expired)}"
        if not result.dry_run:
            try:
                self.query(f"ALTER TABLE {table.name} DROP PARTITION WHERE {table.timestamp} < '{cutoff}'")
            except QuestDBError as exc:
                if NOTHING_MATCHED not in exc.message:
                    raise
                return False  # a drop sent by an earlier pass has been applied meanwhile
        result.changes.append(Change("update", "Table", table.name, detail))
        if result.dry_run:
            result.items.append(ItemStatus(table.name, False, "Drifted", f"{len(expired)} partition(s) past retention"))
        else:
            result.items.append(ItemStatus(table.name, True, "InSync"))
        return True

    def delete(self, plan: Plan) -> list[Change]:
        deleted = []
        live = self.observe()
        owners = self.owners(live)
        for table in plan.tables:
            # Only a table this stack made: one made by hand or by another stack stays.
            if table.name in live and owners.get(table.name) == plan.stack.owner:
                self.query(f"DROP TABLE IF EXISTS {table.name}")
                deleted.append(Change("delete", "Table", table.name))
        return deleted
