"""The platform on a real cluster, the way a user brings it up: `make up` (hack/up.sh) with
CLUSTER=current into the single-node cluster of ../shared/cluster (kubelet, containerd, DNS,
kube-proxy: pods really run, probes are really called), then orders and ticks through Services.

Runs when the cluster kit (TRADINGSTACK_CLUSTER_KIT) and a Docker engine are there; CI sets
TRADINGSTACK_REQUIRE_CLUSTER=1 so that it fails instead of skipping. TRADINGSTACK_CLUSTER_DIR
reuses a cluster that `cluster-up DIR` already runs (the kit allows one per machine); otherwise
the test starts its own, with RBAC enforced (`AUTHZ=RBAC`), and stops it at the end. The cases
share that one install, in order.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from deltalake import DeltaTable, QueryBuilder

from tradingstack.lake import MARKET_TICKS, storage_options

from conftest import http_json, wait_for

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "tradingstack-e2e"
RELEASE = "tse2e"
STACK = "demo"
SERVICES = ["gateway", "normalizer", "sink-ticks", "sink-alt", "risk", "oms", "exeq", "pnl"]


def _unavailable(why: str) -> None:
    if os.environ.get("TRADINGSTACK_REQUIRE_CLUSTER") == "1":
        pytest.fail(f"TRADINGSTACK_REQUIRE_CLUSTER=1 but {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(kubeconfig, cluster DIR) of a running single-node cluster."""
    kit = os.environ.get("TRADINGSTACK_CLUSTER_KIT")
    if not kit or not (Path(kit) / "cluster-up").exists():
        _unavailable("no cluster kit: set TRADINGSTACK_CLUSTER_KIT=../shared/cluster (`make test` does)")
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        _unavailable("no Docker engine answers (apt-get install docker.io; start dockerd)")
    reuse = os.environ.get("TRADINGSTACK_CLUSTER_DIR")
    if reuse:
        yield str(Path(reuse) / "kubeconfig"), Path(reuse)
        return
    directory = tmp_path_factory.mktemp("cluster")
    # RBAC enforced: the operator's pod gets exactly what the chart's Role grants its ServiceAccount.
    started = subprocess.run([f"{kit}/cluster-up", str(directory)], capture_output=True, text=True, timeout=900,
                             env={**os.environ, "AUTHZ": "RBAC"})  # fmt: skip
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
    try:
        yield started.stdout.strip().splitlines()[-1], directory
    finally:
        subprocess.run([f"{kit}/cluster-down", str(directory)], capture_output=True, timeout=300)


class Cluster:
    def __init__(self, kubeconfig: str, directory: Path) -> None:
        self.env = {**os.environ, "KUBECONFIG": kubeconfig}
        self.directory = directory

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        result = subprocess.run(["kubectl", "-n", NAMESPACE, *args], env=self.env, capture_output=True, text=True,
                                timeout=timeout)  # fmt: skip
        if check:
            assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json"))

    def helm(self, *args: str) -> str:
        helm = subprocess.run([str(ROOT / "hack" / "ensure-helm.sh")], capture_output=True, text=True, check=True)
        result = subprocess.run([helm.stdout.strip(), *args, "-n", NAMESPACE], env=self.env, capture_output=True,
                                text=True, timeout=600)  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout

    def conditions(self) -> dict[str, dict[str, Any]]:
        stack = self.json("tradingstack", STACK)
        return {c["type"]: c for c in stack.get("status", {}).get("conditions", [])}

    def deployments(self) -> dict[str, dict[str, Any]]:
        items = self.json("deployments", "-l", f"app.kubernetes.io/instance={STACK}")["items"]
        return {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in items}

    def all_available(self) -> bool:
        deployments = self.deployments()
        return set(deployments) == set(SERVICES) and all(
            d["status"].get("updatedReplicas") == d["spec"]["replicas"] == d["status"].get("availableReplicas")
            and d["status"].get("observedGeneration") == d["metadata"]["generation"]
            and not d["status"].get("unavailableReplicas")
            for d in deployments.values()
        )

    def ready(self) -> bool:
        ready = self.conditions().get("Ready", {})
        generation = self.json("tradingstack", STACK)["metadata"]["generation"]
        return ready.get("status") == "True" and ready.get("observedGeneration") == generation

    @contextmanager
    def forward(self, service: str, port: int) -> Iterator[str]:
        """`kubectl port-forward svc/NAME :PORT`: the base URL on the host's loopback."""
        command = ["kubectl", "-n", NAMESPACE, "port-forward", f"svc/{service}", f":{port}"]
        process = subprocess.Popen(command, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            found = re.search(r"127\.0\.0\.1:(\d+)", line)
            assert found, f"port-forward to {service}:{port} said {line!r}"
            yield f"127.0.0.1:{found[1]}"
        finally:
            process.terminate()
            process.wait(10)


def http(url: str, body: Any = None) -> tuple[int, Any]:
    return http_json(f"http://{url}", body)


@pytest.fixture(scope="module")
def cluster(kubeconfig: tuple[str, Path]) -> Iterator[Cluster]:
    """`make up` on the current cluster with the local infrastructure stand-ins, timed."""
    path, directory = kubeconfig
    cluster = Cluster(path, directory)
    started = time.monotonic()
    kit = os.environ["TRADINGSTACK_CLUSTER_KIT"]
    env = {**cluster.env, "CLUSTER": "current", "IMAGE_LOAD": f"{kit}/cluster-load {directory}", "LOCAL_INFRA": "1",
           "NAMESPACE": NAMESPACE, "RELEASE": RELEASE, "TIMEOUT": "6m"}  # fmt: skip
    up = subprocess.run([str(ROOT / "hack" / "up.sh")], env=env, capture_output=True, text=True, timeout=900)
    assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:]
    print(f"make up (current cluster, LOCAL_INFRA=1) took {time.monotonic() - started:.0f} s")
    yield cluster
    cluster.kubectl("delete", "tradingstack", "--all", "--wait", "--timeout=3m", check=False, timeout=240)
    cluster.helm("uninstall", RELEASE, "--wait")
    cluster.kubectl("delete", "pvc", "--all", "--wait=false", check=False)
    subprocess.run(["kubectl", "delete", "namespace", NAMESPACE, "--wait=false"], env=cluster.env, check=False)


def test_make_up_reaches_ready_with_every_deployment_available(cluster: Cluster) -> None:
    assert cluster.ready()
    wait_for(cluster.all_available, 120, "every Deployment available")
    table = cluster.kubectl("get", "tradingstack", STACK)
    header, row = table.splitlines()[:2]
    assert header.split() == ["NAME", "READY", "PHASE", "SERVICES", "AGE"]
    assert row.split()[:4] == [STACK, "True", "Ready", "8/8"]
    for kind in ("StreamsReady", "BucketsReady", "TablesReady", "ServicesReady"):
        assert cluster.conditions()[kind]["status"] == "True", cluster.conditions()[kind]
    # The chart's test hook agrees (it waits for the sample stack's Ready condition from a pod).
    assert "Phase:          Succeeded" in cluster.helm("test", RELEASE, "--timeout", "3m")
    # The operator ran in its pod with the chart's ServiceAccount (its in-cluster login worked).
    operator = cluster.json("pods", "-l", "app.kubernetes.io/component=operator")["items"][0]
    assert operator["spec"]["serviceAccountName"] == f"{RELEASE}-tradingstack"
    assert all(s["ready"] for s in operator["status"]["containerStatuses"])


def test_ticks_reach_the_gateway_and_the_lake(cluster: Cluster) -> None:
    with cluster.forward(f"{STACK}-gateway", 8080) as gateway:
        tickers = wait_for(lambda: (r := http(f"{gateway}/tickers"))[0] == 200 and r[1], 60, "gateway tickers")
        assert {t["symbol"] for t in tickers} >= {"BTCUSDT"}
    secret = cluster.json("secret", f"{RELEASE}-tradingstack-s3")["data"]
    keys = {k: base64.b64decode(v).decode() for k, v in secret.items()}
    with cluster.forward(f"{RELEASE}-tradingstack-s3", 9000) as s3:
        options = storage_options(f"http://{s3}", "us-east-1", True, keys["AWS_ACCESS_KEY_ID"],
                                  keys["AWS_SECRET_ACCESS_KEY"])  # fmt: skip

        def rows() -> int | None:
            try:
                table = DeltaTable(MARKET_TICKS.uri("trader2025"), storage_options=options)
            except Exception:  # not created or not committed yet
                return None
            result = QueryBuilder().register("t", table).execute("SELECT count(*) AS n FROM t").read_all()
            count = int(result.column("n")[0].as_py())
            return count if count > 0 else None

        assert wait_for(rows, 90, "ticks in lake/market_ticks") > 0


def test_an_order_is_filled_and_becomes_a_position(cluster: Cluster) -> None:
    with cluster.forward(f"{STACK}-oms", 8099) as oms, cluster.forward(f"{STACK}-pnl", 8100) as pnl:
        order = {"client_order_id": f"e2e-{time.time_ns()}", "symbol": "BTCUSDT", "side": "buy", "quantity": 0.5}
        _, placed = wait_for(lambda: (r := http(f"{oms}/orders", order))[0] == 201 and r, 60, "an order accepted")
        assert placed["status"] == "routed"

        def filled() -> dict[str, Any] | None:
            body = http(f"{oms}/orders/{placed['order_id']}")[1]
            return body if body["status"] == "filled" else None

        fill = wait_for(filled, 30, "the order filled")
        assert fill["avg_fill_price"] > 0

        def position() -> dict[str, Any] | None:
            rows = [p for p in http(f"{pnl}/positions")[1] if p["symbol"] == "BTCUSDT"]
            return rows[0] if rows and rows[0]["quantity"] >= 0.5 else None

        assert wait_for(position, 30, "a BTCUSDT position")["quantity"] >= 0.5


def test_a_deleted_pod_of_each_service_comes_back_and_the_stack_is_ready_again(cluster: Cluster) -> None:
    before = {p["metadata"]["name"] for p in cluster.json("pods", "-l", f"app.kubernetes.io/instance={STACK}")["items"]}
    cluster.kubectl("delete", "pods", "-l", f"app.kubernetes.io/instance={STACK}", "--wait=false")

    def replaced() -> bool:
        pods = cluster.json("pods", "-l", f"app.kubernetes.io/instance={STACK}")["items"]
        names = {p["metadata"]["name"] for p in pods}
        return not (names & before) and len(names) == len(SERVICES) and cluster.all_available()

    wait_for(replaced, 180, "every service's pod replaced and available")
    wait_for(lambda: cluster.conditions()["ServicesReady"]["message"].startswith("8/8"), 60, "8/8 services")
    wait_for(cluster.ready, 60, "the stack Ready again")


def test_helm_upgrade_with_a_changed_value_rolls_only_the_affected_deployments(cluster: Cluster) -> None:
    before = {name: d["metadata"]["generation"] for name, d in cluster.deployments().items()}
    spec = {"services": {"gateway": {"env": [{"name": "TICK_RATE", "value": "5"}]}}}
    cluster.helm("upgrade", RELEASE, str(ROOT / "charts" / "tradingstack"), "--reuse-values",
                 "--set-json", f"sample.spec={json.dumps(spec)}", "--wait", "--timeout", "5m")  # fmt: skip

    def rolled() -> dict[str, int] | None:
        after = {name: d["metadata"]["generation"] for name, d in cluster.deployments().items()}
        return after if after["gateway"] > before["gateway"] and cluster.all_available() else None

    after = wait_for(rolled, 180, "the gateway Deployment rolled")
    assert {n for n in SERVICES if after[n] != before[n]} == {"gateway"}
    configmap = cluster.json("configmap", f"{STACK}-gateway")["data"]
    assert configmap["TICK_RATE"] == "5"
    wait_for(cluster.ready, 120, "the stack Ready after the upgrade")


def test_deleting_the_stack_keeps_streams_and_lake_as_retain_promises(cluster: Cluster) -> None:
    stack = cluster.json("tradingstack", STACK)
    assert stack["spec"].get("deletionPolicy", "Retain") == "Retain"
    cluster.kubectl("delete", "tradingstack", STACK, "--wait", "--timeout=3m", timeout=240)
    wait_for(lambda: not cluster.deployments(), 120, "the stack's Deployments gone")
    # The data stays: the NATS stream (read through its monitoring endpoint) and the Delta log.
    with cluster.forward(f"{RELEASE}-tradingstack-nats", 8222) as nats:
        status, info = http(f"{nats}/jsz?streams=true")
        assert status == 200
        streams = {s["name"]: s for a in info["account_details"] for s in a["stream_detail"]}
        assert streams["MARKET_TICKS"]["state"]["messages"] > 0
    secret = cluster.json("secret", f"{RELEASE}-tradingstack-s3")["data"]
    keys = {k: base64.b64decode(v).decode() for k, v in secret.items()}
    with cluster.forward(f"{RELEASE}-tradingstack-s3", 9000) as s3:
        options = storage_options(f"http://{s3}", "us-east-1", True, keys["AWS_ACCESS_KEY_ID"],
                                  keys["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
        assert DeltaTable(MARKET_TICKS.uri("trader2025"), storage_options=options).version() >= 0
