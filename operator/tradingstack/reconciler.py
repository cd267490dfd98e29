"""The reconcile of one TradingStack: a fixed, short-circuiting list of steps.

validate -> paused? -> workloads -> streams, buckets, tables -> status. Status is written
once per pass through StatusWriter, which skips the write when nothing changed and retries
on conflicts. kopf handlers (handlers.py) only load the object, call into here and
translate the few named errors into kopf's retries.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from deltalake.exceptions import TableNotFoundError
from prometheus_client import Counter, Gauge, Histogram

from tradingstack import api, backends, upkeep
from tradingstack.backends import Provisioner, S3Credentials, StackCredentials
from tradingstack.backends.jetstream import JetStreamProvisioner
from tradingstack.backends.s3 import S3Provisioner
from tradingstack.changes import BackendResult, Change
from tradingstack.credentials import ServerCredentials
from tradingstack.images import ImagePolicy
from tradingstack.kubeclient import KubeApiError, KubeClient
from tradingstack.lake import tables_at
from tradingstack.plan import (
    AUDIT_SUBJECT_PREFIX,
    InvalidSpecError,
    Plan,
    child_selector,
    plan_from_body,
    pod_selector,
)
from tradingstack.status import DeploymentState, Observation, Reason, build_status, parse_rfc3339, rfc3339
from tradingstack.workloads import WorkloadProvisioner, diff_object

log = logging.getLogger(__name__)

RECONCILES = Counter("tradingstack_reconciles_total", "Reconcile passes", ["result"])
RECONCILE_SECONDS = Histogram("tradingstack_reconcile_duration_seconds", "Duration of reconcile passes")
# delta-rs retries one S3 call for up to 3 minutes by default: an unreachable S3 fails an upkeep
# sooner (it runs again next interval) instead of holding a thread for minutes per call.
UPKEEP_MAX_RETRIES, UPKEEP_RETRY_TIMEOUT_SECONDS = 2, 20.0
UPKEEPS = Counter("tradingstack_lake_upkeeps_total", "Delta table upkeep runs", ["result"])
STATUS_WRITES = Counter("tradingstack_status_writes_total", "Status subresource writes")
AUDIT_FAILURES = Counter("tradingstack_audit_publish_failures_total",
                         "Operator actions that could not be appended to a stack's AUDIT stream")  # fmt: skip
STACK_READY = Gauge("tradingstack_stack_ready", "1 while a TradingStack's Ready condition is True, else 0",
                    ["namespace", "stack"])  # fmt: skip


def export_ready(namespace: str, name: str, status: dict[str, Any]) -> None:
    ready = [c for c in status.get("conditions") or [] if c.get("type") == "Ready"]
    if ready:
        STACK_READY.labels(namespace, name).set(1 if ready[0].get("status") == "True" else 0)


INFRA_CHANGES = Counter(
    "tradingstack_infra_changes_total", "Streams, buckets and tables created, updated or deleted", ["backend", "action"]
)


class PodsStillRunningError(Exception):
    """deletionPolicy Delete: the stack's pods have not all ended; its data is deleted after they have."""


class BackendsNotReadyError(Exception):
    """A backend was unreachable or failed; the pass is retried with backoff (status already says why)."""


BackendFactory = Callable[[Plan], list[Provisioner]]


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
    invalid_reason: Reason = Reason.INVALID_SPEC  # or ImageNotAllowed: the spec may not run here
    apply_error: KubeApiError | None = None
    status_written: bool = False
    backends: dict[str, BackendResult] = field(default_factory=dict)

    def infra_changes(self) -> list[Change]:
        return [c for r in self.backends.values() for c in r.changes]


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
            export_ready(namespace, name, new)
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
    return {state.name: state for state in map(DeploymentState.from_object, objects)}


def _secret_values(
    kube: KubeClient, namespace: str, name: str, keys: Iterable[str | None], field: str
) -> tuple[dict[str, str], str | None]:
    """The named keys of a Secret, decoded, or why they cannot be had. Values are never logged."""
    secret = kube.get("Secret", namespace, name)
    if secret is None:
        return {}, f"Secret {name} ({field}) not found in {namespace}"
    data = secret.get("data") or {}
    values = {}
    for key in filter(None, keys):
        if key not in data:
            return {}, f"Secret {name} ({field}) has no key {key!r}"
        try:
            values[key] = base64.b64decode(data[key]).decode()
        except (binascii.Error, UnicodeDecodeError):
            return {}, f"Secret {name} ({field}) holds an undecodable {key!r}"
    return values, None


def _ca_bundle(kube: KubeClient, namespace: str, tls: api.TLSSpec, server: str) -> tuple[str | None, str | None]:
    """The CA bundle (PEM) from the ConfigMap or Secret key tls.ca names, or why it cannot be had."""
    field = f"spec.infrastructure.{server}.tls.ca"
    if (ref := tls.ca.config_map_key_ref) is not None:
        config = kube.get("ConfigMap", namespace, ref.name)
        pem = ((config or {}).get("data") or {}).get(ref.key)
        return (pem, None) if pem else (None, f"ConfigMap {ref.name} ({field}) has no key {ref.key!r}")
    ref = tls.ca.secret_key_ref
    assert ref is not None
    values, problem = _secret_values(kube, namespace, ref.name, (ref.key,), field)
    return (values.get(ref.key), problem)


def stack_credentials(kube: KubeClient, plan: Plan) -> StackCredentials:
    """Credentials from the Secrets the spec's secretRefs name; a missing one blocks only its backend."""
    infra, namespace = plan.spec.infrastructure, plan.stack.namespace
    missing: dict[str, str] = {}
    found: dict[str, ServerCredentials] = {}
    servers: list[tuple[str, str, api.NatsEndpoint | api.QuestDBEndpoint | api.RedisEndpoint]] = [
        ("streams", "nats", infra.nats), ("tables", "questdb", infra.questdb), ("redis", "redis", infra.redis)
    ]  # fmt: skip
    for backend, server, endpoint in servers:
        ref = endpoint.secret_ref
        keys = (ref.username_key, ref.password_key, ref.token_key) if ref else (None, None, None)
        values: dict[str, str] = {}
        problem = ca = None
        if ref is not None:
            values, problem = _secret_values(kube, namespace, ref.name, keys, f"spec.infrastructure.{server}.secretRef")
        if endpoint.tls is not None and problem is None:
            ca, problem = _ca_bundle(kube, namespace, endpoint.tls, server)
        if problem:
            missing[backend] = problem
        elif ref is not None or ca is not None:
            user, password, token = (values.get(k) if k else None for k in keys)
            found[server] = ServerCredentials(user, password, token, ca_data=ca)
    s3 = None
    if (s3_ref := infra.s3.secret_ref) is not None:
        key_id, secret_key = s3_ref.access_key_id_key, s3_ref.secret_access_key_key
        values, problem = _secret_values(
            kube, namespace, s3_ref.name, (key_id, secret_key), "spec.infrastructure.s3.secretRef"
        )
        if problem:
            missing["buckets"] = problem
        else:
            s3 = S3Credentials(values[key_id], values[secret_key])
    return StackCredentials(s3=s3, missing=missing, **found)


class Reconciler:
    def __init__(
        self,
        kube: KubeClient,
        events: EventSink = no_events,
        backend_factory: BackendFactory | None = None,
        image_policy: ImagePolicy | None = None,
    ) -> None:
        self.kube = kube
        self.image_policy = image_policy or ImagePolicy()
        self.post_event = events
        self.events: EventSink = self.record
        self.workloads = WorkloadProvisioner(kube)
        self.status = StatusWriter(kube)
        self.backend_factory = backend_factory or self._provisioners

    def record(self, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """Post a Kubernetes event and, on a stack running the audit log, append it to the AUDIT stream
        (`audit.operator.{namespace}.{name}`). The audit copy never holds up or fails a pass."""
        self.post_event(body, type_, reason, message)
        try:
            plan = plan_from_body(body)
        except (InvalidSpecError, KeyError):
            return
        if api.ServiceName.AUDIT not in plan.spec.enabled_services():
            return
        meta = body["metadata"]
        action = {"ts": rfc3339(datetime.now(UTC)), "actor": "tradingstack-operator", "namespace": plan.stack.namespace,
                  "stack": plan.stack.name, "uid": meta.get("uid"), "generation": meta.get("generation"),
                  "type": type_, "reason": reason, "message": message}  # fmt: skip
        subject = f"{AUDIT_SUBJECT_PREFIX}.{plan.stack.namespace}.{plan.stack.name.replace('.', '_')}"
        try:
            nats = stack_credentials(self.kube, plan).nats
            publisher = JetStreamProvisioner(plan.spec.infrastructure.nats.url, connect_timeout=1.0, credentials=nats)
            publisher.publish(subject, json.dumps(action).encode(), uuid.uuid4().hex)
        except Exception as exc:  # NATS away: the Kubernetes event stands; the gap is counted and logged
            AUDIT_FAILURES.inc()
            log.warning("operator action %s on %s/%s not in the audit stream: %s", reason, plan.stack.namespace,
                        plan.stack.name, exc)  # fmt: skip

    def _provisioners(self, plan: Plan) -> list[Provisioner]:
        return backends.provisioners(plan, stack_credentials(self.kube, plan))

    def reconcile(self, body: dict[str, Any]) -> Outcome:
        """One full pass. After writing status, raises KubeApiError when applying children failed and
        BackendsNotReadyError when a backend was unreachable or failed; kopf retries both with backoff."""
        started = time.monotonic()
        meta = body["metadata"]
        namespace, name, generation = meta["namespace"], meta["name"], int(meta.get("generation") or 0)
        paused = bool((body.get("spec") or {}).get("paused"))
        try:
            plan = plan_from_body(body)
            outcome = Outcome(plan=plan)
            if (refusal := self.image_policy.refusal(plan)) is not None:  # nothing applied: what runs keeps running
                outcome = Outcome(plan=None, invalid_spec=refusal, invalid_reason=Reason.IMAGE_NOT_ALLOWED)
        except InvalidSpecError as exc:
            outcome = Outcome(plan=None, invalid_spec=str(exc))
        if outcome.invalid_spec is not None:
            self.events(body, "Warning", outcome.invalid_reason.value, outcome.invalid_spec)
            self._write(namespace, name, generation, outcome, paused)
            RECONCILES.labels("invalid").inc()
            return outcome

        if paused:
            outcome.status_written = self._write(namespace, name, generation, outcome, paused)
            RECONCILES.labels("paused").inc()
            return outcome

        provisioners = self.backend_factory(plan)
        # The Redis claim first: a stack whose database another stack holds runs no service there
        # (its exeq would fill the other stack's orders), so its workloads are not applied at all.
        for provisioner in provisioners:
            if provisioner.backend == "redis":
                outcome.backends["redis"] = backends.run(provisioner, plan)
        claim = outcome.backends.get("redis")
        if claim is not None and any(p.reason == "OwnedByAnotherStack" for p in claim.problems):
            self.events(body, "Warning", "OwnedByAnotherStack", "no service started: " + str(claim.problems[0]))
        else:
            try:
                outcome.changes = self.workloads.reconcile(plan)
            except KubeApiError as exc:
                outcome.apply_error = exc
                self.events(body, "Warning", "ApplyFailed", str(exc))
        # Infrastructure is reconciled even when the workloads failed: they do not depend on each other.
        for provisioner in provisioners:
            result = outcome.backends.get(provisioner.backend) or backends.run(provisioner, plan)
            outcome.backends[result.backend] = result
            for change in result.changes:
                INFRA_CHANGES.labels(result.backend, change.action).inc()
            for problem in result.problems:
                self.events(body, "Warning", problem.reason, str(problem))
        applied = outcome.changes + outcome.infra_changes()
        if applied:
            # One event per pass, not one per object: a first apply touches dozens of them.
            summary = ", ".join(str(c) for c in applied)
            self.events(body, "Normal", "Applied", f"{len(applied)} change(s): {summary}")
        outcome.status_written = self._write(namespace, name, generation, outcome, paused)
        RECONCILE_SECONDS.observe(time.monotonic() - started)
        if outcome.apply_error is not None:
            RECONCILES.labels("error").inc()
            raise outcome.apply_error
        failing = [
            r.unreachable or "; ".join(map(str, r.problems))
            for r in outcome.backends.values()
            if r.unreachable or any(p.reason == "ProvisionFailed" for p in r.problems)
        ]
        if failing:
            RECONCILES.labels("error").inc()
            raise BackendsNotReadyError("; ".join(failing))
        RECONCILES.labels("changed" if outcome.changes or outcome.infra_changes() else "unchanged").inc()
        return outcome

    def _write(self, namespace: str, name: str, generation: int, outcome: Outcome, paused: bool) -> bool:
        def compute(current: dict[str, Any]) -> dict[str, Any]:
            # Deployments are listed again here, after the (slow) infrastructure step: a status
            # computed from the list taken before it could overwrite a newer one with stale readiness.
            observation = Observation(
                generation=generation,
                plan=outcome.plan,
                deployments=self._deployment_states(outcome.plan) if outcome.plan else {},
                paused=paused,
                invalid_spec=outcome.invalid_spec,
                invalid_reason=outcome.invalid_reason,
                apply_error=str(outcome.apply_error) if outcome.apply_error else None,
                backends=outcome.backends or None,
            )
            return build_status(current.get("status"), observation)

        return self.status.write(namespace, name, compute)

    def _deployment_states(self, plan: Plan) -> dict[str, DeploymentState]:
        return deployment_states(self.kube.list("Deployment", plan.stack.namespace, child_selector(plan.stack.name)))

    def refresh_status(self, body: dict[str, Any], deployments: Callable[[], dict[str, DeploymentState]]) -> bool:
        """Recompute status from watched Deployments, keeping the last reconciled generation.

        `deployments` is called at write time, after the object is read, so a write that lost a
        race recomputes from newer data instead of overwriting newer status with an older view.
        """
        meta = body["metadata"]
        try:
            plan = plan_from_body(body)
        except InvalidSpecError:
            return False  # the reconcile reported it; nothing newer to say

        def compute(current: dict[str, Any]) -> dict[str, Any]:
            status = current.get("status") or {}
            if not status.get("observedGeneration"):
                return {}  # no full pass yet: it writes the first status, with its generation
            previous: dict[str, Any] = next(
                (c for c in status.get("conditions") or [] if c.get("type") == "Degraded"), {}
            )
            observation = Observation(
                generation=int(status.get("observedGeneration") or 0),
                plan=plan,
                deployments=deployments(),
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

    def upkeep(self, body: dict[str, Any], now: datetime | None = None) -> list[dict[str, Any]]:
        """Lake upkeep of the tables that are due (spec.lake.upkeep), each reported in status.lake and an
        event; returns the entries written. A table whose run fails is tried again next interval."""
        now = now or datetime.now(UTC)
        meta, spec = body["metadata"], body.get("spec") or {}
        if spec.get("paused") or meta.get("deletionTimestamp"):
            return []
        try:
            plan = plan_from_body(body)
        except InvalidSpecError:
            return []  # the full pass reports it
        lake = plan.spec.lake or api.Lake()
        known = {e.get("name"): e for e in (body.get("status") or {}).get("lake") or []}

        def due(path: str) -> bool:
            policy = lake.upkeep_for(path)
            last = parse_rfc3339(known.get(path, {}).get("lastUpkeep"))
            return policy.enabled and (last is None or (now - last).total_seconds() >= policy.interval_seconds)

        tables = tables_at(plan.lake_tables)  # the platform's, and the enabled services'
        # Most ticks find nothing due: then no Secret is read and no status is written.
        if not any(due(table.path) for table in tables):
            return []
        creds = stack_credentials(self.kube, plan)
        if "s3" in creds.missing:
            return []  # a missing Secret: the full pass reports it as SecretNotFound
        s3 = S3Provisioner(plan.spec.infrastructure.s3, creds.s3)
        entries = []
        options = s3.storage_options(UPKEEP_MAX_RETRIES, UPKEEP_RETRY_TIMEOUT_SECONDS)
        for table in tables:
            if not due(table.path):
                if table.path in known:
                    entries.append(known[table.path])
                continue
            policy = lake.upkeep_for(table.path)
            entry: dict[str, Any] = {"name": table.path, "lastUpkeep": rfc3339(now)}
            try:
                report = upkeep.run(table.uri(s3.endpoint.bucket), options, policy.target_file_size_bytes,
                                    policy.vacuum_retention_hours)  # fmt: skip
            except TableNotFoundError:
                continue  # not made yet: the full pass creates it
            except Exception as exc:  # S3 away, a commit refused five times: reported, tried next interval
                UPKEEPS.labels("failed").inc()
                said = str(exc) if creds.s3 is None else str(exc).replace(creds.s3.secret_access_key, "***")
                entry["message"] = f"failed: {type(exc).__name__}: {said[:400]}"
                self.events(body, "Warning", "LakeUpkeepFailed", f"{table.path}: {entry['message']}")
                entries.append(entry)
                continue
            UPKEEPS.labels("done").inc()
            entry |= {"files": report.files_after, "sizeBytes": report.size_bytes, "version": report.version,
                      "message": report.summary()}  # fmt: skip
            self.events(body, "Normal", "LakeUpkeep", f"{table.path}: {report.summary()}")
            entries.append(entry)
        if entries:
            self.status.write(meta["namespace"], meta["name"], lambda _: {"lake": entries})
        return entries

    def delete(self, body: dict[str, Any]) -> list[str]:
        """Finalizer: honour deletionPolicy. Returns what was deleted or retained, for the event."""
        policy = (body.get("spec") or {}).get("deletionPolicy", "Retain")
        meta = body.get("metadata") or {}
        with contextlib.suppress(KeyError):  # a stack that is gone is neither ready nor not
            STACK_READY.remove(meta.get("namespace") or "default", meta.get("name", ""))
        try:
            plan = plan_from_body(body)
        except InvalidSpecError:
            return []  # nothing was ever provisioned for an invalid spec
        if policy != "Delete":
            # The workloads go either way, deleted here rather than left to the garbage collector,
            # whose informer for a new kind can lag behind by its discovery resync (30 s and more).
            for (kind, obj_name), _obj in sorted(self.workloads.observe(plan).items()):
                self.kube.delete(kind, plan.stack.namespace, obj_name)
            kept = [f"stream {s.name}" for s in plan.streams] + [f"bucket {b}" for b in plan.buckets]
            kept += [f"table {t.name}" for t in plan.tables]
            self.events(body, "Normal", "Retained", "deletionPolicy Retain keeps " + ", ".join(kept))
            return kept
        deleted = []
        # Pods first: a pod still running would write again what is deleted (a Delta append and
        # QuestDB's line protocol both create tables), leaving orphans nothing deletes. So the
        # Deployments go, and the data only once no pod of the stack is left; until then the
        # finalizer holds and is retried.
        live = self.workloads.observe(plan)
        for (kind, obj_name), _obj in sorted(live.items()):
            if kind == "Deployment" and self.kube.delete(kind, plan.stack.namespace, obj_name):
                deleted.append(f"{kind}/{obj_name}")
        pods = [
            p
            for p in self.kube.list("Pod", plan.stack.namespace, pod_selector(plan.stack.name))
            if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
        ]  # ended: writes nothing
        if pods:
            removed = f"; removed {', '.join(deleted)}" if deleted else ""
            waiting = f"deletionPolicy Delete waits for {len(pods)} pod(s) to end before it deletes the data"
            self.events(body, "Normal", "Stopping", waiting + removed)
            raise PodsStillRunningError(f"{len(pods)} pod(s) of {plan.stack.name} still running")
        # Data next: if a backend is unreachable, the finalizer holds and the delete is retried.
        for provisioner in self.backend_factory(plan):
            for change in provisioner.delete(plan):
                INFRA_CHANGES.labels(provisioner.backend, "delete").inc()
                deleted.append(f"{change.kind}/{change.name}")
        for (kind, obj_name), _obj in sorted(live.items()):
            if kind != "Deployment" and self.kube.delete(kind, plan.stack.namespace, obj_name):
                deleted.append(f"{kind}/{obj_name}")
        # A finalizer run again after it succeeded (kopf retries a handler whose outcome it could not
        # record) finds nothing left: it says nothing, rather than a "removed nothing" that reads as
        # the outcome.
        if deleted:
            self.events(body, "Normal", "Deleted", "deletionPolicy Delete removed " + ", ".join(deleted))
        return deleted
