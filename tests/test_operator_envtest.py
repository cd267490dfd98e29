"""The operator against a real kube-apiserver (envtest), running in-process through kopf."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tradingstack.kubeclient import API_WRITES, KubeClient
from tradingstack.plan import CHECKSUM_ANNOTATION
from tradingstack.reconciler import INFRA_CHANGES, Reconciler

from conftest import OperatorRunner, wait_for
from kubetools import (
    children,
    condition,
    create_stack,
    events_for,
    get_stack,
    patch_spec,
    set_all_available,
    set_available,
    wait_children,
    wait_condition,
)

pytestmark = pytest.mark.envtest
ALL_CHILDREN = 24  # eight services x (ConfigMap, Service, Deployment)


def _checksum(deployment: dict[str, Any]) -> str:
    return str(deployment["spec"]["template"]["metadata"]["annotations"][CHECKSUM_ANNOTATION])


def _counted(counter: Any, namespace: str | None = None) -> float:
    return sum(
        sample.value
        for metric in counter.collect()
        for sample in metric.samples
        if sample.name.endswith("_total") and namespace in (None, sample.labels.get("namespace"))
    )


def test_empty_spec_creates_every_child_owned_by_the_stack(
    kube: KubeClient, operator: OperatorRunner, namespace: str, infra: dict[str, Any]
) -> None:
    stack = create_stack(kube, namespace, "demo", infra)
    found = wait_children(kube, namespace, "demo", ALL_CHILDREN)

    assert sorted(name for kind, name in found if kind == "Deployment") == sorted(
        f"demo-{s}" for s in ("gateway", "normalizer", "sink-ticks", "sink-alt", "risk", "oms", "exeq", "pnl")
    )
    for obj in found.values():
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref["uid"] == stack["metadata"]["uid"]
        assert ref["controller"] is True
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "tradingstack-operator"
    oms_config = found[("ConfigMap", "demo-oms")]["data"]
    assert oms_config["PORT"] == "8099"
    assert oms_config["NATS_URL"] == infra["infrastructure"]["nats"]["url"]

    stack = wait_condition(kube, namespace, "demo", "Ready", "False", "ServicesNotReady")
    assert stack["status"]["observedGeneration"] == stack["metadata"]["generation"]
    assert stack["status"]["phase"] == "Progressing"
    assert condition(stack, "Progressing")["status"] == "True"
    assert wait_for(lambda: [e for e in events_for(kube, namespace, "demo") if e["reason"] == "Applied"])


def test_ready_only_when_every_deployment_is_available(
    kube: KubeClient, operator: OperatorRunner, namespace: str, infra: dict[str, Any]
) -> None:
    create_stack(kube, namespace, "avail", infra)
    wait_children(kube, namespace, "avail", ALL_CHILDREN)
    for name in ("avail-gateway", "avail-normalizer", "avail-sink-ticks", "avail-sink-alt", "avail-risk"):
        set_available(kube, namespace, name)
    partly = wait_condition(kube, namespace, "avail", "ServicesReady", "False")
    assert condition(partly, "Ready")["status"] == "False"

    set_all_available(kube, namespace, "avail")
    ready = wait_condition(kube, namespace, "avail", "Ready", "True")
    assert ready["status"]["phase"] == "Ready"
    assert ready["status"]["servicesReady"] == "8/8"
    assert condition(ready, "Progressing")["reason"] == "Reconciled"
    degraded_since = condition(ready, "Degraded")["lastTransitionTime"]
    ready_since = condition(ready, "Ready")["lastTransitionTime"]

    time.sleep(1.1)  # timestamps have one-second resolution
    set_available(kube, namespace, "avail-oms", available=False)
    lost = wait_condition(kube, namespace, "avail", "Ready", "False", "ServicesNotReady")
    assert "oms: 0/1 available" in condition(lost, "Ready")["message"]
    assert condition(lost, "Ready")["lastTransitionTime"] != ready_since
    assert condition(lost, "Degraded")["lastTransitionTime"] == degraded_since  # did not flip
    assert lost["status"]["servicesReady"] == "7/8"


def test_spec_change_patches_children_and_rolls_pods(
    kube: KubeClient, operator: OperatorRunner, namespace: str, infra: dict[str, Any]
) -> None:
    create_stack(kube, namespace, "chg", infra)
    before = wait_children(kube, namespace, "chg", ALL_CHILDREN)

    patch_spec(kube, namespace, "chg", {"symbols": ["AAPL", "MSFT"], "services": {"oms": {"replicas": 3}}})

    def changed() -> dict[tuple[str, str], dict[str, Any]] | None:
        now = children(kube, namespace, "chg")
        cm = now.get(("ConfigMap", "chg-gateway"), {}).get("data", {})
        return (
            now
            if cm.get("SYMBOLS") == "AAPL,MSFT" and now[("Deployment", "chg-oms")]["spec"]["replicas"] == 3
            else None
        )

    after = wait_for(changed, what="symbols and replicas applied")
    assert _checksum(after[("Deployment", "chg-gateway")]) != _checksum(before[("Deployment", "chg-gateway")])
    stack = wait_for(lambda: (s := get_stack(kube, namespace, "chg"))["status"]["observedGeneration"] == 2 and s)
    assert condition(stack, "Ready")["observedGeneration"] == 2

    patch_spec(kube, namespace, "chg", {"services": {"pnl": {"enabled": False}}})
    remaining = wait_children(kube, namespace, "chg", ALL_CHILDREN - 3)
    assert not any(name == "chg-pnl" for _, name in remaining)


def test_deleted_or_edited_children_are_restored(
    kube: KubeClient, operator: OperatorRunner, namespace: str, infra: dict[str, Any]
) -> None:
    create_stack(kube, namespace, "heal", infra)
    before = wait_children(kube, namespace, "heal", ALL_CHILDREN)

    kube.delete("Deployment", namespace, "heal-oms")
    restored = wait_for(
        lambda: (
            (d := kube.get("Deployment", namespace, "heal-oms"))
            and d["metadata"]["uid"] != before[("Deployment", "heal-oms")]["metadata"]["uid"]
            and d
        ),
        what="heal-oms to be recreated",
    )
    assert restored["spec"]["replicas"] == 1

    kube.request(
        "PATCH", KubeClient.path("Deployment", namespace, "heal-risk"),
        body={"spec": {"replicas": 5}}, content_type="application/merge-patch+json",
    )  # fmt: skip
    kube.request(
        "PATCH", KubeClient.path("ConfigMap", namespace, "heal-risk"),
        body={"data": {"NATS_URL": "nats://elsewhere:4222"}}, content_type="application/merge-patch+json",
    )  # fmt: skip
    wait_for(lambda: kube.get("Deployment", namespace, "heal-risk")["spec"]["replicas"] == 1, what="replicas back")
    wait_for(
        lambda: (
            kube.get("ConfigMap", namespace, "heal-risk")["data"]["NATS_URL"] == infra["infrastructure"]["nats"]["url"]
        ),
        what="config restored",
    )
    assert any(e["reason"] == "Repaired" for e in events_for(kube, namespace, "heal"))


def test_steady_state_resync_writes_nothing(
    kube: KubeClient, operator: OperatorRunner, namespace: str, infra: dict[str, Any], questdb: Any
) -> None:
    create_stack(kube, namespace, "calm", {**infra, "driftCheckIntervalSeconds": 10})
    wait_children(kube, namespace, "calm", ALL_CHILDREN)
    set_all_available(kube, namespace, "calm")
    ready = wait_condition(kube, namespace, "calm", "Ready", "True")
    assert [s["name"] for s in ready["status"]["streams"]][:2] == ["MARKET_TICKS", "ALT_DATA"]
    assert all(item["ready"] for key in ("streams", "buckets", "tables") for item in ready["status"][key])
    time.sleep(1)  # let the last watch events settle

    def versions() -> dict[Any, str]:
        found = {key: o["metadata"]["resourceVersion"] for key, o in children(kube, namespace, "calm").items()}
        found["stack"] = get_stack(kube, namespace, "calm")["metadata"]["resourceVersion"]
        return found

    before, writes, infra_writes = versions(), _counted(API_WRITES, namespace), _counted(INFRA_CHANGES)
    ddl = list(questdb.state.mutations)
    # The same reconcile the operator's timer runs, made directly so the test need not wait for it.
    outcome = Reconciler(kube).reconcile(get_stack(kube, namespace, "calm"))
    assert outcome.changes == []
    assert outcome.infra_changes() == []
    assert outcome.status_written is False
    time.sleep(11)  # one drift-check interval: the operator's own timer pass happens too
    assert _counted(API_WRITES, namespace) == writes, "a no-op resync made API writes"
    assert _counted(INFRA_CHANGES) == infra_writes, "a no-op resync changed streams, buckets or tables"
    assert questdb.state.mutations == ddl
    assert versions() == before


def test_invalid_spec_that_passes_the_schema_is_reported_not_retried(
    kube: KubeClient, operator: OperatorRunner, namespace: str, infra: dict[str, Any]
) -> None:
    overlapping = [
        {"name": "MARKET_TICKS", "subjects": ["market.tick.>"]},
        {"name": "EVERYTHING", "subjects": ["market.>"]},
    ]
    create_stack(kube, namespace, "bad", {**infra, "streams": overlapping})
    stack = wait_condition(kube, namespace, "bad", "Degraded", "True", "InvalidSpec")
    assert "overlapping subjects" in condition(stack, "Degraded")["message"]
    assert condition(stack, "Ready")["reason"] == "InvalidSpec"
    assert stack["status"]["phase"] == "Failed"
    assert children(kube, namespace, "bad") == {}
    assert wait_for(lambda: [e for e in events_for(kube, namespace, "bad") if e["type"] == "Warning"])

    patch_spec(kube, namespace, "bad", {"streams": None})  # back to the defaults
    wait_children(kube, namespace, "bad", ALL_CHILDREN)
    wait_condition(kube, namespace, "bad", "Degraded", "False", "AsExpected")


def test_paused_stack_is_left_alone_until_resumed(
    kube: KubeClient, operator: OperatorRunner, namespace: str, infra: dict[str, Any]
) -> None:
    create_stack(kube, namespace, "nap", infra)
    wait_children(kube, namespace, "nap", ALL_CHILDREN)
    patch_spec(kube, namespace, "nap", {"paused": True})
    stack = wait_condition(kube, namespace, "nap", "Progressing", "False", "Paused")
    assert stack["status"]["phase"] == "Paused"

    kube.delete("Service", namespace, "nap-oms")
    time.sleep(3)
    assert kube.get("Service", namespace, "nap-oms") is None, "a paused stack was reconciled"

    patch_spec(kube, namespace, "nap", {"paused": False})
    wait_for(lambda: kube.get("Service", namespace, "nap-oms"), what="the Service to come back after resume")


def test_api_errors_are_retried_until_they_clear(
    kube: KubeClient, operator: OperatorRunner, namespace: str, infra: dict[str, Any]
) -> None:
    # A real fault from the real server: a quota that refuses the fourth ConfigMap.
    quota = {"metadata": {"name": "few-configmaps"}, "spec": {"hard": {"count/configmaps": "3"}}}
    kube.request("POST", f"/api/v1/namespaces/{namespace}/resourcequotas", body=quota)
    wait_for(
        lambda: kube.request("GET", f"/api/v1/namespaces/{namespace}/resourcequotas/few-configmaps")
        .get("status", {}).get("hard"),
        what="the quota to be active",
    )  # fmt: skip
    create_stack(kube, namespace, "quota", infra)
    stack = wait_condition(kube, namespace, "quota", "Degraded", "True", "ApplyFailed")
    assert "exceeded quota" in condition(stack, "Degraded")["message"]

    kube.request("DELETE", f"/api/v1/namespaces/{namespace}/resourcequotas/few-configmaps")
    wait_children(kube, namespace, "quota", ALL_CHILDREN)  # the backoff retry got through
    wait_condition(kube, namespace, "quota", "Degraded", "False", timeout=60)


@pytest.mark.parametrize("policy", ["Retain", "Delete"])
def test_delete_honours_deletion_policy(
    kube: KubeClient, operator: OperatorRunner, namespace: str, infra: dict[str, Any], questdb: Any, policy: str
) -> None:
    name = f"bye-{policy.lower()}"
    create_stack(kube, namespace, name, {**infra, "deletionPolicy": policy})
    wait_children(kube, namespace, name, ALL_CHILDREN)
    wait_condition(kube, namespace, name, "TablesReady", "True")
    wait_for(lambda: get_stack(kube, namespace, name)["metadata"].get("finalizers"), what="finalizer")

    kube.request("DELETE", KubeClient.path("TradingStack", namespace, name))
    wait_for(lambda: kube.get("TradingStack", namespace, name) is None, what="the stack to be gone")
    reasons = {e["reason"]: e["message"] for e in events_for(kube, namespace, name)}
    if policy == "Retain":
        assert "stream MARKET_TICKS" in reasons["Retained"]
        assert "Deleted" not in reasons
        assert "ticks" in questdb.state.tables
    else:
        assert "Deployment/bye-delete-oms" in reasons["Deleted"]
        assert "Stream/MARKET_TICKS" in reasons["Deleted"]
        assert f"Bucket/{infra['infrastructure']['s3']['bucket']}" in reasons["Deleted"]
        assert "Table/ticks" in reasons["Deleted"]
        assert "ticks" not in questdb.state.tables
    wait_for(lambda: children(kube, namespace, name) == {}, what="children removed")


def test_delete_removes_the_data_only_once_the_stacks_pods_are_gone(
    kube: KubeClient, operator: OperatorRunner, namespace: str, infra: dict[str, Any], questdb: Any
) -> None:
    """A pod still running would write again what is deleted (tables come back on the next write):
    deletionPolicy Delete removes the Deployments, waits for the pods, and only then the data."""
    name = "bye-pods"
    create_stack(kube, namespace, name, {**infra, "deletionPolicy": "Delete"})
    wait_condition(kube, namespace, name, "TablesReady", "True")
    # A pod of the stack, as a Deployment's would be (no kubelet here: it stays until deleted).
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": f"{name}-oms-abc", "labels": {"app.kubernetes.io/name": "tradingstack",
                                                              "app.kubernetes.io/instance": name,
                                                              "app.kubernetes.io/managed-by": "tradingstack-operator"}},
           "spec": {"containers": [{"name": "oms", "image": "tradingstack:test"}]}}  # fmt: skip
    kube.request("POST", f"/api/v1/namespaces/{namespace}/pods", body=pod)

    kube.request("DELETE", KubeClient.path("TradingStack", namespace, name))
    wait_for(lambda: "Stopping" in {e["reason"] for e in events_for(kube, namespace, name)}, what="a Stopping event")
    assert not [k for k in children(kube, namespace, name) if k[0] == "Deployment"]  # the writers go first
    assert "ticks" in questdb.state.tables  # and the data waits for their pods
    assert kube.get("TradingStack", namespace, name) is not None
    kube.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}-oms-abc", body={"gracePeriodSeconds": 0})
    wait_for(lambda: kube.get("TradingStack", namespace, name) is None, what="the stack to be gone")
    assert "ticks" not in questdb.state.tables
    reasons = {e["reason"]: e["message"] for e in events_for(kube, namespace, name)}
    assert "Table/ticks" in reasons["Deleted"]


def test_a_second_stack_on_a_taken_redis_database_runs_no_service(
    kube: KubeClient, operator: OperatorRunner, namespace: str, infra: dict[str, Any]
) -> None:
    """Its exeq would fill the first stack's orders: RedisReady False (OwnedByAnotherStack), and not one
    of its Deployments is made, while the first stack runs on."""
    create_stack(kube, namespace, "first", infra)
    wait_condition(kube, namespace, "first", "RedisReady", "True")
    create_stack(kube, namespace, "second", infra)
    refused = wait_condition(kube, namespace, "second", "RedisReady", "False", reason="OwnedByAnotherStack")
    assert f"{namespace}/first" in condition(refused, "RedisReady")["message"]
    assert not [k for k in children(kube, namespace, "second") if k[0] == "Deployment"]
    assert [k for k in children(kube, namespace, "first") if k[0] == "Deployment"]


def test_operator_restart_mid_reconcile_converges_without_duplicates(
    kube: KubeClient, operator: OperatorRunner, namespace: str, infra: dict[str, Any]
) -> None:
    operator.stop()
    try:
        create_stack(kube, namespace, "restart", infra)
        operator.start()
        wait_for(lambda: children(kube, namespace, "restart"), what="the first children")
        operator.stop()  # somewhere in the middle of the first pass (or just after it)
        kube.delete("Deployment", namespace, "restart-gateway")
        patch_spec(kube, namespace, "restart", {"services": {"oms": {"replicas": 2}}})
    finally:
        operator.start()
    found = wait_for(
        lambda: (c := children(kube, namespace, "restart")) and len(c) == ALL_CHILDREN
        and c[("Deployment", "restart-oms")]["spec"]["replicas"] == 2 and c,
        what="convergence after restart",
    )  # fmt: skip
    assert ("Deployment", "restart-gateway") in found
    assert len([k for k in found if k[0] == "Deployment"]) == 8
    stack = wait_for(
        lambda: (s := get_stack(kube, namespace, "restart"))["status"].get("observedGeneration") == 2 and s
    )
    assert condition(stack, "Degraded")["status"] == "False"


def test_a_removed_env_override_leaves_the_configmap(
    kube: KubeClient, operator: OperatorRunner, namespace: str, infra: dict[str, Any]
) -> None:
    # The checksum rolls pods on every ConfigMap change: the ConfigMap must then hold exactly the
    # spec's keys, or pods restart onto a value the spec no longer has.
    spec = {**infra, "services": {"risk": {"env": [{"name": "EXTRA_FLAG", "value": "on"}]}},
            "riskLimits": [{"symbol": "BTCUSDT", "maxQuantity": 5}]}  # fmt: skip
    create_stack(kube, namespace, "rm", spec)
    wait_for(lambda: children(kube, namespace, "rm").get(("ConfigMap", "rm-risk"), {}).get("data", {})
             .get("EXTRA_FLAG") == "on", what="the override applied")  # fmt: skip
    patch_spec(kube, namespace, "rm", {"services": {"risk": {"env": []}}, "riskLimits": []})

    def removed() -> dict[str, str] | None:
        data: dict[str, str] = children(kube, namespace, "rm")[("ConfigMap", "rm-risk")]["data"]
        return data if "EXTRA_FLAG" not in data and "RISK_LIMITS" not in data else None

    data = wait_for(removed, what="the removed keys gone from the ConfigMap")
    assert data["SERVICE_NAME"] == "risk"


def test_network_policies_are_applied_owned_and_removed_when_disabled(
    kube: KubeClient, operator: OperatorRunner, namespace: str, infra: dict[str, Any]
) -> None:
    """The API server accepts what the plan renders; `networkPolicy.enabled: false` takes it away."""
    selector = {"app.kubernetes.io/instance": "fenced"}
    stack = create_stack(kube, namespace, "fenced", infra)
    policies = wait_for(lambda: len(found := kube.list("NetworkPolicy", namespace, selector)) == 9 and found,
                        30, "a default deny and one policy per service")  # fmt: skip
    assert {p["metadata"]["ownerReferences"][0]["uid"] for p in policies} == {stack["metadata"]["uid"]}
    patch_spec(kube, namespace, "fenced", {"networkPolicy": {"enabled": False}})
    wait_for(lambda: not kube.list("NetworkPolicy", namespace, selector), 30, "the policies removed")
    patch_spec(kube, namespace, "fenced", {"networkPolicy": {"enabled": True}})
    wait_for(lambda: len(kube.list("NetworkPolicy", namespace, selector)) == 9, 30, "the policies back")


def test_lake_upkeep_compacts_each_table_when_due_and_reports_it(
    kube: KubeClient, operator: OperatorRunner, namespace: str, infra: dict[str, Any]
) -> None:
    """spec.lake.upkeep, run by the operator's timer: small commits compacted, status.lake and events."""
    from deltalake import DeltaTable, write_deltalake

    from tradingstack.lake import MARKET_TICKS, storage_options

    from test_upkeep import ticks

    s3 = infra["infrastructure"]["s3"]
    options = storage_options(s3["endpoint"], "us-east-1", True, "testing", "testing-secret")
    # With the audit log its table joins the upkeep (it gets a commit a second from each of its sinks).
    audit = {"services": {"audit-log": {"enabled": True}}}
    create_stack(kube, namespace, "lakes", {**infra, **audit, "lake": {"upkeep": {"enabled": False}}})
    uri = MARKET_TICKS.uri(s3["bucket"])
    wait_for(lambda: condition(get_stack(kube, namespace, "lakes"), "BucketsReady").get("status") == "True", 60,
             "the lake's tables")  # fmt: skip
    for commit in range(8):
        write_deltalake(uri, ticks(commit, "sink"), mode="append", storage_options=options)
    assert len(DeltaTable(uri, storage_options=options).file_uris()) == 16
    assert not (get_stack(kube, namespace, "lakes").get("status") or {}).get("lake")  # disabled: nothing ran

    # Per table: alt_data's own policy (off) replaces the stack's.
    patch_spec(kube, namespace, "lakes", {"lake": {"upkeep": {"enabled": True, "intervalSeconds": 3600},
                                                   "tables": {"alt_data": {"enabled": False}}}})  # fmt: skip
    lake = wait_for(lambda: (get_stack(kube, namespace, "lakes").get("status") or {}).get("lake"), 60,
                    "the upkeep in status")  # fmt: skip
    assert [e["name"] for e in lake] == [MARKET_TICKS.path, "lake/audit"]
    ticks_entry = next(e for e in lake if e["name"] == MARKET_TICKS.path)
    assert ticks_entry["files"] == 2  # one per partition (BTCUSDT, ETHUSDT)
    assert "compacted 16 file(s) into 2" in ticks_entry["message"]
    assert ticks_entry["lastUpkeep"].endswith("Z")
    assert len(DeltaTable(uri, storage_options=options).to_pyarrow_table()) == 8 * 5
    events = [e for e in events_for(kube, namespace, "lakes") if e["reason"] == "LakeUpkeep"]
    assert {e["message"].split(":")[0] for e in events} == {"lake/market_ticks", "lake/audit"}
    # Not due again for an hour: later ticks of the timer leave the table and status alone.
    version = DeltaTable(uri, storage_options=options).version()
    time.sleep(3)
    assert DeltaTable(uri, storage_options=options).version() == version
    assert get_stack(kube, namespace, "lakes")["status"]["lake"] == lake


def test_the_operator_applies_its_own_crd_over_an_older_one_and_never_over_a_newer(kube: KubeClient) -> None:
    """`helm upgrade` leaves crds/ as they were: the operator brings the CRD to its own model at start,
    unless the cluster's is of a newer operator (a rollback must not prune newer fields)."""
    from tradingstack import crd

    def schema_has_role() -> bool:
        live = kube.request("GET", crd.CRD_PATH)
        accounts = live["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        return "role" in accounts["accounts"]["items"]["properties"]

    older = crd.crd()
    del older["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["accounts"][
        "items"]["properties"]["role"]  # fmt: skip
    older["metadata"]["annotations"] = {crd.VERSION_ANNOTATION: "0.0.1"}
    kube.request("PATCH", crd.CRD_PATH, body=older, query={"fieldManager": "tradingstack-operator", "force": "true"},
                 content_type="application/apply-patch+yaml")  # fmt: skip
    assert not schema_has_role()
    try:
        assert crd.ensure(kube, ours="0.0.0").startswith("kept")  # an older operator keeps its hands off
        assert not schema_has_role()
        assert crd.ensure(kube).startswith("applied")
        assert schema_has_role()
        live = kube.request("GET", crd.CRD_PATH)
        assert live["metadata"]["annotations"][crd.VERSION_ANNOTATION] == crd.operator_version()
    finally:
        crd.ensure(kube)  # the session's other tests need today's schema
