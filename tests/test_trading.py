"""The trading schema: order requests, the order state machine, paper prices, average-cost P&L, ILP lines."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import pytest
from nats.aio.msg import Msg
from pydantic import ValidationError

from tradingstack_services.marketdata.prices import PriceBook, parse_quote
from tradingstack_services.platform import ilp
from tradingstack_services.trading.model import (
    MIN_QUANTITY,
    TRANSITIONS,
    Fill,
    Order,
    OrderRequest,
    OrderStatus,
    Position,
    TransitionError,
    execution_price,
)

TS = datetime(2026, 1, 2, 9, 30, tzinfo=UTC)


def request(**changes: object) -> OrderRequest:
    body = {"client_order_id": "c-1", "symbol": "BTCUSDT", "side": "buy", "quantity": 3.0, "order_type": "market"}
    return OrderRequest.model_validate(body | changes)


def order(**changes: object) -> Order:
    return Order.new("o1", request(**changes))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"order_type": "limit"}, "a limit order needs limit_price"),
        ({"limit_price": 10.0}, "a market order takes no limit_price"),
        ({"quantity": 0}, r"greater than or equal to 0\.00000001"),
        ({"quantity": 1e-12}, r"greater than or equal to 0\.00000001"),  # below what a fill can move (EPSILON)
        ({"quantity": 1e15}, "less than or equal to 1000000000"),
        ({"quantity": float("inf")}, "finite number"),
        ({"quantity": float("nan")}, "finite number"),
        ({"order_type": "limit", "limit_price": 1e300}, "less than or equal to 1000000000000"),
        ({"side": "short"}, "'buy' or 'sell'"),
        ({"symbol": "btc usdt"}, "pattern"),
        ({"client_order_id": ""}, "pattern"),
        ({"extra": 1}, "Extra inputs are not permitted"),
    ],
)
def test_bad_requests_are_refused_with_the_reason(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        request(**changes)


def test_the_smallest_accepted_order_fills_completely() -> None:
    filled = order(quantity=MIN_QUANTITY).moved(OrderStatus.RISK_CHECKED).moved(OrderStatus.ROUTED)
    filled, fill = filled.filled_by(MIN_QUANTITY, 1.0, TS)
    assert filled.status is OrderStatus.FILLED
    assert fill.quantity == MIN_QUANTITY


def test_every_status_has_its_moves_and_terminal_ones_have_none() -> None:
    assert set(TRANSITIONS) == set(OrderStatus)
    for status in (OrderStatus.FILLED, OrderStatus.REJECTED, OrderStatus.CANCELLED):
        assert not TRANSITIONS[status]
    routed = order().moved(OrderStatus.RISK_CHECKED).moved(OrderStatus.ROUTED)
    assert routed.status is OrderStatus.ROUTED
    with pytest.raises(TransitionError, match="is new; it cannot become filled"):
        order().moved(OrderStatus.FILLED)
    cancelled = routed.moved(OrderStatus.CANCELLED)
    with pytest.raises(TransitionError, match="is cancelled"):
        cancelled.filled_by(1, 100)


def test_fills_move_an_order_through_partial_to_filled_with_the_average_price() -> None:
    routed = order().moved(OrderStatus.RISK_CHECKED).moved(OrderStatus.ROUTED)
    partial, first = routed.filled_by(1, 100.0, TS)
    assert (partial.status, partial.filled_quantity, partial.remaining) == (OrderStatus.PARTIALLY_FILLED, 1, 2)
    assert (first.fill_id, first.quantity, first.price) == ("o1-1", 1, 100.0)
    filled, second = partial.filled_by(5, 103.0, TS)  # more than remains: only the rest fills
    assert (filled.status, filled.filled_quantity, second.quantity, second.fill_id) == (
        OrderStatus.FILLED,
        3,
        2,
        "o1-2",
    )
    assert filled.avg_fill_price == pytest.approx((100 + 2 * 103) / 3)
    assert [f.fill_id for f in filled.fills] == ["o1-1", "o1-2"]
    with pytest.raises(TransitionError):
        filled.filled_by(1, 100.0)


def test_a_retry_is_recognised_by_its_terms() -> None:
    placed = order()
    assert placed.same_request(request())
    assert not placed.same_request(request(quantity=4.0))


@pytest.mark.parametrize(
    ("changes", "bid", "ask", "last", "expected"),
    [
        ({}, 99.0, 101.0, 100.0, 101.0),  # buy at the ask
        ({"side": "sell"}, 99.0, 101.0, 100.0, 99.0),  # sell at the bid
        ({}, None, None, 100.0, 100.0),  # no book: the last trade
        ({}, None, None, None, None),  # no price at all: cannot execute
        ({"order_type": "limit", "limit_price": 100.0}, 99.0, 101.0, 100.0, None),  # buy limit below the ask
        ({"order_type": "limit", "limit_price": 101.0}, 99.0, 101.0, 100.0, 101.0),  # marketable at its limit
        ({"order_type": "limit", "limit_price": 98.0, "side": "sell"}, 99.0, 101.0, 100.0, 99.0),  # better price
        ({"order_type": "limit", "limit_price": 99.5, "side": "sell"}, 99.0, 101.0, 100.0, None),
    ],
)
def test_paper_execution_price(
    changes: dict[str, object], bid: float | None, ask: float | None, last: float | None, expected: float | None
) -> None:
    assert execution_price(order(**changes), bid, ask, last) == expected


def fill(side: str, quantity: float, price: float) -> Fill:
    return Fill.model_validate({"fill_id": f"f{price}", "order_id": "o", "symbol": "BTCUSDT", "side": side,
                                "quantity": quantity, "price": price, "ts": TS})  # fmt: skip


def test_average_cost_positions_and_pnl() -> None:
    position = Position(symbol="BTCUSDT")
    position = position.apply(fill("buy", 2, 100))
    position = position.apply(fill("buy", 2, 110))
    assert (position.quantity, position.avg_price, position.realized_pnl) == (4, 105, 0)
    assert position.unrealized(120) == pytest.approx(60)
    position = position.apply(fill("sell", 1, 125))  # reduce: realise 1 x (125 - 105)
    assert (position.quantity, position.avg_price, position.realized_pnl) == (3, 105, 20)
    position = position.apply(fill("sell", 5, 100))  # through zero: close 3 (-15), open 2 short at 100
    assert (position.quantity, position.avg_price, position.realized_pnl) == (-2, 100, 5)
    assert position.unrealized(90) == pytest.approx(20)  # a short gains when the price falls
    position = position.apply(fill("buy", 2, 95))  # cover: flat, +10
    assert (position.quantity, position.avg_price, position.realized_pnl) == (0, 0, 15)
    assert position.unrealized(1_000) == 0
    assert position.unrealized(None) == 0


def test_quotes_from_ticks_skip_what_is_not_a_price() -> None:
    quote = parse_quote(b'{"symbol": "BTCUSDT", "price": 100.5, "bid": 100.4, "ask": 100.6, "size": 0.2}')
    assert quote is not None
    assert (quote.last, quote.bid, quote.ask, quote.size) == (100.5, 100.4, 100.6, 0.2)
    assert parse_quote(b'{"symbol": "BTCUSDT", "price": 100.5, "bid": "", "ask": -1}') == parse_quote(
        b'{"symbol": "BTCUSDT", "price": 100.5}'
    )
    for bad in (b"not json", b"[]", b'{"symbol": "X"}', b'{"symbol": "X", "price": "NaN"}', b'{"price": 1}'):
        assert parse_quote(bad) is None


def test_ilp_lines_escape_tags_and_type_fields() -> None:
    line = ilp.line("orders", {"symbol": "BTC USDT", "status": None, "side": "a,b=c"},
                    {"client_order_id": 'say "hi"', "quantity": 2.0, "trades": 3, "limit_price": None}, TS)  # fmt: skip
    stamp = int(TS.timestamp()) * 1_000_000_000
    assert (
        line == f'orders,symbol=BTC\\ USDT,side=a\\,b\\=c client_order_id="say \\"hi\\"",quantity=2.0,trades=3i {stamp}'
    )
    with pytest.raises(ValueError, match="finite"):
        ilp.line("t", {}, {"x": float("nan")}, TS)
    with pytest.raises(ValueError, match="at least one field"):
        ilp.line("t", {"a": "b"}, {"x": None}, TS)


def test_the_price_book_keeps_only_the_traded_symbols() -> None:
    book = PriceBook(["BTCUSDT"])

    def tick(symbol: str, price: float) -> Msg:
        data = json.dumps({"symbol": symbol, "price": price}).encode()
        return Msg(_client=None, subject=f"market.tick.{symbol}", data=data)  # type: ignore[arg-type]

    async def feed() -> None:
        for i in range(1000):  # made-up symbols from anyone who can publish on market.tick.>
            await book.receive(tick(f"FAKE{i}", 1.0))
        await book.receive(tick("BTCUSDT", 2.0))

    asyncio.run(feed())
    assert list(book.quotes) == ["BTCUSDT"]


def test_api_keys_are_matched_by_digest_and_order_entry_fails_closed() -> None:
    from fastapi import HTTPException

    from tradingstack_services.platform.auth import Accounts, digest

    accounts = Accounts.from_environment("desk-a,desk-b", {"AUTH_KEYS_DESK_A": f"{digest('k1')}\nnot-a-digest\n"})
    assert accounts.account_for("Bearer k1") == "desk-a"
    assert accounts.account_for("bearer  k1 ") == "desk-a"
    # No key, another scheme, an unknown key, the digest itself (it is not a key), a line that is no digest.
    for header in (None, "", "Bearer", "Basic k1", "Bearer k2", f"Bearer {digest('k1')}", "Bearer not-a-digest"):
        with pytest.raises(HTTPException) as refused:
            accounts.account_for(header)
        assert refused.value.status_code == 401
        assert refused.value.headers is not None
        assert "WWW-Authenticate" in refused.value.headers
    with pytest.raises(HTTPException):  # accounts but no readable digests: nobody gets in
        Accounts.from_environment("desk-a", {}).account_for("Bearer anything")
    assert Accounts.from_environment(None, {}).account_for(None) is None  # no accounts: open
