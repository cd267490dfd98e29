"""The audit log: what each kind of message becomes (pure), then the trading path with the
compliance-scanner on real servers (nats-server, redis-server, moto's S3, the QuestDB double),
every event in `lake/audit` exactly once, also after every consumer starts over from the start."""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from deltalake import DeltaTable
from nats.aio.msg import Msg
from pydantic import ValidationError

from tradingstack.api import ServiceName
from tradingstack.backends.jetstream import JetStreamProvisioner
from tradingstack.lake import AUDIT
from tradingstack.reconciler import Reconciler
from tradingstack_services.marketdata.ticks import InvalidMessageError
from tradingstack_services.oversight import audit, compliance
from tradingstack_services.oversight.audit import audit_row
from tradingstack_services.platform import bus
from tradingstack_services.platform.settings import ServiceSettings

from conftest import LiveServer, wait_for
from test_trading_e2e import FACTORIES, Platform, final, running_platform

STAMP = datetime(2026, 12, 5, 8, 0, tzinfo=UTC)


def delivered(stream: str, seq: int, subject: str, data: bytes) -> Msg:
    """A message as a pull consumer delivers it (its metadata comes from the ack subject)."""
    nanos = int(STAMP.timestamp() * 1e9)
    return Msg(None, subject=subject, reply=f"$JS.ACK.{stream}.dur.1.{seq}.{seq}.{nanos}.0", data=data)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("stream", "subject", "payload", "expected"),
    [
        ("ORDERS", "orders.filled.BTCUSDT",
         {"order_id": "o1", "account": "desk-a", "symbol": "BTCUSDT", "status": "filled",
          "updated_at": "2026-12-04T10:00:00Z"},
         ("order", "desk-a", "BTCUSDT", "o1", "filled", "2026-12-04")),
        ("FILLS", "fills.BTCUSDT",
         {"fill_id": "o1-1", "order_id": "o1", "symbol": "BTCUSDT", "ts": "2026-12-03T23:59:59Z"},
         ("fill", None, "BTCUSDT", "o1", None, "2026-12-03")),
        ("POSITIONS", "positions.BTCUSDT",
         {"symbol": "BTCUSDT", "quantity": 1, "fill": {"order_id": "o1", "ts": "2026-12-02T12:00:00Z"}},
         ("position", None, "BTCUSDT", "o1", None, "2026-12-02")),
        ("COMPLIANCE", "compliance.alert.wash_trade.BTCUSDT",
         {"alert_id": "wash_trade:o1-1", "rule": "wash_trade", "order_id": "o1", "ts": "2026-12-01T00:00:00Z"},
         ("compliance_alert", None, None, "o1", None, "2026-12-01")),
        ("AUDIT", "audit.operator.ns.demo", {"reason": "Applied", "ts": "2026-11-30T08:00:00Z"},
         ("operator_action", None, None, None, "Applied", "2026-11-30")),
    ],
    ids=["order", "fill", "position", "alert", "operator-action"],
)  # fmt: skip
def test_each_kind_of_record_keeps_the_message_and_what_a_reader_filters_on(
    stream: str, subject: str, payload: dict[str, Any], expected: tuple[Any, ...]
) -> None:
    data = json.dumps(payload).encode()
    row = audit_row(delivered(stream, 7, subject, data), 7)
    assert (row["kind"], row["account"], row["symbol"], row["order_id"], row["status"], row["dt"]) == expected
    assert (row["event_id"], row["stream"], row["stream_seq"], row["subject"]) == (f"{stream}:7", stream, 7, subject)
    assert json.loads(row["payload"]) == payload


def test_what_other_services_refuse_is_still_recorded_and_only_non_text_is_dead_lettered() -> None:
    row = audit_row(delivered("ORDERS", 3, "orders.routed.X", b"not json at all"), 3)
    assert (row["payload"], row["event_ts"], row["kind"]) == ("not json at all", STAMP, "order")
    with pytest.raises(InvalidMessageError) as refused:
        audit_row(delivered("ORDERS", 4, "orders.routed.X", b"\xff\xfe"), 4)
    assert refused.value.reason == "not_utf8"


@pytest.fixture
def platform(tmp_path: Path, s3_url: str) -> Iterator[Platform]:
    services = {"audit-log": {"enabled": True}, "compliance-scanner": {"enabled": True}}
    with running_platform(tmp_path, s3_url, symbols=["BTCUSDT"], services=services,
                          compliance={"washTradeWindowSeconds": 600}) as running:  # fmt: skip
        yield running


def audit_settings(platform: Platform) -> ServiceSettings:
    """The audit log's ConfigMap, and the lake keys Kubernetes would set from the Secret."""
    credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret"}
    return platform.settings(ServiceName.AUDIT).model_copy(update=credentials)


def audit_rows(platform: Platform) -> list[dict[str, Any]]:
    settings = audit_settings(platform)
    table = DeltaTable(AUDIT.uri(settings.S3_BUCKET), storage_options=settings.storage_options())
    rows: list[dict[str, Any]] = table.to_pyarrow_table().to_pylist()
    return rows


def restart_consumers_from_the_start(platform: Platform) -> None:
    """The operator's consumers deleted and made again: each delivers its whole stream anew."""

    async def delete(nc: Any) -> None:
        jsm = nc.jsm()
        for consumer in platform.plan.consumers:
            if consumer.service == ServiceName.AUDIT:
                await jsm.delete_consumer(consumer.stream, consumer.durable)

    platform.run(delete)
    assert JetStreamProvisioner(platform.nats.url).reconcile(platform.plan).ok


def test_every_event_of_the_trading_path_is_in_the_audit_table_exactly_once(platform: Platform) -> None:
    platform.tick("BTCUSDT", 100.0, 99.9, 100.1)
    settings = audit_settings(platform)
    assert settings.POSITIONS_JETSTREAM is False  # pnl's setting, below, is what the plan gives pnl
    assert platform.settings(ServiceName.PNL).POSITIONS_JETSTREAM is True
    with contextlib.ExitStack() as stack:
        servers = platform.serve_all(stack, FACTORIES)
        watcher = stack.enter_context(LiveServer(compliance.create(platform.settings(ServiceName.COMPLIANCE))))
        log = stack.enter_context(LiveServer(audit.create(settings)))
        for server in (watcher, log):
            wait_for(lambda server=server: server.get("/readyz")[0] == 200, 30, "ready")
        workers = [bus._worker_name(sink.run, i) for i, sink in enumerate(audit.sinks(settings))]
        assert workers == [f"LakeSink.run[{s}]" for s in ("ORDERS", "FILLS", "POSITIONS", "COMPLIANCE", "AUDIT")]
        oms = servers[ServiceName.OMS]
        ids = []
        for client_id, side in (("a-buy", "buy"), ("a-sell", "sell")):
            status, body = oms.post("/orders", {"client_order_id": client_id, "symbol": "BTCUSDT", "side": side,
                                                "quantity": 1})  # fmt: skip
            assert status == 201, body
            ids.append(final(oms, body["order_id"], "filled")["order_id"])
        # The operator's action on this stack: a Kubernetes event, and a record in the AUDIT stream.
        posted: list[tuple[str, ...]] = []
        body = {"metadata": {"name": "e2e", "namespace": "ns", "uid": "u-1", "generation": 3},
                "spec": platform.plan.spec.model_dump(by_alias=True, exclude_none=True)}  # fmt: skip
        Reconciler(None, events=lambda _b, *event: posted.append(event)).record(body, "Normal", "Applied", "1 change")  # type: ignore[arg-type]
        assert posted == [("Normal", "Applied", "1 change")]

        def complete() -> list[dict[str, Any]] | None:
            with contextlib.suppress(Exception):
                rows = audit_rows(platform)
                kinds = Counter(r["kind"] for r in rows)
                if kinds["fill"] == 2 and kinds["position"] == 2 and kinds["compliance_alert"] == 1 \
                        and kinds["operator_action"] == 1 and kinds["order"] >= 4:  # fmt: skip
                    return rows
            return None

        rows = wait_for(complete, 40, "every kind of event in lake/audit")
        time.sleep(1.5)  # anything late or doubled would land within a flush or two
    rows = audit_rows(platform)
    assert len({r["event_id"] for r in rows}) == len(rows)  # exactly once
    assert {r["order_id"] for r in rows if r["kind"] == "fill"} == set(ids)
    # Each status change of each order the ORDERS stream holds (routed, filled: two each).
    stored = [s for s, _ in platform.messages("ORDERS")]
    assert len([r for r in rows if r["kind"] == "order"]) == len(stored)
    action = json.loads(next(r["payload"] for r in rows if r["kind"] == "operator_action"))
    assert (action["reason"], action["stack"], action["actor"]) == ("Applied", "e2e", "tradingstack-operator")
    # Every consumer starts over: the whole streams come again, and nothing is written twice.
    restart_consumers_from_the_start(platform)
    with LiveServer(audit.create(settings)) as again:
        wait_for(lambda: again.get("/readyz")[0] == 200, 30, "the audit log ready again")

        def caught_up() -> bool:
            async def pending(nc: Any) -> int:
                jsm = nc.jsm()
                infos = [await jsm.consumer_info(c.stream, c.durable) for c in platform.plan.consumers
                         if c.service == ServiceName.AUDIT]  # fmt: skip
                return sum(i.num_pending + i.num_ack_pending for i in infos)

            return bool(platform.run(pending) == 0)

        wait_for(caught_up, 30, "every redelivery acknowledged")
    assert sorted(r["event_id"] for r in audit_rows(platform)) == sorted(r["event_id"] for r in rows)


@pytest.mark.parametrize("sources", ["nope", '[["ORDERS", "d"]]', '[["ORDERS", "", "orders.>"]]', "{}"])
def test_a_malformed_audit_sources_setting_is_refused_by_name(sources: str) -> None:
    with pytest.raises(ValidationError, match="AUDIT_SOURCES"):
        ServiceSettings(SERVICE_NAME="audit-log", AUDIT_SOURCES=sources)  # type: ignore[call-arg]


def test_run_by_hand_the_audit_log_reads_the_streams_a_default_stack_would_give_it() -> None:
    settings = ServiceSettings(SERVICE_NAME="audit-log")  # type: ignore[call-arg]
    assert [(s, d) for s, d, _ in settings.audit_sources()] == [
        ("FILLS", "default_tradingstack_audit-log_fills"), ("POSITIONS", "default_tradingstack_audit-log_positions"),
        ("AUDIT", "default_tradingstack_audit-log_audit"),
    ]  # fmt: skip
    assert (settings.NATS_STREAM, settings.NATS_DURABLE) == ("ORDERS", "default_tradingstack_audit-log")
