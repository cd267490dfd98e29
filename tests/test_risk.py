"""risk: the pure decision, and the service over HTTP and NATS request-reply with a real Redis."""

from __future__ import annotations

import asyncio
import json
import math
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

import nats
import pytest
import redis

from tradingstack.api import RiskLimit
from tradingstack_services.platform.settings import ServiceSettings
from tradingstack_services.trading import risk
from tradingstack_services.trading.risk import CheckRequest, RiskLevel, check

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


@pytest.mark.parametrize(("quantity", "price"), [(math.nan, 1_000.0), (math.inf, 1_000.0), (1, math.nan),
                                                 (1, math.inf), (-math.inf, 1_000.0)])  # fmt: skip
def test_the_decision_itself_never_approves_a_non_finite_number(quantity: float, price: float) -> None:
    # Models refuse these at the edge; the decision must not depend on that (NaN fails every comparison).
    request_ = CheckRequest.model_construct(symbol="BTCUSDT", quantity=quantity, side="buy", price=price)
    result = check(request_, LIMIT, 0)
    assert result.approved is False
    assert result.risk_level is RiskLevel.CRITICAL


def post_raw(port: int, path: str, body: bytes) -> tuple[int, Message, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def test_nan_and_infinity_are_refused_over_http_and_nats(stack: tuple[NatsServer, RedisServer]) -> None:
    nats_server, redis_server = stack
    settings = ServiceSettings(SERVICE_NAME="risk", NATS_URL=nats_server.url, REDIS_URL=redis_server.url)  # type: ignore[call-arg]
    bodies = [b'{"symbol": "BTCUSDT", "quantity": NaN, "side": "buy", "price": 100}',
              b'{"symbol": "BTCUSDT", "quantity": 1, "side": "buy", "price": Infinity}',
              b'{"symbol": "BTCUSDT", "quantity": 1e400, "side": "buy", "price": 100}',
              b'{"symbol": "BTCUSDT", "quantity": "1", "side": "buy", "price": [1]}']  # fmt: skip
    with LiveServer(risk.create(settings)) as client:
        wait_for(lambda: client.get("/readyz")[0] == 200, 10, "ready")
        for body in bodies:
            status, _, answer = post_raw(client.port, "/check", body)
            assert status == 422, (body, answer)

        async def over_nats() -> list[dict[str, object]]:
            nc = await nats.connect(nats_server.url)
            replies = [json.loads((await nc.request("risk.check", body, timeout=2)).data) for body in bodies]
            await nc.close()
            return replies

        for reply in asyncio.run(over_nats()):
            assert reply["approved"] is False
            assert "invalid request" in str(reply["reason"])


def test_before_positions_load_risk_answers_503_with_retry_after(stack: tuple[NatsServer, RedisServer]) -> None:
    nats_server, redis_server = stack
    redis_server.stop()  # positions cannot load
    settings = ServiceSettings(SERVICE_NAME="risk", NATS_URL=nats_server.url, REDIS_URL=redis_server.url)  # type: ignore[call-arg]
    body = b'{"symbol": "BTCUSDT", "quantity": 1, "side": "buy", "price": 100}'
    with LiveServer(risk.create(settings)) as client:
        status, headers, answer = post_raw(client.port, "/check", body)
        assert status == 503, answer
        assert int(headers.get("Retry-After", "0")) >= 1
        assert b"positions" in answer

        async def over_nats() -> dict[str, object]:
            nc = await nats.connect(nats_server.url)
            reply = await nc.request("risk.check", body, timeout=5)
            await nc.close()
            return dict(json.loads(reply.data))

        # Over NATS it answers at once with an error the OMS turns into its own 503 (no decision made).
        reply = wait_for(lambda: asyncio.run(over_nats()), 20, "a risk reply over NATS")
        assert "error" in reply
        assert "approved" not in reply
