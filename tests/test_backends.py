"""Provisioners against real servers: nats-server, moto's S3 server with deltalake, the QuestDB double."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import pyarrow.fs as pafs
import pytest
import redis
from deltalake import DeltaTable

from questdb_double import QuestDBDouble
from tradingstack import backends
from tradingstack.api import S3Endpoint
from tradingstack.backends.jetstream import JetStreamProvisioner
from tradingstack.backends.questdb import OWNERS_TABLE, QuestDBError, QuestDBProvisioner
from tradingstack.backends.redis import RedisProvisioner
from tradingstack.backends.s3 import S3Credentials, S3Provisioner
from tradingstack.changes import UnreachableError
from tradingstack.lake import LAKE_TABLES, MARKET_TICKS
from tradingstack.plan import Plan, StackRef, build_plan, parse_spec

from conftest import NatsServer, RedisServer, free_port, wait_for

CREDS = S3Credentials("testing", "testing-secret")


def plan_for(spec: dict[str, Any] | None = None) -> Plan:
    return build_plan(StackRef("demo", "ns"), parse_spec(spec or {}))


@pytest.fixture
def nats_alone(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server of this test's own: the operator tests' stacks share the session one."""
    server = NatsServer(tmp_path / "js")
    server.start()
    yield server
    server.stop()


def js_call(url: str, fn: Any) -> Any:
    async def run() -> Any:
        nc = await nats.connect(url)
        try:
            return await fn(nc.jsm(), nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(run())


# --- JetStream ---------------------------------------------------------------------------------


def test_streams_and_consumers_from_nothing_then_nothing_to_do(nats_alone: NatsServer) -> None:
    plan = plan_for()
    provisioner = JetStreamProvisioner(nats_alone.url)
    first = provisioner.reconcile(plan)
    assert {c.name for c in first.changes if c.kind == "Stream"} == {s.name for s in plan.streams}
    assert {c.name for c in first.changes if c.kind == "Consumer"} == {
        f"{c.stream}/{c.durable}" for c in plan.consumers
    }
    assert first.ok

    second = provisioner.reconcile(plan)
    assert second.changes == []
    assert all(item.ready and item.reason == "InSync" for item in second.items)

    async def inspect(jsm: Any, _: Any) -> tuple[Any, Any]:
        return (await jsm.stream_info("MARKET_TICKS")).config, (
            await jsm.consumer_info("MARKET_TICKS", "ns_demo_sink-ticks")
        )

    stream, consumer = js_call(nats_alone.url, inspect)
    assert stream.subjects == ["market.tick.>"]
    assert stream.max_age == pytest.approx(24 * 3600)
    assert stream.storage == "file"
    assert stream.discard == "old"
    assert consumer.config.filter_subject == "market.tick.>"
    assert consumer.config.ack_policy == "explicit"


def test_hand_edited_max_age_is_repaired(nats_alone: NatsServer) -> None:
    plan = plan_for()
    provisioner = JetStreamProvisioner(nats_alone.url)
    provisioner.reconcile(plan)

    async def shorten(jsm: Any, _: Any) -> None:
        config = (await jsm.stream_info("MARKET_TICKS")).config
        config.max_age = 60.0
        config.duplicate_window = 30.0  # the server refuses a window longer than max_age
        await jsm.update_stream(config)

    js_call(nats_alone.url, shorten)
    result = provisioner.reconcile(plan)
    assert [str(c) for c in result.changes] == ["update Stream/MARKET_TICKS (max_age drifted)"]

    async def max_age(jsm: Any, _: Any) -> float:
        return float((await jsm.stream_info("MARKET_TICKS")).config.max_age)

    assert js_call(nats_alone.url, max_age) == pytest.approx(24 * 3600)


def test_immutable_storage_change_is_reported_and_the_data_kept(nats_alone: NatsServer) -> None:
    provisioner = JetStreamProvisioner(nats_alone.url)
    provisioner.reconcile(plan_for())

    async def publish(_: Any, js: Any) -> None:
        for i in range(5):
            await js.publish("market.tick.BTCUSDT", f"tick {i}".encode())

    js_call(nats_alone.url, publish)
    streams = [{"name": "MARKET_TICKS", "subjects": ["market.tick.>"], "storage": "memory"}]
    only_ticks = {"streams": streams, "services": {s: {"enabled": False} for s in ("sink-alt", "exeq", "pnl")}}
    result = provisioner.reconcile(plan_for(only_ticks))
    (problem,) = result.problems
    assert problem.reason == "ImmutableFieldChanged"
    assert "storage is file, spec says memory" in problem.message
    assert not result.ok

    async def messages(jsm: Any, _: Any) -> int:
        return int((await jsm.stream_info("MARKET_TICKS")).state.messages)

    assert js_call(nats_alone.url, messages) == 5


def test_nats_down_is_unreachable_then_recovers(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "js", port=free_port())
    plan = plan_for()
    down = backends.run(JetStreamProvisioner(server.url), plan)
    assert down.unreachable is not None
    assert server.url in down.unreachable
    server.start()
    try:
        up = backends.run(JetStreamProvisioner(server.url), plan)
        assert up.unreachable is None
        assert up.ok
    finally:
        server.stop()


def test_delete_removes_the_streams(nats_alone: NatsServer) -> None:
    provisioner = JetStreamProvisioner(nats_alone.url)
    plan = plan_for()
    provisioner.reconcile(plan)
    assert {c.name for c in provisioner.delete(plan)} == {s.name for s in plan.streams}
    assert len(provisioner.reconcile(plan, dry_run=True).changes) > len(plan.streams)


# --- S3 and Delta Lake ---------------------------------------------------------------------------


@pytest.fixture
def lake(s3_url: str) -> tuple[S3Endpoint, Plan]:
    bucket = f"lake-{uuid.uuid4().hex[:10]}"
    spec = {"infrastructure": {"s3": {"endpoint": s3_url, "allowHttp": True, "bucket": bucket}}}
    plan = plan_for(spec)
    return plan.spec.infrastructure.s3, plan


def test_buckets_and_delta_tables_from_nothing(lake: tuple[S3Endpoint, Plan]) -> None:
    endpoint, plan = lake
    provisioner = S3Provisioner(endpoint, CREDS)
    first = provisioner.reconcile(plan)
    assert [str(c) for c in first.changes] == [
        f"create Bucket/{endpoint.bucket}",
        f"create DeltaTable/{endpoint.bucket}/lake/market_ticks",
        f"create DeltaTable/{endpoint.bucket}/lake/alt_data",
    ]
    for table in LAKE_TABLES:
        live = DeltaTable(f"s3://{endpoint.bucket}/{table.path}", storage_options=provisioner.storage_options())
        assert live.metadata().partition_columns == list(table.partition_by)
        assert [f.name for f in live.schema().fields] == table.schema.names
    assert provisioner.reconcile(plan).changes == []


def test_deleted_bucket_and_missing_column_are_repaired(lake: tuple[S3Endpoint, Plan], s3_url: str) -> None:
    endpoint, plan = lake
    provisioner = S3Provisioner(endpoint, CREDS)
    # A table made by an older writer, without the columns added since.
    old_schema = MARKET_TICKS.schema.remove(MARKET_TICKS.schema.get_field_index("ingest_ts"))
    fs = provisioner._filesystem()
    fs.create_dir(endpoint.bucket)
    DeltaTable.create(
        f"s3://{endpoint.bucket}/{MARKET_TICKS.path}", old_schema, partition_by=["symbol", "dt"],
        storage_options=provisioner.storage_options(),
    )  # fmt: skip
    result = provisioner.reconcile(plan)
    assert f"update DeltaTable/{endpoint.bucket}/lake/market_ticks (add columns ingest_ts)" in map(str, result.changes)
    live = DeltaTable(f"s3://{endpoint.bucket}/{MARKET_TICKS.path}", storage_options=provisioner.storage_options())
    assert "ingest_ts" in [f.name for f in live.schema().fields]

    extra = f"extra-{uuid.uuid4().hex[:8]}"
    plan = plan_for({**plan.spec.model_dump(by_alias=True, exclude_none=True), "buckets": [{"name": extra}]})
    provisioner.reconcile(plan)
    fs.delete_dir(extra)
    assert fs.get_file_info(extra).type == pafs.FileType.NotFound
    assert [str(c) for c in provisioner.reconcile(plan).changes] == [f"create Bucket/{extra}"]
    assert fs.get_file_info(extra).type == pafs.FileType.Directory


def test_missing_secret_is_reported_not_guessed(lake: tuple[S3Endpoint, Plan]) -> None:
    """A backend whose Secret cannot be read is not tried without credentials (or with the wrong ones)."""
    _, plan = lake
    missing = backends.StackCredentials(missing={"buckets": "Secret lake-credentials not found"})
    by_backend = {p.backend: p for p in backends.provisioners(plan, missing)}
    result = backends.run(by_backend["buckets"], plan)
    assert [p.reason for p in result.problems] == ["SecretNotFound"]
    assert result.changes == []
    assert isinstance(by_backend["streams"], JetStreamProvisioner)  # the others go on
    with pytest.raises(UnreachableError, match="lake-credentials"):
        by_backend["buckets"].delete(plan)


def test_credentials_never_show_in_reprs() -> None:
    assert "testing-secret" not in repr(CREDS)
    assert "testing-secret" not in repr(S3Provisioner(S3Endpoint(endpoint="https://s3.example"), CREDS))


def test_s3_down_is_unreachable(lake: tuple[S3Endpoint, Plan]) -> None:
    endpoint, plan = lake
    nowhere = endpoint.model_copy(update={"endpoint": f"http://127.0.0.1:{free_port()}"})
    result = backends.run(S3Provisioner(nowhere, CREDS), plan)
    assert result.unreachable is not None


def test_delete_removes_buckets_with_their_tables(lake: tuple[S3Endpoint, Plan]) -> None:
    endpoint, plan = lake
    provisioner = S3Provisioner(endpoint, CREDS)
    provisioner.reconcile(plan)
    assert [str(c) for c in provisioner.delete(plan)] == [f"delete Bucket/{endpoint.bucket}"]
    assert provisioner._filesystem().get_file_info(endpoint.bucket).type == pafs.FileType.NotFound


# --- QuestDB -------------------------------------------------------------------------------------


@pytest.fixture
def qdb() -> Iterator[QuestDBDouble]:
    with QuestDBDouble() as double:
        yield double


def test_tables_from_nothing_then_nothing_to_do(qdb: QuestDBDouble) -> None:
    plan = plan_for()
    provisioner = QuestDBProvisioner(qdb.url)
    first = provisioner.reconcile(plan)
    assert [c.name for c in first.changes] == ["ticks", "ohlcv_1m", "orders", "fills", "positions"]
    ticks = qdb.state.tables["ticks"]
    assert (ticks.designated, ticks.partition_by, ticks.wal) == ("ts", "DAY", True)
    assert ticks.dedup == ["ts", "symbol", "tick_id"]
    assert ticks.columns["tick_id"] == "VARCHAR"
    assert ticks.columns["symbol"] == "SYMBOL"
    mutations = list(qdb.state.mutations)
    assert provisioner.reconcile(plan).changes == []
    assert qdb.state.mutations == mutations


def test_missing_column_is_added_and_a_changed_type_reported(qdb: QuestDBDouble) -> None:
    plan = plan_for()
    provisioner = QuestDBProvisioner(qdb.url)
    provisioner.reconcile(plan)
    del qdb.state.tables["fills"].columns["price"]  # an older table without the column
    qdb.state.tables["orders"].columns["quantity"] = "LONG"  # someone changed a type by hand
    result = provisioner.reconcile(plan)
    assert [str(c) for c in result.changes] == ["update Table/fills (add column price DOUBLE)"]
    assert qdb.state.tables["fills"].columns["price"] == "DOUBLE"
    (problem,) = result.problems
    assert problem.reason == "ImmutableFieldChanged"
    assert "column quantity is LONG, spec says DOUBLE" in problem.message
    assert qdb.state.tables["orders"].columns["quantity"] == "LONG", "a type change must never be applied"


def test_questdb_down_is_unreachable() -> None:
    result = backends.run(QuestDBProvisioner(f"http://127.0.0.1:{free_port()}"), plan_for())
    assert result.unreachable is not None


def test_delete_drops_the_tables(qdb: QuestDBDouble) -> None:
    provisioner = QuestDBProvisioner(qdb.url)
    provisioner.reconcile(plan_for())
    assert len(provisioner.delete(plan_for())) == 5
    assert set(qdb.state.tables) == {OWNERS_TABLE}  # the record of who made what stays for other stacks


def test_tables_are_owned_a_stack_deletes_only_its_own(qdb: QuestDBDouble) -> None:
    """Two stacks on one QuestDB: the second is told the tables are taken, and Delete on either
    drops only what it made; a table made by hand before any stack is used, never dropped."""
    provisioner = QuestDBProvisioner(qdb.url)
    provisioner.query("CREATE TABLE fills (fill_id VARCHAR, order_id VARCHAR, symbol SYMBOL, side SYMBOL, "
                      "quantity DOUBLE, price DOUBLE, ts TIMESTAMP) TIMESTAMP(ts) PARTITION BY DAY WAL")  # fmt: skip
    ours, theirs = plan_for(), build_plan(StackRef("other", "team-b"), parse_spec({}))
    assert provisioner.reconcile(ours).ok
    shared = provisioner.reconcile(theirs)
    assert {(p.kind, p.reason) for p in shared.problems} == {("Table", "OwnedByAnotherStack")}
    assert {p.name for p in shared.problems} == {"ticks", "ohlcv_1m", "orders", "positions"}
    assert "ns/demo" in shared.problems[0].message
    assert provisioner.delete(theirs) == []
    assert {c.name for c in provisioner.delete(ours)} == {"ticks", "ohlcv_1m", "orders", "positions"}
    assert set(qdb.state.tables) == {"fills", OWNERS_TABLE}
    # Gone, the names are free: the other stack makes them and owns them now.
    assert provisioner.reconcile(theirs).ok
    assert {c.name for c in provisioner.delete(theirs)} == {"ticks", "ohlcv_1m", "orders", "positions"}


def test_a_table_recorded_but_not_made_is_made_by_its_owner(qdb: QuestDBDouble) -> None:
    """The owner is recorded before the table is made: a crash between the two leaves a record
    that the next reconcile completes, never a table nobody owns."""
    provisioner = QuestDBProvisioner(qdb.url)
    provisioner.reconcile(plan_for())
    provisioner.query("DROP TABLE ticks")
    assert [str(c) for c in provisioner.reconcile(plan_for()).changes] == ["create Table/ticks"]
    assert [c.name for c in provisioner.delete(plan_for())] == ["ticks", "ohlcv_1m", "orders", "fills", "positions"]


@pytest.mark.parametrize(
    ("sql", "error"),
    [
        ("CREATE TABLE t (a LONG, ts TIMESTAMPTZ) TIMESTAMP(ts) PARTITION BY DAY WAL", "invalid type"),
        ("CREATE TABLE t (a LONG, ts LONG) TIMESTAMP(ts) PARTITION BY DAY WAL", "TIMESTAMP column expected"),
        ("CREATE TABLE t (a LONG, ts TIMESTAMP) TIMESTAMP(x) PARTITION BY DAY WAL", "Invalid column"),
        ("CREATE TABLE t (a LONG, ts TIMESTAMP) PARTITION BY DAY", "designated timestamp"),
        ("CREATE TABLE t (a LONG, ts TIMESTAMP) TIMESTAMP(ts) PARTITION BY NONE WAL", "partitioned tables"),
        ("CREATE TABLE t (a LONG, ts TIMESTAMP) TIMESTAMP(ts) PARTITION BY DAY WAL DEDUP UPSERT KEYS(a)",
         "dedicated timestamp"),
        ("CREATE TABLE t (a LONG, ts TIMESTAMP) TIMESTAMP(ts) PARTITION BY DAY BYPASS WAL DEDUP UPSERT KEYS(ts)",
         "only on WAL tables"),
        ("CREATE TABLE t (a LONG, a DOUBLE, ts TIMESTAMP) TIMESTAMP(ts) PARTITION BY DAY", "Duplicate column"),
        ("ALTER TABLE nope ADD COLUMN a LONG", "table does not exist"),
        ("SELECT a FROM trades", "table does not exist"),
        ("SELECT a FROM tradingstack_owners WHERE a = 1", "unsupported statement"),
        ("INSERT INTO tradingstack_owners VALUES ('a', 'b')", "table does not exist"),
    ],
)  # fmt: skip
def test_the_questdb_double_rejects_what_questdb_rejects(qdb: QuestDBDouble, sql: str, error: str) -> None:
    provisioner = QuestDBProvisioner(qdb.url)
    with pytest.raises(Exception, match=error):
        provisioner.query(sql)
    assert qdb.state.mutations == []


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("nope,symbol=A price=1.0 1767346200000000000", "table does not exist"),
        ("ticks,symbol=A tick_id=1i 1767346200000000000", "integer into VARCHAR"),  # into DOUBLE is cast
        ('ticks,symbol=A price="x" 1767346200000000000', "string into DOUBLE"),
        ("ticks,symbol=A colour=1.0 1767346200000000000", "column colour does not exist"),
        ("ticks,price=1.0 size=1.0 1767346200000000000", "must be a SYMBOL column"),
        ("ticks,symbol=A price=1.0", "timestamp"),
    ],
)
def test_the_questdb_double_rejects_bad_line_protocol(qdb: QuestDBDouble, line: str, error: str) -> None:
    provisioner = QuestDBProvisioner(qdb.url)
    provisioner.reconcile(plan_for())
    with pytest.raises(Exception, match=error):
        provisioner.write_ilp(["ticks,symbol=A price=1.0 1767346200000000000", line])
    # All or nothing per table: a bad ticks line refuses the good one; a bad line for another table does not.
    committed = 0 if line.startswith("ticks") else 1
    assert len(qdb.state.tables["ticks"].rows) == committed


@pytest.mark.parametrize(
    ("sql", "error"),
    [
        ("CREATE TABLE t (id STRING, ts TIMESTAMP) TIMESTAMP(ts) PARTITION BY DAY WAL DEDUP UPSERT KEYS(ts, id)",
         "can only be fixed size column [column=id, type=STRING]"),
        ("CREATE TABLE t (id BINARY, ts TIMESTAMP) TIMESTAMP(ts) PARTITION BY DAY WAL DEDUP UPSERT KEYS(ts, id)",
         "can only be fixed size column"),
    ],
)  # fmt: skip
def test_the_double_refuses_variable_size_dedup_keys_as_questdb_does(qdb: QuestDBDouble, sql: str, error: str) -> None:
    with pytest.raises(QuestDBError, match=re.escape(error)):
        QuestDBProvisioner(qdb.url).query(sql)
    ok = "CREATE TABLE v (id VARCHAR, ts TIMESTAMP) TIMESTAMP(ts) PARTITION BY DAY WAL DEDUP UPSERT KEYS(ts, id)"
    QuestDBProvisioner(qdb.url).query(ok)


def test_the_double_casts_an_ilp_integer_into_a_double_column_as_questdb_does(qdb: QuestDBDouble) -> None:
    provisioner = QuestDBProvisioner(qdb.url)
    provisioner.query(
        "CREATE TABLE p (price DOUBLE, n LONG, s VARCHAR, ts TIMESTAMP) TIMESTAMP(ts) PARTITION BY DAY WAL"
    )
    provisioner.write_ilp(["p price=100i,n=3i 1767346200000000000"])
    assert qdb.state.tables["p"].rows == [{"price": 100.0, "n": 3, "ts": 1767346200000000}]
    with pytest.raises(QuestDBError, match="cast error"):
        provisioner.write_ilp(["p s=5i 1767346200000000000"])


def test_delete_removes_only_the_streams_this_stack_made(nats_alone: NatsServer) -> None:
    async def by_hand() -> None:  # ALT_DATA existed before any stack (made in nats-box, say)
        nc = await nats.connect(nats_alone.url)
        await nc.jsm().add_stream(name="ALT_DATA", subjects=["alt.norm.>"])
        await nc.close()

    asyncio.run(by_hand())
    ours, theirs = plan_for(), build_plan(StackRef("other", "team-b"), parse_spec({}))
    assert JetStreamProvisioner(nats_alone.url).reconcile(ours).ok
    # Another stack on the same NATS finds the streams taken: a clear reason, no silent sharing.
    shared = JetStreamProvisioner(nats_alone.url).reconcile(theirs)
    assert {p.reason for p in shared.problems} == {"OwnedByAnotherStack"}
    assert {p.name for p in shared.problems} == {s.name for s in theirs.streams} - {"ALT_DATA"}
    assert "ns/demo" in shared.problems[0].message
    assert JetStreamProvisioner(nats_alone.url).delete(theirs) == []  # nothing of theirs to delete
    deleted = {c.name for c in JetStreamProvisioner(nats_alone.url).delete(ours)}
    assert deleted == {s.name for s in ours.streams} - {"ALT_DATA"}

    async def left() -> list[str]:
        nc = await nats.connect(nats_alone.url)
        names = [s.config.name for s in await nc.jsm().streams_info()]
        await nc.close()
        return names

    assert asyncio.run(left()) == ["ALT_DATA"]


def test_delete_keeps_a_bucket_it_did_not_make_and_what_others_put_there(lake: tuple[S3Endpoint, Plan]) -> None:
    endpoint, plan = lake
    provisioner = S3Provisioner(endpoint, CREDS)
    fs = provisioner._filesystem()
    fs.create_dir(endpoint.bucket)  # the user's bucket, with the user's data
    with fs.open_output_stream(f"{endpoint.bucket}/reports/2026.csv") as out:
        out.write(b"a,b\n")
    provisioner.reconcile(plan)  # the stack adds its Delta tables to it
    deleted = [str(c) for c in provisioner.delete(plan)]
    assert deleted == [f"delete DeltaTable/{endpoint.bucket}/{t.path}" for t in LAKE_TABLES]
    assert fs.get_file_info(f"{endpoint.bucket}/reports/2026.csv").type == pafs.FileType.File
    assert fs.get_file_info(f"{endpoint.bucket}/{MARKET_TICKS.path}").type == pafs.FileType.NotFound


def test_the_double_applies_wal_writes_after_a_delay_as_questdb_does(qdb: QuestDBDouble) -> None:
    provisioner = QuestDBProvisioner(qdb.url)
    provisioner.reconcile(plan_for())
    qdb.state.apply_delay = 0.5

    def wal() -> list[Any]:
        rows = provisioner.query("SELECT name, writerTxn, sequencerTxn FROM wal_tables()")["dataset"]
        return next(row[1:] for row in rows if row[0] == "ticks")

    provisioner.write_ilp(['ticks,symbol=A tick_id="t1",price=1.0 1767346200000000000'])  # acknowledged...
    assert wal() == [0, 1]  # ...in the WAL, not applied: a SELECT does not see it yet
    assert qdb.state.tables["ticks"].rows == []
    wait_for(lambda: wal() == [1, 1], 5, "the apply job")
    assert len(qdb.state.tables["ticks"].rows) == 1


def test_a_durable_held_by_another_stack_is_a_problem_not_shared(nats_alone: NatsServer) -> None:
    """Two stacks reading a stream made by hand get durables of their own; one taken anyway is reported."""

    async def by_hand(jsm: Any, _: Any) -> None:
        await jsm.add_stream(name="MARKET_TICKS", subjects=["market.tick.>"])

    js_call(nats_alone.url, by_hand)
    ticks_only = {"streams": [{"name": "MARKET_TICKS", "subjects": ["market.tick.>"]}],
                  "services": {s: {"enabled": False} for s in ("sink-alt", "exeq", "pnl")}}  # fmt: skip
    ours = build_plan(StackRef("demo", "a"), parse_spec(ticks_only))
    theirs = build_plan(StackRef("demo", "b"), parse_spec(ticks_only))
    assert JetStreamProvisioner(nats_alone.url).reconcile(ours).ok
    assert JetStreamProvisioner(nats_alone.url).reconcile(theirs).ok  # their own durables

    async def durables(jsm: Any, _: Any) -> dict[str, str]:
        return {c.name: c.config.description for c in await jsm.consumers_info("MARKET_TICKS")}

    held = js_call(nats_alone.url, durables)
    assert held == {c.durable: ours.stack.owner for c in ours.consumers} | {
        c.durable: theirs.stack.owner for c in theirs.consumers
    }
    taken = build_plan(StackRef("demo", "a"), parse_spec(ticks_only))
    impostor = JetStreamProvisioner(nats_alone.url)

    async def steal(jsm: Any, _: Any) -> None:  # another stack's mark on a name of ours
        for consumer in ours.consumers:
            info = await jsm.consumer_info("MARKET_TICKS", consumer.durable)
            info.config.description = theirs.stack.owner
            await jsm.add_consumer("MARKET_TICKS", info.config)

    js_call(nats_alone.url, steal)
    result = impostor.reconcile(taken)
    assert {(p.kind, p.reason) for p in result.problems} == {("Consumer", "OwnedByAnotherStack")}
    assert "b/demo" in result.problems[0].message
    assert not result.ok


def _ticks_with_retention(days: int) -> dict[str, Any]:
    tables = [t.model_dump(by_alias=True, exclude_none=True) for t in parse_spec({}).tables]
    for table in tables:
        if table["name"] == "ticks":
            table["retentionDays"] = days
    return {"tables": tables}


def _tick_line(micros: int, tick_id: str) -> str:
    return f'ticks,symbol=A tick_id="{tick_id}",price=1.0 {micros * 1000}'


def _visible_tick_ids(provisioner: QuestDBProvisioner, qdb: QuestDBDouble) -> set[str]:
    provisioner.query("SELECT name FROM wal_tables()")  # the double runs its apply job on a request
    return {r["tick_id"] for r in qdb.state.tables["ticks"].rows}


def test_partitions_past_the_retention_are_dropped_whole_and_no_others(qdb: QuestDBDouble) -> None:
    """retentionDays 2 on a DAY-partitioned table: the partitions that end before midnight two days
    ago go; the one that holds the cutoff stays whole (rows a little older than two days included),
    as QuestDB drops partitions, never rows. A table without retention keeps everything."""
    plan = plan_for(_ticks_with_retention(2))
    provisioner = QuestDBProvisioner(qdb.url)
    provisioner.reconcile(plan)
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    stamps = {
        "five-days": midnight - timedelta(days=5, hours=-1),
        "three-days": midnight - timedelta(days=3, hours=-23),  # 23:00 three days ago: partition ends at the cutoff
        "cutoff-day": midnight - timedelta(days=2, minutes=-1),  # older than 2 days, its partition is not
        "yesterday": midnight - timedelta(days=1),
        "today": midnight,
    }
    micros = {k: int(v.timestamp() * 1_000_000) for k, v in stamps.items()}
    provisioner.write_ilp([_tick_line(m, k) for k, m in micros.items()])
    qdb.state.apply_delay = 0.5  # a WAL table: the drop is applied later, like a write

    result = provisioner.reconcile(plan)
    (change,) = result.changes
    three_days = (midnight - timedelta(days=3)).strftime("%Y-%m-%d")
    five_days = (midnight - timedelta(days=5)).strftime("%Y-%m-%d")
    assert str(change) == (f"update Table/ticks (dropped 2 partition(s) older than 2 day(s): "
                           f"{five_days}, {three_days})")  # fmt: skip
    cutoff = (midnight - timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%S.000000Z")
    assert f"ALTER TABLE ticks DROP PARTITION WHERE ts < '{cutoff}'" in qdb.state.statements
    assert len(qdb.state.tables["ticks"].rows) == 5, "a WAL drop is visible only once applied"
    wait_for(lambda: _visible_tick_ids(provisioner, qdb) == {"cutoff-day", "yesterday", "today"}, 5, "the drop applied")
    again = provisioner.reconcile(plan)
    assert again.ok
    assert again.changes == []
    assert {r["tick_id"] for r in qdb.state.tables["ticks"].rows} == {"cutoff-day", "yesterday", "today"}


def test_partitions_are_kept_without_retention_and_reported_in_a_dry_run(qdb: QuestDBDouble) -> None:
    provisioner = QuestDBProvisioner(qdb.url)
    provisioner.reconcile(plan_for())
    old = int((datetime.now(UTC) - timedelta(days=400)).timestamp() * 1_000_000)
    provisioner.write_ilp([_tick_line(old, "old")])
    assert provisioner.reconcile(plan_for()).changes == []
    assert len(qdb.state.tables["ticks"].rows) == 1

    dry = provisioner.reconcile(plan_for(_ticks_with_retention(30)), dry_run=True)
    assert [c.detail for c in dry.changes] == [
        f"dropped 1 partition(s) older than 30 day(s): {datetime.fromtimestamp(old / 1e6, UTC):%Y-%m-%d}"
    ]
    (item,) = [i for i in dry.items if i.name == "ticks"]
    assert (item.ready, item.reason) == (False, "Drifted")
    assert len(qdb.state.tables["ticks"].rows) == 1, "a dry run drops nothing"


@pytest.mark.parametrize(
    ("sql", "error"),
    [
        ("ALTER TABLE ticks DROP PARTITION WHERE ts < '2000-01-01T00:00:00.000000Z'", "no partitions matched"),
        ("ALTER TABLE ticks DROP PARTITION WHERE price < '2'", "designated timestamp"),
        ("ALTER TABLE tradingstack_owners DROP PARTITION WHERE ts < '2000-01-01'", "not partitioned"),
        ("ALTER TABLE ticks DROP PARTITION WHERE ts = '2030-01-01T10:00:00.000000Z'", "unsupported statement"),
    ],
)  # fmt: skip
def test_the_double_refuses_partition_drops_as_questdb_does(qdb: QuestDBDouble, sql: str, error: str) -> None:
    provisioner = QuestDBProvisioner(qdb.url)
    provisioner.reconcile(plan_for())
    provisioner.write_ilp([_tick_line(int(datetime.now(UTC).timestamp() * 1_000_000), "now")])
    mutations = list(qdb.state.mutations)
    with pytest.raises(QuestDBError, match=error):
        provisioner.query(sql)
    assert qdb.state.mutations == mutations


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def test_a_redis_database_belongs_to_one_stack(redis_server: RedisServer) -> None:
    """Every key the services keep (orders, resting orders, positions, the event publishers' group)
    lives in the stack's Redis database: a second stack on the same one is refused with the reason
    (its exeq would fill the first stack's orders), one on another database of that Redis is not."""
    spec = {"infrastructure": {"redis": {"url": redis_server.url}}}
    ours = build_plan(StackRef("demo", "ns", uid="u-1"), parse_spec(spec))
    theirs = build_plan(StackRef("other", "team-b", uid="u-2"), parse_spec(spec))
    provisioner = RedisProvisioner(redis_server.url)
    first = provisioner.reconcile(ours)
    assert first.ok
    assert [c.action for c in first.changes] == ["create"]
    assert provisioner.reconcile(ours).changes == []  # its own: nothing to do again
    shared = provisioner.reconcile(theirs)
    assert {(p.kind, p.reason) for p in shared.problems} == {("Redis", "OwnedByAnotherStack")}
    assert "ns/demo" in shared.problems[0].message
    assert RedisProvisioner(redis_server.url.replace("/0", "/1")).reconcile(theirs).ok
    assert provisioner.delete(theirs) == []  # the other stack never releases ours
    client = redis.Redis.from_url(redis_server.url)
    client.set("tradingstack:order:o-1", "{}")  # what the services keep
    assert [c.action for c in provisioner.delete(ours)] == ["delete"]
    assert client.keys("tradingstack:*") == []  # a stack made next on this database starts empty
    assert provisioner.reconcile(theirs).ok  # free again
    away = RedisProvisioner(f"redis://127.0.0.1:{free_port()}/0", timeout=1)
    assert backends.run(away, ours).unreachable is not None


def test_a_lake_another_stack_made_is_refused_unless_shared_on_purpose(lake: tuple[S3Endpoint, Plan]) -> None:
    """Two stacks on one bucket: the second finds the Delta tables taken (OwnedByAnotherStack), as with
    streams and QuestDB tables, unless its spec says `lake.shared: true` (its sinks keep their commits
    apart by stream identity); deletion removes only what a stack made."""
    endpoint, ours = lake
    spec = ours.spec.model_dump(by_alias=True, exclude_none=True)
    theirs = build_plan(StackRef("other", "team-b"), parse_spec(spec))
    sharing = build_plan(StackRef("other", "team-b"), parse_spec({**spec, "lake": {"shared": True}}))
    provisioner = S3Provisioner(endpoint, CREDS)
    assert provisioner.reconcile(ours).ok
    refused = provisioner.reconcile(theirs)
    assert {(p.kind, p.reason) for p in refused.problems} == {("DeltaTable", "OwnedByAnotherStack")}
    assert {p.name for p in refused.problems} == {f"{endpoint.bucket}/{t.path}" for t in LAKE_TABLES}
    assert "ns/demo" in refused.problems[0].message
    assert "lake.shared" in refused.problems[0].message
    assert provisioner.reconcile(sharing).ok
    assert [c for c in provisioner.delete(sharing) if c.kind == "DeltaTable"] == []  # not theirs to delete
    # ptrc's reports replace a day's rows in place: that table is never shared.
    with_reports = {"services": {"ptrc": {"enabled": True}}}
    assert provisioner.reconcile(plan_for({**spec, **with_reports})).ok
    sharing_reports = parse_spec({**spec, **with_reports, "lake": {"shared": True}})
    refused = provisioner.reconcile(build_plan(StackRef("other", "team-b"), sharing_reports))
    assert {p.name for p in refused.problems} == {f"{endpoint.bucket}/lake/reports"}
