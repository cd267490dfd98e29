"""The shared consume loop on a real nats-server: a message whose handling fails is retried with
backoff and dead-lettered on its last delivery, without holding back the rest of its batch; a
dependency that is away for a while costs retries, not messages."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg
from nats.js import api as js_api

from tradingstack_services.platform import bus
from tradingstack_services.platform.settings import ServiceSettings

from conftest import NatsServer


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    nats_server = NatsServer(tmp_path / "js")
    nats_server.start()
    yield nats_server
    nats_server.stop()


def settings(url: str, max_deliver: int) -> ServiceSettings:
    return ServiceSettings(SERVICE_NAME="worker", NATS_URL=url, NATS_STREAM="WORK", NATS_DURABLE="worker",
                           NATS_MAX_DELIVER=max_deliver)  # type: ignore[call-arg]  # fmt: skip


async def prepare(url: str, max_deliver: int, count: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name="WORK", subjects=["work.>"])
    await js.add_stream(name="DEAD_LETTER", subjects=["dlq.>"])
    await js.add_consumer("WORK", js_api.ConsumerConfig(
        durable_name="worker", ack_policy=js_api.AckPolicy.EXPLICIT, ack_wait=30, max_deliver=max_deliver))  # fmt: skip
    for i in range(count):
        await js.publish(f"work.{i}", str(i).encode())
    await nc.close()


async def run(url: str, config: ServiceSettings, process: bus.Batch, until: Any, within: float) -> None:
    nc = await nats.connect(url)
    stop = asyncio.Event()
    task = asyncio.create_task(bus.consume(nc, stop, config, process, 100, 0.2))
    deadline = time.monotonic() + within
    while not until() and time.monotonic() < deadline:  # noqa: ASYNC110 (polls test state)
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 5)
    await nc.close()


async def dead_letters(url: str) -> list[Msg]:
    nc = await nats.connect(url)
    sub = await nc.jetstream().pull_subscribe("dlq.>", durable="inspect", stream="DEAD_LETTER")
    try:
        return list(await sub.fetch(10, timeout=1))
    except TimeoutError:
        return []
    finally:
        await nc.close()


def test_a_poison_message_is_dead_lettered_on_its_last_delivery_and_the_rest_go_through(
    server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bus, "RETRY_DELAY", 0.1)
    asyncio.run(prepare(server.url, 3, 10))
    handled: list[int] = []
    attempts: list[int] = []

    async def process(_: Any, messages: list[Msg]) -> None:
        for msg in messages:
            if msg.data == b"4":
                attempts.append(msg.metadata.num_delivered)
                raise OverflowError("date value out of range")  # an error the handler did not expect
            if not msg.is_acked:
                handled.append(int(msg.data))
                await msg.ack()

    asyncio.run(run(server.url, settings(server.url, 3), process, lambda: 3 in attempts, 20))
    assert sorted(handled) == [0, 1, 2, 3, 5, 6, 7, 8, 9]  # each once, none held back by message 4
    assert sorted(set(attempts)) == [1, 2, 3]  # three deliveries (each tried in its batch, then alone)
    (letter,) = asyncio.run(dead_letters(server.url))
    assert letter.data == b"4"
    assert letter.subject == "dlq.WORK.delivery_limit"
    assert letter.headers["Tradingstack-Deliveries"] == "3"
    assert "OverflowError: date value out of range" in letter.headers["Tradingstack-Detail"]
    assert letter.headers["Tradingstack-Subject"] == "work.4"


def test_a_dependency_away_for_a_while_costs_retries_not_messages(
    server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bus, "RETRY_DELAY", 0.1)
    asyncio.run(prepare(server.url, 10, 50))
    back_at = time.monotonic() + 1.5
    handled: list[int] = []
    failed_calls: list[int] = []  # the size of each call that met the outage

    async def process(_: Any, messages: list[Msg]) -> None:
        if time.monotonic() < back_at:
            failed_calls.append(len(messages))
            raise ConnectionError("redis is away")
        for msg in messages:
            handled.append(int(msg.data))
            await msg.ack()

    asyncio.run(run(server.url, settings(server.url, 10), process, lambda: len(handled) >= 50, 30))
    assert sorted(handled) == list(range(50))
    assert asyncio.run(dead_letters(server.url)) == []
    # The outage was noticed after OUTAGE_AFTER single tries per failed batch, not one try per message.
    in_batches = sum(size for size in failed_calls if size > 1)
    singles = sum(1 for size in failed_calls if size == 1)
    assert in_batches >= 50
    assert singles < in_batches / 4


def test_a_dead_letter_names_its_service_and_is_stored_once_when_sent_again(server: NatsServer) -> None:
    """A service that dies between parking a message and acknowledging it parks it again on the
    redelivery: the dead-letter stream keeps one copy (a message id per service and stream
    sequence), and says which service parked it (two services read MARKET_TICKS)."""
    asyncio.run(prepare(server.url, 3, 1))
    config = settings(server.url, 3)

    async def park_twice() -> None:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        sub = await js.pull_subscribe_bind(durable="worker", stream="WORK")
        (msg,) = await sub.fetch(1, timeout=2)
        error = bus.InvalidMessageError("invalid_tick", "price: must be a finite number")
        msg.ack = msg.nak  # type: ignore[method-assign]  # the service died before its ack: delivered again
        await bus.dead_letter(js, msg, config, error)
        (again,) = await sub.fetch(1, timeout=5)
        assert again.metadata.num_delivered == 2
        await bus.dead_letter(js, again, config, error)
        await nc.close()

    asyncio.run(park_twice())
    (letter,) = asyncio.run(dead_letters(server.url))
    assert letter.headers["Tradingstack-Service"] == "worker"
    assert letter.headers["Tradingstack-Stream-Seq"] == "1"


def test_poison_at_the_same_sequence_of_a_stream_made_again_is_parked_again(server: NatsServer) -> None:
    """A stream deleted and made again numbers its messages from 1 again: its poison at sequence 1 is
    a new dead letter, not a repeat of the old incarnation's (the stream's duplicate window would
    have dropped it, by an id of stream and sequence alone)."""
    config = settings(server.url, 3)
    error = bus.InvalidMessageError("invalid_tick", "price: must be a finite number")

    async def park_one() -> None:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        sub = await js.pull_subscribe_bind(durable="worker", stream="WORK")
        (msg,) = await sub.fetch(1, timeout=2)
        await bus.dead_letter(js, msg, config, error)
        await nc.close()

    async def made_again() -> None:
        nc = await nats.connect(server.url)
        await nc.jsm().delete_stream("WORK")
        await nc.jsm().delete_stream("DEAD_LETTER")  # prepare makes both; the dead letters are kept aside
        await nc.close()

    asyncio.run(prepare(server.url, 3, 1))
    asyncio.run(park_one())
    first = asyncio.run(dead_letters(server.url))
    asyncio.run(made_again())
    asyncio.run(prepare(server.url, 3, 1))

    async def restore(letters: list[Msg]) -> None:  # the old incarnation's letter, as the DLQ kept it
        nc = await nats.connect(server.url)
        for letter in letters:
            await nc.jetstream().publish(letter.subject, letter.data, headers=letter.headers)
        await nc.close()

    asyncio.run(restore(first))
    asyncio.run(park_one())
    letters = asyncio.run(dead_letters(server.url))
    assert [m.headers["Tradingstack-Stream-Seq"] for m in letters] == ["1", "1"]


def test_a_service_whose_durable_is_missing_says_so_once_and_on_readyz(
    server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Started by hand before its consumer exists: one log line naming the consumer and how it is made,
    /readyz naming it too, no traceback loop; once the consumer is made, the service works."""
    probe = ServiceSettings(SERVICE_NAME="probe", NATS_URL=server.url, NATS_STREAM="WORK", NATS_DURABLE="nobody")

    async def scenario() -> None:
        nc = await nats.connect(server.url)
        await nc.jsm().add_stream(name="WORK", subjects=["work.>"])
        worker = bus.Supervised("probe", lambda nc, stop: bus.consume(nc, stop, probe, _ack_all, 10, 0.2))
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(nc, stop))
        await asyncio.sleep(3.2)  # three or four tries with the restart backoff
        problem = worker.problem(asyncio.get_running_loop().time()) or ""
        assert "'nobody'" in problem, problem
        assert "tradingstack provision" in problem
        await nc.jsm().add_consumer("WORK", js_api.ConsumerConfig(durable_name="nobody", ack_policy="explicit"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while not (worker.running_since is not None and loop.time() - worker.running_since > 1):  # the next try binds
            assert loop.time() < deadline, worker.last_error
            await asyncio.sleep(0.2)
        stop.set()
        await task
        await nc.close()

    with caplog.at_level(logging.WARNING, logger="tradingstack_services.platform.bus"):
        asyncio.run(scenario())
    said = [r for r in caplog.records if "nobody" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]
    assert said[0].exc_info is None


async def _ack_all(_: Any, messages: list[Any]) -> None:
    for msg in messages:
        await msg.ack()
