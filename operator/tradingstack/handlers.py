"""kopf entry points. Thin on purpose: load the object, call the Reconciler, map errors.

Importing this module registers the handlers in kopf's default registry.
Handlers are sync functions (kopf runs them in its thread pool) because the Kubernetes
client is blocking; kopf serialises handlers of one object, so there is one reconcile per
TradingStack at a time, while child-event handlers may overlap it (every write is
idempotent server-side apply, and status writes carry a resourceVersion precondition).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import kopf
import kubernetes

from tradingstack import api
from tradingstack.changes import UnreachableError
from tradingstack.images import ImagePolicy
from tradingstack.kubeclient import KubeApiError, KubeClient, load_config
from tradingstack.plan import LABEL_MANAGED_BY, MANAGER
from tradingstack.reconciler import BackendsNotReadyError, PodsStillRunningError, Reconciler
from tradingstack.status import DeploymentState

STACKS = (api.GROUP, api.VERSION, api.PLURAL)
MANAGED = {LABEL_MANAGED_BY: MANAGER}
# How often the timer wakes to see whether a stack's drift check (spec.driftCheckIntervalSeconds) is due.
RESYNC_TICK = float(os.environ.get("TRADINGSTACK_RESYNC_TICK", "5"))
MAX_BACKOFF = 300.0
# How often a deletion waiting for the stack's pods to end looks again.
POD_WAIT_SECONDS = 2.0
# How often the upkeep timer wakes to see which tables are due (spec.lake.upkeep.intervalSeconds).
UPKEEP_TICK = float(os.environ.get("TRADINGSTACK_UPKEEP_TICK", "60"))


def backoff(retry: int) -> float:
    """Exponential retry delay: 1, 2, 4 ... seconds, capped at five minutes."""
    return min(2.0**retry, MAX_BACKOFF)


def post_event(body: dict[str, Any], type_: str, reason: str, message: str) -> None:
    # kopf only reads apiVersion, kind and metadata of the body it is given; a plain dict serves.
    kopf.event(cast(kopf.Body, body), type=type_, reason=reason, message=message[:1024])


def _owner_name(body: dict[str, Any]) -> str | None:
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == api.KIND and ref.get("apiVersion", "").startswith(api.GROUP + "/"):
            return str(ref["name"])
    return None


def connection_info(config: kubernetes.client.Configuration) -> kopf.ConnectionInfo:
    """kopf's connection from the kubernetes client's configuration (kubeconfig or in-cluster).

    The client keeps the token with its scheme in front, "Bearer <t>" from a kubeconfig and
    "bearer <t>" in a pod; kopf adds the scheme itself, so only the bare token is passed on.
    """
    keys = config.api_key or {}
    stored = str(keys.get("BearerToken") or keys.get("authorization") or "").strip()
    scheme, _, rest = stored.partition(" ")
    token = rest.strip() if scheme.lower() == "bearer" and rest else stored
    return kopf.ConnectionInfo(
        server=config.host,
        ca_path=config.ssl_ca_cert,
        insecure=not config.verify_ssl,
        scheme="Bearer" if token else None,
        token=token or None,
        certificate_path=config.cert_file,
        private_key_path=config.key_file,
        default_namespace=None,
    )


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    """kopf connects with the same credentials as the operator's own client."""
    return connection_info(load_config())


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Keep kopf's bookkeeping in annotations so status holds only the documented schema.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="tradingstack.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="tradingstack.io", key="last-handled-configuration"
    )
    settings.persistence.finalizer = "tradingstack.io/finalizer"
    settings.posting.level = logging.INFO
    settings.execution.max_workers = 8
    settings.watching.server_timeout = 300
    # Serve the namespaces given and the CRD present at start; watching namespaces and CRDs would take
    # cluster-wide list/watch rights the chart's Role does not grant (kopf retried them with 403s).
    settings.scanning.disabled = True
    memo.kube = KubeClient.from_environment()
    memo.reconciler = Reconciler(memo.kube, events=post_event, image_policy=ImagePolicy.from_environment())
    memo.last_full_pass = {}


@kopf.on.cleanup()
def close(memo: kopf.Memo, **_: Any) -> None:
    kube = getattr(memo, "kube", None)
    if kube is not None:
        kube.close()


@kopf.index(*STACKS)
def stacks(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[tuple[str | None, str], dict[str, Any]]:
    return {(namespace, name): dict(body)}


@kopf.index("apps", "v1", "deployments", labels=MANAGED)
def stack_deployments(
    namespace: str | None, body: kopf.Body, **_: Any
) -> dict[tuple[str | None, str], DeploymentState] | None:
    owner = _owner_name(dict(body))
    return {(namespace, owner): DeploymentState.from_object(dict(body))} if owner else None


def _full_pass(memo: kopf.Memo, body: dict[str, Any], retry: int) -> None:
    meta = body["metadata"]
    memo.last_full_pass[(meta["namespace"], meta["name"])] = time.monotonic()
    try:
        memo.reconciler.reconcile(body)
    except (KubeApiError, BackendsNotReadyError) as exc:
        raise kopf.TemporaryError(str(exc), delay=backoff(retry)) from exc


@kopf.on.resume(*STACKS)
@kopf.on.create(*STACKS)
@kopf.on.update(*STACKS)
def reconcile(body: kopf.Body, retry: int, memo: kopf.Memo, **_: Any) -> None:
    _full_pass(memo, dict(body), retry)


@kopf.timer(*STACKS, interval=RESYNC_TICK, initial_delay=RESYNC_TICK)
def drift_check(body: kopf.Body, spec: kopf.Spec, memo: Any, **_: Any) -> None:
    key = (body["metadata"]["namespace"], body["metadata"]["name"])
    interval = float(spec.get("driftCheckIntervalSeconds", 60))
    if time.monotonic() - memo.last_full_pass.get(key, 0.0) >= interval:
        _full_pass(memo, dict(body), retry=0)  # a failed check simply runs again next interval


# Upkeep runs minutes on a big table: on threads of its own, not kopf's pool (reconciles keep theirs),
# and not waited for when the operator stops (the next start finds the table not due, or runs it).
UPKEEP_THREADS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lake-upkeep")


@kopf.timer(*STACKS, interval=UPKEEP_TICK, initial_delay=UPKEEP_TICK)
async def lake_upkeep(body: kopf.Body, memo: Any, **_: Any) -> None:
    """Compaction, checkpoint and vacuum of the stack's Delta tables when due. kopf never runs one
    timer of an object twice at once; the drift check is another timer."""
    # In this handler's context: kopf.event (the upkeep's events) reads kopf's settings from it.
    run = functools.partial(contextvars.copy_context().run, memo.reconciler.upkeep, dict(body))
    await asyncio.get_running_loop().run_in_executor(UPKEEP_THREADS, run)


@kopf.on.delete(*STACKS)
def finalize(body: kopf.Body, retry: int, memo: kopf.Memo, **_: Any) -> None:
    try:
        memo.reconciler.delete(dict(body))
    except PodsStillRunningError as exc:
        raise kopf.TemporaryError(str(exc), delay=POD_WAIT_SECONDS) from exc
    except (KubeApiError, UnreachableError) as exc:
        raise kopf.TemporaryError(str(exc), delay=backoff(retry)) from exc
    memo.last_full_pass.pop((body["metadata"]["namespace"], body["metadata"]["name"]), None)


# kopf passes indices as keyword arguments by name, which its handler protocols cannot express.
@kopf.on.event("apps", "v1", "deployments", labels=MANAGED)
@kopf.on.event("v1", "services", labels=MANAGED)
@kopf.on.event("v1", "configmaps", labels=MANAGED)  # type: ignore[arg-type]
def child_changed(
    event: kopf.RawEvent,
    body: kopf.Body,
    namespace: str | None,
    memo: Any,
    stacks: kopf.Index[tuple[str | None, str], dict[str, Any]],
    stack_deployments: kopf.Index[tuple[str | None, str], DeploymentState],
    **_: Any,
) -> None:
    child = dict(body)
    owner = _owner_name(child)
    if owner is None or (namespace, owner) not in stacks:
        return
    parent = next(iter(stacks[(namespace, owner)]))
    kind, name = child.get("kind") or "", child["metadata"]["name"]
    live = None if event.get("type") == "DELETED" else child
    try:
        memo.reconciler.repair_child(parent, kind, name, live)
        if kind == "Deployment":

            def states() -> dict[str, DeploymentState]:
                return {s.name: s for s in stack_deployments.get((namespace, owner), [])}

            memo.reconciler.refresh_status(parent, states)
    except KubeApiError as exc:
        # The next full pass retries with backoff; a watch handler must not wedge the stream.
        logging.getLogger(__name__).warning("child %s/%s: %s", kind, name, exc)


@kopf.on.probe(id="kubernetes")
def kubernetes_reachable(memo: kopf.Memo, **_: Any) -> str:
    memo.kube.request("GET", "/version")
    return "ok"
