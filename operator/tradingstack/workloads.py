"""Kubernetes provisioner: the plan's ConfigMaps, Services and Deployments.

Same verbs as every backend: observe (what exists), diff (what differs, readable), apply.
Drift is "a field the plan sets has another value live"; fields the server defaults or other
controllers own are not ours to fight, so a steady state reads and writes nothing.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from tradingstack.changes import Change
from tradingstack.kubeclient import KubeClient
from tradingstack.plan import Plan, child_selector

KINDS = ("NetworkPolicy", "ConfigMap", "Service", "Deployment")


_QUANTITY_SUFFIXES = {
    "m": Decimal("0.001"), "": Decimal(1), "k": Decimal(10**3), "M": Decimal(10**6), "G": Decimal(10**9),
    "T": Decimal(10**12), "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30), "Ti": Decimal(2**40),
}  # fmt: skip


def quantity(text: str) -> Decimal | None:
    """A Kubernetes resource quantity's value ("500m" == "0.5"), or None when it is not one."""
    for suffix in sorted(_QUANTITY_SUFFIXES, key=len, reverse=True):
        if suffix and text.endswith(suffix):
            number = text[: -len(suffix)]
            break
    else:
        suffix, number = "", text
    try:
        return Decimal(number) * _QUANTITY_SUFFIXES[suffix]
    except InvalidOperation:
        return None


def first_difference(desired: Any, live: Any, path: str = "") -> str | None:
    """Where `live` does not carry what `desired` says, or None when it does.

    Maps: every desired key must match (extra live keys are server defaults). Lists: same
    length, item by item, since the plan's lists (containers, ports) are ordered.
    """
    if isinstance(desired, dict):
        if not isinstance(live, dict):
            return path or "."
        for key, value in desired.items():
            found = first_difference(value, live.get(key), f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(desired, list):
        if not isinstance(live, list) or len(live) != len(desired):
            return path
        for i, (d, v) in enumerate(zip(desired, live, strict=True)):
            found = first_difference(d, v, f"{path}[{i}]")
            if found:
                return found
        return None
    if desired != live:
        # The API server rewrites quantities to canonical form ("0.5" -> "500m"): same value, no drift.
        if ".resources." in path and isinstance(desired, str) and isinstance(live, str):
            value = quantity(desired)
            if value is not None and value == quantity(live):
                return None
        return path
    return None


def _owned_by(obj: dict[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj.get("metadata", {}).get("ownerReferences") or [])


def diff_object(desired: dict[str, Any], live: dict[str, Any] | None) -> Change | None:
    name = desired["metadata"]["name"]
    if live is None:
        return Change("create", desired["kind"], name)
    # apiVersion/kind are not echoed on list items; compare what the plan owns.
    owned = {k: v for k, v in desired.items() if k not in ("apiVersion", "kind")}
    where = first_difference(owned, live)
    if where:
        return Change("update", desired["kind"], name, f"{where.lstrip('.')} differs")
    if desired["kind"] == "ConfigMap":
        # Every key of a ConfigMap is ours (the server adds none): one the plan dropped must go, or the
        # pods the checksum rolls would start with it. Server-side apply removes what we stop applying.
        extra = sorted(set(live.get("data") or {}) - set(desired.get("data") or {}))
        if extra:
            return Change("update", desired["kind"], name, f"data.{', data.'.join(extra)} not in the spec")
    return None


class WorkloadProvisioner:
    def __init__(self, kube: KubeClient) -> None:
        self.kube = kube

    def observe(self, plan: Plan) -> dict[tuple[str, str], dict[str, Any]]:
        live = {}
        for kind in KINDS:
            for obj in self.kube.list(kind, plan.stack.namespace, child_selector(plan.stack.name)):
                live[(kind, obj["metadata"]["name"])] = obj
        return live

    def diff(self, plan: Plan, live: dict[tuple[str, str], dict[str, Any]]) -> list[Change]:
        changes = [
            change
            for obj in plan.objects
            if (change := diff_object(obj, live.get((obj["kind"], obj["metadata"]["name"])))) is not None
        ]
        wanted = plan.object_keys()
        for (kind, name), obj in sorted(live.items()):
            # Only prune what this TradingStack owns; a same-labelled stranger is left alone.
            if (kind, name) not in wanted and _owned_by(obj, plan.stack.uid):
                changes.append(Change("delete", kind, name, "no longer in the spec"))
        return changes

    def apply(self, plan: Plan, changes: list[Change]) -> None:
        by_key = {(o["kind"], o["metadata"]["name"]): o for o in plan.objects}
        for change in changes:
            if change.action == "delete":
                self.kube.delete(change.kind, plan.stack.namespace, change.name)
            else:
                self.kube.apply(by_key[(change.kind, change.name)])

    def reconcile(self, plan: Plan) -> list[Change]:
        """Observe, diff, apply; returns the changes made."""
        changes = self.diff(plan, self.observe(plan))
        self.apply(plan, changes)
        return changes
