"""execution-quality: slippage, latency and fill ratio by hand computation (pure), then through the
real trading path (OMS, risk, exeq, pnl) on real nats-server and redis-server and the QuestDB double."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tradingstack.api import ServiceName
from tradingstack_services.oversight import quality
from tradingstack_services.oversight.quality import fill_ratio, measure, reported_fill, slippage_bps, summarize
from tradingstack_services.trading.model import Order, OrderRequest, OrderStatus

from conftest import LiveServer, wait_for
from test_trading_e2e import FACTORIES, Platform, final, running_platform

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("side", "price", "arrival", "expected"),
    [("buy", 100.1, 100.0, 10.0), ("sell", 99.9, 100.0, 10.0), ("sell", 100.2, 100.0, -20.0),
     ("buy", 99.95, 100.0, -5.0), ("buy", 100.0, None, None)],
    ids=["buy-above", "sell-below", "sell-above-is-better", "buy-below-is-better", "no-arrival-price"],
)  # fmt: skip
def test_slippage_is_basis_points_worse_than_arrival(
    side: str, price: float, arrival: float | None, expected: float | None
) -> None:
    got = slippage_bps(side, price, arrival)
    assert got == (pytest.approx(expected) if expected is not None else None)


def scripted_order(quantity: float = 2.0, arrival: float | None = 100.0) -> Order:
    request = OrderRequest(client_order_id="q", symbol="BTCUSDT", side="buy", quantity=quantity)
    order = Order.new("o", request, arrival_price=arrival).moved(OrderStatus.RISK_CHECKED).moved(OrderStatus.ROUTED)
    return order.model_copy(update={"created_at": T0})


def test_each_event_reports_its_newest_fill_measured_against_arrival_and_acceptance() -> None:
    order = scripted_order()
    assert reported_fill(order) is None
    first, fill_1 = order.filled_by(0.5, 100.2, T0 + timedelta(milliseconds=40))
    second, fill_2 = first.filled_by(1.5, 100.05, T0 + timedelta(milliseconds=250))
    assert reported_fill(first) == fill_1
    assert reported_fill(second) == fill_2
    m = measure(second, fill_2)
    assert (m.fill_id, m.quantity, m.latency_ms) == ("o-2", 1.5, pytest.approx(250.0))
    assert m.slippage_bps == pytest.approx(5.0)
    assert fill_ratio(first) is None  # not ended
    assert fill_ratio(second) == 1.0
    cancelled = first.moved(OrderStatus.CANCELLED)
    assert fill_ratio(cancelled) == 0.25
    assert reported_fill(cancelled) is None  # a cancel reports no fill
    rejected = scripted_order().model_copy(update={"status": OrderStatus.REJECTED})
    assert fill_ratio(rejected) is None  # never reached the market


def test_rolling_summary_by_hand() -> None:
    summary = summarize([4.0, 1.0, 3.0, 2.0, 10.0])
    assert (summary.count, summary.mean, summary.p50, summary.p95) == (5, 4.0, 3.0, 10.0)
    assert summarize([]).mean is None


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    limits = [{"symbol": "BTCUSDT", "maxQuantity": 10, "maxPosition": 10}]
    services = {"execution-quality": {"enabled": True}}
    with running_platform(tmp_path, symbols=["BTCUSDT"], services=services, riskLimits=limits) as running:
        yield running


def test_slippage_latency_and_fill_ratio_of_real_fills_match_the_orders(platform: Platform) -> None:
    platform.tick("BTCUSDT", 100.0, 99.9, 100.1)  # arrival mid 100.0; a buy fills at 100.1, a sell at 99.9
    with contextlib.ExitStack() as stack:
        servers = platform.serve_all(stack, FACTORIES)
        oms = servers[ServiceName.OMS]
        watcher = stack.enter_context(LiveServer(quality.create(platform.settings(ServiceName.QUALITY))))
        wait_for(lambda: watcher.get("/readyz")[0] == 200, 20, "execution-quality ready")
        placed = {}
        for client_id, side in (("q-buy", "buy"), ("q-sell", "sell")):
            status, body = oms.post("/orders", {"client_order_id": client_id, "symbol": "BTCUSDT", "side": side,
                                                "quantity": 1})  # fmt: skip
            assert status == 201, body
            placed[side] = final(oms, body["order_id"], "filled")
        assert placed["buy"]["arrival_price"] == pytest.approx(100.0)

        def both() -> list[dict[str, object]] | None:
            rows = watcher.get("/quality?symbol=BTCUSDT")[1]
            return rows if len(rows) == 2 and all(r["fill_ratio"]["count"] == 1 for r in rows) else None

        report = {r["side"]: r for r in wait_for(both, 20, "both sides measured")}
    rows = {r["fill_id"]: r for r in platform.questdb.state.tables["execution_quality"].rows}
    for side in ("buy", "sell"):
        order = placed[side]
        (fill,) = order["fills"]
        latency = (datetime.fromisoformat(fill["ts"]) - datetime.fromisoformat(order["created_at"])).total_seconds()
        assert report[side]["slippage_bps"]["mean"] == pytest.approx(10.0)  # 0.1 worse than 100.0
        assert report[side]["latency_ms"]["mean"] == pytest.approx(latency * 1000)
        assert report[side]["fill_ratio"]["mean"] == 1.0
        row = rows[fill["fill_id"]]
        assert (row["slippage_bps"], row["latency_ms"]) == (pytest.approx(10.0), pytest.approx(latency * 1000))
