"""The operator on a real kube-apiserver (../shared/envtest): TradingStack apply -> Ready, and a no-op resync.

The operator runs as its container does (`tradingstack operator -A`), against real nats-server,
moto's S3 server and the QuestDB double. There is no kubelet in envtest: the bench plays it,
reporting each Deployment available as soon as it exists, so "Ready" measures the operator
(children, streams, buckets, tables, status), not image pulls. The no-op figures come from
the operator's own Prometheus counters over two drift checks.
"""

from __future__ import annotations

import base64
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import yaml

from bench.report import Measure
from bench.servers import free_port, nats_server, questdb_double, s3_server
from tradingstack import api
from tradingstack.kubeclient import KubeClient

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE, NAME = "bench", "bench"
DRIFT_SECONDS = 10  # the smallest interval the CRD allows


def envtest_dir() -> Path | None:
    path = Path(os.environ.get("TRADINGSTACK_ENVTEST", ROOT.parent / "shared" / "envtest"))
    return path if (path / "kube-up").exists() else None


@contextlib.contextmanager
def kube_api(envtest: Path) -> Iterator[str]:
    """A kube-apiserver without the controller manager (nothing else writes Deployment status)."""
    with tempfile.TemporaryDirectory() as root:
        result = subprocess.run([str(envtest / "kube-up"), root], env={**os.environ, "KCM": "0"},
                                capture_output=True, text=True, check=False)  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"kube-up failed: {result.stderr.strip()[-1000:]}")
        try:
            yield result.stdout.strip().splitlines()[-1]
        finally:
            subprocess.run([str(envtest / "kube-down"), root], capture_output=True, check=False)


def client(kubeconfig: str) -> KubeClient:
    config = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=config)  # type: ignore[no-untyped-call]
    return KubeClient(kubernetes.client.ApiClient(config))


def install(kube: KubeClient, s3_url: str, nats_url: str, questdb_url: str) -> dict[str, Any]:
    crd = yaml.safe_load((ROOT / "crds" / "tradingstack.io_tradingstacks.yaml").read_text())
    kube.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", body=crd)
    path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd['metadata']['name']}"
    deadline = time.monotonic() + 30
    while not any(c["type"] == "Established" and c["status"] == "True"
                  for c in (kube.request("GET", path).get("status") or {}).get("conditions") or []):  # fmt: skip
        if time.monotonic() > deadline:
            raise RuntimeError("the CRD was not established")
        time.sleep(0.1)
    kube.request("POST", "/api/v1/namespaces", body={"metadata": {"name": NAMESPACE}})
    secret = {"metadata": {"name": "lake"}, "data": {
        "AWS_ACCESS_KEY_ID": base64.b64encode(b"bench").decode(),
        "AWS_SECRET_ACCESS_KEY": base64.b64encode(b"bench-secret").decode(),
    }}  # fmt: skip
    kube.request("POST", f"/api/v1/namespaces/{NAMESPACE}/secrets", body=secret)
    return {
        "driftCheckIntervalSeconds": DRIFT_SECONDS,
        "infrastructure": {
            "nats": {"url": nats_url}, "questdb": {"url": questdb_url},
            "s3": {"endpoint": s3_url, "allowHttp": True, "secretRef": {"name": "lake"}},
        },
    }  # fmt: skip


def metrics(port: int) -> dict[str, float]:
    """The operator's counters: API writes in the bench namespace, infrastructure changes, status writes."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    totals = {"api_writes": 0.0, "infra_changes": 0.0, "status_writes": 0.0}
    for line in text.splitlines():
        if line.startswith("tradingstack_kube_api_writes_total{") and f'namespace="{NAMESPACE}"' in line:
            totals["api_writes"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("tradingstack_infra_changes_total{"):
            totals["infra_changes"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("tradingstack_status_writes_total "):
            totals["status_writes"] += float(line.rsplit(" ", 1)[1])
    return totals


def apply_until_ready(kube: KubeClient, spec: dict[str, Any]) -> tuple[float, float]:
    """Seconds from create to every child present, and to Ready=True, playing the kubelet meanwhile."""
    body = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": NAME}, "spec": spec}
    started = time.monotonic()
    kube.request("POST", KubeClient.path(api.KIND, NAMESPACE), body=body)
    children_at: float | None = None
    available: set[str] = set()
    labels = {"app.kubernetes.io/instance": NAME}
    while time.monotonic() - started < 120:
        deployments = kube.list("Deployment", NAMESPACE, labels)
        for deployment in deployments:
            name = deployment["metadata"]["name"]
            if name not in available:
                replicas = deployment["spec"].get("replicas", 1)
                status = {
                    "observedGeneration": deployment["metadata"]["generation"],
                    "replicas": replicas,
                    "updatedReplicas": replicas,
                    "readyReplicas": replicas,
                    "availableReplicas": replicas,
                }
                kube.merge_patch_status("Deployment", NAMESPACE, name, {"status": status})  # fmt: skip
                available.add(name)
        if children_at is None and len(deployments) == len(api.ServiceName):
            children_at = time.monotonic() - started
        stack = kube.get(api.KIND, NAMESPACE, NAME) or {}
        ready = [c for c in (stack.get("status") or {}).get("conditions") or [] if c["type"] == "Ready"]
        if ready and ready[0]["status"] == "True":
            return children_at or 0.0, time.monotonic() - started
        time.sleep(0.02)
    raise RuntimeError(f"not Ready in 120 s: {(kube.get(api.KIND, NAMESPACE, NAME) or {}).get('status')}")


def run(quick: bool, duration: float | None = None) -> list[Measure]:
    envtest = envtest_dir()
    if envtest is None:
        print("operator bench skipped: no ../shared/envtest (set TRADINGSTACK_ENVTEST)")
        return []
    metrics_port = free_port()
    checks = 1 if quick else 2
    with (
        nats_server() as nats_url, s3_server() as s3_url, questdb_double() as (questdb_url, _),
        kube_api(envtest) as kubeconfig, tempfile.TemporaryFile() as log,
    ):  # fmt: skip
        kube = client(kubeconfig)
        spec = install(kube, s3_url, nats_url, questdb_url)
        env = {**os.environ, "KUBECONFIG": kubeconfig, "TRADINGSTACK_RESYNC_TICK": "1"}
        operator = subprocess.Popen(
            [sys.executable, "-m", "tradingstack.cli", "operator", "-A", "--metrics-port", str(metrics_port),
             "--liveness", f"http://127.0.0.1:{free_port()}/healthz"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    metrics(metrics_port)
                    break
                except OSError:
                    if operator.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        raise RuntimeError(f"operator did not start: {log.read().decode()[-2000:]}") from None
                    time.sleep(0.2)
            children, ready = apply_until_ready(kube, spec)
            time.sleep(2)  # let the creation burst settle
            before = metrics(metrics_port)
            time.sleep(checks * DRIFT_SECONDS + 2)  # drift checks of children and infrastructure
            after = metrics(metrics_port)
        finally:
            operator.terminate()
            operator.wait(20)
            kube.close()
    noop = {k: after[k] - before[k] for k in before}
    return [
        Measure("apply -> children created", children, "s", None, note="24 objects, server-side apply"),
        Measure("apply -> Ready", ready, "s", None, target=5, lower_is_better=True,
                note="streams, consumers, bucket, Delta tables, QuestDB tables, status"),
        Measure("no-op resync API writes", noop["api_writes"] + noop["status_writes"], "writes", None, target=0,
                lower_is_better=True, note=f"over {checks * DRIFT_SECONDS + 2} s, {checks} drift check(s)"),
        Measure("no-op resync infra mutations", noop["infra_changes"], "changes", None, target=0,
                lower_is_better=True),
    ]  # fmt: skip
