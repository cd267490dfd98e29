"""The NetworkPolicies allow the connections the services really make, and no more than they need.

Each service runs as its container does (`tradingstack service NAME`, its environment from the
plan) against real servers; once ready and working, its open TCP connections are read from
/proc and each remote port must be one its policy lets out. (This cluster's CNI does not
enforce NetworkPolicy, so enforcement itself is left to the user's CNI; the API server's
acceptance is checked in tests/test_operator_envtest.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tradingstack.api import ServiceName
from tradingstack.backends.jetstream import JetStreamProvisioner
from tradingstack.backends.questdb import QuestDBProvisioner
from tradingstack.plan import StackRef, build_plan, egress_ports, parse_spec

from conftest import NatsServer, RedisServer, free_port, http_json, wait_for

ESTABLISHED = "01"


def remote_ports(pid: int) -> set[int]:
    """Remote ports of the process's established TCP connections (its sockets by inode in /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed in between
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == ESTABLISHED and fields[9] in inodes:
                ports.add(int(fields[2].rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.skipif(not Path("/proc/self/net/tcp").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("service", [ServiceName.PNL, ServiceName.RISK, ServiceName.GATEWAY])
def test_a_service_connects_only_where_its_policy_lets_it(
    tmp_path: Path, questdb: Any, service: ServiceName
) -> None:  # fmt: skip
    nats_server, redis_server = NatsServer(tmp_path / "nats"), RedisServer(tmp_path / "redis")
    nats_server.start()
    redis_server.start()
    spec = {"infrastructure": {"nats": {"url": nats_server.url}, "redis": {"url": redis_server.url},
                               "questdb": {"url": questdb.url}}}  # fmt: skip
    plan = build_plan(StackRef("flows", "ns"), parse_spec(spec))
    assert JetStreamProvisioner(nats_server.url).reconcile(plan).ok
    assert QuestDBProvisioner(questdb.url).reconcile(plan).ok
    workload = next(w for w in plan.workloads if w.service == service)
    env = {**os.environ, **workload.config, "PORT": str(free_port()), "TICK_RATE": "5"}
    process = subprocess.Popen([sys.executable, "-m", "tradingstack.cli", "service", service.value], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{env['PORT']}"
        wait_for(lambda: http_json(f"{url}/readyz")[0] == 200, 60, f"{service.value} ready")
        time.sleep(2)  # past its first writes (pnl's history, the gateway's ticks)
        seen = remote_ports(process.pid)
    finally:
        process.terminate()
        process.wait(30)
        redis_server.stop()
        nats_server.stop()
    allowed = set(egress_ports(plan.spec, service))
    assert seen, "no connection seen: the check would prove nothing"
    assert seen <= allowed, f"{service.value} connects to {sorted(seen - allowed)}, which its policy blocks"
    used = {nats_server.port} | ({redis_server.port} if service != ServiceName.GATEWAY else set())
    assert used <= seen  # and the policy's ports are ones it uses
