"""API faults a real server will not produce on demand (HTTP 500s), injected with kmock.

The real kube-apiserver tests cover quotas (403, retried until they clear) and conflicts
(409); here kmock answers server-side apply with 500 and we check the provisioner stops and
reports a retryable error, and the handler turns it into a kopf retry with exponential
backoff.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
import kubernetes
import pytest

from tradingstack.handlers import _full_pass, backoff
from tradingstack.kubeclient import KubeApiError, KubeClient
from tradingstack.plan import StackRef, build_plan, parse_spec
from tradingstack.workloads import WorkloadProvisioner


def client_for(url: str) -> KubeClient:
    config = kubernetes.client.Configuration()
    config.host = url.rstrip("/")
    config.api_key = {"BearerToken": "Bearer test"}
    return KubeClient(kubernetes.client.ApiClient(config), field_manager="tests", timeout=5)


async def test_apply_500_is_reported_as_retryable(kmock: Any) -> None:
    plan = build_plan(StackRef("demo", "ns", "uid-1", 1), parse_spec({}))
    resources = {"ConfigMap": "v1/configmaps", "Service": "v1/services", "Deployment": "apps/v1/deployments",
                 "NetworkPolicy": "networking.k8s.io/v1/networkpolicies"}  # fmt: skip
    for resource in resources.values():
        kmock.resources[resource] = {}
    for obj in plan.objects:  # every child exists but has drifted: the pass must patch them all
        kmock.objects[resources[obj["kind"]], "ns", obj["metadata"]["name"]] = {"metadata": obj["metadata"]}
    kmock["patch"] << 500 << {"kind": "Status", "message": "etcdserver: leader changed", "code": 500}
    kube = client_for(str(kmock.url))

    with pytest.raises(KubeApiError) as failure:
        await asyncio.to_thread(WorkloadProvisioner(kube).reconcile, plan)
    assert failure.value.status == 500
    assert failure.value.retryable
    assert "leader changed" in str(failure.value)
    # It stopped at the first failure instead of hammering the server with the other 32 objects.
    assert len(list(kmock["patch"])) == 1


def test_client_errors_are_not_retryable() -> None:
    assert not KubeApiError(422, "PATCH", "/x", '{"message": "invalid"}').retryable
    assert KubeApiError(409, "PATCH", "/x", "{}").retryable
    assert KubeApiError(429, "PATCH", "/x", "{}").retryable


class FailingReconciler:
    def reconcile(self, body: dict[str, Any]) -> None:
        raise KubeApiError(503, "PATCH", "/apis/apps/v1/...", '{"message": "unavailable"}')


@pytest.mark.parametrize(("retry", "delay"), [(0, 1.0), (3, 8.0), (20, 300.0)])
def test_api_errors_become_kopf_retries_with_exponential_backoff(retry: int, delay: float) -> None:
    memo = kopf.Memo(reconciler=FailingReconciler(), last_full_pass={})
    body = {"metadata": {"namespace": "ns", "name": "demo"}}
    with pytest.raises(kopf.TemporaryError) as raised:
        _full_pass(memo, body, retry)
    assert raised.value.delay == delay == backoff(retry)
    assert "unavailable" in str(raised.value)
