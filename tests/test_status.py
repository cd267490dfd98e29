"""Conditions computed from observations: truthful, derived phase, stable transition times."""

from __future__ import annotations

from tradingstack.changes import BackendResult, ItemStatus, Problem
from tradingstack.plan import StackRef, build_plan, parse_spec
from tradingstack.status import DeploymentState, Observation, build_status, derive_phase

PLAN = build_plan(StackRef("demo", "ns", "uid", 1), parse_spec({"services": {"oms": {"replicas": 2}}}))


def deployment(name: str, replicas: int, available: int, generation: int = 1, observed: int = 1) -> dict:
    return {
        "metadata": {"name": name, "generation": generation, "labels": {"app.kubernetes.io/component": name[5:]}},
        "spec": {"replicas": replicas},
        "status": {"observedGeneration": observed, "replicas": replicas, "updatedReplicas": replicas,
                   "readyReplicas": available, "availableReplicas": available},
    }  # fmt: skip


def all_available() -> dict[str, DeploymentState]:
    return {w.name: DeploymentState.from_object(deployment(w.name, w.replicas, w.replicas)) for w in PLAN.workloads}


def ok_backends() -> dict[str, BackendResult]:
    return {
        name: BackendResult(name, items=[ItemStatus(f"{name}-1", True, "InSync")])
        for name in ("streams", "buckets", "tables", "redis")
    }


def by_type(status: dict) -> dict[str, dict]:
    return {c["type"]: c for c in status["conditions"]}


def test_all_available_is_ready() -> None:
    obs = Observation(generation=1, plan=PLAN, deployments=all_available(), backends=ok_backends())
    status = build_status(None, obs, now="T1")
    conds = by_type(status)
    assert conds["Ready"]["status"] == "True"
    assert conds["Degraded"]["status"] == "False"
    assert conds["Progressing"]["reason"] == "Reconciled"
    assert status["phase"] == "Ready"
    assert status["servicesReady"] == "8/8"
    assert all(c["observedGeneration"] == 1 and c["lastTransitionTime"] == "T1" for c in status["conditions"])


def test_one_replica_short_is_not_ready() -> None:
    states = all_available()
    states["demo-oms"] = DeploymentState.from_object(deployment("demo-oms", 2, 1))
    status = build_status(None, Observation(generation=1, plan=PLAN, deployments=states))
    assert by_type(status)["Ready"]["status"] == "False"
    assert "oms: 1/2 available" in by_type(status)["ServicesReady"]["message"]
    assert status["phase"] == "Progressing"


def test_unobserved_generation_is_not_rolled_out() -> None:
    states = all_available()
    states["demo-oms"] = DeploymentState.from_object(deployment("demo-oms", 2, 2, generation=2, observed=1))
    status = build_status(None, Observation(generation=1, plan=PLAN, deployments=states))
    assert by_type(status)["ServicesReady"]["status"] == "False"


def test_missing_deployment_is_named() -> None:
    states = all_available()
    del states["demo-pnl"]
    status = build_status(None, Observation(generation=1, plan=PLAN, deployments=states))
    assert "Deployment demo-pnl not found" in by_type(status)["Ready"]["message"]


def test_transition_time_moves_only_on_flip() -> None:
    first = build_status(
        None, Observation(generation=1, plan=PLAN, deployments=all_available(), backends=ok_backends()), now="T1"
    )
    assert by_type(first)["Ready"]["status"] == "True"
    states = all_available()
    states["demo-oms"] = DeploymentState.from_object(deployment("demo-oms", 2, 0))
    # A status refresh from a watch event: no infrastructure pass, backend conditions carried over.
    second = build_status(first, Observation(generation=2, plan=PLAN, deployments=states), now="T2")
    assert by_type(second)["StreamsReady"]["lastTransitionTime"] == "T1"
    assert by_type(second)["Ready"]["lastTransitionTime"] == "T2"
    assert by_type(second)["Degraded"]["lastTransitionTime"] == "T1"
    assert by_type(second)["Degraded"]["observedGeneration"] == 2


def test_conditions_of_other_steps_are_kept() -> None:
    existing = {"conditions": [{"type": "StreamsReady", "status": "True", "reason": "R", "message": "",
                                "lastTransitionTime": "T0"}]}  # fmt: skip
    status = build_status(existing, Observation(generation=1, plan=PLAN, deployments=all_available()))
    assert by_type(status)["StreamsReady"]["lastTransitionTime"] == "T0"


def test_invalid_spec_and_rollout_failure_phases() -> None:
    invalid = build_status(None, Observation(generation=1, plan=None, deployments={}, invalid_spec="bad"))
    assert invalid["phase"] == "Failed"
    assert by_type(invalid)["Ready"]["reason"] == "InvalidSpec"

    states = all_available()
    failed = deployment("demo-oms", 2, 0)
    failed["status"]["conditions"] = [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                       "message": "took too long"}]  # fmt: skip
    states["demo-oms"] = DeploymentState.from_object(failed)
    status = build_status(None, Observation(generation=1, plan=PLAN, deployments=states))
    assert by_type(status)["Degraded"]["reason"] == "RolloutFailed"
    assert status["phase"] == "Degraded"


def test_paused_phase() -> None:
    status = build_status(None, Observation(generation=1, plan=PLAN, deployments=all_available(), paused=True))
    assert status["phase"] == "Paused"
    assert derive_phase(status["conditions"]).value == "Paused"


def test_an_unreachable_backend_blocks_ready_and_says_why() -> None:
    backends = ok_backends()
    backends["streams"] = BackendResult("streams", unreachable="NATS at nats://x:4222: connection refused")
    status = build_status(None, Observation(generation=1, plan=PLAN, deployments=all_available(), backends=backends))
    conds = by_type(status)
    assert conds["StreamsReady"]["reason"] == "Unreachable"
    assert conds["Ready"]["reason"] == "Unreachable"
    assert "connection refused" in conds["Ready"]["message"]
    assert conds["BucketsReady"]["status"] == "True"
    assert status["buckets"] == [{"name": "buckets-1", "ready": True, "reason": "InSync", "message": ""}]


def test_immutable_change_is_reported_with_its_reason() -> None:
    backends = ok_backends()
    problem = Problem("Stream", "MARKET_TICKS", "ImmutableFieldChanged", "storage is file, spec says memory")
    backends["streams"] = BackendResult("streams", problems=[problem])
    status = build_status(None, Observation(generation=1, plan=PLAN, deployments=all_available(), backends=backends))
    assert by_type(status)["StreamsReady"]["reason"] == "ImmutableFieldChanged"
    assert "storage is file" in by_type(status)["Ready"]["message"]


def test_not_ready_before_the_first_infrastructure_pass() -> None:
    status = build_status(None, Observation(generation=1, plan=PLAN, deployments=all_available()))
    assert by_type(status)["Ready"]["status"] == "False"
    assert "not checked yet" in by_type(status)["Ready"]["message"]
