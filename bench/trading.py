"""risk, oms and the order -> fill -> position path, each service in its own process, on real servers.

Floors measured in the same run, with the same client: a bare FastAPI/uvicorn echo endpoint
(for HTTP latency and rate), raw NATS request-reply (for the order path), an empty function
call (for the in-process risk decision). Correctness is checked after the load: every
accepted order filled once and applied to positions once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import statistics
import time
import timeit
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import nats
import redis

from bench.report import Measure
from bench.servers import cpu_seconds, free_port, nats_server, questdb_double, redis_server, service
from tradingstack.api import RiskLimit, ServiceName
from tradingstack.backends.jetstream import JetStreamProvisioner
from tradingstack.backends.questdb import QuestDBProvisioner
from tradingstack.plan import StackRef, build_plan, parse_spec
from tradingstack_services.trading import pnl as pnl_module
from tradingstack_services.trading.risk import CheckRequest, check

SYMBOL = "BTCUSDT"
CONNECTIONS = 32


class Connection:
    """A keep-alive HTTP/1.1 connection doing one request at a time: as little client cost as possible."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
        self.writer.write(head.encode() + b"\r\n\r\n" + body)
        headers = await self.reader.readuntil(b"\r\n\r\n")
        status = int(headers[9:12])
        length = 0
        for line in headers.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


@dataclass
class Load:
    """Latencies and answers of one load, and how long it took."""

    started: float = field(default_factory=time.perf_counter)
    latencies: list[float] = field(default_factory=list)
    offsets: list[float] = field(default_factory=list)  # when each request was due, from the start
    statuses: dict[int, int] = field(default_factory=dict)
    elapsed: float = 0.0

    def record(self, status: int, since: float) -> None:
        self.latencies.append(time.perf_counter() - since)
        self.offsets.append(since - self.started)
        self.statuses[status] = self.statuses.get(status, 0) + 1

    def done(self) -> Load:
        self.elapsed = time.perf_counter() - self.started
        return self

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.elapsed


Body = Callable[[int], bytes]  # the request body for request number i


async def open_loop(port: int, path: str, body: Body, rate: float, seconds: float) -> Load:
    """`rate` requests a second on a schedule; latency counts from the scheduled time (no coordinated omission)."""
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(CONNECTIONS):
        pool.put_nowait(await Connection.open(port))
    load = Load(started=time.perf_counter() + 0.05)

    async def one(i: int, due: float) -> None:
        conn = await pool.get()
        status, _ = await conn.post(path, body(i))
        load.record(status, since=due)
        pool.put_nowait(conn)

    tasks = []
    for i in range(int(rate * seconds)):
        due = load.started + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, due)))
    await asyncio.gather(*tasks)
    load.done()
    while not pool.empty():
        pool.get_nowait().close()
    return load


async def closed_loop(port: int, path: str, body: Body, seconds: float) -> Load:
    """As fast as CONNECTIONS clients, each waiting for its answer, can go: the sustainable rate."""
    load = Load()
    counter = itertools.count()
    deadline = load.started + seconds

    async def client() -> None:
        conn = await Connection.open(port)
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            status, _ = await conn.post(path, body(next(counter)))
            load.record(status, since=sent)
        conn.close()

    await asyncio.gather(*(client() for _ in range(CONNECTIONS)))
    return load.done()


async def sequential(port: int, path: str, body: Body, count: int) -> Load:
    conn = await Connection.open(port)
    load = Load()
    for i in range(count):
        sent = time.perf_counter()
        status, _ = await conn.post(path, body(i))
        load.record(status, since=sent)
    conn.close()
    return load.done()


def order_body(run: str) -> Body:
    # Alternate buys and sells of 1, so positions stay far inside the risk limits whatever the count.
    def body(i: int) -> bytes:
        side = "buy" if i % 2 == 0 else "sell"
        return json.dumps({"client_order_id": f"{run}-{i}", "symbol": SYMBOL, "side": side, "quantity": 1}).encode()

    return body


CHECK_BODY = json.dumps({"symbol": SYMBOL, "quantity": 1, "side": "buy", "price": 100.0}).encode()


def risk_in_process(quick: bool) -> list[Measure]:
    request = CheckRequest(symbol=SYMBOL, quantity=1, side="buy", price=100.0)
    limit = RiskLimit(symbol=SYMBOL)
    number = 20_000 if quick else 200_000
    per_check = min(timeit.repeat(lambda: check(request, limit, 0.0), number=number, repeat=5)) / number
    per_call = min(timeit.repeat(lambda: None, number=number, repeat=5)) / number
    return [Measure("risk check in-process", per_check * 1e6, "us", per_call * 1e6, target=20, lower_is_better=True)]


async def order_to_position(url: str, oms_port: int, count: int) -> tuple[list[float], list[float]]:
    """Per order: POST to the OMS until pnl announces the position after its fill; floor: NATS request-reply."""
    nc = await nats.connect(url)
    events: asyncio.Queue[str] = asyncio.Queue()

    async def on_position(msg: Any) -> None:
        events.put_nowait(json.loads(msg.data)["fill"]["fill_id"])

    async def echo(msg: Any) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(f"positions.{SYMBOL}", cb=on_position)
    await nc.subscribe("bench.echo", cb=echo)
    conn = await Connection.open(oms_port)
    body = order_body(f"p-{uuid.uuid4().hex[:6]}")
    paths, floors = [], []
    for i in range(count):
        sent = time.perf_counter()
        status, answer = await conn.post("/orders", body(i))
        if status != 201:
            raise RuntimeError(f"order refused: {status} {answer[:200]!r}")
        order_id = json.loads(answer)["order_id"]
        while not (await asyncio.wait_for(events.get(), 10)).startswith(order_id):
            pass
        paths.append(time.perf_counter() - sent)
        sent = time.perf_counter()
        await nc.request("bench.echo", b"x" * 200, timeout=5)
        floors.append(time.perf_counter() - sent)
    conn.close()
    await nc.close()
    return paths, floors


def settle(redis_url: str, nats_url: str, expected_fills: int, timeout: float = 120) -> tuple[int, int]:
    """Wait for the pipeline to drain: (fills in the stream, which keeps one per fill id; fills pnl applied)."""

    async def stored_fills() -> int:
        nc = await nats.connect(nats_url)
        count = int((await nc.jetstream().stream_info("FILLS")).state.messages)
        await nc.close()
        return count

    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout
    while True:
        stored = asyncio.run(stored_fills())
        applied = sum(int(client.hlen(key)) for key in client.scan_iter(f"{pnl_module.APPLIED_PREFIX}*"))
        if (stored >= expected_fills and applied >= stored) or time.monotonic() > deadline:
            return stored, applied
        time.sleep(0.5)


@dataclass
class Platform:
    nats_url: str
    redis_url: str
    questdb_url: str
    ports: dict[str, int]
    pids: dict[str, int]

    def cpu(self) -> dict[str, tuple[float, float]]:
        return {name: cpu_seconds(pid) for name, pid in self.pids.items()}


@contextlib.contextmanager
def platform(nats_binary: str | None = None, sync_interval: str = "") -> Iterator[Platform]:
    with (
        nats_server(nats_binary, sync_interval) as url,
        redis_server() as redis_url,
        questdb_double() as (questdb_url, _),
    ):
        spec = {"symbols": [SYMBOL], "infrastructure": {"nats": {"url": url}, "redis": {"url": redis_url},
                                                         "questdb": {"url": questdb_url}}}  # fmt: skip
        plan = build_plan(StackRef("bench", "bench"), parse_spec(spec))
        JetStreamProvisioner(url).reconcile(plan)
        QuestDBProvisioner(questdb_url).reconcile(plan)
        asyncio.run(_tick(url))
        names = {ServiceName.RISK, ServiceName.OMS, ServiceName.EXEQ, ServiceName.PNL}
        ports = {s.value: free_port() for s in names} | {"echo": free_port()}
        pids = {"bench": os.getpid()}
        with contextlib.ExitStack() as stack:
            for workload in plan.workloads:
                if workload.service in names:
                    name = workload.service.value
                    pids[name] = stack.enter_context(service(name, workload.config, ports[name])).pid
            stack.enter_context(service("echo", {}, ports["echo"], module="bench.echo"))
            yield Platform(url, redis_url, questdb_url, ports, pids)


async def _tick(url: str) -> None:
    nc = await nats.connect(url)
    tick = {"symbol": SYMBOL, "timestamp": int(time.time() * 1000), "price": 100.0, "bid": 99.9, "ask": 100.1}
    await nc.jetstream().publish(f"market.tick.{SYMBOL}", json.dumps(tick).encode())
    await nc.close()


def run(quick: bool, duration: float | None = None) -> list[Measure]:
    seconds = duration or (2.0 if quick else 10.0)
    measures = risk_in_process(quick)
    with platform() as stack:
        url, redis_url = stack.nats_url, stack.redis_url
        oms, risk, echo_port = stack.ports["oms"], stack.ports["risk"], stack.ports["echo"]
        # risk over HTTP, one request at a time
        count = 500 if quick else 3_000
        risk_http = asyncio.run(sequential(risk, "/check", lambda _: CHECK_BODY, count))
        echo_http = asyncio.run(sequential(echo_port, "/echo", lambda _: CHECK_BODY, count))
        measures.append(Measure("risk check HTTP P50", risk_http.percentile(50), "ms", echo_http.percentile(50),
                                target=1.0, lower_is_better=True))  # fmt: skip

        # OMS one order at a time: the path's own latency, no queueing
        run_id = uuid.uuid4().hex[:6]
        alone = asyncio.run(sequential(oms, "/orders", order_body(f"q-{run_id}"), count // 2))
        echo_alone = asyncio.run(sequential(echo_port, "/echo", lambda _: CHECK_BODY, count // 2))
        accepted_alone = alone.statuses.get(201, 0)
        measures.append(Measure("oms order ack P50, one at a time", alone.percentile(50), "ms",
                                echo_alone.percentile(50), target=2, lower_is_better=True))  # fmt: skip

        # OMS at 1,000 orders/s, open loop
        steady = asyncio.run(open_loop(oms, "/orders", order_body(f"s-{run_id}"), 1_000, seconds))
        echo_steady = asyncio.run(open_loop(echo_port, "/echo", lambda _: CHECK_BODY, 1_000, seconds))
        accepted = accepted_alone + steady.statuses.get(201, 0)
        note = f"{len(steady.latencies)} orders in {steady.elapsed:.1f} s; statuses {steady.statuses}"
        measures += [
            Measure("oms order ack P50 @1000/s", steady.percentile(50), "ms", echo_steady.percentile(50), target=2,
                    lower_is_better=True, note=note),
            Measure("oms order ack P99 @1000/s", steady.percentile(99), "ms", echo_steady.percentile(99), target=10,
                    lower_is_better=True),
            Measure("oms achieved rate @1000/s", steady.rate, "orders/s", echo_steady.rate, target=990),
        ]  # fmt: skip

        # OMS flat out
        cpu_before = stack.cpu()
        flat = asyncio.run(closed_loop(oms, "/orders", order_body(f"m-{run_id}"), min(seconds, 5.0)))
        stored_so_far = settle(redis_url, url, accepted + flat.statuses.get(201, 0))[1]
        orders = max(1, len(flat.latencies))
        cpu = {k: [(now - then) / orders * 1e6 for now, then in zip(v, cpu_before[k], strict=True)]
               for k, v in stack.cpu().items()}  # fmt: skip
        shares = ", ".join(f"{k} {u:,.0f}+{s:,.0f}" for k, (u, s) in cpu.items())
        print(f"CPU per order flat out, user+system us: {shares} (pipeline drained: {stored_so_far} fills applied)")
        echo_flat = asyncio.run(closed_loop(echo_port, "/echo", lambda _: CHECK_BODY, min(seconds, 5.0)))
        accepted += flat.statuses.get(201, 0)
        measures.append(Measure("oms max sustainable rate", flat.rate, "orders/s", echo_flat.rate, target=5_000,
                                note=f"{CONNECTIONS} clients; statuses {flat.statuses}"))  # fmt: skip

        # correctness: every accepted order filled once, applied once
        stored, applied = settle(redis_url, url, accepted)
        measures.append(Measure("orders lost or duplicated", abs(accepted - stored) + abs(stored - applied), "orders",
                                None, target=0, lower_is_better=True,
                                note=f"{accepted} accepted, {stored} fills stored, {applied} applied"))  # fmt: skip

        # order -> fill -> position, one at a time on a quiet pipeline
        paths, floors = asyncio.run(order_to_position(url, oms, 100 if quick else 500))
        measures.append(Measure("order -> position visible P50", statistics.median(paths) * 1000, "ms",
                                statistics.median(floors) * 1000, target=5, lower_is_better=True))  # fmt: skip
    return measures
