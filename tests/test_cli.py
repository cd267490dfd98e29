"""The `tradingstack` command as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from conftest import ROOT


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tradingstack.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
    )


def test_crd_prints_the_checked_in_file() -> None:
    result = run("crd")
    assert result.returncode == 0
    assert result.stdout == (ROOT / "crds" / "tradingstack.io_tradingstacks.yaml").read_text()
    assert run("crd", "--check", str(ROOT / "crds" / "tradingstack.io_tradingstacks.yaml")).returncode == 0


def test_crd_check_fails_on_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "crd.yaml"
    stale.write_text("# old\n")
    result = run("crd", "--check", str(stale))
    assert result.returncode == 1
    assert "out of date" in result.stderr


def test_render_minimal_sample() -> None:
    result = run("render", "-f", str(ROOT / "manifests" / "samples" / "minimal.yaml"), "-n", "trading")
    assert result.returncode == 0, result.stderr
    objects = list(yaml.safe_load_all(result.stdout))
    assert len([o for o in objects if o["kind"] == "Deployment"]) == 8
    assert {o["metadata"]["namespace"] for o in objects} == {"trading"}


def test_render_reports_an_invalid_spec_clearly() -> None:
    bad = "apiVersion: tradingstack.io/v1alpha1\nkind: TradingStack\nmetadata: {name: x}\nspec: {services: {foo: {}}}\n"
    result = run("render", "-f", "-", stdin=bad)
    assert result.returncode == 1
    assert "unknown service name(s) foo" in result.stderr
    assert "Traceback" not in result.stderr


def test_render_rejects_a_wrong_api_version() -> None:
    result = run("render", "-f", "-", stdin="apiVersion: v1\nkind: TradingStack\nmetadata: {name: x}\n")
    assert result.returncode == 1
    assert "apiVersion must be tradingstack.io/v1alpha1" in result.stderr
