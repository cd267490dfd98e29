"""docker compose, the seeds' way: compose.yaml runs the one image for every service plus NATS,
Redis, an S3 server and QuestDB, with `tradingstack provision` as a one-shot before the services.

The environment check always runs. The run needs Docker and docker-compose (CI requires them with
TRADINGSTACK_REQUIRE_CLUSTER=1); it uses the infrastructure stand-ins of hack/local-infra.sh,
since Docker Hub is out of reach here (TRADINGSTACK_COMPOSE_REAL_IMAGES=1 takes the real ones).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tradingstack.plan import StackRef, build_plan, parse_spec

from conftest import free_port, wait_for
from conftest import http_json as http

ROOT = Path(__file__).resolve().parents[1]


def test_each_services_environment_is_what_the_operator_would_set() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    stack = yaml.safe_load((ROOT / "compose" / "stack.yaml").read_text())
    meta = stack["metadata"]  # as `tradingstack provision` reads it
    plan = build_plan(StackRef(meta["name"], meta.get("namespace") or "default"), parse_spec(stack["spec"]))
    secrets = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}  # from the environment, as from a Secret
    for workload in plan.workloads:
        service = compose["services"][workload.service.value]
        environment = {k: str(v) for k, v in service["environment"].items() if k not in secrets}
        assert environment == workload.config, workload.service.value
        assert service["command"] == ["service", workload.service.value]
        assert service["depends_on"] == {"provision": {"condition": "service_completed_successfully"}}
    assert set(compose["services"]) == {w.service.value for w in plan.workloads} | {
        "nats", "redis", "s3", "questdb", "provision"}  # fmt: skip


def _unavailable(why: str) -> None:
    if os.environ.get("TRADINGSTACK_REQUIRE_CLUSTER") == "1":
        pytest.fail(f"TRADINGSTACK_REQUIRE_CLUSTER=1 but {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def compose() -> Iterator[dict[str, str]]:
    """`docker-compose up -d` of the whole platform; the published ports by service."""
    if shutil.which("docker-compose") is None:
        _unavailable("docker-compose not installed (apt-get install docker-compose)")
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        _unavailable("no Docker engine answers")
    image = "tradingstack:compose-test"
    built = subprocess.run(["docker", "build", "-q", "-t", image, str(ROOT)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    ports = {"gateway": free_port(), "risk": free_port(), "oms": free_port(), "pnl": free_port()}
    env = {**os.environ, "TRADINGSTACK_IMAGE": image, "GATEWAY_PORT": str(ports["gateway"]),
           "RISK_PORT": str(ports["risk"]), "OMS_PORT": str(ports["oms"]), "PNL_PORT": str(ports["pnl"])}  # fmt: skip
    files = ["-f", str(ROOT / "compose.yaml")]
    if os.environ.get("TRADINGSTACK_COMPOSE_REAL_IMAGES") != "1":
        made = subprocess.run([str(ROOT / "hack" / "local-infra.sh")], capture_output=True, text=True)
        assert made.returncode == 0, made.stderr[-3000:]
        images = made.stdout.split()
        env |= {f"{c.upper()}_IMAGE": i for c, i in zip(["nats", "redis", "s3", "questdb"], images, strict=True)}
        files += ["-f", str(ROOT / "compose" / "local-infra.yaml")]
    project = ["docker-compose", "-p", f"ts{uuid.uuid4().hex[:8]}", *files]
    started = time.monotonic()
    up = subprocess.run([*project, "up", "-d"], env=env, capture_output=True, text=True, timeout=600)
    ready = False
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        for name, url in urls.items():
            wait_for(lambda url=url: http(f"{url}/readyz")[0] == 200, 120, f"{name} ready")
        print(f"docker-compose up to every service ready: {time.monotonic() - started:.0f} s")
        ready = True
        yield urls
    finally:
        if not ready:  # what the containers said, for the failure report
            logs = subprocess.run([*project, "logs", "--tail=20"], env=env, capture_output=True, text=True)
            print(logs.stdout[-6000:])
        subprocess.run([*project, "down", "-v", "--remove-orphans"], env=env, capture_output=True, timeout=300)


def test_provision_then_ticks_and_an_order_traded_to_a_position(compose: dict[str, str]) -> None:
    tickers = wait_for(lambda: (r := http(f"{compose['gateway']}/tickers"))[0] == 200 and r[1], 30, "ticks")
    assert {t["symbol"] for t in tickers} >= {"BTCUSDT"}
    order = {"client_order_id": f"compose-{uuid.uuid4().hex[:8]}", "symbol": "BTCUSDT", "side": "buy",
             "quantity": 0.25}  # fmt: skip
    _, placed = wait_for(lambda: (r := http(f"{compose['oms']}/orders", order))[0] == 201 and r, 30, "order placed")
    filled = wait_for(lambda: (b := http(f"{compose['oms']}/orders/{placed['order_id']}")[1])["status"] == "filled"
                      and b, 30, "the order filled")  # fmt: skip
    assert filled["avg_fill_price"] > 0

    def position() -> dict[str, Any] | None:
        rows = [p for p in http(f"{compose['pnl']}/positions")[1] if p["symbol"] == "BTCUSDT"]
        return rows[0] if rows and rows[0]["quantity"] == pytest.approx(0.25) else None

    assert wait_for(position, 30, "the position")["quantity"] == pytest.approx(0.25)
    # The dashboard's way in: the gateway forwards to the OMS by the name the plan gave it.
    status, blotter = http(f"{compose['gateway']}/api/trading/orders")
    assert status == 200, blotter
    assert placed["order_id"] in [o["order_id"] for o in blotter["orders"]]
    assert http(f"{compose['gateway']}/health")[1]["status"] == "healthy"
