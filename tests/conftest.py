"""Shared fixtures: a real Kubernetes API server (envtest) and the real operator in-process.

Set TRADINGSTACK_ENVTEST to the folder holding `kube-up` (../shared/envtest; `make test`
does) and install etcd (Debian `etcd-server`). Without it the envtest tests skip and say so.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import kubernetes
import pytest
import uvicorn

ENVTEST = os.environ.get("TRADINGSTACK_ENVTEST", "")
ROOT = Path(__file__).resolve().parents[1]
# The timer wakes every second in tests; each stack's drift interval still comes from its spec.
os.environ.setdefault("TRADINGSTACK_RESYNC_TICK", "1")
os.environ.setdefault("TRADINGSTACK_UPKEEP_TICK", "1")

T = TypeVar("T")


def wait_for(check: Callable[[], T | None], timeout: float = 30.0, what: str = "condition") -> T:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class Envtest:
    """kube-up with our own controller manager: GC and namespaces, but no Deployment or
    ReplicaSet controllers, so Deployment status is what the tests patch (there is no kubelet)."""

    def __init__(self, root: Path, authz: str = "AlwaysAllow") -> None:
        self.root = root
        self.authz = authz  # RBAC: tokens get what their Roles grant (the admin kubeconfig keeps all)
        self.kubeconfig = ""
        self.kcm: subprocess.Popen[bytes] | None = None

    def up(self) -> None:
        result = subprocess.run(
            [f"{ENVTEST}/kube-up", str(self.root)],
            env={**os.environ, "KCM": "0", **({"AUTHZ": "RBAC"} if self.authz == "RBAC" else {})},
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"kube-up failed: {result.stderr.strip()}")
        self.kubeconfig = result.stdout.strip().splitlines()[-1]
        pki, log = self.root / "pki", self.root / "logs" / "test-kcm.log"
        self.kcm = subprocess.Popen(
            [
                str(self.root / "bin" / "kube-controller-manager"),
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--bind-address=127.0.0.1",
                "--secure-port=0",
                "--leader-elect=false",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                "--use-service-account-credentials=false",
                "--controllers=garbagecollector,namespace,serviceaccount,serviceaccount-token,resourcequota",
            ],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def down(self) -> None:
        if self.kcm is not None:
            self.kcm.terminate()
            self.kcm.wait(10)
        subprocess.run([f"{ENVTEST}/kube-down", str(self.root)], check=False, capture_output=True)


def require_envtest() -> None:
    """Skip (or fail, when it is required) without kube-up."""
    if not ENVTEST or not Path(ENVTEST, "kube-up").exists():
        if os.environ.get("TRADINGSTACK_REQUIRE_ENVTEST"):
            pytest.fail(f"TRADINGSTACK_REQUIRE_ENVTEST is set but there is no kube-up in {ENVTEST!r}")
        pytest.skip(
            "no Kubernetes API server: set TRADINGSTACK_ENVTEST=../shared/envtest "
            "(and apt-get install etcd-server) to run the envtest tests; `make test` does"
        )


@pytest.fixture(scope="session")
def envtest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Envtest]:
    require_envtest()
    env = Envtest(tmp_path_factory.mktemp("envtest"))
    env.up()
    os.environ["KUBECONFIG"] = env.kubeconfig  # for kopf's login and for KubeClient.from_environment
    try:
        yield env
    finally:
        env.down()


@pytest.fixture(scope="session")
def kube(envtest: Envtest) -> Iterator[Any]:
    from tradingstack.kubeclient import KubeClient

    config = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=envtest.kubeconfig, client_configuration=config)
    client = KubeClient(kubernetes.client.ApiClient(config), field_manager="tests")
    yield client
    client.close()


@pytest.fixture(scope="session")
def crd(kube: Any) -> dict[str, Any]:
    return install_crd(kube)


def install_crd(kube: Any) -> dict[str, Any]:
    """Apply crds/ and wait until the API server serves it."""
    import yaml

    body = yaml.safe_load((ROOT / "crds" / "tradingstack.io_tradingstacks.yaml").read_text())
    path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{body['metadata']['name']}"
    kube.request(
        "PATCH", path, body=body, query={"fieldManager": "tests", "force": "true"},
        content_type="application/apply-patch+yaml",
    )  # fmt: skip

    def established() -> bool:
        conds = (kube.request("GET", path).get("status") or {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conds)

    wait_for(established, what="the CRD to be established")
    return body  # type: ignore[no-any-return]


class OperatorRunner:
    """The real kopf operator with the project's handlers, in a thread of this process."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.stop_flag = threading.Event()
        self.errors: list[BaseException] = []

    def start(self) -> None:
        import kopf

        import tradingstack.handlers  # noqa: F401  (registers the handlers)

        self.stop_flag = threading.Event()
        ready = threading.Event()

        def run() -> None:
            try:
                asyncio.run(
                    kopf.operator(
                        # Fresh settings per start: a stopped operator shuts its thread pool down.
                        settings=kopf.OperatorSettings(),
                        clusterwide=True,
                        standalone=True,
                        stop_flag=self.stop_flag,
                        ready_flag=ready,
                    )
                )
            except BaseException as exc:  # surfaced by the fixture, not lost in the thread
                self.errors.append(exc)
                ready.set()

        self.thread = threading.Thread(target=run, name="kopf-operator", daemon=True)
        self.thread.start()
        if not ready.wait(30) or self.errors:
            raise RuntimeError(f"operator did not start: {self.errors}")

    def stop(self) -> None:
        self.stop_flag.set()
        if self.thread is not None:
            self.thread.join(30)
            assert not self.thread.is_alive(), "operator did not stop"
        self.thread = None


@pytest.fixture(scope="session")
def operator(crd: dict[str, Any], s3_url: str) -> Iterator[OperatorRunner]:
    # Depends on the shared servers so they outlive the operator that talks to them.
    runner = OperatorRunner()
    runner.start()
    RUNNING_OPERATORS.append(runner)
    try:
        yield runner
    finally:
        RUNNING_OPERATORS.remove(runner)
        runner.stop()  # always, or a failing test hangs at teardown


RUNNING_OPERATORS: list[OperatorRunner] = []


@pytest.fixture
def no_operator() -> Iterator[None]:
    """For a test that writes a stack's status itself: the session's operator (started by an earlier
    test) would write it too, in between, so it is stopped for the test and started again after."""
    stopped = list(RUNNING_OPERATORS)
    for runner in stopped:
        runner.stop()
    try:
        yield
    finally:
        for runner in stopped:
            runner.start()


@pytest.fixture
def namespace(kube: Any, infra: dict[str, Any]) -> Iterator[str]:
    """A namespace of the test's own. Its stacks are deleted (and finalized by the operator) before
    the test's servers stop: `infra` is set up first, so it is torn down last."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    kube.request("POST", "/api/v1/namespaces", body={"metadata": {"name": name}})
    kube.request("POST", f"/api/v1/namespaces/{name}/secrets", body=lake_secret())
    yield name
    stacks = f"/apis/tradingstack.io/v1alpha1/namespaces/{name}/tradingstacks"
    with contextlib.suppress(Exception):
        kube.request("DELETE", stacks)
        deadline = time.monotonic() + 20
        while kube.request("GET", stacks).get("items") and time.monotonic() < deadline:
            time.sleep(0.2)
    kube.request("DELETE", f"/api/v1/namespaces/{name}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, what: str) -> None:
    def accepting() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_for(accepting, 20, what)


class LoopbackServer:
    """A real server binary on a loopback port, keeping its data in `root`; stop() and start() again
    on the same port."""

    binary = ""
    scheme = ""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root, self.port = root, port or free_port()
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def arguments(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        binary = self.binary if os.path.isabs(self.binary) else shutil.which(self.binary)
        if binary is None:
            pytest.skip(f"{self.binary} not installed (apt-get install {self.binary}; `make test` does)")
        self.root.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen([binary, *self.arguments()], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)  # fmt: skip
        wait_port(self.port, f"{self.binary} on {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


class NatsServer(LoopbackServer):
    """nats-server with JetStream."""

    binary, scheme = "nats-server", "nats"

    def arguments(self) -> list[str]:
        return ["-js", "-sd", str(self.root), "-a", "127.0.0.1", "-p", str(self.port)]


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("nats"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_url() -> Iterator[str]:
    """moto's S3 server (real HTTP, conditional puts) for real pyarrow and deltalake calls.

    In its own process: deltalake's Rust client can hold the GIL while it waits on a socket,
    which would starve a server thread in this process.
    """
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, f"moto S3 server on {port}")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def questdb() -> Iterator[Any]:
    """A QuestDB double of the test's own: a stack owns the tables it creates, so two tests' stacks
    on one QuestDB would find each other's tables taken (OwnedByAnotherStack)."""
    from questdb_double import QuestDBDouble

    with QuestDBDouble() as double:
        yield double


LAKE_SECRET = "lake-credentials"


@pytest.fixture
def infra(tmp_path: Path, s3_url: str, questdb: Any) -> Iterator[dict[str, Any]]:
    """The spec block pointing a TradingStack at real servers: a nats-server, a redis-server, a lake
    bucket and a QuestDB double of the test's own (a stack owns the streams, bucket and tables it creates; two
    tests' stacks must not meet there), and the session's S3 server."""
    server = NatsServer(tmp_path / "nats-infra")
    server.start()
    redis_server = RedisServer(tmp_path / "redis-infra")
    redis_server.start()
    bucket = f"lake-{uuid.uuid4().hex[:10]}"
    yield {
        "infrastructure": {
            "nats": {"url": server.url},
            "redis": {"url": redis_server.url},
            "questdb": {"url": questdb.url},
            "s3": {"endpoint": s3_url, "allowHttp": True, "bucket": bucket, "secretRef": {"name": LAKE_SECRET}},
        }
    }
    redis_server.stop()
    server.stop()


def lake_secret() -> dict[str, Any]:
    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    return {
        "metadata": {"name": LAKE_SECRET},
        "data": {"AWS_ACCESS_KEY_ID": b64("testing"), "AWS_SECRET_ACCESS_KEY": b64("testing-secret")},
    }


def http_json(url: str, body: Any = None, timeout: float = 10) -> tuple[int, Any]:
    """(status, JSON body) of a GET, or a POST of `body`; (0, why) when nothing answered."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (OSError, ValueError) as exc:  # refused, reset, timed out, not JSON: nothing usable answered
        return 0, str(exc)


class LiveServer:
    """The service app served by uvicorn on a loopback port, as in its container."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        from tradingstack_services.platform.runner import GRACEFUL_SHUTDOWN_SECONDS

        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None, lifespan="on",
                                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_for(lambda: self.server.started, 20, "uvicorn to start")
        return self

    def __exit__(self, *_: Any) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def post(self, path: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json", **(headers or {})},
        )  # fmt: skip
        return self.get(request)

    def get(self, path: str | urllib.request.Request, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        target = path if isinstance(path, urllib.request.Request) else urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", headers=headers or {}
        )  # fmt: skip
        self.last_headers: dict[str, str] = {}
        try:
            with urllib.request.urlopen(target, timeout=5) as response:
                body = response.read()
                status = response.status
                self.last_headers = dict(response.headers)
        except urllib.error.HTTPError as exc:
            body, status = exc.read(), exc.code
            self.last_headers = dict(exc.headers)
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode()


class RedisServer(LoopbackServer):
    """redis-server without persistence."""

    binary, scheme = "redis-server", "redis"

    def __init__(self, root: Path, port: int | None = None) -> None:
        super().__init__(root, port)
        self.url += "/0"

    def arguments(self) -> list[str]:
        return ["--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
                "--dir", str(self.root)]  # fmt: skip
