"""The OMS's write-behind history on the QuestDB double: one refused line costs that line only."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from questdb_double import QuestDBDouble
from tradingstack.backends.questdb import QuestDBProvisioner
from tradingstack.plan import StackRef, build_plan, parse_spec
from tradingstack_services.platform import ilp
from tradingstack_services.platform.history import DROPPED, History

TS = datetime(2026, 1, 2, 9, 30, tzinfo=UTC)


def order_line(order_id: str, quantity: float, second: int) -> str:
    return ilp.line("orders", {"symbol": "BTCUSDT", "side": "buy", "order_type": "market", "status": "routed"},
                    {"order_id": order_id, "quantity": quantity, "client_order_id": f"c-{order_id}"},
                    TS.replace(second=second))  # fmt: skip


def test_a_line_questdb_refuses_is_dropped_alone_and_the_rest_is_written() -> None:
    with QuestDBDouble() as qdb:
        spec = {"infrastructure": {"questdb": {"url": qdb.url}}}
        assert QuestDBProvisioner(qdb.url).reconcile(build_plan(StackRef("h", "ns"), parse_spec(spec))).ok
        history = History(qdb.url)
        good = [order_line(f"o{i}", 1.0 + i, i) for i in range(9)]
        # A string where the table has a DOUBLE: QuestDB refuses the line (and with it the request).
        bad = good[4].replace("quantity=5.0", 'quantity="five"')
        dropped_before = DROPPED.labels("refused")._value.get()
        for line in [*good[:4], bad, *good[5:]]:
            history.add(line)
        asyncio.run(history.flush())
        stored = {row["order_id"] for row in qdb.state.tables["orders"].rows}
        assert stored == {f"o{i}" for i in range(9) if i != 4}
        assert DROPPED.labels("refused")._value.get() == dropped_before + 1
        assert not history.lines  # nothing left waiting
