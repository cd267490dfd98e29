"""Drift detection between a desired object and what the API server holds."""

from __future__ import annotations

from tradingstack.workloads import diff_object, first_difference, quantity


def test_server_defaults_are_not_drift() -> None:
    desired = {"spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "x", "image": "i"}]}}}}
    container = {"name": "x", "image": "i", "terminationMessagePath": "/dev/termination-log"}
    live = {
        "spec": {
            "replicas": 1,
            "strategy": {"type": "RollingUpdate"},
            "template": {"spec": {"containers": [container], "dnsPolicy": "ClusterFirst"}},
        }
    }
    assert first_difference(desired, live) is None


def test_changed_values_and_lists_are_drift() -> None:
    assert first_difference({"spec": {"replicas": 1}}, {"spec": {"replicas": 5}}) == ".spec.replicas"
    assert first_difference({"ports": [{"port": 80}]}, {"ports": [{"port": 80}, {"port": 81}]}) == ".ports"
    assert first_difference({"data": {"A": "1"}}, {"data": {}}) == ".data.A"


def test_canonical_quantities_are_the_same_value() -> None:
    desired = {"spec": {"containers": [{"resources": {"requests": {"cpu": "0.5", "memory": "1Gi"}}}]}}
    canonical = {"spec": {"containers": [{"resources": {"requests": {"cpu": "500m", "memory": "1024Mi"}}}]}}
    assert first_difference(desired, canonical) is None
    changed = {"spec": {"containers": [{"resources": {"requests": {"cpu": "250m", "memory": "1Gi"}}}]}}
    assert first_difference(desired, changed) == ".spec.containers[0].resources.requests.cpu"
    assert quantity("2k") == 2000
    assert quantity("1.5") == quantity("1500m")
    assert quantity("lots") is None


def test_a_configmap_key_the_plan_no_longer_has_is_drift() -> None:
    desired = {"kind": "ConfigMap", "apiVersion": "v1", "metadata": {"name": "s-risk"}, "data": {"A": "1"}}
    live = {"metadata": {"name": "s-risk", "resourceVersion": "7"}, "data": {"A": "1", "RISK_LIMITS": "[]"}}
    change = diff_object(desired, live)
    assert change is not None
    assert "RISK_LIMITS" in change.detail
    assert diff_object(desired, {"metadata": {"name": "s-risk"}, "data": {"A": "1"}}) is None
