"""The Redis connection pool a service shares, and its readiness check."""

from __future__ import annotations

import redis.asyncio as aioredis

from tradingstack.credentials import ServerCredentials
from tradingstack_services.platform.app import Check


def connect(url: str, credentials: ServerCredentials | None = None) -> tuple[aioredis.Redis, Check]:
    """A pooled client (connections opened on first use, reopened after Redis restarts) and a PING check."""
    options = (credentials or ServerCredentials()).redis_options()
    client = aioredis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=1, **options)

    async def ping() -> None:
        await client.ping()

    return client, ping
