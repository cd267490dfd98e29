"""`tradingstack provision` and `check`: the same plan applied to running servers, no Kubernetes."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from questdb_double import QuestDBDouble
from tradingstack.api import OWNERS_TABLE

from conftest import NatsServer, RedisServer


@pytest.fixture
def stack_file(tmp_path: Path, s3_url: str) -> tuple[Path, NatsServer, QuestDBDouble]:
    nats_server = NatsServer(tmp_path / "js")
    nats_server.start()
    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    qdb = QuestDBDouble().__enter__()
    doc = {
        "apiVersion": "tradingstack.io/v1alpha1",
        "kind": "TradingStack",
        "metadata": {"name": "compose"},
        "spec": {
            "infrastructure": {
                "nats": {"url": nats_server.url},
                "redis": {"url": redis_server.url},
                "questdb": {"url": qdb.url},
                "s3": {"endpoint": s3_url, "allowHttp": True, "bucket": f"cli-{uuid.uuid4().hex[:8]}"},
            }
        },
    }
    path = tmp_path / "stack.yaml"
    path.write_text(yaml.safe_dump(doc))
    yield path, nats_server, qdb
    qdb.__exit__()
    redis_server.stop()
    nats_server.stop()


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret"}
    return subprocess.run(
        [sys.executable, "-m", "tradingstack.cli", *args], capture_output=True, text=True, check=False, env=env
    )


def test_check_then_provision_then_check_clean(stack_file: Any) -> None:
    path, _, qdb = stack_file
    before = run("check", "-f", str(path))
    assert before.returncode == 1
    assert "compose: streams: would create Stream/MARKET_TICKS" in before.stdout
    assert "compose: tables: would create Table/ticks" in before.stdout

    dry = run("provision", "-f", str(path), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert qdb.state.tables == {}, "a dry run changed something"

    applied = run("provision", "-f", str(path))
    assert applied.returncode == 0, applied.stderr
    assert "did create Bucket/" in applied.stdout
    assert set(qdb.state.tables) == {"ticks", "ohlcv_1m", "orders", "fills", "positions", OWNERS_TABLE}

    after = run("check", "-f", str(path))
    assert after.returncode == 0, after.stdout + after.stderr
    assert after.stdout.count("in sync") == 4  # streams, buckets, tables and the Redis database


def test_check_says_what_drifted(stack_file: Any) -> None:
    path, _, qdb = stack_file
    assert run("provision", "-f", str(path)).returncode == 0
    del qdb.state.tables["ticks"].columns["bid"]
    result = run("check", "-f", str(path))
    assert result.returncode == 1
    assert "would update Table/ticks (add column bid DOUBLE)" in result.stdout


def test_unreachable_server_fails_with_a_reason(stack_file: Any) -> None:
    path, nats_server, _ = stack_file
    nats_server.stop()
    result = run("provision", "-f", str(path))
    assert result.returncode == 1
    assert f"streams: unreachable: NATS at {nats_server.url}" in result.stderr
