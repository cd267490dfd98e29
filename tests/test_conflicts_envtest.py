"""Status writes against the real API server: optimistic concurrency and no-op skipping."""

from __future__ import annotations

from typing import Any

import pytest

from tradingstack.kubeclient import KubeClient
from tradingstack.reconciler import StatusWriter

from kubetools import create_stack, get_stack

pytestmark = [pytest.mark.envtest, pytest.mark.usefixtures("no_operator")]


def test_status_write_recomputes_after_a_409_conflict(kube: KubeClient, crd: dict[str, Any], namespace: str) -> None:
    create_stack(kube, namespace, "race", {"paused": True})
    seen: list[str] = []

    def compute(current: dict[str, Any]) -> dict[str, Any]:
        seen.append(current["metadata"]["resourceVersion"])
        if len(seen) == 1:  # another writer gets in between our read and our write
            kube.merge_patch_status("TradingStack", namespace, "race", {"status": {"phase": "Intruder"}})
        return {"phase": "Paused", "servicesReady": "0/8"}

    assert StatusWriter(kube).write(namespace, "race", compute) is True
    assert len(seen) >= 2, "the conflicting write was not detected"
    assert seen[0] != seen[1], "the retry did not read the object again"
    assert get_stack(kube, namespace, "race")["status"]["servicesReady"] == "0/8"


def test_status_write_is_skipped_when_nothing_changed(kube: KubeClient, crd: dict[str, Any], namespace: str) -> None:
    create_stack(kube, namespace, "same", {"paused": True})
    writer = StatusWriter(kube)
    assert writer.write(namespace, "same", lambda _: {"servicesReady": "x/y"}) is True
    before = get_stack(kube, namespace, "same")["metadata"]["resourceVersion"]
    assert writer.write(namespace, "same", lambda _: {"servicesReady": "x/y"}) is False
    assert get_stack(kube, namespace, "same")["metadata"]["resourceVersion"] == before
