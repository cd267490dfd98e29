"""A long run of both paths at once: orders at SOAK_ORDER_RATE (1,000/s) through risk, oms, exeq and
pnl, and ticks at SOAK_TICK_RATE through the tick sink and the normalizer, plus a hostile feed of
ever-new symbols (the price books must keep only the symbols traded).

Reported: the order acknowledgement P50 and P99 for each minute (latency from each order's
scheduled time, so a backlog shows), the ticks each tick service handled, and every service's
resident memory at the start (after the first tenth of the run, once imports and caches are warm)
and at the end: a bounded service is flat, within 5%.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import nats

from bench.report import Measure
from bench.scaleout import COUNTERS, handled
from bench.servers import free_port, s3_server, service
from bench.trading import Load, Platform, open_loop, order_body, platform
from tradingstack.api import ServiceName
from tradingstack.backends import S3Credentials
from tradingstack.backends.s3 import S3Provisioner
from tradingstack.plan import StackRef, build_plan, parse_spec

ORDER_RATE = float(os.environ.get("SOAK_ORDER_RATE", "1000"))
TICK_RATE = float(os.environ.get("SOAK_TICK_RATE", "2000"))
HOSTILE = os.environ.get("SOAK_HOSTILE", "1") != "0"  # SOAK_HOSTILE=0: no ticks of ever-new symbols
TICK_SERVICES = (ServiceName.SINK_TICKS, ServiceName.NORMALIZER)
TICK_SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")


def rss_mb(pid: int) -> float | None:
    """Resident memory, None once the process is gone (or a zombie)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return None


async def _hostile_ticks(url: str, stop: threading.Event) -> int:
    """Ticks for a new symbol each time, a few hundred a second."""
    nc = await nats.connect(url)
    n = 0
    while not stop.is_set():
        symbol = f"X{n:08d}"
        tick = {"symbol": symbol, "timestamp": int(time.time() * 1000), "price": 1.0, "bid": 0.9, "ask": 1.1}
        await nc.publish(f"market.tick.{symbol}", json.dumps(tick).encode())
        n += 1
        if n % 100 == 0:
            await nc.flush()
            await asyncio.sleep(0.2)
    await nc.close()
    return n


async def _steady_ticks(url: str, rate: float, stop: threading.Event) -> int:
    """Ticks of the traded symbols at `rate` a second, each with its own id and time."""
    nc = await nats.connect(url)
    run, n, started = uuid.uuid4().hex[:6], 0, time.perf_counter()
    while not stop.is_set():
        due = int((time.perf_counter() - started) * rate)
        for i in range(n, due):
            symbol = TICK_SYMBOLS[i % len(TICK_SYMBOLS)]
            tick = {"tick_id": f"{run}-{i}", "symbol": symbol, "timestamp": datetime.now(UTC).isoformat(),
                    "price": 100 + i % 13, "size": 1 + i % 5, "venue": "soak", "exchange": "X"}  # fmt: skip
            await nc.publish(f"market.tick.{symbol}", json.dumps(tick).encode())
        n = max(n, due)
        await nc.flush()
        await asyncio.sleep(0.01)
    await nc.close()
    return n


@contextlib.contextmanager
def tick_path(stack: Platform) -> Iterator[dict[str, tuple[int, int]]]:
    """The sink and the normalizer as processes beside the trading services: name -> (pid, port)."""
    with s3_server() as s3:
        bucket = f"soak-{uuid.uuid4().hex[:8]}"
        spec = {"symbols": list(TICK_SYMBOLS), "infrastructure": {
            "nats": {"url": stack.nats_url}, "questdb": {"url": stack.questdb_url},
            "s3": {"endpoint": s3, "allowHttp": True, "bucket": bucket}}}  # fmt: skip
        plan = build_plan(StackRef("bench", "bench"), parse_spec(spec))
        S3Provisioner(plan.spec.infrastructure.s3, S3Credentials("bench", "bench-secret")).reconcile(plan)
        with contextlib.ExitStack() as processes:
            found = {}
            for workload in plan.workloads:
                if workload.service in TICK_SERVICES:
                    port = free_port()
                    config = workload.config | {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret"}
                    proc = processes.enter_context(service(workload.service.value, config, port))
                    found[workload.service.value] = (proc.pid, port)
            yield found


def per_minute(load: Load, seconds: float) -> list[tuple[int, float, float, int]]:
    """(minute, P50 ms, P99 ms, orders) by the minute each order was due in."""
    by_minute: dict[int, list[float]] = {}
    for offset, latency in zip(load.offsets, load.latencies, strict=True):
        by_minute.setdefault(min(int(offset // 60), max(0, int(seconds // 60) - 1)), []).append(latency * 1000)
    rows = []
    for minute, values in sorted(by_minute.items()):
        values.sort()
        rows.append((minute + 1, values[len(values) // 2], values[min(len(values) - 1, int(0.99 * len(values)))],
                     len(values)))  # fmt: skip
    return rows


def run(quick: bool, duration: float | None = None) -> list[Measure]:
    seconds = duration or (30.0 if quick else 120.0)
    with platform() as stack, tick_path(stack) as ticking:
        pids = {name: pid for name, pid in stack.pids.items() if name not in ("bench", "echo")}
        pids |= {name: pid for name, (pid, _) in ticking.items()}
        samples: dict[str, list[tuple[float, float | None]]] = {name: [] for name in pids}
        stop, feeding = threading.Event(), threading.Event()
        fed: dict[str, int] = {}
        feeds = [threading.Thread(target=lambda: fed.update(
            steady=asyncio.run(_steady_ticks(stack.nats_url, TICK_RATE, feeding))))]  # fmt: skip
        if HOSTILE:
            feeds.append(threading.Thread(
                target=lambda: fed.update(hostile=asyncio.run(_hostile_ticks(stack.nats_url, feeding)))))  # fmt: skip
        # The feeds run for the scheduled time; orders the OMS has not taken by then still finish.
        threading.Timer(seconds, feeding.set).start()
        for feed in feeds:
            feed.start()
        handled_before = {name: handled(port, COUNTERS[ServiceName(name)]) for name, (_, port) in ticking.items()}

        def sample() -> None:
            started = time.monotonic()
            while not stop.is_set():
                for name, series in samples.items():
                    series.append((time.monotonic() - started, rss_mb(pids[name])))
                stop.wait(1.0)

        sampler = threading.Thread(target=sample)
        sampler.start()
        load = asyncio.run(open_loop(stack.ports["oms"], "/orders", order_body(f"soak-{uuid.uuid4().hex[:6]}"),
                                     ORDER_RATE, seconds))  # fmt: skip
        stop.set()
        feeding.set()
        for feed in feeds:
            feed.join(30)
        sampler.join(10)
        offered = fed.get("steady", 0) + fed.get("hostile", 0)
        deadline = time.monotonic() + 15  # the last batches are still being committed

        def ticks_now() -> dict[str, float]:
            return {name: handled(port, COUNTERS[ServiceName(name)]) - handled_before[name]
                    for name, (_, port) in ticking.items()}  # fmt: skip

        while min((ticks_handled := ticks_now()).values()) < offered and time.monotonic() < deadline:
            time.sleep(0.5)

    note = (f"{len(load.latencies)} orders offered at {ORDER_RATE:,.0f}/s over {seconds:.0f} s (statuses "
            f"{load.statuses}), {fed.get('steady', 0)} ticks at {TICK_RATE:,.0f}/s, {fed.get('hostile', 0)} ticks "
            "of distinct symbols")  # fmt: skip
    measures = []
    for minute, p50, p99, orders in per_minute(load, seconds):
        measures += [
            Measure(f"soak minute {minute} order P50", p50, "ms", None, target=2, lower_is_better=True, note=note),
            Measure(f"soak minute {minute} order P99", p99, "ms", None, target=10, lower_is_better=True,
                    note=f"{orders} orders due in that minute"),
        ]  # fmt: skip
        note = ""
    for name, count in ticks_handled.items():  # hostile ticks are valid ticks too: both feeds count
        measures.append(Measure(f"soak {name} ticks handled", count / seconds, "ticks/s", offered / seconds,
                                target=0.99 * offered / seconds, note=f"{count:.0f} of {offered} ticks"))  # fmt: skip
    for name, series in samples.items():
        if any(rss is None for _, rss in series):
            died = next(at for at, rss in series if rss is None)
            measures.append(Measure(f"soak {name} exited", died, "s", None, target=0, lower_is_better=True,
                                    note="the process was gone at that time of the run"))  # fmt: skip
            continue
        warm = [rss for at, rss in series if at >= seconds / 10 and rss is not None]
        if len(warm) < 2:
            continue
        growth = (warm[-1] - warm[0]) / warm[0] * 100
        measures.append(Measure(f"soak {name} RSS growth", growth, "%", None, target=5.0, lower_is_better=True,
                                note=f"{warm[0]:.1f} MB -> {warm[-1]:.1f} MB"))  # fmt: skip
    return measures
