"""The NATS connection a service shares: reconnects forever, and a readiness check that round-trips."""

from __future__ import annotations

import logging

import nats
from nats.aio.client import Client

from tradingstack_services.app import Check

log = logging.getLogger(__name__)


async def connect(url: str, name: str) -> Client:
    async def on_error(exc: Exception) -> None:
        log.warning("nats: %s", exc)

    async def on_disconnect() -> None:
        log.warning("nats: disconnected")

    async def on_reconnect() -> None:
        log.info("nats: reconnected")

    return await nats.connect(
        url,
        name=name,
        max_reconnect_attempts=-1,  # a service outlives NATS restarts
        reconnect_time_wait=0.5,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
    )


def readiness(nc: Client) -> Check:
    async def check() -> None:
        if not nc.is_connected:
            raise ConnectionError(f"not connected to {nc.connected_url or 'NATS'}")
        await nc.flush(timeout=1)  # a real round trip, not a cached flag

    return check
