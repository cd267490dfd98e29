"""The TradingStack API (tradingstack.io/v1alpha1), declared once as pydantic models.

The CRD's OpenAPI schema in crds/ is generated from these models (see crd.py), so every
description, enum, bound and pattern here is what the API server enforces. Rules that span
fields are written twice on purpose: as a pydantic validator (so `tradingstack render` fails
offline) and as a CEL `x-kubernetes-validations` rule (so the API server rejects the object).
tests/test_crd.py checks both reject the same inputs.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator, model_validator
from pydantic.alias_generators import to_camel

from tradingstack.credentials import has_userinfo

GROUP = "tradingstack.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "TradingStack"
PLURAL = "tradingstacks"
SINGULAR = "tradingstack"
SHORT_NAMES = ["tstack"]

DEFAULT_IMAGE_REPOSITORY = "ghcr.io/tradingstack/tradingstack"
DEFAULT_IMAGE_TAG = "0.1.0"

# A symbol becomes one NATS subject token (market.tick.{SYMBOL}), so no dots or wildcards.
SYMBOL_PATTERN = r"^[A-Z0-9][A-Z0-9_-]{0,31}$"
# JetStream stream and durable names may not contain dots, spaces or wildcards.
STREAM_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
SUBJECT_PATTERN = r"^[A-Za-z0-9_*>-]+(\.[A-Za-z0-9_*>-]+)*$"
# A Go duration as NATS and Kubernetes users write it: 24h, 90s, 1h30m.
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$"
# S3 bucket naming rules (lowercase, 3-63 characters, no leading or trailing dash or dot).
BUCKET_PATTERN = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
# QuestDB table and column names as this project allows them: plain identifiers.
IDENTIFIER_PATTERN = r"^[a-z_][a-z0-9_]{0,62}$"
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
URL_PATTERN = r"^[a-z][a-z0-9+.-]*://[^\s]+$"
# QuestDB has no table comments: which stack made which table is recorded in this table.
OWNERS_TABLE = "tradingstack_owners"


class ServiceName(StrEnum):
    """The services a TradingStack runs; the value is the Kubernetes-facing name."""

    GATEWAY = "gateway"
    NORMALIZER = "normalizer"
    SINK_TICKS = "sink-ticks"
    SINK_ALT = "sink-alt"
    RISK = "risk"
    OMS = "oms"
    EXEQ = "exeq"
    PNL = "pnl"
    COMPLIANCE = "compliance-scanner"
    QUALITY = "execution-quality"
    AUDIT = "audit-log"
    LIVE = "live-gateway"
    PTRC = "ptrc"


# Services added after the first eight run only when asked for (`enabled: true`): an operator
# upgrade never adds pods, streams or tables to a stack that did not ask for them.
OPT_IN_SERVICES = frozenset(
    {ServiceName.COMPLIANCE, ServiceName.QUALITY, ServiceName.AUDIT, ServiceName.LIVE, ServiceName.PTRC}
)
# Each is the one writer of a state whose result depends on the order it applies messages in: the
# sinks' Delta commits (a message redelivered from one pod to another would be committed twice),
# pnl's average-cost positions, ptrc's day ledgers, the compliance rules' account state (their
# writes are compare-and-set, so two pods lose nothing, but they would apply fills in another order
# than the stream's). They run one pod (replicas 0 or 1) and roll with Recreate, so a rollout never
# overlaps an old pod and a new one.
SINGLE_WRITER_SERVICES = (ServiceName.SINK_TICKS, ServiceName.SINK_ALT, ServiceName.AUDIT, ServiceName.PNL,
                          ServiceName.PTRC, ServiceName.COMPLIANCE)  # fmt: skip
_SINGLE_WRITER_MESSAGE = (
    ", ".join(s.value for s in SINGLE_WRITER_SERVICES) + " run as one pod each (each applies its stream in "
    "order: two pods would commit a redelivered message twice or apply fills out of order); replicas may be 0 or 1"
)


# Seed ports, kept as defaults so existing dashboards and clients keep working.
DEFAULT_PORTS: dict[ServiceName, int] = {
    ServiceName.GATEWAY: 8080,
    ServiceName.NORMALIZER: 8091,
    ServiceName.SINK_TICKS: 8111,
    ServiceName.SINK_ALT: 8112,
    ServiceName.RISK: 8095,
    ServiceName.OMS: 8099,
    ServiceName.EXEQ: 8098,
    ServiceName.PNL: 8100,
    ServiceName.COMPLIANCE: 8105,
    ServiceName.QUALITY: 8106,
    ServiceName.AUDIT: 8107,
    ServiceName.LIVE: 8200,
    ServiceName.PTRC: 8108,
}


class Model(BaseModel):
    """Base for API types: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", use_enum_values=True)


def cel(rule: str, message: str) -> dict[str, str]:
    return {"rule": rule, "message": message}


def validations(*rules: dict[str, str]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(rules)}


def keyed_list(*keys: str) -> dict[str, JsonValue]:
    """A list merged by key on the server (server-side apply, strategic merge), unique per key."""
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": list(keys)}


UNIQUE_SET: dict[str, JsonValue] = {"x-kubernetes-list-type": "set"}


Quantity = Annotated[str, Field(pattern=QUANTITY_PATTERN, max_length=32)]


class ResourceList(Model):
    cpu: Quantity | None = Field(None, description="CPU, e.g. 100m or 1.")
    memory: Quantity | None = Field(None, description="Memory, e.g. 128Mi or 1Gi.")


class Resources(Model):
    """Compute resources of one container, as in a Kubernetes container spec."""

    requests: ResourceList = Field(
        default_factory=lambda: ResourceList(cpu="50m", memory="128Mi"),
        description="Minimum resources the scheduler reserves.",
    )
    limits: ResourceList = Field(
        default_factory=lambda: ResourceList(memory="512Mi"),
        description="Maximum resources; memory over the limit restarts the container.",
    )


class KeySelector(Model):
    name: str = Field(min_length=1, max_length=253, description="Name of the Secret or ConfigMap.")
    key: str = Field(min_length=1, max_length=253, description="Key within it.")


class EnvVarSource(Model):
    """Where a variable's value comes from, as in a Kubernetes container's env[].valueFrom."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                # `!=` between two has() is over the 1.24 API server's CEL cost budget; && and || are not.
                "(has(self.secretKeyRef) || has(self.configMapKeyRef))"
                " && !(has(self.secretKeyRef) && has(self.configMapKeyRef))",
                "set one of secretKeyRef or configMapKeyRef",
            )
        )
    )

    secret_key_ref: KeySelector | None = Field(None, description="A key of a Secret in the stack's namespace.")
    config_map_key_ref: KeySelector | None = Field(None, description="A key of a ConfigMap in the stack's namespace.")

    @model_validator(mode="after")
    def _one_source(self) -> EnvVarSource:
        if (self.secret_key_ref is None) == (self.config_map_key_ref is None):
            raise ValueError("set one of secretKeyRef or configMapKeyRef")
        return self


class EnvVar(Model):
    """A variable with a value (kept in the service's ConfigMap) or a valueFrom (a Secret's stays there)."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("!has(self.valueFrom) || !has(self.value) || self.value == ''", "set value or valueFrom, not both")
        )
    )

    name: str = Field(pattern=ENV_NAME_PATTERN, max_length=128, description="Variable name.")
    value: str = Field("", max_length=4096, description="Variable value. Never a secret: it lands in a ConfigMap.")
    value_from: EnvVarSource | None = Field(None, description="Take the value from a Secret or ConfigMap key.")

    @model_validator(mode="after")
    def _value_or_source(self) -> EnvVar:
        if self.value_from is not None and self.value:
            raise ValueError("set value or valueFrom, not both")
        return self


class ServiceSpec(Model):
    """How one service runs. Every field is optional; omitted services run with defaults."""

    enabled: bool | None = Field(
        None,
        description="Run this service; a disabled service's objects are removed. Unset: on for the first eight "
        "services, off for the opt-in ones (" + ", ".join(s.value for s in ServiceName if s in OPT_IN_SERVICES) + ").",
    )
    replicas: int = Field(1, ge=0, le=100, description="Number of pods.")
    image: str | None = Field(
        None,
        max_length=512,
        description="Full image reference overriding spec.image for this service.",
    )
    port: int | None = Field(None, ge=1024, le=65535, description="HTTP port; defaults to the service's seed port.")
    resources: Resources = Field(default_factory=Resources, description="Container resources.")
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=64,
        description="Extra environment variables; they override the generated configuration.",
        json_schema_extra=keyed_list("name"),
    )


class Image(Model):
    repository: str = Field(DEFAULT_IMAGE_REPOSITORY, min_length=1, max_length=256, description="Image repository.")
    tag: str = Field(DEFAULT_IMAGE_TAG, min_length=1, max_length=128, description="Image tag.")
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="Kubernetes image pull policy."
    )

    @property
    def reference(self) -> str:
        return f"{self.repository}:{self.tag}"


class SecretKeyRef(Model):
    """A Secret in the TradingStack's namespace holding S3 credentials."""

    name: str = Field(min_length=1, max_length=253, description="Secret name.")
    access_key_id_key: str = Field("AWS_ACCESS_KEY_ID", max_length=253, description="Key holding the access key id.")
    secret_access_key_key: str = Field(
        "AWS_SECRET_ACCESS_KEY", max_length=253, description="Key holding the secret access key."
    )


class ServerSecretRef(Model):
    """A Secret in the stack's namespace with a server's credentials: a password (and user) or a token."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "(has(self.passwordKey) || has(self.tokenKey)) && !(has(self.passwordKey) && has(self.tokenKey))",
                "set one of passwordKey or tokenKey",
            ),
            cel("!has(self.usernameKey) || has(self.passwordKey)", "usernameKey goes with passwordKey"),
        )
    )

    name: str = Field(min_length=1, max_length=253, description="Secret name.")
    username_key: str | None = Field(None, max_length=253, description="Key holding the user name.")
    password_key: str | None = Field(None, max_length=253, description="Key holding the password.")
    token_key: str | None = Field(None, max_length=253, description="Key holding a token (instead of a password).")

    @model_validator(mode="after")
    def _password_or_token(self) -> ServerSecretRef:
        if (self.password_key is None) == (self.token_key is None):
            raise ValueError("set one of passwordKey or tokenKey")
        if self.username_key is not None and self.password_key is None:
            raise ValueError("usernameKey goes with passwordKey")
        return self


NO_CREDENTIALS_IN_URL = "credentials do not belong in a URL (it lands in ConfigMaps and logs): use secretRef"


def no_credentials_rule(field: str) -> dict[str, str]:
    """The CEL rule refusing user:password@ in an endpoint URL; _refuse_credentials says the same offline."""
    rule = f"!has(self.{field}) || !self.{field}.matches('^[a-zA-Z][a-zA-Z0-9+.-]*://[^/@]*@')"
    return cel(rule, NO_CREDENTIALS_IN_URL)


def _refuse_credentials(url: str) -> str:
    if has_userinfo(url):
        raise ValueError(NO_CREDENTIALS_IN_URL)
    return url


class TLSSpec(Model):
    """TLS to a server: its certificate is verified against this CA bundle (there is no switch to skip it)."""

    ca: EnvVarSource = Field(description="The CA certificates (PEM): a key of a ConfigMap or of a Secret.")


SECRET_REF_DESCRIPTION = "Secret with the server's credentials; services get them as secretKeyRef env, not a ConfigMap."


class NatsEndpoint(Model):
    model_config = ConfigDict(json_schema_extra=validations(no_credentials_rule("url")))

    url: str = Field("nats://nats:4222", pattern=URL_PATTERN, max_length=512, description="NATS server URL.")
    secret_ref: ServerSecretRef | None = Field(None, description=SECRET_REF_DESCRIPTION)
    tls: TLSSpec | None = Field(None, description="Connect with TLS, verifying the server against this CA.")

    _no_credentials = field_validator("url")(_refuse_credentials)


def tls_scheme_rule(scheme: str) -> dict[str, str]:
    return cel(f"!has(self.tls) || self.url.startsWith('{scheme}://')", f"with tls, the url is {scheme}://")


def _tls_scheme(endpoint: Any, scheme: str) -> Any:
    if endpoint.tls is not None and not endpoint.url.startswith(f"{scheme}://"):
        raise ValueError(f"with tls, the url is {scheme}://")
    return endpoint


class RedisEndpoint(Model):
    model_config = ConfigDict(json_schema_extra=validations(no_credentials_rule("url"), tls_scheme_rule("rediss")))

    url: str = Field("redis://redis:6379/0", pattern=URL_PATTERN, max_length=512, description="Redis URL.")
    secret_ref: ServerSecretRef | None = Field(None, description=SECRET_REF_DESCRIPTION)
    tls: TLSSpec | None = Field(None, description="Verify the server against this CA (the URL is rediss://).")

    _no_credentials = field_validator("url")(_refuse_credentials)

    @model_validator(mode="after")
    def _scheme(self) -> RedisEndpoint:
        return _tls_scheme(self, "rediss")  # type: ignore[no-any-return]


class QuestDBEndpoint(Model):
    model_config = ConfigDict(json_schema_extra=validations(no_credentials_rule("url"), tls_scheme_rule("https")))

    url: str = Field(
        "http://questdb:9000",
        pattern=URL_PATTERN,
        max_length=512,
        description="QuestDB HTTP endpoint (REST /exec and ILP /write).",
    )
    secret_ref: ServerSecretRef | None = Field(
        None, description="Secret with QuestDB's HTTP basic auth (http.user, http.password) or a token."
    )
    tls: TLSSpec | None = Field(None, description="Verify the server against this CA (the URL is https://).")

    _no_credentials = field_validator("url")(_refuse_credentials)

    @model_validator(mode="after")
    def _scheme(self) -> QuestDBEndpoint:
        return _tls_scheme(self, "https")  # type: ignore[no-any-return]


class S3Endpoint(Model):
    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.endpoint) || !self.endpoint.startsWith('http://')"
                " || (has(self.allowHttp) && self.allowHttp)",
                "s3.endpoint uses plain http: set s3.allowHttp to true to allow it",
            ),
            no_credentials_rule("endpoint"),
        )
    )

    endpoint: str = Field("http://s3:8333", pattern=URL_PATTERN, max_length=512, description="S3 API endpoint URL.")
    region: str = Field("us-east-1", min_length=1, max_length=64, description="S3 region.")
    bucket: str = Field(
        "trader2025",
        pattern=BUCKET_PATTERN,
        max_length=63,
        description="Bucket holding the Delta Lake tables.",
    )
    allow_http: bool = Field(
        False,
        description="Allow a plain-HTTP endpoint. Must be true when endpoint starts with http://.",
    )
    secret_ref: SecretKeyRef | None = Field(
        None, description="Secret with S3 credentials; never put credentials in the spec."
    )

    _no_credentials = field_validator("endpoint")(_refuse_credentials)

    @model_validator(mode="after")
    def _plain_http_is_explicit(self) -> S3Endpoint:
        if self.endpoint.startswith("http://") and not self.allow_http:
            raise ValueError("s3.endpoint uses plain http: set s3.allowHttp to true to allow it")
        return self


class Infrastructure(Model):
    """Where the platform's servers are. Defaults match the chart's in-cluster services."""

    nats: NatsEndpoint = Field(default_factory=NatsEndpoint, description="NATS with JetStream.")
    redis: RedisEndpoint = Field(default_factory=RedisEndpoint, description="Redis or Valkey.")
    questdb: QuestDBEndpoint = Field(default_factory=QuestDBEndpoint, description="QuestDB.")
    s3: S3Endpoint = Field(
        default_factory=lambda: S3Endpoint(allow_http=True),
        description="S3-compatible storage.",
        # The in-cluster default endpoint is plain http, so its default allows it explicitly.
        json_schema_extra={"default": {"allowHttp": True}},
    )


class StreamSpec(Model):
    """A JetStream stream. Fields mirror the NATS stream configuration."""

    name: str = Field(pattern=STREAM_NAME_PATTERN, max_length=64, description="Stream name.")
    subjects: list[Annotated[str, Field(pattern=SUBJECT_PATTERN, max_length=256)]] = Field(
        min_length=1,
        max_length=32,
        description="Subjects the stream captures.",
        json_schema_extra=UNIQUE_SET,
    )
    storage: Literal["file", "memory"] = Field("file", description="Storage type (immutable).")
    retention: Literal["limits", "interest", "workqueue"] = Field("limits", description="Retention policy (immutable).")
    discard: Literal["old", "new"] = Field("old", description="What to discard when full.")
    max_age: str = Field(
        "24h", pattern=DURATION_PATTERN, max_length=32, description="Maximum message age; 0s keeps forever."
    )
    max_bytes: int = Field(-1, ge=-1, description="Maximum stream size in bytes; -1 is unlimited.")
    max_msgs: int = Field(-1, ge=-1, description="Maximum number of messages; -1 is unlimited.")
    replicas: int = Field(1, ge=1, le=5, description="Number of stream replicas in a NATS cluster.")
    duplicate_window: str | None = Field(
        None,
        pattern=DURATION_PATTERN,
        max_length=32,
        description="Window for Nats-Msg-Id de-duplication (server default 2m).",
    )

    # Checked by the operator, not by CEL: duration() is too costly for the 1.24 API server's
    # CEL budget, so such a spec is accepted and then reported as InvalidSpec in a condition.
    @model_validator(mode="after")
    def _window_within_age(self) -> StreamSpec:
        if self.duplicate_window is None:
            return self
        age = parse_duration(self.max_age)
        if age and parse_duration(self.duplicate_window) > age:
            raise ValueError("duplicateWindow may not be longer than maxAge")
        return self


class BucketSpec(Model):
    name: str = Field(pattern=BUCKET_PATTERN, max_length=63, description="Bucket name.")


ColumnType = Literal[
    "BOOLEAN", "BYTE", "SHORT", "INT", "LONG", "FLOAT", "DOUBLE", "CHAR",
    "STRING", "VARCHAR", "SYMBOL", "DATE", "TIMESTAMP", "UUID", "LONG256", "IPV4",
]  # fmt: skip


class ColumnSpec(Model):
    name: str = Field(pattern=IDENTIFIER_PATTERN, max_length=63, description="Column name.")
    type: ColumnType = Field(description="QuestDB column type.")


class TableSpec(Model):
    """A QuestDB table with a designated timestamp."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.columns.exists(c, c.name == self.timestamp && c.type == 'TIMESTAMP')",
                "the designated timestamp must be one of the columns, of type TIMESTAMP",
            ),
            cel(
                "!has(self.dedupKeys) || size(self.dedupKeys) == 0 || self.timestamp in self.dedupKeys",
                "dedupKeys must include the designated timestamp",
            ),
            cel("!self.wal || self.partitionBy != 'NONE'", "a WAL table must be partitioned"),
            cel(
                "!has(self.retentionDays) || self.partitionBy != 'NONE'",
                "retentionDays drops whole partitions: the table must be partitioned",
            ),
            cel(f"self.name != '{OWNERS_TABLE}'", f"{OWNERS_TABLE} is the operator's record of who made each table"),
        )
    )

    name: str = Field(pattern=IDENTIFIER_PATTERN, max_length=63, description="Table name.")
    columns: list[ColumnSpec] = Field(
        min_length=1,
        max_length=64,
        description="Columns, including the designated timestamp.",
        json_schema_extra=keyed_list("name"),
    )
    timestamp: str = Field("ts", pattern=IDENTIFIER_PATTERN, max_length=63, description="Designated timestamp column.")
    partition_by: Literal["NONE", "HOUR", "DAY", "WEEK", "MONTH", "YEAR"] = Field("DAY", description="Partitioning.")
    wal: bool = Field(True, description="Write-ahead-log table (needed for dedup and concurrent writers).")
    dedup_keys: list[Annotated[str, Field(pattern=IDENTIFIER_PATTERN, max_length=63)]] = Field(
        default_factory=list,
        max_length=16,
        description="DEDUP UPSERT KEYS, so a replay does not double-write.",
        json_schema_extra=UNIQUE_SET,
    )
    retention_days: int | None = Field(
        None,
        ge=1,
        le=36500,
        description="Drop partitions whose whole time range is older than this many days (checked on every "
        "drift check). Unset keeps everything.",
    )

    # "every dedup key is a column" is checked here only (its CEL cost is over budget).
    @model_validator(mode="after")
    def _questdb_rules(self) -> TableSpec:
        types = {c.name: c.type for c in self.columns}
        if types.get(self.timestamp) != "TIMESTAMP":
            raise ValueError("the designated timestamp must be one of the columns, of type TIMESTAMP")
        if any(k not in types for k in self.dedup_keys):
            raise ValueError("every dedup key must be a column")
        if self.dedup_keys and self.timestamp not in self.dedup_keys:
            raise ValueError("dedupKeys must include the designated timestamp")
        if self.wal and self.partition_by == "NONE":
            raise ValueError("a WAL table must be partitioned")
        if self.retention_days is not None and self.partition_by == "NONE":
            raise ValueError("retentionDays drops whole partitions: the table must be partitioned")
        if self.name == OWNERS_TABLE:
            raise ValueError(f"{OWNERS_TABLE} is the operator's record of who made each table")
        return self


ACCOUNT_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

Labels = Annotated[dict[str, Annotated[str, Field(max_length=63)]], Field(max_length=16)]


class NetworkPeer(Model):
    """Pods let in: those matching both selectors. Without namespaceLabels, pods of the stack's namespace."""

    namespace_labels: Labels | None = Field(None, description="Labels of the namespaces (matchLabels).")
    pod_labels: Labels | None = Field(None, description="Labels of the pods (matchLabels); absent: every pod.")


class NetworkPolicySpec(Model):
    """The stack's NetworkPolicies: deny by default, then only the flows the platform uses."""

    enabled: bool = Field(True, description="Render the NetworkPolicies (enforced where the CNI supports them).")
    api_from: list[NetworkPeer] = Field(
        default_factory=list,
        max_length=16,
        description="Who may call the gateway and the OMS; [] is any pod of the stack's namespace.",
    )
    metrics_from: list[NetworkPeer] = Field(
        default_factory=list,
        max_length=16,
        description="Who may reach every service's HTTP port (/metrics, /readyz); [] is any pod of the namespace.",
    )


class AccountKeysRef(Model):
    """A Secret in the stack's namespace holding an account's API keys, hashed."""

    name: str = Field(min_length=1, max_length=253, description="Secret name.")
    key: str = Field(
        "sha256",
        min_length=1,
        max_length=253,
        description="Key holding the SHA-256 hex digests of the account's API keys, one a line "
        '(`printf %s "$KEY" | sha256sum`); the keys themselves are never stored.',
    )


class RiskLimit(Model):
    """Per-symbol limits the risk service enforces."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("self.minQuantity <= self.maxQuantity", "minQuantity may not exceed maxQuantity")
        )
    )

    symbol: str = Field(pattern=SYMBOL_PATTERN, max_length=32, description="Symbol the limits apply to.")
    min_quantity: float = Field(0.0, ge=0, description="Smallest order quantity accepted.")
    max_quantity: float = Field(1000.0, gt=0, description="Largest order quantity accepted.")
    max_notional: float = Field(1_000_000.0, gt=0, description="Largest order notional (quantity x price).")
    max_position: float = Field(
        10_000.0,
        gt=0,
        description="Largest absolute position after the order, counting every open order of the account on "
        "its side (they may fill up to it, never past it).",
    )

    @model_validator(mode="after")
    def _min_not_above_max(self) -> RiskLimit:
        if self.min_quantity > self.max_quantity:
            raise ValueError("minQuantity may not exceed maxQuantity")
        return self


class Account(Model):
    """A trading account: who may place, see and cancel which orders, with positions of its own."""

    name: str = Field(pattern=ACCOUNT_NAME_PATTERN, max_length=63, description="Account name, carried by its orders.")
    secret_ref: AccountKeysRef = Field(description="Secret with the account's hashed API keys.")
    risk_limits: list[RiskLimit] = Field(
        default_factory=list,
        max_length=256,
        description="This account's limits per symbol, checked against its own position; symbols without "
        "one get spec.riskLimits.",
        json_schema_extra=keyed_list("symbol"),
    )
    max_open_orders: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Orders this account may have open at once; spec.maxOpenOrders "
        "when unset. Risk refuses the next one (HIGH) until one fills or ends.",
    )
    role: Literal["trader", "oversight"] = Field(
        "trader",
        description="trader: sees its own orders, fills, positions, alerts, reports and resting orders. "
        "oversight: also reads every account's alerts, day reports, execution quality and resting orders, "
        "and may write a day's report (compliance and risk staff).",
    )


class ComplianceRules(Model):
    """Thresholds of the compliance-scanner's rules over the order stream. Times are the events' own
    (order entry, fill), so a replay raises the same alerts."""

    wash_trade_window_seconds: int = Field(
        60, ge=1, le=86_400, description="An account buying and selling one symbol within this window is a wash trade."
    )
    near_breach_share: float = Field(
        0.8, gt=0, lt=1, description="A position at this share of its maxPosition limit is a near breach."
    )
    fat_finger_max_notional: float = Field(
        250_000.0, gt=0, le=1e15, description="An order above this notional (quantity x price) is a fat finger."
    )
    fat_finger_price_deviation: float = Field(
        0.05, gt=0, le=10, description="A limit price this far from the mid at entry (0.05 = 5%) is a fat finger."
    )
    ratio_window_seconds: int = Field(
        300, ge=10, le=86_400, description="Window of the order-to-fill and cancel ratios, per account."
    )
    ratio_min_orders: int = Field(20, ge=1, le=1_000_000, description="Orders in the window before a ratio is judged.")
    max_order_to_fill_ratio: float = Field(
        10.0, ge=1, le=1_000_000, description="More orders per fill than this in the window raises an alert."
    )
    max_cancel_ratio: float = Field(
        0.9, gt=0, le=1, description="A larger share of the window's orders cancelled raises an alert."
    )


def _default_streams() -> list[StreamSpec]:
    return [
        StreamSpec(name="MARKET_TICKS", subjects=["market.tick.>"]),
        StreamSpec(name="ALT_DATA", subjects=["alt.norm.>"]),
        StreamSpec(name="MARKET_BARS", subjects=["market.bar.>"]),
        StreamSpec(name="ORDERS", subjects=["orders.>"], max_age="168h"),
        StreamSpec(name="FILLS", subjects=["fills.>"], max_age="168h"),
        StreamSpec(name="DEAD_LETTER", subjects=["dlq.>"], max_age="168h"),
    ]


def _columns(**types: str) -> list[ColumnSpec]:
    return [ColumnSpec.model_validate({"name": n, "type": t}) for n, t in types.items()]


def _default_tables() -> list[TableSpec]:
    return [
        TableSpec(
            name="ticks",
            columns=_columns(
                symbol="SYMBOL", exchange="SYMBOL", venue="SYMBOL", tick_id="VARCHAR", price="DOUBLE",
                size="DOUBLE", volume="DOUBLE", bid="DOUBLE", ask="DOUBLE", ts="TIMESTAMP",
            ),
            # One row per trade: two trades of one venue in one microsecond are two ticks.
            dedup_keys=["ts", "symbol", "tick_id"],
        ),
        TableSpec(
            name="ohlcv_1m",
            columns=_columns(
                symbol="SYMBOL", open="DOUBLE", high="DOUBLE", low="DOUBLE", close="DOUBLE",
                volume="DOUBLE", trades="LONG", ts="TIMESTAMP",
            ),
            dedup_keys=["ts", "symbol"],
        ),
        TableSpec(
            name="orders",
            columns=_columns(
                # Ids are VARCHAR: as SYMBOLs every id ever seen would grow the symbol table.
                order_id="VARCHAR", client_order_id="VARCHAR", symbol="SYMBOL", side="SYMBOL",
                order_type="SYMBOL", quantity="DOUBLE", limit_price="DOUBLE", status="SYMBOL",
                ts="TIMESTAMP",
            ),
            dedup_keys=["ts", "order_id", "status"],
        ),
        TableSpec(
            name="fills",
            columns=_columns(
                fill_id="VARCHAR", order_id="VARCHAR", symbol="SYMBOL", side="SYMBOL",
                quantity="DOUBLE", price="DOUBLE", account="SYMBOL", ts="TIMESTAMP",
            ),
            dedup_keys=["ts", "fill_id"],
        ),
        TableSpec(
            name="positions",
            columns=_columns(
                symbol="SYMBOL", quantity="DOUBLE", avg_price="DOUBLE", realized_pnl="DOUBLE",
                unrealized_pnl="DOUBLE", account="SYMBOL", ts="TIMESTAMP",
            ),
            # A position is an account's (empty when order entry is open): two accounts, two rows.
            dedup_keys=["ts", "symbol", "account"],
        ),
    ]  # fmt: skip


_SERVICE_NAMES = [s.value for s in ServiceName]


class OrderAuthorization(Model):
    """An external policy (OPA's data API) asked before each order is placed or cancelled."""

    model_config = ConfigDict(json_schema_extra=validations(no_credentials_rule("url")))

    url: str = Field(pattern=URL_PATTERN, max_length=512, description="Policy server, e.g. http://opa:8181.")
    decision_path: str = Field(
        "tradingstack/orders/allow",
        pattern=r"^[A-Za-z0-9_]+(/[A-Za-z0-9_]+)*$",
        max_length=256,
        description='The decision asked: POST {url}/v1/data/{decisionPath} with {"input": ...}; only a '
        "result of true allows. No answer, an error or an undefined decision refuses (fail closed).",
    )
    timeout_seconds: float = Field(1.0, gt=0, le=10, description="How long the OMS waits for a decision.")

    _no_credentials = field_validator("url")(_refuse_credentials)


class Delivery(Model):
    """How the services' durable consumers treat a message they cannot handle."""

    max_deliver: int = Field(
        20,
        ge=2,
        le=1000,
        description="Deliveries of one message before it goes to the dead-letter stream with its last error. "
        "Failed handling is retried after 1, 2, 4 ... 60 s, so the default rides out about 15 minutes "
        "of a dependency being away.",
    )


MIB = 1024 * 1024
# Vacuum deletes the files a compaction replaced once they are this old. A reader (a query, a sink
# starting up) that began on an older version still opens them: below an hour, a long query would
# fail. Delta's own default is 7 days (delta.deletedFileRetentionDuration).
MIN_VACUUM_RETENTION_HOURS = 1


class LakeUpkeep(Model):
    """Compaction, checkpoints and vacuum of the Delta tables the platform writes (lake/market_ticks,
    lake/alt_data, and lake/audit and lake/reports while their services run), run by the operator,
    never twice at once for one table."""

    enabled: bool = Field(True, description="Run upkeep on the schedule below.")
    interval_seconds: int = Field(
        3600, ge=60, le=7 * 24 * 3600, description="How often each table is compacted, checkpointed and vacuumed."
    )
    target_file_size_bytes: int = Field(
        128 * MIB, ge=MIB, le=1024 * MIB, description="Size compaction aims for per Parquet file."
    )
    vacuum_retention_hours: int = Field(
        168,
        ge=MIN_VACUUM_RETENTION_HOURS,
        le=24 * 365,
        description="Files a compaction replaced are deleted once this old (at least 1 hour: readers of an "
        "older version still open them).",
    )


# The Delta tables of tradingstack.lake.ALL_TABLES by their short names (a test keeps the two in step):
# the platform's two, and those of the audit log and ptrc while they run.
LAKE_TABLE_NAMES = ("market_ticks", "alt_data", "audit", "reports")


class Lake(Model):
    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.tables) || self.tables.all(k, k in " + repr(list(LAKE_TABLE_NAMES)) + ")",
                "unknown lake table; known tables: " + ", ".join(LAKE_TABLE_NAMES),
            ),
        )
    )

    upkeep: LakeUpkeep = Field(default_factory=LakeUpkeep, description="Table upkeep.")
    shared: bool = Field(
        False,
        description="Write into Delta tables another stack made (one bucket for several stacks, on purpose): each "
        "stack's sinks record their own stream's identity with their commits, so neither skips the other's rows. "
        "Without it such tables are refused (BucketsReady False, OwnedByAnotherStack); lake/reports always is "
        "(ptrc replaces a day's rows in place).",
    )
    tables: dict[str, LakeUpkeep] | None = Field(
        None,
        max_length=len(LAKE_TABLE_NAMES),
        description="Upkeep of one table in place of `upkeep`, keyed by table (" + ", ".join(LAKE_TABLE_NAMES) + ").",
    )

    @field_validator("tables")
    @classmethod
    def _known_tables(cls, tables: dict[str, LakeUpkeep] | None) -> dict[str, LakeUpkeep] | None:
        unknown = sorted(set(tables or {}) - set(LAKE_TABLE_NAMES))
        if unknown:
            raise ValueError(f"unknown lake table {', '.join(unknown)}; known tables: {', '.join(LAKE_TABLE_NAMES)}")
        return tables

    def upkeep_for(self, path: str) -> LakeUpkeep:
        """The policy of the table at `path` (lake/<name>)."""
        return (self.tables or {}).get(path.rsplit("/", 1)[-1], self.upkeep)


class TradingStackSpec(Model):
    """Desired state of a trading platform. An empty spec runs all eight services with defaults."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.services) || self.services.all(k, k in " + repr(_SERVICE_NAMES) + ")",
                "unknown service name; known services: " + ", ".join(_SERVICE_NAMES),
            ),
            cel(
                "!has(self.services) || "
                + " && ".join(
                    f"(!('{s.value}' in self.services) || !has(self.services['{s.value}'].replicas) || "
                    f"self.services['{s.value}'].replicas <= 1)"
                    for s in SINGLE_WRITER_SERVICES
                ),
                _SINGLE_WRITER_MESSAGE,
            ),
        )
    )

    paused: bool = Field(False, description="Stop reconciling; existing objects are left as they are.")
    deletion_policy: Literal["Retain", "Delete"] = Field(
        "Retain",
        description="On delete, Retain keeps streams, buckets and tables; Delete removes them.",
    )
    image: Image = Field(default_factory=Image, description="Image every service runs.")
    symbols: list[Annotated[str, Field(pattern=SYMBOL_PATTERN, max_length=32)]] = Field(
        default_factory=lambda: ["BTCUSDT", "ETHUSDT", "SOLUSDT"],
        min_length=1,
        max_length=256,
        description="Symbols traded.",
        json_schema_extra=UNIQUE_SET,
    )
    services: dict[str, ServiceSpec] = Field(
        default_factory=dict,
        max_length=len(ServiceName),
        description="Per-service settings keyed by service name (" + ", ".join(_SERVICE_NAMES) + ").",
    )
    infrastructure: Infrastructure = Field(
        default_factory=Infrastructure, description="Endpoints of NATS, Redis, QuestDB and S3."
    )
    streams: list[StreamSpec] = Field(
        default_factory=_default_streams,
        max_length=32,
        description="JetStream streams; defaults to the platform's streams.",
        json_schema_extra=keyed_list("name"),
    )
    buckets: list[BucketSpec] = Field(
        default_factory=list,
        max_length=32,
        description="Extra S3 buckets; the lake bucket (infrastructure.s3.bucket) is always included.",
        json_schema_extra=keyed_list("name"),
    )
    tables: list[TableSpec] = Field(
        default_factory=_default_tables,
        max_length=32,
        description="QuestDB tables; defaults to ticks, ohlcv_1m, orders, fills and positions.",
        json_schema_extra=keyed_list("name"),
    )
    # Optional, not defaulted to {}: with one more defaulted object in spec, Kubernetes 1.24 failed
    # the spec's CEL rule with "internal error: index out of range" on every status write.
    lake: Lake | None = Field(None, description="The Delta Lake tables' upkeep; upkeep runs with defaults when unset.")
    risk_limits: list[RiskLimit] = Field(
        default_factory=list,
        max_length=256,
        description="Per-symbol risk limits; symbols without one get the risk service's defaults.",
        json_schema_extra=keyed_list("symbol"),
    )
    max_open_orders: int = Field(
        1_000,
        ge=1,
        le=1_000_000,
        description="Orders one account (or open order entry) may have open at once "
        "(routed, resting, partially filled): risk refuses the next one until one fills or ends.",
    )
    drift_check_interval_seconds: int = Field(
        60, ge=10, le=3600, description="How often the operator re-checks children and infrastructure."
    )
    delivery: Delivery = Field(default_factory=Delivery, description="Redelivery and dead-lettering of messages.")
    network_policy: NetworkPolicySpec = Field(
        default_factory=NetworkPolicySpec, description="NetworkPolicies around the stack's pods."
    )
    order_authorization: OrderAuthorization | None = Field(
        None, description="Ask an external policy (OPA-compatible) before placing or cancelling an order."
    )
    compliance: ComplianceRules | None = Field(
        None, description="Thresholds of the compliance-scanner's rules; defaults when unset."
    )
    accounts: list[Account] = Field(
        default_factory=list,
        max_length=64,
        description="Trading accounts. With any, order entry needs `Authorization: Bearer <API key>` of one, "
        "and an account sees and cancels only its own orders; with none, order entry is open.",
        json_schema_extra=keyed_list("name"),
    )

    @field_validator("services")
    @classmethod
    def _known_services(cls, value: dict[str, ServiceSpec]) -> dict[str, ServiceSpec]:
        unknown = sorted(set(value) - set(_SERVICE_NAMES))
        if unknown:
            raise ValueError(
                f"unknown service name(s) {', '.join(unknown)}; known services: {', '.join(_SERVICE_NAMES)}"
            )
        return value

    @field_validator("services")
    @classmethod
    def _single_writers(cls, value: dict[str, ServiceSpec]) -> dict[str, ServiceSpec]:
        if any(value[s.value].replicas > 1 for s in SINGLE_WRITER_SERVICES if s.value in value):
            raise ValueError(_SINGLE_WRITER_MESSAGE)
        return value

    def service(self, name: ServiceName) -> ServiceSpec:
        return self.services.get(name.value) or ServiceSpec()

    def enabled_services(self) -> list[ServiceName]:
        def wanted(service: ServiceName) -> bool:
            enabled = self.service(service).enabled
            return service not in OPT_IN_SERVICES if enabled is None else enabled

        return [s for s in ServiceName if wanted(s)]


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(Model):
    """A Kubernetes condition (metav1.Condition)."""

    type: str = Field(max_length=316, description="Condition type, e.g. Ready.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        max_length=1024,
        description="Machine-readable CamelCase reason.",
    )
    message: str = Field("", max_length=32768, description="Human-readable detail.")
    last_transition_time: str = Field(
        json_schema_extra={"format": "date-time"}, description="When status last changed."
    )
    observed_generation: int | None = Field(None, ge=0, description="Generation the condition is based on.")


class ServiceStatus(Model):
    name: str = Field(description="Service name.")
    desired_replicas: int = Field(0, description="Replicas asked for.")
    ready_replicas: int = Field(0, description="Replicas ready.")
    available_replicas: int = Field(0, description="Replicas available.")
    ready: bool = Field(False, description="All replicas of the current revision are available.")


class InfraItemStatus(Model):
    name: str = Field(description="Stream, bucket or table name.")
    ready: bool = Field(False, description="It exists as the spec declares.")
    reason: str = Field("", description="InSync, Missing, Drifted (dry runs), ImmutableFieldChanged, Rejected.")
    message: str = Field("", description="Detail.")


_ITEM_LIST = keyed_list("name")


class LakeTableStatus(Model):
    name: str = Field(description="Table path in the lake bucket.")
    last_upkeep: str | None = Field(None, description="When upkeep last finished (RFC 3339).")
    files: int | None = Field(None, description="Data files in the table's current version.")
    size_bytes: int | None = Field(None, description="Their total size.")
    version: int | None = Field(None, description="The table's version after upkeep.")
    message: str = Field("", description="What the last run did, or why it failed.")


class TradingStackStatus(Model):
    """Observed state, written only by the operator."""

    observed_generation: int | None = Field(None, description="Last generation reconciled.")
    phase: str | None = Field(None, description="Summary derived from the conditions.")
    services_ready: str | None = Field(None, description="Ready services out of desired, e.g. 7/8.")
    services: list[ServiceStatus] = Field(
        default_factory=list,
        description="Per-service readiness.",
        json_schema_extra=keyed_list("name"),
    )
    streams: list[InfraItemStatus] = Field(
        default_factory=list, description="Per-stream state.", json_schema_extra=_ITEM_LIST
    )
    buckets: list[InfraItemStatus] = Field(
        default_factory=list, description="Per-bucket and Delta table state.", json_schema_extra=_ITEM_LIST
    )
    tables: list[InfraItemStatus] = Field(
        default_factory=list, description="Per-QuestDB-table state.", json_schema_extra=_ITEM_LIST
    )
    redis: list[InfraItemStatus] = Field(
        default_factory=list, description="The Redis database's claim by this stack.", json_schema_extra=_ITEM_LIST
    )
    lake: list[LakeTableStatus] = Field(
        default_factory=list, description="Per-Delta-table upkeep.", json_schema_extra=_ITEM_LIST
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description=(
            "Standard conditions: Ready, ServicesReady, StreamsReady, BucketsReady, TablesReady, RedisReady, "
            "Progressing, Degraded."
        ),
        json_schema_extra=keyed_list("type"),
    )


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Seconds in a Go-style duration string (the form CEL's duration() accepts)."""
    if not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))
