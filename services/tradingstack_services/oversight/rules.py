"""The compliance rules, pure: an account's state and one order event in, alerts out.

Times are the events' own (order entry, fill, cancel), never the clock, so a replay of the
same events raises the same alerts with the same ids. Each alert's id names its rule and the
event that raised it; the stream, QuestDB and `GET /alerts` deduplicate on it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, Field

from tradingstack.api import ComplianceRules, RiskLimit
from tradingstack_services.trading.model import Fill, Order, OrderStatus

Severity = Literal["warning", "high", "critical"]
RULES = ("wash_trade", "limit_breach", "limit_near_breach", "fat_finger", "order_to_fill_ratio", "cancel_ratio")
# How long a finished order is remembered, so a late event of it (another publisher's) is not
# taken for a new order or its fills counted twice.
FINISHED_MEMORY = timedelta(hours=1)
LimitLevel = Literal["ok", "near", "breach"]
_RANK: dict[LimitLevel, int] = {"ok": 0, "near": 1, "breach": 2}
# judge's `alert(rule, severity, event id, message, ts)`, handed to each rule.
_AlertFn = Callable[[str, Severity, str, str, datetime], None]


class Alert(BaseModel):
    alert_id: str
    rule: str
    severity: Severity
    account: str | None
    symbol: str
    order_id: str
    message: str
    ts: datetime


class SymbolState(BaseModel):
    position: float = 0.0
    last_buy: datetime | None = None
    last_buy_fill: str | None = None
    last_sell: datetime | None = None
    last_sell_fill: str | None = None
    limit_level: LimitLevel = "ok"


class OrderSeen(BaseModel):
    fills: int = 0  # its fills 1..fills were judged
    later: list[int] = Field(default_factory=list)  # and these numbers past a gap (events out of order)
    finished: datetime | None = None


class AccountState(BaseModel):
    """What the rules remember of one account (kept in Redis between events)."""

    symbols: dict[str, SymbolState] = Field(default_factory=dict)
    orders: dict[str, OrderSeen] = Field(default_factory=dict)
    # Per second of event time (epoch seconds as text: JSON keys): [orders entered, fills, cancels].
    counts: dict[str, list[int]] = Field(default_factory=dict)
    ratio_alerted: dict[str, datetime] = Field(default_factory=dict)


def _window_totals(state: AccountState, now: datetime, seconds: int) -> tuple[int, int, int]:
    start = int(now.timestamp()) - seconds
    for second in [s for s in state.counts if int(s) <= start]:
        del state.counts[second]
    totals = [sum(c[i] for c in state.counts.values()) for i in range(3)]
    return totals[0], totals[1], totals[2]


def _count(state: AccountState, at: datetime, which: int) -> None:
    state.counts.setdefault(str(int(at.timestamp())), [0, 0, 0])[which] += 1


def judge(
    state: AccountState, order: Order, rules: ComplianceRules, limit: RiskLimit, mid: float | None
) -> list[Alert]:
    """Apply one order event to `state` (changed in place) and return the alerts it raises."""
    alerts: list[Alert] = []
    account = order.account

    def alert(rule: str, severity: Severity, event_id: str, message: str, ts: datetime) -> None:
        alerts.append(Alert(alert_id=f"{rule}:{event_id}", rule=rule, severity=severity, account=account,
                            symbol=order.symbol, order_id=order.order_id, message=message, ts=ts))  # fmt: skip

    seen = state.orders.get(order.order_id)
    if seen is None:
        seen = state.orders[order.order_id] = OrderSeen()
        _count(state, order.created_at, 0)
        _fat_finger(order, rules, mid, alert)
        _ratios(state, order, rules, order.created_at, alert)
    # An event carries its newest fill only, numbered by the fill count (every fill has an event of its
    # own, and events may come out of order); a stored order carries them all.
    numbered = list(enumerate(order.fills, 1)) if order.fills else (
        [(order.fill_total, order.last_fill)] if order.last_fill else [])  # fmt: skip
    for number, fill in numbered:
        if number <= seen.fills or number in seen.later:
            continue  # judged already
        _count(state, fill.ts, 1)
        _fill(state.symbols.setdefault(order.symbol, SymbolState()), fill, rules, limit, alert)
        seen.later.append(number)
    while seen.fills + 1 in seen.later:
        seen.later.remove(seen.fills + 1)
        seen.fills += 1
    if order.status in (OrderStatus.FILLED, OrderStatus.REJECTED, OrderStatus.CANCELLED) and seen.finished is None:
        seen.finished = order.updated_at
        if order.status == OrderStatus.CANCELLED:
            _count(state, order.updated_at, 2)
            _ratios(state, order, rules, order.updated_at, alert)
    horizon = order.updated_at - FINISHED_MEMORY
    for order_id in [k for k, v in state.orders.items() if v.finished is not None and v.finished < horizon]:
        del state.orders[order_id]
    return alerts


def _fat_finger(order: Order, rules: ComplianceRules, mid: float | None, alert: _AlertFn) -> None:
    price = order.limit_price or order.avg_fill_price or mid
    if price is not None and order.quantity * price > rules.fat_finger_max_notional:
        alert("fat_finger", "high", order.order_id,
              f"notional {order.quantity * price:.2f} above {rules.fat_finger_max_notional:.2f}",
              order.created_at)  # fmt: skip
    elif order.limit_price is not None and mid is not None and mid > 0:
        deviation = abs(order.limit_price - mid) / mid
        if deviation > rules.fat_finger_price_deviation:
            alert("fat_finger", "high", order.order_id,
                  f"limit price {order.limit_price} is {deviation:.1%} from the mid {mid} "
                  f"(more than {rules.fat_finger_price_deviation:.1%})", order.created_at)  # fmt: skip


def _fill(symbol: SymbolState, fill: Fill, rules: ComplianceRules, limit: RiskLimit, alert: _AlertFn) -> None:
    window = timedelta(seconds=rules.wash_trade_window_seconds)
    other_ts, other_fill = (symbol.last_sell, symbol.last_sell_fill) if fill.side == "buy" else \
        (symbol.last_buy, symbol.last_buy_fill)  # fmt: skip
    if other_ts is not None and abs(fill.ts - other_ts) <= window:
        opposite = "sell" if fill.side == "buy" else "buy"
        alert("wash_trade", "high", fill.fill_id,
              f"{fill.side} fill {fill.fill_id} within {rules.wash_trade_window_seconds}s of {opposite} fill "
              f"{other_fill} of the same account", fill.ts)  # fmt: skip
    if fill.side == "buy":
        symbol.last_buy, symbol.last_buy_fill = fill.ts, fill.fill_id
    else:
        symbol.last_sell, symbol.last_sell_fill = fill.ts, fill.fill_id
    symbol.position += fill.quantity if fill.side == "buy" else -fill.quantity
    share = abs(symbol.position) / limit.max_position
    level: LimitLevel = "breach" if share > 1 else "near" if share >= rules.near_breach_share else "ok"
    if _RANK[level] > _RANK[symbol.limit_level]:  # alerts on the way up only, once per level
        severity: Severity = "critical" if level == "breach" else "warning"
        alert("limit_breach" if level == "breach" else "limit_near_breach", severity, fill.fill_id,
              f"position {symbol.position} is {share:.0%} of maxPosition {limit.max_position}", fill.ts)  # fmt: skip
    symbol.limit_level = level


def _ratios(state: AccountState, order: Order, rules: ComplianceRules, now: datetime, alert: _AlertFn) -> None:
    orders, fills, cancels = _window_totals(state, now, rules.ratio_window_seconds)
    if orders < rules.ratio_min_orders:
        return
    window = timedelta(seconds=rules.ratio_window_seconds)
    judged = [("order_to_fill_ratio", orders / max(fills, 1) > rules.max_order_to_fill_ratio,
               f"{orders} orders to {fills} fills in {rules.ratio_window_seconds}s (more than "
               f"{rules.max_order_to_fill_ratio:g} per fill)"),
              ("cancel_ratio", cancels / orders > rules.max_cancel_ratio,
               f"{cancels} of {orders} orders cancelled in {rules.ratio_window_seconds}s (more than "
               f"{rules.max_cancel_ratio:.0%})")]  # fmt: skip
    for rule, excessive, message in judged:
        last = state.ratio_alerted.get(rule)
        if excessive and (last is None or now - last >= window):  # once per window, not per order
            state.ratio_alerted[rule] = now
            alert(rule, "warning", f"{order.account or '-'}:{order.order_id}:{order.status.value}", message, now)
