"""risk: the pure decision, and the service over HTTP and NATS request-reply with a real Redis."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
import redis

from tradingstack.api import RiskLimit
from tradingstack_services import risk
from tradingstack_services.risk import CheckRequest, RiskLevel, check
from tradingstack_services.settings import ServiceSettings

from conftest import LiveServer, NatsServer, RedisServer, wait_for

LIMIT = RiskLimit(symbol="BTCUSDT", min_quantity=0.01, max_quantity=10, max_notional=100_000, max_position=20)


def order(quantity: float, side: str = "buy", price: float | None = 1_000.0) -> CheckRequest:
    return CheckRequest(symbol="BTCUSDT", quantity=quantity, side=side, price=price)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("request_", "position", "approved", "level", "reason"),
    [
        (order(1), 0, True, RiskLevel.LOW, "within limits"),
        (order(9, price=10_000), 0, True, RiskLevel.HIGH, "within limits (90%"),
        (order(0), 0, False, RiskLevel.CRITICAL, "positive"),
        (order(0.001), 0, False, RiskLevel.HIGH, "below the minimum"),
        (order(11), 0, False, RiskLevel.HIGH, "above the maximum"),
        (order(5, price=50_000), 0, False, RiskLevel.HIGH, "notional"),
        (order(5), 18, False, RiskLevel.CRITICAL, "position would be 23.0"),
        (order(5, side="sell"), 18, True, RiskLevel.LOW, "within limits"),
        (order(1, price=None), 0, False, RiskLevel.CRITICAL, "no price"),
    ],
)
def test_decisions(request_: CheckRequest, position: float, approved: bool, level: RiskLevel, reason: str) -> None:
    result = check(request_, LIMIT, position)
    assert (result.approved, result.risk_level) == (approved, level)
    assert reason in result.reason


def test_limits_come_from_the_operators_rendering() -> None:
    limits = risk.load_limits('[{"symbol": "AAPL", "minQuantity": 1, "maxQuantity": 5, "maxNotional": 10, '
                              '"maxPosition": 7}]')  # fmt: skip
    assert limits["AAPL"].max_position == 7


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[NatsServer, RedisServer]]:
    nats_server, redis_server = NatsServer(tmp_path / "js"), RedisServer(tmp_path / "redis")
    nats_server.start()
    redis_server.start()
    yield nats_server, redis_server
    redis_server.stop()
    nats_server.stop()


def test_service_over_http_and_nats_with_positions_from_redis(stack: tuple[NatsServer, RedisServer]) -> None:
    nats_server, redis_server = stack
    settings = ServiceSettings(  # type: ignore[call-arg]
        SERVICE_NAME="risk", NATS_URL=nats_server.url, REDIS_URL=redis_server.url,
        RISK_LIMITS='[{"symbol": "BTCUSDT", "maxQuantity": 10, "maxNotional": 100000, "maxPosition": 20}]',
    )  # fmt: skip
    redis.Redis.from_url(redis_server.url).hset(risk.POSITIONS_KEY, "BTCUSDT", "18")
    with LiveServer(risk.create(settings)) as client:
        wait_for(lambda: client.get("/readyz")[0] == 200, 10, "ready")
        status, body = client.post("/check", {"symbol": "BTCUSDT", "quantity": 5, "side": "buy", "price": 100})
        assert status == 200
        assert body["approved"] is False
        assert "position would be 23.0" in body["reason"]

        async def over_nats() -> dict[str, object]:
            nc = await nats.connect(nats_server.url)
            payload = json.dumps({"symbol": "BTCUSDT", "quantity": 1, "side": "sell", "price": 100}).encode()
            reply = await nc.request("risk.check", payload, timeout=2)
            await nc.close()
            return dict(json.loads(reply.data))

        assert asyncio.run(over_nats())["approved"] is True

        redis_server.stop()
        status, body = wait_for(lambda: (r := client.get("/readyz"))[0] == 503 and r, 10, "503 with Redis down")
        assert body["checks"]["redis"] != "ok"
