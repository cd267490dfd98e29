"""The normaliser on real NATS and the QuestDB double: ticks -> bars, exact, idempotent under replay."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import pytest

from questdb_double import QuestDBDouble
from tradingstack.api import ServiceName
from tradingstack.backends.jetstream import JetStreamProvisioner
from tradingstack.backends.questdb import QuestDBProvisioner
from tradingstack.plan import StackRef, build_plan, durable_name, parse_spec
from tradingstack_services.marketdata.normalizer import DEAD, Normalizer
from tradingstack_services.platform.settings import ServiceSettings

from conftest import NatsServer

T0 = datetime(2026, 1, 2, 9, 30, tzinfo=UTC)
NORMALIZER_DURABLE = durable_name(StackRef("e2e", "ns"), ServiceName.NORMALIZER)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[NatsServer, QuestDBDouble]]:
    server = NatsServer(tmp_path / "js")
    server.start()
    with QuestDBDouble() as qdb:
        plan = build_plan(StackRef("e2e", "ns"), parse_spec({"infrastructure": {"nats": {"url": server.url}}}))
        assert JetStreamProvisioner(server.url).reconcile(plan).ok
        assert QuestDBProvisioner(qdb.url).reconcile(plan).ok
        yield server, qdb
    server.stop()


def ticks() -> list[dict[str, Any]]:
    out = []
    for i in range(120):
        symbol = "BTCUSDT" if i % 2 else "ETHUSDT"
        ts = T0 + timedelta(seconds=i)  # two minutes of ticks
        out.append({"tick_id": f"t{i}", "symbol": symbol, "timestamp": ts.isoformat(), "price": 100 + (i % 7),
                    "size": 1 + i % 3, "venue": "v1", "exchange": "X"})  # fmt: skip
    return out


def expected_bars(data: list[dict[str, Any]]) -> dict[tuple[str, int], tuple[float, ...]]:
    bars: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for t in data:
        minute = int(datetime.fromisoformat(t["timestamp"]).replace(second=0).timestamp() * 1_000_000)
        bars.setdefault((t["symbol"], minute), []).append(t)
    return {
        key: (float(ts[0]["price"]), float(max(t["price"] for t in ts)), float(min(t["price"] for t in ts)),
              float(ts[-1]["price"]), float(sum(t["size"] for t in ts)), len(ts))
        for key, ts in bars.items()
    }  # fmt: skip


def stored_bars(qdb: QuestDBDouble) -> dict[tuple[str, int], tuple[float, ...]]:
    return {
        (r["symbol"], r["ts"]): (r["open"], r["high"], r["low"], r["close"], r["volume"], r["trades"])
        for r in qdb.state.tables["ohlcv_1m"].rows
    }


async def publish(url: str, payloads: list[bytes]) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    for payload in payloads:
        subject = f"market.tick.{json.loads(payload)['symbol']}" if payload.startswith(b'{"') else "market.tick.X"
        await js.publish(subject, payload)
    await nc.close()


def normalizer_settings(server: NatsServer, qdb: QuestDBDouble) -> ServiceSettings:
    """What the operator gives the normalizer, with small batches so a test spans many of them."""
    return ServiceSettings(  # type: ignore[call-arg]
        SERVICE_NAME="normalizer", NATS_URL=server.url, QUESTDB_URL=qdb.url, NATS_STREAM="MARKET_TICKS",
        NATS_DURABLE=NORMALIZER_DURABLE, SINK_FETCH_BATCH=25, SINK_MAX_AGE_SECONDS=0.3,
    )  # fmt: skip


async def run_until_drained(server: NatsServer, settings: ServiceSettings) -> None:
    nc = await nats.connect(server.url)
    stop = asyncio.Event()
    task = asyncio.create_task(Normalizer(settings).run(nc, stop))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = await nc.jsm().consumer_info("MARKET_TICKS", NORMALIZER_DURABLE)
        if info.num_pending == 0 and info.num_ack_pending == 0:
            break
        await asyncio.sleep(0.2)
    stop.set()
    await task
    await nc.close()


def unknown_symbols_refused() -> float:
    return sum(s.value for m in DEAD.collect() for s in m.samples
               if s.name.endswith("_total") and s.labels == {"reason": "unknown_symbol"})  # fmt: skip


def test_ticks_become_exact_bars_and_a_replay_changes_nothing(servers: Any) -> None:
    server, qdb = servers
    data = ticks()
    payloads = [json.dumps(t).encode() for t in data]
    # The same ten ticks twice (a producer retry without a message id), one broken tick, and one of a
    # symbol the stack does not list (every batch would rebuild a bar for it, a flood of them for each).
    stranger = json.dumps({**data[0], "symbol": "ZZZUSDT", "tick_id": "stranger"}).encode()
    asyncio.run(publish(server.url, payloads + payloads[:10] + [b"{broken", stranger]))
    settings = normalizer_settings(server, qdb)
    refused_before = unknown_symbols_refused()
    asyncio.run(run_until_drained(server, settings))

    assert stored_bars(qdb) == expected_bars(data)
    assert len(qdb.state.tables["ticks"].rows) == 120  # the duplicates were upserted, not added
    assert unknown_symbols_refused() - refused_before == 1

    async def published_bars() -> dict[str, Any]:
        nc = await nats.connect(server.url)
        sub = await nc.jetstream().pull_subscribe("market.bar.>", durable="inspect", stream="MARKET_BARS")
        latest: dict[str, Any] = {}
        try:
            while True:
                for msg in await sub.fetch(100, timeout=1):
                    bar = json.loads(msg.data)
                    latest[(bar["symbol"], bar["ts"])] = bar
        except TimeoutError:
            pass
        await nc.close()
        return latest

    latest = asyncio.run(published_bars())
    assert len(latest) == 4
    assert all(bar["trades"] == 30 for bar in latest.values())

    # A replay of everything (as after a crash before the acks) rewrites the very same rows.
    async def rewind() -> None:
        nc = await nats.connect(server.url)
        await nc.jsm().delete_consumer("MARKET_TICKS", NORMALIZER_DURABLE)
        await nc.close()

    before = stored_bars(qdb)
    asyncio.run(rewind())
    JetStreamProvisioner(server.url).reconcile(
        build_plan(StackRef("e2e", "ns"), parse_spec({"infrastructure": {"nats": {"url": server.url}}}))
    )
    asyncio.run(run_until_drained(server, settings))
    assert stored_bars(qdb) == before


def test_two_trades_in_one_microsecond_on_one_venue_are_two_ticks_and_count_in_the_bar(servers: Any) -> None:
    server, qdb = servers
    same_time = (T0 + timedelta(seconds=5)).isoformat()
    trades = [{"tick_id": f"burst-{i}", "symbol": "BTCUSDT", "timestamp": same_time, "price": 100 + i, "size": 1,
               "venue": "v1", "exchange": "X"} for i in range(3)]  # fmt: skip
    asyncio.run(publish(server.url, [json.dumps(t).encode() for t in trades]))
    settings = normalizer_settings(server, qdb)
    asyncio.run(run_until_drained(server, settings))
    assert len(qdb.state.tables["ticks"].rows) == 3
    ((_, _, _, _, volume, count),) = stored_bars(qdb).values()
    assert (volume, count) == (3.0, 3)


def test_bars_are_exact_while_questdb_applies_writes_late(servers: Any) -> None:
    # Real QuestDB acknowledges ILP into a WAL table before a SELECT can see it (the apply job runs
    # later): bars must not be built from what happens to be visible yet.
    server, qdb = servers
    qdb.state.apply_delay = 0.3
    data = ticks()
    asyncio.run(publish(server.url, [json.dumps(t).encode() for t in data]))
    settings = normalizer_settings(server, qdb)
    asyncio.run(run_until_drained(server, settings))
    time.sleep(0.5)  # the last bars' own writes applied
    qdb.state.apply_due()
    assert stored_bars(qdb) == expected_bars(data)
