"""kopf's login uses the operator's own Kubernetes configuration, in-cluster included."""

from __future__ import annotations

from pathlib import Path

import kubernetes
import pytest
from kubernetes.config.incluster_config import InClusterConfigLoader

from tradingstack.handlers import connection_info


def in_cluster_config(tmp_path: Path, token: str) -> kubernetes.client.Configuration:
    """What `load_incluster_config` builds in a pod, from the files a ServiceAccount mounts."""
    (tmp_path / "token").write_text(token)
    (tmp_path / "ca.crt").write_text("not checked here")
    config = kubernetes.client.Configuration()
    InClusterConfigLoader(
        token_filename=str(tmp_path / "token"),
        cert_filename=str(tmp_path / "ca.crt"),
        environ={"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"},
    ).load_and_set(config)
    return config


def test_in_cluster_token_is_sent_once_with_one_scheme(tmp_path: Path) -> None:
    # The kubernetes client stores the pod's token as "bearer <token>" (lower case); kopf adds the
    # scheme itself, so anything but the bare token becomes "Bearer bearer <token>" and a 401.
    info = connection_info(in_cluster_config(tmp_path, "eyJhbGciOi.token.value"))
    assert info.scheme == "Bearer"
    assert info.token == "eyJhbGciOi.token.value"
    assert info.server == "https://10.0.0.1:443"
    assert info.ca_path == str(tmp_path / "ca.crt")


@pytest.mark.parametrize("stored", ["Bearer abc", "bearer abc", "BEARER abc", "abc"])
def test_any_stored_scheme_is_stripped(stored: str) -> None:
    config = kubernetes.client.Configuration()
    config.host = "https://127.0.0.1:6443"
    config.api_key = {"authorization": stored}
    assert connection_info(config).token == "abc"


def test_no_token_means_no_scheme() -> None:
    config = kubernetes.client.Configuration()
    config.host = "https://127.0.0.1:6443"
    info = connection_info(config)
    assert info.token is None
    assert info.scheme is None
