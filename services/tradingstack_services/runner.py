"""`tradingstack service NAME`: build the service's app from the environment and serve it."""

from __future__ import annotations

import gc
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI

from tradingstack_services import logs
from tradingstack_services.settings import ServiceSettings


def _factories() -> dict[str, Callable[[ServiceSettings], FastAPI]]:
    from tradingstack_services import exeq, gateway, normalizer, oms, pnl, risk, sink

    return {
        "gateway": gateway.create,
        "normalizer": normalizer.create,
        "sink-ticks": sink.create_ticks,
        "sink-alt": sink.create_alt,
        "risk": risk.create,
        "oms": oms.create,
        "exeq": exeq.create,
        "pnl": pnl.create,
    }


def build(name: str) -> tuple[FastAPI, ServiceSettings]:
    """The service's app and the settings it was built from (read from the environment once)."""
    factories = _factories()
    if name not in factories:
        raise LookupError(f"unknown service {name!r}; known: {', '.join(sorted(factories))}")
    settings = ServiceSettings(SERVICE_NAME=name)
    logs.configure(name, settings.LOG_FORMAT)
    return factories[name](settings), settings


def serve(name: str) -> None:
    app, settings = build(name)
    # The hot paths allocate many short-lived, acyclic objects (freed by reference counting): with
    # the default thresholds the cyclic collector runs every ~700 allocations and its full passes
    # show up as tail latency. Collect far less often, and never walk what startup loaded.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    uvicorn.run(app, host="0.0.0.0", port=settings.PORT, log_config=None, access_log=False)
