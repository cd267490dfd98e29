"""The NATS connection a service shares (reconnects forever), its readiness check, and the worker app."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import nats
import nats.js.errors
from fastapi import FastAPI
from nats.aio.client import Client
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge
from pydantic import BaseModel, ValidationError

from tradingstack.credentials import ServerCredentials
from tradingstack_services.marketdata.ticks import InvalidMessageError
from tradingstack_services.platform.app import Check, RequestLimits, create_app
from tradingstack_services.platform.settings import ServiceSettings

ModelT = TypeVar("ModelT", bound=BaseModel)

log = logging.getLogger(__name__)


async def connect(
    url: str, name: str, initial_attempts: int = -1, credentials: ServerCredentials | None = None
) -> Client:
    """A connection that reconnects forever once made; the first connect tries `initial_attempts` times."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats: %s", str(exc) or type(exc).__name__)

    async def on_disconnect() -> None:
        log.warning("nats: disconnected")

    async def on_reconnect() -> None:
        log.info("nats: reconnected")

    nc = await nats.connect(
        url,
        name=name,
        max_reconnect_attempts=initial_attempts,
        reconnect_time_wait=0.5,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        **(credentials or ServerCredentials()).nats_options(),
    )
    nc.options["max_reconnect_attempts"] = -1  # once connected, a service outlives NATS restarts
    return nc


def reason_headers(error: InvalidMessageError, settings: ServiceSettings) -> dict[str, str]:
    """What every dead letter says about itself: why, in detail, and which service parked it."""
    return {"Tradingstack-Reason": error.reason, "Tradingstack-Detail": error.detail[:512],
            "Tradingstack-Service": settings.SERVICE_NAME}  # fmt: skip


async def dead_letter(js: Any, msg: Msg, settings: ServiceSettings, error: InvalidMessageError) -> None:
    """Park a message that cannot be used on `{prefix}.{stream}.{reason}`, then acknowledge it.

    The JetStream publish waits for the dead-letter stream's ack, so the message is stored
    before the original is acknowledged: bad input is never silently dropped.
    """
    meta = msg.metadata
    stream = meta.stream or settings.NATS_STREAM or "unknown"
    headers = {
        **reason_headers(error, settings),
        "Tradingstack-Subject": msg.subject,
        "Tradingstack-Stream": stream,
        "Tradingstack-Stream-Seq": str(meta.sequence.stream),
        "Tradingstack-Deliveries": str(meta.num_delivered),
        # Parked again after a crash before the ack below: the stream's duplicate window keeps one. The
        # message's stored time tells a stream made again (numbered from 1 anew) from a redelivery.
        "Nats-Msg-Id": f"dlq:{settings.SERVICE_NAME}:{stream}:{meta.sequence.stream}:{_stored_at(meta)}",
    }
    await js.publish(f"{settings.DEAD_LETTER_PREFIX}.{stream}.{error.reason}", msg.data, headers=headers)
    log.warning("dead-lettered seq %d: %s", meta.sequence.stream, error,
                extra={"reason": error.reason, "subject": msg.subject})  # fmt: skip
    await msg.ack()


def _stored_at(meta: Any) -> str:
    """When the stream stored a message (the same on every delivery of it), as a compact token."""
    stamp = getattr(meta, "timestamp", None)
    return f"{stamp.timestamp():.6f}" if stamp is not None else "-"


def event_id(msg: Msg) -> str:
    """A message's identity for deduplication: its `Nats-Msg-Id`, else a digest of its bytes."""
    header = (msg.headers or {}).get("Nats-Msg-Id")
    return header or hashlib.sha256(msg.data).hexdigest()[:32]


async def parse_each(js: Any, messages: list[Msg], settings: ServiceSettings, model: type[ModelT], reason: str,
                     dead: Counter) -> list[tuple[Msg, ModelT]]:  # fmt: skip
    """Each message as `model`, in order; one that does not validate is dead-lettered with `reason`
    (and counted in `dead`, labelled by reason) instead of stopping the others."""
    parsed = []
    for msg in messages:
        try:
            parsed.append((msg, model.model_validate_json(msg.data)))
        except ValidationError as exc:
            await dead_letter(js, msg, settings, InvalidMessageError(reason, str(exc)))
            dead.labels(reason).inc()
    return parsed


async def apply_then_ack(js: Any, messages: list[Msg], settings: ServiceSettings, model: type[ModelT], reason: str,
                         dead: Counter, key: Callable[[ModelT], str],
                         apply: Callable[[list[ModelT]], Awaitable[Any]]) -> None:  # fmt: skip
    """A batch of records: the valid ones (the rest dead-lettered) applied together, each distinct
    `key` once (a record sent twice in one batch counts once), and only then acknowledged."""
    good = await parse_each(js, messages, settings, model, reason, dead)
    distinct: dict[str, ModelT] = {}
    for _, item in good:
        distinct.setdefault(key(item), item)
    await apply(list(distinct.values()))
    for msg, _ in good:  # only now: what apply wrote is durable
        await msg.ack()


def unprocessable(exc: BaseException) -> InvalidMessageError:
    """A message whose handling raised something unexpected: dead-letter it with what was raised."""
    return InvalidMessageError("unprocessable", f"{type(exc).__name__}: {exc}")


def readiness(nc: Client) -> Check:
    async def check() -> None:
        if not nc.is_connected:
            raise ConnectionError(f"not connected to {nc.connected_url or 'NATS'}")
        await nc.flush(timeout=1)  # a real round trip, not a cached flag

    return check


# A message whose handling failed comes back after 1, 2, 4 ... RETRY_DELAY_MAX seconds; on its
# NATS_MAX_DELIVER-th delivery a failure dead-letters it instead. A batch that fails is retried one
# message at a time, so one bad message cannot hold back the others; OUTAGE_AFTER failures in a
# row mean a dependency is away, and the rest of the batch is handed back without trying each.
RETRY_DELAY = 1.0
RETRY_DELAY_MAX = 60.0
OUTAGE_AFTER = 3
Worker = Callable[[Client, asyncio.Event], Coroutine[Any, Any, Any]]
Batch = Callable[[Any, list[Msg]], Awaitable[Any]]


def retry_delay(deliveries: int) -> float:
    return min(RETRY_DELAY * 2.0 ** max(deliveries - 1, 0), RETRY_DELAY_MAX)


async def give_back(js: Any, msg: Msg, settings: ServiceSettings, error: BaseException) -> None:
    """A message whose handling failed: delivered again later, or dead-lettered on its last delivery."""
    if msg.is_acked:
        return
    deliveries = msg.metadata.num_delivered
    if deliveries >= settings.NATS_MAX_DELIVER:
        reason = InvalidMessageError("delivery_limit", f"{deliveries} deliveries; last error: "
                                     f"{type(error).__name__}: {error}")  # fmt: skip
        await dead_letter(js, msg, settings, reason)
    else:
        await msg.nak(delay=retry_delay(deliveries))


PENDING = Gauge("tradingstack_consumer_pending_messages",
                "Messages the service's durable consumer has not yet delivered (its lag)",
                ["stream", "durable"])  # fmt: skip


class ConsumerLag:
    """A durable consumer's lag, exported after every fetch by whichever loop fetches (consume, the sinks)."""

    def __init__(self, stream: str, durable: str) -> None:
        self.gauge = PENDING.labels(stream, durable)

    def fetched(self, messages: list[Msg]) -> None:
        # What the server still holds after this batch; an empty fetch found nothing pending.
        self.gauge.set(messages[-1].metadata.num_pending if messages else 0)


async def consume(nc: Client, stop: asyncio.Event, settings: ServiceSettings, process: Batch, batch: int,
                  wait: float) -> None:  # fmt: skip
    """Fetch from the service's durable pull consumer (NATS_STREAM/NATS_DURABLE) and process each batch.

    `process(js, messages)` acknowledges what it made durable. If it raises, the messages it did not
    acknowledge are processed again one at a time; each that fails alone is handed back (`give_back`).
    Nothing here raises for a message: the loop goes on until stopped.
    """
    js = nc.jetstream()
    await require_consumer(js, settings.NATS_STREAM or "", settings.NATS_DURABLE or "")
    sub = await js.pull_subscribe_bind(durable=settings.NATS_DURABLE or "", stream=settings.NATS_STREAM)
    lag = ConsumerLag(settings.NATS_STREAM or "", settings.NATS_DURABLE or "")
    while not stop.is_set():
        try:
            messages = await sub.fetch(batch, timeout=wait)
        except TimeoutError:  # an empty fetch: nothing new
            lag.fetched([])
            continue
        except Exception as exc:  # NATS is away: wait for the reconnect
            log.warning("fetch failed: %s", exc)
            await asyncio.sleep(0.5)
            continue
        lag.fetched(messages)
        try:
            await process(js, messages)
        except Exception as exc:
            log.warning("batch of %d failed, retrying its messages one at a time: %s", len(messages), exc)
            await _one_at_a_time(js, [m for m in messages if not m.is_acked], settings, process)


async def _one_at_a_time(js: Any, messages: list[Msg], settings: ServiceSettings, process: Batch) -> None:
    failures = 0
    last: BaseException | None = None
    for index, msg in enumerate(messages):
        if msg.is_acked:
            continue
        if failures >= OUTAGE_AFTER and last is not None:  # a dependency is away: hand the rest back
            for rest in messages[index:]:
                with contextlib.suppress(Exception):
                    await give_back(js, rest, settings, last)
            await asyncio.sleep(RETRY_DELAY)
            return
        try:
            await process(js, [msg])
            failures = 0
        except Exception as exc:
            failures += 1
            last = exc
            log.warning("message seq %d failed (delivery %d): %s", msg.metadata.sequence.stream,
                        msg.metadata.num_delivered, exc)  # fmt: skip
            with contextlib.suppress(Exception):  # NATS away: ack_wait brings it back all the same
                await give_back(js, msg, settings, exc)


# A worker that fails is started again after a delay that doubles from RESTART_DELAY up to
# RESTART_DELAY_MAX; one that ran for STABLE_AFTER seconds since its last failure counts as recovered.
RESTART_DELAY = 0.5
RESTART_DELAY_MAX = 30.0
STABLE_AFTER = 10.0
RESTARTS = Counter("tradingstack_worker_restarts_total", "Workers started again after they failed", ["worker"])


class MissingConsumerError(RuntimeError):
    """The durable consumer a service reads does not exist (yet): nothing to fix in the service."""


async def require_consumer(js: Any, stream: str, durable: str) -> Any:
    """The durable's info; MissingConsumerError naming it, and how it is made, when the server has none."""
    try:
        return await js.consumer_info(stream, durable)
    except nats.js.errors.NotFoundError:
        raise MissingConsumerError(
            f"durable consumer {durable!r} on stream {stream!r} does not exist: the operator makes it for the "
            f"TradingStack this service belongs to (kubectl get tradingstack; its StreamsReady condition), or "
            f"by hand: `tradingstack provision -f STACK.yaml`"
        ) from None


@dataclass
class Supervised:
    """One worker of a service, started again with backoff whenever it fails."""

    name: str
    work: Worker
    failures: int = 0  # in a row, since it last ran for STABLE_AFTER seconds
    last_error: str | None = None
    running_since: float | None = None
    finished: bool = False

    async def run(self, nc: Client, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            self.running_since = loop.time()
            try:
                await self.work(nc, stop)
                self.finished = True  # a worker with an end (a replay) is done, not failed
                return
            except Exception as exc:  # any failure: log it, wait, start again; never die for good
                if loop.time() - self.running_since >= STABLE_AFTER:
                    self.failures = 0
                self.failures += 1
                self.running_since = None
                error = f"{type(exc).__name__}: {exc}"
                delay = min(RESTART_DELAY * 2 ** (self.failures - 1), RESTART_DELAY_MAX)
                if isinstance(exc, MissingConsumerError):  # said once, without a traceback: /readyz repeats it
                    if error != self.last_error:
                        log.warning("worker %s waits: %s", self.name, exc)
                else:
                    log.error("worker %s failed (%d in a row), starting it again in %.1f s: %s",
                              self.name, self.failures, delay, error, exc_info=exc)  # fmt: skip
                self.last_error = error
                RESTARTS.labels(self.name).inc()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)

    def problem(self, now: float) -> str | None:
        """Why this worker does not count as working now, or None."""
        if self.finished or self.last_error is None:
            return None
        if self.running_since is None:
            return f"failed {self.failures} time(s) in a row, restarting: {self.last_error}"
        if now - self.running_since < STABLE_AFTER:
            return f"restarted after: {self.last_error}"
        return None


def _worker_name(work: Worker, index: int) -> str:
    # Several workers of one method (the audit log's sinks) tell themselves apart by `worker_label`.
    label = getattr(getattr(work, "__self__", None), "worker_label", None)
    if isinstance(label, str):
        return label
    name = getattr(work, "__qualname__", "") or getattr(work, "__name__", "")
    return name if name and "<lambda>" not in name else f"worker-{index}"


async def connect_until_stopped(settings: ServiceSettings, stop: asyncio.Event) -> Client | None:
    """Connect to NATS, trying again with backoff: a service starts (and answers probes) before NATS does."""
    delay = RESTART_DELAY
    while not stop.is_set():
        try:
            return await connect(settings.NATS_URL, settings.SERVICE_NAME, 1, settings.nats_credentials())
        except Exception as exc:  # NATS not there yet: the HTTP side keeps serving, readiness says why
            log.warning("nats: not reachable yet, trying again in %.1f s: %s", delay, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, RESTART_DELAY_MAX / 6)
    return None


def worker_app(
    settings: ServiceSettings,
    workers: list[Worker],
    checks: dict[str, Check] | None = None,
    degraded: dict[str, Check] | None = None,
    live: dict[str, Check] | None = None,
) -> FastAPI:
    """A service app whose work runs beside the HTTP server on one shared NATS connection.

    The HTTP server starts at once; the connection is made in the background (retried until NATS
    answers), then every worker runs supervised: a failure is logged and the worker started again
    with backoff, so a dependency that is late or briefly away never stops the service for good.
    On shutdown the workers are stopped (their last batch flushed) before the connection closes.
    Readiness adds a NATS round trip and each worker's state.
    """
    state: dict[str, Client] = {}
    supervised = [Supervised(_worker_name(work, i), work) for i, work in enumerate(workers)]

    async def start(stop: asyncio.Event) -> None:
        nc = await connect_until_stopped(settings, stop)
        if nc is None:
            return
        state["nc"] = nc
        await asyncio.gather(*(worker.run(nc, stop) for worker in supervised))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        stop = asyncio.Event()
        running = asyncio.create_task(start(stop))
        try:
            yield
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(running), 30)
            running.cancel()
            if "nc" in state:
                # Flush what was published, then close (drain would wait on the pull subscriptions).
                with contextlib.suppress(Exception):
                    await state["nc"].flush(timeout=5)
                await state["nc"].close()

    async def nats_check() -> None:
        if "nc" not in state:
            raise ConnectionError("not connected yet")
        await readiness(state["nc"])()

    async def workers_check() -> None:
        now = asyncio.get_running_loop().time()
        problems = [f"{w.name}: {p}" for w in supervised if (p := w.problem(now))]
        if problems:
            raise RuntimeError("; ".join(problems))

    all_checks = {"nats": nats_check, "workers": workers_check, **(checks or {})}
    limits = RequestLimits(settings.HTTP_MAX_BODY_BYTES, settings.HTTP_BODY_TIMEOUT_SECONDS)
    return create_app(settings.SERVICE_NAME, all_checks, lifespan=lifespan, degraded=degraded, live=live,
                      limits=limits)  # fmt: skip
