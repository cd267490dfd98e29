"""JetStream provisioner: the plan's streams and durable consumers.

Drift is judged on the fields the spec sets, with the server's normalisation (seconds as
floats, subjects as a set); fields a 2.9 server does not know (metadata, compression, ...)
are never compared. Immutable fields (storage, retention; a consumer's deliver and ack
policy) are reported as ImmutableFieldChanged and left alone: recreating would lose data.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import nats
from nats.js import api as js
from nats.js.errors import NotFoundError
from nats.js.manager import JetStreamManager

from tradingstack.api import StreamSpec, parse_duration
from tradingstack.changes import BackendResult, Change, ItemStatus, Problem, UnreachableError
from tradingstack.credentials import ServerCredentials, redact_url
from tradingstack.plan import OWNER_PREFIX, ConsumerPlan, Plan

# How long a consumer waits for an ack before redelivering, and how many may be in flight.
CONSUMER_ACK_WAIT = 30.0
CONSUMER_MAX_ACK_PENDING = 50_000
IMMUTABLE = "ImmutableFieldChanged"


def stream_config(spec: StreamSpec) -> js.StreamConfig:
    """The one mapping from the API's StreamSpec to the server's configuration.

    duplicate_window stays None unless the spec sets it, so the server's default is not drift.
    """
    config = js.StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        storage=js.StorageType(spec.storage),
        retention=js.RetentionPolicy(spec.retention),
        discard=js.DiscardPolicy(spec.discard),
        max_age=parse_duration(spec.max_age),
        max_bytes=spec.max_bytes,
        max_msgs=spec.max_msgs,
        num_replicas=spec.replicas,
        duplicate_window=parse_duration(spec.duplicate_window) if spec.duplicate_window else None,  # type: ignore[arg-type]
    )
    return config


def consumer_config(plan: ConsumerPlan, owner: str = "") -> js.ConsumerConfig:
    # A single filter_subject: 2.9 servers silently ignore filter_subjects.
    return js.ConsumerConfig(
        durable_name=plan.durable,
        description=owner or None,
        filter_subject=plan.filter_subject,
        deliver_policy=js.DeliverPolicy.ALL,
        ack_policy=js.AckPolicy.EXPLICIT,
        ack_wait=CONSUMER_ACK_WAIT,
        max_ack_pending=CONSUMER_MAX_ACK_PENDING,
        max_deliver=plan.max_deliver,
    )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return abs(float(a or 0) - float(b or 0)) < 1e-3
    return bool(a == b)


def diff_stream(desired: js.StreamConfig, live: js.StreamConfig) -> tuple[list[str], list[str]]:
    """(mutable fields that differ, immutable fields that differ)."""
    mutable, immutable = [], []
    for name in ("storage", "retention"):
        if getattr(desired, name) != getattr(live, name):
            immutable.append(f"{name} is {_value(getattr(live, name))}, spec says {_value(getattr(desired, name))}")
    if set(desired.subjects or []) != set(live.subjects or []):
        mutable.append("subjects")
    for name in ("discard", "max_age", "max_bytes", "max_msgs", "num_replicas", "duplicate_window"):
        wanted = getattr(desired, name)
        if wanted is not None and not _same(wanted, getattr(live, name)):
            mutable.append(name)
    return mutable, immutable


def diff_consumer(desired: js.ConsumerConfig, live: js.ConsumerConfig) -> tuple[list[str], list[str]]:
    mutable, immutable = [], []
    for name in ("deliver_policy", "ack_policy"):
        if getattr(desired, name) != getattr(live, name):
            immutable.append(f"{name} is {_value(getattr(live, name))}, spec says {_value(getattr(desired, name))}")
    for name in ("filter_subject", "ack_wait", "max_ack_pending", "max_deliver"):
        if not _same(getattr(desired, name), getattr(live, name)):
            mutable.append(name)
    return mutable, immutable


def _value(value: Any) -> str:
    return str(getattr(value, "value", value))


@dataclass
class JetStreamProvisioner:
    url: str
    connect_timeout: float = 3.0
    credentials: ServerCredentials = field(default_factory=ServerCredentials)
    backend = "streams"

    def reconcile(self, plan: Plan, dry_run: bool = False) -> BackendResult:
        result: BackendResult = asyncio.run(self._run(lambda nc: self._reconcile(nc.jsm(), plan, dry_run)))
        return result

    def delete(self, plan: Plan) -> list[Change]:
        result: list[Change] = asyncio.run(self._run(lambda nc: self._delete(nc.jsm(), plan)))
        return result

    def publish(self, subject: str, data: bytes, msg_id: str) -> None:
        """One message, stored by its stream (JetStream ack) before this returns."""

        async def send(nc: Any) -> None:
            await nc.jetstream().publish(subject, data, headers={"Nats-Msg-Id": msg_id}, timeout=self.connect_timeout)

        asyncio.run(self._run(send))

    async def _run(self, step: Any) -> Any:
        async def quiet(_: Exception) -> None:
            return None  # the failure is reported once, below, not logged per attempt

        try:
            # nats-py can keep retrying a refused address even without reconnects: bound it.
            nc = await asyncio.wait_for(
                nats.connect(
                    self.url,
                    connect_timeout=self.connect_timeout,
                    allow_reconnect=False,
                    max_reconnect_attempts=0,
                    error_cb=quiet,
                    **self.credentials.nats_options(),
                ),
                self.connect_timeout + 1,
            )
        except Exception as exc:  # nats-py raises several unrelated types for "no server"
            raise UnreachableError(f"NATS at {redact_url(self.url)}: {str(exc) or type(exc).__name__}") from exc
        try:
            return await step(nc)
        finally:
            await nc.close()

    async def _reconcile(self, jsm: JetStreamManager, plan: Plan, dry_run: bool) -> BackendResult:
        result = BackendResult(self.backend, dry_run=dry_run)
        for spec in plan.streams:
            await self._stream(jsm, spec, result, plan.stack.owner)
        for consumer in plan.consumers:
            await self._consumer(jsm, consumer, result, plan.stack.owner)
        return result

    async def _stream(self, jsm: JetStreamManager, spec: StreamSpec, result: BackendResult, owner: str) -> None:
        desired = stream_config(spec)
        try:
            live = (await jsm.stream_info(spec.name)).config
        except NotFoundError:
            result.changes.append(Change("create", "Stream", spec.name))
            if not result.dry_run:
                desired.description = owner  # made by this stack: its to delete
                await jsm.add_stream(desired)
            result.items.append(
                ItemStatus(spec.name, not result.dry_run, "InSync" if not result.dry_run else "Missing")
            )
            return
        holder = live.description or ""
        if holder.startswith(OWNER_PREFIX) and holder != owner:
            message = (f"stream {spec.name} was made by {holder.removeprefix(OWNER_PREFIX)}; two stacks on one NATS "
                       "need streams of their own names (spec.streams)")  # fmt: skip
            result.problems.append(Problem("Stream", spec.name, "OwnedByAnotherStack", message))
            result.items.append(ItemStatus(spec.name, False, "OwnedByAnotherStack", message))
            return
        desired.description = live.description  # who made it does not change on an update
        mutable, immutable = diff_stream(desired, live)
        if immutable:
            message = "; ".join(immutable) + " (immutable: recreate the stream by hand to change it)"
            result.problems.append(Problem("Stream", spec.name, IMMUTABLE, message))
            result.items.append(ItemStatus(spec.name, False, IMMUTABLE, message))
            return
        if mutable:
            result.changes.append(Change("update", "Stream", spec.name, ", ".join(mutable) + " drifted"))
            if not result.dry_run:
                await jsm.update_stream(desired)
            result.items.append(
                ItemStatus(spec.name, not result.dry_run, "InSync" if not result.dry_run else "Drifted")
            )
            return
        result.items.append(ItemStatus(spec.name, True, "InSync"))

    async def _consumer(self, jsm: JetStreamManager, plan: ConsumerPlan, result: BackendResult, owner: str) -> None:
        name = f"{plan.stream}/{plan.durable}"
        desired = consumer_config(plan, owner)
        if any(p.kind == "Stream" and p.name == plan.stream for p in result.problems):
            return  # its stream is not as declared; leave the consumer as it is
        try:
            live = (await jsm.consumer_info(plan.stream, plan.durable)).config
        except NotFoundError:
            result.changes.append(Change("create", "Consumer", name))
            if not result.dry_run:
                await jsm.add_consumer(plan.stream, desired)
            return
        holder = live.description or ""
        if holder.startswith(OWNER_PREFIX) and holder != owner:
            message = (f"durable {plan.durable} on {plan.stream} is held by {holder.removeprefix(OWNER_PREFIX)}; "
                       "sharing it would split the stream's messages between the two stacks")  # fmt: skip
            result.problems.append(Problem("Consumer", name, "OwnedByAnotherStack", message))
            return
        mutable, immutable = diff_consumer(desired, live)
        if holder != owner:
            mutable.append("owner")  # made by hand or by an older operator: this stack's from now on
        if immutable:
            result.problems.append(Problem("Consumer", name, IMMUTABLE, "; ".join(immutable)))
        elif mutable:
            result.changes.append(Change("update", "Consumer", name, ", ".join(mutable) + " drifted"))
            if not result.dry_run:
                await jsm.add_consumer(plan.stream, desired)  # updates an existing durable

    async def _delete(self, jsm: JetStreamManager, plan: Plan) -> list[Change]:
        deleted = []
        for spec in plan.streams:
            try:
                # Only a stream this stack made: one made by hand or by another stack stays.
                if (await jsm.stream_info(spec.name)).config.description != plan.stack.owner:
                    continue
                await jsm.delete_stream(spec.name)  # its consumers go with it
            except NotFoundError:
                continue
            deleted.append(Change("delete", "Stream", spec.name))
        return deleted
