"""Service configuration from the environment: the names the operator's ConfigMaps set."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Literal

from pydantic import Field, computed_field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tradingstack.credentials import ServerCredentials


def _parse_sources(text: str) -> list[tuple[str, str, str]]:
    try:
        data = json.loads(text)
    except ValueError:
        raise ValueError("not JSON") from None
    if not isinstance(data, list) or not all(
        isinstance(item, list) and len(item) == 3 and all(isinstance(x, str) and x for x in item) for item in data
    ):
        raise ValueError("a JSON list of [stream, durable, subject] lists")
    return [(stream, durable, subject) for stream, durable, subject in data]


if TYPE_CHECKING:
    from tradingstack.api import ComplianceRules


def _seed_ports() -> dict[str, int]:
    from tradingstack.api import DEFAULT_PORTS

    return {service.value: port for service, port in DEFAULT_PORTS.items()}


def parse_prices(text: str | None) -> dict[str, float]:
    """`BTCUSDT=45000,ETHUSDT=2500` as {symbol: price}; ValueError naming the bad item."""
    prices = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        symbol, _, value = item.partition("=")
        try:
            price = float(value)
        except ValueError:
            price = math.nan
        if not symbol.strip() or not (math.isfinite(price) and price > 0):
            raise ValueError(f"{item[:40]!r} is not SYMBOL=positive price")
        prices[symbol.strip().upper()] = price
    return prices


class ServiceSettings(BaseSettings):
    """Everything a service reads. Names match plan.service_config (and the README)."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=True)

    SERVICE_NAME: str
    # The stack a service belongs to; run by hand, the names the operator would give a stack
    # called "tradingstack" in "default" (its durable consumers' names are made from them).
    STACK_NAME: str = "tradingstack"
    STACK_NAMESPACE: str = "default"
    PORT: int = Field(8080, ge=1, le=65535, description="defaults to the service's seed port")
    SYMBOLS: str = "BTCUSDT,ETHUSDT,SOLUSDT"
    NATS_URL: str = "nats://127.0.0.1:4222"
    REDIS_URL: str = "redis://127.0.0.1:6379/0"
    QUESTDB_URL: str = "http://127.0.0.1:9000"
    S3_ENDPOINT_URL: str = "http://127.0.0.1:9000"
    S3_BUCKET: str = "trader2025"
    AWS_REGION: str = "us-east-1"
    AWS_ALLOW_HTTP: bool = False
    AWS_ACCESS_KEY_ID: str | None = None
    AWS_SECRET_ACCESS_KEY: str | None = Field(None, repr=False)
    # Credentials: set by Kubernetes from the Secret a spec's secretRef names, never in a ConfigMap.
    NATS_USER: str | None = None
    NATS_PASSWORD: str | None = Field(None, repr=False)
    NATS_TOKEN: str | None = Field(None, repr=False)
    REDIS_USERNAME: str | None = None
    REDIS_PASSWORD: str | None = Field(None, repr=False)
    QUESTDB_USER: str | None = None
    QUESTDB_PASSWORD: str | None = Field(None, repr=False)
    QUESTDB_TOKEN: str | None = Field(None, repr=False)
    # CA bundles (files the operator mounts) that verify servers over TLS.
    NATS_CA_FILE: str | None = None
    REDIS_CA_FILE: str | None = None
    QUESTDB_CA_FILE: str | None = None
    NATS_STREAM: str | None = Field(None, description="the stream this service reads; defaults to the plan's")
    NATS_DURABLE: str | None = Field(None, description="its durable consumer; defaults to the plan's name for it")
    NATS_FILTER_SUBJECT: str | None = Field(None, description="the consumer's filter; defaults to the plan's")
    NATS_MAX_DELIVER: int = Field(20, ge=2, description="deliveries before a message is dead-lettered")
    DEAD_LETTER_PREFIX: str = "dlq"
    LOG_FORMAT: str = "json"
    RISK_LIMITS: str | None = None  # JSON list of spec.riskLimits
    RISK_ACCOUNT_LIMITS: str | None = None  # JSON {account: [limits]} of spec.accounts[].riskLimits
    RISK_MAX_OPEN_ORDERS: str | None = None  # JSON {"": spec.maxOpenOrders, account: accounts[].maxOpenOrders}
    # live-gateway
    LIVE_VENUE: Literal["binance"] = Field("binance", description="the exchange whose public market data is read")
    LIVE_WS_URL: str | None = Field(None, description="the venue's WebSocket base URL; defaults to its public one")
    LIVE_STALE_SECONDS: float = Field(
        30.0, gt=0, description="a symbol without a message this long makes the feed stale"
    )
    LIVE_RECONNECT_MAX_SECONDS: float = Field(60.0, gt=0, description="longest wait between reconnects")
    LIVE_API_KEY: str | None = Field(None, repr=False, description="the venue's API key, if it needs one (a Secret)")
    # audit-log: JSON [[stream, durable, subject], ...] of the consumers it reads beside its first
    AUDIT_SOURCES: str | None = Field(None, description="the audit log's further streams; defaults to the plan's")
    # pnl
    POSITIONS_JETSTREAM: bool = Field(
        False, description="publish each position with a JetStream ack (set while the audit log reads them)"
    )
    # compliance-scanner
    COMPLIANCE_RULES: str | None = Field(None, description="JSON of spec.compliance (the rules' thresholds)")
    # oms, exeq
    ORDER_RETENTION_SECONDS: int = Field(
        7 * 24 * 3600, ge=60, description="how long a final order stays in Redis (the ORDERS stream keeps 7 days)"
    )
    # oms
    AUTH_ACCOUNTS: str | None = Field(
        None, description="accounts whose API keys (AUTH_KEYS_<ACCOUNT>, SHA-256 digests) may place orders"
    )
    AUTH_OVERSIGHT: str | None = Field(None, description="accounts (role oversight) that read every account's "
                                       "alerts, reports, execution quality and resting orders")  # fmt: skip
    AUTHZ_URL: str | None = Field(None, description="an OPA-compatible policy server asked before orders and cancels")
    AUTHZ_DECISION_PATH: str = "tradingstack/orders/allow"
    AUTHZ_TIMEOUT_SECONDS: float = Field(1.0, gt=0)
    STREAM_MAX_CLIENTS: int = Field(200, ge=1, description="live streams (GET /stream) the OMS, or the gateway's "
                                    "/api/trading/stream, serves at once")  # fmt: skip
    # every HTTP service
    HTTP_MAX_BODY_BYTES: int = Field(1_048_576, ge=1, description="request bodies over this are refused (413), "
                                     "declared or streamed, before they are read")  # fmt: skip
    HTTP_BODY_TIMEOUT_SECONDS: float = Field(
        10.0, gt=0, description="a body still arriving after this is refused (408)"
    )
    HTTP_MAX_CONNECTIONS: int = Field(2_000, ge=1, description="open connections (live streams included) "
                                      "beyond which new requests get 503")  # fmt: skip
    RISK_TIMEOUT_SECONDS: float = Field(1.0, gt=0, description="how long the OMS waits for risk before answering 503")
    # exeq
    EXEQ_PRICE_ATTEMPTS: int = Field(
        30, ge=1, description="deliveries before a market order with no price is cancelled"
    )
    EXEQ_RETRY_SECONDS: float = Field(1.0, gt=0, description="retry delay for a market order with no price yet")
    EXEQ_SWEEP_SECONDS: float = Field(
        30.0, gt=0, description="how often resting orders that ended elsewhere are dropped"
    )
    # gateway
    TICK_RATE: float = Field(10.0, ge=0, description="mock ticks per second per symbol; 0 publishes none")
    REPLAY_FILE: str | None = None
    TRADING_API_URL: str | None = Field(None, description="the OMS the dashboard's /api/trading/ calls go to")
    MOCK_START_PRICES: str | None = Field(
        None, description="first mock price per symbol, `BTCUSDT=45000,ETHUSDT=2500`; others start near the seeds'"
    )
    # sinks
    SINK_MAX_ROWS: int = Field(50_000, ge=1)
    SINK_MAX_AGE_SECONDS: float = Field(1.0, ge=0.1, description="flush at least this often; at most one commit/s")
    SINK_FETCH_BATCH: int = Field(5_000, ge=1)
    SINK_COMMIT_DEADLINE_SECONDS: float = Field(
        180.0, gt=0, description="a Delta commit running longer fails /healthz, so the kubelet restarts the sink"
    )
    S3_MAX_RETRIES: int | None = Field(None, ge=0, description="S3 request retries inside one Delta call")
    S3_RETRY_TIMEOUT_SECONDS: float | None = Field(None, gt=0, description="give up retrying one call after this")

    @field_validator("AUDIT_SOURCES")
    @classmethod
    def _sources(cls, value: str | None) -> str | None:
        if value is not None:
            _parse_sources(value)
        return value

    def audit_sources(self) -> list[tuple[str, str, str]]:
        """(stream, durable, filter subject) of each further stream the audit log reads."""
        return _parse_sources(self.AUDIT_SOURCES or "[]")

    @field_validator("COMPLIANCE_RULES")
    @classmethod
    def _rules(cls, value: str | None) -> str | None:
        from tradingstack.api import ComplianceRules

        if value is not None:
            try:
                ComplianceRules.model_validate_json(value)
            except ValueError as exc:  # reported without the value, which the runner never repeats
                raise ValueError(f"not valid compliance rules: {exc}".splitlines()[0]) from None
        return value

    def compliance_rules(self) -> ComplianceRules:
        from tradingstack.api import ComplianceRules

        return ComplianceRules.model_validate_json(self.COMPLIANCE_RULES or "{}")

    @field_validator("MOCK_START_PRICES")
    @classmethod
    def _prices(cls, value: str | None) -> str | None:
        parse_prices(value)
        return value

    @model_validator(mode="after")
    def _seed_port(self) -> ServiceSettings:
        if "PORT" not in self.model_fields_set:  # not set: the port the service always had
            self.PORT = _seed_ports().get(self.SERVICE_NAME, self.PORT)
        return self

    @model_validator(mode="after")
    def _planned_consumer(self) -> ServiceSettings:
        """Unset, a reader's stream, durable and filter are what the operator's plan gives it, so a
        service run by hand (docker-compose, a shell) reads what `tradingstack provision` made."""
        from tradingstack.api import ServiceName
        from tradingstack.plan import StackRef, durable_name, service_consumer

        try:
            service = ServiceName(self.SERVICE_NAME)
        except ValueError:
            return self
        if (consumer := service_consumer(service)) is None:
            return self
        stream, subject = consumer
        if service == ServiceName.AUDIT and self.AUDIT_SOURCES is None:  # by hand: every stream but COMPLIANCE
            from tradingstack.plan import further_consumers

            stack = StackRef(self.STACK_NAME, self.STACK_NAMESPACE)
            self.AUDIT_SOURCES = json.dumps(further_consumers(stack, service, {"FILLS", "POSITIONS", "AUDIT"}))
        self.NATS_STREAM = self.NATS_STREAM or stream
        self.NATS_FILTER_SUBJECT = self.NATS_FILTER_SUBJECT or subject
        self.NATS_DURABLE = self.NATS_DURABLE or durable_name(StackRef(self.STACK_NAME, self.STACK_NAMESPACE), service)
        return self

    @computed_field  # type: ignore[prop-decorator]
    @property
    def symbols(self) -> list[str]:
        return [s.strip() for s in self.SYMBOLS.split(",") if s.strip()]

    def nats_credentials(self) -> ServerCredentials:
        return ServerCredentials(self.NATS_USER, self.NATS_PASSWORD, self.NATS_TOKEN, self.NATS_CA_FILE)

    def redis_credentials(self) -> ServerCredentials:
        return ServerCredentials(self.REDIS_USERNAME, self.REDIS_PASSWORD, ca_file=self.REDIS_CA_FILE)

    def questdb_credentials(self) -> ServerCredentials:
        return ServerCredentials(self.QUESTDB_USER, self.QUESTDB_PASSWORD, self.QUESTDB_TOKEN, self.QUESTDB_CA_FILE)

    def storage_options(self) -> dict[str, str]:
        from tradingstack import lake  # pyarrow comes with it: only the lake writers pay for it

        return lake.storage_options(
            self.S3_ENDPOINT_URL,
            self.AWS_REGION,
            self.AWS_ALLOW_HTTP,
            self.AWS_ACCESS_KEY_ID,
            self.AWS_SECRET_ACCESS_KEY,
            self.S3_MAX_RETRIES,
            self.S3_RETRY_TIMEOUT_SECONDS,
        )
