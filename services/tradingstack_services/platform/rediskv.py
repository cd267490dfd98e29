"""The Redis connection pool a service shares, and its readiness check."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from tradingstack.credentials import ServerCredentials
from tradingstack_services.platform.app import Check


def connect(url: str, credentials: ServerCredentials | None = None) -> tuple[aioredis.Redis, Check]:
    """A pooled client (connections opened on first use, reopened after Redis restarts) and a PING check."""
    options = (credentials or ServerCredentials()).redis_options()
    client = aioredis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=1, **options)

    async def ping() -> None:
        await client.ping()

    return client, ping


T = TypeVar("T")
CONFLICTS = Counter("tradingstack_redis_write_conflicts_total",
                    "Optimistic transactions retried because another writer changed a watched key first")  # fmt: skip


async def compare_and_set(client: aioredis.Redis, keys: list[str], step: Callable[[Pipeline], Awaitable[T]]) -> T:
    """Read, compute and write as one step that another writer cannot interleave with.

    `step` gets a pipeline that WATCHes `keys`: its reads run at once (await them), then it calls
    `begin_writes(tx)` and queues its writes. They commit only if no watched key changed meanwhile; else the
    whole step runs again on what the other writer left, so two replicas of a service never lose
    each other's updates. Returns what the committed run of `step` returned.
    """
    attempt = 0
    async with client.pipeline(transaction=True) as pipe:
        while True:
            try:
                await pipe.watch(*keys)
                result = await step(pipe)
                await pipe.execute()
                return result
            except WatchError:
                attempt += 1
                CONFLICTS.inc()
                # Two writers that keep colliding step apart (a few ms at most), rather than spin.
                await asyncio.sleep(random.uniform(0, min(0.001 * 2**attempt, 0.05)))


def begin_writes(tx: Pipeline) -> None:
    """In a `compare_and_set` step: the reads are done; what is queued from here commits together."""
    tx.multi()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
