"""Replicas on one durable consumer: the tick sink (concurrent Delta appends through S3 conditional
puts) and the normalizer, one replica against two, each a `tradingstack service` process.

Every round starts on fresh servers and publishes the ticks first, then starts its replicas at once;
once every replica is ready, the rate is the ticks handled from then on over the time to the last
one (the start-up, when not all replicas run yet, is left out), each replica's share from its own
/metrics. Correctness: the Delta table holds every tick exactly
once; every stored bar equals the bar rebuilt from all the ticks of its minute (two normalizers
write bars of the same minute).
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from bench.lake import _lake_counts
from bench.normalizer import SYMBOLS, T0
from bench.normalizer import _publish as publish_ticks
from bench.report import Measure
from bench.servers import free_port, nats_server, questdb_double, replicas, s3_server
from tradingstack.api import ServiceName
from tradingstack.backends import S3Credentials
from tradingstack.backends.jetstream import JetStreamProvisioner
from tradingstack.backends.questdb import QuestDBProvisioner
from tradingstack.backends.s3 import S3Provisioner
from tradingstack.plan import StackRef, build_plan, parse_spec
from tradingstack_services.marketdata.normalizer import Normalizer
from tradingstack_services.platform.settings import ServiceSettings

COUNTERS = {
    ServiceName.SINK_TICKS: "tradingstack_sink_rows_total",
    ServiceName.NORMALIZER: "tradingstack_normalizer_ticks_total",
}


def handled(port: int, metric: str) -> float:
    """The replica's own count of ticks handled, from its /metrics (-1 while it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return -1.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(metric))


@dataclass
class Round:
    rate: float  # ticks/s over all replicas
    shares: list[float]  # each replica's ticks/s
    wrong: int  # ticks lost or doubled, or bars that differ from their ticks
    found: str


def one_round(service_name: ServiceName, replica_count: int, count: int) -> Round:
    with (
        nats_server() as url,
        s3_server() as s3,
        questdb_double() as (questdb_url, _),
    ):
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        spec = {"symbols": list(SYMBOLS), "infrastructure": {
            "nats": {"url": url}, "questdb": {"url": questdb_url},
            "s3": {"endpoint": s3, "allowHttp": True, "bucket": bucket}}}  # fmt: skip
        plan = build_plan(StackRef("bench", "bench"), parse_spec(spec))
        JetStreamProvisioner(url).reconcile(plan)
        QuestDBProvisioner(questdb_url).reconcile(plan)
        S3Provisioner(plan.spec.infrastructure.s3, S3Credentials("bench", "bench-secret")).reconcile(plan)
        config = next(w.config for w in plan.workloads if w.service == service_name)
        config |= {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret"}
        ports = [free_port() for _ in range(replica_count)]
        metric = COUNTERS[service_name]
        asyncio.run(publish_ticks(url, count))
        # Started together, not one by one: the first would have the stream to itself while the next starts.
        with replicas(service_name.value, config, ports):
            started, before = time.perf_counter(), [handled(p, metric) for p in ports]
            deadline = started + 600
            while sum(counts := [handled(p, metric) for p in ports]) < count and time.perf_counter() < deadline:
                time.sleep(0.1)
            elapsed = time.perf_counter() - started
            refused = sum(handled(p, "tradingstack_sink_commit_failures_total") for p in ports)
        counts = [after - first for after, first in zip(counts, before, strict=True)]
        settings = ServiceSettings(**config)  # type: ignore[arg-type]
        if service_name == ServiceName.SINK_TICKS:
            rows, distinct = _lake_counts(settings)
            found = f"{rows} rows, {distinct} distinct of {count}, {refused:.0f} commit(s) refused and retried"
            wrong = abs(count - distinct) + (rows - distinct)
        else:
            wrong, found = _bars_wrong(Normalizer(settings), count)
    return Round(
        sum(counts) / elapsed,
        [c / elapsed for c in counts],
        wrong,
        f"{found}; {sum(before):.0f} handled during start-up",
    )


def _bars_wrong(normalizer: Normalizer, count: int) -> tuple[int, str]:
    """Stored bars that differ from the bar rebuilt from every tick of their minute, and how many there are."""
    stored = normalizer.questdb.query("SELECT symbol, ts, trades FROM ohlcv_1m")["dataset"]
    wrong = 0
    for symbol, ts, trades in stored:
        minute = datetime.fromtimestamp(ts / 1_000_000, UTC)
        rebuilt = normalizer.rebuild(symbol, minute)
        wrong += rebuilt is None or rebuilt.trades != trades
    minutes = count // 60_000 + 1
    return wrong, f"{len(stored)} bars ({minutes} minute(s) x {len(SYMBOLS)} symbols from {T0:%H:%M})"


def run(quick: bool, duration: float | None = None) -> list[Measure]:
    count = 30_000 if quick else 100_000
    if duration:
        count = int(duration * 10_000)
    measures = []
    for service_name, label in ((ServiceName.SINK_TICKS, "sink"), (ServiceName.NORMALIZER, "normalizer")):
        one, two = one_round(service_name, 1, count), one_round(service_name, 2, count)
        each = " + ".join(f"{s:,.0f}" for s in two.shares)
        measures += [
            Measure(f"{label} x2 replicas", two.rate, "ticks/s", one.rate, note=f"per replica {each}; {count} ticks"),
            Measure(f"{label} x2 lost, doubled or wrong", two.wrong, "ticks", None, target=0, lower_is_better=True,
                    note=f"two: {two.found}; one: {one.found}, {one.wrong} wrong"),
        ]  # fmt: skip
    return measures
