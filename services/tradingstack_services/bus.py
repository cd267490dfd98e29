"""The NATS connection a service shares (reconnects forever), its readiness check, and the worker app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import nats
from fastapi import FastAPI
from nats.aio.client import Client
from nats.aio.msg import Msg

from tradingstack_services.app import Check, create_app
from tradingstack_services.settings import ServiceSettings
from tradingstack_services.ticks import InvalidMessageError

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


async def dead_letter(js: Any, msg: Msg, settings: ServiceSettings, error: InvalidMessageError) -> None:
    """Park a message that cannot be used on `{prefix}.{stream}.{reason}`, then acknowledge it.

    The JetStream publish waits for the dead-letter stream's ack, so the message is stored
    before the original is acknowledged: bad input is never silently dropped.
    """
    seq = msg.metadata.sequence.stream
    headers = {
        "Tradingstack-Reason": error.reason,
        "Tradingstack-Detail": error.detail[:512],
        "Tradingstack-Subject": msg.subject,
        "Tradingstack-Stream-Seq": str(seq),
    }
    stream = settings.NATS_STREAM or "unknown"
    await js.publish(f"{settings.DEAD_LETTER_PREFIX}.{stream}.{error.reason}", msg.data, headers=headers)
    log.warning("dead-lettered seq %d: %s", seq, error, extra={"reason": error.reason, "subject": msg.subject})
    await msg.ack()


def readiness(nc: Client) -> Check:
    async def check() -> None:
        if not nc.is_connected:
            raise ConnectionError(f"not connected to {nc.connected_url or 'NATS'}")
        await nc.flush(timeout=1)  # a real round trip, not a cached flag

    return check


# How long a batch that could not be processed waits before it is delivered again.
RETRY_DELAY = 1.0
Worker = Callable[[Client, asyncio.Event], Coroutine[Any, Any, Any]]
Batch = Callable[[Any, list[Msg]], Awaitable[Any]]


async def consume(nc: Client, stop: asyncio.Event, settings: ServiceSettings, process: Batch, batch: int,
                  wait: float) -> None:  # fmt: skip
    """Fetch from the service's durable pull consumer (NATS_STREAM/NATS_DURABLE) and process each batch.

    `process(js, messages)` acknowledges what it made durable. If it raises, what it did not
    acknowledge is handed back (nak with a delay of `RETRY_DELAY`) for redelivery, and the loop goes on.
    """
    js = nc.jetstream()
    sub = await js.pull_subscribe_bind(durable=settings.NATS_DURABLE or "", stream=settings.NATS_STREAM)
    while not stop.is_set():
        try:
            messages = await sub.fetch(batch, timeout=wait)
        except TimeoutError:  # an empty fetch: nothing new
            continue
        except Exception as exc:  # NATS is away: wait for the reconnect
            log.warning("fetch failed: %s", exc)
            await asyncio.sleep(0.5)
            continue
        try:
            await process(js, messages)
        except Exception as exc:  # a dependency is away: the batch comes back after the delay
            log.warning("batch of %d not processed, it will be redelivered: %s", len(messages), exc)
            for msg in messages:
                with contextlib.suppress(Exception):  # acknowledged ones (dead letters) refuse a nak
                    await msg.nak(delay=RETRY_DELAY)
            await asyncio.sleep(RETRY_DELAY)


def worker_app(settings: ServiceSettings, workers: list[Worker], checks: dict[str, Check] | None = None) -> FastAPI:
    """A service app whose work runs beside the HTTP server on one shared NATS connection.

    The lifespan connects, starts every worker with a stop event, and on shutdown stops them
    (their last batch is flushed) before closing the connection. Readiness adds a NATS round trip.
    """
    state: dict[str, Client] = {}
    running: list[asyncio.Task[Any]] = []

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        nc = await connect(settings.NATS_URL, settings.SERVICE_NAME)
        state["nc"] = nc
        stop = asyncio.Event()
        running[:] = [asyncio.create_task(work(nc, stop)) for work in workers]
        try:
            yield
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*running, return_exceptions=True), 30)
            # Flush what was published, then close (drain would wait on the pull subscriptions).
            with contextlib.suppress(Exception):
                await nc.flush(timeout=5)
            await nc.close()

    async def nats_check() -> None:
        if "nc" not in state:
            raise ConnectionError("not connected yet")
        await readiness(state["nc"])()

    async def workers_check() -> None:
        # A worker that died (not one that finished its job, like a replay) makes the service not ready.
        for task in running:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise RuntimeError(f"worker failed: {task.exception()!r}")

    all_checks = {"nats": nats_check, "workers": workers_check, **(checks or {})}
    return create_app(settings.SERVICE_NAME, all_checks, lifespan=lifespan)
