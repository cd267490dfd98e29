"""`tradingstack service NAME`: build the service's app from the environment and serve it."""

from __future__ import annotations

from collections.abc import Callable

import uvicorn
from fastapi import FastAPI

from tradingstack_services import logs
from tradingstack_services.settings import ServiceSettings


def _factories() -> dict[str, Callable[[ServiceSettings], FastAPI]]:
    from tradingstack_services import gateway, normalizer, risk, sink

    return {
        "gateway": gateway.create,
        "normalizer": normalizer.create,
        "sink-ticks": sink.create_ticks,
        "sink-alt": sink.create_alt,
        "risk": risk.create,
    }


# Services the operator deploys whose code is not written yet (see services/README.md).
PENDING = {"oms", "exeq", "pnl"}


def build(name: str) -> FastAPI:
    factories = _factories()
    if name not in factories:
        raise LookupError(
            f"service {name!r} is not implemented yet" if name in PENDING else f"unknown service {name!r}"
        )
    settings = ServiceSettings(SERVICE_NAME=name)
    logs.configure(name, settings.LOG_FORMAT)
    return factories[name](settings)


def serve(name: str) -> None:
    app = build(name)
    settings = ServiceSettings(SERVICE_NAME=name)
    uvicorn.run(app, host="0.0.0.0", port=settings.PORT, log_config=None, access_log=False)
