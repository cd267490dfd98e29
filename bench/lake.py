"""ticks -> NATS -> sink -> Delta on S3, against the raw JetStream consume rate of the same messages."""

from __future__ import annotations

import asyncio
import time
import uuid

import nats
from nats.js import api as js_api

from bench.report import Measure
from bench.servers import nats_server, s3_server
from tradingstack.api import ServiceName
from tradingstack.backends import S3Credentials
from tradingstack.backends.jetstream import JetStreamProvisioner
from tradingstack.backends.s3 import S3Provisioner
from tradingstack.lake import MARKET_TICKS
from tradingstack.plan import StackRef, build_plan, durable_name, parse_spec
from tradingstack_services.marketdata.gateway import MockFeed
from tradingstack_services.marketdata.sink import LakeSink, tick_row
from tradingstack_services.marketdata.ticks import tick_json
from tradingstack_services.platform.settings import ServiceSettings


async def _publish(url: str, count: int) -> None:
    feed = MockFeed(["BTCUSDT", "ETHUSDT", "SOLUSDT"], seed=1)
    nc = await nats.connect(url)
    symbols = list(feed.prices)
    for i in range(count):
        tick = feed.tick(symbols[i % 3])
        await nc.publish(f"market.tick.{tick.symbol}", tick_json(tick))
    await nc.flush()
    await nc.close()


async def _raw_consume(url: str, count: int) -> float:
    """The floor: a bare pull consumer fetching and acking the same messages, no parsing, no writes."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    config = js_api.ConsumerConfig(durable_name="bench-raw", filter_subject="market.tick.>",
                                   ack_policy=js_api.AckPolicy.EXPLICIT, max_ack_pending=100_000)  # fmt: skip
    await nc.jsm().add_consumer("MARKET_TICKS", config)
    sub = await js.pull_subscribe_bind(durable="bench-raw", stream="MARKET_TICKS")
    seen, started = 0, time.perf_counter()
    while seen < count:
        for msg in await sub.fetch(5_000, timeout=5):
            await msg.ack()
            seen += 1
    elapsed = time.perf_counter() - started
    await nc.close()
    return count / elapsed


async def _sink(settings: ServiceSettings, url: str, count: int) -> tuple[float, float]:
    sink = LakeSink(settings, MARKET_TICKS, tick_row)
    nc = await nats.connect(url)
    stop = asyncio.Event()
    started = time.perf_counter()
    task = asyncio.create_task(sink.run(nc, stop))
    while sink.rows_committed < count and not task.done():  # noqa: ASYNC110 (polls a counter)
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - started
    stop.set()
    await task
    await nc.close()
    return count / elapsed, elapsed


def run(quick: bool, duration: float | None = None) -> list[Measure]:
    # Enough ticks that the 1 s flush age of the last batch does not dominate the figure.
    count = 100_000 if quick else 300_000
    if duration:  # about 20k ticks/s today: size the load to last about that long
        count = int(duration * 20_000)
    with nats_server() as url, s3_server() as s3:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        spec = {"infrastructure": {"nats": {"url": url}, "s3": {"endpoint": s3, "allowHttp": True, "bucket": bucket}}}
        plan = build_plan(StackRef("bench", "bench"), parse_spec(spec))
        JetStreamProvisioner(url).reconcile(plan)
        S3Provisioner(plan.spec.infrastructure.s3, S3Credentials("bench", "bench-secret")).reconcile(plan)
        asyncio.run(_publish(url, count))
        floor = asyncio.run(_raw_consume(url, count))
        settings = ServiceSettings(
            SERVICE_NAME="sink-ticks", NATS_URL=url, S3_ENDPOINT_URL=s3, S3_BUCKET=bucket, AWS_ALLOW_HTTP=True,
            AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret", NATS_STREAM="MARKET_TICKS",
            NATS_DURABLE=durable_name(plan.stack, ServiceName.SINK_TICKS), NATS_FILTER_SUBJECT="market.tick.>",
        )  # fmt: skip
        rate, elapsed = asyncio.run(_sink(settings, url, count))
        commits_per_s = asyncio.run(_commit_rate(settings, elapsed))
        rows, distinct = _lake_counts(settings)
    return [
        Measure("sink ticks -> Delta on S3", rate, "ticks/s", floor, target=50_000, note=f"{count} ticks"),
        Measure("sink / raw consume", rate / floor, "ratio", 1.0, target=0.5),
        Measure("sink commits per second", commits_per_s, "commits/s", None, target=1.2, lower_is_better=True),
        Measure("sink ticks lost or doubled", abs(count - distinct) + (rows - distinct), "ticks", None, target=0,
                lower_is_better=True, note=f"{rows} rows, {distinct} distinct tick ids, {count} published"),
    ]  # fmt: skip


def _lake_counts(settings: ServiceSettings) -> tuple[int, int]:
    """(rows, distinct tick ids) in the Delta table, read back."""
    from deltalake import DeltaTable, QueryBuilder

    table = DeltaTable(MARKET_TICKS.uri(settings.S3_BUCKET), storage_options=settings.storage_options())
    result = QueryBuilder().register("t", table).execute("SELECT count(*), count(DISTINCT tick_id) FROM t")
    batch = next(iter(result))
    rows, distinct = (column.to_pylist()[0] for column in batch.columns)
    return int(rows), int(distinct)


async def _commit_rate(settings: ServiceSettings, elapsed: float) -> float:
    from deltalake import DeltaTable

    table = await asyncio.to_thread(
        DeltaTable, MARKET_TICKS.uri(settings.S3_BUCKET), storage_options=settings.storage_options()
    )
    commits = len([c for c in table.history() if c.get("operation") == "WRITE"])
    return commits / elapsed
