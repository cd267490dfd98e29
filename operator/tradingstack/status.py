"""Conditions and status, computed purely from what was observed.

Condition types and reasons are declared once here. `phase` is derived from the conditions
and never set on its own; lastTransitionTime moves only when a condition's status flips.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from tradingstack.changes import BackendResult
from tradingstack.plan import Plan


class ConditionType(StrEnum):
    READY = "Ready"  # every part of the platform is available and reconciled
    SERVICES_READY = "ServicesReady"  # every enabled service's Deployment is fully rolled out
    STREAMS_READY = "StreamsReady"  # every JetStream stream and consumer exists as declared
    BUCKETS_READY = "BucketsReady"  # every bucket and lake Delta table exists as declared
    TABLES_READY = "TablesReady"  # every QuestDB table exists as declared
    REDIS_READY = "RedisReady"  # the stack's Redis database answers and is this stack's own
    PROGRESSING = "Progressing"  # the operator or a rollout is moving towards the spec
    DEGRADED = "Degraded"  # something needs a human: invalid spec, failed apply, failed rollout


class Reason(StrEnum):
    READY = "Ready"
    NOT_READY = "NotReady"
    ALL_SERVICES_READY = "AllServicesReady"
    SERVICES_NOT_READY = "ServicesNotReady"
    ROLLING_OUT = "RollingOut"
    RECONCILED = "Reconciled"
    PAUSED = "Paused"
    AS_EXPECTED = "AsExpected"
    INVALID_SPEC = "InvalidSpec"
    APPLY_FAILED = "ApplyFailed"
    ROLLOUT_FAILED = "RolloutFailed"
    PROVISIONED = "Provisioned"  # the backend holds everything the spec declares
    UNREACHABLE = "Unreachable"  # the backend's server did not answer; retried with backoff
    IMMUTABLE_FIELD_CHANGED = "ImmutableFieldChanged"  # the spec changes a field the server cannot change
    REJECTED = "Rejected"  # the server refused a statement
    OWNED_BY_ANOTHER_STACK = "OwnedByAnotherStack"  # a stream, table, lake table or Redis database is another's
    SECRET_NOT_FOUND = "SecretNotFound"  # the Secret named in secretRef is missing or incomplete
    IMAGE_NOT_ALLOWED = "ImageNotAllowed"  # an image outside the operator's allowed repositories
    PROVISION_FAILED = "ProvisionFailed"  # any other backend error


# The condition each backend reports, in the order Ready looks at them.
BACKEND_CONDITIONS = {
    "streams": ConditionType.STREAMS_READY,
    "buckets": ConditionType.BUCKETS_READY,
    "tables": ConditionType.TABLES_READY,
    "redis": ConditionType.REDIS_READY,
}
_BACKEND_NOUNS = {"streams": "streams and consumers", "buckets": "buckets and Delta tables", "tables": "tables",
                  "redis": "Redis database claims"}  # fmt: skip


class Phase(StrEnum):
    READY = "Ready"
    PROGRESSING = "Progressing"
    DEGRADED = "Degraded"
    FAILED = "Failed"
    PAUSED = "Paused"


@dataclass(frozen=True)
class DeploymentState:
    """The parts of a Deployment's status that decide readiness."""

    name: str
    service: str
    desired: int
    ready: int
    available: int
    rolled_out: bool
    failure: str | None  # a message when the Deployment's own conditions say the rollout failed

    @classmethod
    def from_object(cls, obj: dict[str, Any]) -> DeploymentState:
        meta, spec, status = obj.get("metadata", {}), obj.get("spec", {}), obj.get("status") or {}
        desired = int(spec.get("replicas", 1))
        updated = int(status.get("updatedReplicas") or 0)
        available = int(status.get("availableReplicas") or 0)
        total = int(status.get("replicas") or 0)
        observed = int(status.get("observedGeneration") or 0) >= int(meta.get("generation") or 0)
        # The same test as `kubectl rollout status`: current generation observed, every replica
        # updated, no old replicas left, all of them available.
        rolled_out = observed and updated >= desired and total <= updated and available >= desired
        failure = None
        for cond in status.get("conditions") or []:
            if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
                failure = cond.get("message") or "progress deadline exceeded"
            if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
                failure = cond.get("message") or "replica failure"
        return cls(
            name=meta.get("name", ""),
            service=(meta.get("labels") or {}).get("app.kubernetes.io/component", ""),
            desired=desired,
            ready=int(status.get("readyReplicas") or 0),
            available=available,
            rolled_out=rolled_out,
            failure=failure,
        )


@dataclass(frozen=True)
class Observation:
    """Everything one status computation looks at."""

    generation: int
    plan: Plan | None  # None when the spec is invalid
    deployments: dict[str, DeploymentState]  # by Deployment name
    paused: bool = False
    invalid_spec: str | None = None
    invalid_reason: Reason = Reason.INVALID_SPEC  # ImageNotAllowed: valid, but not allowed to run here
    apply_error: str | None = None
    backends: dict[str, BackendResult] | None = None  # None: no infrastructure pass this time


def condition(type_: ConditionType, ok: bool, reason: Reason, message: str) -> dict[str, Any]:
    return {
        "type": type_.value,
        "status": "True" if ok else "False",
        "reason": reason.value,
        "message": message,
    }


def _services(obs: Observation) -> tuple[list[dict[str, Any]], list[str], list[str], int]:
    """Per-service status, readiness problems, rollout failures and the ready count."""
    rows, problems, failures, ready = [], [], [], 0
    for workload in obs.plan.workloads if obs.plan else []:
        state = obs.deployments.get(workload.name)
        if state is None:
            problems.append(f"{workload.service.value}: Deployment {workload.name} not found")
            rows.append({"name": workload.service.value, "desiredReplicas": workload.replicas})
            continue
        ok = state.rolled_out and state.desired == workload.replicas
        ready += ok
        rows.append(
            {
                "name": workload.service.value,
                "desiredReplicas": workload.replicas,
                "readyReplicas": state.ready,
                "availableReplicas": state.available,
                "ready": ok,
            }
        )
        if state.failure:
            failures.append(f"{workload.service.value}: {state.failure}")
        if not ok:
            problems.append(f"{workload.service.value}: {state.available}/{workload.replicas} available")
    return rows, problems, failures, ready


def backend_condition(result: BackendResult) -> dict[str, Any]:
    type_ = BACKEND_CONDITIONS[result.backend]
    if result.unreachable is not None:
        return condition(type_, False, Reason.UNREACHABLE, result.unreachable)
    if result.problems:
        known = {r.value for r in Reason}
        first = result.problems[0].reason
        reason = Reason(first) if first in known else Reason.PROVISION_FAILED
        return condition(type_, False, reason, "; ".join(str(p) for p in result.problems))
    # The state, not the actions taken to reach it (those are events): a steady pass rewrites nothing.
    return condition(type_, True, Reason.PROVISIONED, f"all {_BACKEND_NOUNS[result.backend]} in place")


def desired_conditions(
    obs: Observation, existing: list[dict[str, Any]] | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Conditions (without timestamps) and the other status fields for one observation.

    Backend conditions not recomputed by this observation are taken from `existing` for Ready.
    """
    rows, problems, failures, ready = _services(obs)
    total = len(obs.plan.workloads) if obs.plan else 0
    if obs.invalid_spec is not None:
        services = condition(ConditionType.SERVICES_READY, False, obs.invalid_reason, "spec is not applied")
    elif problems:
        services = condition(ConditionType.SERVICES_READY, False, Reason.SERVICES_NOT_READY, "; ".join(problems))
    else:
        services = condition(
            ConditionType.SERVICES_READY,
            True,
            Reason.ALL_SERVICES_READY,
            f"{ready}/{total} services available",
        )

    if obs.invalid_spec is not None:
        degraded = condition(ConditionType.DEGRADED, True, obs.invalid_reason, obs.invalid_spec)
    elif obs.apply_error is not None:
        degraded = condition(ConditionType.DEGRADED, True, Reason.APPLY_FAILED, obs.apply_error)
    elif failures:
        degraded = condition(ConditionType.DEGRADED, True, Reason.ROLLOUT_FAILED, "; ".join(failures))
    else:
        degraded = condition(ConditionType.DEGRADED, False, Reason.AS_EXPECTED, "no problems found")

    if obs.paused:
        progressing = condition(
            ConditionType.PROGRESSING,
            False,
            Reason.PAUSED,
            "spec.paused is true: children are not reconciled",
        )
    elif degraded["status"] == "True":
        progressing = condition(ConditionType.PROGRESSING, False, Reason(degraded["reason"]), degraded["message"])
    elif problems:
        # State, not actions: a change applied this pass shows up as a rollout still to finish.
        progressing = condition(
            ConditionType.PROGRESSING, True, Reason.ROLLING_OUT, "waiting for " + "; ".join(problems)
        )
    else:
        progressing = condition(ConditionType.PROGRESSING, False, Reason.RECONCILED, "spec fully applied")

    fresh = [backend_condition(r) for r in (obs.backends or {}).values()]
    old = {c.get("type"): c for c in existing or []}
    backend_conds = [
        next((c for c in fresh if c["type"] == t), None) or old.get(t.value) for t in BACKEND_CONDITIONS.values()
    ]
    # Before the first infrastructure pass there is nothing to say yet: not ready, not failed.
    blockers = [degraded] if degraded["status"] == "True" else []
    blockers += [c for c in [services, *backend_conds] if c is not None and c["status"] != "True"]
    missing = [t.value for t, c in zip(BACKEND_CONDITIONS.values(), backend_conds, strict=True) if c is None]
    if blockers:
        ready_cond = condition(ConditionType.READY, False, Reason(blockers[0]["reason"]), blockers[0]["message"])
    elif missing and obs.invalid_spec is None:
        ready_cond = condition(
            ConditionType.READY, False, Reason.NOT_READY, "infrastructure not checked yet: " + ", ".join(missing)
        )
    else:
        message = f"all {total} services and infrastructure ready"
        ready_cond = condition(ConditionType.READY, True, Reason.READY, message)

    # Always the same order, whether a backend condition is fresh or carried over: a reordered
    # list is a changed list, and a steady state must write nothing.
    conditions = [ready_cond, services, *(c for c in backend_conds if c is not None), progressing, degraded]
    extra: dict[str, Any] = {"services": rows, "servicesReady": f"{ready}/{total}"}
    for result in (obs.backends or {}).values():
        extra[result.backend] = [item.as_status() for item in result.items]
    extra["phase"] = derive_phase(conditions).value
    return conditions, extra


def derive_phase(conditions: list[dict[str, Any]]) -> Phase:
    by_type = {c["type"]: c for c in conditions}
    degraded = by_type.get(ConditionType.DEGRADED, {})
    if degraded.get("status") == "True":
        refused = degraded.get("reason") in (Reason.INVALID_SPEC, Reason.IMAGE_NOT_ALLOWED)
        return Phase.FAILED if refused else Phase.DEGRADED
    if by_type.get(ConditionType.PROGRESSING, {}).get("reason") == Reason.PAUSED:
        return Phase.PAUSED
    if by_type.get(ConditionType.READY, {}).get("status") == "True":
        return Phase.READY
    return Phase.PROGRESSING


RFC3339 = "%Y-%m-%dT%H:%M:%SZ"  # the form of every time in status (Kubernetes' metav1.Time)


def now_rfc3339() -> str:
    return rfc3339(datetime.now(UTC))


def rfc3339(ts: datetime) -> str:
    return ts.strftime(RFC3339)


def parse_rfc3339(text: str | None) -> datetime | None:
    """A time this module wrote, or None for anything else (missing, hand-edited)."""
    try:
        return datetime.strptime(text or "", RFC3339).replace(tzinfo=UTC)
    except ValueError:
        return None


def merge_conditions(
    existing: list[dict[str, Any]], desired: list[dict[str, Any]], generation: int, now: str
) -> list[dict[str, Any]]:
    """Upsert by type; keep lastTransitionTime unless the status flipped; keep unknown types."""
    old = {c.get("type"): c for c in existing}
    merged = []
    for cond in desired:
        prev = old.pop(cond["type"], None)
        moved = prev is None or prev.get("status") != cond["status"]
        merged.append(
            {
                **cond,
                "lastTransitionTime": now if moved or prev is None else prev.get("lastTransitionTime", now),
                "observedGeneration": generation,
            }
        )
    # Conditions owned by other steps (StreamsReady, ...) are kept as they are.
    merged.extend(old.values())
    return merged


def build_status(existing: dict[str, Any] | None, obs: Observation, now: str | None = None) -> dict[str, Any]:
    """The complete new status object, given the current one."""
    existing = existing or {}
    conditions, extra = desired_conditions(obs, existing.get("conditions"))
    merged = merge_conditions(existing.get("conditions") or [], conditions, obs.generation, now or now_rfc3339())
    return {"observedGeneration": obs.generation, **extra, "conditions": merged}
