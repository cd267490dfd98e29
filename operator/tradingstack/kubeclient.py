"""A small JSON client for the Kubernetes API.

It borrows configuration and authentication from the official `kubernetes` package
(kubeconfig or in-cluster) and speaks plain JSON, so objects stay the dicts the plan builds
and server-side apply works for any kind without typed models. Every write is counted per
verb and kind (Prometheus), which is how a no-op reconcile is shown to write nothing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import kubernetes
from prometheus_client import Counter

from tradingstack import api

API_WRITES = Counter(
    "tradingstack_kube_api_writes_total", "Write calls made to the Kubernetes API", ["verb", "kind", "namespace"]
)

_KIND_PATHS: dict[str, tuple[str, str]] = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "Service": ("/api/v1", "services"),
    "Secret": ("/api/v1", "secrets"),
    "Pod": ("/api/v1", "pods"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies"),
    api.KIND: (f"/apis/{api.API_VERSION}", api.PLURAL),
}


class KubeApiError(Exception):
    def __init__(self, status: int, method: str, path: str, body: str) -> None:
        self.status = status
        try:
            detail = json.loads(body).get("message", body)
        except (ValueError, AttributeError):
            detail = body
        super().__init__(f"{method} {path}: HTTP {status}: {detail}")
        self.detail = detail

    @property
    def retryable(self) -> bool:
        # Conflicts, throttling and server-side failures pass; other 4xx need a spec change.
        return self.status in (409, 429) or self.status >= 500


def load_config() -> kubernetes.client.Configuration:
    """Kubeconfig (KUBECONFIG or ~/.kube/config) outside a cluster, the service account inside."""
    config = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=config)
    except kubernetes.config.ConfigException:
        # Read KUBECONFIG now: the kubernetes package only looks at it when first imported.
        kubernetes.config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG") or None, client_configuration=config
        )
    return config


@dataclass
class KubeClient:
    client: kubernetes.client.ApiClient
    field_manager: str = "tradingstack-operator"
    timeout: float = 15.0

    @classmethod
    def from_environment(cls) -> KubeClient:
        return cls(kubernetes.client.ApiClient(load_config()))

    def close(self) -> None:
        self.client.close()

    @staticmethod
    def path(kind: str, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        prefix, plural = _KIND_PATHS[kind]
        path = f"{prefix}/namespaces/{quote(namespace)}/{plural}"
        if name:
            path += f"/{quote(name)}"
        if subresource:
            path += f"/{subresource}"
        return path

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        url_path = path + ("?" + urlencode(query) if query else "")
        headers = {"Accept": "application/json", "Content-Type": content_type}
        _, url, headers, _, _ = self.client.param_serialize(
            method, url_path, header_params=headers, auth_settings=["BearerToken"]
        )
        # The REST layer serialises dict bodies itself for JSON and YAML content types.
        response = self.client.call_api(method, url, headers, body, _request_timeout=self.timeout)
        data = response.read()
        if response.status >= 400:
            raise KubeApiError(response.status, method, path, data.decode(errors="replace"))
        return json.loads(data) if data else None

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self.request("GET", self.path(kind, namespace, name))
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise
        return result

    def list(self, kind: str, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        result = self.request("GET", self.path(kind, namespace), query={"labelSelector": selector})
        items: list[dict[str, Any]] = result.get("items", [])
        for item in items:  # list items come without apiVersion/kind
            item.setdefault("kind", kind)
        return items

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply: creates when missing, takes over fields others changed."""
        meta = obj["metadata"]
        API_WRITES.labels("apply", obj["kind"], meta["namespace"]).inc()
        result: dict[str, Any] = self.request(
            "PATCH",
            self.path(obj["kind"], meta["namespace"], meta["name"]),
            body=obj,
            query={"fieldManager": self.field_manager, "force": "true"},
            content_type="application/apply-patch+yaml",
        )
        return result

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        API_WRITES.labels("delete", kind, namespace).inc()
        try:
            self.request("DELETE", self.path(kind, namespace, name), body={"propagationPolicy": "Background"})
        except KubeApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def merge_patch_status(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        API_WRITES.labels("patch-status", kind, namespace).inc()
        result: dict[str, Any] = self.request(
            "PATCH",
            self.path(kind, namespace, name, "status"),
            body=patch,
            content_type="application/merge-patch+json",
        )
        return result
