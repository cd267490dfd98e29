"""TLS to NATS, Redis and QuestDB, verified against a CA bundle the spec names (no way to skip it).

A CA and a server certificate for 127.0.0.1 are made here; nats-server (--tls), redis-server
(--tls-port) and the QuestDB double (HTTPS) serve with it. The operator reads the CA from a
ConfigMap (envtest); services read the file the operator mounts (here: the same path as a
temporary file). A client without the CA, or with another CA, is refused and says so.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from questdb_double import QuestDBDouble
from tradingstack.api import ServiceName
from tradingstack.backends.jetstream import JetStreamProvisioner
from tradingstack.backends.questdb import QuestDBProvisioner
from tradingstack.changes import UnreachableError
from tradingstack.credentials import ServerCredentials
from tradingstack.kubeclient import KubeClient
from tradingstack.plan import StackRef, build_plan, parse_spec

from conftest import NatsServer, OperatorRunner, RedisServer, free_port, http_json, wait_for
from kubetools import create_stack, wait_condition


def _certificate(subject: str, key: Any, issuer: x509.Name, signer: Any, ca: bool) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signer, hashes.SHA256())


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class Pki:
    """A CA, a server certificate it signed, and an unrelated CA (the wrong one)."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        ca_key, server_key, other_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
        ca = _certificate("tradingstack test CA", ca_key, x509.Name([]), ca_key, ca=True)
        ca = _certificate("tradingstack test CA", ca_key, ca.subject, ca_key, ca=True)
        server = _certificate("127.0.0.1", server_key, ca.subject, ca_key, ca=False)
        other = _certificate("someone else's CA", other_key, x509.Name([]), other_key, ca=True)
        self.ca_pem, self.other_pem = _pem(ca), _pem(other)
        self.ca_file, self.cert_file, self.key_file = root / "ca.crt", root / "server.crt", root / "server.key"
        self.ca_file.write_text(self.ca_pem)
        self.cert_file.write_text(_pem(server))
        key = server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())  # fmt: skip
        self.key_file.write_bytes(key)

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


class TlsNats(NatsServer):
    pki: Pki

    def arguments(self) -> list[str]:
        return [*super().arguments(), "--tls", "--tlscert", str(self.pki.cert_file), "--tlskey", str(self.pki.key_file)]


class TlsRedis(RedisServer):
    pki: Pki
    scheme = "rediss"

    def arguments(self) -> list[str]:
        pki = self.pki
        return ["--bind", "127.0.0.1", "--port", "0", "--tls-port", str(self.port), "--save", "", "--appendonly",
                "no", "--dir", str(self.root), "--tls-cert-file", str(pki.cert_file), "--tls-key-file",
                str(pki.key_file), "--tls-ca-cert-file", str(pki.ca_file), "--tls-auth-clients", "no"]  # fmt: skip


@pytest.fixture
def tls_servers(tmp_path: Path) -> Iterator[tuple[Pki, dict[str, Any]]]:
    pki = Pki(tmp_path / "pki")
    nats_server, redis_server = TlsNats(tmp_path / "nats"), TlsRedis(tmp_path / "redis")
    nats_server.pki = redis_server.pki = pki
    nats_server.start()
    redis_server.start()
    with QuestDBDouble(tls=pki.server_context()) as questdb:
        yield pki, {"nats": nats_server, "redis": redis_server, "questdb": questdb}
    redis_server.stop()
    nats_server.stop()


def tls_spec(servers: dict[str, Any], ca: dict[str, Any]) -> dict[str, Any]:
    return {"infrastructure": {
        "nats": {"url": servers["nats"].url, "tls": {"ca": ca}},
        "redis": {"url": servers["redis"].url, "tls": {"ca": ca}},
        "questdb": {"url": servers["questdb"].url, "tls": {"ca": ca}},
    }}  # fmt: skip


def test_provisioners_verify_the_server_against_the_ca_and_refuse_another(
    tls_servers: tuple[Pki, dict[str, Any]],
) -> None:
    pki, servers = tls_servers
    ca = {"configMapKeyRef": {"name": "ca", "key": "ca.crt"}}
    plan = build_plan(StackRef("tls", "ns"), parse_spec(tls_spec(servers, ca)))
    for wrong in (ServerCredentials(), ServerCredentials(ca_data=pki.other_pem)):
        with pytest.raises(UnreachableError):
            JetStreamProvisioner(servers["nats"].url, credentials=wrong).reconcile(plan)
        with pytest.raises(UnreachableError, match=r"CERTIFICATE_VERIFY_FAILED|certificate"):
            QuestDBProvisioner(servers["questdb"].url, credentials=wrong).reconcile(plan)
    good = ServerCredentials(ca_data=pki.ca_pem)
    assert JetStreamProvisioner(servers["nats"].url, credentials=good).reconcile(plan).ok
    assert QuestDBProvisioner(servers["questdb"].url, credentials=good).reconcile(plan).ok


def test_a_service_talks_tls_to_all_three_with_the_mounted_ca(
    tls_servers: tuple[Pki, dict[str, Any]], tmp_path: Path
) -> None:
    """pnl uses NATS, Redis and QuestDB: ready only if each TLS handshake verified."""
    pki, servers = tls_servers
    spec = tls_spec(servers, {"secretKeyRef": {"name": "ca", "key": "ca.crt"}})
    plan = build_plan(StackRef("tls", "ns"), parse_spec(spec))
    good = ServerCredentials(ca_data=pki.ca_pem)
    assert JetStreamProvisioner(servers["nats"].url, credentials=good).reconcile(plan).ok
    assert QuestDBProvisioner(servers["questdb"].url, credentials=good).reconcile(plan).ok
    workload = next(w for w in plan.workloads if w.service == ServiceName.PNL)
    assert {k: v for k, v in workload.config.items() if k.endswith("_CA_FILE")} == {
        "NATS_CA_FILE": "/etc/tradingstack/tls/nats/ca.crt", "REDIS_CA_FILE": "/etc/tradingstack/tls/redis/ca.crt",
        "QUESTDB_CA_FILE": "/etc/tradingstack/tls/questdb/ca.crt",
    }  # fmt: skip
    env = {**os.environ, **workload.config, "PORT": str(free_port())}
    env |= {name: str(pki.ca_file) for name in ("NATS_CA_FILE", "REDIS_CA_FILE", "QUESTDB_CA_FILE")}
    log = tmp_path / "pnl.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "tradingstack.cli", "service", "pnl"], env=env,
                                   stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{env['PORT']}"
        try:
            wait_for(lambda: http_json(f"{url}/readyz")[0] == 200, 60, "pnl ready over TLS")
        except AssertionError:
            print(http_json(f"{url}/readyz"), log.read_text()[-3000:])
            raise
        _, body = http_json(f"{url}/readyz")
        assert body["degraded"] == {"questdb": "ok"}  # its history's QuestDB, over HTTPS, answers too
    finally:
        process.terminate()
        process.wait(30)


@pytest.mark.envtest
def test_the_operator_reads_the_ca_from_a_configmap_and_provisions_over_tls(
    kube: KubeClient, operator: OperatorRunner, namespace: str, infra: dict[str, Any],
    tls_servers: tuple[Pki, dict[str, Any]],
) -> None:  # fmt: skip
    pki, servers = tls_servers
    kube.request("POST", f"/api/v1/namespaces/{namespace}/configmaps",
                 body={"metadata": {"name": "platform-ca"}, "data": {"ca.crt": pki.ca_pem}})  # fmt: skip
    spec = tls_spec(servers, {"configMapKeyRef": {"name": "platform-ca", "key": "ca.crt"}})
    spec["infrastructure"]["s3"] = infra["infrastructure"]["s3"]
    create_stack(kube, namespace, "tls", spec)
    wait_condition(kube, namespace, "tls", "StreamsReady", "True", timeout=60)
    wait_condition(kube, namespace, "tls", "TablesReady", "True", timeout=60)
    pnl = kube.get("Deployment", namespace, "tls-pnl")
    assert pnl is not None
    volumes = {v["name"]: v for v in pnl["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls-nats"]["configMap"] == {"name": "platform-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}],
                                                "defaultMode": 0o444}  # fmt: skip
    assert {"tls-nats", "tls-redis", "tls-questdb"} <= set(volumes)

    spec["infrastructure"]["questdb"]["tls"]["ca"]["configMapKeyRef"]["name"] = "no-such-ca"
    create_stack(kube, namespace, "tls-missing", spec)
    wait_condition(kube, namespace, "tls-missing", "TablesReady", "False", reason="SecretNotFound", timeout=60)


def test_the_ca_is_loaded_once_per_credentials_not_per_request(tmp_path: Path) -> None:
    """QuestDB's clients ask for the context on every request (pnl, history, the normalizer)."""
    pki = Pki(tmp_path / "pki")
    credentials = ServerCredentials(ca_file=str(pki.ca_file))
    context = credentials.ssl_context()
    assert context is not None
    assert credentials.ssl_context() is context
    assert ServerCredentials().ssl_context() is None
