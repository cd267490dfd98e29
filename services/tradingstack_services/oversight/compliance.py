"""compliance-scanner: the rules of `oversight.rules` over every order event (`orders.>`).

Per event (its `Nats-Msg-Id`, else a digest of it, is its identity): the account's state is read
from Redis, the event judged, and the new state stored in one transaction with the alerts it
raised under the event's identity, committed only if no other scanner changed the account's state
meanwhile (WATCH): a second pod (one the CRD does not allow, but a stuck one) loses no event. One
pod, rolling with Recreate: the rules judge an account's events in stream order. The alerts are published on
`compliance.alert.{RULE}.{SYMBOL}` (JetStream ack, `Nats-Msg-Id` = alert id) and written to
QuestDB `compliance_alerts`, and only then is the event acknowledged. A redelivery finds the
event judged and publishes and writes the same alerts again (deduplicated by id), so a crash
at any point loses no alert and counts no event twice. `GET /alerts` serves the newest alerts
from the COMPLIANCE stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI, Query
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from prometheus_client import Counter
from pydantic import TypeAdapter, ValidationError
from redis.asyncio.client import Pipeline

from tradingstack_services.marketdata.prices import PriceBook
from tradingstack_services.oversight.rules import RULES, AccountState, Alert, judge
from tradingstack_services.platform import auth, bus, ilp, questdb, rediskv, tracing
from tradingstack_services.platform.settings import ServiceSettings
from tradingstack_services.trading.model import Order, mid
from tradingstack_services.trading.risk import Limits

log = logging.getLogger(__name__)
STATE_PREFIX = "tradingstack:compliance:state:"
JUDGED_PREFIX = "tradingstack:compliance:judged:"
# A judged event is remembered longer than the ORDERS stream keeps it (168h by default).
JUDGED_TTL_SECONDS = 8 * 24 * 3600
RECENT_ALERTS = 1_000
ALERTS = Counter("tradingstack_compliance_alerts_total", "Compliance alerts raised", ["rule", "severity"])
EVENTS = Counter("tradingstack_compliance_events_total", "Order events judged", ["outcome"])
DEAD = Counter("tradingstack_compliance_dead_lettered_total", "Order events sent to the dead-letter stream",
               ["reason"])  # fmt: skip
_ALERT_LIST = TypeAdapter(list[Alert])


def alert_line(alert: Alert) -> str:
    tags = {"rule": alert.rule, "severity": alert.severity, "symbol": alert.symbol,
            **({"account": alert.account} if alert.account else {})}  # fmt: skip
    fields: dict[str, ilp.Field] = {"alert_id": alert.alert_id, "order_id": alert.order_id, "message": alert.message}
    return ilp.line("compliance_alerts", tags, fields, alert.ts)


class Scanner:
    def __init__(self, settings: ServiceSettings, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.redis = redis
        self.rules = settings.compliance_rules()
        self.limits = Limits(settings)
        self.questdb, self.questdb_check = questdb.connect(settings)
        self.prices = PriceBook(settings.symbols)
        self.recent: OrderedDict[str, Alert] = OrderedDict()

    def mid(self, symbol: str) -> float | None:
        quote = self.prices.get(symbol)
        return mid(quote.bid, quote.ask, quote.last) if quote else None

    async def run(self, nc: Client, stop: asyncio.Event) -> None:
        await bus.consume(nc, stop, self.settings, self.process, 200, 1.0)

    async def process(self, js: Any, messages: list[Msg]) -> None:
        # In stream order: an account's events build on each other.
        for msg, order in await bus.parse_each(js, messages, self.settings, Order, "invalid_order", DEAD):
            alerts = await self.judged(bus.event_id(msg), order)
            for alert in alerts:  # each carries on the trace of the event that raised it
                headers = {**tracing.passthrough(msg.headers), "Nats-Msg-Id": alert.alert_id}
                await js.publish(f"compliance.alert.{alert.rule}.{alert.symbol}", alert.model_dump_json().encode(),
                                 headers=headers)  # fmt: skip
            if alerts:
                await asyncio.to_thread(self.questdb.write_ilp, [alert_line(a) for a in alerts])
            await msg.ack()

    async def judged(self, event: str, order: Order) -> list[Alert]:
        """The alerts of one event: judged now, or as judged before (a redelivery)."""
        state_key = STATE_PREFIX + (order.account or "-")
        judged_key = JUDGED_PREFIX + event

        async def step(tx: Pipeline) -> tuple[bool, list[Alert]]:
            # Under WATCH: another scanner (a rollout's second pod) that commits first makes this run again.
            before, raw_state = await tx.get(judged_key), await tx.get(state_key)
            rediskv.begin_writes(tx)
            if before is not None:
                return True, _ALERT_LIST.validate_json(before)
            state = AccountState.model_validate_json(raw_state) if raw_state else AccountState()
            found = judge(state, order, self.rules, self.limits.of(order.symbol, order.account),
                          self.mid(order.symbol))  # fmt: skip
            tx.set(state_key, state.model_dump_json())
            tx.set(judged_key, _ALERT_LIST.dump_json(found), ex=JUDGED_TTL_SECONDS)
            return False, found

        redelivered, alerts = await rediskv.compare_and_set(self.redis, [state_key, judged_key], step)
        if redelivered:
            EVENTS.labels("redelivered").inc()
            return alerts
        EVENTS.labels("judged").inc()
        for alert in alerts:
            ALERTS.labels(alert.rule, alert.severity).inc()
        return alerts

    def remember(self, alert: Alert) -> None:
        self.recent.pop(alert.alert_id, None)
        self.recent[alert.alert_id] = alert
        while len(self.recent) > RECENT_ALERTS:
            self.recent.popitem(last=False)

    async def follow_alerts(self, nc: Client, stop: asyncio.Event) -> None:
        """Worker: the newest alerts of the COMPLIANCE stream (any replica's), then each new one."""
        js = nc.jetstream()
        info = await js.stream_info("COMPLIANCE")
        start = max(info.state.last_seq - RECENT_ALERTS + 1, 1)

        async def receive(msg: Msg) -> None:
            try:
                self.remember(Alert.model_validate_json(msg.data))
            except ValidationError:
                log.warning("not an alert on %s, skipped", msg.subject)

        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)
        sub = await js.subscribe("compliance.alert.>", stream="COMPLIANCE", cb=receive, ordered_consumer=True,
                                 config=config)  # fmt: skip
        await stop.wait()
        await sub.unsubscribe()


def create(settings: ServiceSettings) -> FastAPI:
    redis, redis_check = rediskv.connect(settings.REDIS_URL, settings.redis_credentials())
    scanner = Scanner(settings, redis)

    # An alert is acknowledged only once QuestDB has its row: without QuestDB the scanner stops.
    checks = {"redis": redis_check, "questdb": scanner.questdb_check}
    app = bus.worker_app(settings, [scanner.prices.follow, scanner.run, scanner.follow_alerts], checks)
    readers = auth.readers(settings)

    @app.get("/alerts")
    async def alerts(
        rule: str | None = Query(None, pattern="^(" + "|".join(RULES) + ")$"),
        account: str | None = Query(None, max_length=63),
        symbol: str | None = Query(None, max_length=32),
        limit: int = Query(100, ge=1, le=RECENT_ALERTS),
        reader: auth.Reader = readers,
    ) -> list[Alert]:
        """The newest alerts first, optionally of one rule, account or symbol; the caller's account's
        only, unless it has role oversight."""
        found = [a for a in reversed(scanner.recent.values())
                 if reader.sees(a.account) and (rule is None or a.rule == rule)
                 and (account is None or a.account == account) and (symbol is None or a.symbol == symbol)]  # fmt: skip
        return found[:limit]

    return app
