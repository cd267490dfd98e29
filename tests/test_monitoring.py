"""The chart's monitoring: ServiceMonitors that find the operator's Services, alerting rules promtool
accepts (and whose alerts fire on the series they are about), dashboards, and no metric a rule or
dashboard reads that no service exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

from test_chart import render
from tradingstack.plan import StackRef, build_plan, parse_spec
from tradingstack.reconciler import export_ready
from tradingstack_services.platform import runner

ALL_ON = {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
                      "prometheusRule": {"enabled": True}, "grafanaDashboards": {"enabled": True}}}  # fmt: skip
MONITORING_KINDS = {"ServiceMonitor", "PrometheusRule"}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is missing: `make deps` installs Debian's prometheus package")
    return found


def kinds(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def dashboards(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    maps = [d for d in kinds(docs, "ConfigMap") if "-dashboard-" in d["metadata"]["name"]]
    return {name: json.loads(text) for cm in maps for name, text in cm["data"].items()}


def rules_file(tmp_path: Path, values: dict[str, Any] = ALL_ON) -> Path:
    (rule,) = kinds(render(values), "PrometheusRule")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    return path


def test_monitoring_is_off_by_default() -> None:
    docs = render({})
    assert not [d for d in docs if d["kind"] in MONITORING_KINDS]
    assert dashboards(docs) == {}


@pytest.mark.parametrize(
    ("watch", "expected"),
    [
        ([], {"matchNames": ["ts"]}),
        (["desk-a", "desk-b"], {"matchNames": ["desk-a", "desk-b"]}),
        (["*"], {"any": True}),
    ],
    ids=["release-namespace", "listed", "cluster-wide"],
)
def test_one_service_monitor_finds_every_service_the_operator_makes(watch: list[str], expected: dict[str, Any]) -> None:
    values = {**ALL_ON, "operator": {"watchNamespaces": watch}}
    monitors = {m["metadata"]["name"]: m for m in kinds(render(values), "ServiceMonitor")}
    services = monitors["tradingstack-services"]["spec"]
    assert services["namespaceSelector"] == expected
    assert monitors["tradingstack-services"]["metadata"]["labels"]["release"] == "prometheus"
    spec = parse_spec({"services": {"compliance-scanner": {"enabled": True}}})
    made = kinds(build_plan(StackRef("demo", "desk-a"), spec).objects, "Service")
    wanted = services["selector"]["matchLabels"]
    assert len(made) == 9
    for service in made:
        assert wanted.items() <= service["metadata"]["labels"].items(), service["metadata"]["name"]
        assert [p["name"] for p in service["spec"]["ports"]] == [services["endpoints"][0]["port"]]
    operator = monitors["tradingstack-operator"]["spec"]
    (metrics_service,) = [s for s in kinds(render(values), "Service") if s["metadata"]["name"].endswith("-metrics")]
    assert operator["selector"]["matchLabels"].items() <= metrics_service["metadata"]["labels"].items()
    assert operator["endpoints"][0]["honorLabels"] is True


def test_promtool_accepts_the_rules_with_the_thresholds_filled_in(tmp_path: Path) -> None:
    values = {**ALL_ON, "metrics": {**ALL_ON["metrics"], "prometheusRule": {"enabled": True, "feedStaleSeconds": 90}}}
    path = rules_file(tmp_path, values)
    rules = {r["alert"]: r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]}
    assert rules["TradingStackFeedStale"]["expr"].endswith("(tradingstack_price_last_tick_timestamp_seconds) > 90")
    done = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 11 rules found" in done.stdout


def test_the_alerts_fire_on_their_series_and_stay_quiet_otherwise(tmp_path: Path) -> None:
    """promtool's rule unit tests: each alert against a series that must fire it and one that must not."""
    rules = rules_file(tmp_path)
    sink = 'tradingstack_sink_dead_lettered_total{namespace="t",stack="s",component="sink-ticks",table="t",reason="x"}'
    cases = {
        "rule_files": [rules.name],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": 'tradingstack_stack_ready{namespace="t",stack="down"}', "values": "0x10"},
                {"series": 'tradingstack_stack_ready{namespace="t",stack="up"}', "values": "1x10"},
                {"series": sink, "values": "0 0 0 3 3 3 3 3 3 3 3"},
                {"series": 'tradingstack_price_last_tick_timestamp_seconds{namespace="t",stack="s",symbol="BTCUSDT"}',
                 "values": "0+60x4 240x6"},
            ],
            "alert_rule_test": [
                {"eval_time": "6m", "alertname": "TradingStackNotReady", "exp_alerts": [{
                    "exp_labels": {"severity": "critical", "namespace": "t", "stack": "down"},
                    "exp_annotations": {
                        "summary": "TradingStack t/down is not Ready",
                        "description": "Its Ready condition has been False for 5 minutes: kubectl describe "
                                       "tradingstack down -n t names the failing concern."}}]},
                {"eval_time": "2m", "alertname": "TradingStackDeadLetters", "exp_alerts": []},
                {"eval_time": "5m", "alertname": "TradingStackDeadLetters", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "namespace": "t", "stack": "s", "component": "sink-ticks"},
                    "exp_annotations": {
                        "summary": "sink-ticks of s is dead-lettering messages",
                        "description": "3 messages went to the DEAD_LETTER stream in 10 minutes; each carries its "
                                       "reason (subject dlq.STREAM.REASON)."}}]},
                {"eval_time": "4m", "alertname": "TradingStackFeedStale", "exp_alerts": []},
                {"eval_time": "9m", "alertname": "TradingStackFeedStale", "exp_alerts": [{
                    "exp_labels": {"severity": "critical", "namespace": "t", "stack": "s", "symbol": "BTCUSDT"},
                    "exp_annotations": {
                        "summary": "No BTCUSDT tick in s for 5m 0s",
                        "description": "The trading services price orders from the last tick; the feed (gateway) "
                                       "is down or silent."}}]},
            ],
        }],
    }  # fmt: skip
    test_file = tmp_path / "tests.yaml"
    test_file.write_text(yaml.safe_dump(cases))
    done = subprocess.run([promtool(), "test", "rules", test_file.name], cwd=tmp_path, capture_output=True,
                          text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def exported_metrics() -> set[str]:
    """Every sample name the operator and the services (all of them imported) can export."""
    runner._factories()  # imports every service module
    import tradingstack.handlers  # noqa: F401  (the operator's metrics)

    return set(REGISTRY._names_to_collectors)


NAME = re.compile(r"\btradingstack_[a-z0-9_]*[a-z0-9]\b")
NAME_REGEX = re.compile(r'__name__=~"([^"]+)"')


def used_metrics(expression: str, exported: set[str]) -> set[str]:
    """The metric names an expression reads; a `__name__=~` regex must match one exported name per
    alternative it lists."""
    names = set()
    for pattern in NAME_REGEX.findall(expression):
        matched = {name for name in exported if re.fullmatch(pattern, name)}
        alternatives = re.search(r"\(([^()]*)\)", pattern)
        assert alternatives is not None, pattern
        assert len(matched) == len(alternatives.group(1).split("|")), (pattern, sorted(matched))
        names |= matched
    names |= set(NAME.findall(NAME_REGEX.sub("", expression)))
    return names


def test_every_metric_a_rule_or_dashboard_reads_is_one_a_service_or_the_operator_exports(tmp_path: Path) -> None:
    exported = exported_metrics()
    expressions = [r["expr"] for g in yaml.safe_load(rules_file(tmp_path).read_text())["groups"] for r in g["rules"]]
    boards = dashboards(render(ALL_ON))
    assert sorted(boards) == ["market-data.json", "platform-overview.json", "trading.json"]
    for board in boards.values():
        expressions += [t["expr"] for p in board["panels"] for t in p["targets"]]
        expressions += [v["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    used = set().union(*(used_metrics(e, exported) for e in expressions))
    assert used - exported == set()
    assert len(used) >= 20  # the parse found the names (a broken pattern would find none and pass)


def test_the_ready_gauge_follows_the_ready_condition_the_operator_writes() -> None:
    def ready(status: str) -> dict[str, Any]:
        return {"conditions": [{"type": "Progressing", "status": "True"}, {"type": "Ready", "status": status}]}

    def value() -> float | None:
        return REGISTRY.get_sample_value("tradingstack_stack_ready", {"namespace": "mon", "stack": "g"})

    export_ready("mon", "g", {"phase": "Pending"})  # no Ready condition yet: no sample rather than a guess
    assert value() is None
    export_ready("mon", "g", ready("True"))
    assert value() == 1
    export_ready("mon", "g", ready("False"))
    assert value() == 0
