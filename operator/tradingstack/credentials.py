"""Credentials for NATS, Redis and QuestDB, and URLs made safe to print.

The operator reads them from the Secret a spec's `secretRef` names; a service reads them from
its environment, where Kubernetes put them from the same Secret (`valueFrom.secretKeyRef`).
They never travel in a URL, a ConfigMap, a status, an event or a log line.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from typing import Any

# scheme://user:password@host -> scheme://***@host (the user may be a secret too: a token).
_USERINFO = re.compile(r"^([a-z][a-z0-9+.-]*://)[^/@\s]*@", re.IGNORECASE)


def redact_url(url: str) -> str:
    """The URL with any user information replaced, fit for a log line, a status or an error."""
    return _USERINFO.sub(r"\1***@", url)


def has_userinfo(url: str) -> bool:
    return _USERINFO.match(url) is not None


@dataclass(frozen=True)
class ServerCredentials:
    """A username and password, or a token. Either may be absent: the server then needs none."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    def __bool__(self) -> bool:
        return bool(self.password or self.token)

    def nats_options(self) -> dict[str, Any]:
        """Keyword arguments for nats.connect."""
        if self.token:
            return {"token": self.token}
        if self.password:
            return {"user": self.username or "", "password": self.password}
        return {}

    def redis_options(self) -> dict[str, Any]:
        """Keyword arguments for redis.Redis (Redis 6 ACL user, or the default user's password)."""
        if self.password:
            return {"username": self.username, "password": self.password}
        return {}

    def authorization(self) -> str | None:
        """An HTTP Authorization header: QuestDB's basic auth (http.user/http.password), or a token."""
        if self.token:
            return f"Bearer {self.token}"
        if self.password:
            pair = f"{self.username or ''}:{self.password}".encode()
            return "Basic " + base64.b64encode(pair).decode()
        return None
