"""Infrastructure provisioners, one per backend, with the same verbs.

Each has `backend` (the status key: streams, buckets, tables, redis), `reconcile(plan, dry_run)`
returning a BackendResult (observe, diff and, unless dry_run, apply), and `delete(plan)`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

from tradingstack.backends.jetstream import JetStreamProvisioner
from tradingstack.backends.questdb import QuestDBProvisioner
from tradingstack.backends.redis import RedisProvisioner
from tradingstack.backends.s3 import S3Credentials, S3Provisioner
from tradingstack.changes import BackendResult, Change, Problem, UnreachableError
from tradingstack.credentials import ServerCredentials
from tradingstack.plan import Plan

log = logging.getLogger(__name__)


class Provisioner(Protocol):
    backend: str

    def reconcile(self, plan: Plan, dry_run: bool = False) -> BackendResult: ...

    def delete(self, plan: Plan) -> list[Change]: ...


@dataclass(frozen=True)
class StackCredentials:
    """What the operator (or the CLI) found for each server: credentials, or why there are none."""

    s3: S3Credentials | None = None
    nats: ServerCredentials = field(default_factory=ServerCredentials)
    questdb: ServerCredentials = field(default_factory=ServerCredentials)
    redis: ServerCredentials = field(default_factory=ServerCredentials)
    missing: dict[str, str] = field(default_factory=dict)  # backend -> why its Secret cannot be used


@dataclass
class MissingSecret:
    """Stands in for a backend whose secretRef cannot be read: it reports that, and touches nothing."""

    backend: str
    message: str

    def reconcile(self, plan: Plan, dry_run: bool = False) -> BackendResult:
        problem = Problem("Secret", "secretRef", "SecretNotFound", self.message)
        return BackendResult(self.backend, problems=[problem], dry_run=dry_run)

    def delete(self, plan: Plan) -> list[Change]:
        raise UnreachableError(self.message)


def provisioners(plan: Plan, credentials: StackCredentials | None = None) -> list[Provisioner]:
    """The backends a plan needs, at the endpoints its spec names, with their credentials."""
    infra, creds = plan.spec.infrastructure, credentials or StackCredentials()
    found: list[Provisioner] = [
        JetStreamProvisioner(infra.nats.url, credentials=creds.nats),
        S3Provisioner(infra.s3, creds.s3),
        QuestDBProvisioner(infra.questdb.url, credentials=creds.questdb),
        RedisProvisioner(infra.redis.url, credentials=creds.redis),
    ]
    return [MissingSecret(p.backend, creds.missing[p.backend]) if p.backend in creds.missing else p for p in found]


def run(provisioner: Provisioner, plan: Plan, dry_run: bool = False) -> BackendResult:
    """One backend's pass; its failure is reported in its result and never stops the others."""
    try:
        return provisioner.reconcile(plan, dry_run)
    except UnreachableError as exc:
        return BackendResult(provisioner.backend, unreachable=str(exc), dry_run=dry_run)
    except Exception as exc:  # a client library's own error: report it, keep the other backends going
        log.exception("%s provisioning failed", provisioner.backend)
        problem = Problem(provisioner.backend, "*", "ProvisionFailed", f"{type(exc).__name__}: {exc}")
        return BackendResult(provisioner.backend, problems=[problem], dry_run=dry_run)


__all__ = ["Provisioner", "S3Credentials", "StackCredentials", "provisioners", "run"]
