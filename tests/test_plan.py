"""The pure plan: a TradingStack spec -> Kubernetes objects, streams, consumers, buckets, tables."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tradingstack.api import ServiceName, TradingStackSpec
from tradingstack.images import ImagePolicy
from tradingstack.plan import (
    CHECKSUM_ANNOTATION,
    InvalidSpecError,
    StackRef,
    build_plan,
    parse_spec,
)

STACK = StackRef(name="demo", namespace="trading", uid="1234", generation=3)


def plan_for(spec: dict[str, Any]) -> Any:
    return build_plan(STACK, parse_spec(spec))


def by_key(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


FIRST_EIGHT = ["gateway", "normalizer", "sink-ticks", "sink-alt", "risk", "oms", "exeq", "pnl"]


def test_empty_spec_renders_all_eight_services() -> None:
    plan = plan_for({})
    deployments = [o for o in plan.objects if o["kind"] == "Deployment"]
    assert [d["metadata"]["name"] for d in deployments] == [f"demo-{s}" for s in FIRST_EIGHT]
    assert len(plan.objects) == 4 * 8 + 1  # a NetworkPolicy each, and one denying the rest
    assert [s.name for s in plan.streams][:2] == ["MARKET_TICKS", "ALT_DATA"]
    ticks = plan.streams[0]
    assert (ticks.subjects, ticks.storage, ticks.retention, ticks.discard, ticks.max_age) == (
        ["market.tick.>"], "file", "limits", "old", "24h",
    )  # fmt: skip
    assert plan.buckets == ["trader2025"]
    assert {t.name for t in plan.tables} == {"ticks", "ohlcv_1m", "orders", "fills", "positions"}
    assert {(c.stream, c.durable) for c in plan.consumers} >= {
        ("MARKET_TICKS", "trading_demo_sink-ticks"),
        ("ALT_DATA", "trading_demo_sink-alt"),
    }


def test_durable_names_are_unique_per_stack_and_valid_for_nats() -> None:
    """Two stacks reading one stream (a stream made by hand, say) must not split its messages."""
    spec = parse_spec({})
    names = {
        (ref.namespace, ref.name): {c.durable for c in build_plan(ref, spec).consumers}
        for ref in (StackRef("demo", "a"), StackRef("demo", "b"), StackRef("a.demo", "x"), StackRef("a", "demo.x"))
    }
    every = [n for group in names.values() for n in group]
    assert len(every) == len(set(every)) == 4 * 5
    long = build_plan(StackRef("s" * 52, "n" * 63), spec).consumers
    for name in every + [c.durable for c in long]:
        # NATS refuses '.', '*', '>' and whitespace in a durable name; a file store keeps it as a directory.
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,255}", name), name
    assert len({c.durable for c in long}) == 5


def test_children_carry_labels_owner_and_seed_ports() -> None:
    objects = by_key(plan_for({}).objects)
    oms = objects[("Deployment", "demo-oms")]
    assert oms["metadata"]["namespace"] == "trading"
    assert (
        oms["metadata"]["ownerReferences"][0] | {"uid": "1234", "kind": "TradingStack", "controller": True}
        == (oms["metadata"]["ownerReferences"][0])
    )
    labels = oms["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/instance"] == "demo"
    assert labels["app.kubernetes.io/component"] == "oms"
    assert oms["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container = oms["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"][0]["containerPort"] == 8099
    assert container["args"] == ["service", "oms"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert objects[("Service", "demo-gateway")]["spec"]["ports"][0]["port"] == 8080
    assert objects[("ConfigMap", "demo-sink-ticks")]["data"]["NATS_DURABLE"] == "trading_demo_sink-ticks"


def test_config_change_changes_checksum_only_where_config_changed() -> None:
    base = by_key(plan_for({}).objects)
    changed = by_key(plan_for({"services": {"oms": {"env": [{"name": "LOG_LEVEL", "value": "debug"}]}}}).objects)

    def checksum(objs: dict[tuple[str, str], dict[str, Any]], name: str) -> str:
        return str(objs[("Deployment", name)]["spec"]["template"]["metadata"]["annotations"][CHECKSUM_ANNOTATION])

    assert checksum(base, "demo-oms") != checksum(changed, "demo-oms")
    assert checksum(base, "demo-risk") == checksum(changed, "demo-risk")
    assert changed[("ConfigMap", "demo-oms")]["data"]["LOG_LEVEL"] == "debug"


def test_plan_is_deterministic() -> None:
    assert plan_for({"symbols": ["AAPL"]}).objects == plan_for({"symbols": ["AAPL"]}).objects


def test_disabled_service_has_no_objects_and_no_consumer() -> None:
    plan = plan_for({"services": {"sink-alt": {"enabled": False}}})
    assert not any(o["metadata"]["name"] == "demo-sink-alt" for o in plan.objects)
    assert ServiceName.SINK_ALT not in {c.service for c in plan.consumers}


def test_secret_ref_reaches_only_the_lake_writers() -> None:
    objects = by_key(plan_for({"infrastructure": {"s3": {"allowHttp": True, "secretRef": {"name": "creds"}}}}).objects)
    sink_env = objects[("Deployment", "demo-sink-ticks")]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {e["name"] for e in sink_env} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert sink_env[0]["valueFrom"]["secretKeyRef"]["name"] == "creds"
    assert "env" not in objects[("Deployment", "demo-oms")]["spec"]["template"]["spec"]["containers"][0]
    assert not any("SECRET" in k for k in objects[("ConfigMap", "demo-sink-ticks")]["data"])


def _env(objects: dict[tuple[str, str], dict[str, Any]], service: str) -> dict[str, Any]:
    container = objects[("Deployment", f"demo-{service}")]["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["valueFrom"] for e in container.get("env", [])}


def test_server_credentials_reach_pods_from_their_secret_only_and_each_service_gets_only_its_servers() -> None:
    spec = {
        "infrastructure": {
            "nats": {"secretRef": {"name": "bus", "usernameKey": "u", "passwordKey": "p"}},
            "redis": {"secretRef": {"name": "kv", "tokenKey": "t"}},
            "questdb": {"secretRef": {"name": "db", "usernameKey": "qu", "passwordKey": "qp"}},
        },
        "services": {"oms": {"env": [{"name": "VENUE_KEY", "valueFrom": {"secretKeyRef": {"name": "v", "key": "k"}}},
                                     {"name": "TICK_RATE", "value": "5"}]}},
    }  # fmt: skip
    objects = by_key(plan_for(spec).objects)
    nats = {"NATS_USER": {"secretKeyRef": {"name": "bus", "key": "u"}},
            "NATS_PASSWORD": {"secretKeyRef": {"name": "bus", "key": "p"}}}  # fmt: skip
    assert _env(objects, "gateway") == nats
    assert _env(objects, "risk") == nats | {"REDIS_PASSWORD": {"secretKeyRef": {"name": "kv", "key": "t"}}}
    assert _env(objects, "normalizer") == nats | {
        "QUESTDB_USER": {"secretKeyRef": {"name": "db", "key": "qu"}},
        "QUESTDB_PASSWORD": {"secretKeyRef": {"name": "db", "key": "qp"}},
    }
    assert _env(objects, "oms")["VENUE_KEY"] == {"secretKeyRef": {"name": "v", "key": "k"}}
    assert set(_env(objects, "oms")) == {*nats, "REDIS_PASSWORD", "QUESTDB_USER", "QUESTDB_PASSWORD", "VENUE_KEY"}
    for (kind, _), obj in objects.items():
        if kind == "ConfigMap":  # a variable from a Secret is never copied into a ConfigMap
            assert not {"NATS_PASSWORD", "REDIS_PASSWORD", "QUESTDB_PASSWORD", "VENUE_KEY"} & set(obj["data"])
    assert objects[("ConfigMap", "demo-oms")]["data"]["TICK_RATE"] == "5"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"streams": [{"name": "A", "subjects": ["market.>"]}, {"name": "B", "subjects": ["market.tick.x"]}]},
         "overlapping subjects"),
        ({"streams": [{"name": "A", "subjects": ["a.*"]}, {"name": "B", "subjects": ["*.b"]}]}, "overlapping"),
        ({"streams": [{"name": "ORDERS", "subjects": ["orders.>"]}]}, "reads stream MARKET_TICKS"),
        ({"streams": [{"name": "S", "subjects": ["s.>"], "maxAge": "1m", "duplicateWindow": "2m"}]},
         "duplicateWindow"),
        ({"tables": [{"name": "t", "columns": [{"name": "ts", "type": "TIMESTAMP"}, {"name": "a", "type": "LONG"}],
                      "dedupKeys": ["ts", "b"]}]}, "dedup key must be a column"),
    ],
)  # fmt: skip
def test_semantic_errors_raise_invalid_spec(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSpecError, match=message):
        plan_for(spec)


def test_disjoint_subjects_are_fine() -> None:
    spec = {
        "streams": [{"name": "A", "subjects": ["a.*"]}, {"name": "B", "subjects": ["a.b.c"]}],
        "services": {s: {"enabled": False} for s in ("normalizer", "sink-ticks", "sink-alt", "exeq", "pnl")},
    }
    assert [s.name for s in plan_for(spec).streams] == ["A", "B"]


def test_name_too_long_for_child_names() -> None:
    with pytest.raises(InvalidSpecError, match="too long"):
        build_plan(StackRef(name="x" * 60, namespace="ns"), TradingStackSpec())


@pytest.mark.parametrize(
    ("image", "allowed"),
    [
        ("ghcr.io/tradingstack/tradingstack:0.1.0", True),
        ("ghcr.io/tradingstack/tradingstack@sha256:" + "a" * 64, True),
        ("ghcr.io/tradingstack", True),
        ("ghcr.io/tradingstack-evil/x:1", False),  # a prefix of the name is not the repository
        ("ghcr.io/tradingstackx:1", False),
        ("registry.local:5000/tradingstack/app:2", True),  # the registry's port is not a tag
        ("registry.local:5000/other/app:2", False),
        ("docker.io/library/python:3.11", False),
    ],
)
def test_image_policy_allows_a_repository_and_what_is_below_it(image: str, allowed: bool) -> None:
    policy = ImagePolicy(("ghcr.io/tradingstack", "registry.local:5000/tradingstack"))
    assert policy.allows(image) is allowed
    assert ImagePolicy().allows(image)  # no list: the operator runs whatever the spec says


def test_image_policy_names_each_refused_image_once() -> None:
    plan = plan_for({"services": {"oms": {"image": "evil.io/x:1"}, "risk": {"image": "evil.io/x:1"}}})
    refusal = ImagePolicy(("ghcr.io/tradingstack",)).refusal(plan)
    assert refusal is not None
    assert refusal.count("evil.io/x:1") == 1
    assert ImagePolicy(("ghcr.io/tradingstack", "evil.io")).refusal(plan) is None


def test_accounts_reach_the_oms_as_names_in_its_config_and_key_digests_from_their_secrets() -> None:
    spec = {"accounts": [{"name": "desk-a", "secretRef": {"name": "a-keys"}},
                         {"name": "desk-b", "secretRef": {"name": "b-keys", "key": "digests"}}]}  # fmt: skip
    objects = by_key(plan_for(spec).objects)
    assert objects[("ConfigMap", "demo-oms")]["data"]["AUTH_ACCOUNTS"] == "desk-a,desk-b"
    assert _env(objects, "oms") == {
        "AUTH_KEYS_DESK_A": {"secretKeyRef": {"name": "a-keys", "key": "sha256"}},
        "AUTH_KEYS_DESK_B": {"secretKeyRef": {"name": "b-keys", "key": "digests"}},
    }
    assert "AUTH_ACCOUNTS" not in objects[("ConfigMap", "demo-risk")]["data"]  # only order entry authenticates
    assert "env" not in objects[("Deployment", "demo-risk")]["spec"]["template"]["spec"]["containers"][0]
    with pytest.raises(InvalidSpecError, match="accounts"):
        plan_for({"accounts": [{"name": "Desk_A", "secretRef": {"name": "k"}}]})


def _policy(objects: dict[tuple[str, str], dict[str, Any]], service: str) -> dict[str, Any]:
    spec: dict[str, Any] = objects[("NetworkPolicy", f"demo-{service}")]["spec"]
    return spec


def test_network_policies_deny_by_default_and_open_only_the_platform_flows() -> None:
    spec = {
        "infrastructure": {"nats": {"url": "nats://nats.infra:4333"}, "redis": {"url": "redis://redis"},
                           "questdb": {"url": "https://questdb.example"}},
        "networkPolicy": {"apiFrom": [{"namespaceLabels": {"team": "desks"}}],
                          "metricsFrom": [{"namespaceLabels": {"name": "monitoring"}, "podLabels": {"app": "prom"}}]},
    }  # fmt: skip
    objects = by_key(plan_for(spec).objects)
    deny = objects[("NetworkPolicy", "demo-default-deny")]["spec"]
    assert deny == {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "tradingstack",
                                                    "app.kubernetes.io/instance": "demo"}},
                    "policyTypes": ["Ingress", "Egress"]}  # fmt: skip

    def egress(service: str) -> set[int]:
        rules = _policy(objects, service)["egress"]
        assert rules[0]["ports"] == [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]  # DNS
        return {p["port"] for p in rules[1]["ports"]}

    assert egress("gateway") == {4333, 8099}  # and the OMS, for the dashboard's calls
    assert egress("risk") == {4333, 6379}
    assert egress("pnl") == {4333, 6379, 443}
    assert egress("sink-ticks") == {4333, 8333}
    monitoring = {
        "namespaceSelector": {"matchLabels": {"name": "monitoring"}},
        "podSelector": {"matchLabels": {"app": "prom"}},
    }
    desks = {"namespaceSelector": {"matchLabels": {"team": "desks"}}, "podSelector": {}}
    gateway = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "tradingstack",
                                               "app.kubernetes.io/instance": "demo",
                                               "app.kubernetes.io/component": "gateway"}}}  # fmt: skip
    assert _policy(objects, "oms")["ingress"] == [
        {"from": [monitoring, desks, gateway], "ports": [{"protocol": "TCP", "port": 8099}]}
    ]
    assert _policy(objects, "risk")["ingress"] == [{"from": [monitoring], "ports": [{"protocol": "TCP", "port": 8095}]}]
    assert _policy(objects, "risk")["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "risk"

    defaults = by_key(plan_for({}).objects)
    assert _policy(defaults, "gateway")["ingress"][0]["from"] == [{"podSelector": {}}]  # the stack's namespace
    assert not [k for k in by_key(plan_for({"networkPolicy": {"enabled": False}}).objects) if k[0] == "NetworkPolicy"]


def test_the_gateway_reaches_the_oms_by_its_service_and_only_when_there_is_one() -> None:
    objects = by_key(plan_for({"services": {"oms": {"port": 9100}}}).objects)
    assert objects[("ConfigMap", "demo-gateway")]["data"]["TRADING_API_URL"] == "http://demo-oms:9100"
    assert objects[("Service", "demo-oms")]["spec"]["ports"][0]["port"] == 9100
    without = by_key(plan_for({"services": {"oms": {"enabled": False}}}).objects)
    assert "TRADING_API_URL" not in without[("ConfigMap", "demo-gateway")]["data"]
    assert {p["port"] for p in _policy(without, "gateway")["egress"][1]["ports"]} == {4222}


def test_an_order_policy_reaches_the_oms_config_and_its_network_policy() -> None:
    spec = {"orderAuthorization": {"url": "http://opa.policy:8181"}}
    objects = by_key(plan_for(spec).objects)
    config = objects[("ConfigMap", "demo-oms")]["data"]
    assert (config["AUTHZ_URL"], config["AUTHZ_DECISION_PATH"]) == (
        "http://opa.policy:8181",
        "tradingstack/orders/allow",
    )
    oms_ports = {p["port"] for p in _policy(objects, "oms")["egress"][1]["ports"]}
    assert 8181 in oms_ports
    assert 8181 not in {p["port"] for p in _policy(objects, "risk")["egress"][1]["ports"]}
    with pytest.raises(InvalidSpecError, match="credentials"):
        plan_for({"orderAuthorization": {"url": "http://u:p@opa:8181"}})


def test_account_risk_limits_reach_risk_only() -> None:
    limit = {"symbol": "BTCUSDT", "maxPosition": 2}
    spec = {"accounts": [{"name": "desk-a", "secretRef": {"name": "k"}, "riskLimits": [limit]},
                         {"name": "desk-b", "secretRef": {"name": "k2"}}]}  # fmt: skip
    objects = by_key(plan_for(spec).objects)
    by_account = json.loads(objects[("ConfigMap", "demo-risk")]["data"]["RISK_ACCOUNT_LIMITS"])
    assert list(by_account) == ["desk-a"]
    assert by_account["desk-a"][0]["maxPosition"] == 2
    assert "RISK_ACCOUNT_LIMITS" not in objects[("ConfigMap", "demo-oms")]["data"]
    assert "RISK_ACCOUNT_LIMITS" not in by_key(plan_for({}).objects)[("ConfigMap", "demo-risk")]["data"]


def test_the_compliance_scanner_is_opt_in_and_brings_its_stream_table_consumer_and_rules() -> None:
    off = plan_for({})
    assert "COMPLIANCE" not in [s.name for s in off.streams]
    assert "compliance_alerts" not in [t.name for t in off.tables]
    spec = {"services": {"compliance-scanner": {"enabled": True}}, "compliance": {"washTradeWindowSeconds": 5},
            "riskLimits": [{"symbol": "BTCUSDT", "maxPosition": 3}]}  # fmt: skip
    on = plan_for(spec)
    assert [s.subjects for s in on.streams if s.name == "COMPLIANCE"] == [["compliance.alert.>"]]
    assert [t.dedup_keys for t in on.tables if t.name == "compliance_alerts"] == [["ts", "alert_id"]]
    assert [(c.stream, c.filter_subject) for c in on.consumers if c.service == "compliance-scanner"] == [
        ("ORDERS", "orders.>")
    ]
    config = by_key(on.objects)[("ConfigMap", "demo-compliance-scanner")]["data"]
    assert json.loads(config["COMPLIANCE_RULES"])["washTradeWindowSeconds"] == 5
    assert json.loads(config["RISK_LIMITS"])[0]["maxPosition"] == 3  # breaches are judged on risk's limits
    # A stream the user declares under that name wins over the service's own.
    mine = {"name": "COMPLIANCE", "subjects": ["compliance.alert.>"], "maxAge": "48h"}
    spec_with_own = {**spec, "streams": [*[s.model_dump(by_alias=True) for s in off.streams], mine]}
    assert [s.max_age for s in plan_for(spec_with_own).streams if s.name == "COMPLIANCE"] == ["48h"]


def test_a_long_stack_name_is_judged_by_the_services_it_runs() -> None:
    name = "n" * (63 - 1 - len("sink-ticks"))  # fits every default service, not compliance-scanner
    assert build_plan(StackRef(name=name, namespace="t"), parse_spec({})).workloads
    with pytest.raises(InvalidSpecError, match="compliance-scanner"):
        build_plan(
            StackRef(name=name, namespace="t"), parse_spec({"services": {"compliance-scanner": {"enabled": True}}})
        )


def test_execution_quality_is_opt_in_and_reads_every_order_event_into_its_table() -> None:
    assert "execution_quality" not in [t.name for t in plan_for({}).tables]
    on = plan_for({"services": {"execution-quality": {"enabled": True}}})
    (table,) = [t for t in on.tables if t.name == "execution_quality"]
    assert (table.dedup_keys, table.timestamp) == (["ts", "fill_id"], "ts")
    assert [(c.stream, c.filter_subject) for c in on.consumers if c.service == "execution-quality"] == [
        ("ORDERS", "orders.>")
    ]
    config = by_key(on.objects)[("ConfigMap", "demo-execution-quality")]["data"]
    assert (config["PORT"], config["NATS_DURABLE"]) == ("8106", "trading_demo_execution-quality")
    env = by_key(on.objects)[("Deployment", "demo-execution-quality")]["spec"]["template"]["spec"]["containers"][0]
    assert "REDIS" not in str(env.get("env", []))  # it needs no Redis, so gets no Redis credentials


@pytest.mark.parametrize("with_scanner", [False, True], ids=["alone", "with-the-compliance-scanner"])
def test_the_audit_log_reads_every_stream_of_record_and_brings_its_table(with_scanner: bool) -> None:
    services = {"audit-log": {"enabled": True}} | ({"compliance-scanner": {"enabled": True}} if with_scanner else {})
    plan = plan_for({"services": services})
    reads = [(c.stream, c.durable) for c in plan.consumers if c.service == "audit-log"]
    expected = ["ORDERS", "FILLS", "POSITIONS", *(["COMPLIANCE"] if with_scanner else []), "AUDIT"]
    assert [stream for stream, _ in reads] == expected
    assert reads[0][1] == "trading_demo_audit-log"
    assert reads[1][1] == "trading_demo_audit-log_fills"
    assert {"POSITIONS", "AUDIT"} <= {s.name for s in plan.streams}
    assert "lake/audit" in plan.lake_tables
    objects = by_key(plan.objects)
    config = objects[("ConfigMap", "demo-audit-log")]["data"]
    assert [s for s, _, _ in json.loads(config["AUDIT_SOURCES"])] == expected[1:]
    assert objects[("ConfigMap", "demo-pnl")]["data"]["POSITIONS_JETSTREAM"] == "true"
    assert "POSITIONS_JETSTREAM" not in by_key(plan_for({}).objects)[("ConfigMap", "demo-pnl")]["data"]
    assert "lake/audit" not in plan_for({}).lake_tables


def test_the_live_gateway_is_opt_in_and_may_reach_its_venue_only() -> None:
    assert "live-gateway" not in [w.service for w in plan_for({}).workloads]
    on = plan_for({"services": {"live-gateway": {"enabled": True}}})
    policy = by_key(on.objects)[("NetworkPolicy", "demo-live-gateway")]["spec"]
    ports = {p["port"] for p in policy["egress"][1]["ports"]}
    assert ports == {4222, 443, 9443}  # NATS, and Binance's public stream ports
    assert "REDIS" not in json.dumps(by_key(on.objects)[("Deployment", "demo-live-gateway")])
    own = {"services": {"live-gateway": {"enabled": True, "env": [{"name": "LIVE_WS_URL", "value": "wss://md:8443"}]}}}
    policy = by_key(plan_for(own).objects)[("NetworkPolicy", "demo-live-gateway")]["spec"]
    assert {p["port"] for p in policy["egress"][1]["ports"]} == {4222, 8443}


def test_ptrc_is_opt_in_reads_every_fill_and_brings_its_report_table() -> None:
    assert "lake/reports" not in plan_for({}).lake_tables
    on = plan_for({"services": {"ptrc": {"enabled": True}}})
    assert "lake/reports" in on.lake_tables
    assert [(c.stream, c.filter_subject) for c in on.consumers if c.service == "ptrc"] == [("FILLS", "fills.>")]
    policy = by_key(on.objects)[("NetworkPolicy", "demo-ptrc")]["spec"]
    assert {p["port"] for p in policy["egress"][1]["ports"]} >= {4222, 6379}  # NATS, Redis (and S3)


def test_the_single_writers_roll_with_recreate_and_the_others_overlap() -> None:
    """A sink's rollout never runs an old and a new pod together (two writers of one Delta table
    would commit a redelivered message twice); the other services roll as usual."""
    plan = build_plan(StackRef("demo", "ns"), parse_spec({"services": {"sink-alt": {"replicas": 1}}}))
    strategies = {o["metadata"]["name"]: o["spec"].get("strategy") for o in plan.objects if o["kind"] == "Deployment"}
    assert strategies["demo-sink-ticks"] == strategies["demo-sink-alt"] == {"type": "Recreate"}
    assert strategies["demo-pnl"] == {"type": "Recreate"}
    assert strategies["demo-oms"] is None
    assert strategies["demo-exeq"] is None
    assert parse_spec({"services": {"sink-ticks": {"replicas": 0}}}).service(ServiceName.SINK_TICKS).replicas == 0
