"""The Helm chart, the plain manifests, the image and the kind scripts.

Rendered with a real Helm engine (helm-python-sdk), validated offline against the
Kubernetes schemas (kubernetes-validate --strict) and the generated CRD, and installed for
real into the envtest API server.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from tradingstack.crd import crd
from tradingstack.kubeclient import KubeClient
from tradingstack.plan import parse_spec

from conftest import ROOT, wait_for
from kubetools import api_error

CHART = ROOT / "charts" / "tradingstack"
ALL_INFRA = {
    "nats": {"enabled": True},
    "redis": {"enabled": True},
    "s3": {"enabled": True},
    "questdb": {"enabled": True},
    "sample": {"enabled": True},
}
VALUES = {
    "defaults": {},
    "self-contained": ALL_INFRA,
    "cluster-wide": {"operator": {"watchNamespaces": ["*"]}},
    "two-namespaces": {"operator": {"watchNamespaces": ["team-a", "team-b"], "metrics": {"enabled": False}}},
    "external-infra": {
        "sample": {"enabled": True, "spec": {"symbols": ["AAPL"]}},
        "s3": {"existingSecret": "lake-credentials"},
        "image": {"digest": "sha256:" + "a" * 64},
    },
}
# Oldest and newest Kubernetes schemas kubernetes-validate ships (1.24 itself is covered by envtest).
KUBE_VERSIONS = ["1.25.0", kubernetes_validate.latest_version()]

helm.disable_logging()


def render(values: dict[str, Any], namespace: str = "ts", name: str = "tradingstack") -> list[dict[str, Any]]:
    rendered = helm.Chart.load(str(CHART)).render(values, name=name, namespace=namespace, is_install=True)
    return [
        doc
        for path, text in sorted(rendered.items())
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


@pytest.mark.parametrize("case", VALUES)
def test_chart_lints_strictly(case: str) -> None:
    report = helm.lint(str(CHART), VALUES[case], strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("case", VALUES)
def test_every_manifest_validates_against_kubernetes_schemas(case: str) -> None:
    docs = render(VALUES[case])
    crd_schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for doc in docs:
        if doc["kind"] == "TradingStack":
            jsonschema.Draft4Validator(crd_schema).validate(doc)
            parse_spec(doc["spec"])
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_chart_ships_the_generated_crd_itself() -> None:
    (shipped,) = helm.Chart.load(str(CHART)).crds
    assert shipped["data"] == (ROOT / "crds" / "tradingstack.io_tradingstacks.yaml").read_text()
    assert (CHART / "crds" / "tradingstack.io_tradingstacks.yaml").is_symlink(), "a copy could drift"


@pytest.mark.parametrize("case", VALUES)
def test_every_pod_is_hardened_and_probed(case: str) -> None:
    for workload in workloads(render(VALUES[case])):
        pod = workload["spec"]["template"]["spec"]
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert "readinessProbe" in container, where
            assert "livenessProbe" in container, where
            assert container["resources"]["requests"], where
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"} <= set(labels)


def test_infrastructure_runs_as_statefulsets_with_volumes() -> None:
    sets = {d["metadata"]["name"]: d for d in render(ALL_INFRA) if d["kind"] == "StatefulSet"}
    assert set(sets) == {f"tradingstack-{c}" for c in ("nats", "redis", "s3", "questdb")}
    # Tables and columns come from the operator; a typo in a writer must fail, not create one.
    questdb_env = {e["name"]: e["value"] for e in sets["tradingstack-questdb"]["spec"]["template"]["spec"]
                   ["containers"][0]["env"]}  # fmt: skip
    assert questdb_env["QDB_LINE_AUTO_CREATE_NEW_TABLES"] == "false"
    assert questdb_env["QDB_LINE_AUTO_CREATE_NEW_COLUMNS"] == "false"
    for workload in sets.values():
        (claim,) = workload["spec"]["volumeClaimTemplates"]
        assert claim["spec"]["resources"]["requests"]["storage"]


# What the operator calls, and nothing more (operator/DESIGN.md, "Permissions assumed").
OPERATOR_RULES = [
    {"apiGroups": ["tradingstack.io"], "resources": ["tradingstacks"], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": ["tradingstack.io"], "resources": ["tradingstacks/status"], "verbs": ["get", "patch"]},
    {"apiGroups": ["apps"], "resources": ["deployments"],
     "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["services", "configmaps"],
     "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"],
     "verbs": ["get", "list", "create", "patch", "delete"]},
    {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create"]},
    # Only get, never list or watch: the operator reads the one Secret a spec's secretRef names.
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
    # Only list: deletionPolicy Delete waits for the stack's pods to end before it deletes data.
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
]  # fmt: skip


def test_rbac_is_a_namespaced_role_by_default_and_least_privilege() -> None:
    docs = render({})
    roles = [d for d in docs if d["kind"] in ("Role", "ClusterRole") and d["metadata"]["name"].endswith("-operator")]
    assert [(r["kind"], r["metadata"]["namespace"]) for r in roles] == [("Role", "ts")]
    # Cluster-wide, only this: the operator's own CRD, read and patched (operator.manageCRD).
    (crd_role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    one_crd = {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
               "resourceNames": ["tradingstacks.tradingstack.io"], "verbs": ["get", "patch"]}  # fmt: skip
    assert crd_role["rules"] == [one_crd]
    unmanaged = render({"operator": {"manageCRD": False}})
    assert not [d for d in unmanaged if d["kind"].startswith("Cluster")]
    assert "--manage-crd" not in next(d for d in unmanaged if d["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"][0]["args"]  # fmt: skip
    assert roles[0]["rules"] == OPERATOR_RULES
    text = yaml.safe_dump(roles)
    assert "'*'" not in text
    secret_rules = [r for r in roles[0]["rules"] if "secrets" in r["resources"]]
    assert [r["verbs"] for r in secret_rules] == [["get"]]
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=ts" in args
    assert "--all-namespaces" not in args


def test_rbac_follows_watch_namespaces() -> None:
    named = render(VALUES["two-namespaces"])
    assert sorted(d["metadata"]["namespace"] for d in named if d["kind"] == "Role") == ["team-a", "team-b"]
    bindings = [d for d in named if d["kind"] == "RoleBinding"]
    assert {b["subjects"][0]["namespace"] for b in bindings} == {"ts"}

    wide = render(VALUES["cluster-wide"])
    assert [d["kind"] for d in wide if "Role" in d["kind"] and d["metadata"]["name"].endswith("-operator")] == [
        "ClusterRole", "ClusterRoleBinding"]  # fmt: skip
    args = next(d for d in wide if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--all-namespaces" in args


def test_allowed_image_repositories_reach_the_operator() -> None:
    def operator_args(values: dict[str, Any]) -> list[str]:
        deployment = next(
            d for d in render(values) if d["kind"] == "Deployment" and "operator" in d["metadata"]["name"]
        )
        return list(deployment["spec"]["template"]["spec"]["containers"][0]["args"])

    assert not any(a.startswith("--allowed-image-repository") for a in operator_args({}))
    repos = {"operator": {"allowedImageRepositories": ["ghcr.io/acme", "registry.local:5000/trading"]}}
    assert [a for a in operator_args(repos) if a.startswith("--allowed")] == [
        "--allowed-image-repository=ghcr.io/acme", "--allowed-image-repository=registry.local:5000/trading"
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
        ({"operator": {"watchNamespaces": "team-a"}}, "watchNamespaces"),
        ({"operator": {"watchNamespaces": ["Not_A_Namespace"]}}, "watchNamespaces"),
        ({"nats": {"enabled": "yes"}}, "enabled"),
        ({"operator": {"metrics": {"port": 80}}}, "port"),
        ({"s3": {"bucket": "Bad_Bucket"}}, "bucket"),
        ({"replicaCount": 3}, "replicaCount"),
        ({"operator": {"allowedImageRepositories": ["ghcr.io/acme:latest tag"]}}, "allowedImageRepositories"),
    ],
)
def test_values_schema_rejects_bad_values(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=message):
        helm.Chart.load(str(CHART)).validate_schema(values)
    with pytest.raises(helm.HelmError):
        render(values)


def test_value_rules_are_reported_together() -> None:
    values = {
        "operator": {"watchNamespaces": ["*", "team-a"]},
        "sample": {"enabled": True},
        "s3": {"externalEndpoint": "http://minio:9000"},
    }
    with pytest.raises(helm.HelmRenderError) as failure:
        render(values)
    assert "cannot be combined" in str(failure.value)
    assert "plain http" in str(failure.value)


def test_sample_points_at_the_release_infrastructure() -> None:
    (stack,) = [d for d in render(ALL_INFRA) if d["kind"] == "TradingStack"]
    infra = parse_spec(stack["spec"]).infrastructure
    assert infra.nats.url == "nats://tradingstack-nats.ts.svc:4222"
    assert infra.s3.secret_ref is not None
    assert infra.s3.secret_ref.name == "tradingstack-s3"
    assert infra.s3.allow_http is True


def test_plain_manifests_are_generated_from_the_chart() -> None:
    spec = importlib.util.spec_from_file_location("render_manifests", ROOT / "hack" / "render_manifests.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "manifests" / "install.yaml").read_text() == module.render(), "run `make manifests`"
    kustomization = yaml.safe_load((ROOT / "manifests" / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["install.yaml"]


@pytest.mark.parametrize("sample", sorted(p.name for p in (ROOT / "manifests" / "samples").glob("*.yaml")))
def test_samples_validate_against_the_crd_schema(sample: str) -> None:
    doc = yaml.safe_load((ROOT / "manifests" / "samples" / sample).read_text())
    jsonschema.Draft4Validator(crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]).validate(doc)
    parse_spec(doc["spec"])


def test_dockerfile_is_multi_stage_and_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(stages) == 2
    assert stages[0].endswith(" AS build")
    final = text.split(stages[1], 1)[1]
    assert "USER 10001:10001" in final
    assert 'ENTRYPOINT ["tradingstack"]' in final
    assert "gcc" not in final
    assert "build-essential" not in final
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)


SCRIPTS = ["hack/up.sh", "hack/down.sh", "hack/ensure-helm.sh", "hack/local-infra.sh", "hack/test-deps.sh", ".ci/run"]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (make deps installs it)")
def test_scripts_are_shellcheck_clean() -> None:
    result = subprocess.run(["shellcheck", *SCRIPTS], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


def test_make_up_says_exactly_what_is_missing(tmp_path: Path) -> None:
    # A PATH with the basics but none of docker, kind, helm, kubectl.
    for tool in ("bash", "dirname", "grep"):
        found = shutil.which(tool)
        assert found is not None
        (tmp_path / tool).symlink_to(found)
    result = subprocess.run(
        ["bash", str(ROOT / "hack" / "up.sh")],
        env={"PATH": str(tmp_path), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    # helm may be found all the same: hack/ensure-helm.sh keeps one in .venv/bin once unpacked.
    needs = result.stderr.split("make up needs: ", 1)[1].split(" (", 1)[0].split()
    assert {"docker", "kubectl", "kind"} <= set(needs) <= {"docker", "kubectl", "kind", "helm"}
    assert "CLUSTER=current" in result.stderr  # the other path is named


@pytest.mark.envtest
def test_chart_installs_into_a_real_api_server(kube: KubeClient, crd: dict[str, Any]) -> None:
    namespace = f"chart-{uuid.uuid4().hex[:6]}"
    release = f"ts{uuid.uuid4().hex[:6]}"
    config = helm.Config(kubeconfig_path=os.environ["KUBECONFIG"], namespace=namespace)
    values = copy.deepcopy(ALL_INFRA)
    result = config.install(str(CHART), release, values, namespace=namespace, create_namespace=True)
    assert result["status"] == "deployed"

    expected = render(values, namespace=namespace, name=release)
    assert len(expected) > 10
    for doc in expected:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind == "Pod" or "helm.sh/hook" in (doc["metadata"].get("annotations") or {}):
            continue  # test hooks run on `helm test`, not on install
        path = _path_for(doc, namespace)
        assert kube.request("GET", path)["metadata"]["name"] == name, f"{kind}/{name} missing"

    crd_path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/tradingstacks.tradingstack.io"
    conditions = kube.request("GET", crd_path)["status"]["conditions"]
    assert any(c["type"] == "Established" and c["status"] == "True" for c in conditions)
    config.uninstall(release)
    wait_for(lambda: not kube.list("Service", namespace, {"app.kubernetes.io/instance": release}), what="uninstall")


_PATHS = {
    "ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts/{name}",
    "Service": "/api/v1/namespaces/{ns}/services/{name}",
    "Secret": "/api/v1/namespaces/{ns}/secrets/{name}",
    "ConfigMap": "/api/v1/namespaces/{ns}/configmaps/{name}",
    "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments/{name}",
    "StatefulSet": "/apis/apps/v1/namespaces/{ns}/statefulsets/{name}",
    "Role": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles/{name}",
    "RoleBinding": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings/{name}",
    "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles/{name}",
    "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{name}",
    "TradingStack": "/apis/tradingstack.io/v1alpha1/namespaces/{ns}/tradingstacks/{name}",
}


def _path_for(doc: dict[str, Any], namespace: str) -> str:
    return _PATHS[doc["kind"]].format(ns=doc["metadata"].get("namespace", namespace), name=doc["metadata"]["name"])


def _nats(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    docs = render(values)
    statefulset = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"].endswith("-nats"))
    config = next((d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("nats-config")), None)
    return statefulset, config


def test_in_release_nats_puts_every_write_on_disk_before_its_ack() -> None:
    # An order answered 201 after JetStream's ack must survive a node crash: fsync always (Jepsen,
    # NATS 2.12.1, Dec 2025: with the 2-minute default, acknowledged writes can be lost).
    statefulset, config = _nats(ALL_INFRA)
    assert config is not None
    assert "sync_interval: always" in config["data"]["nats.conf"]
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    assert "--config=/etc/nats/nats.conf" in container["args"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert (mount["mountPath"], mount["readOnly"]) == ("/etc/nats/nats.conf", True)
    annotations = statefulset["spec"]["template"]["metadata"]["annotations"]
    assert annotations["checksum/config"]  # a changed setting restarts NATS


def test_the_local_nats_stand_in_gets_no_setting_it_would_refuse() -> None:
    local = yaml.safe_load((ROOT / "hack" / "values-local-infra.yaml").read_text())
    statefulset, config = _nats(local)
    assert config is None
    assert not any(a.startswith("--config") for a in statefulset["spec"]["template"]["spec"]["containers"][0]["args"])


def _pod_from(workload: dict[str, Any]) -> dict[str, Any]:
    """A Pod as its controller would make it; a StatefulSet's claim templates become emptyDirs here."""
    template = copy.deepcopy(workload["spec"]["template"])
    spec = template["spec"]
    claims = [c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])]
    spec["volumes"] = [*spec.get("volumes", []), *({"name": c, "emptyDir": {}} for c in claims)]
    name = workload["metadata"]["name"]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{name}-probe"[:63], **_labels(template)},
            "spec": spec}  # fmt: skip


def _labels(template: dict[str, Any]) -> dict[str, Any]:
    return {"labels": template.get("metadata", {}).get("labels", {})}


@pytest.mark.envtest
def test_every_pod_template_passes_restricted_pod_security_admission(kube: KubeClient) -> None:
    """Declared is not enforced: the API server's PodSecurity admission judges every Pod the chart
    and the operator make, in a namespace that enforces `restricted` (dry-run: admitted, not kept)."""
    from tradingstack.plan import StackRef, build_plan, parse_spec

    namespace = f"psa-{uuid.uuid4().hex[:6]}"
    labels = {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
    }
    kube.request("POST", "/api/v1/namespaces", body={"metadata": {"name": namespace, "labels": labels}})
    chart = render(copy.deepcopy(ALL_INFRA), namespace=namespace)
    sample = yaml.safe_load((ROOT / "manifests" / "samples" / "full.yaml").read_text())
    plan = build_plan(StackRef("psa", namespace), parse_spec(sample["spec"]))
    pods = [_pod_from(w) for w in workloads(chart) + workloads(plan.objects)]
    pods += [d for d in chart if d["kind"] == "Pod"]  # helm test hooks
    assert len(pods) >= 12
    for account in (d for d in chart if d["kind"] == "ServiceAccount"):  # the ServiceAccount admission needs them
        kube.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts", body=account)
    path = f"/api/v1/namespaces/{namespace}/pods"
    for pod in pods:
        pod["metadata"].pop("namespace", None)
        kube.request("POST", path, body=pod, query={"dryRun": "All"})  # a refusal raises, naming the rule

    loose = copy.deepcopy(pods[0])
    loose["spec"].pop("securityContext", None)
    for container in loose["spec"]["containers"]:
        container.pop("securityContext", None)
    error = api_error(lambda: kube.request("POST", path, body=loose, query={"dryRun": "All"}))
    assert error.status == 403
    assert "violates PodSecurity" in error.detail
    kube.request("DELETE", f"/api/v1/namespaces/{namespace}")
