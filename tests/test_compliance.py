"""The compliance-scanner: each rule on a scenario that must raise it and one that must not
(pure), then the service on real nats-server and redis-server and the QuestDB double."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError

from tradingstack.api import ComplianceRules, RiskLimit, ServiceName
from tradingstack_services.oversight import compliance
from tradingstack_services.oversight.rules import AccountState, Alert, judge
from tradingstack_services.trading.model import Fill, Order, OrderStatus

from conftest import LiveServer, wait_for
from test_trading_e2e import FACTORIES, Platform, running_platform

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
RULES = ComplianceRules(ratio_min_orders=5, max_order_to_fill_ratio=2, max_cancel_ratio=0.5)
LIMIT = RiskLimit(symbol="BTCUSDT", max_position=10)


def order(order_id: str, side: str = "buy", quantity: float = 1.0, at: float = 0.0, account: str | None = "desk-a",
          status: OrderStatus = OrderStatus.ROUTED, fills: list[tuple[float, float, float]] = (),  # type: ignore[assignment]
          limit_price: float | None = None) -> Order:  # fmt: skip
    """An order event as the OMS and exeq publish it; fills are (seconds after T0, quantity, price)."""
    created = T0 + timedelta(seconds=at)
    made = [Fill(fill_id=f"{order_id}-{i + 1}", order_id=order_id, account=account, symbol="BTCUSDT", side=side,
                 quantity=q, price=p, ts=T0 + timedelta(seconds=s)) for i, (s, q, p) in enumerate(fills)]  # fmt: skip
    updated = max([created, *(f.ts for f in made)])
    return Order(order_id=order_id, client_order_id=f"c-{order_id}", account=account, symbol="BTCUSDT", side=side,
                 quantity=quantity, order_type="limit" if limit_price else "market", limit_price=limit_price,
                 status=status, filled_quantity=sum(f.quantity for f in made), fills=made, created_at=created,
                 updated_at=updated)  # fmt: skip


def run(events: list[Order], mid: float | None = 100.0, rules: ComplianceRules = RULES) -> list[Alert]:
    states: dict[str | None, AccountState] = {}
    alerts: list[Alert] = []
    for event in events:
        alerts += judge(states.setdefault(event.account, AccountState()), event, rules, LIMIT, mid)
    return alerts


def rules_of(alerts: list[Alert]) -> list[str]:
    return [a.rule for a in alerts]


FILLED = OrderStatus.FILLED


def test_a_buy_and_a_sell_of_one_account_within_the_window_is_a_wash_trade() -> None:
    alerts = run([order("b", "buy", fills=[(0, 1, 100)], status=FILLED),
                  order("s", "sell", at=30, fills=[(30, 1, 100)], status=FILLED)])  # fmt: skip
    assert [(a.rule, a.alert_id, a.account, a.order_id) for a in alerts] == [
        ("wash_trade", "wash_trade:s-1", "desk-a", "s")
    ]
    assert "within 60s of buy fill b-1" in alerts[0].message


@pytest.mark.parametrize(
    ("second", "account"), [(61, "desk-a"), (30, "desk-b")], ids=["outside-the-window", "another-account"]
)
def test_no_wash_trade_outside_the_window_or_across_accounts(second: float, account: str) -> None:
    sell = order("s", "sell", at=second, account=account, fills=[(second, 1, 100)], status=FILLED)
    assert run([order("b", "buy", fills=[(0, 1, 100)], status=FILLED), sell]) == []


def test_a_position_near_and_beyond_its_limit_alerts_once_per_level_on_the_way_up() -> None:
    # maxPosition 10, near at 80%: 5 (quiet), 8 (near), 9 (still near: quiet), 11 (breach), 12 (quiet).
    fills = [(i * 120, q, 100) for i, q in enumerate([5, 3, 1, 2, 1])]
    alerts = run([order(f"o{i}", "buy", quantity=f[1], at=f[0], fills=[f], status=FILLED) for i, f in enumerate(fills)])
    assert [(a.rule, a.severity, a.alert_id) for a in alerts] == [
        ("limit_near_breach", "warning", "limit_near_breach:o1-1"),
        ("limit_breach", "critical", "limit_breach:o3-1"),
    ]


def test_a_position_that_stays_below_the_near_share_raises_nothing() -> None:
    fills = [(i * 120, 2.5, 100) for i in range(3)]  # 7.5 of 10: below 80%
    assert (
        run([order(f"o{i}", "buy", quantity=2.5, at=f[0], fills=[f], status=FILLED) for i, f in enumerate(fills)]) == []
    )


@pytest.mark.parametrize(
    ("quantity", "limit_price", "mid", "expected"),
    [
        (3_000, 100.0, 100.0, "notional 300000.00 above 250000.00"),
        (1, 110.0, 100.0, "is 10.0% from the mid 100.0"),
        (1, 90.0, 100.0, "is 10.0% from the mid 100.0"),
        (2_000, 100.0, 100.0, None),
        (1, 104.0, 100.0, None),
        (1, 150.0, None, None),  # no quote yet: the distance from the market cannot be judged
    ],
    ids=["notional", "far-above", "far-below", "control-notional", "control-near-the-mid", "no-mid"],
)
def test_fat_finger_orders_by_notional_or_distance_from_the_mid(
    quantity: float, limit_price: float, mid: float | None, expected: str | None
) -> None:
    alerts = run([order("o", quantity=quantity, limit_price=limit_price)], mid=mid)
    assert [a.message for a in alerts if expected and expected in a.message] == [a.message for a in alerts]
    assert rules_of(alerts) == (["fat_finger"] if expected else [])


def test_many_orders_without_fills_or_mostly_cancelled_alert_once_per_window() -> None:
    unfilled = [order(f"o{i}", at=i) for i in range(8)]  # 5 orders, 0 fills: over 2 per fill
    assert [(a.rule, a.order_id) for a in run(unfilled)] == [("order_to_fill_ratio", "o4")]
    cancelled = [e for i in range(6) for e in (order(f"c{i}", at=i, fills=[(i, 1, 100)]),
                                                order(f"c{i}", at=i, status=OrderStatus.CANCELLED))]  # fmt: skip
    # each order filled in part (ratio 1) then cancelled: the 5th cancel makes 5 of 5 > 50%
    assert [(a.rule, a.order_id) for a in run(cancelled)] == [("cancel_ratio", "c4")]
    later = [*unfilled, order("late", at=400)]  # a window later: judged afresh, counts from there
    assert rules_of(run(later)) == ["order_to_fill_ratio"]


def test_orders_that_fill_and_few_cancels_raise_no_ratio_alert() -> None:
    events = [order(f"o{i}", "buy" if i % 2 else "sell", at=i * 2, fills=[(i * 2, 1, 100)], status=FILLED)
              for i in range(8)]  # fmt: skip
    events += [order("x", at=20), order("x", at=21, status=OrderStatus.CANCELLED)]
    assert run(events, rules=RULES.model_copy(update={"wash_trade_window_seconds": 1})) == []


def test_an_event_seen_again_or_out_of_order_counts_each_fill_once() -> None:
    partial = order("o", quantity=2, fills=[(0, 1, 100)], status=OrderStatus.PARTIALLY_FILLED)
    cancelled = order("o", quantity=2, at=0, fills=[(0, 1, 100)], status=OrderStatus.CANCELLED)
    state = AccountState()
    for event in (cancelled, partial, partial):  # the cancel published before the partial fill
        judge(state, event, RULES, LIMIT, 100.0)
    assert state.symbols["BTCUSDT"].position == 1
    assert sum(c[1] for c in state.counts.values()) == 1


def test_bounded_events_out_of_order_still_count_every_fill_once() -> None:
    """As published (each event carries only its newest fill): the event of fill 3 ahead of fill 2's,
    then every one again; the position holds all three fills, each once."""
    stored = order("o", quantity=3, fills=[(0, 1, 100), (1, 1, 101), (2, 1, 102)], status=FILLED)
    events = []
    for n in (1, 2, 3):
        step = stored.model_copy(update={"fills": stored.fills[:n], "filled_quantity": float(n),
                                         "status": FILLED if n == 3 else OrderStatus.PARTIALLY_FILLED})  # fmt: skip
        events.append(Order.model_validate_json(step.event()))
    state = AccountState()
    for event in (events[0], events[2], events[1], *events):
        judge(state, event, RULES, LIMIT, 100.0)
    assert state.symbols["BTCUSDT"].position == 3
    assert sum(c[1] for c in state.counts.values()) == 3
    assert (state.orders["o"].fills, state.orders["o"].later) == (3, [])


def test_a_replay_raises_the_same_alerts_with_the_same_ids() -> None:
    events = [order("b", "buy", fills=[(0, 9, 100)], quantity=9, status=FILLED),
              order("s", "sell", at=5, fills=[(5, 1, 100)], status=FILLED)]  # fmt: skip
    first, second = run(events), run(events)
    assert [a.alert_id for a in first] == [a.alert_id for a in second] == ["limit_near_breach:b-1", "wash_trade:s-1"]


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    """Servers, streams and tables as the operator makes them for a stack with the scanner enabled."""
    with running_platform(
        tmp_path,
        symbols=["BTCUSDT"],
        riskLimits=[{"symbol": "BTCUSDT", "maxQuantity": 10, "maxPosition": 10}],
        services={"compliance-scanner": {"enabled": True}},
        compliance={"washTradeWindowSeconds": 600},
    ) as running:
        yield running


def scanner(platform: Platform) -> LiveServer:
    return LiveServer(compliance.create(platform.settings(ServiceName.COMPLIANCE)))


def alerts_in_stream(platform: Platform) -> list[dict[str, Any]]:
    return [json.loads(data) for _, data in platform.messages("COMPLIANCE")]


def test_a_wash_trade_through_the_trading_path_is_alerted_once_on_the_stream_in_questdb_and_on_get_alerts(
    platform: Platform,
) -> None:
    platform.tick("BTCUSDT", 100.0, 99.9, 100.1)
    with contextlib.ExitStack() as stack:
        servers = platform.serve_all(stack, FACTORIES)
        oms = servers[ServiceName.OMS]
        watcher = stack.enter_context(scanner(platform))
        wait_for(lambda: watcher.get("/readyz")[0] == 200, 20, "the scanner ready")
        for client_id, side in (("w-buy", "buy"), ("w-sell", "sell")):
            status, body = oms.post("/orders", {"client_order_id": client_id, "symbol": "BTCUSDT", "side": side,
                                                "quantity": 1})  # fmt: skip
            assert status == 201, body
        alerts = wait_for(lambda: watcher.get("/alerts?rule=wash_trade")[1] or None, 20, "a wash-trade alert")
        assert [(a["rule"], a["severity"], a["symbol"]) for a in alerts] == [("wash_trade", "high", "BTCUSDT")]
        platform.run(lambda nc: nc.jetstream().publish("orders.bogus.BTCUSDT", b'{"order_id": 7}'))
        letters = wait_for(lambda: [s for s, d in platform.messages("DEAD_LETTER") if b"order_id" in d] or None, 10,
                           "the malformed event dead-lettered")  # fmt: skip
        assert letters == ["dlq.ORDERS.invalid_order"]
        assert watcher.get("/readyz")[0] == 200  # a bad event is a dead letter, not an outage
        lag = {"stream": "ORDERS", "durable": "ns_e2e_compliance-scanner"}
        wait_for(lambda: REGISTRY.get_sample_value("tradingstack_consumer_pending_messages", lag) == 0, 10,
                 "the scanner's consumer lag exported, and nothing pending")  # fmt: skip
    assert [a["alert_id"] for a in alerts_in_stream(platform)] == [alerts[0]["alert_id"]]
    rows = wait_for(lambda: platform.questdb.state.tables["compliance_alerts"].rows or None, 10, "the alert row")
    assert [(r["alert_id"], r["rule"]) for r in rows] == [(alerts[0]["alert_id"], "wash_trade")]


def test_alerts_survive_questdb_away_and_a_restart_judges_on_from_the_state_in_redis(platform: Platform) -> None:
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

    def publish(event: Order) -> None:
        headers = {"Nats-Msg-Id": f"{event.order_id}:{event.status.value}:{event.filled_quantity}",
                   "traceparent": trace}  # fmt: skip
        platform.run(lambda nc: nc.jetstream().publish(f"orders.{event.status.value}.BTCUSDT",
                                                       event.model_dump_json().encode(), headers=headers))  # fmt: skip

    with scanner(platform) as first:
        wait_for(lambda: first.get("/readyz")[0] == 200, 20, "the scanner ready")
        publish(order("b1", "buy", quantity=9, fills=[(0, 9, 100)], status=FILLED))
        wait_for(lambda: first.get("/alerts")[1] or None, 10, "the near-breach alert")
    with scanner(platform) as second:  # a new process: the position (9) and last buy come from Redis
        wait_for(lambda: second.get("/readyz")[0] == 200, 20, "the scanner ready again")
        platform.questdb.restart(down_seconds=3)  # the alert's row cannot be written: no ack, redelivered
        publish(order("s1", "sell", at=60, fills=[(60, 1, 100)], status=FILLED))
        publish(order("b2", "buy", quantity=3, at=120, fills=[(120, 3, 100)], status=FILLED))
        rows = wait_for(lambda: len(r := platform.questdb.state.tables["compliance_alerts"].rows) >= 4 and r, 30,
                        "every alert's row once QuestDB is back")  # fmt: skip
        ids = sorted(r["alert_id"] for r in rows)
        assert ids == ["limit_breach:b2-1", "limit_near_breach:b1-1", "wash_trade:b2-1", "wash_trade:s1-1"]
        assert [a["alert_id"] for a in second.get("/alerts?limit=10")[1]] == [
            "limit_breach:b2-1", "wash_trade:b2-1", "wash_trade:s1-1", "limit_near_breach:b1-1"
        ]  # newest first; within one event in the order raised  # fmt: skip
    assert sorted(a["alert_id"] for a in alerts_in_stream(platform)) == ids  # each once, though redelivered

    async def first_alert_headers(nc: Any) -> dict[str, str]:
        return dict((await nc.jetstream().get_msg("COMPLIANCE", 1)).headers or {})

    assert platform.run(first_alert_headers)["traceparent"] == trace  # the event's trace goes on with its alert


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_an_order_event_with_a_non_finite_number_is_refused_before_it_reaches_the_rules(value: str) -> None:
    # A position made NaN by one hostile event would stay NaN: every later limit check silently false.
    event = (
        order("o", fills=[(0, 1, 100)], status=FILLED)
        .model_dump_json()
        .replace('"quantity":1.0', f'"quantity":{value}', 1)
    )
    assert value in event
    with pytest.raises(ValidationError):
        Order.model_validate_json(event)
