"""Fault injection on the trading path (the short mode of the fault suite): orders flow at a steady
rate through risk, oms, exeq and pnl, each a real process as in its container, on real
nats-server and redis-server (append-only, fsync always, as a production Redis would keep orders),
while the test SIGKILLs and restarts every service and restarts NATS and Redis, one at a time.

At the end it checks from the stores themselves: every order a client placed (retrying the same
client_order_id until it got an answer, as the API asks) exists once and is filled once; every
fill in the FILLS stream once; pnl's position equal to a replay of those fills. It prints the
table: fault, count, recovered in, lost, duplicated.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from questdb_double import QuestDBDouble
from tradingstack.api import ServiceName
from tradingstack.backends.jetstream import JetStreamProvisioner
from tradingstack.backends.questdb import QuestDBProvisioner
from tradingstack.plan import Plan, StackRef, build_plan, parse_spec
from tradingstack_services.trading import Fill, Position

from conftest import NatsServer, RedisServer, free_port, http_json, wait_for

SERVICES = [ServiceName.RISK, ServiceName.OMS, ServiceName.EXEQ, ServiceName.PNL]
LIMITS = [{"symbol": "BTCUSDT", "maxQuantity": 10, "maxNotional": 10_000_000, "maxPosition": 1_000_000}]


class DurableRedis(RedisServer):
    def arguments(self) -> list[str]:
        return ["--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "yes",
                "--appendfsync", "always", "--dir", str(self.root)]  # fmt: skip


@dataclass
class Service:
    name: ServiceName
    env: dict[str, str]
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "tradingstack.cli", "service", self.name.value],
                                            env=self.env, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def call(self, path: str, body: Any = None) -> tuple[int, Any]:
        return http_json(f"http://127.0.0.1:{self.port}{path}", body, timeout=5)

    def ready(self) -> bool:
        return self.call("/readyz")[0] == 200


@dataclass
class Platform:
    nats: NatsServer
    redis: DurableRedis
    plan: Plan
    services: dict[ServiceName, Service] = field(default_factory=dict)


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    nats_server, redis_server = NatsServer(tmp_path / "js"), DurableRedis(tmp_path / "redis")
    nats_server.start()
    redis_server.start()
    with QuestDBDouble() as qdb:
        spec = {"symbols": ["BTCUSDT"], "riskLimits": LIMITS, "delivery": {"maxDeliver": 200},
                "infrastructure": {"nats": {"url": nats_server.url}, "redis": {"url": redis_server.url},
                                   "questdb": {"url": qdb.url}}}  # fmt: skip
        plan = build_plan(StackRef("chaos", "ns"), parse_spec(spec))
        assert JetStreamProvisioner(nats_server.url).reconcile(plan).ok
        assert QuestDBProvisioner(qdb.url).reconcile(plan).ok
        platform = Platform(nats_server, redis_server, plan)
        for workload in plan.workloads:
            if workload.service in SERVICES:
                port = free_port()
                env = {**os.environ, **workload.config, "PORT": str(port), "LOG_FORMAT": "text"}
                platform.services[workload.service] = Service(
                    workload.service, env, port, tmp_path / f"{workload.service.value}.log"
                )
        try:
            yield platform
        finally:
            for service in platform.services.values():
                service.stop()
            redis_server.stop()
            nats_server.stop()


def publish_tick(url: str) -> None:
    import asyncio

    import nats

    async def go() -> None:
        nc = await nats.connect(url)
        body = {"symbol": "BTCUSDT", "timestamp": int(time.time() * 1000), "price": 100.0, "bid": 99.9, "ask": 100.1}
        await nc.jetstream().publish("market.tick.BTCUSDT", json.dumps(body).encode())
        await nc.close()

    asyncio.run(go())


def stream_messages(url: str, stream: str) -> list[tuple[str, bytes]]:
    import asyncio

    import nats

    async def go() -> list[tuple[str, bytes]]:
        nc = await nats.connect(url)
        js = nc.jetstream()
        state = (await js.stream_info(stream)).state
        out = []
        for seq in range(state.first_seq, state.last_seq + 1) if state.messages else []:
            msg = await js.get_msg(stream, seq)
            out.append((msg.subject, msg.data or b""))
        await nc.close()
        return out

    return asyncio.run(go())


class Client(threading.Thread):
    """Places orders at a steady rate; each is retried with its client_order_id until answered."""

    def __init__(self, oms: Service, rate: float) -> None:
        super().__init__(daemon=True)
        self.oms, self.interval = oms, 1.0 / rate
        self.placed: dict[str, str] = {}  # client_order_id -> order_id
        self.retries = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stopping.is_set():
            client_id = f"chaos-{n}"
            body = {"client_order_id": client_id, "symbol": "BTCUSDT", "side": "buy" if n % 3 else "sell",
                    "quantity": 1 + n % 4}  # fmt: skip
            while True:  # the API's contract: retry the same id until an answer
                status, answer = self.oms.call("/orders", body)
                if status in (200, 201):
                    self.placed[client_id] = answer["order_id"]
                    break
                assert status in (0, 503), (status, answer)  # never a 4xx/5xx for a valid order
                self.retries += 1
                time.sleep(0.2)
            n += 1
            time.sleep(self.interval)


def test_orders_survive_every_process_dying_exactly_once(platform: Platform) -> None:
    publish_tick(platform.nats.url)
    for service in platform.services.values():
        service.start()
    for service in platform.services.values():
        wait_for(service.ready, 60, f"{service.name.value} ready")
    client = Client(platform.services[ServiceName.OMS], rate=20)
    client.start()
    rows = []

    def recovered(fault: str, action: Any) -> None:
        before = len(client.placed)
        started = time.monotonic()
        action()
        wait_for(lambda: all(s.ready() for s in platform.services.values()), 90, f"ready after {fault}")
        wait_for(lambda: len(client.placed) > before + 5, 60, f"orders flowing after {fault}")
        rows.append((fault, time.monotonic() - started))

    time.sleep(2)
    for name in SERVICES:  # SIGKILL each service in turn, then start it again (what the kubelet does)
        service = platform.services[name]
        recovered(f"SIGKILL {name.value}", lambda service=service: (service.kill(), time.sleep(1), service.start()))
    recovered("restart nats-server", lambda: (platform.nats.stop(), time.sleep(2), platform.nats.start()))
    recovered("restart redis-server", lambda: (platform.redis.stop(), time.sleep(2), platform.redis.start()))
    time.sleep(2)
    client.stopping.set()
    client.join(60)

    oms = platform.services[ServiceName.OMS]

    def all_final() -> dict[str, dict[str, Any]] | None:
        orders = {cid: oms.call(f"/orders/{oid}")[1] for cid, oid in client.placed.items()}
        return orders if all(isinstance(o, dict) and o["status"] == "filled" for o in orders.values()) else None

    orders = wait_for(all_final, 120, "every placed order filled")
    fills = [Fill.model_validate_json(data) for subject, data in stream_messages(platform.nats.url, "FILLS")]
    by_id = {f.fill_id: f for f in fills}
    order_fills = [f for o in orders.values() for f in o["fills"]]
    lost = {f["fill_id"] for f in order_fills} - set(by_id)
    duplicated = len(fills) - len(by_id)
    expected = Position(symbol="BTCUSDT")
    for fill in fills:  # the stream's order is the order pnl applied them in
        if fill.fill_id in by_id and by_id.pop(fill.fill_id):
            expected = expected.apply(fill)

    def position() -> dict[str, Any] | None:
        rows_ = [p for p in platform.services[ServiceName.PNL].call("/positions")[1] if p["symbol"] == "BTCUSDT"]
        return rows_[0] if rows_ and rows_[0]["quantity"] == pytest.approx(expected.quantity) else None

    try:
        held = wait_for(position, 120, f"pnl's position equal to the replay ({expected.quantity})")
    except AssertionError:
        print("PNL", platform.services[ServiceName.PNL].call("/positions"), "EXPECTED", expected, "FILLS", len(fills))
        print(platform.services[ServiceName.PNL].log.read_text()[-6000:])
        raise
    print("\nfault                     recovered in   orders   retries   lost   duplicated")
    for fault, seconds in rows:
        print(f"{fault:<25} {seconds:>9.1f} s")
    print(f"{'total':<25} {'':>11} {len(client.placed):>8} {client.retries:>9} {len(lost):>6} {duplicated:>12}")
    assert len(set(client.placed.values())) == len(client.placed)  # one order per client id
    assert all(len(o["fills"]) == 1 for o in orders.values())  # market orders fill once, in full
    assert lost == set()
    assert duplicated == 0
    assert held["avg_price"] == pytest.approx(expected.avg_price)
    assert held["realized_pnl"] == pytest.approx(expected.realized_pnl)
