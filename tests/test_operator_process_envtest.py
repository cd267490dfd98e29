"""`tradingstack operator` as a process, the way the container runs it."""

from __future__ import annotations

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
from kubetools import create_stack, wait_condition

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


@pytest.fixture
def operator_process(crd: dict[str, Any], namespace: str) -> Iterator[tuple[str, str]]:
    health, metrics = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tradingstack.cli", "operator", "--namespace", namespace,
         "--liveness", f"http://127.0.0.1:{health}/healthz", "--metrics-port", str(metrics)],
        env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{health}/healthz", f"http://127.0.0.1:{metrics}/metrics"
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert '"levelname"' in output or '"message"' in output, "operator logs are not JSON"


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
