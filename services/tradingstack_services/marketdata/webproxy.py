"""The gateway's door to the trading API: `/api/trading/...` forwarded to the OMS, so the dashboard
the gateway serves calls one origin (no CORS, one port-forward) and the OMS needs no browser rules.

Only the trading API's own paths pass (orders, fills, stream), and only the headers it reads;
the answer streams through unbuffered (Server-Sent Events included).
"""

from __future__ import annotations

import re

import httpx
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

FORWARDED_PATHS = re.compile(
    r"^(orders|orders/[A-Za-z0-9_.:-]{1,64}(/cancel)?|orders/(batch|cancel-all)|fills|stream)$"
)
REQUEST_HEADERS = ("authorization", "content-type", "accept", "last-event-id")
ANSWER_HEADERS = ("content-type", "cache-control", "retry-after", "www-authenticate")
# Ordinary calls answer within this (a stuck OMS does not hold a gateway connection for ever).
CALL_TIMEOUT_SECONDS = 10.0
CALL_CONNECTIONS = 100


def add_routes(app: FastAPI, base_url: str | None, stream_slots: int) -> None:
    """`stream_slots`: live streams forwarded at once, each on its own connection of a pool apart
    from the ordinary calls' (so open dashboards never take the connections the calls need)."""
    base = base_url or "http://unset"
    calls = httpx.AsyncClient(base_url=base, timeout=CALL_TIMEOUT_SECONDS,
                              limits=httpx.Limits(max_connections=CALL_CONNECTIONS))  # fmt: skip
    # No read timeout: a stream stays open as long as the page does; connecting is bounded, and a
    # stream beyond the slots waits at most that long for one, then is answered 503.
    stream_limits = httpx.Limits(max_connections=stream_slots, max_keepalive_connections=0)
    streams = httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(CALL_TIMEOUT_SECONDS, read=None),
                                limits=stream_limits)  # fmt: skip

    @app.api_route("/api/trading/{path:path}", methods=["GET", "POST"], include_in_schema=False)
    async def forward(path: str, request: Request) -> Response:
        if base_url is None:
            raise HTTPException(503, "no trading API here: the stack runs no OMS (TRADING_API_URL is unset)")
        if not FORWARDED_PATHS.match(path):
            raise HTTPException(404, "not a trading API path")
        body = await request.body()  # bounded by the app's HTTP_MAX_BODY_BYTES (413 before it is read)
        client = streams if path == "stream" else calls
        headers = {k: v for k, v in request.headers.items() if k.lower() in REQUEST_HEADERS}
        upstream = client.build_request(request.method, f"/{path}", params=request.query_params, content=body,
                                        headers=headers)  # fmt: skip
        try:
            answer = await client.send(upstream, stream=True)
        except httpx.PoolTimeout as exc:
            raise HTTPException(503, "every live stream slot of the gateway is taken",
                                headers={"Retry-After": "5"}) from exc  # fmt: skip
        except httpx.HTTPError as exc:
            raise HTTPException(502, f"the trading API did not answer ({type(exc).__name__})",
                                headers={"Retry-After": "1"}) from exc  # fmt: skip
        kept = {k: v for k, v in answer.headers.items() if k.lower() in ANSWER_HEADERS}
        return StreamingResponse(answer.aiter_raw(), status_code=answer.status_code, headers=kept,
                                 background=BackgroundTask(answer.aclose))  # fmt: skip
