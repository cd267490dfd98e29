"""The reconcile of one TradingStack: a fixed, short-circuiting list of steps.

validate -> paused? -> workloads -> status. Infrastructure steps (streams, buckets, tables)
slot in after workloads. Status is written once per pass through StatusWriter, which skips
the write when nothing changed and retries on conflicts. kopf handlers (handlers.py) only
load the object, call into here and translate the few named errors into kopf's retries.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import Counter, Histogram

from tradingstack import api
from tradingstack.changes import Change
from tradingstack.kubeclient import KubeApiError, KubeClient
from tradingstack.plan import InvalidSpecError, Plan, plan_from_body
from tradingstack.status import DeploymentState, Observation, build_status
from tradingstack.workloads import WorkloadProvisioner, diff_object

log = logging.getLogger(__name__)

RECONCILES = Counter("tradingstack_reconciles_total", "Reconcile passes", ["result"])
RECONCILE_SECONDS = Histogram("tradingstack_reconcile_duration_seconds", "Duration of reconcile passes")
STATUS_WRITES = Counter("tradingstack_status_writes_total", "Status subresource writes")


class EventSink(Protocol):
    """Posts a Kubernetes Event about a TradingStack (kopf's in the operator)."""

    def __call__(self, body: dict[str, Any], type_: str, reason: str, message: str) -> None: ...


def no_events(body: dict[str, Any], type_: str, reason: str, message: str) -> None:
    log.info("%s %s: %s", type_, reason, message)


@dataclass
class Outcome:
    plan: Plan | None
    changes: list[Change] = field(default_factory=list)
    invalid_spec: str | None = None
    apply_error: KubeApiError | None = None
    status_written: bool = False


class StatusWriter:
    """The one place status is written: read, compute, skip if equal, patch with a precondition."""

    def __init__(self, kube: KubeClient, attempts: int = 5) -> None:
        self.kube = kube
        self.attempts = attempts

    def write(self, namespace: str, name: str, compute: Callable[[dict[str, Any]], dict[str, Any]]) -> bool:
        for attempt in range(self.attempts):
            current = self.kube.get(api.KIND, namespace, name)
            if current is None:
                return False
            old = current.get("status") or {}
            new = compute(current)
            if new == {k: old.get(k) for k in new}:
                return False
            patch = {"metadata": {"resourceVersion": current["metadata"]["resourceVersion"]}, "status": new}
            try:
                self.kube.merge_patch_status(api.KIND, namespace, name, patch)
            except KubeApiError as exc:
                if exc.status == 409 and attempt + 1 < self.attempts:
                    continue  # someone wrote in between: recompute from the fresh object
                if exc.status == 404:
                    return False
                raise
            STATUS_WRITES.inc()
            return True
        return False


def deployment_states(objects: Iterable[dict[str, Any]]) -> dict[str, DeploymentState]:
    return {
        state.name: state
        for state in (DeploymentState.from_object(o) for o in objects if o.get("kind", "Deployment") == "Deployment")
    }


class Reconciler:
    def __init__(self, kube: KubeClient, events: EventSink = no_events) -> None:
        self.kube = kube
        self.events = events
        self.workloads = WorkloadProvisioner(kube)
        self.status = StatusWriter(kube)

    def reconcile(self, body: dict[str, Any]) -> Outcome:
        """One full pass. Raises KubeApiError only for retryable API failures (after writing status)."""
        started = time.monotonic()
        meta = body["metadata"]
        namespace, name, generation = meta["namespace"], meta["name"], int(meta.get("generation") or 0)
        paused = bool((body.get("spec") or {}).get("paused"))
        try:
            plan = plan_from_body(body)
        except InvalidSpecError as exc:
            outcome = Outcome(plan=None, invalid_spec=str(exc))
            self.events(body, "Warning", "InvalidSpec", str(exc))
            self._write(namespace, name, generation, outcome, {}, paused)
            RECONCILES.labels("invalid").inc()
            return outcome

        outcome = Outcome(plan=plan)
        if paused:
            live = self.workloads.observe(plan)
            outcome.status_written = self._write(namespace, name, generation, outcome, live, paused)
            RECONCILES.labels("paused").inc()
            return outcome

        live = {}
        try:
            changes, live = self.workloads.reconcile(plan)
            outcome.changes = changes
        except KubeApiError as exc:
            outcome.apply_error = exc
            self.events(body, "Warning", "ApplyFailed", str(exc))
        if outcome.changes:
            # One event per pass, not one per object: a first apply touches dozens of them.
            summary = ", ".join(str(c) for c in outcome.changes)
            self.events(body, "Normal", "Applied", f"{len(outcome.changes)} change(s): {summary}")
        outcome.status_written = self._write(namespace, name, generation, outcome, live, paused)
        RECONCILE_SECONDS.observe(time.monotonic() - started)
        if outcome.apply_error is not None:
            RECONCILES.labels("error").inc()
            raise outcome.apply_error
        RECONCILES.labels("changed" if outcome.changes else "unchanged").inc()
        return outcome

    def _write(
        self,
        namespace: str,
        name: str,
        generation: int,
        outcome: Outcome,
        live: dict[tuple[str, str], dict[str, Any]],
        paused: bool,
    ) -> bool:
        observation = Observation(
            generation=generation,
            plan=outcome.plan,
            deployments=deployment_states(o for (kind, _), o in live.items() if kind == "Deployment"),
            paused=paused,
            invalid_spec=outcome.invalid_spec,
            apply_error=str(outcome.apply_error) if outcome.apply_error else None,
            changed=len(outcome.changes),
        )
        return self.status.write(namespace, name, lambda current: build_status(current.get("status"), observation))

    def refresh_status(self, body: dict[str, Any], deployments: dict[str, DeploymentState]) -> bool:
        """Recompute status from watched Deployments, keeping the last reconciled generation."""
        meta = body["metadata"]
        try:
            plan = plan_from_body(body)
        except InvalidSpecError:
            return False  # the reconcile reported it; nothing newer to say

        def compute(current: dict[str, Any]) -> dict[str, Any]:
            status = current.get("status") or {}
            previous: dict[str, Any] = next(
                (c for c in status.get("conditions") or [] if c.get("type") == "Degraded"), {}
            )
            observation = Observation(
                generation=int(status.get("observedGeneration") or 0),
                plan=plan,
                deployments=deployments,
                paused=bool((current.get("spec") or {}).get("paused")),
                # An apply failure stays reported until a reconcile pass succeeds.
                apply_error=previous.get("message") if previous.get("reason") == "ApplyFailed" else None,
            )
            return build_status(status, observation)

        return self.status.write(meta["namespace"], meta["name"], compute)

    def repair_child(self, body: dict[str, Any], kind: str, name: str, live: dict[str, Any] | None) -> Change | None:
        """Restore one child after a watch event showed it deleted or edited."""
        if (body.get("spec") or {}).get("paused") or body["metadata"].get("deletionTimestamp"):
            return None
        try:
            plan = plan_from_body(body)
        except InvalidSpecError:
            return None
        desired = next((o for o in plan.objects if o["kind"] == kind and o["metadata"]["name"] == name), None)
        if desired is None:
            return None  # not ours (any more): the next full reconcile prunes it
        change = diff_object(desired, live)
        if change is not None:
            self.kube.apply(desired)
            self.events(body, "Normal", "Repaired", f"{change}: restored to the spec")
        return change

    def delete(self, body: dict[str, Any]) -> list[str]:
        """Finalizer: honour deletionPolicy. Returns what was deleted or retained, for the event."""
        policy = (body.get("spec") or {}).get("deletionPolicy", "Retain")
        try:
            plan = plan_from_body(body)
        except InvalidSpecError:
            return []  # nothing was ever provisioned for an invalid spec
        if policy != "Delete":
            kept = [f"stream {s.name}" for s in plan.streams] + [f"bucket {b}" for b in plan.buckets]
            kept += [f"table {t.name}" for t in plan.tables]
            self.events(body, "Normal", "Retained", "deletionPolicy Retain keeps " + ", ".join(kept))
            return kept
        live = self.workloads.observe(plan)
        deleted = []
        for (kind, obj_name), _obj in sorted(live.items()):
            if self.kube.delete(kind, plan.stack.namespace, obj_name):
                deleted.append(f"{kind}/{obj_name}")
        self.events(body, "Normal", "Deleted", "deletionPolicy Delete removed " + (", ".join(deleted) or "nothing"))
        return deleted
