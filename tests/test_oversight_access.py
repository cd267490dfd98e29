"""Oversight endpoints take the accounts' keys: each account reads its own rows, role oversight all.

On real servers, with the stack's accounts as the operator configures them (spec.accounts, one of
them `role: oversight`): exeq's resting orders, the compliance-scanner's alerts, ptrc's reports and
execution quality answer 401 without a key, show a trader its own account's rows only, and show an
oversight account every account's.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tradingstack.api import ServiceName
from tradingstack.plan import secret_env
from tradingstack_services.oversight import compliance, quality, reports

from conftest import LiveServer, wait_for
from test_trading_e2e import FACTORIES, Platform, final, order, running_platform

KEYS = {"desk-a": "ka-5e1f0c", "desk-b": "kb-9d2a7e", "watch": "kw-3b8c4f"}
SERVICES = {**FACTORIES, ServiceName.COMPLIANCE: compliance.create, ServiceName.QUALITY: quality.create,
            ServiceName.PTRC: reports.create}  # fmt: skip


@pytest.fixture
def platform(tmp_path: Path, s3_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Platform]:
    accounts = [{"name": "desk-a", "secretRef": {"name": "desk-a-keys"}},
                {"name": "desk-b", "secretRef": {"name": "desk-b-keys"}},
                {"name": "watch", "secretRef": {"name": "watch-keys"}, "role": "oversight"}]  # fmt: skip
    enabled = {s: {"enabled": True} for s in ("compliance-scanner", "execution-quality", "ptrc")}
    with running_platform(tmp_path, s3_url, symbols=["BTCUSDT"], accounts=accounts, services=enabled) as running:
        for service in (ServiceName.EXEQ, ServiceName.COMPLIANCE, ServiceName.QUALITY, ServiceName.PTRC):
            for name, source in secret_env(running.plan.spec, service).items():
                if name.startswith("AUTH_KEYS_"):  # where the kubelet puts each account's Secret
                    account = source["secretKeyRef"]["name"].removesuffix("-keys")
                    monkeypatch.setenv(name, hashlib.sha256(KEYS[account].encode()).hexdigest())
        running.tick("BTCUSDT", 100.0, 99.9, 100.1)
        yield running


def bearer(account: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[account]}"}


def test_each_account_reads_its_own_oversight_rows_and_role_oversight_reads_all(platform: Platform) -> None:
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    with contextlib.ExitStack() as stack:
        lake = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret"}  # from its Secret
        servers: dict[ServiceName, LiveServer] = {
            s: stack.enter_context(LiveServer(SERVICES[s](platform.settings(s).model_copy(update=lake))))
            for s in SERVICES
        }
        for service, server in servers.items():
            wait_for(lambda server=server: server.get("/readyz")[0] == 200, 20, f"{service.value} ready")
        oms, exeq = servers[ServiceName.OMS], servers[ServiceName.EXEQ]
        placed: dict[str, Any] = {}
        for desk in ("desk-a", "desk-b"):
            status, filled = oms.post("/orders", order(f"{desk}-m", "buy", 1), bearer(desk))
            assert status == 201, filled
            final(oms, filled["order_id"], "filled", bearer(desk))
            status, placed[desk] = oms.post("/orders", order(f"{desk}-r", "buy", 1, order_type="limit",
                                                             limit_price=50.0), bearer(desk))  # fmt: skip
            assert status == 201, placed[desk]
        wait_for(lambda: len(exeq.get("/resting", bearer("watch"))[1]) == 2, 10, "both resting orders")

        assert exeq.get("/resting")[0] == 401
        assert [o["order_id"] for o in exeq.get("/resting", bearer("desk-a"))[1]] == [placed["desk-a"]["order_id"]]

        ptrc = servers[ServiceName.PTRC]
        wait_for(lambda: len(ptrc.get(f"/reports?date={today}", bearer("watch"))[1]) == 2, 15, "both desks reported")
        assert ptrc.get(f"/reports?date={today}")[0] == 401
        mine = ptrc.get(f"/reports?date={today}", bearer("desk-b"))[1]
        assert [r["account"] for r in mine] == ["desk-b"]
        assert ptrc.post(f"/reports/{today}", {}, bearer("desk-b"))[0] == 403
        assert ptrc.post(f"/reports/{today}", {}, bearer("watch"))[0] == 200

        scanner = servers[ServiceName.COMPLIANCE]
        assert scanner.get("/alerts")[0] == 401
        assert scanner.get("/alerts", bearer("desk-a"))[0] == 200
        assert all(a["account"] == "desk-a" for a in scanner.get("/alerts", bearer("desk-a"))[1])

        measured = servers[ServiceName.QUALITY]
        assert measured.get("/quality")[0] == 401
        assert measured.get("/quality", bearer("desk-a"))[0] == 403
        wait_for(lambda: measured.get("/quality", bearer("watch"))[1], 15, "quality of the fills")
