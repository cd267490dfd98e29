"""The FastAPI app every service starts from: /healthz, /readyz (real dependency checks), /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

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
) -> FastAPI:
    """`checks` decide readiness; `degraded` ones (a dependency the service can serve without, like
    QuestDB for history) are reported under "degraded" in /readyz without making it 503; `live` ones
    fail /healthz, the liveness probe, when the process is stuck in a way only a restart ends."""
    # Request spans carry trace context; per-operation spans and OTel metrics (Prometheus has them) cost
    # more than they tell on a hot path.
    telemetry: Any = {"operation_spans": False, "metrics": False, "logs": False}
    app = FastAPI(title=f"tradingstack {name}", lifespan=lifespan, telemetry=telemetry)

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
