"""The seeds' own requests give the seeds' answers: risk's example, /health, the tickers' shape,
tick timestamps, the lake's trade columns, and every service run by hand with only the
infrastructure's addresses set, as a docker-compose user ran them.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from deltalake import DeltaTable

from questdb_double import QuestDBDouble
from tradingstack.api import DEFAULT_PORTS, OPT_IN_SERVICES, ServiceName
from tradingstack.backends import S3Credentials
from tradingstack.backends.jetstream import JetStreamProvisioner
from tradingstack.backends.questdb import QuestDBProvisioner
from tradingstack.backends.s3 import S3Provisioner
from tradingstack.lake import MARKET_TICKS
from tradingstack.plan import StackRef, build_plan, durable_name, parse_spec
from tradingstack_services.marketdata import gateway
from tradingstack_services.marketdata.gateway import Rolling24h
from tradingstack_services.marketdata.ticks import parse_tick, tick_json
from tradingstack_services.platform import runner
from tradingstack_services.platform.settings import ServiceSettings
from tradingstack_services.trading import risk

from conftest import LiveServer, NatsServer, RedisServer, free_port, http_json, wait_for
from test_live import VenueServer
from test_trading_e2e import Platform, platform  # noqa: F401 (a fixture)

SEEDS_RISK_EXAMPLE = {"symbol": "BTCUSDT", "quantity": 0.1, "side": "buy"}
TICKER_SHAPE = {"symbol", "last_price", "bid", "ask", "volume_24h", "change_24h", "timestamp"}


def answered(response: tuple[int, Any], good: Any) -> Any:
    """The body of a 200 answer that `good` accepts, else None (to wait for)."""
    status, body = response
    return body if status == 200 and good(body) else None


# 1. Risk values an order at the market.


def test_the_seeds_risk_example_is_approved_low_at_the_market_price(platform: Platform) -> None:
    platform.tick("BTCUSDT", 45_000.0, 44_999.0, 45_001.0)
    with platform.serve(ServiceName.RISK) as server:
        wait_for(lambda: server.get("/readyz")[0] == 200, 20, "risk ready")
        status, body = server.post("/check", SEEDS_RISK_EXAMPLE)
        assert (status, body["approved"], body["risk_level"]) == (200, True, "LOW"), body

        # Never ticked: a clear reason, not a guess.
        status, body = server.post("/check", {**SEEDS_RISK_EXAMPLE, "symbol": "ETHUSDT"})
        assert (status, body["approved"]) == (200, False)
        assert "no market price for ETHUSDT" in body["reason"]

        # Once it ticks, it is valued there: a buy at the ask (the test's limit is 1,000,000 notional).
        platform.tick("ETHUSDT", 2_500.0, 2_499.0, 2_501.0)
        body = wait_for(lambda: answered(server.post("/check", {**SEEDS_RISK_EXAMPLE, "symbol": "ETHUSDT"}),
                                         lambda b: b["approved"]), 10, "ETHUSDT valued")  # fmt: skip
        assert body["risk_level"] == "LOW"


def test_a_market_order_is_valued_at_the_touch_for_its_side() -> None:
    quote = risk.Quote("BTCUSDT", last=100.0, bid=99.0, ask=101.0)
    buy = risk.CheckRequest(symbol="BTCUSDT", quantity=10, side="buy")
    sell = buy.model_copy(update={"side": "sell"})
    assert risk.at_market(buy, quote).price == 101.0  # type: ignore[union-attr]
    assert risk.at_market(sell, quote).price == 99.0  # type: ignore[union-attr]
    assert risk.at_market(sell, risk.Quote("BTCUSDT", last=100.0)).price == 100.0  # type: ignore[union-attr]
    assert risk.at_market(buy.model_copy(update={"price": 50.0}), quote).price == 50.0  # type: ignore[union-attr]
    assert risk.at_market(buy, None) is None
    # The valuation decides: 10 at the ask is 1,010 notional, over a 1,005 limit; at the bid it is not.
    limit = risk.RiskLimit(symbol="BTCUSDT", max_notional=1_005)
    assert not risk.check(risk.at_market(buy, quote), limit, 0.0).approved  # type: ignore[arg-type]
    assert risk.check(risk.at_market(sell, quote), limit, 0.0).approved  # type: ignore[arg-type]


# 2. The seeds' paths and shapes.


def test_health_answers_healthy_with_its_dependencies_and_503_without(platform: Platform) -> None:
    with platform.serve(ServiceName.RISK) as server:
        body = wait_for(lambda: answered(server.get("/health"), lambda _: True), 20, "risk healthy")
        assert body["status"] == "healthy"
        assert body["checks"]["redis"] == "ok"
        platform.redis.stop()
        status, body = wait_for(lambda: r if (r := server.get("/health"))[0] != 200 else None, 20, "unhealthy")
        assert status == 503
        assert body["status"] == "unhealthy"
        assert body["checks"]["redis"] != "ok"


def test_every_service_serves_the_seeds_health_path() -> None:
    for name, factory in runner._factories().items():
        app = factory(ServiceSettings(SERVICE_NAME=name))
        assert "/health" in {getattr(route, "path", "") for route in app.routes}, name


def test_tickers_have_the_seeds_shape_for_every_symbol_at_realistic_prices(nats_server: NatsServer) -> None:
    settings = ServiceSettings(SERVICE_NAME="gateway", NATS_URL=nats_server.url, TICK_RATE=20,
                               SYMBOLS="BTCUSDT,ETHUSDT,SOLUSDT,NEWCOIN", MOCK_START_PRICES="NEWCOIN=3.5")  # fmt: skip
    with LiveServer(gateway.create(settings)) as server:
        tickers = wait_for(lambda: answered(server.get("/tickers"), lambda t: all(x["last_price"] for x in t)),
                           10, "every symbol ticked")  # fmt: skip
        assert [t["symbol"] for t in tickers] == ["BTCUSDT", "ETHUSDT", "SOLUSDT", "NEWCOIN"]
        now_ms = time.time() * 1000
        for ticker in tickers:
            assert set(ticker) == TICKER_SHAPE
            assert ticker["bid"] < ticker["last_price"] < ticker["ask"]
            assert ticker["volume_24h"] > 0
            assert abs(ticker["change_24h"]) < 5
            assert now_ms - 10_000 < ticker["timestamp"] <= now_ms + 1
        prices = {t["symbol"]: t["last_price"] for t in tickers}
        assert 40_000 < prices["BTCUSDT"] < 50_000
        assert 2_000 < prices["ETHUSDT"] < 3_000
        assert 3 < prices["NEWCOIN"] < 4
        status, one = server.get("/ticker/btcusdt")
        assert status == 200
        assert set(one) == TICKER_SHAPE
        assert one["symbol"] == "BTCUSDT"
        assert server.get("/ticker/NOPE")[0] == 404


def test_a_bad_start_price_is_refused_naming_the_setting() -> None:
    for bad in ("BTCUSDT=-1", "BTCUSDT=nan", "BTCUSDT", "=5"):
        with pytest.raises(ValueError, match="MOCK_START_PRICES"):
            ServiceSettings(SERVICE_NAME="gateway", MOCK_START_PRICES=bad)


def test_the_24h_window_sums_volume_and_measures_change_from_its_oldest_minute() -> None:
    window, t0 = Rolling24h(), 1_767_000_000.0
    window.add(t0, 100.0, 1.0)
    window.add(t0 + 30, 104.0, 0.5)  # same minute: its first price stays 100
    window.add(t0 + 23 * 3600, 110.0, 2.0)
    assert window.summary(t0 + 23 * 3600, 110.0) == (3.5, pytest.approx(10.0))
    window.add(t0 + 25 * 3600, 121.0, 1.0)  # the first minute left the window
    assert window.summary(t0 + 25 * 3600, 121.0) == (3.0, pytest.approx(10.0))
    assert window.summary(t0 + 50 * 3600, 121.0) == (0.0, 0.0)  # nothing traded for a day
    assert len(window.buckets) == 0


def test_ticks_carry_the_seeds_epoch_millisecond_timestamp_and_trade_fields() -> None:
    raw = {"symbol": "btcusdt", "timestamp": 1767346200123, "price": 45000.5, "side": "SELL", "trade_id": 981,
           "source_seq": 7}  # fmt: skip
    tick = parse_tick(json.dumps(raw).encode())
    body = json.loads(tick_json(tick))
    assert body["timestamp"] == 1767346200123
    assert body["event_ts"].startswith("2026-01-02T09:30:00.123")
    assert (body["side"], body["trade_id"], body["source_seq"]) == ("sell", "981", 7)
    assert parse_tick(tick_json(tick)) == tick  # what is emitted reads back the same
    for bad in ({"side": "up"}, {"source_seq": -1}, {"source_seq": 2**64}, {"trade_id": "x" * 200}):
        with pytest.raises(ValueError, match="invalid_tick"):
            parse_tick(json.dumps({**raw, **bad}).encode())


def test_the_lake_keeps_side_trade_id_and_source_seq_and_an_older_table_gains_them(s3_url: str) -> None:
    bucket = f"seeds-{uuid.uuid4().hex[:8]}"
    spec = parse_spec({"infrastructure": {"s3": {"endpoint": s3_url, "allowHttp": True, "bucket": bucket}}})
    plan = build_plan(StackRef("seeds", "ns"), spec)
    s3 = S3Provisioner(spec.infrastructure.s3, S3Credentials("testing", "testing-secret"))
    assert s3.reconcile(plan).ok
    sink_settings = ServiceSettings(SERVICE_NAME="sink-ticks", S3_ENDPOINT_URL=s3_url, AWS_ALLOW_HTTP=True,
                                    AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing-secret")  # fmt: skip
    options = sink_settings.storage_options()
    fields = {f.name: f for f in DeltaTable(MARKET_TICKS.uri(bucket), storage_options=options).schema().fields}
    assert {"side", "trade_id", "source_seq"} <= set(fields)
    assert all(fields[name].nullable for name in ("side", "trade_id", "source_seq"))

    # A table from before these columns existed: the provisioner adds them, rows already there keep nulls.
    old_bucket = f"seeds-old-{uuid.uuid4().hex[:8]}"
    old_spec = parse_spec({"infrastructure": {"s3": {"endpoint": s3_url, "allowHttp": True, "bucket": old_bucket}}})
    old_plan = build_plan(StackRef("seeds", "ns"), old_spec)
    s3_old = S3Provisioner(old_spec.infrastructure.s3, S3Credentials("testing", "testing-secret"))
    import pyarrow as pa

    older = pa.schema([f for f in MARKET_TICKS.schema if f.name not in ("side", "trade_id", "source_seq")])
    s3_old.reconcile(old_plan)  # the bucket (and a current table, replaced below by an older one)
    uri = MARKET_TICKS.uri(old_bucket)
    DeltaTable.create(uri, older, partition_by=list(MARKET_TICKS.partition_by), storage_options=options,
                      mode="overwrite", description=old_plan.stack.owner)  # fmt: skip
    result = s3_old.reconcile(old_plan)
    assert result.ok
    assert any("add columns side, trade_id, source_seq" in c.detail for c in result.changes), result.changes
    names = {f.name for f in DeltaTable(uri, storage_options=options).schema().fields}
    assert {"side", "trade_id", "source_seq"} <= names


# 3. Every service runs by hand with defaults.


def test_a_service_run_by_hand_reads_what_the_plan_would_give_it() -> None:
    settings = ServiceSettings(SERVICE_NAME="exeq")
    stack = StackRef("tradingstack", "default")
    assert settings.NATS_STREAM == "ORDERS"
    assert durable_name(stack, ServiceName.EXEQ) == settings.NATS_DURABLE
    assert settings.NATS_FILTER_SUBJECT == "orders.routed.>"
    # And exactly what the operator's ConfigMap would say for a stack of that name.
    workload = next(w for w in build_plan(stack, parse_spec({})).workloads if w.service == ServiceName.EXEQ)
    assert {k: workload.config[k] for k in ("NATS_STREAM", "NATS_DURABLE", "NATS_FILTER_SUBJECT")} == {
        "NATS_STREAM": settings.NATS_STREAM, "NATS_DURABLE": settings.NATS_DURABLE,
        "NATS_FILTER_SUBJECT": settings.NATS_FILTER_SUBJECT}  # fmt: skip
    # Another stack name moves the durable with it.
    assert ServiceSettings(SERVICE_NAME="exeq", STACK_NAME="desk").NATS_DURABLE == "default_desk_exeq"
    assert ServiceSettings(SERVICE_NAME="risk").NATS_STREAM is None  # risk reads no stream


def _cli() -> list[str]:
    return [str(Path(sys.executable).parent / "tradingstack")]


def _bare_env(**extra: str) -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "TMPDIR")
    return {**{k: v for k, v in os.environ.items() if k in keep}, **extra}


def test_service_help_lists_every_setting_with_its_default_for_that_service() -> None:
    done = subprocess.run([*_cli(), "service", "exeq", "--help"], env=_bare_env(NATS_STREAM="SET_HERE"),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    for field in ServiceSettings.model_fields:
        if field != "SERVICE_NAME":
            assert f"  {field} " in done.stdout, field
    lines = {line.split()[0]: line for line in done.stdout.splitlines() if line.startswith("  ")}
    assert "[ORDERS]" in lines["NATS_STREAM"]  # the default, not what the environment set
    assert f"[{DEFAULT_PORTS[ServiceName.EXEQ]}]" in lines["PORT"]
    assert "[default_tradingstack_exeq]" in lines["NATS_DURABLE"]
    assert "[(unset)]" in lines["NATS_PASSWORD"]


def test_a_bad_setting_stops_the_service_at_start_with_its_name_and_exit_code_2() -> None:
    for variable, value in (("PORT", "eighty"), ("NATS_MAX_DELIVER", "1"), ("MOCK_START_PRICES", "BTC=x")):
        done = subprocess.run([*_cli(), "service", "gateway"], env=_bare_env(**{variable: value}),
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 2, (variable, done.stderr)
        assert variable in done.stderr
        assert value not in done.stderr or variable == "MOCK_START_PRICES"  # values are never echoed...
    # ...which matters for a secret's.
    done = subprocess.run([*_cli(), "service", "gateway"], env=_bare_env(S3_MAX_RETRIES="hunter2-secret"),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert "S3_MAX_RETRIES" in done.stderr
    assert "hunter2" not in done.stderr
    done = subprocess.run([*_cli(), "service", "nope"], env=_bare_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "known:" in done.stderr


@dataclass
class Servers:
    nats: NatsServer
    redis: RedisServer
    questdb: QuestDBDouble
    s3_url: str
    bucket: str


@pytest.fixture
def by_hand(tmp_path: Path, s3_url: str) -> Iterator[Servers]:
    """The servers, provisioned once as a docker-compose user would (`tradingstack provision` of a
    stack called "tradingstack" in "default": the names the services default to)."""
    nats_server, redis_server = NatsServer(tmp_path / "js"), RedisServer(tmp_path / "redis")
    nats_server.start()
    redis_server.start()
    bucket = f"hand-{uuid.uuid4().hex[:8]}"
    with QuestDBDouble() as qdb:
        every_service = {service.value: {"enabled": True} for service in OPT_IN_SERVICES}
        spec = parse_spec({"services": every_service, "infrastructure": {
            "nats": {"url": nats_server.url}, "redis": {"url": redis_server.url}, "questdb": {"url": qdb.url},
            "s3": {"endpoint": s3_url, "allowHttp": True, "bucket": bucket}}})  # fmt: skip
        plan = build_plan(StackRef("tradingstack", "default"), spec)
        assert JetStreamProvisioner(nats_server.url).reconcile(plan).ok
        assert QuestDBProvisioner(qdb.url).reconcile(plan).ok
        assert S3Provisioner(spec.infrastructure.s3, S3Credentials("testing", "testing-secret")).reconcile(plan).ok
        yield Servers(nats_server, redis_server, qdb, s3_url, bucket)
    redis_server.stop()
    nats_server.stop()


def test_every_service_runs_by_hand_with_only_the_infrastructure_addresses_set(by_hand: Servers) -> None:
    infrastructure = {
        "NATS_URL": by_hand.nats.url, "REDIS_URL": by_hand.redis.url, "QUESTDB_URL": by_hand.questdb.url,
        "S3_ENDPOINT_URL": by_hand.s3_url, "S3_BUCKET": by_hand.bucket, "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret", "LOG_FORMAT": "text",
    }  # fmt: skip
    names = sorted(runner._factories())
    # PORT only because the seed ports may be taken on a test machine; nothing else is set, but for
    # the live gateway the venue's address (a local server speaking Binance's format).
    ports = {name: free_port() for name in names}
    quotes = [json.dumps({"stream": f"{s.lower()}@bookTicker", "data": {"u": 1, "s": s, "b": "1.0", "B": "1",
                                                                         "a": "1.1", "A": "1"}})
              for s in ServiceSettings(SERVICE_NAME="gateway").symbols]  # type: ignore[call-arg]  # fmt: skip
    with contextlib.ExitStack() as stack:
        venue = stack.enter_context(VenueServer([quotes] * 10))
        for name in names:
            extra = {"LIVE_WS_URL": venue.url} if name == ServiceName.LIVE.value else {}
            env = _bare_env(**infrastructure, **extra, PORT=str(ports[name]))
            process = subprocess.Popen([*_cli(), "service", name], env=env, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)  # fmt: skip
            stack.callback(process.wait, 30)
            stack.callback(process.terminate)
        for name in names:
            url = f"http://127.0.0.1:{ports[name]}/health"
            body = wait_for(lambda url=url: answered(http_json(url), lambda _: True), 60, f"{name} healthy")
            assert body["status"] == "healthy", (name, body)
