"""ptrc: a scripted day of fills against a hand computation (pure), then on real servers (nats-server,
redis-server, moto's S3) beside pnl: the report over HTTP as JSON and CSV, reconciled against pnl,
a mismatch flagged, written to lake/reports and written again in place."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from deltalake import DeltaTable
from prometheus_client import REGISTRY

from tradingstack.api import ServiceName
from tradingstack.lake import REPORTS
from tradingstack_services.oversight import reports
from tradingstack_services.oversight.reports import Ledger, apply, report
from tradingstack_services.platform.settings import ServiceSettings
from tradingstack_services.trading.model import Fill, Position
from tradingstack_services.trading.pnl import DETAILS_KEY

from conftest import LiveServer, wait_for
from test_trading_e2e import Platform, running_platform

DAY, BEFORE = "2026-01-02", "2026-01-01"
# (day, id, side, quantity, price): one fill the day before, then the day's three.
SCRIPT = [(BEFORE, "f0", "buy", 1.0, 90.0), (DAY, "f1", "buy", 2.0, 100.0), (DAY, "f2", "buy", 1.0, 103.0),
          (DAY, "f3", "sell", 2.0, 105.0)]  # fmt: skip


def fill(day: str, fill_id: str, side: str, quantity: float, price: float, n: int) -> Fill:
    ts = datetime.fromisoformat(f"{day}T09:{30 + n:02d}:00+00:00")
    return Fill(fill_id=fill_id, order_id=f"o-{fill_id}", account="desk-a", symbol="BTCUSDT", side=side,  # type: ignore[arg-type]
                quantity=quantity, price=price, ts=ts)  # fmt: skip


FILLS = [fill(*step, n) for n, step in enumerate(SCRIPT)]
# By hand, average cost: the day opens at 1 @ 90; buy 2 @ 100 -> 3 @ 96.667; buy 1 @ 103 -> 4 @ 98.25;
# sell 2 @ 105 realises 2 x (105 - 98.25) = 13.5 and leaves 2 @ 98.25, worth 2 x (105 - 98.25) = 13.5
# more at the day's last price (a past day is marked at its last fill).
EXPECTED = {
    "date": DAY, "account": "desk-a", "symbol": "BTCUSDT", "opening_quantity": 1.0, "opening_avg_price": 90.0,
    "trades": 3, "bought": 3.0, "sold": 2.0, "buy_notional": 303.0, "sell_notional": 210.0, "fees": 0.0,
    "realized_pnl": 13.5, "unrealized_pnl": 13.5, "mark_price": 105.0, "closing_quantity": 2.0,
    "closing_avg_price": 98.25,
}  # fmt: skip


def test_a_scripted_day_reports_what_a_hand_computation_gives() -> None:
    running = Position(symbol="BTCUSDT", account="desk-a")
    ledgers: dict[str, Ledger] = {}
    for f in FILLS:
        day = f"{f.ts:%Y-%m-%d}"
        ledgers[day], running = apply(ledgers.get(day), running, f)
    (row,) = report(DAY, [ledgers[DAY]], {}, {"desk-a/BTCUSDT": 2.0})
    got = row.model_dump()
    assert {k: got[k] for k in EXPECTED} == pytest.approx(EXPECTED)
    assert (row.pnl_quantity, row.reconciled) == (2.0, True)
    (off,) = report(DAY, [ledgers[DAY]], {}, {"desk-a/BTCUSDT": 3.0})
    assert off.reconciled is False
    (past,) = report(BEFORE, [ledgers[BEFORE]], {}, None)
    assert (past.opening_quantity, past.closing_quantity, past.reconciled) == (0.0, 1.0, None)


@pytest.fixture
def platform(tmp_path: Path, s3_url: str) -> Iterator[Platform]:
    with running_platform(tmp_path, s3_url, symbols=["BTCUSDT"], services={"ptrc": {"enabled": True}}) as running:
        yield running


def lake_settings(platform: Platform) -> ServiceSettings:
    credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret"}
    return platform.settings(ServiceName.PTRC).model_copy(update=credentials)


def test_the_days_report_is_served_reconciled_and_written_to_the_lake_once(platform: Platform) -> None:
    settings = lake_settings(platform)
    with contextlib.ExitStack() as stack:
        ptrc = stack.enter_context(LiveServer(reports.create(settings)))
        pnl = platform.serve(ServiceName.PNL)
        stack.enter_context(pnl)

        async def publish(nc: Any) -> None:
            js = nc.jetstream()
            for f in [*FILLS, FILLS[2]]:  # the last but one again, as a retrying producer would send it
                await js.publish("fills.BTCUSDT", f.model_dump_json().encode())
            await js.publish("fills.BTCUSDT", b'{"fill_id": "bad"}')

        platform.run(publish)

        def reconciled() -> list[dict[str, Any]] | None:
            status, rows = ptrc.get(f"/reports?date={DAY}")
            return rows if status == 200 and rows and rows[0]["reconciled"] is True else None

        (row,) = wait_for(reconciled, 20, "the day's report, reconciled with pnl")
        assert {k: row[k] for k in EXPECTED} == pytest.approx(EXPECTED)  # the repeated fill counted once
        assert [s for s, _ in platform.messages("DEAD_LETTER") if s.endswith("invalid_fill")]
        request = f"http://127.0.0.1:{ptrc.port}/reports?date={DAY}&format=csv"
        with urllib.request.urlopen(request, timeout=5) as answer:
            assert answer.headers["content-type"].startswith("text/csv")
            (as_csv,) = list(csv.DictReader(io.StringIO(answer.read().decode())))
        assert (as_csv["symbol"], float(as_csv["realized_pnl"]), as_csv["reconciled"]) == ("BTCUSDT", 13.5, "True")
        assert ptrc.get("/reports?date=02-01-2026")[0] == 422
        # pnl disagrees (its position changed behind ptrc's back): the report says so, the gauge counts it.
        client = redis.Redis.from_url(platform.redis.url)
        held = json.loads(client.hget(DETAILS_KEY, "desk-a/BTCUSDT"))
        client.hset(DETAILS_KEY, "desk-a/BTCUSDT", json.dumps({**held, "quantity": 5.0}))
        (off,) = ptrc.get(f"/reports?date={DAY}")[1]
        assert (off["reconciled"], off["pnl_quantity"]) == (False, 5.0)
        assert REGISTRY.get_sample_value("tradingstack_ptrc_reconciliation_mismatches") == 1
        client.hset(DETAILS_KEY, "desk-a/BTCUSDT", json.dumps(held))
        # Written to the lake on demand, twice: the second replaces the first.
        for _ in range(2):
            status, written = ptrc.post(f"/reports/{DAY}", {})
            assert status == 200, written
        assert ptrc.post("/reports/2025-06-01", {})[0] == 404
        # The lake away: 503 to try again, and what was written before stays as it was.
        away = settings.model_copy(update={"S3_ENDPOINT_URL": "http://127.0.0.1:9", "S3_MAX_RETRIES": 0,
                                           "S3_RETRY_TIMEOUT_SECONDS": 1.0})  # fmt: skip
        with LiveServer(reports.create(away)) as cut_off:
            status, body = cut_off.post(f"/reports/{DAY}", {})
        assert (status, body["detail"]) == (503, "the lake did not take the report; try again")
    table = DeltaTable(REPORTS.uri(settings.S3_BUCKET), storage_options=settings.storage_options())
    stored = table.to_pyarrow_table().to_pylist()
    assert [(r["date"], r["symbol"], r["closing_quantity"], r["reconciled"]) for r in stored] == [
        (DAY, "BTCUSDT", 2.0, True)
    ]


def test_a_day_closes_once_its_fills_are_all_applied() -> None:
    ended = datetime.fromisoformat("2026-01-03T00:00:00+00:00") + timedelta(seconds=reports.CLOSE_GRACE_SECONDS)
    early = ended - timedelta(seconds=1)
    assert not reports.closable(DAY, early, 10, ack_floor=10)  # a fill of its last instant may be on its way
    assert not reports.closable(DAY, ended, None, ack_floor=10)  # where the stream stood is not known yet
    assert not reports.closable(DAY, ended, 10, ack_floor=9)  # a fill stored before then is not applied yet
    assert reports.closable(DAY, ended, 10, ack_floor=10)


def test_every_ended_day_an_outage_skipped_is_written_once_its_fills_are_applied(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three past days of fills, none reported (ptrc was away over them): each is written to the lake."""
    monkeypatch.setattr(reports, "CLOSE_CHECK_SECONDS", 0.5)
    days = ["2026-01-05", "2026-01-06", "2026-01-07"]
    fills = [fill(day, f"d{i}", "buy", 1.0, 100.0 + i, i) for i, day in enumerate(days)]
    platform.run(lambda nc: _publish_all(nc, fills))
    settings = lake_settings(platform)
    table_uri = REPORTS.uri(settings.S3_BUCKET)

    def reported_days() -> list[str] | None:
        try:
            table = DeltaTable(table_uri, storage_options=settings.storage_options())
        except Exception:
            return None
        found = sorted({r["date"] for r in table.to_pyarrow_table().to_pylist()})
        return found if found == days else None

    def trades_of(day: str) -> int | None:
        table = DeltaTable(table_uri, storage_options=settings.storage_options())
        rows = [r for r in table.to_pyarrow_table().to_pylist() if r["date"] == day]
        return rows[0]["trades"] if rows else None

    with LiveServer(reports.create(settings)):
        wait_for(reported_days, 30, f"reports of {days}")
        assert trades_of(days[0]) == 1
        late = fill(days[0], "late", "sell", 1.0, 101.0, 9)  # a fill of a reported day, arriving late
        platform.run(lambda nc: _publish_all(nc, [late]))
        wait_for(lambda: trades_of(days[0]) == 2, 30, f"the report of {days[0]} written again with the late fill")


async def _publish_all(nc: Any, fills: list[Fill]) -> None:
    js = nc.jetstream()
    for f in fills:
        await js.publish(f"fills.{f.symbol}", f.model_dump_json().encode())
