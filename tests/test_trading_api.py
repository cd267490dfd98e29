"""The trading API a user of an OMS expects, on real nats-server and redis-server: the blotter
(`GET /orders`), batch entry, cancel-all, fills, each within the caller's account."""

from __future__ import annotations

import contextlib
import http.client
import json
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from tradingstack.api import ServiceName
from tradingstack_services.platform.runner import GRACEFUL_SHUTDOWN_SECONDS

from conftest import LiveServer, wait_for
from test_trading_e2e import Platform, Trading, final, order, platform, trading, with_accounts  # noqa: F401


@contextlib.contextmanager
def two_desks(
    platform: Platform, monkeypatch: pytest.MonkeyPatch, services: list[ServiceName]
) -> Iterator[tuple[LiveServer, dict[str, dict[str, str]]]]:
    """The services up with accounts desk-a and desk-b: the OMS, and each desk's Authorization header."""
    authed, bearer = with_accounts(platform, monkeypatch, {"desk-a": "ka-7f3e9c2d1b", "desk-b": "kb-0a4c6e8f2d"})
    with contextlib.ExitStack() as stack:
        yield authed.serve_all(stack, services)[ServiceName.OMS], bearer


def resting(client_order_id: str, side: str = "buy", symbol: str = "BTCUSDT", quantity: float = 1) -> dict[str, Any]:
    """A limit order far from the market (bid 99.9, ask 100.1): it rests until cancelled."""
    price = 50.0 if side == "buy" else 500.0
    return {**order(client_order_id, side, quantity, order_type="limit", limit_price=price), "symbol": symbol}


def place(oms: LiveServer, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    status, placed = oms.post("/orders", body, headers)
    assert status == 201, placed
    return placed  # type: ignore[no-any-return]


def every_page(oms: LiveServer, query: str, limit: int, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every order a query lists, page by page, following `next_cursor`."""
    seen: list[dict[str, Any]] = []
    cursor = ""
    for _ in range(100):
        status, page = oms.get(f"/orders?limit={limit}{query}{cursor}", headers)
        assert status == 200, page
        assert len(page["orders"]) <= limit
        seen += page["orders"]
        if page["next_cursor"] is None:
            return seen
        cursor = f"&cursor={page['next_cursor']}"
    raise AssertionError("the pages never ended")


def test_the_blotter_lists_orders_newest_first_filters_them_and_pages_without_gaps(trading: Trading) -> None:
    _, oms, _, _ = trading
    placed = [place(oms, order("m-1", "buy", 1))]  # filled at the market
    placed.append(place(oms, order("big", "buy", 50)))  # above maxQuantity 10: rejected
    placed += [place(oms, resting(f"r-{i}", side)) for i, side in enumerate(["buy", "sell", "buy"])]
    middle = datetime.now(UTC)
    time.sleep(0.01)
    placed += [place(oms, resting("e-1", symbol="ETHUSDT")), place(oms, order("m-2", "sell", 1))]
    final(oms, placed[0]["order_id"], "filled")
    final(oms, placed[-1]["order_id"], "filled")
    newest_first = [o["order_id"] for o in reversed(placed)]

    for limit in (1, 2, 3, 50):
        assert [o["order_id"] for o in every_page(oms, "", limit)] == newest_first, limit
    assert [o["order_id"] for o in every_page(oms, "&status=open", 2)] == [placed[i]["order_id"] for i in (5, 4, 3, 2)]
    assert [o["order_id"] for o in every_page(oms, "&status=rejected", 2)] == [placed[1]["order_id"]]
    assert [o["order_id"] for o in every_page(oms, "&status=filled", 1)] == [placed[6]["order_id"],
                                                                             placed[0]["order_id"]]  # fmt: skip
    assert [o["order_id"] for o in every_page(oms, "&symbol=ETHUSDT", 5)] == [placed[5]["order_id"]]
    assert {o["order_id"] for o in every_page(oms, "&side=sell", 5)} == {placed[3]["order_id"], placed[6]["order_id"]}
    since = middle.isoformat().replace("+00:00", "Z")
    assert [o["order_id"] for o in every_page(oms, f"&since={since}", 5)] == newest_first[:2]
    # The blotter shows the orders as they are now.
    statuses = {o["client_order_id"]: o["status"] for o in every_page(oms, "", 50)}
    assert statuses == {"m-1": "filled", "big": "rejected", "r-0": "routed", "r-1": "routed", "r-2": "routed",
                        "e-1": "routed", "m-2": "filled"}  # fmt: skip

    for bad in ("cursor=nope", "cursor=" + "9" * 16 + ":ZZ", "limit=0", "limit=501", "status=lost", "symbol=btc%20usdt",
                "since=yesterday"):  # fmt: skip
        status, body = oms.get(f"/orders?{bad}")
        assert status == 422, (bad, body)


def test_a_batch_answers_each_order_on_its_own_and_is_idempotent_per_client_id(trading: Trading) -> None:
    _, oms, _, _ = trading
    batch = [
        order("b-1", "buy", 1),
        order("b-2", "buy", -1),  # invalid: 422 for it alone
        order("b-3", "buy", 50),  # risk rejects it: an order all the same
        "not an order",
        order("b-1", "buy", 1),  # the same id and terms: the same order
        order("b-1", "sell", 1),  # the same id, other terms: a conflict
        {**order("b-5", "buy", 1), "extra": "field"},
    ]
    status, body = oms.post("/orders/batch", {"orders": batch})
    assert status == 200, body
    results = body["results"]
    assert [r["index"] for r in results] == list(range(len(batch)))
    codes = [r["status"] for r in results]
    assert codes[1] == codes[3] == codes[6] == 422
    assert codes[2] == 201
    assert results[2]["order"]["status"] == "rejected"
    # b-1 came three times: the first decides, the same terms again are its retry, other terms a conflict.
    assert (codes[0], codes[4], codes[5]) == (201, 200, 409)
    assert results[0]["order"]["order_id"] == results[4]["order"]["order_id"]
    assert "b-2" not in str([o["client_order_id"] for o in every_page(oms, "", 50)])

    again = oms.post("/orders/batch", {"orders": batch})[1]["results"]
    assert [r["status"] for r in again] == [200, 422, 200, 422, 200, 409, 422]
    assert [r["order"]["order_id"] for r in again if r["order"]] == [
        r["order"]["order_id"] for r in results if r["order"]]  # fmt: skip
    assert len(every_page(oms, "", 50)) == 2  # b-1 and b-3, once each

    for bad in ({"orders": []}, {"orders": [order(f"x-{i}", "buy", 1) for i in range(101)]}, {"orders": "x"}, []):
        status, body = oms.post("/orders/batch", bad)
        assert status == 422, (bad, body)


def test_cancel_all_cancels_the_open_orders_of_a_symbol_or_of_all_and_nothing_else(trading: Trading) -> None:
    _, oms, exeq, _ = trading
    btc = [place(oms, resting(f"btc-{i}", side)) for i, side in enumerate(["buy", "sell", "buy"])]
    eth = place(oms, resting("eth-1", symbol="ETHUSDT"))
    filled = place(oms, order("m-1", "buy", 1))
    final(oms, filled["order_id"], "filled")
    wait_for(lambda: len(exeq.get("/resting")[1]) == 4, 10, "four resting orders in exeq")

    status, body = oms.post("/orders/cancel-all?symbol=BTCUSDT", {})
    assert status == 200, body
    assert sorted(body["cancelled"]) == sorted(o["order_id"] for o in btc)
    assert body["failed"] == []
    assert [o["order_id"] for o in every_page(oms, "&status=open", 10)] == [eth["order_id"]]
    for placed in btc:
        assert final(oms, placed["order_id"], "cancelled")["reason"] == "cancelled by client"

    assert oms.post("/orders/cancel-all", {})[1]["cancelled"] == [eth["order_id"]]
    assert every_page(oms, "&status=open", 10) == []
    assert oms.post("/orders/cancel-all", {})[1] == {"cancelled": [], "failed": []}
    assert oms.get(f"/orders/{filled['order_id']}")[1]["status"] == "filled"


def test_fills_are_listed_newest_first_with_filters(trading: Trading) -> None:
    platform, oms, _, _ = trading
    buys = [place(oms, order(f"buy-{i}", "buy", 1)) for i in range(2)]
    for placed in buys:
        final(oms, placed["order_id"], "filled")
    middle = datetime.now(UTC)
    time.sleep(0.01)
    platform.tick("BTCUSDT", 101.0, 100.9, 101.1)
    sell = place(oms, order("sell-1", "sell", 1.5))
    final(oms, sell["order_id"], "filled")
    fills = oms.get("/fills")[1]
    assert [f["order_id"] for f in fills["fills"]] == [sell["order_id"], buys[1]["order_id"], buys[0]["order_id"]]
    assert fills["fills"][0]["price"] == pytest.approx(100.9)  # the sell at the bid
    assert fills["fills"][0]["quantity"] == pytest.approx(1.5)
    assert fills["next_cursor"] is None
    assert [f["side"] for f in oms.get("/fills?side=sell")[1]["fills"]] == ["sell"]
    since = middle.isoformat().replace("+00:00", "Z")
    assert [f["order_id"] for f in oms.get(f"/fills?since={since}")[1]["fills"]] == [sell["order_id"]]
    assert oms.get("/fills?symbol=ETHUSDT")[1]["fills"] == []
    one = oms.get("/fills?limit=1")[1]
    assert [f["order_id"] for f in one["fills"]] == [sell["order_id"]]
    rest = oms.get(f"/fills?limit=5&cursor={one['next_cursor']}")[1]
    assert [f["order_id"] for f in rest["fills"]] == [buys[1]["order_id"], buys[0]["order_id"]]


def test_the_blotter_cancel_all_and_fills_stay_within_the_callers_account(
    platform: Platform,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with two_desks(platform, monkeypatch, [ServiceName.RISK, ServiceName.OMS, ServiceName.EXEQ]) as (oms, bearer):
        mine = place(oms, resting("c-1"), bearer["desk-a"])
        theirs = place(oms, resting("c-1"), bearer["desk-b"])
        filled = place(oms, order("m-1", "buy", 1), bearer["desk-b"])
        final(oms, filled["order_id"], "filled", bearer["desk-b"])

        for path in ("/orders", "/fills", "/orders/batch", "/orders/cancel-all"):
            call = oms.get if path in ("/orders", "/fills") else (lambda p: oms.post(p, {"orders": [resting("z")]}))
            assert call(path)[0] == 401, path
        assert [o["order_id"] for o in every_page(oms, "", 10, bearer["desk-a"])] == [mine["order_id"]]
        assert oms.get("/fills", bearer["desk-a"])[1]["fills"] == []
        assert [f["order_id"] for f in oms.get("/fills", bearer["desk-b"])[1]["fills"]] == [filled["order_id"]]
        batch = oms.post("/orders/batch", {"orders": [resting("c-2")]}, bearer["desk-a"])[1]["results"]
        assert batch[0]["order"]["account"] == "desk-a"

        cancelled = oms.post("/orders/cancel-all", {}, bearer["desk-a"])[1]["cancelled"]
        assert sorted(cancelled) == sorted([mine["order_id"], batch[0]["order"]["order_id"]])
        assert oms.get(f"/orders/{theirs['order_id']}", bearer["desk-b"])[1]["status"] == "routed"


class EventStream:
    """A Server-Sent Events client on a raw HTTP connection: reads events as a browser's EventSource does."""

    def __init__(self, server: LiveServer, headers: dict[str, str] | None = None) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        self.connection.request("GET", "/stream", headers={"Accept": "text/event-stream", **(headers or {})})
        self.response = self.connection.getresponse()
        self.status = self.response.status
        self.last_id: str | None = None

    def next(self) -> dict[str, Any]:
        """The next event: {"event", "data", "id"} (id: the event's own, or None)."""
        fields: dict[str, str] = {}
        while True:
            line = self.response.fp.readline().decode()
            if not line:
                raise EOFError("the stream ended")
            line = line.rstrip("\n")
            if not line:
                if "event" in fields or "data" in fields:
                    if "id" in fields:
                        self.last_id = fields["id"]
                    return {"event": fields.get("event", "message"), "data": json.loads(fields.get("data", "null")),
                            "id": fields.get("id")}  # fmt: skip
                continue
            if line.startswith(":"):
                continue  # a comment (keepalive)
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")

    def until(self, done: Any, limit: int = 500) -> list[dict[str, Any]]:
        """Events up to and including the first that `done` accepts."""
        seen = []
        for _ in range(limit):
            seen.append(self.next())
            if done(seen[-1]):
                return seen
        raise AssertionError(f"no such event in {limit}: {seen[-5:]}")

    def close(self) -> None:
        self.connection.close()


def _is_filled(order_id: str) -> Any:
    return lambda e: e["event"] == "order" and e["data"]["order_id"] == order_id and e["data"]["status"] == "filled"


def test_the_live_stream_carries_orders_fills_positions_and_tickers_and_resumes_without_gaps(trading: Trading) -> None:
    platform, oms, _, pnl = trading
    first = place(oms, order("s-1", "buy", 1))
    final(oms, first["order_id"], "filled")
    wait_for(lambda: pnl.get("/positions")[1], 10, "a position")

    stream = EventStream(oms)
    assert stream.status == 200
    assert stream.response.getheader("Content-Type", "").startswith("text/event-stream")
    hello = stream.next()
    assert hello["event"] == "hello"
    start_orders, start_fills = hello["data"]["orders_seq"], hello["data"]["fills_seq"]
    assert hello["id"] == f"{start_orders}-{start_fills}"
    # The state as it is: the position so far and the last quote.
    opening = stream.until(lambda e: e["event"] == "ticker")
    positions = [e["data"] for e in opening if e["event"] == "position"]
    assert [(p["symbol"], p["quantity"]) for p in positions] == [("BTCUSDT", 1.0)]
    assert opening[-1]["data"] == {"symbol": "BTCUSDT", "last_price": 100.0, "bid": 99.9, "ask": 100.1}

    second = place(oms, order("s-2", "buy", 2))
    events = stream.until(_is_filled(second["order_id"]))
    events += stream.until(lambda e: e["event"] == "position" and e["data"]["quantity"] == 3.0)
    kinds = [e["event"] for e in events]
    assert "fill" in kinds
    assert [e["data"]["status"] for e in events if e["event"] == "order"] == ["routed", "filled"]
    platform.tick("BTCUSDT", 101.0, 100.9, 101.1)
    assert stream.until(lambda e: e["event"] == "ticker")[-1]["data"]["last_price"] == 101.0
    resume_from = stream.last_id
    stream.close()

    # Away: two orders happen. Back with Last-Event-ID: exactly what was missed, in order.
    missed = [place(oms, order(f"away-{i}", "sell", 1)) for i in range(2)]
    for placed in missed:
        final(oms, placed["order_id"], "filled")
    again = EventStream(oms, {"Last-Event-ID": str(resume_from)})
    assert again.next()["id"] == resume_from  # hello: where it resumes
    caught_up = again.until(_is_filled(missed[-1]["order_id"]))
    if not any(e["event"] == "fill" and e["data"]["order_id"] == missed[-1]["order_id"] for e in caught_up):
        # FILLS and ORDERS are two streams: their events interleave in either order.
        caught_up += again.until(lambda e: e["event"] == "fill" and e["data"]["order_id"] == missed[-1]["order_id"])
    again.close()
    shown = [(e["data"]["order_id"], e["data"]["status"]) for e in caught_up if e["event"] == "order"]
    assert shown == [(o["order_id"], s) for o in missed for s in ("routed", "filled")]
    # Every ORDERS and FILLS message after the first connection's start was shown exactly once.
    order_seqs = [int(e["id"].split("-")[0]) for e in events + caught_up if e["event"] == "order"]
    fill_seqs = [int(e["id"].split("-")[1]) for e in events + caught_up if e["event"] == "fill"]
    assert order_seqs == list(range(start_orders + 1, start_orders + 1 + len(order_seqs)))
    assert fill_seqs == list(range(start_fills + 1, start_fills + 1 + len(fill_seqs)))
    assert len(fill_seqs) == 3  # s-2 and the two sells
    stored = [s for s, _ in platform.messages("ORDERS")]
    assert len(order_seqs) == len(stored) - start_orders

    # A client that goes away leaves nothing behind (its consumers and subscriptions are gone).
    wait_for(lambda: "tradingstack_oms_stream_clients 0.0" in oms.get("/metrics")[1], 10, "no stream left open")

    def only_durables(stream_name: str) -> bool:
        consumers = platform.run(lambda nc: nc.jetstream().consumers_info(stream_name))
        return all(c.config.durable_name for c in consumers)

    for stream_name in ("ORDERS", "FILLS"):
        wait_for(lambda s=stream_name: only_durables(s), 15, f"the stream's consumers on {stream_name} gone")

    with platform.serve(ServiceName.OMS, STREAM_MAX_CLIENTS=1) as small:
        wait_for(lambda: small.get("/readyz")[0] == 200, 20, "a second oms ready")
        held = EventStream(small)
        assert held.next()["event"] == "hello"
        refused = EventStream(small)
        assert refused.status == 503
        assert refused.response.getheader("Retry-After") == "5"
        held.close()
        still_open = wait_for(lambda: s if (s := EventStream(small)).status == 200 else None, 10, "a stream again")
        assert still_open.next()["event"] == "hello"
        stopping = time.monotonic()
    # A stream never ends by itself: shutdown cancels it after the grace, instead of waiting for ever.
    assert time.monotonic() - stopping < GRACEFUL_SHUTDOWN_SECONDS + 3

    for bad in ("yesterday", "1-2-3", "-1-2", "9" * 30 + "-1"):
        status, body = oms.get(urllib.request.Request(f"http://127.0.0.1:{oms.port}/stream",
                                                      headers={"Last-Event-ID": bad}))  # fmt: skip
        assert status == 422, (bad, body)


def test_a_stream_shows_only_the_callers_account_and_needs_its_key(
    platform: Platform,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with two_desks(platform, monkeypatch, [ServiceName.RISK, ServiceName.OMS, ServiceName.EXEQ, ServiceName.PNL]) as (
        oms,
        bearer,
    ):
        assert EventStream(oms).status == 401
        watcher = EventStream(oms, bearer["desk-b"])
        watcher.next()  # hello
        theirs = place(oms, order("a-1", "buy", 1), bearer["desk-a"])
        final(oms, theirs["order_id"], "filled", bearer["desk-a"])
        mine = place(oms, order("b-1", "buy", 1), bearer["desk-b"])
        events = watcher.until(_is_filled(mine["order_id"]))
        events += watcher.until(lambda e: e["event"] == "position")
        watcher.close()
        assert theirs["order_id"] not in json.dumps(events)
        assert {e["data"]["account"] for e in events if e["event"] in ("order", "fill", "position")} == {"desk-b"}
        assert any(e["event"] == "skip" for e in events)  # desk-a's, passed over with their ids
