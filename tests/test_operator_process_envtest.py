"""`tradingstack operator` as a process, the way the container runs it."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tradingstack.kubeclient import KubeClient

from conftest import wait_for
from kubetools import create_stack, events_for, wait_condition

pytestmark = pytest.mark.envtest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except OSError:
        return 0, ""


@contextlib.contextmanager
def running_operator(namespace: str, *flags: str) -> Iterator[tuple[str, str]]:
    health, metrics = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tradingstack.cli", "operator", "--namespace", namespace,
         "--liveness", f"http://127.0.0.1:{health}/healthz", "--metrics-port", str(metrics), *flags],
        env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{health}/healthz", f"http://127.0.0.1:{metrics}/metrics"
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert '"levelname"' in output or '"message"' in output, "operator logs are not JSON"


@pytest.fixture
def operator_process(crd: dict[str, Any], namespace: str) -> Iterator[tuple[str, str]]:
    with running_operator(namespace) as endpoints:
        yield endpoints


def test_an_operator_with_allowed_repositories_refuses_other_images(
    kube: KubeClient, crd: dict[str, Any], no_operator: None, namespace: str
) -> None:
    """The confused deputy, bounded: an editor of TradingStacks cannot run an image from elsewhere."""
    with running_operator(namespace, "--allowed-image-repository", "ghcr.io/tradingstack"):
        create_stack(kube, namespace, "evil", {"services": {"oms": {"image": "ghcr.io/tradingstack-evil/miner:1"}}})
        stack = wait_condition(kube, namespace, "evil", "Degraded", "True", "ImageNotAllowed")
        degraded = next(c for c in stack["status"]["conditions"] if c["type"] == "Degraded")
        assert "ghcr.io/tradingstack-evil/miner:1" in degraded["message"]
        assert stack["status"]["phase"] == "Failed"
        assert [e["reason"] for e in events_for(kube, namespace, "evil")] == ["ImageNotAllowed"]
        create_stack(kube, namespace, "allowed", {})  # the default image is ghcr.io/tradingstack/tradingstack
        wait_for(lambda: kube.list("Deployment", namespace, {"app.kubernetes.io/instance": "allowed"}), 30,
                 "the allowed stack's Deployments")  # fmt: skip
        assert kube.list("Deployment", namespace, {"app.kubernetes.io/instance": "evil"}) == []


def test_operator_process_serves_liveness_and_metrics(
    kube: KubeClient, namespace: str, operator_process: tuple[str, str]
) -> None:
    liveness, metrics = operator_process
    _status, body = wait_for(lambda: (r := fetch(liveness))[0] == 200 and r, what="liveness endpoint")
    assert "kubernetes" in body  # the probe that checks the API server

    create_stack(kube, namespace, "proc", {})
    wait_condition(kube, namespace, "proc", "ServicesReady", "False", "ServicesNotReady")
    _, text = wait_for(lambda: (r := fetch(metrics)) and "tradingstack_reconciles_total{" in r[1] and r)
    # The in-process operator of other tests may be watching too, so count passes, not writes.
    passes = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "tradingstack_reconciles_total"
    ]
    assert sum(passes) >= 1, text
