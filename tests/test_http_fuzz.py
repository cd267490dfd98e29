"""Every endpoint of every service, from its own OpenAPI document, fed hostile input (hypothesis).

Each service runs as in its container, on real nats-server and redis-server, the S3 server and
the QuestDB double. For each operation its document lists, the fuzzer sends path parameters of
any text, query parameters of any text, and bodies that are anything JSON can say (and some it
cannot: NaN, 1e999, broken UTF-8), shaped after the operation's schema half of the time so the
values get past the first check. The rule: never a 500 (a 503 for a dependency that is away is
allowed), a 4xx never echoes the body it was sent, and every service is still ready afterwards.
"""

from __future__ import annotations

import contextlib
import json
import string
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from questdb_double import QuestDBDouble
from tradingstack.api import ServiceName
from tradingstack.backends import S3Credentials
from tradingstack.backends.jetstream import JetStreamProvisioner
from tradingstack.backends.questdb import QuestDBProvisioner
from tradingstack.backends.s3 import S3Provisioner
from tradingstack.plan import StackRef, build_plan, parse_spec
from tradingstack_services.platform.runner import _factories
from tradingstack_services.platform.settings import ServiceSettings

from conftest import LiveServer, NatsServer, RedisServer, wait_for

CANARY = "c4n4ry-7f3a"  # a body value a 4xx answer must not repeat
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40), st.just(CANARY),
    st.sampled_from(["BTCUSDT", "buy", "sell", "market", "limit", "", " ", "0", "-1", "1e308", "\u0000", "🙂" * 50]),
)  # fmt: skip
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
RAW = st.sampled_from([b"NaN", b"{", b"\xff\xfe", b"1e999", b'{"quantity": NaN}', b'{"a": Infinity}', b"[]" * 5000])
PATH_TEXT = st.text(alphabet=string.printable + "é🙂\u0000", min_size=1, max_size=60)


def shaped(schema: dict[str, Any], components: dict[str, Any]) -> st.SearchStrategy[Any]:
    """An object with the schema's property names and hostile values (so it passes the shape check)."""
    if "$ref" in schema:
        schema = components[schema["$ref"].rsplit("/", 1)[-1]]
    names = list(schema.get("properties", {}))
    if not names:
        return JSON
    return st.fixed_dictionaries({}, optional={name: SCALARS for name in names})


@pytest.fixture
def services(tmp_path: Path, s3_url: str) -> Iterator[dict[ServiceName, LiveServer]]:
    nats_server, redis_server = NatsServer(tmp_path / "js"), RedisServer(tmp_path / "redis")
    nats_server.start()
    redis_server.start()
    bucket = f"fuzz-{uuid.uuid4().hex[:10]}"
    with QuestDBDouble() as qdb, contextlib.ExitStack() as stack:
        spec = {"infrastructure": {"nats": {"url": nats_server.url}, "redis": {"url": redis_server.url},
                                   "questdb": {"url": qdb.url},
                                   "s3": {"endpoint": s3_url, "allowHttp": True, "bucket": bucket}}}  # fmt: skip
        plan = build_plan(StackRef("fuzz", "ns"), parse_spec(spec))
        assert JetStreamProvisioner(nats_server.url).reconcile(plan).ok
        assert QuestDBProvisioner(qdb.url).reconcile(plan).ok
        assert S3Provisioner(plan.spec.infrastructure.s3, S3Credentials("testing", "testing-secret")).reconcile(plan).ok
        servers = {}
        for workload in plan.workloads:
            config = workload.config | {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret"}
            app = _factories()[workload.service.value](ServiceSettings(**config))  # type: ignore[arg-type]
            servers[workload.service] = stack.enter_context(LiveServer(app))
        for name, server in servers.items():
            wait_for(lambda server=server: server.get("/readyz")[0] == 200, 30, f"{name.value} ready")
        yield servers
    redis_server.stop()
    nats_server.stop()


def send(server: LiveServer, method: str, path: str, data: bytes | None) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            if response.headers.get("Content-Type", "").startswith("text/event-stream"):
                # A live stream never ends: its first event is the answer (it must be one).
                return int(response.status), response.readline().decode(errors="replace")
            return int(response.status), response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")


def operations(server: LiveServer) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(method, path template, operation, components) of every operation in the service's document."""
    status, document = server.get("/openapi.json")
    assert status == 200
    components = document.get("components", {}).get("schemas", {})
    return [(method.upper(), path, operation, components) for path, item in document["paths"].items()
            for method, operation in item.items()]  # fmt: skip


def fuzzer(server: LiveServer, method: str, template: str, operation: dict[str, Any], components: dict[str, Any],
           seen: set[int]) -> Any:  # fmt: skip
    """A hypothesis test of one operation: hostile path and query parameters and bodies."""
    body_schema = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    params = operation.get("parameters", [])
    queries = [p["name"] for p in params if p["in"] == "query"] or ["x"]
    bodies = st.one_of(JSON, shaped(body_schema or {}, components)).map(lambda b: json.dumps(b).encode()) | RAW

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(path_values=st.fixed_dictionaries({p["name"]: PATH_TEXT for p in params if p["in"] == "path"}),
           query=st.dictionaries(st.sampled_from(queries), PATH_TEXT, max_size=3), body=bodies)  # fmt: skip
    def fuzz(path_values: dict[str, str], query: dict[str, str], body: bytes) -> None:
        path = template
        for param, value in path_values.items():
            path = path.replace("{" + param + "}", urllib.parse.quote(value, safe=""))
        if query:
            path += "?" + urllib.parse.urlencode(query)
        status, text = send(server, method, path, body if method in ("POST", "PUT", "PATCH") else None)
        seen.add(status)
        assert status < 500 or status == 503, (method, path, body[:200], status, text[:300])
        if 400 <= status < 500 and CANARY.encode() in body:
            assert CANARY not in text, (method, path, "a 4xx echoed its input", text[:300])

    return fuzz


def test_no_endpoint_of_any_service_answers_500_to_anything(services: dict[ServiceName, LiveServer]) -> None:
    seen: dict[str, set[int]] = {}
    for name, server in services.items():
        for method, template, operation, components in operations(server):
            seen[f"{name.value} {method} {template}"] = codes = set()
            fuzzer(server, method, template, operation, components, codes)()
    print("\n" + "\n".join(f"{key}: {sorted(codes)}" for key, codes in sorted(seen.items())))
    assert len(seen) >= 8 * 3  # every service's /healthz, /readyz, /metrics at least
    assert any(422 in codes for codes in seen.values())  # the fuzzer did reach the validation
    for name, server in services.items():
        assert server.get("/readyz")[0] == 200, f"{name.value} no longer ready"
