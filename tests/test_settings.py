"""Service settings: the names the operator's ConfigMaps set are the names the services read."""

from __future__ import annotations

import pytest

from tradingstack.api import DEFAULT_PORTS, ServiceName
from tradingstack.plan import StackRef, build_plan, parse_spec
from tradingstack_services.platform.settings import ServiceSettings

# Set by the operator for people and tools (logs, OTel SDK), not read by the settings model.
NOT_SETTINGS = {"STACK_NAME", "STACK_NAMESPACE", "OTEL_SERVICE_NAME"}


@pytest.mark.parametrize("service", list(ServiceName))
def test_each_service_defaults_to_its_seed_port(service: ServiceName, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PORT", raising=False)
    assert DEFAULT_PORTS[service] == ServiceSettings(SERVICE_NAME=service.value).PORT  # type: ignore[call-arg]
    monkeypatch.setenv("PORT", "9999")
    assert ServiceSettings(SERVICE_NAME=service.value).PORT == 9999  # type: ignore[call-arg]


def test_every_variable_the_operator_sets_is_read_by_the_services() -> None:
    spec = parse_spec({"riskLimits": [{"symbol": "BTCUSDT"}], "services": {"oms": {"port": 9100}}})
    plan = build_plan(StackRef("s", "ns"), spec)
    fields = set(ServiceSettings.model_fields)
    for workload in plan.workloads:
        unknown = set(workload.config) - fields - NOT_SETTINGS
        assert not unknown, f"{workload.service.value} is given {sorted(unknown)}, which no setting reads"
        settings = ServiceSettings(**workload.config)  # type: ignore[arg-type]
        assert workload.port == settings.PORT
    oms = next(w for w in plan.workloads if w.service is ServiceName.OMS)
    assert ServiceSettings(**oms.config).PORT == 9100  # type: ignore[arg-type]
