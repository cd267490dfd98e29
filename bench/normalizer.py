"""ticks -> normalizer -> QuestDB ticks and one-minute bars, against the raw JetStream consume rate.

QuestDB cannot run here: the normaliser writes to the strict QuestDB double in a process of
its own, so the figure includes the double's (Python) line-protocol parsing, not QuestDB's.
Correctness: every tick is stored once and the bars count every tick.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from datetime import UTC, datetime, timedelta

import nats
from prometheus_client import REGISTRY

from bench.lake import _raw_consume
from bench.report import Measure
from bench.servers import cpu_seconds, nats_server, questdb_double
from tradingstack.backends.jetstream import JetStreamProvisioner
from tradingstack.backends.questdb import QuestDBProvisioner
from tradingstack.plan import StackRef, build_plan, parse_spec
from tradingstack_services.marketdata.normalizer import Normalizer
from tradingstack_services.platform.settings import ServiceSettings

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
T0 = datetime(2026, 1, 2, 9, 30, tzinfo=UTC)


async def _publish(url: str, count: int) -> None:
    """Ticks 1 ms apart (distinct keys, so the expected rows are exactly `count`)."""
    nc = await nats.connect(url)
    for i in range(count):
        symbol = SYMBOLS[i % len(SYMBOLS)]
        ts = T0 + timedelta(milliseconds=i)
        tick = {"tick_id": f"t{i}", "symbol": symbol, "timestamp": ts.isoformat(), "price": 100 + i % 13,
                "size": 1 + i % 5, "venue": "bench", "exchange": "X"}  # fmt: skip
        await nc.publish(f"market.tick.{symbol}", json.dumps(tick).encode())
    await nc.flush()
    await nc.close()


def _normalized() -> float:
    return REGISTRY.get_sample_value("tradingstack_normalizer_ticks_total") or 0.0


async def _normalize(settings: ServiceSettings, url: str, count: int) -> float:
    # Progress from the normaliser's own counter: polling consumer info on nats-server 2.9 while a pull
    # is waiting makes the server cut that pull short (measured: batches of ~1,500 a second, not 5,000).
    nc = await nats.connect(url)
    stop = asyncio.Event()
    done_before = _normalized()
    started = time.perf_counter()
    task = asyncio.create_task(Normalizer(settings).run(nc, stop))
    while not task.done() and _normalized() - done_before < count:  # noqa: ASYNC110 (polls a counter)
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - started
    stop.set()
    await task
    await nc.close()
    return count / elapsed


def _stored(normalizer: Normalizer, count: int) -> int:
    """Ticks the bars account for, rebuilt from QuestDB by the normaliser itself, minute by minute."""
    bars = (
        normalizer.rebuild(symbol, T0 + timedelta(minutes=m)) for m in range(count // 60_000 + 2) for symbol in SYMBOLS
    )
    return sum(bar.trades for bar in bars if bar is not None)


def run(quick: bool, duration: float | None = None) -> list[Measure]:
    count = 20_000 if quick else 100_000
    if duration:
        count = int(duration * 5_000)  # a few thousand ticks/s through the double: about that long
    with nats_server() as url, questdb_double() as (questdb_url, double_pid):
        spec = {"infrastructure": {"nats": {"url": url}, "questdb": {"url": questdb_url}}}
        plan = build_plan(StackRef("bench", "bench"), parse_spec(spec))
        JetStreamProvisioner(url).reconcile(plan)
        QuestDBProvisioner(questdb_url).reconcile(plan)
        asyncio.run(_publish(url, count))
        floor = asyncio.run(_raw_consume(url, count))
        config = next(w.config for w in plan.workloads if w.service.value == "normalizer")
        settings = ServiceSettings(**config)  # type: ignore[arg-type]
        before = {"normalizer": cpu_seconds(os.getpid()), "QuestDB double": cpu_seconds(double_pid)}
        rate = asyncio.run(_normalize(settings, url, count))
        after = {"normalizer": cpu_seconds(os.getpid()), "QuestDB double": cpu_seconds(double_pid)}
        shares = ", ".join(f"{k} {sum(after[k]) - sum(before[k]):.1f} s" for k in before)
        print(f"normalizer CPU for {count} ticks: {shares}")
        stored = _stored(Normalizer(settings), count)
    return [
        Measure("normalizer ticks -> bars", rate, "ticks/s", floor, target=50_000, note=f"{count} ticks, double"),
        Measure("normalizer ticks lost or doubled", abs(stored - count), "ticks", None, target=0, lower_is_better=True,
                note=f"{stored} of {count} ticks in the bars"),
    ]  # fmt: skip
