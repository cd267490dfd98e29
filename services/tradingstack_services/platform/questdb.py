"""The QuestDB client a service uses, and its readiness check (as `rediskv` is for Redis)."""

from __future__ import annotations

import asyncio

from tradingstack.backends.questdb import QuestDBProvisioner
from tradingstack_services.platform.app import Check
from tradingstack_services.platform.settings import ServiceSettings


def connect(settings: ServiceSettings) -> tuple[QuestDBProvisioner, Check]:
    """QuestDB's HTTP API at QUESTDB_URL with the service's credentials, and a check that it answers a query now."""
    questdb = QuestDBProvisioner(settings.QUESTDB_URL, credentials=settings.questdb_credentials())

    async def answers() -> None:
        await asyncio.to_thread(questdb.query, "SELECT table_name FROM tables()")

    return questdb, answers
