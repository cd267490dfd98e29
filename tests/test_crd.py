"""The CRD is generated from the pydantic model, and the API server enforces what the model does."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from tradingstack import api
from tradingstack.crd import CRD_FILE, crd, crd_yaml
from tradingstack.kubeclient import KubeClient
from tradingstack.plan import InvalidSpecError, parse_spec

from conftest import ROOT
from kubetools import api_error, create_stack, get_stack


def test_checked_in_crd_matches_the_model() -> None:
    assert (ROOT / CRD_FILE).read_text() == crd_yaml(), "crds/ is stale: run `make crd`"


def test_crd_shape() -> None:
    version = crd()["spec"]["versions"][0]
    assert crd()["spec"]["names"]["shortNames"] == ["tstack"]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Ready", "Phase", "Services", "Age"]
    schema = version["schema"]["openAPIV3Schema"]
    text = yaml.safe_dump(schema)
    assert "$ref" not in text
    assert "anyOf" not in text
    assert "title" not in text

    def walk(node: dict[str, Any], path: str) -> None:
        # Structural: every property has a type and a description (what kubectl explain shows).
        for name, sub in node.get("properties", {}).items():
            assert "type" in sub, f"{path}.{name} has no type"
            if path.startswith(".spec"):
                assert sub.get("description"), f"{path}.{name} has no description"
            walk(sub, f"{path}.{name}")
        if "items" in node:
            walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}{{}}")

    walk(schema["properties"]["spec"], ".spec")


# Specs each rule must reject, with the text the API server's message must contain.
INVALID_SPECS = [
    pytest.param({"services": {"foo": {}}}, "unknown service name", id="unknown-service"),
    pytest.param({"symbols": ["btc.usd"]}, "should match", id="symbol-pattern"),
    pytest.param({"services": {"oms": {"replicas": -1}}}, "greater than or equal to 0", id="negative-replicas"),
    pytest.param({"services": {"oms": {"replicas": 3}, "sink-ticks": {"replicas": 2}}}, "run as one pod each",
                 id="two-sink-writers"),
    pytest.param({"services": {"audit-log": {"enabled": True, "replicas": 2}}}, "run as one pod each",
                 id="two-audit-writers"),
    pytest.param({"services": {"pnl": {"replicas": 2}}}, "run as one pod each", id="two-pnl-writers"),
    pytest.param({"riskLimits": [{"symbol": "BTC", "minQuantity": 5, "maxQuantity": 1}]},
                 "minQuantity may not exceed maxQuantity", id="min-above-max"),
    pytest.param({"infrastructure": {"s3": {"endpoint": "http://minio:9000"}}}, "allowHttp", id="plain-http"),
    pytest.param({"tables": [{"name": "t", "columns": [{"name": "a", "type": "LONG"}], "timestamp": "a"}]},
                 "designated timestamp", id="timestamp-type"),
    pytest.param({"tables": [{"name": "t", "columns": [{"name": "ts", "type": "TIMESTAMP"}, {"name": "a",
                  "type": "LONG"}], "dedupKeys": ["a"]}]}, "include the designated timestamp", id="dedup-keys"),
    pytest.param({"tables": [{"name": "t", "columns": [{"name": "ts", "type": "TIMESTAMP"}], "wal": True,
                  "partitionBy": "NONE"}]}, "must be partitioned", id="wal-unpartitioned"),
    pytest.param({"tables": [{"name": "t", "columns": [{"name": "ts", "type": "TIMESTAMP"}], "wal": False,
                  "partitionBy": "NONE", "retentionDays": 7}]}, "the table must be partitioned",
                 id="retention-unpartitioned"),
    pytest.param({"tables": [{"name": "t", "columns": [{"name": "ts", "type": "TIMESTAMP"}], "retentionDays": 0}]},
                 "greater than or equal to 1", id="retention-zero"),
    pytest.param({"lake": {"tables": {"ticks": {"intervalSeconds": 600}}}}, "unknown lake table", id="lake-table"),
    pytest.param({"lake": {"tables": {"alt_data": {"vacuumRetentionHours": 0}}}}, "greater than or equal to 1",
                 id="lake-table-vacuum"),
    pytest.param({"streams": [{"name": "S", "subjects": []}]}, "should have at least 1", id="stream-no-subjects"),
    pytest.param({"deletionPolicy": "Orphan"}, "Unsupported value", id="deletion-policy-enum"),
    pytest.param({"tables": [{"name": "t", "columns": [{"name": "ts", "type": "TIMESTAMPTZ"}]}]},
                 "Unsupported value", id="column-type"),
    # Credentials belong in Secrets: a URL lands in ConfigMaps, status and logs.
    pytest.param({"infrastructure": {"nats": {"url": "nats://app:PLANTED-pw@nats:4222"}}},
                 "credentials do not belong in a URL", id="nats-url-password"),
    pytest.param({"infrastructure": {"redis": {"url": "redis://:PLANTED-pw@redis:6379/0"}}},
                 "credentials do not belong in a URL", id="redis-url-password"),
    pytest.param({"infrastructure": {"questdb": {"url": "http://admin:PLANTED-pw@questdb:9000"}}},
                 "credentials do not belong in a URL", id="questdb-url-password"),
    pytest.param({"infrastructure": {"s3": {"endpoint": "https://key:PLANTED-pw@s3.example.com"}}},
                 "credentials do not belong in a URL", id="s3-url-password"),
    pytest.param({"infrastructure": {"nats": {"secretRef": {"name": "n", "passwordKey": "p", "tokenKey": "t"}}}},
                 "set one of passwordKey or tokenKey", id="password-and-token"),
    pytest.param({"infrastructure": {"redis": {"secretRef": {"name": "r"}}}},
                 "set one of passwordKey or tokenKey", id="secret-without-keys"),
    pytest.param({"infrastructure": {"questdb": {"secretRef": {"name": "q", "usernameKey": "u", "tokenKey": "t"}}}},
                 "usernameKey goes with passwordKey", id="user-with-token"),
    pytest.param({"infrastructure": {"redis": {"url": "redis://r:6379", "tls": {"ca": {"configMapKeyRef": {
                  "name": "ca", "key": "ca.crt"}}}}}}, "with tls, the url is rediss://", id="redis-tls-scheme"),
    pytest.param({"infrastructure": {"questdb": {"url": "http://q:9000", "tls": {"ca": {"secretKeyRef": {
                  "name": "ca", "key": "ca.crt"}}}}}}, "with tls, the url is https://", id="questdb-tls-scheme"),
    pytest.param({"services": {"oms": {"env": [{"name": "X", "value": "v", "valueFrom": {
                  "secretKeyRef": {"name": "s", "key": "k"}}}]}}}, "set value or valueFrom", id="env-value-and-from"),
    pytest.param({"services": {"oms": {"env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"},
                  "configMapKeyRef": {"name": "c", "key": "k"}}}]}}}, "set one of secretKeyRef", id="env-two-sources"),
]  # fmt: skip


@pytest.mark.parametrize(("spec", "message"), INVALID_SPECS)
def test_model_rejects_invalid_spec(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSpecError):
        parse_spec(spec)


@pytest.mark.envtest
@pytest.mark.parametrize(("spec", "message"), INVALID_SPECS)
def test_api_server_rejects_invalid_spec(
    kube: KubeClient, crd: dict[str, Any], namespace: str, spec: dict[str, Any], message: str
) -> None:
    error = api_error(lambda: create_stack(kube, namespace, "invalid", spec))
    assert error.status == 422
    assert message in error.detail
    assert "PLANTED" not in error.detail  # the refusal does not repeat the password it refused


def test_a_refused_url_is_not_repeated_in_the_error() -> None:
    with pytest.raises(InvalidSpecError) as caught:
        parse_spec({"infrastructure": {"nats": {"url": "nats://app:PLANTED-pw@nats:4222"}}})
    assert "PLANTED" not in str(caught.value)


@pytest.mark.envtest
def test_api_server_defaults_an_empty_spec_like_the_model(
    kube: KubeClient, crd: dict[str, Any], namespace: str
) -> None:
    create_stack(kube, namespace, "defaults", {})
    stored = get_stack(kube, namespace, "defaults")["spec"]
    model = api.TradingStackSpec().model_dump(by_alias=True, exclude_none=True)
    assert stored["infrastructure"] == model["infrastructure"]
    assert stored["image"] == model["image"]
    assert {k: stored[k] for k in ("paused", "deletionPolicy", "driftCheckIntervalSeconds")} == {
        k: model[k] for k in ("paused", "deletionPolicy", "driftCheckIntervalSeconds")
    }
    assert parse_spec(stored) == parse_spec({})


@pytest.mark.envtest
@pytest.mark.parametrize("sample", ["minimal", "market-data-only", "full"])
def test_samples_are_accepted(kube: KubeClient, crd: dict[str, Any], namespace: str, sample: str) -> None:
    doc = yaml.safe_load((ROOT / "manifests" / "samples" / f"{sample}.yaml").read_text())
    parse_spec(doc["spec"])
    body = copy.deepcopy(doc)
    kube.request("POST", KubeClient.path(api.KIND, namespace), body=body)
    assert get_stack(kube, namespace, doc["metadata"]["name"])["spec"]


def test_there_is_no_switch_to_skip_certificate_verification() -> None:
    """The API server prunes an unknown field (1.24 has no strict field validation); the model refuses it."""
    tls = {"ca": {"configMapKeyRef": {"name": "ca", "key": "ca.crt"}}, "insecureSkipVerify": True}
    with pytest.raises(InvalidSpecError, match="insecureSkipVerify"):
        parse_spec({"infrastructure": {"nats": {"tls": tls}}})
