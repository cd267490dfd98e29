"""The trading path end to end on real nats-server and redis-server and the QuestDB double.

risk, oms, exeq and pnl run as their containers do (uvicorn, one app each), configured by
exactly the environment the operator's ConfigMaps give them (the plan's workload config),
on streams, consumers and tables made by the operator's provisioners.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import http.server
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
import redis
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from questdb_double import QuestDBDouble
from tradingstack.api import ServiceName
from tradingstack.backends.jetstream import JetStreamProvisioner
from tradingstack.backends.questdb import QuestDBProvisioner
from tradingstack.backends.s3 import S3Credentials, S3Provisioner
from tradingstack.plan import Plan, StackRef, build_plan, parse_spec, secret_env
from tradingstack_services.platform.settings import ServiceSettings
from tradingstack_services.trading import exeq, oms, pnl, risk
from tradingstack_services.trading.model import Order, OrderRequest, OrderStatus
from tradingstack_services.trading.orderstore import EVENTS_KEY, ORDER_KEY, UNROUTED_KEY, OrderStore, Stored

from conftest import LiveServer, NatsServer, RedisServer, wait_for

LIMITS = [{"symbol": "BTCUSDT", "maxQuantity": 10, "maxNotional": 1_000_000, "maxPosition": 10}]
FACTORIES: dict[ServiceName, Callable[[ServiceSettings], Any]] = {
    ServiceName.RISK: risk.create, ServiceName.OMS: oms.create, ServiceName.EXEQ: exeq.create,
    ServiceName.PNL: pnl.create,
}  # fmt: skip


@dataclass
class Platform:
    nats: NatsServer
    redis: RedisServer
    questdb: QuestDBDouble
    plan: Plan

    def settings(self, service: ServiceName) -> ServiceSettings:
        """What the operator's ConfigMap for this service sets, and nothing else."""
        workload = next(w for w in self.plan.workloads if w.service == service)
        return ServiceSettings(**workload.config)  # type: ignore[arg-type]

    def serve(self, service: ServiceName, **overrides: Any) -> LiveServer:
        return LiveServer(FACTORIES[service](self.settings(service).model_copy(update=overrides)))

    def serve_all(self, stack: contextlib.ExitStack, services: Iterable[ServiceName] = tuple(FACTORIES),
                  **overrides: Any) -> dict[ServiceName, LiveServer]:  # fmt: skip
        """The services up (settings as the operator sets them, plus `overrides`) and ready."""
        servers = {s: stack.enter_context(self.serve(s, **overrides)) for s in services}
        for service, server in servers.items():
            wait_for(lambda server=server: server.get("/readyz")[0] == 200, 20, f"{service.value} ready")
        return servers

    def run(self, work: Callable[[Any], Any]) -> Any:
        async def go() -> Any:
            nc = await nats.connect(self.nats.url)
            try:
                return await work(nc)
            finally:
                await nc.close()

        return asyncio.run(go())

    def tick(self, symbol: str, price: float, bid: float, ask: float, size: float | None = None) -> None:
        """A tick, stored by the tick stream (so services starting later are seeded from it)."""
        body = {"symbol": symbol, "timestamp": 1767346200000, "price": price, "bid": bid, "ask": ask}
        if size is not None:
            body["size"] = size
        self.run(lambda nc: nc.jetstream().publish(f"market.tick.{symbol}", json.dumps(body).encode()))

    def messages(self, stream: str) -> list[tuple[str, bytes]]:
        """Every message a stream holds, as (subject, data)."""

        async def read(nc: Any) -> list[tuple[str, bytes]]:
            js = nc.jetstream()
            state = (await js.stream_info(stream)).state
            seqs = range(state.first_seq, state.last_seq + 1) if state.messages else range(0)
            return [(m.subject, m.data) for m in [await js.get_msg(stream, seq) for seq in seqs]]

        result: list[tuple[str, bytes]] = self.run(read)
        return result


@contextlib.contextmanager
def running_platform(tmp_path: Path, s3_url: str | None = None, **spec: Any) -> Iterator[Platform]:
    """Real servers, with the streams and tables (and with `s3_url`, the lake) the operator's
    provisioners make for `spec`."""
    nats_server, redis_server = NatsServer(tmp_path / "js"), RedisServer(tmp_path / "redis")
    nats_server.start()
    redis_server.start()
    try:
        with QuestDBDouble() as qdb:
            spec["infrastructure"] = {"nats": {"url": nats_server.url}, "redis": {"url": redis_server.url},
                                      "questdb": {"url": qdb.url}}  # fmt: skip
            if s3_url is not None:
                spec["infrastructure"]["s3"] = {"endpoint": s3_url, "allowHttp": True,
                                                "bucket": f"e2e-{uuid.uuid4().hex[:8]}"}  # fmt: skip
            plan = build_plan(StackRef("e2e", "ns"), parse_spec(spec))
            assert JetStreamProvisioner(nats_server.url).reconcile(plan).ok
            assert QuestDBProvisioner(qdb.url).reconcile(plan).ok
            if s3_url is not None:
                lake = S3Provisioner(plan.spec.infrastructure.s3, S3Credentials("testing", "testing-secret"))
                assert lake.reconcile(plan).ok
            yield Platform(nats_server, redis_server, qdb, plan)
    finally:
        redis_server.stop()
        nats_server.stop()


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    with running_platform(tmp_path, symbols=["BTCUSDT", "ETHUSDT"], riskLimits=LIMITS) as running:
        yield running


Trading = tuple[Platform, LiveServer, LiveServer, LiveServer]  # the platform, oms, exeq, pnl


@pytest.fixture
def trading(platform: Platform) -> Iterator[Trading]:
    """The four trading services up and ready, with a first BTCUSDT quote: bid 99.9, ask 100.1."""
    platform.tick("BTCUSDT", 100.0, 99.9, 100.1)
    with contextlib.ExitStack() as stack:
        servers = platform.serve_all(stack)
        yield platform, servers[ServiceName.OMS], servers[ServiceName.EXEQ], servers[ServiceName.PNL]


def order(client_order_id: str, side: str, quantity: float, **extra: Any) -> dict[str, Any]:
    return {"client_order_id": client_order_id, "symbol": "BTCUSDT", "side": side, "quantity": quantity, **extra}


def position(pnl_server: LiveServer, quantity: float) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        rows = [p for p in pnl_server.get("/positions")[1] if p["symbol"] == "BTCUSDT"]
        return rows[0] if rows and rows[0]["quantity"] == pytest.approx(quantity) else None

    found: dict[str, Any] = wait_for(check, 15, f"a BTCUSDT position of {quantity}")
    return found


def final(oms_server: LiveServer, order_id: str, status: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        body = oms_server.get(f"/orders/{order_id}", headers)[1]
        return body if body["status"] == status else None

    found: dict[str, Any] = wait_for(check, 15, f"order {order_id} {status}")
    return found


def test_order_risk_fill_position_with_the_right_pnl(
    trading: Trading,
) -> None:
    platform, oms_server, exeq_server, pnl_server = trading
    status, placed = oms_server.post("/orders", order("c-1", "buy", 2))
    assert status == 201, placed
    assert (placed["status"], placed["risk_level"]) == ("routed", "LOW")
    filled = final(oms_server, placed["order_id"], "filled")
    assert [(f["quantity"], f["price"]) for f in filled["fills"]] == [(2, 100.1)]  # a buy takes the ask
    held = position(pnl_server, 2)
    assert held["avg_price"] == pytest.approx(100.1)
    assert held["unrealized_pnl"] == pytest.approx(2 * (100.0 - 100.1))  # marked at the last price

    # The price moves; exeq executes against the new quote.
    platform.tick("BTCUSDT", 110.0, 109.9, 110.1)
    wait_for(lambda: any(q["last"] == 110.0 for q in exeq_server.get("/quotes")[1]), 10, "exeq sees 110")
    status, sold = oms_server.post("/orders", order("c-2", "sell", 0.5))
    assert (status, sold["status"]) == (201, "routed")
    assert final(oms_server, sold["order_id"], "filled")["fills"][0]["price"] == 109.9  # a sell takes the bid
    held = position(pnl_server, 1.5)
    assert held["avg_price"] == pytest.approx(100.1)
    assert held["realized_pnl"] == pytest.approx(0.5 * (109.9 - 100.1))
    assert held["unrealized_pnl"] == pytest.approx(1.5 * (110.0 - 100.1))
    totals = pnl_server.get("/pnl")[1]
    assert totals["total_pnl"] == pytest.approx(0.5 * 9.8 + 1.5 * 9.9)

    # Risk sees the position pnl keeps: 9.9 more is a fine order size, but 1.5 + 9.9 > the limit of 10.
    status, too_big = oms_server.post("/orders", order("c-3", "buy", 9.9))
    assert (status, too_big["status"], too_big["risk_level"]) == (201, "rejected", "CRITICAL")
    assert "position would be 11.4" in too_big["reason"]
    assert redis.Redis.from_url(platform.redis.url).hget(risk.POSITIONS_KEY, "BTCUSDT") == b"1.5"

    # Idempotent by client order id: the same terms get the same order, other terms a 409.
    status, again = oms_server.post("/orders", order("c-1", "buy", 2))
    assert (status, again["order_id"], again["status"]) == (200, placed["order_id"], "filled")
    status, clash = oms_server.post("/orders", order("c-1", "buy", 3))
    assert status == 409
    assert placed["order_id"] in clash["detail"]
    position(pnl_server, 1.5)  # the retry filled nothing

    # History in QuestDB: every fill, the position after each, and the orders' status changes.
    tables = platform.questdb.state.tables
    assert sorted((r["side"], r["quantity"], r["price"]) for r in tables["fills"].rows) == [
        ("buy", 2.0, 100.1), ("sell", 0.5, 109.9)
    ]  # fmt: skip
    assert [r["quantity"] for r in sorted(tables["positions"].rows, key=lambda r: r["ts"])][-1] == 1.5
    wait_for(lambda: {r["status"] for r in tables["orders"].rows} >= {"routed", "rejected"}, 10, "order history")


def test_a_rejected_order_never_reaches_exeq(trading: Trading) -> None:
    platform, oms_server, _, pnl_server = trading
    status, rejected = oms_server.post("/orders", order("big", "buy", 50))
    assert (status, rejected["status"], rejected["risk_level"]) == (201, "rejected", "HIGH")
    assert "above the maximum 10" in rejected["reason"]
    status, accepted = oms_server.post("/orders", order("small", "buy", 1))
    assert (status, accepted["status"]) == (201, "routed")
    final(oms_server, accepted["order_id"], "filled")
    position(pnl_server, 1)

    def recorded() -> list[tuple[str, str]] | None:  # status events are published just after the change
        got = [(subject, json.loads(data)["order_id"]) for subject, data in platform.messages("ORDERS")]
        return got if ("orders.rejected.BTCUSDT", rejected["order_id"]) in got else None

    orders = wait_for(recorded, 10, "the rejection recorded")
    assert [order_id for subject, order_id in orders if subject.startswith("orders.routed.")] == [accepted["order_id"]]
    assert [json.loads(data)["order_id"] for _, data in platform.messages("FILLS")] == [accepted["order_id"]]
    assert final(oms_server, rejected["order_id"], "rejected")["fills"] == []


def test_a_limit_order_rests_fills_in_parts_and_a_cancel_wins(
    trading: Trading,
) -> None:
    platform, oms_server, exeq_server, pnl_server = trading
    status, bid = oms_server.post("/orders", order("lim-1", "buy", 3, order_type="limit", limit_price=95.0))
    assert (status, bid["status"]) == (201, "routed")
    wait_for(lambda: [o["order_id"] for o in exeq_server.get("/resting")[1]] == [bid["order_id"]], 10, "resting")

    platform.tick("BTCUSDT", 94.9, 94.8, 94.9, size=1)  # crosses, but only 1 traded
    partial = final(oms_server, bid["order_id"], "partially_filled")
    assert [(f["quantity"], f["price"]) for f in partial["fills"]] == [(1, 94.9)]
    platform.tick("BTCUSDT", 94.8, 94.7, 94.8, size=5)
    filled = final(oms_server, bid["order_id"], "filled")
    assert filled["avg_fill_price"] == pytest.approx((94.9 + 2 * 94.8) / 3)
    assert position(pnl_server, 3)["avg_price"] == pytest.approx((94.9 + 2 * 94.8) / 3)
    assert oms_server.post(f"/orders/{bid['order_id']}/cancel", {})[0] == 409  # filled is final

    status, offer = oms_server.post("/orders", order("lim-2", "sell", 1, order_type="limit", limit_price=200.0))
    assert (status, offer["status"]) == (201, "routed")
    wait_for(lambda: [o["order_id"] for o in exeq_server.get("/resting")[1]] == [offer["order_id"]], 10, "resting")
    status, cancelled = oms_server.post(f"/orders/{offer['order_id']}/cancel", {})
    assert (status, cancelled["status"]) == (200, "cancelled")
    platform.tick("BTCUSDT", 201.0, 201.0, 201.1)  # would cross: the cancel got there first
    wait_for(lambda: exeq_server.get("/resting")[1] == [], 10, "the cancelled order no longer rests")
    assert final(oms_server, offer["order_id"], "cancelled")["fills"] == []
    position(pnl_server, 3)
    assert oms_server.get("/orders/nope")[0] == 404
    assert oms_server.post("/orders/nope/cancel", {})[0] == 404


def test_without_risk_the_oms_is_not_ready_and_answers_503_then_the_same_id_goes_through(platform: Platform) -> None:
    platform.tick("BTCUSDT", 100.0, 99.9, 100.1)
    with platform.serve(ServiceName.OMS) as oms_server:

        def connected_but_no_risk() -> tuple[int, Any] | None:  # NATS connects in the background: wait for it
            status, body = oms_server.get("/readyz")
            checks = body.get("checks", {}) if isinstance(body, dict) else {}
            return (status, body) if checks.get("nats") == checks.get("redis") == "ok" else None

        status, body = wait_for(connected_but_no_risk, 10, "connected to NATS and Redis")
        assert status == 503
        assert body["checks"]["risk"] != "ok"
        status, refused = oms_server.post("/orders", order("retry-me", "buy", 1))
        assert status == 503
        assert "retry with the same client_order_id" in refused["detail"]
        with platform.serve(ServiceName.RISK):
            wait_for(lambda: oms_server.get("/readyz")[0] == 200, 10, "ready with risk up")
            status, placed = oms_server.post("/orders", order("retry-me", "buy", 1))
            assert (status, placed["status"]) == (201, "routed")


def test_bad_and_repeated_messages_are_dead_lettered_or_counted_once(
    trading: Trading,
) -> None:
    platform, _, _, pnl_server = trading
    good = {"fill_id": "manual-1", "order_id": "manual", "symbol": "BTCUSDT", "side": "buy", "quantity": 2,
            "price": 100.0, "ts": "2026-01-02T09:30:00Z"}  # fmt: skip

    async def publish(nc: Any) -> Any:
        events = await nc.subscribe("positions.>")
        js = nc.jetstream()
        await js.publish("fills.BTCUSDT", json.dumps(good).encode())
        await js.publish("fills.BTCUSDT", json.dumps(good).encode())  # redelivered by a retrying producer
        await js.publish("fills.BTCUSDT", b'{"fill_id": "x", "quantity": -1}')
        await js.publish("orders.routed.BTCUSDT", b"not an order")
        return json.loads((await events.next_msg(timeout=10)).data)

    event = platform.run(publish)
    assert (event["fill"]["fill_id"], event["quantity"], event["avg_price"]) == ("manual-1", 2, 100.0)
    day_key = f"{pnl.APPLIED_PREFIX}2026-01-02"
    client = redis.Redis.from_url(platform.redis.url)
    assert client.hkeys(day_key) == [b"manual-1"]
    assert 0 < client.ttl(day_key) <= pnl.APPLIED_TTL_SECONDS  # remembered longer than FILLS keeps it, not forever
    assert position(pnl_server, 2)["avg_price"] == 100.0  # applied once
    letters = wait_for(lambda: len(m := platform.messages("DEAD_LETTER")) >= 2 and m, 10, "two dead letters")
    assert sorted(subject for subject, _ in letters) == ["dlq.FILLS.invalid_fill", "dlq.ORDERS.invalid_order"]
    assert b"not an order" in [data for _, data in letters]


def test_exeq_restarts_keep_resting_orders_and_finish_half_done_fills(platform: Platform) -> None:
    platform.tick("BTCUSDT", 100.0, 99.9, 100.1)
    with contextlib.ExitStack() as stack:
        servers = platform.serve_all(stack, (ServiceName.RISK, ServiceName.OMS, ServiceName.PNL))
        oms_server, pnl_server = servers[ServiceName.OMS], servers[ServiceName.PNL]

        with platform.serve(ServiceName.EXEQ) as exeq_server:
            wait_for(lambda: exeq_server.get("/readyz")[0] == 200, 20, "exeq ready")
            _, resting = oms_server.post("/orders", order("rest", "buy", 1, order_type="limit", limit_price=90.0))
            wait_for(lambda: len(exeq_server.get("/resting")[1]) == 1, 10, "resting")
        # exeq is down. An order routed now waits in the stream; another one was filled in Redis by a
        # previous exeq that died before publishing the fill (the state a crash between the two leaves).
        _, waiting = oms_server.post("/orders", order("wait", "buy", 2))
        assert waiting["status"] == "routed"
        _, half_done = oms_server.post("/orders", order("half", "buy", 3))

        async def fill_in_redis_only() -> None:
            client = aioredis.Redis.from_url(platform.redis.url)
            await OrderStore(client).move(half_done["order_id"], lambda o: o.filled_by(3, 100.1)[0])
            await client.aclose()

        asyncio.run(fill_in_redis_only())
        assert oms_server.get(f"/orders/{half_done['order_id']}")[1]["status"] == "filled"

        with platform.serve(ServiceName.EXEQ) as exeq_server:
            wait_for(lambda: exeq_server.get("/readyz")[0] == 200, 20, "exeq ready again")
            assert [o["order_id"] for o in exeq_server.get("/resting")[1]] == [resting["order_id"]]
            final(oms_server, waiting["order_id"], "filled")
            position(pnl_server, 5)  # 2 + the 3 whose fill the first exeq never published
            platform.tick("BTCUSDT", 89.0, 88.9, 89.1)
            final(oms_server, resting["order_id"], "filled")
            position(pnl_server, 6)
        fills = [json.loads(data)["fill_id"] for _, data in platform.messages("FILLS")]
        assert sorted(fills) == sorted({*fills})  # each fill once in the stream
        assert len(fills) == 3


def test_an_exeq_restart_republishes_no_fill_it_had_published(platform: Platform) -> None:
    """Outside the FILLS stream's duplicate window a republished fill is a new message (the audit log
    and the live stream would show it twice): a restart publishes only what was never confirmed."""
    platform.tick("BTCUSDT", 100.0, 99.9, 100.1)

    async def short_duplicate_window(nc: Any) -> None:
        jsm = nc.jsm()
        config = (await jsm.stream_info("FILLS")).config
        config.duplicate_window = 0.5
        await jsm.update_stream(config)

    with contextlib.ExitStack() as stack:
        servers = platform.serve_all(stack, (ServiceName.RISK, ServiceName.OMS, ServiceName.PNL))
        oms_server, pnl_server = servers[ServiceName.OMS], servers[ServiceName.PNL]
        with platform.serve(ServiceName.EXEQ) as exeq_server:
            wait_for(lambda: exeq_server.get("/readyz")[0] == 200, 20, "exeq ready")
            _, resting = oms_server.post("/orders", order("parts", "buy", 3, order_type="limit", limit_price=95.0))
            wait_for(lambda: len(exeq_server.get("/resting")[1]) == 1, 10, "resting")
            platform.tick("BTCUSDT", 94.9, 94.8, 94.9, size=1)
            position(pnl_server, 1)
            platform.tick("BTCUSDT", 94.9, 94.8, 94.9, size=1)
            position(pnl_server, 2)
        platform.run(short_duplicate_window)
        time.sleep(1.0)  # past the window: the stream would keep a republished fill as a new message
        with platform.serve(ServiceName.EXEQ) as exeq_server:
            wait_for(lambda: exeq_server.get("/readyz")[0] == 200, 20, "exeq ready again")
            assert [o["order_id"] for o in exeq_server.get("/resting")[1]] == [resting["order_id"]]
            platform.tick("BTCUSDT", 94.9, 94.8, 94.9, size=5)
            final(oms_server, resting["order_id"], "filled")
            position(pnl_server, 3)
        fills = [json.loads(data)["fill_id"] for _, data in platform.messages("FILLS")]
        assert len(fills) == 3, fills


def test_open_orders_count_against_the_position_limit_and_are_released_as_they_end(trading: Trading) -> None:
    """maxPosition 10: resting buys of 1 are approved until ten are open, concurrent or not; a cancel
    gives its quantity back, a fill moves it to the position, and a sell is judged on its own side."""
    platform, oms_server, _, pnl_server = trading
    status, batch = oms_server.post("/orders/batch", {"orders": [
        order(f"rest-{i}", "buy", 1, order_type="limit", limit_price=50.0) for i in range(30)]})  # fmt: skip
    assert status == 200, batch
    decided = [r["order"]["status"] for r in batch["results"]]
    assert decided.count("routed") == 10, decided
    assert decided.count("rejected") == 20
    refused = next(r["order"] for r in batch["results"] if r["order"]["status"] == "rejected")
    assert "open orders" in refused["reason"]
    routed = [r["order"]["order_id"] for r in batch["results"] if r["order"]["status"] == "routed"]

    assert oms_server.post(f"/orders/{routed[0]}/cancel", {})[0] == 200
    status, again = oms_server.post("/orders", order("rest-again", "buy", 1, order_type="limit", limit_price=50.0))
    assert again["status"] == "routed", again  # the cancel gave one back
    assert oms_server.post("/orders", order("rest-more", "buy", 1, order_type="limit",
                                            limit_price=50.0))[1]["status"] == "rejected"  # fmt: skip
    status, sell = oms_server.post("/orders", order("sell-side", "sell", 5, order_type="limit", limit_price=500.0))
    assert sell["status"] == "routed", sell  # short 5 at worst: its own side is open

    platform.tick("BTCUSDT", 49.0, 48.9, 49.0, size=100)  # every resting buy fills: a position of 10
    position(pnl_server, 10)
    status, over = oms_server.post("/orders", order("after-fill", "buy", 1, order_type="limit", limit_price=50.0))
    assert over["status"] == "rejected", over  # the fills moved into the position, nothing released twice
    status, cut = oms_server.post("/orders", order("cut", "sell", 5, order_type="limit", limit_price=500.0))
    assert cut["status"] == "routed", cut  # 10 - 5 open - 5 = 0


def test_risks_sweep_releases_what_no_live_order_holds(platform: Platform) -> None:
    """An approval whose order was never stored (an OMS that died in between) holds nothing for ever."""
    from tradingstack_services.trading import exposure

    async def scenario() -> None:
        client = aioredis.Redis.from_url(platform.redis.url)
        service = risk.RiskService(platform.settings(ServiceName.RISK), client)
        assert (
            await exposure.reserve(client, risk.POSITIONS_KEY, "BTCUSDT", "buy", 4.0, 10.0, "ghost", None, 5)
        ).reserved
        assert await exposure.open_quantities(client, "BTCUSDT") == (4.0, 0.0)
        await service._sweep(before=time.time() - 60)  # too young to judge
        assert await exposure.open_quantities(client, "BTCUSDT") == (4.0, 0.0)
        await service._sweep(before=time.time() + 1)
        assert await exposure.open_quantities(client, "BTCUSDT") == (0.0, 0.0)
        assert await client.hget(exposure.OPEN_ORDERS_KEY, "-") is None
        await client.aclose()

    asyncio.run(scenario())


def test_an_order_with_thousands_of_fills_has_bounded_events_and_a_bad_event_blocks_none(platform: Platform) -> None:
    """6,000 partial fills: the stored order keeps them, each event carries the count and the newest
    only (the whole order passed NATS's 1 MiB and stopped every order event of the stack). An event
    that cannot be read is dead-lettered, and the events after it are published."""
    request = OrderRequest(client_order_id="many", symbol="BTCUSDT", side="buy", quantity=10_000.0,
                           order_type="limit", limit_price=100.0)  # fmt: skip

    async def scenario() -> None:
        client = aioredis.Redis.from_url(platform.redis.url)
        store = OrderStore(client)
        placed = Order.new("many-1", request).moved(OrderStatus.RISK_CHECKED).moved(OrderStatus.ROUTED)
        await store.claim(placed)
        order = placed
        for _ in range(6_000):
            order = order.filled_by(1.0, 100.0)[0]
        # The last of those moves, recorded as one change (6,000 round trips would show nothing more).
        assert await store.replace_many([(Stored.of(placed), order)]) == [True]
        await client.xadd(EVENTS_KEY, {"order": b"{not an order"})
        later = Order.new("later-1", request.model_copy(update={"client_order_id": "later"}))
        await store.claim(later.moved(OrderStatus.REJECTED, reason="test"))
        nc = await nats.connect(platform.nats.url)
        try:
            for recover in (True, False):  # the group made, then every entry since the first
                await store.publish_events(nc.jetstream(), "test", recover=recover)
        finally:
            await nc.close()
            await client.aclose()

    asyncio.run(scenario())
    events = {subject: json.loads(data) for subject, data in platform.messages("ORDERS")}
    big = events["orders.partially_filled.BTCUSDT"]
    assert (big["fill_count"], big["filled_quantity"], big["last_fill"]["fill_id"]) == (6_000, 6_000.0, "many-1-6000")
    assert "fills" not in big
    assert len(json.dumps(big)) < 2_000
    assert events["orders.rejected.BTCUSDT"]["order_id"] == "later-1"  # the bad entry held nothing back
    assert [s for s, _ in platform.messages("DEAD_LETTER")] == ["dlq.ORDERS.invalid_order_event"]


def test_an_account_has_at_most_max_open_orders_open(platform: Platform) -> None:
    """A client sending orders without end: past maxOpenOrders risk refuses the next until one ends."""
    platform.tick("BTCUSDT", 100.0, 99.9, 100.1)
    limited = dataclasses.replace(platform, plan=build_plan(StackRef("e2e", "ns"), parse_spec(
        platform.plan.spec.model_dump(by_alias=True, exclude_none=True) | {"maxOpenOrders": 3})))  # fmt: skip
    with contextlib.ExitStack() as stack:
        oms_server = limited.serve_all(stack, (ServiceName.RISK, ServiceName.OMS, ServiceName.EXEQ))[ServiceName.OMS]
        placed = [oms_server.post("/orders", order(f"open-{i}", "buy", 1, order_type="limit", limit_price=50.0))[1]
                  for i in range(4)]  # fmt: skip
        assert [p["status"] for p in placed] == ["routed", "routed", "routed", "rejected"]
        assert "maxOpenOrders 3" in placed[3]["reason"]
        assert oms_server.post(f"/orders/{placed[0]['order_id']}/cancel", {})[0] == 200
        again = oms_server.post("/orders", order("open-again", "buy", 1, order_type="limit", limit_price=50.0))[1]
        assert again["status"] == "routed", again


def test_history_waits_for_questdb_while_positions_do_not(trading: Trading) -> None:
    platform, oms_server, _, pnl_server = trading
    platform.questdb.state.unavailable = True
    try:
        status, placed = oms_server.post("/orders", order("qdb-away", "buy", 2))
        assert (status, placed["status"]) == (201, "routed")
        assert position(pnl_server, 2)["avg_price"] == pytest.approx(100.1)  # visible without QuestDB
        # Positions do not need QuestDB, so pnl stays ready (its Service keeps routing to it) and says why.
        status, ready = pnl_server.get("/readyz")
        assert status == 200, ready
        assert "questdb" not in ready["checks"]
        assert "503" in ready["degraded"]["questdb"]
        time.sleep(2.5)  # the batch has been handed back and retried at least once
        assert platform.questdb.state.tables["fills"].rows == []
    finally:
        platform.questdb.state.unavailable = False
    wait_for(lambda: len(platform.questdb.state.tables["fills"].rows) == 1, 15, "history once QuestDB is back")
    rows = platform.questdb.state.tables["positions"].rows
    assert [(r["quantity"], r["avg_price"]) for r in rows] == [(2.0, pytest.approx(100.1))]
    position(pnl_server, 2)  # the redelivery did not apply the fill again


def test_a_market_order_with_no_price_is_cancelled_after_its_tries(platform: Platform) -> None:
    request = OrderRequest(client_order_id="no-price", symbol="ETHUSDT", side="buy", quantity=1)
    routed = Order.new("o-no-price", request).moved(OrderStatus.RISK_CHECKED).moved(OrderStatus.ROUTED)

    async def route(nc: Any) -> None:  # as the OMS does, for a symbol nobody has quoted
        client = aioredis.Redis.from_url(platform.redis.url)
        stored, _ = await OrderStore(client).claim(routed)
        await client.aclose()
        await nc.jetstream().publish("orders.routed.ETHUSDT", stored.raw)

    settings = platform.settings(ServiceName.EXEQ).model_copy(
        update={"EXEQ_RETRY_SECONDS": 0.2, "EXEQ_PRICE_ATTEMPTS": 3}
    )
    with LiveServer(exeq.create(settings)) as exeq_server:
        wait_for(lambda: exeq_server.get("/readyz")[0] == 200, 20, "exeq ready")
        platform.run(route)

        def cancelled() -> dict[str, Any] | None:
            raw = redis.Redis.from_url(platform.redis.url).get(f"{ORDER_KEY}o-no-price")
            order: dict[str, Any] = json.loads(raw or b"{}")
            return order if order.get("status") == "cancelled" else None

        order = wait_for(cancelled, 10, "the order cancelled after 3 tries")
        assert order["reason"] == "no price for ETHUSDT after 3 tries"
        assert order["fills"] == []


def test_a_service_answers_probes_before_nats_and_works_once_nats_comes(platform: Platform) -> None:
    # In a cluster pods start in no particular order: a service must listen (liveness) before NATS
    # answers, say why it is not ready, and get ready by itself once NATS is there.
    platform.nats.stop()
    with platform.serve(ServiceName.RISK) as risk_server:
        assert risk_server.get("/healthz")[0] == 200
        status, body = risk_server.get("/readyz")
        assert status == 503
        assert "not connected" in body["checks"]["nats"]
        platform.nats.start()
        wait_for(lambda: risk_server.get("/readyz")[0] == 200, 30, "risk ready once NATS is up")


def test_a_worker_that_fails_on_a_late_dependency_is_started_again(platform: Platform) -> None:
    # exeq's worker first reads Redis (resting orders); Redis comes up a few seconds after exeq.
    platform.redis.stop()
    platform.tick("BTCUSDT", 100.0, 99.9, 100.1)
    with contextlib.ExitStack() as stack:
        exeq_server = stack.enter_context(platform.serve(ServiceName.EXEQ))

        def worker_failed() -> dict[str, Any] | None:
            status, body = exeq_server.get("/readyz")
            return body if status == 503 and "Error" in body["checks"]["workers"] else None

        body = wait_for(worker_failed, 15, "exeq to report its failed worker")
        assert "run" in body["checks"]["workers"]  # the worker is named
        assert exeq_server.get("/healthz")[0] == 200
        platform.redis.start()
        wait_for(lambda: exeq_server.get("/readyz")[0] == 200, 40, "exeq ready once Redis is up")
        servers = platform.serve_all(stack, [s for s in FACTORIES if s is not ServiceName.EXEQ])
        status, placed = servers[ServiceName.OMS].post("/orders", order("late-1", "buy", 1))
        assert status == 201, placed
        final(servers[ServiceName.OMS], placed["order_id"], "filled")


def test_an_order_that_can_never_fill_is_cancelled_with_the_reason_and_its_batch_goes_on(platform: Platform) -> None:
    # Routed without the OMS (which refuses it now): 1e-12 is below what a fill can move.
    request = OrderRequest(client_order_id="tiny", symbol="BTCUSDT", side="buy", quantity=1)
    tiny = Order.model_construct(**{**Order.new("o-tiny", request).model_dump(), "quantity": 1e-12})
    good = Order.new("o-good", OrderRequest(client_order_id="good", symbol="BTCUSDT", side="buy", quantity=1))
    platform.tick("BTCUSDT", 100.0, 99.9, 100.1)

    async def route(nc: Any) -> None:
        client = aioredis.Redis.from_url(platform.redis.url)
        for order_ in (tiny, good):
            stored, _ = await OrderStore(client).claim(order_.moved(OrderStatus.RISK_CHECKED).moved(OrderStatus.ROUTED))
            await nc.jetstream().publish(f"orders.routed.{order_.symbol}", stored.raw)
        await client.aclose()

    platform.run(route)  # both wait in the stream: exeq fetches them in one batch
    with platform.serve(ServiceName.EXEQ) as exeq_server:
        wait_for(lambda: exeq_server.get("/readyz")[0] == 200, 20, "exeq ready")

        def stored(order_id: str) -> dict[str, Any]:
            raw = redis.Redis.from_url(platform.redis.url).get(f"{ORDER_KEY}{order_id}")
            return dict(json.loads(raw or b"{}"))

        wait_for(lambda: stored("o-good").get("status") == "filled", 10, "the good order filled")
        # Not left "routed" for ever, not retried for ever: a final state that says why.
        tiny_now = wait_for(lambda: (o := stored("o-tiny")).get("status") == "cancelled" and o, 10, "tiny cancelled")
        assert "nothing left to fill" in tiny_now["reason"]
        assert tiny_now["fills"] == []


def _orders_stream_subjects(platform: Platform, subjects: list[str]) -> None:
    """Change what the ORDERS stream stores: without orders.routed.>, a routing publish gets no ack."""

    async def update(nc: Any) -> None:
        jsm = nc.jsm()
        config = (await jsm.stream_info("ORDERS")).config
        config.subjects = subjects
        await jsm.update_stream(config)

    platform.run(update)


def test_a_retry_after_a_failed_routing_places_the_order_exactly_once(trading: Trading) -> None:
    platform, oms_server, _exeq_server, _pnl_server = trading
    _orders_stream_subjects(platform, ["orders.new.>", "orders.rejected.>", "orders.cancelled.>"])
    status, body = oms_server.post("/orders", order("route-1", "buy", 1))
    assert status == 503, body
    assert "retry with the same client_order_id" in body["detail"]
    _orders_stream_subjects(platform, ["orders.>"])
    status, placed = oms_server.post("/orders", order("route-1", "buy", 1))
    assert status == 200, placed  # the same order, now routed: not a cancelled one
    assert placed["status"] in ("routed", "filled")
    filled = final(oms_server, placed["order_id"], "filled")
    assert len(filled["fills"]) == 1
    routed = [s for s, _ in platform.messages("ORDERS") if s.startswith("orders.routed.")]
    assert len(routed) == 1


def test_an_order_whose_routing_was_never_confirmed_is_routed_by_the_recovery_pass(trading: Trading) -> None:
    # The client gave up after the 503 (or the OMS died right after the claim): nobody retries.
    platform, oms_server, _exeq_server, _pnl_server = trading
    _orders_stream_subjects(platform, ["orders.new.>", "orders.rejected.>", "orders.cancelled.>"])
    status, _ = oms_server.post("/orders", order("route-2", "buy", 1))
    assert status == 503
    order_id = json.loads(redis.Redis.from_url(platform.redis.url).get(
        f"{ORDER_KEY}{redis.Redis.from_url(platform.redis.url).get('tradingstack:client-order:route-2').decode()}"
    ))["order_id"]  # fmt: skip
    _orders_stream_subjects(platform, ["orders.>"])
    filled = wait_for(lambda: (b := oms_server.get(f"/orders/{order_id}")[1])["status"] == "filled" and b, 30,
                      "the order routed by the recovery pass and filled")  # fmt: skip
    assert len(filled["fills"]) == 1


def test_a_retry_of_a_known_order_is_answered_without_risk(platform: Platform) -> None:
    platform.tick("BTCUSDT", 100.0, 99.9, 100.1)
    with contextlib.ExitStack() as stack:
        risk_server = stack.enter_context(platform.serve(ServiceName.RISK))
        oms_server = stack.enter_context(platform.serve(ServiceName.OMS))
        wait_for(lambda: oms_server.get("/readyz")[0] == 200, 20, "oms ready")
        status, placed = oms_server.post("/orders", order("known-1", "buy", 1))
        assert status == 201, placed
        risk_server.__exit__()  # risk goes away
        wait_for(lambda: oms_server.get("/readyz")[0] == 503, 20, "oms sees risk gone")
        status, again = oms_server.post("/orders", order("known-1", "buy", 1))
        assert status == 200, again
        assert again["order_id"] == placed["order_id"]
        status, other = oms_server.post("/orders", order("unknown-1", "buy", 1))
        assert status == 503  # a new order still needs a decision
        assert "risk did not answer" in other["detail"]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
# A valid order with any one field replaced by anything JSON can hold (NaN, 1e308, -0, huge ints, lists...).
HOSTILE_ORDER = st.builds(
    lambda field, value: {**order("fuzz", "buy", 1), field: value},
    st.sampled_from(["client_order_id", "symbol", "side", "quantity", "order_type", "limit_price", "extra"]),
    JSON,
)


def test_no_body_a_client_can_send_gets_a_500_or_kills_a_service(trading: Trading) -> None:
    platform, oms_server, exeq_server, pnl_server = trading
    with platform.serve(ServiceName.RISK) as risk_server:  # a second risk replica, to fuzz /check directly
        wait_for(lambda: risk_server.get("/readyz")[0] == 200, 20, "risk ready")
        answers: list[int] = []

        @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(body=st.one_of(JSON, HOSTILE_ORDER), raw=st.sampled_from([None, b"NaN", b"{", b"\xff", b"1e999"]))
        def fuzz(body: Any, raw: bytes | None) -> None:
            data = raw if raw is not None else json.dumps(body).encode()
            for server, path in ((oms_server, "/orders"), (risk_server, "/check"),
                                 (oms_server, "/orders/x/cancel")):  # fmt: skip
                status = post_bytes(server, path, data)
                answers.append(status)
                assert status < 500 or status == 503, (path, data[:200], status)
            ident = str(body)[:40] if not isinstance(body, dict) else str(body.get("client_order_id"))[:40]
            status, _ = oms_server.get(f"/orders/{urllib.parse.quote(ident, safe='')}")
            assert status < 500, ident

        fuzz()
        assert 422 in answers  # the fuzzer did reach the validation
        for server in (oms_server, exeq_server, pnl_server, risk_server):
            assert server.get("/readyz")[0] == 200  # nothing died


def post_bytes(server: LiveServer, path: str, data: bytes) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", data=data, method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_final_orders_expire_after_the_retention_and_live_ones_never(platform: Platform) -> None:
    platform.tick("BTCUSDT", 100.0, 99.9, 100.1)
    with contextlib.ExitStack() as stack:
        oms_server = platform.serve_all(stack, ORDER_RETENTION_SECONDS=3600)[ServiceName.OMS]
        _, filled = oms_server.post("/orders", order("ttl-filled", "buy", 1))
        _, resting = oms_server.post("/orders", order("ttl-resting", "buy", 1, order_type="limit", limit_price=50.0))
        final(oms_server, filled["order_id"], "filled")
        client = redis.Redis.from_url(platform.redis.url)
        assert 0 < client.ttl(f"{ORDER_KEY}{filled['order_id']}") <= 3600
        assert 0 < client.ttl("tradingstack:client-order:ttl-filled") <= 3600
        assert client.ttl(f"{ORDER_KEY}{resting['order_id']}") == -1  # live: kept until it ends
        # As if it had expired: the client id now names nothing; reusing it is a clear 409, not a 500.
        client.delete(f"{ORDER_KEY}{filled['order_id']}")
        status, body = oms_server.post("/orders", order("ttl-filled", "buy", 1))
        assert status == 409, body
        assert "expired" in body["detail"]


def test_a_cancelled_resting_order_leaves_exeq_without_a_crossing_quote(platform: Platform) -> None:
    platform.tick("BTCUSDT", 100.0, 99.9, 100.1)  # nothing in this test crosses 500
    with contextlib.ExitStack() as stack:
        servers = platform.serve_all(stack, EXEQ_SWEEP_SECONDS=0.5)
        oms_server, exeq_server = servers[ServiceName.OMS], servers[ServiceName.EXEQ]
        _, offer = oms_server.post("/orders", order("sweep-1", "sell", 1, order_type="limit", limit_price=500.0))
        wait_for(lambda: [o["order_id"] for o in exeq_server.get("/resting")[1]] == [offer["order_id"]], 10,
                 "the order resting")  # fmt: skip
        assert oms_server.post(f"/orders/{offer['order_id']}/cancel", {})[0] == 200
        wait_for(lambda: exeq_server.get("/resting")[1] == [], 10, "dropped by the sweep")
        assert not redis.Redis.from_url(platform.redis.url).hexists("tradingstack:exeq:resting", offer["order_id"])


def test_a_status_change_made_while_nats_is_away_is_recorded_once_when_it_is_back(platform: Platform) -> None:
    platform.tick("BTCUSDT", 100.0, 99.9, 100.1)
    with contextlib.ExitStack() as stack:
        oms_server = platform.serve_all(stack)[ServiceName.OMS]
        _, rejected = oms_server.post("/orders", order("ev-big", "buy", 50))  # above maxQuantity: rejected
        assert rejected["status"] == "rejected"
        _, resting = oms_server.post("/orders", order("ev-rest", "buy", 1, order_type="limit", limit_price=50.0))
        platform.nats.stop()
        status, cancelled = oms_server.post(f"/orders/{resting['order_id']}/cancel", {})
        assert (status, cancelled["status"]) == (200, "cancelled")  # the cancel needs Redis only
    # Every service stopped while NATS was away: the record waits in Redis, not in a process's memory.
    platform.nats.start()

    def events() -> list[str]:
        return sorted(s for s, data in platform.messages("ORDERS") if b"ev-" in data and "routed" not in s)

    with contextlib.ExitStack() as stack:
        platform.serve_all(stack, [ServiceName.RISK, ServiceName.OMS])
        wait_for(lambda: len(events()) >= 2, 20, "both events in the ORDERS stream")
        time.sleep(1)  # a second publication would show up now
    assert events() == ["orders.cancelled.BTCUSDT", "orders.rejected.BTCUSDT"]


def test_a_tick_with_a_dust_size_neither_fills_nor_drops_a_resting_order(trading: Trading) -> None:
    platform, oms_server, exeq_server, _ = trading
    _, bid = oms_server.post("/orders", order("dust-1", "buy", 2, order_type="limit", limit_price=95.0))
    wait_for(lambda: [o["order_id"] for o in exeq_server.get("/resting")[1]] == [bid["order_id"]], 10, "resting")
    platform.tick("BTCUSDT", 94.9, 94.8, 94.9, size=1e-12)  # crosses, but trades (almost) nothing
    time.sleep(1)
    assert oms_server.get(f"/orders/{bid['order_id']}")[1]["status"] == "routed"
    assert [o["order_id"] for o in exeq_server.get("/resting")[1]] == [bid["order_id"]]
    platform.tick("BTCUSDT", 94.9, 94.8, 94.9, size=5)
    assert final(oms_server, bid["order_id"], "filled")["filled_quantity"] == 2


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def with_accounts(
    platform: Platform,
    monkeypatch: pytest.MonkeyPatch,
    keys: dict[str, str],
    accounts: list[dict[str, Any]] | None = None,
    **spec_extra: Any,
) -> tuple[Platform, dict[str, dict[str, str]]]:
    """The platform with spec.accounts (each key's digest put where the kubelet would put its Secret's
    value, after an old key's), a first quote, and each account's Authorization header."""
    spec = platform.plan.spec.model_dump(by_alias=True, exclude_none=True) | spec_extra
    spec["accounts"] = accounts or [{"name": name, "secretRef": {"name": f"{name}-keys"}} for name in keys]
    plan = build_plan(StackRef("e2e", "ns"), parse_spec(spec))
    for name, source in secret_env(plan.spec, ServiceName.OMS).items():
        account = source["secretKeyRef"]["name"].removesuffix("-keys")
        monkeypatch.setenv(name, f"{_key_hash('an-old-key')}\n{_key_hash(keys[account])}\n")
    authed = dataclasses.replace(platform, plan=plan)
    authed.tick("BTCUSDT", 100.0, 99.9, 100.1)
    return authed, {name: {"Authorization": f"Bearer {key}"} for name, key in keys.items()}


def test_orders_need_an_account_key_and_stay_within_their_account(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """spec.accounts: each account's API keys, hashed, in a Secret; `Authorization: Bearer <key>`."""
    keys = {"desk-a": "ka-7f3e9c2d1b", "desk-b": "kb-0a4c6e8f2d"}
    authed, bearer = with_accounts(platform, monkeypatch, keys)
    resting = order("c-1", "buy", 1, order_type="limit", limit_price=50.0)  # far below the market: it rests
    with contextlib.ExitStack() as stack:
        servers = authed.serve_all(stack, [ServiceName.RISK, ServiceName.OMS, ServiceName.EXEQ])
        oms_server = servers[ServiceName.OMS]

        for headers in ({}, {"Authorization": "Bearer not-a-key"}, {"Authorization": f"Basic {keys['desk-a']}"}):
            status, body = oms_server.post("/orders", resting, headers)
            assert status == 401, body
            assert oms_server.last_headers.get("www-authenticate", oms_server.last_headers.get("WWW-Authenticate"))
            assert "not-a-key" not in str(body)
        assert oms_server.get("/orders/anything")[0] == 401
        assert all(oms_server.get(path)[0] == 200 for path in ("/healthz", "/readyz", "/metrics"))  # probes stay open

        status, mine = oms_server.post("/orders", resting, bearer["desk-a"])
        assert status == 201, mine
        assert mine["account"] == "desk-a"
        status, theirs = oms_server.post("/orders", resting, bearer["desk-b"])  # the same client id, another account
        assert status == 201, theirs
        assert theirs["account"] == "desk-b"
        assert theirs["order_id"] != mine["order_id"]
        assert oms_server.post("/orders", resting, bearer["desk-a"])[1]["order_id"] == mine["order_id"]  # a retry

        order_path = f"/orders/{mine['order_id']}"
        assert oms_server.get(order_path, bearer["desk-a"])[0] == 200
        status, body = oms_server.get(order_path, bearer["desk-b"])
        assert status == 403, body
        status, body = oms_server.post(f"{order_path}/cancel", {}, bearer["desk-b"])
        assert status == 403, body
        assert oms_server.get(order_path, bearer["desk-a"])[1]["status"] != "cancelled"
        status, body = oms_server.post(f"{order_path}/cancel", {}, bearer["desk-a"])
        assert status == 200, body
        assert body["status"] == "cancelled"


class DecisionServer:
    """An OPA-compatible decision API (POST /v1/data/<path> {"input": ...} -> {"result": ...}), as in
    openpolicyagent.org/docs/latest/rest-api/#get-a-document-with-input: an undefined decision is
    answered 200 with no "result". Its policy: desk-b may not trade more than 5; mode "down" closes
    the socket, "undefined" leaves the decision undefined."""

    def __init__(self) -> None:
        self.mode = "up"
        self.inputs: list[dict[str, Any]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                if server.mode == "down":
                    self.close_connection = True
                    return
                server.inputs.append(body["input"])
                request = body["input"].get("order") or {}
                allowed = not (body["input"]["account"] == "desk-b" and request.get("quantity", 0) > 5)
                answer = {} if server.mode == "undefined" else {"result": allowed}
                data = json.dumps(answer).encode()
                self.send_response(200 if self.path == "/v1/data/tradingstack/orders/allow" else 404)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_: Any) -> None:
                return None

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def test_an_external_policy_decides_each_order_and_its_absence_refuses_them(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = {"desk-a": "ka-policy-1", "desk-b": "kb-policy-2"}
    opa = DecisionServer()
    authorization = {"url": opa.url, "decisionPath": "tradingstack/orders/allow"}
    authed, bearer = with_accounts(platform, monkeypatch, keys, orderAuthorization=authorization)
    with contextlib.ExitStack() as stack:
        oms_server = authed.serve_all(stack, [ServiceName.RISK, ServiceName.OMS])[ServiceName.OMS]
        assert oms_server.post("/orders", order("p-1", "buy", 6), bearer["desk-a"])[0] == 201
        status, body = oms_server.post("/orders", order("p-2", "buy", 6), bearer["desk-b"])
        assert status == 403, body
        assert "policy" in body["detail"]
        assert opa.inputs[-1]["action"] == "place"
        assert opa.inputs[-1]["order"]["client_order_id"] == "p-2"
        status, placed = oms_server.post("/orders", order("p-3", "buy", 1), bearer["desk-b"])
        assert status == 201, placed

        opa.mode = "down"  # fail closed: no decision, no order; the client retries the same id
        status, body = oms_server.post("/orders", order("p-4", "buy", 1), bearer["desk-b"])
        assert status == 503, body
        assert oms_server.last_headers.get("retry-after", oms_server.last_headers.get("Retry-After")) == "1"
        status, body = oms_server.post(f"/orders/{placed['order_id']}/cancel", {}, bearer["desk-b"])
        assert status == 503, body  # a cancel is decided too
        opa.mode = "undefined"  # a policy that says nothing says no
        assert oms_server.post("/orders", order("p-4", "buy", 1), bearer["desk-b"])[0] == 403
        opa.mode = "up"
        assert oms_server.post("/orders", order("p-4", "buy", 1), bearer["desk-b"])[0] == 201
        status, body = oms_server.post(f"/orders/{placed['order_id']}/cancel", {}, bearer["desk-b"])
        assert status in (200, 409), body  # decided again: cancelled, or already filled
        assert opa.inputs[-1]["action"] == "cancel"
        assert opa.inputs[-1]["order_id"] == placed["order_id"]


def test_fills_positions_and_risk_limits_are_each_accounts_own(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = {"desk-a": "ka-positions-1", "desk-b": "kb-positions-2"}
    accounts = [
        {"name": "desk-a", "secretRef": {"name": "desk-a-keys"},
         "riskLimits": [{"symbol": "BTCUSDT", "maxQuantity": 10, "maxNotional": 1_000_000, "maxPosition": 2}]},
        {"name": "desk-b", "secretRef": {"name": "desk-b-keys"}},  # the stack's limits: maxPosition 10
    ]  # fmt: skip
    authed, bearer = with_accounts(platform, monkeypatch, keys, accounts)
    with contextlib.ExitStack() as stack:
        servers = authed.serve_all(stack)
        oms_server, pnl_server = servers[ServiceName.OMS], servers[ServiceName.PNL]

        def held() -> dict[str | None, float]:
            rows = pnl_server.get("/positions")[1]
            return {row.get("account"): row["quantity"] for row in rows if row["symbol"] == "BTCUSDT"}

        for account in keys:
            status, placed = oms_server.post("/orders", order(f"{account}-1", "buy", 2), bearer[account])
            assert status == 201, placed
            assert final(oms_server, placed["order_id"], "filled", bearer[account])["account"] == account
        wait_for(lambda: held() == {"desk-a": 2, "desk-b": 2}, 15, "a position per account")

        # desk-a is at its own limit; desk-b, on the same symbol, is far from the stack's.
        def decided(account: str, client_order_id: str) -> dict[str, Any]:
            status, body = oms_server.post("/orders", order(client_order_id, "buy", 1), bearer[account])
            assert status == 201, body
            return dict(body)

        assert decided("desk-a", "desk-a-2")["status"] == "rejected"
        assert decided("desk-b", "desk-b-2")["status"] == "routed"
        wait_for(lambda: held() == {"desk-a": 2, "desk-b": 3}, 15, "desk-b's position alone grown")
        fills = [json.loads(data) for _, data in authed.messages("FILLS")]
        assert sorted({f["account"] for f in fills}) == ["desk-a", "desk-b"]


def test_routing_marks_are_cleared_in_one_redis_call_per_burst(platform: Platform) -> None:
    """After JetStream's ack each order's 'unrouted' mark goes; a burst of orders clears theirs in one
    call, not one round trip each (the OMS's hot path had one ZREM per order)."""

    async def burst() -> tuple[int, int]:
        client = aioredis.from_url(platform.redis.url)
        store = OrderStore(client)
        placed = []
        for n in range(50):
            request = OrderRequest.model_validate(order(f"burst-{n}", "buy", 1))
            decided = Order.new(f"o{n:04d}", request, None).moved(OrderStatus.RISK_CHECKED).moved(OrderStatus.ROUTED)
            placed.append((await store.claim(decided, unrouted=True))[0])
        assert await client.zcard(UNROUTED_KEY) == 50
        await client.config_resetstat()
        for stored in placed:
            store.mark_routed(stored.order.order_id)
        await store.routed_flushed()
        calls = (await client.info("commandstats")).get("cmdstat_zrem", {}).get("calls", 0)
        left = await client.zcard(UNROUTED_KEY)
        await client.aclose()
        return calls, left

    assert asyncio.run(burst()) == (1, 0)
