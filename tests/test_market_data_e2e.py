"""Market data end to end on real servers: gateway -> nats-server (JetStream) -> sink -> Delta on S3.

The streams, consumer, bucket and Delta table come from the operator's own provisioners,
as they would in a cluster. The sink is killed with SIGKILL mid-run and restarted: the
table must end with every tick exactly once.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pyarrow as pa
import pytest
from deltalake import DeltaTable, QueryBuilder
from nats.aio.msg import Msg
from nats.js import api as js_api

from tradingstack.api import ServiceName
from tradingstack.backends import S3Credentials
from tradingstack.backends.jetstream import JetStreamProvisioner
from tradingstack.backends.s3 import S3Provisioner
from tradingstack.lake import ALT_DATA, MARKET_TICKS
from tradingstack.plan import Plan, StackRef, build_plan, durable_name, parse_spec
from tradingstack_services.marketdata import gateway, sink
from tradingstack_services.marketdata.sink import COMMIT_FAILURES, DEAD, LakeSink, alt_row, tick_row
from tradingstack_services.marketdata.ticks import InvalidMessageError
from tradingstack_services.platform.settings import ServiceSettings

from conftest import LiveServer, NatsServer, free_port, wait_for
from faults import FaultyProxy

CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret"}


@pytest.fixture
def platform(tmp_path: Path, s3_url: str) -> Iterator[tuple[NatsServer, Plan, dict[str, str]]]:
    """A fresh nats-server and bucket, provisioned by the operator's provisioners."""
    server = NatsServer(tmp_path / "js")
    server.start()
    bucket = f"md-{uuid.uuid4().hex[:10]}"
    spec = {"infrastructure": {"nats": {"url": server.url}, "s3": {"endpoint": s3_url, "allowHttp": True,
                                                                    "bucket": bucket}}}  # fmt: skip
    plan = build_plan(StackRef("e2e", "ns"), parse_spec(spec))
    assert JetStreamProvisioner(server.url).reconcile(plan).ok
    assert S3Provisioner(plan.spec.infrastructure.s3, S3Credentials(**_creds_args())).reconcile(plan).ok
    env = {
        "SERVICE_NAME": "sink-ticks", "NATS_URL": server.url, "S3_ENDPOINT_URL": s3_url, "S3_BUCKET": bucket,
        "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1", "NATS_STREAM": "MARKET_TICKS",
        "NATS_DURABLE": durable_name(plan.stack, ServiceName.SINK_TICKS), "NATS_FILTER_SUBJECT": "market.tick.>",
        "SYMBOLS": "BTCUSDT,ETHUSDT",
        **CREDS,
    }  # fmt: skip
    yield server, plan, env
    server.stop()


def _creds_args() -> dict[str, str]:
    return {"access_key_id": CREDS["AWS_ACCESS_KEY_ID"], "secret_access_key": CREDS["AWS_SECRET_ACCESS_KEY"]}


def settings_from(env: dict[str, str], **extra: str) -> ServiceSettings:
    return ServiceSettings(**{**env, **extra})  # type: ignore[arg-type]


def lake_rows(settings: ServiceSettings) -> list[dict[str, Any]]:
    table = DeltaTable(f"s3://{settings.S3_BUCKET}/{MARKET_TICKS.path}", storage_options=settings.storage_options())
    result = QueryBuilder().register("ticks", table).execute("SELECT tick_id, symbol, price, stream_seq FROM ticks")
    return [dict(zip(["tick_id", "symbol", "price", "stream_seq"], row, strict=True))
            for batch in result for row in zip(*(c.to_pylist() for c in batch.columns), strict=True)]  # fmt: skip


def replay_file(path: Path, count: int) -> tuple[Path, dict[str, float]]:
    feed = gateway.MockFeed(["BTCUSDT", "ETHUSDT"], seed=7)
    prices, lines = {}, []
    for i in range(count):
        tick = feed.tick("BTCUSDT" if i % 2 else "ETHUSDT")
        prices[tick.tick_id] = tick.price
        lines.append(tick.model_dump_json())
    lines.insert(3, '{"symbol": "BTCUSDT", "price": "not a number", "timestamp": 1}')  # rejected at the gateway
    path.write_text("\n".join(lines) + "\n")
    return path, prices


async def publish_raw(url: str, subject: str, payloads: list[bytes]) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for payload in payloads:
            await js.publish(subject, payload)
    finally:
        await nc.close()


async def run_sink(url: str, sink: LakeSink, rows: int, within: float) -> LakeSink:
    """Run a sink in this process until it has committed `rows` rows (or `within` seconds passed), then stop it."""
    nc = await nats.connect(url)
    stop = asyncio.Event()
    task = asyncio.create_task(sink.run(nc, stop))
    deadline = time.monotonic() + within
    while sink.rows_committed < rows and time.monotonic() < deadline:  # noqa: ASYNC110 (polls a counter)
        await asyncio.sleep(0.1)
    stop.set()
    await task
    await nc.close()
    return sink


def test_ticks_land_in_delta_once_and_bad_ones_in_the_dead_letter_stream(platform: Any, tmp_path: Path) -> None:
    server, _, env = platform
    settings = settings_from(env, SINK_MAX_AGE_SECONDS="0.3")
    path, prices = replay_file(tmp_path / "ticks.jsonl", 2_000)

    async def scenario() -> None:
        nc = await nats.connect(server.url)
        sent = await gateway.Gateway(settings_from(env, SERVICE_NAME="gateway")).replay(nc, path)
        assert sent == 2_000
        # The same file again: the stream drops every duplicate by Nats-Msg-Id.
        await gateway.Gateway(settings_from(env, SERVICE_NAME="gateway")).replay(nc, path)
        await nc.close()
        await publish_raw(server.url, "market.tick.BTCUSDT", [b"{oops", b'{"symbol": "BTCUSDT", "price": -5}'])
        # A well-formed tick of a symbol the stack does not list: one file more per commit for ever (the
        # lake is partitioned by symbol), so it is refused, not written.
        await publish_raw(server.url, "market.tick.ZZZUSDT",
                          [b'{"symbol": "ZZZUSDT", "price": 1.5, "timestamp": 1767346200000}'])  # fmt: skip

        await run_sink(server.url, LakeSink(settings, MARKET_TICKS, tick_row), rows=2_000, within=60)

    asyncio.run(scenario())
    rows = lake_rows(settings)
    assert len(rows) == 2_000
    assert len({r["tick_id"] for r in rows}) == 2_000
    assert all(prices[r["tick_id"]] == r["price"] for r in rows)

    async def dead_letters() -> list[Any]:
        nc = await nats.connect(server.url)
        sub = await nc.jetstream().pull_subscribe("dlq.>", durable="inspect", stream="DEAD_LETTER")
        msgs = await sub.fetch(10, timeout=2)
        await nc.close()
        return msgs

    letters = asyncio.run(dead_letters())
    assert sorted(m.headers["Tradingstack-Reason"] for m in letters) == ["invalid_tick", "not_json", "unknown_symbol"]
    assert {m.subject for m in letters} == {"dlq.MARKET_TICKS.invalid_tick", "dlq.MARKET_TICKS.not_json",
                                            "dlq.MARKET_TICKS.unknown_symbol"}  # fmt: skip
    assert {m.headers["Tradingstack-Subject"] for m in letters} == {"market.tick.BTCUSDT", "market.tick.ZZZUSDT"}


def test_a_sink_killed_mid_batch_loses_nothing_and_duplicates_nothing(platform: Any, tmp_path: Path) -> None:
    server, _, env = platform
    count = 20_000
    path, _ = replay_file(tmp_path / "ticks.jsonl", count)

    async def setup() -> None:
        nc = await nats.connect(server.url)
        # Redeliver quickly in the test: the operator's 30 s ack wait would only slow it down.
        config = js_api.ConsumerConfig(
            durable_name=env["NATS_DURABLE"],
            filter_subject="market.tick.>",
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=2,
            max_ack_pending=50_000,
        )
        await nc.jsm().add_consumer("MARKET_TICKS", config)
        await gateway.Gateway(settings_from(env, SERVICE_NAME="gateway")).replay(nc, path)
        await nc.close()

    asyncio.run(setup())
    sink_env = {**os.environ, **env, "PORT": str(free_port()), "SINK_MAX_ROWS": "1500",
                "SINK_FETCH_BATCH": "500", "SINK_MAX_AGE_SECONDS": "0.2"}  # fmt: skip
    command = [sys.executable, "-m", "tradingstack.cli", "service", "sink-ticks"]
    settings = settings_from(env)

    def committed() -> int:
        try:
            return len(lake_rows(settings))
        except Exception:
            return 0

    for _ in range(2):  # two hard kills while batches are in flight
        sink = subprocess.Popen(command, env=sink_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start = committed()
        wait_for(lambda start=start: committed() > start, 60, "a commit before the kill")
        sink.send_signal(signal.SIGKILL)
        sink.wait(10)
    log = (tmp_path / "sink.log").open("wb")
    sink = subprocess.Popen(command, env=sink_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            wait_for(lambda: committed() >= count, 120, f"all {count} ticks committed")
        except AssertionError:
            print("SINKLOG", (tmp_path / "sink.log").read_text()[-5000:], committed())
            raise
        time.sleep(3)  # past the ack wait: any redelivery would show up as a duplicate now
        rows = lake_rows(settings)
    finally:
        sink.terminate()
        sink.wait(30)
    assert len(rows) == count
    assert len({r["tick_id"] for r in rows}) == count
    assert len({r["stream_seq"] for r in rows}) == count


def test_readyz_follows_nats(platform: Any) -> None:
    server, _, env = platform
    app = gateway.create(settings_from(env, SERVICE_NAME="gateway", TICK_RATE="5"))
    with LiveServer(app) as client:
        assert client.get("/healthz")[1]["status"] == "ok"
        wait_for(lambda: client.get("/readyz")[0] == 200, 10, "ready with NATS up")
        wait_for(lambda: client.get("/ticker/BTCUSDT")[0] == 200, 10, "a first tick")
        assert client.get("/ticker/NOPE")[0] == 404
        assert {t["symbol"] for t in client.get("/tickers")[1]} == {"BTCUSDT", "ETHUSDT"}

        server.stop()
        _, body = wait_for(lambda: (r := client.get("/readyz"))[0] == 503 and r, 10, "503 with NATS down")
        assert body["checks"]["nats"] != "ok"
        assert client.get("/healthz")[0] == 200  # alive, just not ready

        server.start()
        wait_for(lambda: client.get("/readyz")[0] == 200, 20, "ready again with NATS back")
        assert "tradingstack_gateway_ticks_published_total" in client.get("/metrics")[1]


def test_an_unknown_service_says_which_exist() -> None:
    result = subprocess.run([sys.executable, "-m", "tradingstack.cli", "service", "omz"],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 2
    assert "unknown service 'omz'" in result.stderr
    assert "oms" in result.stderr


def test_alt_data_lands_in_its_own_table(platform: Any) -> None:
    server, _, env = platform
    settings = settings_from(env, SERVICE_NAME="sink-alt", NATS_STREAM="ALT_DATA",
                             NATS_DURABLE=durable_name(_.stack, ServiceName.SINK_ALT),
                             NATS_FILTER_SUBJECT="alt.norm.>", SINK_MAX_AGE_SECONDS="0.3")  # fmt: skip
    records = [
        json.dumps({"record_id": f"r{i}", "event_ts": "2026-01-02T09:30:00Z", "source": "news", "symbol": "aapl",
                    "kind": "sentiment", "value": i / 10, "payload": {"headline": f"h{i}"}}).encode()
        for i in range(50)
    ]  # fmt: skip
    records.append(b'{"symbol": "AAPL"}')  # no source, no timestamp
    asyncio.run(publish_raw(server.url, "alt.norm.news", records))

    sink = asyncio.run(run_sink(server.url, LakeSink(settings, ALT_DATA, alt_row), rows=50, within=30))
    assert sink.rows_committed == 50
    dead = [s.value for m in DEAD.collect() for s in m.samples
            if s.name.endswith("_total") and s.labels == {"table": "alt_data", "reason": "invalid_alt"}]  # fmt: skip
    assert dead == [1.0]
    table = DeltaTable(f"s3://{settings.S3_BUCKET}/{ALT_DATA.path}", storage_options=settings.storage_options())
    result = QueryBuilder().register("alt", table).execute("SELECT symbol, count(*) AS n FROM alt GROUP BY symbol")
    rows = [row for batch in result for row in zip(*(c.to_pylist() for c in batch.columns), strict=True)]
    assert rows == [("AAPL", 50)]


def _ticks(first: int, count: int, symbol: str = "BTCUSDT") -> list[bytes]:
    return [json.dumps({"tick_id": f"t-{i}", "symbol": symbol, "price": 100 + i % 7, "size": 1,
                        "timestamp": 1767346200000 + i}).encode() for i in range(first, first + count)]  # fmt: skip


def test_a_sink_rides_out_s3_errors_and_stalls_without_loss_or_duplicates(platform: Any) -> None:
    server, _, env = platform
    with FaultyProxy(env["S3_ENDPOINT_URL"], stall_seconds=3) as proxy:
        # delta-rs's own retries give up after a second, so the faults reach the sink's retry loop.
        settings = settings_from(env, S3_ENDPOINT_URL=proxy.url, SINK_MAX_AGE_SECONDS="0.2", S3_MAX_RETRIES="1",
                                 S3_RETRY_TIMEOUT_SECONDS="1")  # fmt: skip
        sink = LakeSink(settings, MARKET_TICKS, tick_row)
        failures_before = COMMIT_FAILURES.labels("market_ticks")._value.get()

        async def until(check: Any, within: float, what: str) -> None:
            deadline = time.monotonic() + within
            while not check():
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                await asyncio.sleep(0.1)

        async def scenario() -> None:
            nc = await nats.connect(server.url)
            stop = asyncio.Event()
            task = asyncio.create_task(sink.run(nc, stop))
            await publish_raw(server.url, "market.tick.BTCUSDT", _ticks(0, 500))
            await until(lambda: sink.rows_committed >= 500, 30, "the first 500 committed")
            proxy.set("error")  # S3 answers 500 to everything
            await publish_raw(server.url, "market.tick.BTCUSDT", _ticks(500, 500))
            await until(lambda: COMMIT_FAILURES.labels("market_ticks")._value.get() > failures_before, 30,
                        "a commit failing")  # fmt: skip
            await asyncio.sleep(3)
            proxy.set("stall")  # then it hangs
            await asyncio.sleep(4)
            assert not task.done(), "the sink worker died on S3 errors"
            proxy.set("pass")
            await publish_raw(server.url, "market.tick.BTCUSDT", _ticks(1000, 500))
            await until(lambda: sink.rows_committed >= 1500, 60, "all 1,500 committed after S3 came back")
            stop.set()
            await task
            await nc.close()

        asyncio.run(scenario())
        assert COMMIT_FAILURES.labels("market_ticks")._value.get() > failures_before
    rows = lake_rows(settings_from(env))
    assert len(rows) == 1500
    assert {r["tick_id"] for r in rows} == {f"t-{i}" for i in range(1500)}
    assert len({r["stream_seq"] for r in rows}) == 1500


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b'{"event_ts": "2026-01-02T00:00:00Z", "symbol": "BTC", "source": "x", "value": "abc"}', "ValueError"),
        (b'{"event_ts": "2026-01-02T00:00:00Z", "symbol": "BTC", "source": "x", "value": NaN}', "finite"),
        (b'{"event_ts": "2026-01-02T00:00:00Z", "symbol": "BTC", "source": "x", "value": [1]}', "TypeError"),
        (b'{"event_ts": 1e20, "symbol": "BTC", "source": "x"}', "out of range"),
        (b'{"event_ts": "9999-01-01T00:00:00", "symbol": "BTC", "source": "x"}', "outside"),
        (b'{"symbol": "BTC", "source": "x"}', "KeyError"),
        (b"[1, 2]", "TypeError"),
        (b"\xff", "UnicodeDecodeError"),
        # The symbol becomes a partition directory: a long one fails every commit, a slash nests one.
        (b'{"event_ts": "2026-01-02T00:00:00Z", "symbol": "' + b"A" * 300 + b'", "source": "x"}', "symbol"),
        (b'{"event_ts": "2026-01-02T00:00:00Z", "symbol": "../BTC", "source": "x"}', "symbol"),
        (b'{"event_ts": "2026-01-02T00:00:00Z", "symbol": "BTC", "source": "' + b"s" * 300 + b'"}', "source"),
    ],
)
def test_bad_alt_records_are_invalid_messages_never_crashes(body: bytes, detail: str) -> None:
    with pytest.raises(InvalidMessageError) as caught:
        alt_row(Msg(_client=None, subject="alt.norm.x", data=body), 1)  # type: ignore[arg-type]
    assert caught.value.reason == "invalid_alt"
    assert detail in caught.value.detail


def test_a_sink_readiness_probe_costs_one_request_however_long_its_log(platform: Any, s3_url: str) -> None:
    """The kubelet probes every few seconds: reading the Delta log there (a request per commit since the
    last checkpoint, one commit a second) made /readyz time out on a busy table, and the sink unready."""
    from deltalake import write_deltalake

    _, _, env = platform
    with (
        FaultyProxy(s3_url) as proxy,
        LiveServer(sink.create_ticks(settings_from(env, S3_ENDPOINT_URL=proxy.url))) as app,
    ):
        wait_for(lambda: app.get("/readyz")[0] == 200, 30, "sink ready")

        def probe_cost() -> int:
            """Requests one probe makes: the least of three, as the sink's own worker shares the proxy."""
            costs = []
            for _ in range(3):
                before = proxy.requests()
                assert app.get("/readyz")[0] == 200
                costs.append(proxy.requests() - before)
            return min(costs)

        short_log = probe_cost()
        options = settings_from(env).storage_options()
        for _ in range(40):  # forty commits later
            write_deltalake(MARKET_TICKS.uri(env["S3_BUCKET"]), pa.Table.from_pylist([], schema=MARKET_TICKS.schema),
                            mode="append", storage_options=options)  # fmt: skip
        # At most two requests either way (the sink's own worker shares the proxy, so one reading may
        # catch one of its requests): reading the log would cost one per commit, forty more here.
        assert max(short_log, probe_cost()) <= 2


def test_a_sink_whose_commit_hangs_fails_liveness_so_the_kubelet_restarts_it(platform: Any, s3_url: str) -> None:
    """delta-rs was seen blocked in a table load for minutes behind a faulty S3 while the sink looked
    alive and ready: no message moved. A commit older than SINK_COMMIT_DEADLINE_SECONDS fails /healthz
    (the liveness probe), and /healthz is itself again once the commit ends."""
    server, _, env = platform
    with FaultyProxy(s3_url, stall_seconds=15) as proxy:
        settings = settings_from(env, S3_ENDPOINT_URL=proxy.url, SINK_COMMIT_DEADLINE_SECONDS="2",
                                 SINK_MAX_AGE_SECONDS="0.3")  # fmt: skip
        with LiveServer(sink.create_ticks(settings)) as app:
            wait_for(lambda: app.get("/readyz")[0] == 200, 30, "sink ready")
            assert app.get("/healthz")[0] == 200
            proxy.set("stall")
            tick = {"symbol": "BTCUSDT", "timestamp": 1767346200000, "price": 1.0, "tick_id": "hang-1"}
            asyncio.run(publish_raw(server.url, "market.tick.BTCUSDT", [json.dumps(tick).encode()]))
            _, body = wait_for(lambda: (r := app.get("/healthz"))[0] == 503 and r, 20, "liveness failing")
            assert "commit" in json.dumps(body)
            proxy.set("pass")
            wait_for(lambda: app.get("/healthz")[0] == 200, 90, "liveness back once the commit ended")


def test_a_recreated_consumer_replaying_the_stream_writes_nothing_twice(platform: Any, monkeypatch: Any) -> None:
    """The durable is deleted by hand and the operator makes it again: it delivers the whole stream anew.

    The sink must know every commit above the consumer's ack floor, however many commits ago
    (here more than its first look back), not only the latest few.
    """
    server, plan, env = platform
    monkeypatch.setattr(sink, "LOOKBACK_COMMITS", 2)
    settings = settings_from(env, SINK_MAX_ROWS="50", SINK_FETCH_BATCH="50", SINK_MAX_AGE_SECONDS="0.2")

    async def scenario() -> None:
        await publish_raw(server.url, "market.tick.BTCUSDT", _ticks(0, 300))
        first = await run_sink(server.url, LakeSink(settings, MARKET_TICKS, tick_row), rows=300, within=30)
        assert first.rows_committed == 300
        nc = await nats.connect(server.url)
        await nc.jsm().delete_consumer("MARKET_TICKS", env["NATS_DURABLE"])
        await nc.close()

    asyncio.run(scenario())
    assert JetStreamProvisioner(server.url).reconcile(plan).ok  # drift repair: the durable again, from the start
    again = asyncio.run(run_sink(server.url, LakeSink(settings, MARKET_TICKS, tick_row), rows=1, within=8))
    rows = lake_rows(settings_from(env))
    assert again.rows_committed == 0
    assert len(rows) == 300
    assert len({r["stream_seq"] for r in rows}) == 300


def test_a_stream_made_again_is_written_whole_though_its_sequences_repeat(platform: Any) -> None:
    """The stream is deleted and the operator makes it again (a lost volume, drift repair): its
    sequences start at 1 again, and the sink, restarted, must write every new message, not take
    them for the old incarnation's committed ones."""
    server, plan, env = platform
    settings = settings_from(env, SINK_MAX_ROWS="50", SINK_FETCH_BATCH="50", SINK_MAX_AGE_SECONDS="0.2")

    async def first_incarnation() -> None:
        await publish_raw(server.url, "market.tick.BTCUSDT", _ticks(0, 100))
        first = await run_sink(server.url, LakeSink(settings, MARKET_TICKS, tick_row), rows=100, within=30)
        assert first.rows_committed == 100
        nc = await nats.connect(server.url)
        await nc.jsm().delete_stream("MARKET_TICKS")
        await nc.close()

    asyncio.run(first_incarnation())
    assert JetStreamProvisioner(server.url).reconcile(plan).ok  # the stream and its durable again, empty
    asyncio.run(publish_raw(server.url, "market.tick.BTCUSDT", _ticks(100, 60)))
    again = asyncio.run(run_sink(server.url, LakeSink(settings, MARKET_TICKS, tick_row), rows=60, within=20))
    rows = lake_rows(settings_from(env))
    assert again.rows_committed == 60
    assert len(rows) == 160
    assert len({r["tick_id"] for r in rows}) == 160


def test_two_stacks_writing_one_table_never_skip_each_others_sequences(platform: Any) -> None:
    """Another stack's sink (its own NATS, the same bucket) commits sequences 1..80 to the table
    first; this stack's sink must still write its own 1..80."""
    server, plan, env = platform
    other = NatsServer(server.root.parent / "other-js")
    other.start()
    try:
        other_plan = build_plan(StackRef("other", "ns2"), plan.spec)
        assert JetStreamProvisioner(other.url).reconcile(other_plan).ok
        other_env = {**env, "NATS_URL": other.url, "STACK_NAME": "other", "STACK_NAMESPACE": "ns2",
                     "NATS_DURABLE": durable_name(other_plan.stack, ServiceName.SINK_TICKS)}  # fmt: skip
        quick = {"SINK_MAX_ROWS": "40", "SINK_FETCH_BATCH": "40", "SINK_MAX_AGE_SECONDS": "0.2"}
        theirs, ours = settings_from(other_env, **quick), settings_from(env, **quick)
        asyncio.run(publish_raw(other.url, "market.tick.BTCUSDT", _ticks(0, 80)))
        asyncio.run(run_sink(other.url, LakeSink(theirs, MARKET_TICKS, tick_row), rows=80, within=30))
        asyncio.run(publish_raw(server.url, "market.tick.ETHUSDT", _ticks(1000, 80, "ETHUSDT")))
        mine = asyncio.run(run_sink(server.url, LakeSink(ours, MARKET_TICKS, tick_row), rows=80, within=20))
    finally:
        other.stop()
    rows = lake_rows(settings_from(env))
    assert mine.rows_committed == 80
    assert len({r["tick_id"] for r in rows}) == 160


def test_a_record_no_commit_can_take_is_found_by_splitting_and_dead_lettered(platform: Any) -> None:
    """A row that passed its row maker but makes every commit of its batch fail (here a value the
    table's float column cannot take, which this row maker lets through): the batch is split until
    that row is found; it is dead-lettered with the commit's error, and every other row is written."""
    server, plan, env = platform
    settings = settings_from(env, SERVICE_NAME="sink-alt", NATS_STREAM="ALT_DATA",
                             NATS_DURABLE=durable_name(plan.stack, ServiceName.SINK_ALT),
                             NATS_FILTER_SUBJECT="alt.norm.>", SINK_MAX_AGE_SECONDS="0.3")  # fmt: skip

    def unchecked_row(msg: Msg, seq: int) -> dict[str, Any]:
        data = json.loads(msg.data)
        clean = Msg(_client=None, subject=msg.subject, data=json.dumps({**data, "value": 0}).encode())  # type: ignore[arg-type]
        return {**alt_row(clean, seq), "value": data["value"]}

    records = [json.dumps({"record_id": f"r{i}", "event_ts": "2026-01-02T09:30:00Z", "source": "news",
                           "symbol": "AAPL", "value": "many" if i == 17 else i}).encode()
               for i in range(40)]  # fmt: skip
    asyncio.run(publish_raw(server.url, "alt.norm.news", records))
    before = _dead_count("alt_data", "uncommittable")
    sink = asyncio.run(run_sink(server.url, LakeSink(settings, ALT_DATA, unchecked_row), rows=39, within=90))
    assert sink.rows_committed == 39
    assert _dead_count("alt_data", "uncommittable") == before + 1
    table = DeltaTable(f"s3://{settings.S3_BUCKET}/{ALT_DATA.path}", storage_options=settings.storage_options())
    result = QueryBuilder().register("alt", table).execute("SELECT record_id FROM alt")
    ids = sorted(v for batch in result for v in batch.column(0).to_pylist())
    assert ids == sorted(f"r{i}" for i in range(40) if i != 17)


def _dead_count(table: str, reason: str) -> float:
    return sum(s.value for m in DEAD.collect() for s in m.samples
               if s.name.endswith("_total") and s.labels == {"table": table, "reason": reason})  # fmt: skip


def test_a_running_sink_writes_a_stream_made_again_under_it(platform: Any) -> None:
    """The stream is deleted and made again while the sink runs: the new incarnation's sequences
    start at 1 again, and the sink (which remembers the old one's as committed) must write them."""
    server, plan, env = platform
    settings = settings_from(env, SINK_MAX_ROWS="50", SINK_FETCH_BATCH="50", SINK_MAX_AGE_SECONDS="0.2")

    async def scenario() -> int:
        nc = await nats.connect(server.url)
        sink = LakeSink(settings, MARKET_TICKS, tick_row)
        stop = asyncio.Event()
        task = asyncio.create_task(sink.run(nc, stop))
        try:
            await publish_raw(server.url, "market.tick.BTCUSDT", _ticks(0, 100))
            await _until(lambda: sink.rows_committed >= 100, 30)
            await nc.jsm().delete_stream("MARKET_TICKS")
            assert (await asyncio.to_thread(JetStreamProvisioner(server.url).reconcile, plan)).ok
            await publish_raw(server.url, "market.tick.BTCUSDT", _ticks(100, 60))
            await _until(lambda: sink.rows_committed >= 160, 30)
        finally:
            stop.set()
            await task
            await nc.close()
        return sink.rows_committed

    assert asyncio.run(scenario()) == 160
    rows = lake_rows(settings_from(env))
    assert len({r["tick_id"] for r in rows}) == len(rows) == 160


async def _until(check: Any, within: float) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)
