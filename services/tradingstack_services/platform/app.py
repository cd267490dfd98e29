"""The FastAPI app every service starts from: /healthz, /readyz (real dependency checks), /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send


@dataclass(frozen=True)
class RequestLimits:
    max_body_bytes: int = 1_048_576
    body_timeout_seconds: float = 10.0


class BodyTimeout:
    """ASGI middleware: a request body that is still arriving after `seconds` is answered 408.

    A client that declares a body and sends it slowly (or never) would otherwise hold a connection
    and a handler for as long as it likes. Once the body is complete, reading on (a live stream
    waiting for the client to leave) is not timed.
    """

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.seconds
        complete = False

        async def timed_receive() -> Message:
            nonlocal complete
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - asyncio.get_running_loop().time(), 0))
            except TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within {self.seconds:g} s") from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed_receive, send)


# A readiness check raises (or times out) when its dependency is not usable right now.
Check = Callable[[], Awaitable[None]]
CHECK_TIMEOUT = 1.0


async def _run(check: Check) -> str | None:
    try:
        await asyncio.wait_for(check(), CHECK_TIMEOUT)
    except Exception as exc:  # any failure means not ready; its text is the answer
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return None


async def _outcomes(checks: dict[str, Check]) -> dict[str, str | None]:
    """Every check at once: its name -> None when it passed, else what went wrong."""
    results = await asyncio.gather(*(_run(c) for c in checks.values()))
    return dict(zip(checks, results, strict=True))


def create_app(
    name: str,
    checks: dict[str, Check],
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
    degraded: dict[str, Check] | None = None,
    live: dict[str, Check] | None = None,
    limits: RequestLimits | None = None,
) -> FastAPI:
    """`checks` decide readiness; `degraded` ones (a dependency the service can serve without, like
    QuestDB for history) are reported under "degraded" in /readyz without making it 503; `live` ones
    fail /healthz, the liveness probe, when the process is stuck in a way only a restart ends.
    `limits` bound every request body before it is read."""
    # Request spans carry trace context; per-operation spans and OTel metrics (Prometheus has them) cost
    # more than they tell on a hot path.
    telemetry: Any = {"operation_spans": False, "metrics": False, "logs": False}
    limits = limits or RequestLimits()
    # FastAPI's own cap (Starlette's RequestBodyLimitMiddleware): a declared Content-Length over it is
    # refused at the first read, a streamed body as soon as it passes it, both with 413.
    app = FastAPI(title=f"tradingstack {name}", lifespan=lifespan, telemetry=telemetry,
                  max_body_size=limits.max_body_bytes)  # fmt: skip
    app.add_middleware(BodyTimeout, seconds=limits.body_timeout_seconds)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        """422 naming each problem. FastAPI's own handler echoes the input back, and an input holding
        NaN or Infinity cannot be rendered as JSON: a client error would become a 500."""
        problems = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
                    for e in exc.errors()]  # fmt: skip
        return JSONResponse({"detail": problems}, status_code=422)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        """The process is alive and serving, and not stuck; says nothing about dependencies."""
        stuck = {what: err for what, err in (await _outcomes(live or {})).items() if err}
        if stuck:
            return JSONResponse({"status": "stuck", "service": name, "checks": stuck}, status_code=503)
        return JSONResponse({"status": "ok", "service": name})

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Ready only when every dependency answers right now; 503 names the ones that do not."""
        optional = degraded or {}
        outcome = {dep: err or "ok" for dep, err in (await _outcomes({**checks, **optional})).items()}
        failed = [dep for dep in checks if outcome[dep] != "ok"]
        body: dict[str, Any] = {
            "status": "ready" if not failed else "not ready",
            "checks": {dep: outcome[dep] for dep in checks},
        }
        if optional:
            body["degraded"] = {dep: outcome[dep] for dep in optional}
        return JSONResponse(body, status_code=503 if failed else 200)

    @app.get("/health")
    async def health() -> JSONResponse:
        """The seeds' health path (their compose checks and Dockerfile HEALTHCHECKs call it): what
        /readyz decides, in the seeds' words, so an old caller keeps its meaning."""
        outcome = {dep: err or "ok" for dep, err in (await _outcomes(checks)).items()}
        healthy = all(v == "ok" for v in outcome.values())
        body = {"status": "healthy" if healthy else "unhealthy", "service": name, "checks": outcome}
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


async def no_lifespan(_: FastAPI) -> AsyncIterator[None]:
    yield
