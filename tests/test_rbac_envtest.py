"""The operator under RBAC, with exactly the chart's rules and nothing more.

A kube-apiserver of its own with `AUTHZ=RBAC`: the chart's ServiceAccount, Role(s) or
ClusterRole and bindings are created as Helm renders them, the operator process runs with a
token of that ServiceAccount, and does everything it does for a user: reconcile (children,
NetworkPolicies, streams, buckets and tables with a Secret's credentials), status and events,
drift repair, deletion through its finalizer, for each `watchNamespaces` shape. Then each rule
is taken away in turn (an operator each, in parallel) and the operator must hit a 403 without
it: the rules hold nothing it does not use.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from test_chart import render
from tradingstack.kubeclient import KubeClient

from conftest import Envtest, free_port, install_crd, lake_secret, require_envtest, wait_for
from kubetools import condition, create_stack, events_for, get_stack

pytestmark = pytest.mark.envtest
RELEASE = "ts"

_PATHS = {
    "Namespace": "/api/v1/namespaces",
    "ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
    "Role": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
    "RoleBinding": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
    "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
    "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
}


@pytest.fixture(scope="module")
def rbac(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Envtest, KubeClient]]:
    require_envtest()
    env = Envtest(tmp_path_factory.mktemp("envtest-rbac"), authz="RBAC")
    env.up()
    config = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=env.kubeconfig, client_configuration=config)
    admin = KubeClient(kubernetes.client.ApiClient(config), field_manager="tests")
    try:
        install_crd(admin)
        yield env, admin
    finally:
        admin.close()
        env.down()


def create(admin: KubeClient, doc: dict[str, Any]) -> None:
    namespace = doc["metadata"].get("namespace", "")
    admin.request("POST", _PATHS[doc["kind"]].format(ns=namespace), body=doc)


def ensure_namespace(admin: KubeClient, name: str) -> None:
    with contextlib.suppress(Exception):  # already there
        create(admin, {"kind": "Namespace", "metadata": {"name": name}})


def install_rbac(admin: KubeClient, values: dict[str, Any], release_ns: str,
                 rules: list[dict[str, Any]] | None = None) -> str:  # fmt: skip
    """The chart's ServiceAccount and RBAC, as Helm would create them; `rules` replaces the Role's."""
    docs = [d for d in render(values, namespace=release_ns, name=RELEASE) if d["kind"] in _PATHS]
    ensure_namespace(admin, release_ns)
    account = ""
    for doc in docs:
        if (
            doc["kind"] in ("Role", "ClusterRole")
            and rules is not None
            and doc["metadata"]["name"].endswith("-operator")
        ):
            doc = {**doc, "rules": rules}
        if doc["kind"] in ("Role", "RoleBinding"):
            ensure_namespace(admin, doc["metadata"]["namespace"])
        if doc["kind"] in ("ClusterRole", "ClusterRoleBinding"):  # cluster objects: one name per test
            doc = copy.deepcopy(doc)
            doc["metadata"]["name"] += f"-{release_ns}"
            doc.get("roleRef", {})["name"] = doc.get("roleRef", {}).get("name", "") + f"-{release_ns}"
        if doc["kind"] == "ServiceAccount":
            account = doc["metadata"]["name"]
        create(admin, doc)
    return account


def token_kubeconfig(env: Envtest, admin: KubeClient, namespace: str, account: str, path: Path) -> Path:
    """A kubeconfig holding only a token of the ServiceAccount (`kubectl create token`)."""
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}}
    token = admin.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token", body=request)
    source = yaml.safe_load(Path(env.kubeconfig).read_text())
    cluster = source["clusters"][0]["cluster"]
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "envtest", "cluster": cluster}],
        "users": [{"name": "sa", "user": {"token": token["status"]["token"]}}],
        "contexts": [{"name": "sa", "context": {"cluster": "envtest", "user": "sa"}}],
    }))  # fmt: skip
    return path


@contextlib.contextmanager
def operator_as(kubeconfig: Path, scope: list[str], log: Path) -> Iterator[Path]:
    command = [sys.executable, "-m", "tradingstack.cli", "operator", *scope, "--log-format", "text",
               "--liveness", f"http://127.0.0.1:{free_port()}/healthz", "--metrics-port", "0",
               "--manage-crd"]  # as the chart runs it (operator.manageCRD), under its narrow ClusterRole  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, env={**os.environ, "KUBECONFIG": str(kubeconfig),
                                                 "TRADINGSTACK_RESYNC_TICK": "1"},
                                   stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        yield log
    finally:
        process.terminate()
        process.wait(30)


DENIED = re.compile(r"[Ff]orbidden|status=403|HTTP 403|'code': 403")  # not ",403]" of a timestamp


def forbidden(log: Path) -> list[str]:
    return [line for line in log.read_text(errors="replace").splitlines() if DENIED.search(line)]


def exercise(admin: KubeClient, namespace: str, infra: dict[str, Any], name: str) -> None:
    """What the operator does for a user, each step checked from the API server."""
    admin.request("POST", f"/api/v1/namespaces/{namespace}/secrets", body=lake_secret())
    spec = {**copy.deepcopy(infra), "driftCheckIntervalSeconds": 10}
    create_stack(admin, namespace, name, spec)
    for type_ in ("StreamsReady", "BucketsReady", "TablesReady"):  # with the Secret's S3 credentials
        wait_for(lambda t=type_: condition(get_stack(admin, namespace, name), t).get("status") == "True", 60,
                 f"{type_} under RBAC")  # fmt: skip
    selector = {"app.kubernetes.io/instance": name}
    wait_for(lambda: len(admin.list("Deployment", namespace, selector)) == 8, 30, "eight Deployments")
    wait_for(lambda: len(admin.list("NetworkPolicy", namespace, selector)) == 9, 30, "nine NetworkPolicies")
    wait_for(lambda: [e for e in events_for(admin, namespace, name) if e["reason"] == "Applied"], 30, "an event")
    stack = get_stack(admin, namespace, name)
    assert stack["status"]["observedGeneration"] == stack["metadata"]["generation"]

    admin.delete("Deployment", namespace, f"{name}-oms")  # drift: repaired from the watch
    admin.delete("ConfigMap", namespace, f"{name}-risk")  # and from the periodic full pass
    wait_for(lambda: admin.get("Deployment", namespace, f"{name}-oms"), 30, "the Deployment repaired")
    wait_for(lambda: admin.get("ConfigMap", namespace, f"{name}-risk"), 40, "the ConfigMap repaired")

    admin.request("DELETE", f"/apis/tradingstack.io/v1alpha1/namespaces/{namespace}/tradingstacks/{name}")
    wait_for(lambda: admin.get("TradingStack", namespace, name) is None, 40, "deletion through the finalizer")


@pytest.mark.parametrize("shape", ["release", "list", "all"])
def test_the_operator_does_everything_with_exactly_the_charts_rules(
    rbac: tuple[Envtest, KubeClient], infra: dict[str, Any], tmp_path: Path, shape: str
) -> None:
    env, admin = rbac
    release_ns = f"rel-{uuid.uuid4().hex[:6]}"
    watched = {"release": release_ns, "list": f"team-{uuid.uuid4().hex[:6]}", "all": f"any-{uuid.uuid4().hex[:6]}"}
    values = {"release": {}, "list": {"operator": {"watchNamespaces": [watched["list"], "other-team"]}},
              "all": {"operator": {"watchNamespaces": ["*"]}}}[shape]  # fmt: skip
    scope = {"release": ["--namespace", release_ns], "list": ["--namespace", watched["list"], "--namespace",
             "other-team"], "all": ["--all-namespaces"]}[shape]  # fmt: skip
    account = install_rbac(admin, values, release_ns)
    ensure_namespace(admin, watched[shape])
    kubeconfig = token_kubeconfig(env, admin, release_ns, account, tmp_path / "sa.kubeconfig")
    with operator_as(kubeconfig, scope, tmp_path / "operator.log") as log:
        try:
            exercise(admin, watched[shape], infra, f"s-{shape}")
        except AssertionError:
            print(log.read_text()[-4000:])
            raise
        assert forbidden(log) == [], "the chart's rules are not enough"


def test_each_rule_is_needed(rbac: tuple[Envtest, KubeClient], infra: dict[str, Any], tmp_path: Path) -> None:
    """One operator per rule left out, all at once; each must meet a 403 for what it lacks (with every
    rule there is none, as the test above shows, so a 403 here is the missing rule's)."""
    env, admin = rbac
    rules = next(d for d in render({}, namespace="x", name=RELEASE) if d["kind"] == "Role")["rules"]
    with contextlib.ExitStack() as stack:
        runs = []
        for index, rule in enumerate(rules):
            namespace = f"less-{index}-{uuid.uuid4().hex[:5]}"
            account = install_rbac(admin, {}, namespace, rules=rules[:index] + rules[index + 1 :])
            kubeconfig = token_kubeconfig(env, admin, namespace, account, tmp_path / f"sa-{index}.kubeconfig")
            log = stack.enter_context(operator_as(kubeconfig, ["--namespace", namespace], tmp_path / f"op-{index}.log"))
            admin.request("POST", f"/api/v1/namespaces/{namespace}/secrets", body=lake_secret())
            runs.append((rule, namespace, log))
        for index, (_, namespace, _) in enumerate(runs):
            spec = {**copy.deepcopy(infra), "driftCheckIntervalSeconds": 10, "deletionPolicy": "Delete"}
            # A Redis database each: a stack on another's database runs nothing, and would meet no 403.
            redis_url = spec["infrastructure"]["redis"]["url"]
            spec["infrastructure"]["redis"]["url"] = redis_url.rsplit("/", 1)[0] + f"/{index + 1}"
            create_stack(admin, namespace, "lacking", spec)
        for rule, namespace, _ in runs:
            if rule["resources"] == ["pods"]:  # listed only by a deletion, which waits for the pods to end
                wait_for(lambda ns=namespace: get_stack(admin, ns, "lacking")["metadata"].get("finalizers"), 30,
                         "the finalizer")  # fmt: skip
                admin.request("DELETE", f"/apis/tradingstack.io/v1alpha1/namespaces/{namespace}/tradingstacks/lacking")
        for rule, _, log in runs:
            wait_for(lambda log=log: forbidden(log), 60, f"a 403 without {rule}")
