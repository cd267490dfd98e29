"""Small helpers the envtest tests share: create stacks, read conditions, fake a kubelet."""

from __future__ import annotations

from typing import Any

from tradingstack import api
from tradingstack.kubeclient import KubeApiError, KubeClient

from conftest import wait_for

CHILD_KINDS = ("ConfigMap", "Service", "Deployment")


def stack_path(namespace: str, name: str | None = None) -> str:
    return KubeClient.path(api.KIND, namespace, name)


def create_stack(kube: KubeClient, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    body = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": name}, "spec": spec}
    result: dict[str, Any] = kube.request("POST", stack_path(namespace), body=body)
    return result


def patch_spec(kube: KubeClient, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = kube.request(
        "PATCH", stack_path(namespace, name), body={"spec": spec}, content_type="application/merge-patch+json"
    )
    return result


def get_stack(kube: KubeClient, namespace: str, name: str) -> dict[str, Any]:
    stack = kube.get(api.KIND, namespace, name)
    assert stack is not None, f"TradingStack {namespace}/{name} is gone"
    return stack


def condition(stack: dict[str, Any], type_: str) -> dict[str, Any]:
    for cond in (stack.get("status") or {}).get("conditions") or []:
        if cond["type"] == type_:
            return dict(cond)
    return {}


def wait_condition(
    kube: KubeClient, namespace: str, name: str, type_: str, status: str, reason: str | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:  # fmt: skip
    def check() -> dict[str, Any] | None:
        stack = get_stack(kube, namespace, name)
        cond = condition(stack, type_)
        if cond.get("status") == status and (reason is None or cond.get("reason") == reason):
            return stack
        return None

    return wait_for(check, timeout, f"{type_}={status} ({reason}) on {namespace}/{name}")


def children(kube: KubeClient, namespace: str, stack: str) -> dict[tuple[str, str], dict[str, Any]]:
    labels = {"app.kubernetes.io/instance": stack}
    return {(kind, o["metadata"]["name"]): o for kind in CHILD_KINDS for o in kube.list(kind, namespace, labels)}


def wait_children(kube: KubeClient, namespace: str, stack: str, count: int) -> dict[tuple[str, str], dict[str, Any]]:
    return wait_for(
        lambda: (found := children(kube, namespace, stack)) and len(found) == count and found,
        what=f"{count} children of {stack}",
    )


def set_available(kube: KubeClient, namespace: str, name: str, available: bool = True) -> None:
    """Play the kubelet and the Deployment controller: report the rollout done (or not)."""
    deployment = kube.get("Deployment", namespace, name)
    assert deployment is not None, f"Deployment {name} missing"
    replicas = deployment["spec"].get("replicas", 1)
    ready = replicas if available else 0
    status = {
        "observedGeneration": deployment["metadata"]["generation"],
        "replicas": replicas,
        "updatedReplicas": replicas,
        "readyReplicas": ready,
        "availableReplicas": ready,
        "unavailableReplicas": replicas - ready,
    }
    kube.merge_patch_status("Deployment", namespace, name, {"status": status})


def set_all_available(kube: KubeClient, namespace: str, stack: str) -> None:
    for (kind, name), _ in children(kube, namespace, stack).items():
        if kind == "Deployment":
            set_available(kube, namespace, name)


def events_for(kube: KubeClient, namespace: str, name: str) -> list[dict[str, Any]]:
    result = kube.request(
        "GET", f"/api/v1/namespaces/{namespace}/events",
        query={"fieldSelector": f"involvedObject.name={name},involvedObject.kind={api.KIND}"},
    )  # fmt: skip
    items: list[dict[str, Any]] = result.get("items", [])
    return items


def api_error(call: Any) -> KubeApiError:
    try:
        call()
    except KubeApiError as exc:
        return exc
    raise AssertionError("the API server accepted it")
