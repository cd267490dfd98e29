"""Infrastructure provisioners, one per backend, with the same verbs.

Each has `backend` (the status key: streams, buckets, tables), `reconcile(plan, dry_run)`
returning a BackendResult (observe, diff and, unless dry_run, apply), and `delete(plan)`.
"""

from __future__ import annotations

import logging
from typing import Protocol

from tradingstack.backends.jetstream import JetStreamProvisioner
from tradingstack.backends.questdb import QuestDBProvisioner
from tradingstack.backends.s3 import S3Credentials, S3Provisioner
from tradingstack.changes import BackendResult, Change, Problem, UnreachableError
from tradingstack.plan import Plan

log = logging.getLogger(__name__)


class Provisioner(Protocol):
    backend: str

    def reconcile(self, plan: Plan, dry_run: bool = False) -> BackendResult: ...

    def delete(self, plan: Plan) -> list[Change]: ...


def provisioners(
    plan: Plan, credentials: S3Credentials | None, credentials_error: str | None = None
) -> list[Provisioner]:
    """The backends a plan needs, at the endpoints its spec names."""
    infra = plan.spec.infrastructure
    return [
        JetStreamProvisioner(infra.nats.url),
        S3Provisioner(infra.s3, credentials, credentials_error),
        QuestDBProvisioner(infra.questdb.url),
    ]


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


__all__ = ["Provisioner", "S3Credentials", "provisioners", "run"]
