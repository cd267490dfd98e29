"""Clients that misbehave: huge or endless bodies, bodies that never finish, a crowd of streams.

Every request is bounded before it is read: a declared or streamed body over the cap is a 413,
a body that stops arriving a 408, and stream slots are taken before anything is awaited.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import socket
import time

from test_trading_api import EventStream
from tradingstack.api import ServiceName

from conftest import wait_for
from test_trading_e2e import Platform, platform  # noqa: F401


def _raw(port: int, head: bytes, body: bytes = b"", wait: float = 5.0) -> tuple[int, float]:
    """Send a request as raw bytes; the answer's status and how long it took to come."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as conn:
        conn.sendall(head + body)
        answer = b""
        try:
            while b"\r\n" not in answer:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                answer += chunk
        except OSError:  # reset after the answer: what came is what counts
            pass
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
    return status, time.monotonic() - started


def test_a_body_declared_over_the_cap_is_refused_before_it_is_sent(platform: Platform) -> None:  # noqa: F811
    with platform.serve(ServiceName.OMS, HTTP_MAX_BODY_BYTES=10_000) as oms:
        wait_for(lambda: oms.get("/healthz")[0] == 200, 20, "oms up")
        head = (b"POST /orders/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 300000000\r\n\r\n")  # fmt: skip
        status, took = _raw(oms.port, head)  # not one byte of the 300 MB follows
        assert status == 413
        assert took < 2


def test_a_streamed_body_over_the_cap_is_refused_once_it_passes_it(platform: Platform) -> None:  # noqa: F811
    with platform.serve(ServiceName.OMS, HTTP_MAX_BODY_BYTES=10_000) as oms:
        wait_for(lambda: oms.get("/healthz")[0] == 200, 20, "oms up")
        head = (
            b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"x" * 4096
        body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5))  # 20 KB, no end
        status, _ = _raw(oms.port, head, body)
        assert status == 413
        ok, placed = oms.post("/orders", {"client_order_id": "small", "symbol": "BTCUSDT", "side": "buy",
                                          "quantity": 1})  # fmt: skip
        assert ok != 413, placed  # an ordinary order is under the cap


def test_a_body_that_stops_arriving_is_answered_408(platform: Platform) -> None:  # noqa: F811
    with platform.serve(ServiceName.OMS, HTTP_BODY_TIMEOUT_SECONDS=1) as oms:
        wait_for(lambda: oms.get("/healthz")[0] == 200, 20, "oms up")
        head = b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        status, took = _raw(oms.port, head, b'{"client_order_id": ')  # and then nothing
        assert status == 408
        assert took < 4


def test_concurrent_stream_connects_get_no_more_slots_than_the_limit(platform: Platform) -> None:  # noqa: F811
    platform.tick("BTCUSDT", 100.0, 99.9, 100.1)
    with platform.serve(ServiceName.OMS, STREAM_MAX_CLIENTS=2) as oms:
        wait_for(lambda: oms.get("/readyz")[1]["checks"].get("nats") == "ok", 20, "oms connected to NATS")
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            streams = list(pool.map(lambda _: EventStream(oms), range(20)))
        try:
            opened = [s for s in streams if s.status == 200]
            assert len(opened) <= 2, [s.status for s in streams]
            assert {s.status for s in streams} <= {200, 503}
        finally:
            for stream in streams:
                stream.close()
        wait_for(lambda: "tradingstack_oms_stream_clients 0.0" in oms.get("/metrics")[1], 10, "every slot given back")


def test_open_live_streams_through_the_gateway_never_starve_its_other_calls(platform: Platform) -> None:  # noqa: F811
    """The gateway forwards live streams on a pool of their own: as many streams as its old shared pool
    held (100) leave the dashboard's ordinary calls answering."""
    from tradingstack_services.marketdata import gateway

    from conftest import LiveServer

    platform.tick("BTCUSDT", 100.0, 99.9, 100.1)
    with contextlib.ExitStack() as stack:
        servers = platform.serve_all(stack, [ServiceName.RISK, ServiceName.OMS], STREAM_MAX_CLIENTS=150)
        oms = servers[ServiceName.OMS]
        settings = platform.settings(ServiceName.GATEWAY).model_copy(
            update={"TICK_RATE": 0.0, "TRADING_API_URL": f"http://127.0.0.1:{oms.port}", "STREAM_MAX_CLIENTS": 150}
        )
        page = stack.enter_context(LiveServer(gateway.create(settings)))
        streams = []
        for _ in range(100):
            conn = stack.enter_context(socket.create_connection(("127.0.0.1", page.port), timeout=10))
            conn.sendall(b"GET /api/trading/stream HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
            streams.append(conn)
        for conn in streams:
            assert conn.recv(12).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        status, body = page.get("/api/trading/orders")
        assert status == 200, body
        assert time.monotonic() - started < 5
