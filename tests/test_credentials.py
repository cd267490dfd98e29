"""Credentials come from Secrets and go nowhere else: a planted password is looked for everywhere.

Real servers that demand them: nats-server with a user and password, redis-server with
requirepass, the QuestDB double with HTTP basic auth. The operator (envtest) reads them from a
Secret, provisions with them, and must leave the password out of every ConfigMap, Deployment,
status, event and log line; a service started from the plan's environment (the Secret's values
put where Kubernetes would put them) must get ready with them, and say why when they are wrong
without repeating them.
"""

from __future__ import annotations

import base64
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tradingstack.backends.jetstream import JetStreamProvisioner
from tradingstack.backends.questdb import QuestDBProvisioner
from tradingstack.changes import UnreachableError
from tradingstack.credentials import ServerCredentials, redact_url
from tradingstack.kubeclient import KubeClient
from tradingstack.plan import StackRef, build_plan, parse_spec, secret_env

from conftest import NatsServer, OperatorRunner, RedisServer, free_port, http_json, wait_for
from kubetools import create_stack, events_for, get_stack, wait_condition

PASSWORD = "PLANTED-s3cr3t-0d4b"  # the needle every check looks for
USER = "trading"
SECRET = "platform-credentials"


class AuthNatsServer(NatsServer):
    def arguments(self) -> list[str]:
        return [*super().arguments(), "--user", USER, "--pass", PASSWORD]


class AuthRedisServer(RedisServer):
    def arguments(self) -> list[str]:
        return [*super().arguments(), "--requirepass", PASSWORD]


@pytest.fixture
def servers(tmp_path: Path, questdb: Any) -> Iterator[dict[str, Any]]:
    nats_server, redis_server = AuthNatsServer(tmp_path / "nats"), AuthRedisServer(tmp_path / "redis")
    nats_server.start()
    redis_server.start()
    questdb.state.authorization = ServerCredentials(USER, PASSWORD).authorization()
    yield {"nats": nats_server, "redis": redis_server, "questdb": questdb}
    redis_server.stop()
    nats_server.stop()


def auth_spec(servers: dict[str, Any], infra: dict[str, Any] | None = None) -> dict[str, Any]:
    ref = {"name": SECRET, "usernameKey": "user", "passwordKey": "password"}
    spec: dict[str, Any] = {"infrastructure": {**(infra or {}).get("infrastructure", {})}}
    spec["infrastructure"] |= {
        "nats": {"url": servers["nats"].url, "secretRef": dict(ref)},
        "redis": {"url": servers["redis"].url, "secretRef": {"name": SECRET, "passwordKey": "password"}},
        "questdb": {"url": servers["questdb"].url, "secretRef": dict(ref)},
    }
    return spec


def test_provisioners_use_credentials_and_say_when_they_are_refused(servers: dict[str, Any]) -> None:
    plan = build_plan(StackRef("creds", "ns"), parse_spec(auth_spec(servers)))
    good = ServerCredentials(USER, PASSWORD)
    wrong = ServerCredentials(USER, "not-it")
    for credentials in (ServerCredentials(), wrong):
        refused = JetStreamProvisioner(servers["nats"].url, credentials=credentials)
        with pytest.raises(UnreachableError) as nats_error:
            refused.reconcile(plan)
        assert "PLANTED" not in str(nats_error.value)
        with pytest.raises(UnreachableError, match="credentials refused") as questdb_error:
            QuestDBProvisioner(servers["questdb"].url, credentials=credentials).reconcile(plan)
        assert "PLANTED" not in str(questdb_error.value)
    assert JetStreamProvisioner(servers["nats"].url, credentials=good).reconcile(plan).ok
    assert QuestDBProvisioner(servers["questdb"].url, credentials=good).reconcile(plan).ok
    assert "ticks" in servers["questdb"].state.tables


def test_redacted_urls_keep_the_server_and_lose_the_credentials() -> None:
    assert redact_url(f"nats://{USER}:{PASSWORD}@nats:4222") == "nats://***@nats:4222"
    assert redact_url(f"redis://:{PASSWORD}@redis:6379/0") == "redis://***@redis:6379/0"
    assert redact_url("http://questdb:9000/exec?x=a@b") == "http://questdb:9000/exec?x=a@b"


def _service_env(spec: dict[str, Any], service: str, values: dict[str, str]) -> dict[str, str]:
    """The service's environment as Kubernetes makes it: the ConfigMap, then env from the Secret."""
    plan = build_plan(StackRef("creds", "ns"), parse_spec(spec))
    workload = next(w for w in plan.workloads if w.service.value == service)
    env = {**workload.config, "PORT": str(free_port()), "LOG_FORMAT": "json"}
    for name, source in secret_env(plan.spec, workload.service).items():
        env[name] = values[source["secretKeyRef"]["key"]]
    return env


@pytest.mark.parametrize("password", [PASSWORD, "wrong-password"])
def test_a_service_connects_with_its_secret_and_never_prints_it(
    servers: dict[str, Any], tmp_path: Path, password: str
) -> None:
    """pnl talks to all three servers. With the right password it gets ready; with a wrong one it
    says which dependency refused, and neither its answers nor its logs hold a password."""
    spec = auth_spec(servers)
    plan = build_plan(StackRef("creds", "ns"), parse_spec(spec))
    assert JetStreamProvisioner(servers["nats"].url, credentials=ServerCredentials(USER, PASSWORD)).reconcile(plan).ok
    env = _service_env(spec, "pnl", {"user": USER, "password": password})
    log = tmp_path / "pnl.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "tradingstack.cli", "service", "pnl"],
                                   env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{env['PORT']}"
    try:
        if password == PASSWORD:
            wait_for(lambda: http_json(f"{url}/readyz")[0] == 200, 60, "pnl ready with the Secret's credentials")
        else:
            wait_for(lambda: http_json(f"{url}/healthz")[0] == 200, 60, "pnl answering")
            wait_for(lambda: "redis" in str(http_json(f"{url}/readyz")[1]), 30, "readiness naming redis")
            status, body = http_json(f"{url}/readyz")
            assert status == 503
            assert "wrong-password" not in str(body)
        bodies = [str(http_json(f"{url}{path}")[1]) for path in ("/readyz", "/healthz")]
    finally:
        process.terminate()
        process.wait(30)
    text = log.read_text() + "".join(bodies)
    assert PASSWORD not in text
    assert "wrong-password" not in text


@pytest.mark.envtest
def test_the_operator_provisions_with_the_secret_and_leaks_it_nowhere(
    kube: KubeClient, operator: OperatorRunner, namespace: str, infra: dict[str, Any], servers: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.DEBUG)

    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    secret = {"metadata": {"name": SECRET}, "data": {"user": b64(USER), "password": b64(PASSWORD)}}
    kube.request("POST", f"/api/v1/namespaces/{namespace}/secrets", body=secret)
    spec = auth_spec(servers, infra)
    create_stack(kube, namespace, "creds", spec)
    wait_condition(kube, namespace, "creds", "StreamsReady", "True", timeout=60)
    stack = wait_condition(kube, namespace, "creds", "TablesReady", "True", timeout=60)
    assert "ticks" in servers["questdb"].state.tables  # made through basic auth

    deployments = kube.list("Deployment", namespace, {"app.kubernetes.io/instance": "creds"})
    pnl = next(d for d in deployments if d["metadata"]["name"] == "creds-pnl")
    env = {e["name"]: e for e in pnl["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"] == {"secretKeyRef": {"name": SECRET, "key": "password"}}
    everything = {
        "configmaps": kube.list("ConfigMap", namespace, {}),
        "deployments": deployments,
        "status": stack["status"],
        "events": events_for(kube, namespace, "creds"),
        "log": [record.getMessage() for record in caplog.records],
    }
    assert all(everything.values()), "each place looked in holds something"
    assert PASSWORD not in yaml.safe_dump(everything)


@pytest.mark.envtest
def test_a_missing_secret_is_a_condition_that_blocks_only_its_backend(
    kube: KubeClient, operator: OperatorRunner, namespace: str, infra: dict[str, Any], servers: dict[str, Any]
) -> None:
    spec = auth_spec(servers, infra)
    spec["infrastructure"]["questdb"]["secretRef"]["name"] = "no-such-secret"
    kube.request("POST", f"/api/v1/namespaces/{namespace}/secrets",
                 body={"metadata": {"name": SECRET}, "stringData": {"user": USER, "password": PASSWORD}})  # fmt: skip
    create_stack(kube, namespace, "creds", spec)
    stack = wait_condition(kube, namespace, "creds", "TablesReady", "False", reason="SecretNotFound", timeout=60)
    tables = next(c for c in stack["status"]["conditions"] if c["type"] == "TablesReady")
    assert "no-such-secret" in tables["message"]
    wait_condition(kube, namespace, "creds", "StreamsReady", "True", timeout=60)
    assert not servers["questdb"].state.tables  # nothing was tried without credentials
    assert get_stack(kube, namespace, "creds")["status"]
