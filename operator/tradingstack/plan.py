"""The pure model of the desired state: a TradingStack -> a Plan.

Nothing here talks to a server. The provisioners apply a Plan; `tradingstack render` prints
its Kubernetes objects. Semantic rules the CRD schema cannot check (overlapping stream
subjects, a consumer on a missing stream, names too long for Kubernetes) raise
InvalidSpecError, which the operator reports as a condition instead of retrying.
"""

from __future__ import annotations

import hashlib
import json
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from tradingstack import api
from tradingstack.api import ServiceName, StreamSpec, TableSpec, TradingStackSpec

MANAGER = "tradingstack-operator"
CHECKSUM_ANNOTATION = "tradingstack.io/config-checksum"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
DEAD_LETTER_PREFIX = "dlq"
# Kubernetes Service names are DNS-1035 labels: at most 63 characters.
MAX_OBJECT_NAME = 63
# Which services talk to which server, and so get its credentials (least privilege).
S3_SERVICES = frozenset({ServiceName.SINK_TICKS, ServiceName.SINK_ALT, ServiceName.AUDIT, ServiceName.PTRC})
REDIS_SERVICES = frozenset({ServiceName.RISK, ServiceName.OMS, ServiceName.EXEQ, ServiceName.PNL,
                            ServiceName.COMPLIANCE, ServiceName.PTRC})  # fmt: skip
QUESTDB_SERVICES = frozenset({ServiceName.NORMALIZER, ServiceName.OMS, ServiceName.PNL, ServiceName.COMPLIANCE,
                              ServiceName.QUALITY})  # fmt: skip
# The variables a server's secretRef keys become: (user, password, token). Redis's AUTH takes a
# token as the default user's password.
NATS_CREDENTIAL_ENV = ("NATS_USER", "NATS_PASSWORD", "NATS_TOKEN")
REDIS_CREDENTIAL_ENV = ("REDIS_USERNAME", "REDIS_PASSWORD", "REDIS_PASSWORD")
# Services that read spec.riskLimits: risk enforces them, compliance reports (near) breaches.
LIMIT_SERVICES = frozenset({ServiceName.RISK, ServiceName.COMPLIANCE})
QUESTDB_CREDENTIAL_ENV = ("QUESTDB_USER", "QUESTDB_PASSWORD", "QUESTDB_TOKEN")


class InvalidSpecError(ValueError):
    """The spec passed the CRD schema but cannot be realised; reported, never retried."""


OWNER_PREFIX = "tradingstack stack "


@dataclass(frozen=True)
class StackRef:
    """Identity of the TradingStack a plan is for."""

    name: str
    namespace: str
    uid: str = ""
    generation: int = 0

    @property
    def owner(self) -> str:
        """The mark a stack leaves on what it creates outside Kubernetes (a stream's description, a
        bucket's marker object, a Delta table's description), so that Delete removes only that.
        By name, not uid: a stack deleted with Retain and made again takes its data back."""
        return f"{OWNER_PREFIX}{self.namespace}/{self.name}"


def durable_name(stack: StackRef, service: ServiceName) -> str:
    """`<namespace>_<name>_<service>`: unique per stack, so two stacks reading one stream never split
    its messages. A namespace has no '.' or '_' and a name no '_', so the mapping is one to one;
    '.' (allowed in a name, refused by NATS) becomes '_'. At most 63 + 1 + 62 = 126 characters, as
    build_plan bounds a stack's name plus its longest service's by a child's name (62 without the '-')."""
    return f"{stack.namespace}_{stack.name}_{service.value}".replace(".", "_")


@dataclass(frozen=True)
class ConsumerPlan:
    """A durable JetStream consumer one service reads through."""

    stream: str
    durable: str
    filter_subject: str
    service: ServiceName
    max_deliver: int = 20


@dataclass(frozen=True)
class Workload:
    service: ServiceName
    name: str
    replicas: int
    port: int
    config: dict[str, str]
    image: str


@dataclass
class Plan:
    stack: StackRef
    spec: TradingStackSpec
    workloads: list[Workload]
    objects: list[dict[str, Any]]
    streams: list[StreamSpec]
    consumers: list[ConsumerPlan]
    buckets: list[str]
    tables: list[TableSpec]
    lake_tables: list[str] = field(default_factory=lambda: ["lake/market_ticks", "lake/alt_data"])

    def object_keys(self) -> set[tuple[str, str]]:
        return {(o["kind"], o["metadata"]["name"]) for o in self.objects}


# Which durable consumer each service reads through: (stream, filter subject).
_CONSUMERS: dict[ServiceName, tuple[str, str]] = {
    ServiceName.NORMALIZER: ("MARKET_TICKS", "market.tick.>"),
    ServiceName.SINK_TICKS: ("MARKET_TICKS", "market.tick.>"),
    ServiceName.SINK_ALT: ("ALT_DATA", "alt.norm.>"),
    ServiceName.EXEQ: ("ORDERS", "orders.routed.>"),
    ServiceName.PNL: ("FILLS", "fills.>"),
    # Every order event: entry, cancels, and fills (an order's event lists its fills).
    ServiceName.COMPLIANCE: ("ORDERS", "orders.>"),
    ServiceName.QUALITY: ("ORDERS", "orders.>"),
    ServiceName.AUDIT: ("ORDERS", "orders.>"),
    ServiceName.PTRC: ("FILLS", "fills.>"),
}
# Services that read more than one stream: their further consumers, each made while its stream
# is planned, named `<durable>_<stream>`.
_MORE_CONSUMERS: dict[ServiceName, list[tuple[str, str]]] = {
    ServiceName.AUDIT: [("FILLS", "fills.>"), ("POSITIONS", "positions.>"), ("COMPLIANCE", "compliance.alert.>"),
                        ("AUDIT", "audit.>")],
}  # fmt: skip
# Delta tables a service writes besides the platform's two, made while it is enabled.
SERVICE_LAKE_TABLES = {ServiceName.AUDIT: "lake/audit", ServiceName.PTRC: "lake/reports"}
# The operator's own actions on a stack that runs the audit log: `audit.operator.{namespace}.{name}`.
AUDIT_SUBJECT_PREFIX = "audit.operator"

# Streams and QuestDB tables a service brings with it: planned while it is enabled, unless
# spec.streams or spec.tables declares one of the same name (the user's declaration wins).
SERVICE_STREAMS: dict[ServiceName, list[StreamSpec]] = {
    ServiceName.COMPLIANCE: [StreamSpec(name="COMPLIANCE", subjects=["compliance.alert.>"], max_age="720h")],
    # pnl's position after each fill (published with a JetStream ack while the audit log runs),
    # and the operator's actions: kept until the audit log has them in Delta.
    ServiceName.AUDIT: [
        StreamSpec(name="POSITIONS", subjects=["positions.>"], max_age="168h"),
        StreamSpec(name="AUDIT", subjects=["audit.>"], max_age="168h"),
    ],
}
SERVICE_TABLES: dict[ServiceName, list[TableSpec]] = {
    ServiceName.COMPLIANCE: [
        TableSpec.model_validate({
            "name": "compliance_alerts",
            "columns": [{"name": n, "type": t} for n, t in (
                ("alert_id", "VARCHAR"), ("rule", "SYMBOL"), ("severity", "SYMBOL"), ("account", "SYMBOL"),
                ("symbol", "SYMBOL"), ("order_id", "VARCHAR"), ("message", "VARCHAR"), ("ts", "TIMESTAMP"))],
            "dedupKeys": ["ts", "alert_id"],
        })
    ],
    ServiceName.QUALITY: [
        TableSpec.model_validate({
            "name": "execution_quality",
            "columns": [{"name": n, "type": t} for n, t in (
                ("fill_id", "VARCHAR"), ("order_id", "VARCHAR"), ("symbol", "SYMBOL"), ("side", "SYMBOL"),
                ("order_type", "SYMBOL"), ("account", "SYMBOL"), ("quantity", "DOUBLE"), ("price", "DOUBLE"),
                ("arrival_price", "DOUBLE"), ("slippage_bps", "DOUBLE"), ("latency_ms", "DOUBLE"),
                ("ts", "TIMESTAMP"))],
            "dedupKeys": ["ts", "fill_id"],
        })
    ],
}  # fmt: skip


def planned_streams(spec: TradingStackSpec) -> list[StreamSpec]:
    """spec.streams, then the streams of enabled services that spec.streams does not name."""
    named = {s.name for s in spec.streams}
    extra = [s for svc in spec.enabled_services() for s in SERVICE_STREAMS.get(svc, []) if s.name not in named]
    return [*spec.streams, *extra]


def planned_tables(spec: TradingStackSpec) -> list[TableSpec]:
    named = {t.name for t in spec.tables}
    extra = [t for svc in spec.enabled_services() for t in SERVICE_TABLES.get(svc, []) if t.name not in named]
    return [*spec.tables, *extra]


def service_consumer(service: ServiceName) -> tuple[str, str] | None:
    """(stream, filter subject) of the durable consumer a service reads, if it reads one: the one
    answer for the operator's ConfigMaps and for a service run by hand without them."""
    return _CONSUMERS.get(service)


def parse_spec(raw: dict[str, Any] | None) -> TradingStackSpec:
    """Validate a raw spec; pydantic errors become one readable InvalidSpecError."""
    try:
        return TradingStackSpec.model_validate(raw or {})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'spec'}: {err['msg']}" for err in exc.errors())
        raise InvalidSpecError(problems) from None


def selector_labels(stack: str, service: ServiceName) -> dict[str, str]:
    return {LABEL_NAME: "tradingstack", LABEL_INSTANCE: stack, LABEL_COMPONENT: service.value}


def child_selector(stack: str) -> dict[str, str]:
    """Selects every object the operator made for one TradingStack."""
    return {LABEL_INSTANCE: stack, LABEL_MANAGED_BY: MANAGER}


def pod_selector(stack: str) -> dict[str, str]:
    """Selects every pod of one TradingStack's services (their template labels): not the operator's
    own, nor a chart's, which share the name and may share the instance."""
    return {LABEL_NAME: "tradingstack", LABEL_INSTANCE: stack, LABEL_MANAGED_BY: MANAGER}


def common_labels(stack: str, service: ServiceName) -> dict[str, str]:
    return {**selector_labels(stack, service), LABEL_PART_OF: "tradingstack", LABEL_MANAGED_BY: MANAGER}


def owner_reference(stack: StackRef) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "name": stack.name,
        "uid": stack.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def config_checksum(data: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _subjects_overlap(a: str, b: str) -> bool:
    """True when some concrete subject matches both NATS subject patterns."""
    ta, tb = a.split("."), b.split(".")
    for x, y in zip(ta, tb, strict=False):
        if ">" in (x, y):
            return True  # '>' takes one or more tokens and the other side has one here
        if x != y and "*" not in (x, y):
            return False
    return len(ta) == len(tb)


def _check_streams(streams: list[StreamSpec]) -> None:
    owners: list[tuple[str, str]] = []
    for stream in streams:
        for subject in stream.subjects:
            for other_stream, other in owners:
                if other_stream != stream.name and _subjects_overlap(subject, other):
                    raise InvalidSpecError(
                        f"streams {other_stream} and {stream.name} have overlapping subjects "
                        f"{other!r} and {subject!r}; JetStream refuses that"
                    )
            owners.append((stream.name, subject))


def further_consumers(stack: StackRef, service: ServiceName, streams: set[str]) -> list[tuple[str, str, str]]:
    """(stream, durable, filter subject) of a service's consumers beyond its first, for the planned streams."""
    first = durable_name(stack, service)
    return [(stream, f"{first}_{stream.lower()}", subject) for stream, subject in _MORE_CONSUMERS.get(service, [])
            if stream in streams]  # fmt: skip


def plan_consumers(stack: StackRef, spec: TradingStackSpec) -> list[ConsumerPlan]:
    streams = {s.name for s in planned_streams(spec)}
    consumers = []
    for service in spec.enabled_services():
        if service not in _CONSUMERS:
            continue
        stream, subject = _CONSUMERS[service]
        if stream not in streams:
            raise InvalidSpecError(f"service {service.value} reads stream {stream}, which spec.streams lacks")
        reads = [(stream, durable_name(stack, service), subject), *further_consumers(stack, service, streams)]
        consumers += [ConsumerPlan(stream=stream, durable=durable, filter_subject=subject, service=service,
                                   max_deliver=spec.delivery.max_deliver)
                      for stream, durable, subject in reads]  # fmt: skip
    return consumers


def service_port(spec: TradingStackSpec, service: ServiceName) -> int:
    return spec.service(service).port or api.DEFAULT_PORTS[service]


def trading_api(stack: StackRef, spec: TradingStackSpec) -> str | None:
    """The OMS's address inside the namespace (its Service), when the stack runs one."""
    if ServiceName.OMS not in spec.enabled_services():
        return None
    return f"http://{stack.name}-{ServiceName.OMS.value}:{service_port(spec, ServiceName.OMS)}"


def service_config(stack: StackRef, spec: TradingStackSpec, service: ServiceName, port: int) -> dict[str, str]:
    """The environment a service reads (names documented in the README)."""
    infra = spec.infrastructure
    config = {
        "SERVICE_NAME": service.value,
        "STACK_NAME": stack.name,
        "STACK_NAMESPACE": stack.namespace,
        "PORT": str(port),
        "SYMBOLS": ",".join(spec.symbols),
        "NATS_URL": infra.nats.url,
        "REDIS_URL": infra.redis.url,
        "QUESTDB_URL": infra.questdb.url,
        "S3_ENDPOINT_URL": infra.s3.endpoint,
        "S3_BUCKET": infra.s3.bucket,
        "AWS_REGION": infra.s3.region,
        "AWS_ALLOW_HTTP": "true" if infra.s3.allow_http else "false",
        "DEAD_LETTER_PREFIX": DEAD_LETTER_PREFIX,
        "LOG_FORMAT": "json",
        "OTEL_SERVICE_NAME": f"tradingstack-{service.value}",
    }
    if service in _CONSUMERS:
        stream, subject = _CONSUMERS[service]
        config |= {"NATS_STREAM": stream, "NATS_DURABLE": durable_name(stack, service), "NATS_FILTER_SUBJECT": subject,
                   "NATS_MAX_DELIVER": str(spec.delivery.max_deliver)}  # fmt: skip
    config |= {f"{server.upper()}_CA_FILE": ca_file(server) for server in tls_servers(spec, service)}
    if service == ServiceName.GATEWAY and (oms := trading_api(stack, spec)) is not None:
        config["TRADING_API_URL"] = oms  # the dashboard's calls to the OMS go through the gateway
    if service in KEYED_SERVICES and spec.accounts:
        config["AUTH_ACCOUNTS"] = ",".join(account.name for account in spec.accounts)
        if oversight := [a.name for a in spec.accounts if a.role == "oversight"]:
            config["AUTH_OVERSIGHT"] = ",".join(oversight)
    if service == ServiceName.OMS and (policy := spec.order_authorization) is not None:
        config |= {"AUTHZ_URL": policy.url, "AUTHZ_DECISION_PATH": policy.decision_path,
                   "AUTHZ_TIMEOUT_SECONDS": str(policy.timeout_seconds)}  # fmt: skip
    if service == ServiceName.AUDIT:
        streams = {s.name for s in planned_streams(spec)}
        config["AUDIT_SOURCES"] = json.dumps([list(c) for c in further_consumers(stack, service, streams)],
                                             separators=(",", ":"))  # fmt: skip
    if service == ServiceName.PNL and ServiceName.AUDIT in spec.enabled_services():
        config["POSITIONS_JETSTREAM"] = "true"  # the audit log reads positions from their stream: none may be lost
    if service == ServiceName.COMPLIANCE:
        rules = spec.compliance or api.ComplianceRules()
        config["COMPLIANCE_RULES"] = json.dumps(rules.model_dump(by_alias=True), sort_keys=True, separators=(",", ":"))
    if service in LIMIT_SERVICES and any(a.risk_limits for a in spec.accounts):
        by_account = {
            a.name: [x.model_dump(by_alias=True) for x in a.risk_limits] for a in spec.accounts if a.risk_limits
        }
        config["RISK_ACCOUNT_LIMITS"] = json.dumps(by_account, sort_keys=True, separators=(",", ":"))
    if service == ServiceName.RISK:
        most = {"": spec.max_open_orders} | {a.name: a.max_open_orders for a in spec.accounts if a.max_open_orders}
        config["RISK_MAX_OPEN_ORDERS"] = json.dumps(most, sort_keys=True, separators=(",", ":"))
    if service in LIMIT_SERVICES and spec.risk_limits:
        limits = [limit.model_dump(by_alias=True) for limit in spec.risk_limits]
        config["RISK_LIMITS"] = json.dumps(limits, sort_keys=True, separators=(",", ":"))
    config |= {env.name: env.value for env in spec.service(service).env if env.value_from is None}
    return config


def _config_map(stack: StackRef, workload: Workload) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(stack, workload),
        "data": dict(sorted(workload.config.items())),
    }


def _metadata(stack: StackRef, workload: Workload) -> dict[str, Any]:
    return _owned_metadata(stack, workload.name, common_labels(stack.name, workload.service))


def _owned_metadata(stack: StackRef, name: str, labels: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": stack.namespace, "labels": labels}
    if stack.uid:
        meta["ownerReferences"] = [owner_reference(stack)]
    return meta


def _service(stack: StackRef, workload: Workload) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(stack, workload),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(stack.name, workload.service),
            "ports": [{"name": "http", "port": workload.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http", "scheme": "HTTP"},
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def _from_secret(secret: str, key: str) -> dict[str, Any]:
    return {"secretKeyRef": {"name": secret, "key": key}}


def _server_secret_env(ref: api.ServerSecretRef | None, names: tuple[str, str, str]) -> dict[str, dict[str, Any]]:
    if ref is None:
        return {}
    keys = (ref.username_key, ref.password_key, ref.token_key)
    return {var: _from_secret(ref.name, key) for var, key in zip(names, keys, strict=True) if key}


def account_keys_variable(account: str) -> str:
    """The variable holding an account's hashed API keys: `AUTH_KEYS_DESK_A` for `desk-a` (names have no `_`)."""
    return "AUTH_KEYS_" + account.upper().replace("-", "_")


def secret_env(spec: TradingStackSpec, service: ServiceName) -> dict[str, dict[str, Any]]:
    """Variables whose values Kubernetes takes from Secrets (or ConfigMaps): name -> valueFrom.

    Credentials reach a pod only this way, never through its ConfigMap; a service gets those of
    the servers it talks to. A user's env valueFrom comes last and wins.
    """
    infra = spec.infrastructure
    env = _server_secret_env(infra.nats.secret_ref, NATS_CREDENTIAL_ENV)
    if service in REDIS_SERVICES:
        env |= _server_secret_env(infra.redis.secret_ref, REDIS_CREDENTIAL_ENV)
    if service in QUESTDB_SERVICES:
        env |= _server_secret_env(infra.questdb.secret_ref, QUESTDB_CREDENTIAL_ENV)
    s3 = infra.s3.secret_ref
    if s3 and service in S3_SERVICES:
        env |= {"AWS_ACCESS_KEY_ID": _from_secret(s3.name, s3.access_key_id_key),
                "AWS_SECRET_ACCESS_KEY": _from_secret(s3.name, s3.secret_access_key_key)}  # fmt: skip
    if service in KEYED_SERVICES:
        env |= {account_keys_variable(a.name): _from_secret(a.secret_ref.name, a.secret_ref.key) for a in spec.accounts}
    for var in spec.service(service).env:
        if var.value_from is not None:
            env[var.name] = var.value_from.model_dump(by_alias=True, exclude_none=True)
    return env


def _deployment(stack: StackRef, spec: TradingStackSpec, workload: Workload) -> dict[str, Any]:
    svc = spec.service(workload.service)
    env = [{"name": name, "valueFrom": source} for name, source in secret_env(spec, workload.service).items()]
    tls = tls_servers(spec, workload.service)
    resources = svc.resources.model_dump(by_alias=True, exclude_none=True)
    container: dict[str, Any] = {
        "name": workload.service.value,
        "image": workload.image,
        "imagePullPolicy": spec.image.pull_policy,
        "args": ["service", workload.service.value],
        "envFrom": [{"configMapRef": {"name": workload.name}}],
        "ports": [{"name": "http", "containerPort": workload.port, "protocol": "TCP"}],
        # Up to 60 s to start (imports of pyarrow and deltalake on a busy node), then liveness takes over.
        "startupProbe": _probe("/healthz", 2, 30),
        "readinessProbe": _probe("/readyz", 5, 3),
        "livenessProbe": _probe("/healthz", 10, 6),
        "resources": {k: v for k, v in resources.items() if v},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]
        + [{"name": f"tls-{server}", "mountPath": f"{TLS_DIR}/{server}", "readOnly": True} for server in tls],
    }
    if env:
        container["env"] = env
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(stack, workload),
        "spec": {
            "replicas": workload.replicas,
            **({"strategy": {"type": "Recreate"}} if workload.service in api.SINGLE_WRITER_SERVICES else {}),
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector_labels(stack.name, workload.service)},
            "template": {
                "metadata": {
                    "labels": common_labels(stack.name, workload.service),
                    "annotations": {CHECKSUM_ANNOTATION: config_checksum(workload.config)},
                },
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 10001,
                        "runAsGroup": 10001,
                        "fsGroup": 10001,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {}}] + [_ca_volume(s, t) for s, t in tls.items()],
                },
            },
        },
    }


# Services clients call: their HTTP port is open to spec.networkPolicy.apiFrom.
API_SERVICES = frozenset({ServiceName.GATEWAY, ServiceName.OMS})
# Services whose endpoints take the accounts' API keys when spec.accounts lists any: order entry,
# and what shows one account's orders, alerts, reports or fills (execution quality, resting orders).
KEYED_SERVICES = frozenset({ServiceName.OMS, ServiceName.EXEQ, ServiceName.COMPLIANCE, ServiceName.QUALITY,
                            ServiceName.PTRC})  # fmt: skip
DEFAULT_PORTS = {"nats": 4222, "tls": 4222, "redis": 6379, "rediss": 6379, "http": 80, "https": 443, "ws": 80,
                 "wss": 443}  # fmt: skip


def server_port(url: str) -> int:
    """The TCP port a server URL names, or its scheme's usual one."""
    parts = urllib.parse.urlsplit(url)
    return parts.port or DEFAULT_PORTS.get(parts.scheme, 443)


TLS_DIR = "/etc/tradingstack/tls"


def tls_servers(spec: TradingStackSpec, service: ServiceName) -> dict[str, api.TLSSpec]:
    """The servers this service talks to over TLS: server name (nats, redis, questdb) -> its TLS spec."""
    infra = spec.infrastructure
    servers = {"nats": infra.nats.tls}
    if service in REDIS_SERVICES:
        servers["redis"] = infra.redis.tls
    if service in QUESTDB_SERVICES:
        servers["questdb"] = infra.questdb.tls
    return {name: tls for name, tls in servers.items() if tls is not None}


def ca_file(server: str) -> str:
    return f"{TLS_DIR}/{server}/ca.crt"


def _ca_volume(server: str, tls: api.TLSSpec) -> dict[str, Any]:
    """The CA bundle as a file: a ConfigMap's or a Secret's key projected to ca.crt."""
    source = tls.ca.config_map_key_ref or tls.ca.secret_key_ref
    assert source is not None  # EnvVarSource holds exactly one
    items = [{"key": source.key, "path": "ca.crt"}]
    mode = 0o444  # read-only, for whatever uid the pod runs as
    if tls.ca.config_map_key_ref is not None:
        return {"name": f"tls-{server}", "configMap": {"name": source.name, "items": items, "defaultMode": mode}}
    return {"name": f"tls-{server}", "secret": {"secretName": source.name, "items": items, "defaultMode": mode}}


def egress_ports(spec: TradingStackSpec, service: ServiceName) -> list[int]:
    """The servers' ports a service connects to (the same servers whose credentials it gets)."""
    infra = spec.infrastructure
    ports = {server_port(infra.nats.url)}
    if service in REDIS_SERVICES:
        ports.add(server_port(infra.redis.url))
    if service in QUESTDB_SERVICES:
        ports.add(server_port(infra.questdb.url))
    if service in S3_SERVICES:
        ports.add(server_port(infra.s3.endpoint))
    if service == ServiceName.OMS and spec.order_authorization is not None:
        ports.add(server_port(spec.order_authorization.url))
    if service == ServiceName.LIVE:  # the venue's public WebSocket (Binance: 9443 or 443), or LIVE_WS_URL's port
        venue = next((e.value for e in spec.service(service).env if e.name == "LIVE_WS_URL" and e.value), None)
        ports |= {server_port(venue)} if venue else {443, 9443}
    if service == ServiceName.GATEWAY and ServiceName.OMS in spec.enabled_services():
        ports.add(service_port(spec, ServiceName.OMS))  # the dashboard's API calls
    return sorted(ports)


def _peers(peers: list[api.NetworkPeer]) -> list[dict[str, Any]]:
    if not peers:
        return [{"podSelector": {}}]  # any pod of the policy's own namespace
    rendered = []
    for peer in peers:
        rule: dict[str, Any] = {"podSelector": {"matchLabels": peer.pod_labels} if peer.pod_labels else {}}
        if peer.namespace_labels is not None:
            rule["namespaceSelector"] = {"matchLabels": peer.namespace_labels}
        rendered.append(rule)
    return rendered


def _network_policy(stack: StackRef, spec: TradingStackSpec, workload: Workload) -> dict[str, Any]:
    policy = spec.network_policy
    peers = _peers(policy.metrics_from)
    if workload.service in API_SERVICES:
        peers += [peer for peer in _peers(policy.api_from) if peer not in peers]
    gateway = {"podSelector": {"matchLabels": selector_labels(stack.name, ServiceName.GATEWAY)}}
    if workload.service == ServiceName.OMS and ServiceName.GATEWAY in spec.enabled_services() and policy.api_from:
        peers.append(gateway)  # the gateway forwards its dashboard's calls
    dns = [{"protocol": proto, "port": 53} for proto in ("UDP", "TCP")]
    servers = [{"protocol": "TCP", "port": port} for port in egress_ports(spec, workload.service)]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(stack, workload),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(stack.name, workload.service)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": peers, "ports": [{"protocol": "TCP", "port": workload.port}]}],
            # Servers may live outside the cluster, so by port, to any address.
            "egress": [{"ports": dns}, {"ports": servers}],
        },
    }


def _default_deny(stack: StackRef) -> dict[str, Any]:
    labels = {LABEL_NAME: "tradingstack", LABEL_INSTANCE: stack.name, LABEL_PART_OF: "tradingstack",
              LABEL_MANAGED_BY: MANAGER}  # fmt: skip
    metadata = _owned_metadata(stack, f"{stack.name}-default-deny", labels)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata,
        "spec": {
            "podSelector": {"matchLabels": {LABEL_NAME: "tradingstack", LABEL_INSTANCE: stack.name}},
            "policyTypes": ["Ingress", "Egress"],
        },
    }


def build_plan(stack: StackRef, spec: TradingStackSpec) -> Plan:
    """The whole desired state of one TradingStack. Pure: same input, same output."""
    # Only the enabled services' names count: enabling a longer one never breaks a running stack
    # until it is asked for.
    longest = max(spec.enabled_services(), key=lambda s: len(s.value), default=ServiceName.SINK_TICKS)
    if len(stack.name) + 1 + len(longest.value) > MAX_OBJECT_NAME:
        raise InvalidSpecError(
            f"name {stack.name!r} is too long: child names like {stack.name}-{longest.value} "
            f"must fit in {MAX_OBJECT_NAME} characters (use at most {MAX_OBJECT_NAME - 1 - len(longest.value)})"
        )
    streams = planned_streams(spec)
    _check_streams(streams)
    consumers = plan_consumers(stack, spec)
    workloads = []
    for service in spec.enabled_services():
        svc = spec.service(service)
        port = service_port(spec, service)
        workloads.append(
            Workload(
                service=service,
                name=f"{stack.name}-{service.value}",
                replicas=svc.replicas,
                port=port,
                config=service_config(stack, spec, service, port),
                image=svc.image or spec.image.reference,
            )
        )
    objects: list[dict[str, Any]] = []
    # Apply order: the fences first (no pod runs unfenced), configuration before what uses it.
    if spec.network_policy.enabled:
        objects += [_default_deny(stack), *(_network_policy(stack, spec, w) for w in workloads)]
    objects += [_config_map(stack, w) for w in workloads]
    objects += [_service(stack, w) for w in workloads]
    objects += [_deployment(stack, spec, w) for w in workloads]
    buckets = [spec.infrastructure.s3.bucket] + [b.name for b in spec.buckets]
    return Plan(
        stack=stack,
        spec=spec,
        workloads=workloads,
        objects=objects,
        streams=streams,
        consumers=consumers,
        buckets=list(dict.fromkeys(buckets)),
        tables=planned_tables(spec),
        lake_tables=["lake/market_ticks", "lake/alt_data"]
        + [path for service, path in SERVICE_LAKE_TABLES.items() if service in spec.enabled_services()],
    )


def plan_from_body(body: dict[str, Any]) -> Plan:
    """Plan for a TradingStack object as the API server returns it."""
    meta = body.get("metadata", {})
    stack = StackRef(
        name=meta["name"],
        namespace=meta.get("namespace") or "default",
        uid=meta.get("uid", ""),
        generation=int(meta.get("generation") or 0),
    )
    return build_plan(stack, parse_spec(body.get("spec")))
