"""Two processes of one service writing one state, as a rolling update's overlap does.

Each child process builds the service's real state writer (pnl, ptrc, the compliance-scanner)
against one real redis-server and applies its own share of the events, one at a time, as fast as
it can; the state that results must hold every event of both, exactly once.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from questdb_double import QuestDBDouble
from tradingstack.backends.questdb import QuestDBProvisioner
from tradingstack.plan import StackRef, build_plan, parse_spec
from tradingstack_services.platform.settings import ServiceSettings
from tradingstack_services.trading.model import Fill, Order, OrderStatus

from conftest import RedisServer

EVENTS_EACH = 200
START = datetime(2026, 1, 2, 9, 30, tzinfo=UTC)


def _settings(service: str, redis_url: str, questdb_url: str) -> ServiceSettings:
    return ServiceSettings(SERVICE_NAME=service, REDIS_URL=redis_url, QUESTDB_URL=questdb_url, SYMBOLS="BTCUSDT")


def _fills(worker: int) -> list[Fill]:
    return [Fill(fill_id=f"f-{worker}-{i}", order_id=f"o-{worker}-{i}", account="desk", symbol="BTCUSDT",
                 side="buy", quantity=1.0, price=100.0 + i % 7, ts=START + timedelta(milliseconds=i))
            for i in range(EVENTS_EACH)]  # fmt: skip


def _orders(worker: int) -> list[Order]:
    return [Order(order_id=f"o-{worker}-{i}", client_order_id=f"c-{worker}-{i}", account="desk", symbol="BTCUSDT",
                  side="buy", quantity=1.0, order_type="limit", limit_price=100.0, status=OrderStatus.ROUTED,
                  created_at=START + timedelta(seconds=i), updated_at=START + timedelta(seconds=i))
            for i in range(EVENTS_EACH)]  # fmt: skip


def _apply_in_a_process(service: str, worker: int, redis_url: str, questdb_url: str, go: Any) -> None:
    """A child process: its own connections, its own event loop, then every event one at a time."""
    import redis.asyncio as aioredis

    from tradingstack_services.oversight.compliance import Scanner
    from tradingstack_services.oversight.reports import Ptrc
    from tradingstack_services.trading.pnl import Pnl

    async def main() -> None:
        settings = _settings(service, redis_url, questdb_url)
        client = aioredis.Redis.from_url(redis_url)
        go.wait(30)  # both start together, so their reads and writes interleave
        if service == "pnl":
            pnl = Pnl(settings, client)
            for fill in _fills(worker):
                await pnl.apply([fill])
        elif service == "ptrc":
            ptrc = Ptrc(settings, client)
            for fill in _fills(worker):
                await ptrc.apply([fill])
        else:
            scanner = Scanner(settings, client)
            for order in _orders(worker):
                await scanner.judged(f"event-{order.order_id}", order)
        await client.aclose()

    asyncio.run(main())


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[str, str]]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        with QuestDBDouble() as qdb:
            spec = parse_spec({"symbols": ["BTCUSDT"], "services": {"compliance-scanner": {"enabled": True}}})
            assert QuestDBProvisioner(qdb.url).reconcile(build_plan(StackRef("two", "ns"), spec)).ok
            yield server.url, qdb.url
    finally:
        server.stop()


def _run_two(service: str, redis_url: str, questdb_url: str) -> None:
    context = multiprocessing.get_context("spawn")
    go = context.Event()
    workers = [context.Process(target=_apply_in_a_process, args=(service, w, redis_url, questdb_url, go))
               for w in (1, 2)]  # fmt: skip
    for worker in workers:
        worker.start()
    go.set()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0, f"{service} worker {worker.name} exited with {worker.exitcode}"


def test_two_pnl_processes_lose_no_fill(servers: tuple[str, str]) -> None:
    from tradingstack_services.trading.model import Position
    from tradingstack_services.trading.pnl import DETAILS_KEY
    from tradingstack_services.trading.risk import POSITIONS_KEY

    _run_two("pnl", *servers)
    client = redis.Redis.from_url(servers[0])
    position = Position.model_validate_json(client.hget(DETAILS_KEY, "desk/BTCUSDT"))  # type: ignore[arg-type]
    assert position.quantity == 2 * EVENTS_EACH
    assert float(client.hget(POSITIONS_KEY, "desk/BTCUSDT")) == 2 * EVENTS_EACH  # type: ignore[arg-type]
    expected_cost = 2 * sum(100.0 + i % 7 for i in range(EVENTS_EACH))
    assert position.avg_price * position.quantity == pytest.approx(expected_cost)


def test_two_ptrc_processes_lose_no_fill(servers: tuple[str, str]) -> None:
    from tradingstack_services.oversight.reports import POSITIONS_KEY, Ledger, ledger_key
    from tradingstack_services.trading.model import Position

    _run_two("ptrc", *servers)
    client = redis.Redis.from_url(servers[0])
    running = Position.model_validate_json(client.hget(POSITIONS_KEY, "desk/BTCUSDT"))  # type: ignore[arg-type]
    assert running.quantity == 2 * EVENTS_EACH
    ledger = Ledger.model_validate_json(client.hget(ledger_key("2026-01-02"), "desk/BTCUSDT"))  # type: ignore[arg-type]
    assert ledger.trades == 2 * EVENTS_EACH
    assert ledger.bought == 2 * EVENTS_EACH


def test_two_compliance_processes_count_every_order(servers: tuple[str, str]) -> None:
    from tradingstack_services.oversight.compliance import STATE_PREFIX
    from tradingstack_services.oversight.rules import AccountState

    _run_two("compliance-scanner", *servers)
    client = redis.Redis.from_url(servers[0])
    state = AccountState.model_validate_json(client.get(STATE_PREFIX + "desk"))  # type: ignore[arg-type]
    assert len(state.orders) == 2 * EVENTS_EACH
    assert sum(c[0] for c in state.counts.values()) == 2 * EVENTS_EACH
