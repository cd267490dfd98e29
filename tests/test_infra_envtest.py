"""The operator provisioning streams, buckets and tables: real kube-apiserver, nats-server, S3, QuestDB double."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import nats
import pytest

from tradingstack.kubeclient import KubeClient

from conftest import NatsServer, OperatorRunner, free_port, wait_for
from kubetools import condition, create_stack, events_for, patch_spec, wait_children, wait_condition

pytestmark = pytest.mark.envtest


def with_nats(infra: dict[str, Any], url: str, **spec: Any) -> dict[str, Any]:
    result = copy.deepcopy(infra)
    result["infrastructure"]["nats"]["url"] = url
    return {**result, **spec}


def stream_max_age(url: str, name: str, new: float | None = None) -> float:
    async def run() -> float:
        nc = await nats.connect(url)
        try:
            jsm = nc.jsm()
            config = (await jsm.stream_info(name)).config
            if new is not None:
                config.max_age, config.duplicate_window = new, min(new, 120.0)
                await jsm.update_stream(config)
            return float(config.max_age)
        finally:
            await nc.close()

    return asyncio.run(run())


def test_every_stream_bucket_and_table_is_created_and_reported(
    kube: KubeClient, operator: OperatorRunner, namespace: str, infra: dict[str, Any], questdb: Any
) -> None:
    create_stack(kube, namespace, "infra", infra)
    stack = wait_condition(kube, namespace, "infra", "TablesReady", "True")
    stack = wait_condition(kube, namespace, "infra", "StreamsReady", "True")
    assert condition(stack, "BucketsReady")["status"] == "True"
    status = stack["status"]
    assert {s["name"] for s in status["streams"]} >= {"MARKET_TICKS", "ALT_DATA", "ORDERS", "FILLS", "DEAD_LETTER"}
    bucket = infra["infrastructure"]["s3"]["bucket"]
    assert {b["name"] for b in status["buckets"]} == {bucket, f"{bucket}/lake/market_ticks", f"{bucket}/lake/alt_data"}
    assert {t["name"] for t in status["tables"]} == {"ticks", "ohlcv_1m", "orders", "fills", "positions"}
    assert {"ticks", "ohlcv_1m", "orders", "fills", "positions"} <= set(questdb.state.tables)


def test_hand_made_drift_is_repaired_within_one_interval(
    kube: KubeClient, operator: OperatorRunner, namespace: str, infra: dict[str, Any], questdb: Any, tmp_path: Path
) -> None:
    server = NatsServer(tmp_path / "js")
    server.start()
    try:
        create_stack(kube, namespace, "drift", with_nats(infra, server.url, driftCheckIntervalSeconds=10))
        wait_condition(kube, namespace, "drift", "StreamsReady", "True")
        wait_condition(kube, namespace, "drift", "TablesReady", "True")

        stream_max_age(server.url, "MARKET_TICKS", new=60.0)  # someone in nats-box
        del questdb.state.tables["fills"].columns["price"]  # an old table without a column
        wait_for(lambda: stream_max_age(server.url, "MARKET_TICKS") == 24 * 3600, 15, "max_age repaired")
        wait_for(lambda: "price" in questdb.state.tables["fills"].columns, 15, "column added back")
        # The event is posted after every backend of the pass has applied, and kopf posts events from
        # a queue of its own: it can arrive after the repair is visible.
        wait_for(
            lambda: any(e["reason"] == "Applied" and "max_age drifted" in e["message"]
                        for e in events_for(kube, namespace, "drift")),
            15, "an Applied event naming the drift",
        )  # fmt: skip
    finally:
        server.stop()


def test_unreachable_backend_is_reported_and_recovers(
    kube: KubeClient, operator: OperatorRunner, namespace: str, infra: dict[str, Any], tmp_path: Path
) -> None:
    server = NatsServer(tmp_path / "js", port=free_port())  # not started yet
    create_stack(kube, namespace, "down", with_nats(infra, server.url, driftCheckIntervalSeconds=10))
    stack = wait_condition(kube, namespace, "down", "StreamsReady", "False", "Unreachable")
    assert server.url in condition(stack, "StreamsReady")["message"]
    assert condition(stack, "Ready")["status"] == "False"
    # The rest keeps reconciling: workloads and the other backends are in place.
    wait_children(kube, namespace, "down", 24)
    wait_condition(kube, namespace, "down", "BucketsReady", "True")
    wait_condition(kube, namespace, "down", "TablesReady", "True")

    server.start()
    try:
        wait_condition(kube, namespace, "down", "StreamsReady", "True", timeout=30)
    finally:
        server.stop()


def test_immutable_change_is_reported_and_leaves_the_stream_alone(
    kube: KubeClient, operator: OperatorRunner, namespace: str, infra: dict[str, Any], tmp_path: Path
) -> None:
    server = NatsServer(tmp_path / "js")
    server.start()
    try:
        create_stack(kube, namespace, "immut", with_nats(infra, server.url))
        wait_condition(kube, namespace, "immut", "StreamsReady", "True")
        streams = [
            {"name": "MARKET_TICKS", "subjects": ["market.tick.>"], "storage": "memory"},
            {"name": "ALT_DATA", "subjects": ["alt.norm.>"]},
            {"name": "ORDERS", "subjects": ["orders.>"]},
            {"name": "FILLS", "subjects": ["fills.>"]},
        ]
        patch_spec(kube, namespace, "immut", {"streams": streams})
        stack = wait_condition(kube, namespace, "immut", "StreamsReady", "False", "ImmutableFieldChanged")
        assert "storage is file, spec says memory" in condition(stack, "StreamsReady")["message"]
        assert wait_for(lambda: [e for e in events_for(kube, namespace, "immut")
                                 if e["reason"] == "ImmutableFieldChanged"])  # fmt: skip
        assert stream_max_age(server.url, "MARKET_TICKS") == 24 * 3600  # still there, untouched
    finally:
        server.stop()
