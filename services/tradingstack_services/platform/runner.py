"""`tradingstack service NAME`: build the service's app from the environment and serve it."""

from __future__ import annotations

import gc
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from tradingstack_services.platform import logs
from tradingstack_services.platform.settings import ServiceSettings


def _factories() -> dict[str, Callable[[ServiceSettings], FastAPI]]:
    from tradingstack_services.marketdata import gateway, live, normalizer, sink
    from tradingstack_services.oversight import audit, compliance, quality, reports
    from tradingstack_services.trading import exeq, oms, pnl, risk

    return {
        "gateway": gateway.create,
        "normalizer": normalizer.create,
        "sink-ticks": sink.create_ticks,
        "sink-alt": sink.create_alt,
        "risk": risk.create,
        "oms": oms.create,
        "exeq": exeq.create,
        "pnl": pnl.create,
        "compliance-scanner": compliance.create,
        "execution-quality": quality.create,
        "audit-log": audit.create,
        "live-gateway": live.create,
        "ptrc": reports.create,
    }


# On SIGTERM, requests in flight get this long; then the rest (live streams, which never end by
# themselves) are cancelled and their clients reconnect elsewhere, so a rollout does not wait out
# the pod's whole termination grace period for every open dashboard.
GRACEFUL_SHUTDOWN_SECONDS = 5


class SettingsError(ValueError):
    """The environment does not make a valid configuration; the message names each variable."""


def known(name: str) -> None:
    factories = _factories()
    if name not in factories:
        raise LookupError(f"unknown service {name!r}; known: {', '.join(sorted(factories))}")


def settings_from_environment(name: str) -> ServiceSettings:
    try:
        return ServiceSettings(SERVICE_NAME=name)
    except ValidationError as exc:
        # Names and reasons only: a value may be a secret, so it is never repeated.
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors())
        raise SettingsError(f"service {name}: invalid setting {problems}") from None


class _DefaultsOnly(ServiceSettings):
    """ServiceSettings that ignore the environment: what each setting is when nothing is set."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def describe(name: str) -> str:
    """`tradingstack service NAME --help`: every setting, its default for this service, and what it is for."""
    known(name)
    defaults = _DefaultsOnly(SERVICE_NAME=name)
    rows = []
    for field, info in ServiceSettings.model_fields.items():
        if field == "SERVICE_NAME":
            continue
        value = getattr(defaults, field)
        shown = "(unset)" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        rows.append((field, shown, info.description or ""))
    width = max(len(r[0]) for r in rows)
    lines = [
        f"usage: tradingstack service {name}",
        "",
        f"Runs {name} on its port, configured by these environment variables (default in brackets).",
        "Credentials (*_PASSWORD, *_TOKEN, AWS_SECRET_ACCESS_KEY) come from a Secret in Kubernetes.",
        "",
    ]
    lines += [f"  {field:<{width}}  [{shown}]" + (f"  {about}" if about else "") for field, shown, about in rows]
    return "\n".join(lines)


def build(name: str) -> tuple[FastAPI, ServiceSettings]:
    """The service's app and the settings it was built from (read from the environment once)."""
    known(name)
    factories = _factories()
    settings = settings_from_environment(name)
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
    # limit_concurrency: past that many open connections a new request gets 503 at once, instead of
    # every client slowing down together until the pod runs out of memory or file descriptors.
    uvicorn.run(app, host="0.0.0.0", port=settings.PORT, log_config=None, access_log=False,
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
                limit_concurrency=settings.HTTP_MAX_CONNECTIONS)  # fmt: skip
